"""Other array libraries, reached through array-api-compat (``array_api_strict`` here).

``fun`` receives that library's arrays and the result holds them, and the
answers are those of the numpy call (and of scipy).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize as so
from _parity import assert_counts_close, assert_status_equivalent, assert_x_close

from torchimize_scipy import batch_least_squares, least_squares

xp = pytest.importorskip("array_api_strict")

T = np.linspace(0.0, 1.0, 20)


def rosenbrock_xp(x):
    assert isinstance(x, type(xp.asarray(0.0)))
    return xp.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def rosenbrock_np(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_least_squares_array_api_strict(method):
    res = least_squares(rosenbrock_xp, xp.asarray([2.0, 2.0]), method=method)
    ref = so.least_squares(rosenbrock_np, np.array([2.0, 2.0]), method=method)
    assert isinstance(res.x, type(xp.asarray(0.0)))
    # another path (array-api-strict arrays vs numpy): the parity policy
    assert_x_close(np.asarray(res.x), ref.x)
    assert_status_equivalent(res.status, ref.status)
    assert_counts_close(res.status, ref.status, res.nfev, ref.nfev,
                        slack=4 if method == "lm" else 2)


def test_batch_least_squares_array_api_strict():
    rates = np.array([[0.5], [2.0], [3.0]])
    y = xp.asarray(np.exp(-rates * T))

    def model(x, y):
        return xp.exp(-x[:, :1] * xp.asarray(T)) - y

    res = batch_least_squares(model, xp.ones((3, 1)), args=(y,))
    assert isinstance(res.x, type(xp.asarray(0.0)))
    np.testing.assert_allclose(np.asarray(res.x), rates, rtol=1e-8)
    assert np.all(np.asarray(res.success))
