"""A batch's tail (issue 14): damped Gram solves on the Gram rows alone, one thread held.

``_engine/trust_region._GramRows``: where a batch takes both routes (Gram and
SVD rows) on the host, the damped solves ``(H + alpha I)^{-1}`` of Moré's
Newton iteration run on the Gram rows alone; before, every row was inverted
and the SVD rows' values thrown away. Each row's arithmetic is the same
(per-matrix inverses and products, per-row norms), so the results must be
those of the whole-batch solves bit for bit (the same code path, run with and
without the selection), for 'trf' (``solve_trust_region_scipy``) and 'lm'
(``solve_trust_region_minpack``).

``_engine/loop.TAIL_ENTRIES``: once nothing is left to admit, the tail of a
batch of small problems runs MKL and OpenMP single-threaded in the calling
thread up to 4 x torch's grain size of running Jacobian entries (was 1 x).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _parity import assert_bitwise_equal
from test_engine_lean import exp_fits_thread_log

from torchimize_scipy import _blas_threads, batch_least_squares
from torchimize_scipy._engine import loop, trust_region
from torchimize_scipy._engine.linalg import factorize
from torchimize_scipy._engine.trust_region import (
    solve_trust_region_minpack,
    solve_trust_region_scipy,
)


def _batch(B: int, m: int = 12, n: int = 4, seed: int = 0):
    """Factors of a batch with Gram and SVD rows (every third row nearly rank-deficient)."""
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    J[::3, :, -1] = J[::3, :, 0] + 1e-7 * J[::3, :, -1]  # cond(J)**2 beyond the Gram limit
    f = torch.randn(B, m, generator=gen, dtype=torch.float64)
    d = torch.rand(B, n, generator=gen, dtype=torch.float64) + 0.5
    fac = factorize(J, d, f, use_gram=True)
    gn = torch.linalg.lstsq(J * d.unsqueeze(-2), -f.unsqueeze(-1)).solution.squeeze(-1)
    return fac, torch.linalg.vector_norm(gn, dim=-1)


def _counting(monkeypatch) -> list[int]:
    """Rows of every damped Gram solve (``alpha`` given) from now on."""
    sizes: list[int] = []
    solve = trust_region.gram_solve

    def counting(fac_, alpha, keepdim=False, with_q=True):
        if alpha is not None:
            sizes.append(fac_.b.shape[0])
        return solve(fac_, alpha, keepdim, with_q)

    monkeypatch.setattr(trust_region, "gram_solve", counting)
    return sizes


@pytest.mark.parametrize("restrict", [0.0, 0.25])
@pytest.mark.parametrize("solver", ["trf", "lm"])
def test_damped_gram_solves_see_only_gram_rows_bit_for_bit(solver, restrict, monkeypatch):
    B, m, n = 30, 12, 4
    fac, gn = _batch(B, m, n)
    n_gram = int(fac.gram.sum())
    assert 0 < n_gram < B  # both routes
    # every step leaves its trust region except a few (the running-row restriction of
    # 'trf' starts with restrict=0.25)
    shrink = np.full(B, 0.3)
    shrink[1::4] = 2.0
    delta = gn * torch.from_numpy(shrink)
    alpha0 = torch.zeros(B, dtype=torch.float64)
    alpha0[::2] = 0.1
    monkeypatch.setattr(trust_region, "RESTRICT_BELOW", restrict)

    def solve():
        if solver == "trf":
            return solve_trust_region_scipy(fac, delta, alpha0, m, n, host=True)
        return solve_trust_region_minpack(fac, delta, alpha0, m, n, host=True)

    sizes = _counting(monkeypatch)
    p_rows, a_rows = solve()
    selected = list(sizes)
    sizes.clear()
    monkeypatch.setattr(trust_region, "_gram_rows", lambda *args: None)
    p_all, a_all = solve()
    assert_bitwise_equal(p_rows, p_all)
    assert_bitwise_equal(a_rows, a_all)
    assert selected and max(selected) <= n_gram  # never an SVD row inverted
    assert sum(selected) < sum(sizes)
    assert (a_rows[torch.from_numpy(shrink < 1)] > 0).all()


def test_batch_without_svd_rows_keeps_the_whole_batch_solves(monkeypatch):
    # nothing to select: every row is a Gram row
    B, m, n = 8, 12, 4
    gen = torch.Generator().manual_seed(3)
    J = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    f = torch.randn(B, m, generator=gen, dtype=torch.float64)
    fac = factorize(J, None, f, use_gram=True)
    assert bool(fac.gram.all())
    sizes = _counting(monkeypatch)
    delta = torch.full((B,), 1e-3, dtype=torch.float64)
    p, alpha = solve_trust_region_scipy(fac, delta, torch.zeros(B, dtype=torch.float64),
                                        m, n, host=True)
    assert sizes and set(sizes) == {B}
    np.testing.assert_allclose(torch.linalg.vector_norm(p, dim=-1), delta, rtol=0.01)
    assert (alpha > 0).all()


def test_batch_tail_holds_one_thread_up_to_tail_entries():
    # 1,500 exponential fits, m = 100, n = 2 (200 entries each, within the grain
    # size): the tail runs single-threaded once nothing is left to admit and at most
    # TAIL_ENTRIES / 200 rows run (1,310; the grain size alone allowed 163)
    if _blas_threads.mkl_local_threads() is None:
        pytest.skip("torch is not built with MKL")
    _, seen = exp_fits_thread_log(1500, 50.0)
    limit = loop.TAIL_ENTRIES // (100 * 2)
    old_limit = _blas_threads.GRAIN_SIZE // (100 * 2)
    serial = [rows for rows, threads in seen if threads == 1]
    assert serial and max(serial) <= limit
    assert max(serial) > old_limit
    assert any(rows > limit and threads != 1 for rows, threads in seen)


def test_tail_hold_skips_a_problem_above_the_grain_size():
    # one problem of 40,000 Jacobian entries (below TAIL_ENTRIES, above the grain
    # size) keeps the caller's threads: the hold is for batches of small problems
    if _blas_threads.mkl_local_threads() is None:
        pytest.skip("torch is not built with MKL")
    t = np.linspace(0, 1, 20000)
    y = 2.0 * np.exp(-1.5 * t)
    seen = []

    def fun(x):
        seen.append(_blas_threads.mkl_local_threads())
        return x[:, :1] * np.exp(-x[:, 1:] * t) - y

    before = _blas_threads.mkl_local_threads()
    res = batch_least_squares(fun, np.array([[1.0, 1.0], [1.1, 0.9]]), method="trf")
    np.testing.assert_allclose(np.asarray(res.x), [[2.0, 1.5]] * 2, rtol=1e-6)
    assert set(seen) == {before}
