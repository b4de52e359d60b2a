"""The caller's code inside a solve: its grad mode, and its exceptions.

scipy calls ``fun``, ``jac``, ``loss`` and ``callback`` in the caller's own
grad mode; code that uses autograd inside them (a residual that is the
gradient of an energy, a ``jac`` built with ``torch.autograd.grad``) ran
under the engine loop's ``torch.no_grad()`` and failed ("element 0 of tensors
does not require grad"). An exception of the caller's ``fun`` raised while
``jac='autograd'`` differentiates it was taken for an unsupported
transform, and the next formulation called ``fun`` again.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize as so
import torch
from _parity import assert_counts_close

from torchimize_scipy import batch_least_squares, least_squares

T = np.linspace(0, 4, 40)
Y = 2.5 * np.exp(-1.3 * T) + 0.5
TT, YT = torch.tensor(T), torch.tensor(Y)


def energy_gradient(x):
    """Residuals: the gradient of an energy, by autograd (numpy in, numpy out)."""
    xt = torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True)
    energy = torch.exp(xt).sum() + 0.1 * xt[0] * xt[1] - 2 * xt[0] - 3 * xt[1]
    (g,) = torch.autograd.grad(energy, xt)
    return g.numpy()


def decay(x):
    return np.asarray(x[0] * np.exp(-x[1] * T) + x[2] - Y)


def decay_jac_by_autograd(x):
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    r = xt[0] * torch.exp(-xt[1] * TT) + xt[2] - YT
    return np.stack([torch.autograd.grad(r[i], xt, retain_graph=True)[0].numpy()
                     for i in range(len(T))])


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_fun_using_autograd_inside(method):
    ref = so.least_squares(energy_gradient, [0.5, 2.0], method=method, xtol=1e-12)
    res = least_squares(energy_gradient, [0.5, 2.0], method=method, xtol=1e-12)
    np.testing.assert_allclose(res.x, ref.x, rtol=1e-8)
    np.testing.assert_allclose(res.cost, ref.cost, atol=1e-20)


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_jac_using_autograd_inside(method):
    ref = so.least_squares(decay, [1.0, 1.0, 0.0], jac=decay_jac_by_autograd, method=method)
    res = least_squares(decay, [1.0, 1.0, 0.0], jac=decay_jac_by_autograd, method=method)
    np.testing.assert_allclose(res.x, ref.x, rtol=1e-7)
    assert_counts_close(res.status, ref.status, res.nfev, ref.nfev)


def test_batch_fun_using_autograd_inside():
    def fun(x):  # x (b, 2): each row's energy gradient
        xt = x.detach().requires_grad_(True)
        energy = (torch.exp(xt).sum() + (0.1 * xt[:, 0] * xt[:, 1]).sum()
                  - (2 * xt[:, 0]).sum() - (3 * xt[:, 1]).sum())
        (g,) = torch.autograd.grad(energy, xt)
        return g

    x0 = torch.tensor([[0.5, 2.0], [2.0, 0.5], [-0.5, -2.0]], dtype=torch.float64)
    res = batch_least_squares(fun, x0, xtol=1e-12)
    for b in range(3):
        ref = so.least_squares(energy_gradient, x0[b].numpy(), xtol=1e-12)
        np.testing.assert_allclose(res.x[b].numpy(), ref.x, rtol=1e-8)


@pytest.mark.parametrize("grad_mode", [True, False])
def test_every_call_sees_the_callers_grad_mode(grad_mode):
    seen = []

    def fun(x):
        seen.append(torch.is_grad_enabled())
        return decay(x)

    def jac(x):
        seen.append(torch.is_grad_enabled())
        return decay_jac_by_autograd(x) if grad_mode else np.ones((len(T), 3))

    def callback(intermediate_result):
        seen.append(torch.is_grad_enabled())

    with torch.set_grad_enabled(grad_mode):
        res = least_squares(fun, [1.0, 1.0, 0.0], jac=jac, callback=callback, max_nfev=5,
                            loss=lambda z: np.stack([z, np.ones_like(z), np.zeros_like(z)]))
    assert res.nfev >= 2 and len(seen) > 3
    assert seen == [grad_mode] * len(seen)
    assert torch.is_grad_enabled()  # (the caller's own mode is left as it was)


@pytest.mark.parametrize("error", [ValueError, StopIteration, FloatingPointError])
def test_autograd_jacobian_passes_the_callers_exception_at_once(error):
    """A one-off exception of ``fun`` while ``jac='autograd'`` differentiates it stops
    the solve with that exception (it vanished: another formulation called ``fun``
    again and the solve went on)."""
    calls = []

    def fun(x):
        calls.append(1)
        if len(calls) == 3:  # (the first Jacobian's differentiation)
            raise error("the caller's error")
        return x[0] * torch.exp(-x[1] * TT) + x[2] - YT

    with pytest.raises(error, match="the caller's error"):
        least_squares(fun, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64),
                      jac="autograd")
    assert len(calls) == 3


def _derivative_model(x, a, k):
    """A model that is the derivative of another, by autograd: -a k exp(-k x)."""
    xt = torch.tensor(np.asarray(x, dtype=float), requires_grad=True)
    antiderivative = (float(a) * torch.exp(-float(k) * xt)).sum()
    (d,) = torch.autograd.grad(antiderivative, xt)
    return d.numpy()


@pytest.mark.parametrize("method", ["lm", "trf"])
def test_curve_fit_model_using_autograd_inside(method):
    from torchimize_scipy import batch_curve_fit, curve_fit

    ydata = -2.5 * 1.3 * np.exp(-1.3 * T) + 0.01 * np.sin(5 * T)
    ref = so.curve_fit(_derivative_model, T, ydata, p0=[1.0, 1.0], method=method)
    got = curve_fit(_derivative_model, T, ydata, p0=[1.0, 1.0], method=method)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)

    def vectorised(x, a, k):  # a, k (b, 1)
        return np.stack([_derivative_model(x, ai, ki)
                         for ai, ki in zip(a[:, 0], k[:, 0], strict=True)])

    popt, _ = batch_curve_fit(vectorised, T, np.stack([ydata, ydata]), np.ones((2, 2)),
                              method=method)
    np.testing.assert_allclose(popt, np.stack([ref[0], ref[0]]), rtol=1e-6)
