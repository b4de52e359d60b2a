"""``curve_fit(method='lm', factor=...)``: MINPACK's initial step bound, as scipy's
``leastsq`` takes it (it was refused unless 100; found by probing)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize as so
from _parity import assert_counts_close

from torchimize_scipy import batch_curve_fit, curve_fit, least_squares

X = np.linspace(0, 4, 30)
Y = 2.5 * np.exp(-1.3 * X) + 0.5 + 0.05 * np.random.default_rng(3).normal(size=30)
P0 = [1.0, 3.0, 0.0]


def _model(x, a, b, c):
    return a * np.exp(-b * x) + c


@pytest.mark.parametrize("factor", [0.01, 1.0, 10.0, 1000.0])
def test_factor_sets_the_first_radius_as_minpack(factor):
    """The first radius decides the path: scipy's evaluations, alone and in a batch, to
    within an iteration of MINPACK's differences (n + 1 = 4 calls: rounding decides the
    last stop test), where the factors themselves move nfev from 30 (100) to 49 (0.01)."""
    ref = so.curve_fit(_model, X, Y, p0=P0, method="lm", factor=factor, full_output=True)
    ours = curve_fit(_model, X, Y, p0=P0, method="lm", factor=factor, full_output=True)
    assert_counts_close(ours[4], ref[4], ours[2]["nfev"], ref[2]["nfev"], slack=len(P0) + 1)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6)
    batch = batch_curve_fit(_model, X, np.stack([Y, Y]), p0=np.array([P0, P0]), method="lm",
                            factor=factor, full_output=True)
    assert_counts_close(1, 1, np.asarray(batch[2]["nfev"]), [ref[2]["nfev"]] * 2,
                        slack=len(P0) + 1)
    np.testing.assert_allclose(np.asarray(batch[0]), np.stack([ref[0]] * 2), rtol=1e-6)


def test_factor_leaves_least_squares_alone():
    """Only the curve_fit solve takes it: a later least_squares runs MINPACK's 100."""
    curve_fit(_model, X, Y, p0=P0, method="lm", factor=0.01)
    ref = so.least_squares(lambda p: _model(X, *p) - Y, P0, method="lm")
    ours = least_squares(lambda p: _model(X, *p) - Y, P0, method="lm")
    assert_counts_close(ours.status, ref.status, ours.nfev, ref.nfev, slack=1)
    # (factor 0.01 would cost about 19 evaluations more: see the test above)


def test_factor_must_be_positive():
    with pytest.raises(RuntimeError, match="Improper input parameters"):
        curve_fit(_model, X, Y, p0=P0, method="lm", factor=0.0)
