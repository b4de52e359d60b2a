"""``batch_curve_fit(nan_policy='omit')``: a problem left with fewer observations than
parameters, against ``curve_fit`` on that problem's data.

'lm': ``curve_fit`` raises ``TypeError`` on such a data set; in a batch the problem
fails alone (NaN ``popt`` and ``pcov``, ``ier`` 0, ``mesg`` the error's text) and
the others are ``curve_fit``'s. 'trf': ``curve_fit`` fits it with an ``inf`` ``pcov``;
so does the batch.
"""

import warnings

import numpy as np
import pytest
import scipy.optimize as so
from scipy.optimize import OptimizeWarning

from torchimize_scipy import batch_curve_fit


def decay(x, a, k, c):
    return a * np.exp(-k * x) + c


X = np.linspace(0.0, 4.0, 40)


def data():
    rng = np.random.default_rng(3)
    Y = np.stack([decay(X, 2, 1, 0.3), decay(X, 1, 2, 0.1), decay(X, 1, 2, 0.1)])
    Y = Y + 0.05 * rng.standard_normal(Y.shape)
    Y[1, 2:] = np.nan  # two observations left, three parameters
    Y[2, 3:] = np.nan  # three: as many as parameters
    return Y


def test_lm_problem_with_too_few_observations_fails_alone():
    Y, p0 = data(), np.ones((3, 3))
    with pytest.raises(TypeError, match="must not exceed the number of data points=2") as err:
        so.curve_fit(decay, X, Y[1], p0[1], nan_policy="omit")
    with pytest.warns(OptimizeWarning) as record:
        popt, pcov, info, mesg, ier = batch_curve_fit(decay, X, Y, p0, nan_policy="omit",
                                                      full_output=True)
    texts = [str(w.message) for w in record]
    assert any("Optimal parameters not found for 1 of 3" in t for t in texts), texts
    assert any("could not be estimated for 1 of 3" in t for t in texts), texts  # (row 2)
    assert np.isnan(popt[1]).all() and np.isnan(pcov[1]).all()
    assert ier[1] == 0 and mesg[1] == str(err.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)  # (row 2: M = P, inf pcov)
        for b in (0, 2):
            ref = so.curve_fit(decay, X, Y[b], p0[b], nan_policy="omit")
            np.testing.assert_allclose(popt[b], ref[0], rtol=1e-6)
            assert 1 <= ier[b] <= 4
    assert np.isinf(pcov[2]).all()


def test_trf_problem_with_too_few_observations_is_fitted():
    Y, p0 = data(), np.ones((3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        ref = so.curve_fit(decay, X, Y[1], p0[1], nan_policy="omit", method="trf")
        popt, pcov = batch_curve_fit(decay, X, Y, p0, nan_policy="omit", method="trf")
    assert np.isinf(ref[1]).all() and np.isinf(pcov[1]).all()
    # (an underdetermined fit: both interpolate the two points, cost 0)
    np.testing.assert_allclose(decay(X[:2], *popt[1]), Y[1, :2], atol=1e-8)
    np.testing.assert_allclose(decay(X[:2], *ref[0]), Y[1, :2], atol=1e-8)
