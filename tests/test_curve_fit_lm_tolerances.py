"""``curve_fit``'s 'lm' takes ``leastsq``'s tolerances below machine epsilon (0 among them)
and stops with MINPACK's "tolerance too small" codes where scipy's does (found by probing:
the tolerances used to be raised to epsilon, and such fits returned as successes)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize as so

from torchimize_scipy import batch_curve_fit, curve_fit, least_squares

X = np.linspace(0, 4, 30)
P_TRUE = (2.5, 1.3, 0.5)


def _model(x, a, b, c):
    return a * np.exp(-b * x) + c


def _data(noisy: bool) -> np.ndarray:
    y = _model(X, *P_TRUE)
    return y + 0.05 * np.random.default_rng(1).normal(size=X.size) if noisy else y


def _outcome(cf, y, **kw):
    try:
        popt, _, _, mesg, ier = cf(_model, X, y, method="lm", full_output=True, **kw)
    except RuntimeError as e:
        return "raises", " ".join(str(e).split())
    return ier, popt


def test_zero_tolerances_end_in_a_too_small_stop_as_scipys():
    """With ``ftol = xtol = 0`` neither test can pass (they need exactly zero reductions
    or radius), so both fits end by one of MINPACK's "too small" tests and raise. Which
    one fires first is rounding's choice at the solution, so only the kind is compared."""
    y = _data(True)
    ours, ref = _outcome(curve_fit, y, ftol=0, xtol=0), _outcome(so.curve_fit, y, ftol=0,
                                                                   xtol=0)
    assert ref[0] == "raises" and "is too small" in ref[1]
    assert ours[0] == "raises" and ours[1].startswith("Optimal parameters not found: ")
    assert "=0.000000 is too small, " in ours[1]


def test_a_tolerance_below_epsilon_that_does_not_decide_changes_nothing():
    """``xtol = 0`` on noisy data: the default ``ftol`` stops both fits (ier 1)."""
    y = _data(True)
    ours, ref = _outcome(curve_fit, y, xtol=0), _outcome(so.curve_fit, y, xtol=0)
    assert ours[0] == ref[0] == 1
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-6)


def test_a_batch_reports_the_stop_per_problem():
    """In a batch each problem that ends by a "too small" test fails alone: ier 6-8, its
    message, NaN parameters (scipy's curve_fit raises for each)."""
    rng = np.random.default_rng(2)
    y = _data(False) + 0.05 * rng.normal(size=(3, X.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        popt, _, _, mesg, ier = batch_curve_fit(_model, X, y, p0=np.ones((3, 3)), method="lm",
                                                ftol=0, xtol=0, full_output=True)
    for k in range(3):
        with pytest.raises(RuntimeError, match="is too small"):
            so.curve_fit(_model, X, y[k], p0=np.ones(3), method="lm", ftol=0, xtol=0)
        assert int(ier[k]) in (6, 7, 8) and "=0.000000 is too small" in mesg[k]
        assert np.isnan(popt[k]).all()


def test_least_squares_still_refuses_them_after_a_fit():
    """The leave ends with the fit: ``least_squares('lm')`` keeps scipy's check."""
    curve_fit(_model, X, _data(True), method="lm", ftol=0, xtol=1e-10)
    with pytest.raises(ValueError, match="higher than machine epsilon"):
        least_squares(lambda p: _model(X, *p) - _data(True), np.ones(3), method="lm", ftol=0)
