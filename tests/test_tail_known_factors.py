"""``linalg.factorize``'s ``known``: rows whose Jacobian has not changed skip the direct SVD.

Where most rows of a batch are fresh, the loop builds the round's models on
every row and keeps the fresh rows' results alone (``loop.on_rows``). A row
that is not fresh had its last trial rejected: its Jacobian and scaling are
those its stored factors came from, so its SVD (about 30 us for a 12 x 12
matrix, most of a batch tail's round) need not be made again. Each row is
factorised on its own, so the other rows' factors, and every result, keep
their bits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_parity import fun_broyden
from test_tail_rejected_rows import _jac  # (J, f, d; ill-conditioned with cond_bad)
from test_tail_remembered_rejection import M, _peaks, _peaks_jac

from torchimize_scipy import batch_least_squares
from torchimize_scipy._engine import linalg
from torchimize_scipy._engine.linalg import KnownFactors, factorize
from torchimize_scipy._engine.steps import _common, lm, trf
from torchimize_scipy._engine.termination import NONFINITE, RUNNING


def _svd_rows_spy(monkeypatch) -> list[int]:
    """The number of matrices of each direct SVD call (``linalg.svd_factors``)."""
    calls: list[int] = []
    real = linalg.svd_factors

    def spy(J, *args, **kwargs):
        calls.append(J.shape[0])
        return real(J, *args, **kwargs)

    monkeypatch.setattr(linalg, "svd_factors", spy)
    return calls


@pytest.mark.parametrize("remembered", [False, True])
@pytest.mark.parametrize("with_d", [False, True])
def test_known_rows_take_their_factors_and_the_others_keep_their_bits(remembered, with_d,
                                                                      monkeypatch):
    """Every row rejected: remembered (the tail's shortcut) or by the test at once."""
    B = 5
    J, f, d = _jac(B, cond_bad=True)
    d = d if with_d else None
    rejected = torch.ones(B, dtype=torch.bool) if remembered else None
    whole = factorize(J, d, f, use_gram=True, rejected=rejected)
    n = J.shape[-1]
    rows = np.array([False, True, False, True, False])
    # (stand-ins that no factorisation gives: where they show, the rows were not redone)
    known = KnownFactors(rows, torch.full((B, n), 7.0, dtype=J.dtype),
                         torch.full((B, n, n), 3.0, dtype=J.dtype),
                         torch.full((B, n), -2.0, dtype=J.dtype))
    calls = _svd_rows_spy(monkeypatch)
    fac = factorize(J, d, f, use_gram=True, rejected=rejected, known=known)
    assert calls == [3]
    for got, want, stand_in in zip(fac[:3], whole[:3], known[1:], strict=True):
        assert torch.equal(got[~torch.from_numpy(rows)], want[~torch.from_numpy(rows)])
        assert torch.equal(got[torch.from_numpy(rows)], stand_in[torch.from_numpy(rows)])
    assert not bool(fac.gram.any()) and bool(fac.rejected.all())


def test_beside_gram_rows_the_known_rejected_rows_skip_the_svd(monkeypatch):
    """Rows 0, 2, 4 rejected (ill-conditioned), 1, 3, 5 on the Gram route; rows 2 and 3
    known: only rows 0 and 4 are factorised, row 2 takes its known factors, and the Gram
    rows keep theirs whether known or not."""
    B = 6
    J, f, d = _jac(B, cond_bad=False)
    Jb, _, _ = _jac(B, cond_bad=True)
    J[::2] = Jb[::2]
    whole = factorize(J, d, f, use_gram=True)
    assert whole.gram.tolist() == [False, True] * 3
    n = J.shape[-1]
    rows = np.array([False, False, True, True, False, False])
    known = KnownFactors(rows, torch.full((B, n), 7.0, dtype=J.dtype),
                         torch.full((B, n, n), 3.0, dtype=J.dtype),
                         torch.full((B, n), -2.0, dtype=J.dtype))
    calls = _svd_rows_spy(monkeypatch)
    fac = factorize(J, d, f, use_gram=True, known=known)
    assert calls == [2]
    assert fac.gram.tolist() == whole.gram.tolist()
    redone = torch.tensor([0, 1, 3, 4, 5])
    for got, want in zip(fac, whole, strict=True):
        assert torch.equal(got.index_select(0, redone), want.index_select(0, redone))
    for got, stand_in in zip(fac[:3], known[1:], strict=True):
        assert torch.equal(got[2], stand_in[2])


def test_every_row_known_makes_no_svd(monkeypatch):
    B = 3
    J, f, d = _jac(B, cond_bad=True)
    n = J.shape[-1]
    known = KnownFactors(np.ones(B, dtype=bool), torch.ones(B, n, dtype=J.dtype),
                         torch.ones(B, n, n, dtype=J.dtype), torch.ones(B, n, dtype=J.dtype))
    calls = _svd_rows_spy(monkeypatch)
    fac = factorize(J, d, f, use_gram=True, rejected=torch.ones(B, dtype=torch.bool),
                    known=known)
    assert calls == []
    assert torch.equal(fac.s, known.s) and torch.equal(fac.uf, known.uf)


def test_known_factors_are_the_stale_rows_of_the_state():
    from torchimize_scipy._engine.host_scalars import Scalars

    x = torch.zeros(4, 2, dtype=torch.float64)
    hs = Scalars(x[:, 0], floats=False)
    state = {"x": x, "fac_s": torch.arange(8.0).view(4, 2), "fac_V": torch.zeros(4, 2, 2),
             "fac_uf": torch.zeros(4, 2)}
    state["status"], = hs.keep(np.full(4, RUNNING))
    assert _common.known_factors(state) is None  # (no freshness known)
    state["fresh"], = hs.keep(np.array([True, False, True, False]))
    known = _common.known_factors(state)
    np.testing.assert_array_equal(known.rows, [False, True, False, True])
    assert known.s is state["fac_s"]
    # a row that stopped is factorised again (its factors may decide a batch-wide path)
    state["status"], = hs.keep(np.array([RUNNING, RUNNING, RUNNING, NONFINITE]))
    np.testing.assert_array_equal(_common.known_factors(state).rows, [False, True, False, False])
    state["fresh"], = hs.keep(np.ones(4, dtype=bool))
    assert _common.known_factors(state) is None  # every row fresh: nothing to skip


@pytest.mark.parametrize("method, loss", [("trf", "linear"), ("trf", "cauchy"),
                                          ("dogbox", "cauchy"), ("lm", "linear")])
def test_a_batch_with_a_non_finite_start_keeps_its_bits(method, loss, monkeypatch):
    """Broyden's function from perturbed starts, one of them NaN (a row that stops at once
    and stays in the batch): the same bits as with every row refactorised."""
    X0 = -np.ones(9) + 0.05 * np.random.default_rng(7).standard_normal((6, 9))
    X0[0] = -1.0
    X0[3, 0] = np.nan
    kw = dict(method=method, vectorized=False, loss=loss, f_scale=0.3, bounds=(-np.inf, np.inf))
    res = batch_least_squares(fun_broyden, X0, **kw)
    for rule in (lm, trf):
        monkeypatch.setattr(rule, "known_factors", lambda state: None)
    every = batch_least_squares(fun_broyden, X0, **kw)
    for field in ("x", "cost", "fun", "nfev", "njev", "status", "optimality"):
        np.testing.assert_array_equal(getattr(res, field), getattr(every, field))


@pytest.mark.parametrize("method", ["trf", "lm"])
def test_an_ill_conditioned_batch_skips_the_svd_of_rejected_rows(method, monkeypatch):
    """Coinciding peaks (rows on the direct SVD for hundreds of iterations, many trials
    rejected): the same bits as with every row refactorised, and fewer SVDs, at most one
    per Jacobian evaluated."""
    B = 10
    rng = np.random.default_rng(3)
    truth = np.tile([1.0, 4.0, 0.8, 1.0, 4.2, 0.8], (B, 1))  # two peaks 0.2 apart
    y = _peaks(truth, np.zeros((B, M))) + 0.05 * rng.normal(size=(B, M))
    p0 = truth * (1 + 0.3 * rng.normal(size=truth.shape))
    kw = dict(jac=_peaks_jac, args=(y,), method=method, return_jac=False)
    calls = _svd_rows_spy(monkeypatch)
    res = batch_least_squares(_peaks, p0, **kw)
    with_known = sum(calls)
    calls.clear()
    rule = {"trf": trf, "lm": lm}[method]
    monkeypatch.setattr(rule, "known_factors", lambda state: None)
    every = batch_least_squares(_peaks, p0, **kw)
    for field in ("x", "cost", "nfev", "njev", "status", "optimality"):
        np.testing.assert_array_equal(getattr(res, field), getattr(every, field))
    assert with_known < sum(calls)
    assert with_known <= int(res.njev.sum())
