"""The tail of a batch keeps its x_scale of ones marked, and factorize skips it (issue 14).

``loop.admit`` marks an ``x_scale`` of ones (``counts.mark_unit``) so that the
step rules skip their products by it. The rows that ``compact`` gathers,
``concat`` appends and a ``RowView`` selects used to lose the mark, so after a
batch's first finished problem every later iteration multiplied by ones
again (``bench_tail.py``: 1,151 of 1,206 'trf' iterations). The factors of
``linalg.factorize`` with a marked scaling of ones are those without a
scaling (the same code path), and ``_eig_factors`` gathers from the whole
batch only the rows it sends to the SVD.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchimize_scipy import batch_least_squares
from torchimize_scipy._engine import linalg, loop
from torchimize_scipy._engine.counts import known_unit, mark_unit
from torchimize_scipy._engine.linalg import factorize


def _state(B: int, unit: bool) -> dict:
    scale = torch.ones(B, 3, dtype=torch.float64) if unit else torch.full((B, 3), 2.0,
                                                                          dtype=torch.float64)
    return {"x": torch.arange(3.0 * B, dtype=torch.float64).view(B, 3),
            "scale": mark_unit(scale.view_as(scale)) if unit else scale}


def test_compact_keeps_the_unit_mark():
    state = _state(5, True)
    loop.compact(state, torch.tensor([0, 2, 4]))
    assert state["scale"].shape == (3, 3) and known_unit(state["scale"])
    assert torch.equal(state["x"][:, 0], torch.tensor([0.0, 6.0, 12.0], dtype=torch.float64))
    assert not known_unit(state["x"])
    other = _state(4, False)
    loop.compact(other, torch.tensor([1, 3]))
    assert not known_unit(other["scale"])


@pytest.mark.parametrize(("left", "right", "marked"),
                         [(True, True, True), (True, False, False), (False, True, False)])
def test_concat_keeps_the_mark_of_ones_and_ones_only(left, right, marked):
    state, new = _state(2, left), _state(3, right)
    loop.concat(state, new)
    assert state["scale"].shape == (5, 3)
    assert known_unit(state["scale"]) is marked


def test_row_view_keeps_the_unit_mark():
    state = _state(4, True)
    view = loop.take(state, torch.tensor([1, 3]))
    assert view["scale"].shape == (2, 3) and known_unit(view["scale"])
    assert not known_unit(loop.take(_state(4, False), torch.tensor([1]))["scale"])


def _ill_batch(B: int = 9, seed: int = 0):
    """Well-conditioned rows, rows in eigh's range and hopeless rows, mixed."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(B, 40, 6, dtype=torch.float64, generator=g)
    J[1::3, :, -1] = J[1::3, :, 0] + 3e-5 * J[1::3, :, -1]  # cond(J)**2 ~ 1e10: eigh's range
    J[2::3, :, -1] = J[2::3, :, 0] + 1e-9 * J[2::3, :, -1]  # ~1e18: the direct SVD
    f = torch.randn(B, 40, dtype=torch.float64, generator=g)
    return J, f


def test_factorize_with_a_marked_unit_scale_is_factorize_without_one():
    J, f = _ill_batch()
    ones = torch.ones(J.shape[0], J.shape[-1], dtype=torch.float64)
    marked = factorize(J, mark_unit(ones.view_as(ones)), f, use_gram=True)
    plain = factorize(J, None, f, use_gram=True)
    for a, b in zip(marked, plain, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    # an unmarked scaling of ones gives the same factors to rounding
    unmarked = factorize(J, ones, f, use_gram=True)
    torch.testing.assert_close(unmarked.s, plain.s, rtol=1e-9, atol=0)


@pytest.mark.parametrize("scaled", [False, True])
def test_rows_eigh_rejects_get_the_direct_svd_of_their_own_rows(scaled, monkeypatch):
    J, f = _ill_batch()
    B, m, n = J.shape
    # (a mild scaling, which keeps each row's conditioning range)
    d = (0.2 * torch.rand(B, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
         + 0.9) if scaled else None
    seen = []
    original = linalg.svd_factors

    def spy(A, *args, **kwargs):
        seen.append(A.shape[0])
        return original(A, *args, **kwargs)

    monkeypatch.setattr(linalg, "svd_factors", spy)
    fac = factorize(J, d, f, use_gram=True)
    gram = fac.gram
    assert gram[0::3].all() and not gram[1::3].any() and not gram[2::3].any()
    hopeless = torch.arange(2, B, 3)
    assert seen == [hopeless.numel()]  # the eigh rows are served, the hopeless ones are not
    A = J[hopeless] if d is None else J[hopeless] * d[hopeless].unsqueeze(-2)
    s, V, uf = original(A, None, f[hopeless], qr_first=True)  # (a batch's SVD rows)
    assert torch.equal(fac.s[hopeless], s) and torch.equal(fac.V[hopeless], V)
    assert torch.equal(fac.uf[hopeless], uf)
    # the eigh rows: the singular values of A to the accuracy of the squared matrix
    eig = torch.arange(1, B, 3)
    A_e = J[eig] if d is None else J[eig] * d[eig].unsqueeze(-2)
    s_ref = torch.linalg.svdvals(A_e)
    scale = s_ref[:, :1]
    assert np.all((torch.abs(fac.s[eig] - s_ref) <= 1e-6 * scale).numpy())


def test_batch_with_finished_rows_matches_itself_row_by_row():
    """A batch whose problems finish at different iterations (compactions) gives each
    problem the result it gets alone, to the solver's tolerances."""
    t = np.linspace(0, 4, 30)
    rng = np.random.default_rng(5)
    k = np.array([0.3, 1.0, 2.0, 4.0])
    y = np.exp(-k[:, None] * t) + 0.01 * rng.standard_normal((4, 30))

    def fun(x, yy):
        return x[:, :1] * np.exp(-x[:, 1:] * t) - yy

    x0 = np.tile([1.5, 0.5], (4, 1))
    res = batch_least_squares(fun, x0, args=(y,), method="trf")
    assert len(set(np.asarray(res.nfev).tolist())) > 1  # they finish apart
    for i in range(4):
        one = batch_least_squares(fun, x0[i:i + 1], args=(y[i:i + 1],), method="trf")
        np.testing.assert_allclose(res.x[i], one.x[0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_gram_solve_without_q_gives_the_same_step(alpha):
    """The callers that take the step alone skip ``q = p^T M p``; ``p`` is the same."""
    J, f = _ill_batch()
    fac = factorize(J, None, f, use_gram=True)
    a = None if alpha is None else torch.full((J.shape[0],), alpha, dtype=torch.float64)
    p, q = linalg.gram_solve(fac, a)
    p_only, none = linalg.gram_solve(fac, a, with_q=False)
    assert none is None and q.shape == (J.shape[0],)
    assert torch.equal(p_only, p)  # (the same operations: bit for bit)
