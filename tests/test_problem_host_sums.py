"""One float64 problem's cost, ``J^T f`` and ``J^T J`` summed on the host (few residuals).

``Problem.cost`` and ``Problem.linearize`` add one problem's few terms with
numpy in torch's order (``problem.HOST_SUM_ROWS``); beyond that, and for
batches, float32, robust losses or the device path, torch computes them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _parity import assert_result_parity

from torchimize_scipy import least_squares
from torchimize_scipy._engine import host_scalars
from torchimize_scipy._engine.host_scalars import host_rows
from torchimize_scipy._engine.problem import (
    BMM_NAIVE_TERMS,
    HOST_SUM_COLS,
    HOST_SUM_ROWS,
    Problem,
    host_transposed_rows,
)

EPS = np.finfo(np.float64).eps


def _problem(m: int, n: int, loss=None) -> Problem:
    return Problem(fun=None, jac=None, m=m, n=n, loss=loss, ftol=1e-8, xtol=1e-8, gtol=1e-8,
                   max_nfev=100, jac_scale=True, bounded=False)


def _torch_sums(f: torch.Tensor, J: torch.Tensor):
    Jt = J.transpose(-1, -2)
    return (0.5 * (f * f).sum(-1), torch.bmm(Jt, f.unsqueeze(-1)).squeeze(-1),
            torch.bmm(Jt, J))


@pytest.mark.parametrize("m", range(1, HOST_SUM_ROWS + 1))
@pytest.mark.parametrize("n", [1, 2, 3])
def test_host_sums_agree_with_torchs(m, n):
    rng = np.random.default_rng(10 * m + n)
    prob = _problem(m, n)
    for _ in range(20):
        f = torch.from_numpy(rng.standard_normal((1, m)) * 10.0 ** rng.integers(-3, 4, (1, m)))
        J = torch.from_numpy(rng.standard_normal((1, m, n)))
        cost = prob.cost(f)
        _, _, g, G = prob.linearize(f, J)
        cost_t, g_t, G_t = _torch_sums(f, J)
        assert cost.shape == (1,) and g.shape == (1, n) and G.shape == (1, n, n)
        # (rounding of a sum of m terms: at most m units of its terms' magnitudes)
        scale = m * EPS
        np.testing.assert_allclose(cost.numpy(), cost_t.numpy(), rtol=scale, atol=0)
        bound_g = scale * (J.abs() * f.abs().unsqueeze(-1)).sum(-2)
        assert (g - g_t).abs().le(bound_g).all()
        bound_G = scale * torch.bmm(J.abs().transpose(-1, -2), J.abs())
        assert (G - G_t).abs().le(bound_G).all()
        # the host path hands its values over with the tensors (no read back)
        assert host_rows(G) is not None and host_rows(g) is not None


def test_host_sums_keep_non_finite_values():
    prob = _problem(2, 2)
    f = torch.tensor([[np.nan, 1.0]], dtype=torch.float64)
    J = torch.tensor([[[1.0, np.inf], [2.0, 3.0]]], dtype=torch.float64)
    assert torch.isnan(prob.cost(f)).all()
    _, _, g, G = prob.linearize(f, J)
    _, g_t, G_t = _torch_sums(f, J)
    for got, ref in ((g, g_t), (G, G_t)):  # (NaN and infinities where torch has them)
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert torch.isnan(g).all() and torch.isinf(G[0, 1, 1])
    big = torch.tensor([[1e200, 0.0]], dtype=torch.float64)
    assert torch.isinf(prob.cost(big)).all()  # (an overflow, as torch's)


@pytest.mark.parametrize(("m", "n"), [(0, 2), (2, 0), (0, 0)])
def test_host_sums_of_empty_shapes(m, n):
    """No residuals or no variables: the shapes and values of torch's sums."""
    prob = _problem(m, n)
    f = torch.ones(1, m, dtype=torch.float64)
    J = torch.ones(1, m, n, dtype=torch.float64)
    _, _, g, G = prob.linearize(f, J)
    cost = prob.cost(f)
    assert g.shape == (1, n) and G.shape == (1, n, n) and cost.shape == (1,)
    assert not g.any() and not G.any() and float(cost[0]) == 0.5 * m
    assert g.dtype == G.dtype == cost.dtype == torch.float64


def test_host_sums_do_not_change_the_inputs():
    prob = _problem(3, 2)
    f = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64)
    J = torch.arange(6, dtype=torch.float64).reshape(1, 3, 2)
    f0, J0 = f.clone(), J.clone()
    f_out, J_out, _, _ = prob.linearize(f, J)
    prob.cost(f)
    assert f_out is f and J_out is J
    assert torch.equal(f, f0) and torch.equal(J, J0)


@pytest.mark.parametrize("case", ["rows", "cols", "batch", "float32", "device_path"])
def test_torch_sums_elsewhere(case, monkeypatch):
    m, n, B, dtype = 2, 2, 1, torch.float64
    if case == "rows":
        m = HOST_SUM_ROWS + 1
    elif case == "cols":
        n = HOST_SUM_COLS + 1
    elif case == "batch":
        B = 3
    elif case == "float32":
        dtype = torch.float32
    else:
        monkeypatch.setattr(host_scalars, "HOST", False)
        host_scalars._FOR_ROWS.clear()
    prob = _problem(m, n)
    f = torch.ones(B, m, dtype=dtype)
    J = torch.ones(B, m, n, dtype=dtype)
    _, _, g, G = prob.linearize(f, J)
    # (one float64 problem beyond the few rows or columns: J^T f still on the host below
    # BMM_NAIVE_TERMS multiply-adds, J^T J by torch)
    assert host_rows(G) is None
    assert (host_rows(g) is not None) == (case in ("rows", "cols"))
    assert torch.equal(g, torch.full((B, n), float(m), dtype=dtype))
    assert torch.equal(G, torch.full((B, n, n), float(m), dtype=dtype))
    assert torch.equal(prob.cost(f), torch.full((B,), 0.5 * m, dtype=dtype))
    host_scalars._FOR_ROWS.clear()


@pytest.mark.parametrize(("m", "n"), [(5, 1), (50, 3), (133, 3), (20, 19), (399, 1)])
def test_host_transposed_rows_below_bmm_kernel(m, n):
    """J^T f of one problem below BMM_NAIVE_TERMS multiply-adds: summed on the host, within
    the rounding of a sum of m terms of torch's bmm, handed over with its host rows."""
    assert m * n < BMM_NAIVE_TERMS
    rng = np.random.default_rng(m * 7 + n)
    prob = _problem(m, n)
    for _ in range(10):
        f = torch.from_numpy(rng.standard_normal((1, m)) * 10.0 ** rng.integers(-3, 4, (1, m)))
        J = torch.from_numpy(rng.standard_normal((1, m, n)))
        _, _, g, G = prob.linearize(f, J)
        _, g_t, G_t = _torch_sums(f, J)
        bound = m * EPS * (J.abs() * f.abs().unsqueeze(-1)).sum(-2)
        assert g.shape == (1, n) and (g - g_t).abs().le(bound).all()
        assert host_rows(g) is not None and torch.equal(G, G_t)  # (G: torch's own)
        direct = host_transposed_rows(J[0].numpy(), f[0].numpy())
        assert direct.shape == (n,) and (torch.from_numpy(direct) - g_t[0]).abs().le(
            bound[0]).all()
    assert host_transposed_rows(np.zeros((0, n)), np.zeros(0)).shape == (n,)


def _rosen(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def _rosen_jac(x):
    return np.array([[-20 * x[0], 10.0], [-1.0, 0.0]])


@pytest.mark.parametrize("method", ["lm", "trf", "dogbox"])
def test_one_problem_on_host_sums_matches_scipy(method):
    import scipy.optimize

    x0 = np.array([-1.2, 1.0])
    ours = least_squares(_rosen, x0, jac=_rosen_jac, method=method)
    ref = scipy.optimize.least_squares(_rosen, x0, jac=_rosen_jac, method=method)
    assert_result_parity(ours, ref)
