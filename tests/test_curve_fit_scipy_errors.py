"""scipy's exceptions for two ``curve_fit`` inputs found by probing: a ``jac`` of the
wrong shape under 'lm' (``leastsq``'s ``TypeError``, where ``least_squares`` raises
``ValueError``), and non-finite values met by a covariance ``sigma`` (its triangular
solve's ``ValueError``, at any evaluation, for every method)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize as so

from torchimize_scipy import curve_fit

X = np.linspace(0, 4, 20)


def _model(x, a, b, c):
    return a * np.exp(-b * x) + c


def _raised(cf, *args, **kw):
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type is what is compared
        cf(*args, **kw)
    return type(info.value), str(info.value)


@pytest.mark.parametrize("shape", [(20, 2), (3, 20)])
def test_lm_jac_of_the_wrong_shape_is_leastsqs_type_error(shape):
    y = _model(X, 2.5, 1.3, 0.5)

    def jac(x, a, b, c):
        return np.ones(shape)
    kw = dict(p0=[1, 1, 1], jac=jac, method="lm")
    ours, ref = _raised(curve_fit, _model, X, y, **kw), _raised(so.curve_fit, _model, X, y, **kw)
    assert ours == ref and ours[0] is TypeError
    # 'trf' keeps least_squares' ValueError, as scipy's curve_fit does there
    kw["method"] = "trf"
    assert _raised(curve_fit, _model, X, y, **kw)[0] is ValueError
    assert _raised(so.curve_fit, _model, X, y, **kw)[0] is ValueError


@pytest.mark.parametrize("method", [None, "lm", "trf", "dogbox"])
def test_covariance_sigma_refuses_non_finite_residuals(method):
    y = _model(X, 2.5, 1.3, 0.5)
    y[3] = np.nan
    kw = dict(p0=[1, 1, 1], sigma=np.diag(np.full(20, 0.01)), check_finite=False,
              method=method)
    ours, ref = _raised(curve_fit, _model, X, y, **kw), _raised(so.curve_fit, _model, X, y, **kw)
    assert ours == ref == (ValueError, "array must not contain infs or NaNs")


def test_covariance_sigma_refuses_a_non_finite_jacobian_mid_fit():
    """Not only at the start: the model's Jacobian turns NaN at some point of the fit."""
    y = _model(X, 2.5, 1.3, 0.5)

    def jac(x, a, b, c):
        J = np.stack([np.exp(-b * x), -a * x * np.exp(-b * x), np.ones_like(x)], axis=1)
        return J if a < 2.0 else np.full_like(J, np.nan)
    kw = dict(p0=[1, 1, 1], jac=jac, sigma=np.diag(np.full(20, 0.01)))
    for method in ("lm", "trf"):
        ours = _raised(curve_fit, _model, X, y, method=method, **kw)
        ref = _raised(so.curve_fit, _model, X, y, method=method, **kw)
        assert ours == ref == (ValueError, "array must not contain infs or NaNs")
