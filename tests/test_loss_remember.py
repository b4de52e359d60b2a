"""A robust loss computes ``z = (f / f_scale)**2`` (and ``1 + z``) once per residual tensor.

The engine evaluates a trial's cost and, once the trial is accepted, the
scaling of ``J`` and ``f`` at the same residuals (issue 14: the soft_l1 fit's
operations per evaluation). ``LossFunction`` remembers ``z`` on the residual
tensor for that, except where it must not: a tensor that requires grad, a
large one, or a ``z`` passed by the caller to the public loss functions.
"""

from __future__ import annotations

import torch

from torchimize_scipy import _loss
from torchimize_scipy._loss import LOSSES, make_loss


def _f(B: int = 2, m: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, m, dtype=torch.float64, generator=g) * 3


def test_cost_and_scaling_share_one_z_with_the_same_values():
    loss = make_loss("soft_l1", 0.1)
    f = _f()
    J = torch.randn(2, 7, 3, dtype=torch.float64)
    cost = loss.cost(f)
    z = getattr(f, _loss._Z_ATTR)[1]
    assert getattr(z, _loss._ONE_PLUS_ATTR) is not None  # 1 + z kept by the value
    J_s, f_s = loss.scaled_system(J, f)
    assert getattr(f, _loss._Z_ATTR)[1] is z  # not recomputed
    # the same numbers as a fresh computation (a tensor with nothing remembered)
    fresh = f.clone()
    assert torch.equal(make_loss("soft_l1", 0.1).cost(fresh), cost)
    J_r, f_r = make_loss("soft_l1", 0.1).scaled_system(J, fresh.clone())
    assert torch.equal(J_s, J_r) and torch.equal(f_s, f_r)


def test_z_is_per_loss_object():
    f = _f()
    a, b = make_loss("soft_l1", 0.1), make_loss("soft_l1", 2.0)
    a.cost(f)
    # another f_scale on the same residuals: its own z, not a's
    assert torch.equal(b.cost(f), b.cost(f.clone()))
    assert getattr(f, _loss._Z_ATTR)[0] is b


def test_nothing_is_remembered_on_grad_or_large_tensors():
    loss = make_loss("cauchy", 1.0)
    f = _f().requires_grad_()
    loss.cost(f).sum().backward()
    assert not hasattr(f, _loss._Z_ATTR)
    big = torch.ones(1, _loss._REMEMBER_UP_TO + 1, dtype=torch.float64)
    loss.cost(big)
    assert not hasattr(big, _loss._Z_ATTR)


def test_public_loss_functions_remember_nothing_on_the_callers_z():
    z = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    first = LOSSES["soft_l1"](z)
    assert not hasattr(z, _loss._ONE_PLUS_ATTR)
    z.mul_(4)  # the caller may change its tensor: the next call sees the new values
    second = LOSSES["soft_l1"](z)
    t = 1 + z  # (rho'' as the loss computes it: -0.5 t**-0.5 / t)
    expected = torch.stack([2 * (t.sqrt() - 1), t**-0.5, -0.5 * (t**-0.5 / t)])
    assert torch.equal(second, expected)
    assert not torch.equal(first, second)
