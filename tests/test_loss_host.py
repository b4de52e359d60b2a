"""soft_l1's arithmetic of one small float64 problem runs in numpy (issue 14).

``LossFunction`` computes ``z``, the value of ``soft_l1`` and the scaling of
``J`` and ``f`` with numpy's elementwise operations for small CPU residuals
(the square roots, powers and sums stay torch's). These tests check which
residuals take that path, that it agrees with the tensor code (the public
``soft_l1`` and ``scale_for_robust_loss``) to rounding, that it keeps NaN
and overflow as the tensor code does without numpy warnings, and that a fit
through it still matches scipy.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize
import torch
from _parity import assert_cost_close, assert_x_close

from torchimize_scipy import least_squares
from torchimize_scipy._loss import _HOST_UP_TO, make_loss, scale_for_robust_loss, soft_l1

#: relative agreement between the numpy and the tensor arithmetic (a few roundings apart)
RTOL = 1e-9


def _data(B: int = 2, m: int = 15, n: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    f = torch.from_numpy(rng.normal(size=(B, m)) * 3)
    J = torch.from_numpy(rng.normal(size=(B, m, n)))
    return f, J


def _reference(f: torch.Tensor, J: torch.Tensor, c: float):
    """The tensor code: the public soft_l1 on z, scaled as LossFunction.rho documents."""
    rho = soft_l1((f / c) ** 2)
    scaled = torch.stack([rho[0] * c**2, rho[1], rho[2] / c**2])
    cost = 0.5 * (scaled[0]).sum(-1)
    J_s, f_s = scale_for_robust_loss(J, f, scaled)
    return cost, J_s, f_s


@pytest.mark.parametrize("c", [0.1, 1.0, 2.5])
def test_host_path_agrees_with_the_tensor_code(c):
    f, J = _data()
    loss = make_loss("soft_l1", c)
    assert loss._host(f)
    cost = loss.cost(f)
    J_s, f_s = loss.scaled_system(J, f)
    ref_cost, ref_J, ref_f = _reference(f.clone(), J, c)
    torch.testing.assert_close(cost, ref_cost, rtol=RTOL, atol=0)
    torch.testing.assert_close(J_s, ref_J, rtol=RTOL, atol=0)
    torch.testing.assert_close(f_s, ref_f, rtol=RTOL, atol=0)
    # new tensors: the residuals and the Jacobian are left as they were
    assert J_s.data_ptr() != J.data_ptr() and f_s.data_ptr() != f.data_ptr()


def test_which_residuals_take_the_host_path():
    f, _ = _data()
    loss = make_loss("soft_l1", 0.1)
    assert loss._host(f)
    assert not loss._host(f.float())  # float32: the tensor code
    assert not loss._host(f.clone().requires_grad_())  # autograd: the tensor code
    assert not loss._host(torch.zeros(1, _HOST_UP_TO + 1, dtype=torch.float64))
    assert not make_loss("soft_l1", torch.tensor([0.1, 0.2], dtype=torch.float64))._host(f)
    assert not make_loss("cauchy", 0.1)._host(f)


def test_overflow_and_nan_as_the_tensor_code_without_warnings():
    f, J = _data(B=1, m=4)
    f[0, 1] = 1e300  # z overflows to inf
    f[0, 2] = float("nan")
    loss = make_loss("soft_l1", 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cost = loss.cost(f)
        J_s, f_s = loss.scaled_system(J, f)
    assert torch.isinf(cost).item() is False and torch.isnan(cost).item()
    ref_cost, ref_J, ref_f = _reference(f.clone(), J, 0.1)
    assert torch.equal(torch.isnan(J_s), torch.isnan(ref_J))
    assert torch.equal(torch.isnan(f_s), torch.isnan(ref_f))
    finite = torch.isfinite(ref_f)
    torch.testing.assert_close(f_s[finite], ref_f[finite], rtol=RTOL, atol=0)
    f2 = f.clone()
    f2[0, 2] = 0.5
    assert torch.isinf(make_loss("soft_l1", 0.1).cost(f2)).item()


def test_robust_fit_matches_scipy():
    rng = np.random.default_rng(3)
    t = np.linspace(0, 10, 15)
    y = 0.5 + 2.0 * np.exp(-t) + 0.1 * rng.standard_normal(15)
    y[[2, 7, 11]] += 1.5

    def fun(x):
        return x[0] + x[1] * np.exp(x[2] * t) - y

    def jac(x):
        e = np.exp(x[2] * t)
        return np.column_stack([np.ones_like(t), e, x[1] * t * e])

    kw = {"jac": jac, "loss": "soft_l1", "f_scale": 0.1}
    ref = scipy.optimize.least_squares(fun, np.ones(3), **kw)
    got = least_squares(fun, np.ones(3), **kw)
    assert_cost_close(got.cost, ref.cost)
    assert_x_close(got.x, ref.x)
