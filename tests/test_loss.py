"""Tests for torchimize_scipy._loss (robust loss functions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _parity import ONE_EVAL_RTOL
from scipy.optimize._lsq.common import scale_for_robust_loss_function
from scipy.optimize._lsq.least_squares import IMPLEMENTED_LOSSES, construct_loss_function

from torchimize_scipy._loss import (
    LOSSES,
    LossFunction,
    make_loss,
    scale_for_robust_loss,
)

NONLINEAR = ["soft_l1", "huber", "cauchy", "arctan"]
DTYPES = [torch.float32, torch.float64]


def _closed_form(name: str, z: float) -> tuple[float, float, float]:
    """Hand-written rho, rho', rho'' for a scalar z."""
    if name == "linear":
        return z, 1.0, 0.0
    if name == "soft_l1":
        return 2 * (math.sqrt(1 + z) - 1), 1 / math.sqrt(1 + z), -0.5 * (1 + z) ** -1.5
    if name == "huber":
        if z <= 1:
            return z, 1.0, 0.0
        return 2 * math.sqrt(z) - 1, 1 / math.sqrt(z), -0.5 * z**-1.5
    if name == "cauchy":
        return math.log1p(z), 1 / (1 + z), -1 / (1 + z) ** 2
    if name == "arctan":
        return math.atan(z), 1 / (1 + z**2), -2 * z / (1 + z**2) ** 2
    raise KeyError(name)


Z_VALUES = [0.0, 1e-8, 0.3, 0.999, 1.0, 1.001, 2.5, 17.0, 1e4]


def _tol(dtype: torch.dtype) -> dict:
    # float32: soft_l1's 2 (sqrt(1 + z) - 1) cancels for tiny z (as in SciPy), hence atol.
    return (
        {"rtol": 1e-14, "atol": 1e-300} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 1e-7}
    )


def test_registry():
    assert set(LOSSES) == set(IMPLEMENTED_LOSSES)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_closed_form(name, dtype):
    z = torch.tensor(Z_VALUES, dtype=dtype).reshape(3, 3)
    rho = LOSSES[name](z)
    assert rho.shape == (3, 3, 3)
    assert rho.dtype == dtype
    expected = torch.tensor(
        [_closed_form(name, float(v)) for v in z.flatten().tolist()], dtype=torch.float64
    ).T.reshape(3, 3, 3)
    torch.testing.assert_close(rho.double(), expected, **_tol(dtype))


@pytest.mark.parametrize("name", list(LOSSES))
def test_derivatives_match_autograd(name):
    # Avoid the Huber kink at z = 1 and z = 0 (derivatives are one-sided there).
    z = torch.tensor([1e-3, 0.2, 0.7, 1.3, 4.0, 50.0], dtype=torch.float64, requires_grad=True)
    rho = LOSSES[name](z)
    (d1,) = torch.autograd.grad(rho[0].sum(), z, create_graph=True)
    if d1.requires_grad:
        (d2,) = torch.autograd.grad(d1.sum(), z, allow_unused=True)
    else:  # rho' does not depend on z (linear loss)
        d2 = None
    if d2 is None:
        d2 = torch.zeros_like(z)
    torch.testing.assert_close(d1, rho[1], rtol=ONE_EVAL_RTOL, atol=1e-15)
    torch.testing.assert_close(d2, rho[2], rtol=ONE_EVAL_RTOL, atol=1e-15)


def test_huber_autograd_finite_at_zero():
    z = torch.tensor([0.0, 0.5], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(LOSSES["huber"](z)[0].sum(), z)
    assert torch.isfinite(g).all()


def _residuals(dtype: torch.dtype, b: int = 3, m: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(b, m, generator=gen, dtype=torch.float64) * 3
    f[0, 0] = 0.0
    f[1, 1] = 2.0  # exactly on the Huber threshold for f_scale = 2
    return f.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("f_scale", [1.0, 2.0, 0.37])
@pytest.mark.parametrize("name", NONLINEAR)
def test_against_scipy(name, f_scale, dtype):
    f = _residuals(dtype)
    f_before = f.clone()
    loss = make_loss(name, f_scale)
    assert isinstance(loss, LossFunction)
    cost = loss.cost(f)
    rho = loss.rho(f)
    assert cost.shape == (3,) and rho.shape == (3, 3, 7)
    assert cost.dtype == dtype and rho.dtype == dtype
    torch.testing.assert_close(loss(f, cost_only=True), cost)
    torch.testing.assert_close(loss(f), rho)
    assert torch.equal(f, f_before)

    fn = f.numpy()
    sp = construct_loss_function(fn.shape[1], name, f_scale)
    cost_sp = np.array([sp(row, cost_only=True) for row in fn])
    rho_sp = np.stack([sp(row).copy() for row in fn], axis=1)
    tol = _tol(dtype)
    np.testing.assert_allclose(cost.double().numpy(), cost_sp, rtol=tol["rtol"] * 10)
    np.testing.assert_allclose(rho.double().numpy(), rho_sp, rtol=tol["rtol"] * 10, atol=0)


def test_linear_is_none():
    assert make_loss("linear", 3.0) is None
    with pytest.raises(ValueError):
        make_loss("nope", 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_user_callable_against_scipy(dtype):
    def rho_torch(z):
        t = 1 + z
        return torch.stack([t**0.5 - 1, 0.5 * t**-0.5, -0.25 * t**-1.5])

    def rho_np(z):
        t = 1 + z
        return np.stack([t**0.5 - 1, 0.5 * t**-0.5, -0.25 * t**-1.5])

    f = _residuals(dtype)
    loss = make_loss(rho_torch, 1.7)
    sp = construct_loss_function(f.shape[1], rho_np, 1.7)
    fn = f.double().numpy()
    cost_sp = np.array([sp(row, cost_only=True) for row in fn])
    rho_sp = np.stack([sp(row).copy() for row in fn], axis=1)
    rtol = 1e-13 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(loss.cost(f).double().numpy(), cost_sp, rtol=rtol)
    np.testing.assert_allclose(loss.rho(f).double().numpy(), rho_sp, rtol=rtol)


def test_user_callable_tuple_and_bad_shape():
    f = _residuals(torch.float64)
    loss = make_loss(lambda z: (z, torch.ones_like(z), torch.zeros_like(z)), 2.0)
    torch.testing.assert_close(loss.cost(f), 0.5 * (f**2).sum(-1))
    bad = make_loss(lambda z: torch.stack([z, z]), 1.0)
    with pytest.raises(ValueError):
        bad.rho(f)


def test_per_problem_f_scale():
    f = _residuals(torch.float64)
    scales = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    loss = make_loss("cauchy", scales)
    cost, rho = loss.cost(f), loss.rho(f)
    for b in range(3):
        single = make_loss("cauchy", float(scales[b]))
        # a row alone runs other (scalar-tail) kernels than the whole batch: a few ulps
        torch.testing.assert_close(cost[b], single.cost(f[b : b + 1])[0], rtol=ONE_EVAL_RTOL,
                                   atol=0)
        torch.testing.assert_close(rho[:, b], single.rho(f[b : b + 1])[:, 0],
                                   rtol=ONE_EVAL_RTOL, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NONLINEAR)
def test_scale_for_robust_loss_against_scipy(name, dtype):
    f = _residuals(dtype)
    gen = torch.Generator().manual_seed(2)
    J = torch.randn(3, 7, 4, generator=gen, dtype=torch.float64).to(dtype)
    loss = make_loss(name, 1.3)
    rho = loss.rho(f)
    copies = (J.clone(), f.clone(), rho.clone())
    J_s, f_s = scale_for_robust_loss(J, f, rho)
    assert J_s.shape == J.shape and f_s.shape == f.shape
    assert J_s.dtype == dtype and f_s.dtype == dtype
    for a, b in zip((J, f, rho), copies, strict=True):
        assert torch.equal(a, b)

    # SciPy clips rho1 + 2 rho2 f**2 at float64 eps; we clip at the eps of the dtype.  In
    # float32, entries where that sum is of the order of eps (e.g. the outer Huber region,
    # where it cancels to 0 up to rounding) are not comparable and are checked separately.
    eps = torch.finfo(dtype).eps
    s = rho[1] + 2 * rho[2] * f**2
    small = s < 1e3 * eps if dtype == torch.float32 else torch.zeros_like(s, dtype=torch.bool)
    rtol = 1e-14 if dtype == torch.float64 else 1e-5
    for b in range(3):
        Jb, fb = J[b].double().numpy().copy(), f[b].double().numpy().copy()
        Jb_s, fb_s = scale_for_robust_loss_function(Jb, fb, rho[:, b].double().numpy().copy())
        keep = ~small[b].numpy()
        ours_J, ours_f = J_s[b].double().numpy(), f_s[b].double().numpy()
        np.testing.assert_allclose(ours_J[keep], Jb_s[keep], rtol=rtol, atol=1e-300)
        np.testing.assert_allclose(ours_f[keep], fb_s[keep], rtol=rtol, atol=1e-300)
    clipped = s < eps
    sq = torch.sqrt(torch.tensor(eps, dtype=dtype))
    torch.testing.assert_close(J_s[clipped], J[clipped] * sq)
    torch.testing.assert_close(f_s[clipped], f[clipped] * (rho[1][clipped] / sq))
    assert torch.isfinite(J_s).all() and torch.isfinite(f_s).all()


def test_scale_for_robust_loss_clipping():
    # arctan has rho1 + 2 rho2 f**2 < 0 for large residuals: must be clipped at eps.
    f = torch.tensor([[0.1, 5.0, -40.0]], dtype=torch.float64)
    J = torch.ones(1, 3, 2, dtype=torch.float64)
    rho = make_loss("arctan", 1.0).rho(f)
    s = rho[1] + 2 * rho[2] * f**2
    assert (s[0, 1:] < 0).all()
    J_s, f_s = scale_for_robust_loss(J, f, rho)
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(J_s[0, 1:, 0], torch.full((2,), eps**0.5, dtype=torch.float64))
    assert torch.isfinite(f_s).all()
    # The gradient J_s^T f_s equals J^T (rho1 f) whatever the clipping.
    torch.testing.assert_close(
        (J_s.transpose(1, 2) @ f_s[..., None])[..., 0],
        (J.transpose(1, 2) @ (rho[1] * f)[..., None])[..., 0],
    )


@pytest.mark.parametrize("name", ["soft_l1", "huber", "cauchy", "arctan"])
def test_a_rows_values_do_not_depend_on_its_place_in_the_batch(name):
    """Each row of ``(B, m)`` residuals gets the values it gets alone, bit for bit: no
    kernel whose vector lanes and scalar tail round differently (torch's float64
    ``t**-1.5`` on the CPU did, so a batch cut into other chunks gave other bits)."""
    gen = torch.Generator().manual_seed(1)
    for B, m in [(6, 9), (7, 15), (40, 9), (3, 100)]:
        f = 3 * torch.randn(B, m, generator=gen, dtype=torch.float64)
        J = torch.randn(B, m, 3, generator=gen, dtype=torch.float64)
        loss = make_loss(name, 0.5)
        rho = loss.rho(f.clone())
        J_s, f_s = loss.scaled_system(J, f.clone())
        for i in range(B):
            assert torch.equal(loss.rho(f[i:i + 1].clone())[:, 0], rho[:, i])
            J_i, f_i = loss.scaled_system(J[i:i + 1].clone(), f[i:i + 1].clone())
            assert torch.equal(J_i[0], J_s[i]) and torch.equal(f_i[0], f_s[i])


def test_soft_l1_float32_without_cancellation():
    """float32 ``2 (sqrt(1 + z) - 1)`` cancels for small z (0 below z ~ 6e-8); the value is
    the exact one to float32's rounding for every z."""
    from torchimize_scipy._loss import soft_l1

    z64 = torch.logspace(-12, 4, 200, dtype=torch.float64)
    ref = 2 * z64 / (torch.sqrt(1 + z64) + 1)  # (float64 without its own cancellation)
    got = soft_l1(z64.to(torch.float32))[0].double()
    torch.testing.assert_close(got, ref, rtol=4 * torch.finfo(torch.float32).eps, atol=0)


def test_soft_l1_float32_cost_at_large_f_scale_is_scipys():
    """f_scale = 100 (z ~ 1e-6): the float32 cost was 0.0095 against scipy's 0.0176."""
    import scipy.optimize as so

    from torchimize_scipy import least_squares

    t = np.linspace(0, 4, 30)
    y = 2.5 * np.exp(-1.3 * t) + 0.5 + 0.05 * np.sin(7 * t)

    def fun(x, lib=np):
        return x[0] * lib.exp(-x[1] * lib.asarray(t, dtype=x.dtype)) + x[2] \
            - lib.asarray(y, dtype=x.dtype)

    ref = so.least_squares(fun, [1.0, 1.0, 0.0], loss="soft_l1", f_scale=100.0)
    res = least_squares(lambda x: fun(x, torch), torch.tensor([1.0, 1.0, 0.0]),
                        loss="soft_l1", f_scale=100.0)
    np.testing.assert_allclose(float(res.cost), ref.cost, rtol=1e-5)
    np.testing.assert_allclose(res.x.numpy(), ref.x, rtol=1e-4)
