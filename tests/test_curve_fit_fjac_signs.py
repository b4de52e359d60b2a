"""``curve_fit(method='lm', full_output=True)``: ``fjac`` and ``qtf`` with MINPACK's signs.

MINPACK's QR (``qrfac``) reflects every column, also one with nothing below
its diagonal (the last column of a square Jacobian, or exact zeros below the
diagonal), which negates that row of ``R`` and that entry of ``Q^T f``;
LAPACK's ``geqp3`` leaves such a column alone. Compared with scipy's
``leastsq`` outputs on the same data: values to rounding, signs exact.
"""

import warnings

import numpy as np
import pytest
import scipy.optimize as so

from torchimize_scipy import curve_fit
from torchimize_scipy._curve_fit._leastsq import minpack_qr_outputs


def line(x, a):
    return a * np.asarray(x)


def growth(x, a, b):
    return a * np.exp(b * x)


def step_model(x, a, b, c):  # column b has exact zeros where x <= 1
    return a * x + b * (x > 1) + c


def decay(x, a, b, c):
    return a * np.exp(-b * x) + c


CASES = {
    "one point, one parameter": (line, np.array([2.0]), np.array([3.0])),
    "square, two parameters": (growth, np.array([0.0, 1.0]), np.array([2.0, 3.0])),
    "square, three parameters": (decay, np.linspace(0.0, 4.0, 3), np.array([3.0, 1.0, 0.5])),
    "exact zeros below the diagonal": (step_model, np.arange(5.0), np.array([1., 2., 4., 5., 7.])),
    "tall": (decay, np.linspace(0.0, 4.0, 30),
             2 * np.exp(-np.linspace(0.0, 4.0, 30)) + 0.1 * np.sin(np.arange(30.0))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fjac_and_qtf_as_minpack(case):
    f, x, y = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the square fits' covariance warning)
        ref = so.curve_fit(f, x, y, full_output=True)
        res = curve_fit(f, x, y, full_output=True)
    np.testing.assert_array_equal(res[2]["ipvt"], ref[2]["ipvt"])
    fjac, fjac_ref = res[2]["fjac"], ref[2]["fjac"]
    scale = np.abs(fjac_ref).max()
    np.testing.assert_allclose(fjac, fjac_ref, rtol=0, atol=1e-6 * scale)
    # every entry of R (on and above the diagonal) with scipy's sign
    n = fjac.shape[0]
    upper = np.triu(np.ones((n, n), dtype=bool))
    big = upper & (np.abs(fjac_ref[:, :n].T) > 1e-6 * scale)
    np.testing.assert_array_equal(np.sign(fjac[:, :n].T[big]), np.sign(fjac_ref[:, :n].T[big]))
    # Q^T f at the solution: entries of order R times the solutions' difference (xtol), or
    # rounding noise where the fit is exact (its signs: the next test)
    np.testing.assert_allclose(res[2]["qtf"], ref[2]["qtf"], rtol=0, atol=1e-6 * np.abs(y).max())
    np.testing.assert_allclose(res[0], ref[0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (5, 5), (6, 4)])
def test_qr_outputs_away_from_the_solution(shape):
    """At a start point (``qtf`` not rounding noise): ``leastsq`` stopped by ``maxfev=1``
    returns MINPACK's ``fjac``, ``ipvt`` and ``qtf`` of the Jacobian and residuals at
    ``x0``; ours of the same arrays agree to rounding, signs included."""
    m, n = shape
    rng = np.random.default_rng(m * 10 + n)
    A, b = rng.standard_normal((m, n)), rng.standard_normal(m)

    def fun(p):
        return np.tanh(A @ p) - b

    def jac(p):
        return (1 - np.tanh(A @ p) ** 2)[:, None] * A

    x0 = np.full(n, 0.3)
    ref = so.leastsq(fun, x0, Dfun=jac, maxfev=1, full_output=True)
    assert ref[4] == 5  # (stopped by maxfev, after the first Jacobian)
    fjac, ipvt, qtf, _ = minpack_qr_outputs(jac(x0), fun(x0))
    np.testing.assert_array_equal(ipvt, ref[2]["ipvt"])
    np.testing.assert_allclose(fjac, ref[2]["fjac"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(qtf, ref[2]["qtf"], rtol=0, atol=1e-12)
    assert np.abs(ref[2]["qtf"]).min() > 1e-6  # (each sign decided)
