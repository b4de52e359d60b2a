"""'lm''s lmpar on the rows that still iterate (issue 16).

``_engine/trust_region._solve_minpack`` continues MINPACK's Newton iteration
on the Levenberg-Marquardt parameter with the rows of the problems that still
iterate alone whenever fewer than ``RESTRICT_BELOW`` of the batch do
(``_lmpar_newton``). Each row's arithmetic is the same either way, so the
results must be those of the whole-batch iteration bit for bit (the same code
path, run with and without the restriction), on the host and tensor paths,
and close to each problem solved on its own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _factor_batches import factor_batch
from _parity import assert_bitwise_equal

from torchimize_scipy._engine import trust_region
from torchimize_scipy._engine.linalg import gauss_newton_step
from torchimize_scipy._engine.trust_region import solve_trust_region_minpack

TENTH = 0.1  # lmpar stops when | |p| - delta | <= 0.1 delta


def _batch(B: int, m: int = 12, n: int = 4, seed: int = 0):
    return factor_batch(B, m, n, seed)[0]


def _deltas(fac, outside: np.ndarray) -> torch.Tensor:
    """Radii that hold the Gauss-Newton step except on the rows ``outside``."""
    gn = torch.linalg.vector_norm(gauss_newton_step(fac), dim=-1)
    return gn * torch.from_numpy(np.where(outside, 0.3, 2.0))


def _solve(fac, delta, par0, m, n, host, restrict, monkeypatch):
    monkeypatch.setattr(trust_region, "RESTRICT_BELOW", 0.25 if restrict else 0.0)
    return solve_trust_region_minpack(fac, delta, par0, m, n, host=host)


def _counting(monkeypatch) -> list[int]:
    """Record the number of rows of every damped radius evaluation of lmpar."""
    sizes: list[int] = []
    terms = trust_region._radius_terms

    def counting(sc, fac, sp, alpha, delta, *args, **kwargs):
        if alpha is not None:
            sizes.append(sc.B)
        return terms(sc, fac, sp, alpha, delta, *args, **kwargs)

    monkeypatch.setattr(trust_region, "_radius_terms", counting)
    return sizes


@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("n_outside", [1, 3, 9])
def test_restricted_rows_give_the_whole_batch_bits(host, n_outside, monkeypatch):
    B, m, n = 40, 12, 4
    fac = _batch(B, m, n)
    assert 0 < int(fac.gram.sum()) < B  # both routes
    outside = np.zeros(B, dtype=bool)
    outside[np.arange(n_outside) * 4 + 1] = True  # Gram and SVD rows among them
    outside[0] = True  # an SVD row
    delta = _deltas(fac, outside)
    par0 = torch.zeros(B, dtype=torch.float64)
    par0[::2] = 0.1  # some warm starts
    p_all, par_all = _solve(fac, delta, par0, m, n, host, False, monkeypatch)
    sizes = _counting(monkeypatch)
    p_rows, par_rows = _solve(fac, delta, par0, m, n, host, True, monkeypatch)
    assert_bitwise_equal(p_rows, p_all)
    assert_bitwise_equal(par_rows, par_all)
    # only the running rows iterate once they are fewer than a quarter of the batch
    n_out = int(outside.sum())
    assert sizes[0] == (n_out if n_out < B / 4 else B)
    assert all(size <= n_out for size in sizes[1:])
    # the rows outside end within 10 % of their radius with a positive parameter
    out = torch.from_numpy(outside)
    norms = torch.linalg.vector_norm(p_rows, dim=-1)
    assert (abs(norms[out] - delta[out]) <= TENTH * delta[out] * (1 + 1e-12)).all()
    assert (par_rows[out] > 0).all()
    assert (par_rows[~out] == 0).all()


@pytest.mark.parametrize("host", [True, False])
def test_newton_iteration_narrows_to_the_running_rows(host, monkeypatch):
    # every problem starts outside; rows warm-started at their own parameter stop
    # after one iteration, the others go on: the later solves see few rows
    B, m, n = 40, 12, 4
    fac = _batch(B, m, n, seed=1)
    delta = _deltas(fac, np.ones(B, dtype=bool))
    _, par_ref = _solve(fac, delta, torch.zeros(B, dtype=torch.float64), m, n, host, False,
                        monkeypatch)
    par0 = par_ref.clone()
    par0[::8] = 1e-6 * par0[::8]  # 5 of 40 rows start far from their parameter
    sizes = _counting(monkeypatch)
    p_all, par_all = _solve(fac, delta, par0, m, n, host, False, monkeypatch)
    whole = list(sizes)
    sizes.clear()
    p_rows, par_rows = _solve(fac, delta, par0, m, n, host, True, monkeypatch)
    assert_bitwise_equal(p_rows, p_all)
    assert_bitwise_equal(par_rows, par_all)
    assert len(whole) > 1 and set(whole) == {B}  # without the restriction: every row
    assert sizes[0] == B and min(sizes) < B / 4  # with it: later solves on a few rows
    assert sum(sizes) < sum(whole)


@pytest.mark.parametrize("host", [True, False])
def test_restricted_batch_matches_problems_solved_alone(host):
    B, m, n = 20, 12, 4
    fac = _batch(B, m, n, seed=2)
    outside = np.zeros(B, dtype=bool)
    outside[[2, 3, 10]] = True
    delta = _deltas(fac, outside)
    par0 = torch.zeros(B, dtype=torch.float64)
    p, par = solve_trust_region_minpack(fac, delta, par0, m, n, host=host)
    for i in range(B):
        one = trust_region.Factors(*(None if t is None else t[i:i + 1] for t in fac))
        p_i, par_i = solve_trust_region_minpack(one, delta[i:i + 1], par0[i:i + 1], m, n,
                                                host=host)
        # the same iteration on the same row's factors: equal up to rounding
        scale = float(delta[i])
        np.testing.assert_allclose(p[i].numpy(), np.asarray(p_i)[0], rtol=0,
                                   atol=1e-9 * scale)
        assert (float(par[i]) > 0) == bool(outside[i])
