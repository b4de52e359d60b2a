"""One float64 problem's robust loss on its Python floats (``Problem.cost``, ``linearize``).

For one float64 problem on the CPU with at most ``problem.HOST_LOSS_ROWS``
residuals, a built-in loss and a scalar ``f_scale``, the cost, the scaling of
``J`` and ``f`` and (below torch's ``bmm`` kernel limit) ``J^T f`` and
``J^T J`` are computed on the host, with torch's kernels only for the square
roots, other powers, ``log1p``, ``arctan`` and the cost's sum. These tests
check the values against the tensor code within rounding, the non-finite
cases, that the host path is the one taken (and where it is not), and its
torch-call budget.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _torch_calls import recorded_torch_calls

from torchimize_scipy import _loss
from torchimize_scipy._engine.host_scalars import host_rows
from torchimize_scipy._engine.problem import BMM_NAIVE_TERMS, HOST_LOSS_ROWS, Problem
from torchimize_scipy._loss import LOSSES, make_loss

EPS = np.finfo(np.float64).eps
ROBUST = [name for name in LOSSES if name != "linear"]


def _problem(m: int, n: int, loss) -> Problem:
    return Problem(fun=None, jac=None, m=m, n=n, loss=loss, ftol=1e-8, xtol=1e-8, gtol=1e-8,
                   max_nfev=100, jac_scale=False, bounded=False)


def _tensor_reference(loss, f: torch.Tensor, J: torch.Tensor):
    """The tensor code's cost, scaled system and products (a fresh loss: nothing shared)."""
    ref = make_loss(loss.rho_fn.__name__, loss.f_scale)
    cost = ref.cost(f.clone())
    J_s, f_s = ref.scaled_system(J.clone(), f.clone())
    Jt = J_s.transpose(-1, -2)
    return cost, f_s, J_s, torch.bmm(Jt, f_s.unsqueeze(-1)).squeeze(-1), torch.bmm(Jt, J_s)


def _data(rng, m: int, n: int):
    f = rng.standard_normal((1, m)) * 10.0 ** rng.uniform(-4, 4, (1, m))
    J = rng.standard_normal((1, m, n)) * 10.0 ** rng.uniform(-2, 2, (1, m, 1))
    return torch.from_numpy(f), torch.from_numpy(J)


@pytest.mark.parametrize("name", ROBUST)
@pytest.mark.parametrize("f_scale", [0.1, 1.0, 3.0])
@pytest.mark.parametrize(("m", "n"), [(1, 1), (15, 3), (9, 9), (HOST_LOSS_ROWS, 2)])
def test_host_loss_agrees_with_the_tensor_code(name, f_scale, m, n):
    rng = np.random.default_rng(m * 100 + n)
    loss = make_loss(name, f_scale)
    prob = _problem(m, n, loss)
    for _ in range(5):
        f, J = _data(rng, m, n)
        cost = prob.cost(f)
        f_s, J_s, g, G = prob.linearize(f, J)
        # the host path was taken: z kept as floats, the values handed over with the tensors
        assert getattr(f, _loss._Z_HOST_ATTR)[0] is loss
        assert host_rows(J_s) is not None and host_rows(f_s) is not None
        cost_t, f_t, J_t, g_t, G_t = _tensor_reference(loss, f, J)
        assert cost.shape == (1,) and f_s.shape == (1, m) and J_s.shape == (1, m, n)
        assert g.shape == (1, n) and G.shape == (1, n, n)
        # a few roundings per entry; sums of m terms within m units of their magnitudes
        np.testing.assert_allclose(cost.numpy(), cost_t.numpy(), rtol=8 * m * EPS, atol=0)
        np.testing.assert_allclose(f_s.numpy(), f_t.numpy(), rtol=8 * EPS, atol=0)
        np.testing.assert_allclose(J_s.numpy(), J_t.numpy(), rtol=8 * EPS, atol=0)
        bound_g = 8 * m * EPS * (J_t.abs() * f_t.abs().unsqueeze(-1)).sum(-2)
        assert (g - g_t).abs().le(bound_g).all()
        bound_G = 8 * m * EPS * torch.bmm(J_t.abs().transpose(-1, -2), J_t.abs())
        assert (G - G_t).abs().le(bound_G).all()


@pytest.mark.parametrize("name", ROBUST)
def test_host_loss_keeps_non_finite_values(name):
    loss = make_loss(name, 0.5)
    prob = _problem(3, 2, loss)
    J = torch.ones(1, 3, 2, dtype=torch.float64)
    for bad in (np.nan, np.inf, 1e200):
        f = torch.tensor([[1.0, bad, -2.0]], dtype=torch.float64)
        cost = prob.cost(f)
        f_s, J_s, _, _ = prob.linearize(f, J)
        cost_t, f_t, J_t, _, _ = _tensor_reference(loss, f, J)
        for got, ref in ((cost, cost_t), (f_s, f_t), (J_s, J_t)):
            assert torch.equal(torch.isnan(got), torch.isnan(ref))
            assert torch.equal(torch.isinf(got), torch.isinf(ref))
    # a NaN residual makes the cost NaN: the engine's finiteness test relies on it
    assert torch.isnan(prob.cost(torch.tensor([[0.0, np.nan, 1.0]], dtype=torch.float64))).all()


def test_host_loss_calls_few_torch_kernels():
    """soft_l1 with 15 residuals: the cost calls two torch kernels (square root, sum),
    the linearisation one (the scaling's square root; ``t**-1.5`` is ``t**-0.5 / t``, in
    Python floats); the tensor code calls 8 and 19 (with the products)."""
    loss = make_loss("soft_l1", 0.1)
    prob = _problem(15, 3, loss)
    f, J = _data(np.random.default_rng(0), 15, 3)
    with recorded_torch_calls() as names:
        prob.cost(f)
    kernels = [n for n in names if n in ("sqrt", "sum", "pow", "__pow__", "mul", "div",
                                          "__mul__", "__truediv__", "clamp", "bmm")]
    assert sorted(kernels) == ["sqrt", "sum"]
    with recorded_torch_calls() as names:
        prob.linearize(f, J)
    kernels = [n for n in names if n in ("sqrt", "sum", "pow", "__pow__", "mul", "div",
                                          "__mul__", "__truediv__", "clamp", "bmm")]
    assert sorted(kernels) == ["sqrt"]


@pytest.mark.parametrize("case", ["batch", "float32", "large", "callable", "tensor_scale",
                                  "grad"])
def test_tensor_code_where_the_host_path_does_not_apply(case):
    m, B, dtype = 5, 1, torch.float64
    loss = make_loss("cauchy", 2.0)
    if case == "batch":
        B = 2
    elif case == "float32":
        dtype = torch.float32
    elif case == "large":
        m = HOST_LOSS_ROWS + 1
    elif case == "callable":
        loss = make_loss(lambda z: torch.stack([z, torch.ones_like(z), torch.zeros_like(z)]))
    elif case == "tensor_scale":
        loss = make_loss("cauchy", torch.tensor([2.0], dtype=torch.float64))
    prob = _problem(m, 2, loss)
    f = torch.linspace(-3, 3, B * m, dtype=dtype).reshape(B, m)
    if case == "grad":
        f.requires_grad_()
    J = torch.ones(B, m, 2, dtype=dtype)
    cost = prob.cost(f)
    prob.linearize(f, J)
    assert not hasattr(f, _loss._Z_HOST_ATTR)
    assert cost.shape == (B,) and cost.dtype == dtype
    expected = 0.5 * 4.0 * torch.log1p((f.detach() / 2.0) ** 2).sum(-1)
    if case == "callable":
        expected = 0.5 * (f.detach() ** 2).sum(-1)
    torch.testing.assert_close(cost.detach(), expected)


def test_products_above_bmms_own_kernel_come_from_torch():
    """Beyond ``BMM_NAIVE_TERMS`` multiply-adds the host scales ``J`` and ``f`` but
    torch multiplies (MKL groups the terms its own way)."""
    n = 9
    m = BMM_NAIVE_TERMS // (n * n) + 1
    assert m * n * n >= BMM_NAIVE_TERMS and m <= HOST_LOSS_ROWS
    loss = make_loss("huber", 0.3)
    prob = _problem(m, n, loss)
    f, J = _data(np.random.default_rng(3), m, n)
    f_s, J_s, g, G = prob.linearize(f, J)
    assert host_rows(J_s) is not None and host_rows(G) is None
    _, f_t, J_t, g_t, G_t = _tensor_reference(loss, f, J)
    # (two code paths: sums of m terms within m units of their magnitudes, as above)
    assert (g - g_t).abs().le(8 * m * EPS * (J_t.abs() * f_t.abs().unsqueeze(-1)).sum(-2)).all()
    assert (G - G_t).abs().le(8 * m * EPS * torch.bmm(J_t.abs().transpose(-1, -2),
                                                      J_t.abs())).all()


def test_float_ops_square_roots_of_zero_and_negatives():
    """``t**-0.5`` on floats as torch's ``rsqrt``: inf at +-0 (signed), NaN below."""
    ops = _loss._FloatOps()
    got = ops.power([4.0, 0.0, -0.0, -1.0, float("inf"), float("nan")], -0.5)
    ref = (torch.tensor([4.0, 0.0, -0.0, -1.0, float("inf"), float("nan")],
                        dtype=torch.float64) ** -0.5).tolist()
    assert got[0] == ref[0] == 0.5
    assert got[1] == ref[1] == float("inf") and got[2] == ref[2] == float("-inf")
    assert np.isnan(got[3]) and np.isnan(ref[3]) and got[4] == ref[4] == 0.0
    assert np.isnan(got[5]) and np.isnan(ref[5])
