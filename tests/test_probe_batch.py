"""Batch APIs against a loop of single problems on inputs a user may write (session 13
probes): each test holds a case where ``batch_least_squares`` / ``batch_curve_fit`` once
returned a result that differed from the loop without an error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests._parity import assert_bitwise_equal, assert_close_scaled, assert_x_close
from torchimize_scipy import batch_curve_fit, batch_least_squares, least_squares

_T = np.linspace(0.0, 3.0, 20)
_Y = np.array([[2.0, 0.7], [1.2, 1.5], [2.7, 0.4]])[:, :1] * np.exp(
    -np.array([[0.7], [1.5], [0.4]]) * _T) + 0.01 * np.sin(7 * _T)


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_float32_residuals_take_float32_steps(method, kind):
    """A fun that returns float32 residuals for float64 points: each problem's
    ``least_squares`` (as scipy's, gh-12991) takes float32-sized finite-difference
    steps; the batch took float64-sized ones, whose differences of float32 values are
    rounding noise (a Jacobian wrong in its first digit, x off by 1e-5)."""
    def one(x, y):
        if kind == "torch":
            return (x[0] * torch.exp(-x[1] * torch.as_tensor(_T)) - y).float()
        return (x[0] * np.exp(-x[1] * _T) - y).astype(np.float32)

    def rows(x, y):
        if kind == "torch":
            return (x[:, :1] * torch.exp(-x[:, 1:] * torch.as_tensor(_T)) - y).float()
        return (x[:, :1] * np.exp(-x[:, 1:] * _T) - y).astype(np.float32)

    conv = torch.as_tensor if kind == "torch" else np.asarray
    x0, Y = conv(np.ones((3, 2))), conv(_Y)
    res = batch_least_squares(rows, x0, args=(Y,), method=method)
    for i in range(3):
        ref = least_squares(one, x0[i], args=(Y[i],), method=method)
        assert_x_close(res.x[i], ref.x, rtol=1e-9)
        assert_close_scaled(res.jac[i], ref.jac, 1e-6, err_msg="jac")
    if kind == "numpy":
        assert res.fun.dtype == np.float32  # fun's own dtype, as scipy's result


def _decay(x, a, k, c):
    return a * np.exp(-k * x) + c


_XC = np.linspace(0.0, 4.0, 25)
_PC = np.array([[2.9, 0.95, 0.4], [2.0, 1.7, 0.0], [3.0, 0.6, -0.1], [1.1, 1.7, 0.3]])
_YC = _decay(_XC, _PC[:, :1], _PC[:, 1:2], _PC[:, 2:]) + 0.02 * np.cos(5 * _XC)


@pytest.mark.parametrize("key, method", [("diag", "lm"), ("x_scale", "trf")])
def test_per_problem_scale_with_a_failed_problem(key, method):
    """``diag`` (B, P) of 'lm' with a NaN in one data set: the other problems are solved
    with their own rows (the batch raised "Inconsistent shapes" for all: ``diag``
    became ``x_scale`` after the rows of the failed problems were dropped)."""
    scale = np.array([[0.5, 2.0, 4.0], [1.0, 1.0, 1.0], [3.0, 0.2, 1.5], [0.7, 0.7, 9.0]])
    Y = _YC.copy()
    Y[1, 3] = np.nan
    p0 = np.tile([1.0, 1.0, 0.0], (4, 1))
    with pytest.warns(Warning):
        popt, pcov = batch_curve_fit(_decay, _XC, Y, p0, method=method, **{key: scale})
    keep = [0, 2, 3]
    ref, ref_cov = batch_curve_fit(_decay, _XC, Y[keep], p0[keep], method=method,
                                   **{key: scale[keep]})
    assert np.isnan(popt[1]).all()
    assert_bitwise_equal(popt[keep], ref)
    assert_bitwise_equal(pcov[keep], ref_cov)


@pytest.mark.parametrize("rows", [1, 3, 5])
def test_per_problem_x_scale_of_another_batch_raises(rows):
    """A 2-D ``x_scale`` must have one row per problem: 5 rows for 4 problems were
    silently cut to the first 4, fewer raised an IndexError."""
    with pytest.raises(ValueError, match="Inconsistent shapes between `x_scale`"):
        batch_curve_fit(_decay, _XC, _YC, np.ones((4, 3)), method="trf",
                        x_scale=np.ones((rows, 3)))
