"""scipy's answers for inputs found by probing (session 25): a 2-D ``fun`` under finite
differences, a callback that is not callable, no residuals at all, and a ``curve_fit``
left without observations by ``nan_policy='omit'``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize as so

from torchimize_scipy import curve_fit, least_squares

X0 = np.array([0.5, 0.5])


def _two_d(x):
    return np.array([[x[0] - 1, x[1]]])


def _raised(fn, *args, **kw):
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type is what is compared
        fn(*args, **kw)
    return type(info.value), str(info.value)


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_two_d_residuals_under_differences_get_approx_derivatives_message(method):
    ours, ref = _raised(least_squares, _two_d, X0, method=method), _raised(
        so.least_squares, _two_d, X0, method=method)
    assert ours == ref == (ValueError, "`f0` passed has more than 1 dimension.")


def test_two_d_residuals_with_a_jacobian_get_funs_message():
    def jac(x):
        return np.eye(2)
    ours, ref = _raised(least_squares, _two_d, X0, jac=jac), _raised(so.least_squares, _two_d,
                                                                      X0, jac=jac)
    assert ours == ref == (ValueError, "`fun` must return at most 1-d array_like. f0.shape: "
                           "(1, 2)")


@pytest.mark.parametrize("method", ["trf", "lm"])
def test_a_callback_that_is_not_callable(method):
    def fun(x):
        return np.array([x[0] - 1, x[1], x[0] * x[1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = _raised(least_squares, fun, X0, method=method, callback=3)
        ref = _raised(so.least_squares, fun, X0, method=method, callback=3)
    assert ours == ref == (TypeError, "3 is not a callable object")


@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_no_residuals_keep_the_jacobians_shape(method):
    ours = least_squares(lambda x: np.array([]), X0, method=method)
    ref = so.least_squares(lambda x: np.array([]), X0, method=method)
    assert ours.jac.shape == ref.jac.shape == (0, 2)
    assert ours.fun.shape == ref.fun.shape == (0,)
    np.testing.assert_array_equal(ours.grad, ref.grad)


@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_curve_fit_left_without_observations_is_a_clear_error(method):
    """scipy fails there with an IndexError in its covariance; ours names the cause."""
    x = np.linspace(0, 4, 20)

    def f(x, a, b, c):
        return a * np.exp(-b * x) + c
    with pytest.raises(ValueError, match="no observation to fit"):
        curve_fit(f, x, np.full(20, np.nan), method=method, nan_policy="omit")


def test_a_device_torch_has_not_is_a_clear_error():
    """``device=`` (our extra) that torch cannot use: a ``ValueError`` naming it, not
    torch's ``AssertionError`` from the first copy to it."""
    import torch

    def fun(x):
        return x - 1.0
    with pytest.raises(ValueError, match="`device`='nonsense' is not a torch device"):
        least_squares(fun, X0, device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="`device`='cuda:1': torch has no CUDA device"):
            least_squares(fun, X0, device="cuda:1")
        with pytest.raises(ValueError, match="torch has no CUDA device"):
            curve_fit(lambda x, a: a * x, np.arange(3.0), np.arange(3.0), device="cuda")
    assert type(least_squares(fun, X0, device="cpu").x) is np.ndarray
