"""'trf''s trust-region subproblem on the rows that still need it (issue 16).

``_engine/trust_region._solve_scipy`` continues Moré's Newton iteration on
``alpha`` (and the final damped solve) with the rows of the problems that
still need it alone once fewer than ``RESTRICT_BELOW`` of the batch do. Each
row's arithmetic is the same either way, so the results must be those of the
whole-batch iteration bit for bit (the same code path, run with and without
the restriction), and close to each problem solved on its own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _factor_batches import factor_batch
from _parity import assert_bitwise_equal

from torchimize_scipy._engine import trust_region
from torchimize_scipy._engine.linalg import factorize
from torchimize_scipy._engine.trust_region import solve_trust_region_scipy

RTOL = 0.01  # solve_trust_region_scipy's default: |p| = delta (1 +- RTOL)


def _batch(B: int, m: int = 12, n: int = 4, seed: int = 0):
    return factor_batch(B, m, n, seed)


def _gauss_newton_norms(fac, J, d, f) -> torch.Tensor:
    p = torch.linalg.lstsq(J * d.unsqueeze(-2), -f.unsqueeze(-1)).solution.squeeze(-1)
    return torch.linalg.vector_norm(p, dim=-1)


def _solve(fac, delta, alpha0, m, n, host, restrict, monkeypatch):
    monkeypatch.setattr(trust_region, "RESTRICT_BELOW", 0.25 if restrict else 0.0)
    return solve_trust_region_scipy(fac, delta, alpha0, m, n, host=host)


def _deltas(fac, J, d, f, outside: np.ndarray) -> torch.Tensor:
    """Radii that hold the Gauss-Newton step except on the rows ``outside``."""
    gn = _gauss_newton_norms(fac, J, d, f)
    shrink = torch.from_numpy(np.where(outside, 0.3, 2.0))
    return gn * shrink


@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("n_outside", [1, 3, 9])
def test_restricted_rows_give_the_whole_batch_bits(host, n_outside, monkeypatch):
    B, m, n = 40, 12, 4
    fac, J, d, f = _batch(B, m, n)
    assert 0 < int(fac.gram.sum()) < B  # both routes
    outside = np.zeros(B, dtype=bool)
    outside[np.arange(n_outside) * 4 + 1] = True  # Gram and SVD rows among them
    outside[0] = True  # an SVD row
    delta = _deltas(fac, J, d, f, outside)
    alpha0 = torch.zeros(B, dtype=torch.float64)
    alpha0[::2] = 0.1  # some warm starts, some restarts
    p_all, a_all = _solve(fac, delta, alpha0, m, n, host, False, monkeypatch)
    p_rows, a_rows = _solve(fac, delta, alpha0, m, n, host, True, monkeypatch)
    assert_bitwise_equal(p_rows, p_all)
    assert_bitwise_equal(a_rows, a_all)
    # the rows outside end on the boundary with a positive alpha
    norms = torch.linalg.vector_norm(p_rows, dim=-1)
    out = torch.from_numpy(outside)
    np.testing.assert_allclose(norms[out], delta[out], rtol=1e-12)
    assert (a_rows[out] > 0).all()


@pytest.mark.parametrize("host", [True, False])
def test_newton_iteration_narrows_to_the_running_rows(host, monkeypatch):
    # every problem starts outside; the warm-started ones converge in one
    # iteration, the restarted ones go on: the later damped solves see few rows
    B, m, n = 40, 12, 4
    fac, J, d, f = _batch(B, m, n, seed=1)
    outside = np.ones(B, dtype=bool)
    delta = _deltas(fac, J, d, f, outside)
    _, a_ref = _solve(fac, delta, torch.zeros(B, dtype=torch.float64), m, n, host, False,
                      monkeypatch)
    alpha0 = a_ref.clone()
    alpha0[::8] = 0.0  # 5 of 40 rows restart from Moré's point
    sizes: list[int] = []
    solve = trust_region.gram_solve

    def counting(fac_, alpha, keepdim=False, with_q=True):
        sizes.append(fac_.b.shape[0])
        return solve(fac_, alpha, keepdim, with_q)

    monkeypatch.setattr(trust_region, "gram_solve", counting)
    # (the Gram rows' own selection, test_tail_gram_rows.py, off: every solve has every row)
    monkeypatch.setattr(trust_region, "_gram_rows", lambda *args: None)
    p_all, a_all = _solve(fac, delta, alpha0, m, n, host, False, monkeypatch)
    whole = list(sizes)
    sizes.clear()
    p_rows, a_rows = _solve(fac, delta, alpha0, m, n, host, True, monkeypatch)
    assert_bitwise_equal(p_rows, p_all)
    assert_bitwise_equal(a_rows, a_all)
    assert max(whole[1:]) == B  # without the restriction every solve has every row
    assert min(sizes) < B / 4  # with it, later solves have fewer than a quarter
    assert sum(sizes) < sum(whole)


@pytest.mark.parametrize("host", [True, False])
def test_restricted_batch_matches_problems_solved_alone(host):
    B, m, n = 20, 12, 4
    fac, J, d, f = _batch(B, m, n, seed=2)
    outside = np.zeros(B, dtype=bool)
    outside[[2, 3, 10]] = True
    delta = _deltas(fac, J, d, f, outside)
    alpha0 = torch.zeros(B, dtype=torch.float64)
    p, alpha = solve_trust_region_scipy(fac, delta, alpha0, m, n, host=host)
    for i in range(B):
        one = factorize(J[i:i + 1], d[i:i + 1], f[i:i + 1], use_gram=False)
        p_i, a_i = solve_trust_region_scipy(one, delta[i:i + 1], alpha0[i:i + 1], m, n,
                                            host=host)
        # both solve |p| = delta (1 +- RTOL) by the same iteration on other factors
        scale = float(delta[i])
        np.testing.assert_allclose(p[i].numpy(), p_i[0].numpy(), atol=2 * RTOL * scale)
        if outside[i]:
            assert float(alpha[i]) > 0 and float(a_i[0]) > 0
