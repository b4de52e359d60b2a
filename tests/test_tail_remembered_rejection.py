"""``linalg.factorize``'s ``rejected``: a row the Gram route rejected keeps the SVD.

In a batch's ill-conditioned tail the same few rows are rejected by the Gram
route's test (LU and ``cond1``, then ``eigh``) round after round, and then take
the SVD anyway. ``Factors.rejected`` remembers each row's verdict; a row
rejected once takes the direct SVD from then on, whatever the other rows of its
batch do (its route depends on its own history alone, so a batch cut into
other chunks gives each problem the same bits), and a batch whose every row was
rejected skips the LU and the test at once, at any size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_tail_rejected_rows import _jac  # (J, f, d; ill-conditioned with cond_bad)

from torchimize_scipy import batch_least_squares, least_squares
from torchimize_scipy._engine import linalg
from torchimize_scipy._engine.linalg import WITHIN_MIN_ROWS, factorize


def _count_inverses(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = torch.linalg.inv_ex
    monkeypatch.setattr(torch.linalg, "inv_ex", lambda H: calls.append(H.shape[0]) or real(H))
    return calls


def test_the_test_reports_its_verdicts():
    J, f, d = _jac(6, cond_bad=False)
    Jb, _, _ = _jac(6, cond_bad=True)
    J[::2] = Jb[::2]
    fac = factorize(J, d, f, use_gram=True)
    assert fac.rejected.tolist() == [True, False] * 3
    assert (fac.rejected == ~fac.gram).all()
    Jg, fg, dg = _jac(5, cond_bad=False)
    every = factorize(Jg, dg, fg, use_gram=True)
    assert not bool(every.rejected.any())
    # single problems (no Gram route): nothing to remember
    assert factorize(J, d, f, use_gram=False).rejected is None


@pytest.mark.parametrize("with_diag", [False, True])
@pytest.mark.parametrize("with_d", [False, True])
def test_a_rejected_tail_skips_the_test_and_takes_the_direct_svd(with_d, with_diag,
                                                                 monkeypatch):
    J, f, d = _jac(5, cond_bad=True)
    d = d if with_d else None
    # (bounded 'trf': the augmented system, a tiny diagonal that leaves it ill-conditioned)
    diag = torch.full((5, 4), 1e-24, dtype=torch.float64) if with_diag else None
    tested = factorize(J, d, f, diag, use_gram=True)
    assert bool(tested.rejected.all())
    calls = _count_inverses(monkeypatch)
    fac = factorize(J, d, f, diag, use_gram=True, rejected=tested.rejected)
    assert calls == []  # no LU (nor eigh: it would follow the LU)
    assert not bool(fac.gram.any()) and bool(fac.rejected.all())
    # the same SVD data as the test's own route for these rows (the direct SVD)
    for got, want in zip(fac[:3], tested[:3], strict=True):
        assert torch.equal(got, want)


def test_a_row_rejected_before_keeps_the_svd_beside_rows_that_are_tested(monkeypatch):
    J, f, d = _jac(6, cond_bad=True)
    Jg, _, _ = _jac(6, cond_bad=False)
    J[0] = Jg[0]  # row 0 has become well-conditioned, but was rejected before
    J[5] = Jg[5]  # row 5 is well-conditioned and was not rejected
    remembered = torch.tensor([True, True, True, True, True, False])
    calls = _count_inverses(monkeypatch)
    fac = factorize(J, d, f, use_gram=True, rejected=remembered)
    assert calls == [6]  # (row 5 is tested)
    assert fac.gram.tolist() == [False] * 5 + [True]
    assert fac.rejected.tolist() == [True] * 5 + [False]
    # each rejected row's SVD data are those it gets in a tail of its own (the direct
    # SVD): the same route whatever its neighbours
    alone = factorize(J[:5], d[:5], f[:5], use_gram=True, rejected=remembered[:5])
    for got, want in zip(fac[:3], alone[:3], strict=True):
        assert torch.equal(got[:5], want)


def test_a_rejected_batch_of_many_rows_skips_the_test(monkeypatch):
    J, f, d = _jac(WITHIN_MIN_ROWS, cond_bad=True)
    calls = _count_inverses(monkeypatch)
    fac = factorize(J, d, f, use_gram=True,
                    rejected=torch.ones(WITHIN_MIN_ROWS, dtype=torch.bool))
    assert calls == []
    assert not bool(fac.gram.any()) and bool(fac.rejected.all())


def test_off_the_host_the_rows_take_the_same_route(monkeypatch):
    """Off the host no count is read: the test runs, and the rows rejected before still
    take the direct SVD, with the host's values."""
    J, f, d = _jac(5, cond_bad=True)
    Jg, _, _ = _jac(5, cond_bad=False)
    J[1] = Jg[1]  # (would pass the test)
    on_host = factorize(J, d, f, use_gram=True, rejected=torch.ones(5, dtype=torch.bool))
    monkeypatch.setattr(linalg.host_scalars, "HOST", False)
    calls = _count_inverses(monkeypatch)
    fac = factorize(J, d, f, use_gram=True, rejected=torch.ones(5, dtype=torch.bool))
    assert calls == [5]
    assert bool(fac.rejected.all()) and not bool(fac.gram.any())
    for got, want in zip(fac[:3], on_host[:3], strict=True):
        assert torch.equal(got, want)


# ---------------------------------------------------------------- end to end
K, M = 2, 40
T = np.linspace(0.0, 10.0, M)


def _peaks(p, y):
    out = -y
    for k in range(K):
        a, mu, s = p[:, 3 * k:3 * k + 1], p[:, 3 * k + 1:3 * k + 2], p[:, 3 * k + 2:3 * k + 3]
        out = out + a * np.exp(-0.5 * ((T - mu) / s) ** 2)
    return out


def _peaks_jac(p, y):
    J = np.empty((p.shape[0], M, 3 * K))
    for k in range(K):
        a, mu, s = p[:, 3 * k:3 * k + 1], p[:, 3 * k + 1:3 * k + 2], p[:, 3 * k + 2:3 * k + 3]
        z = (T - mu) / s
        e = np.exp(-0.5 * z * z)
        J[:, :, 3 * k] = e
        J[:, :, 3 * k + 1] = a * e * z / s
        J[:, :, 3 * k + 2] = a * e * z * z / s
    return J


def _coinciding_peaks(B: int, seed: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """Data ``y`` and starts ``p0`` of ``B`` fits of two peaks: the first at 4, the second
    from 4 (coinciding: ill-conditioned) to 7 (well separated); starts ``spread`` off."""
    rng = np.random.default_rng(seed)
    truth = np.stack([np.full(B, 1.0), np.full(B, 4.0), np.full(B, 0.8),
                      np.full(B, 1.0), 4.0 + np.linspace(0.0, 3.0, B), np.full(B, 0.8)], 1)
    y = _peaks(truth, np.zeros((B, M))) + 0.05 * rng.normal(size=(B, M))
    return y, truth * (1 + spread * rng.normal(size=truth.shape))


@pytest.mark.parametrize("method", ["trf", "lm"])
def test_an_ill_conditioned_batch_matches_single_runs(method, monkeypatch):
    """Two coinciding peaks (an ill-conditioned fit for hundreds of iterations) beside
    well-separated ones: the batch skips the test on its rejected tail, and every row ends
    where a single run (the SVD, as scipy) ends, to the solver's tolerance."""
    B = 8
    y, p0 = _coinciding_peaks(B, seed=4, spread=0.05)
    skipped = []
    real = linalg._count_rejected

    def spy(rejected):
        count = real(rejected)
        skipped.append(count == rejected.shape[0])
        return count

    monkeypatch.setattr(linalg, "_count_rejected", spy)
    res = batch_least_squares(_peaks, p0, jac=_peaks_jac, args=(y,), method=method,
                              return_jac=False)
    assert any(skipped)  # (tests were skipped: the case still exercises the shortcut)
    for i in range(B):
        one = least_squares(lambda q, yy=y[i]: _peaks(q[None], yy[None])[0], p0[i],
                            jac=lambda q, yy=y[i]: _peaks_jac(q[None], yy[None])[0],
                            method=method)
        # the same minimum: costs to ftol (1e-8) relative, with a margin for the path
        assert abs(float(res.cost[i]) - one.cost) <= 1e-6 * one.cost, i


@pytest.mark.parametrize("method", ["trf", "lm"])
def test_an_ill_conditioned_batch_cut_into_chunks_gives_the_same_bits(method):
    """A row's route (Gram, eigh or SVD) depends on its own history, not on whether its
    neighbours were rejected too: blocks of one problem give the batch's bits (before,
    every seed differed, 'lm' by up to 3e-6 in x)."""
    y, p0 = _coinciding_peaks(12, seed=0, spread=0.1)
    kw = dict(jac=_peaks_jac, args=(y,), method=method)
    base = batch_least_squares(_peaks, p0, **kw)
    for cs in (1, 5):
        res = batch_least_squares(_peaks, p0, chunk_size=cs, **kw)
        for field in ("x", "cost", "nfev", "njev", "status", "optimality"):
            np.testing.assert_array_equal(getattr(res, field), getattr(base, field))
