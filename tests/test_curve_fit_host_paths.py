"""``curve_fit``'s one problem on the host: the shifted points of MINPACK's differences
and the covariance helpers on numpy arrays.

For one problem, ``curve_fit`` builds the forward-difference points with numpy
(a cached boolean identity selects ``p_j + h_j``), hands the Jacobian over as a
transposed view, and computes the 'lm' covariance on numpy arrays (torch only
for the triangular solve and the product). These tests pin the values each
piece must give.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from torchimize_scipy import curve_fit
from torchimize_scipy._curve_fit._covariance import finish_covariance, pivoted_inverse


def test_shifted_points_change_one_parameter_and_keep_negative_zero():
    """Each shifted point is ``p`` with one entry moved by MINPACK's ``h_j``; the others
    (here a -0.0) reach ``f`` as they are, sign of zero included."""
    calls: list[tuple[float, ...]] = []

    def line(x, a, b, c):
        calls.append((a, b, c))
        return a * x + b + c * x**2

    x = np.linspace(0.0, 1.0, 8)
    y = 2.0 * x + 0.5
    with pytest.raises(RuntimeError):  # stops after the first Jacobian: maxfev = 1
        curve_fit(line, x, y, p0=[3.0, -0.0, 0.0], maxfev=1)
    base, *shifted = calls[:4]
    assert base == (3.0, -0.0, 0.0)
    rel = math.sqrt(np.finfo(float).eps)
    h = [rel * 3.0, rel, rel]  # MINPACK: rel * |p_j|, or rel where p_j = 0
    for j, point in enumerate(shifted):
        for k in range(3):
            expected = base[k] + h[k] if k == j else base[k]
            assert point[k] == expected
            assert math.copysign(1.0, point[k]) == math.copysign(1.0, expected)


def test_pivoted_inverse_numpy_matches_the_inverse_of_the_gram_matrix():
    rng = np.random.default_rng(1)
    J = rng.normal(size=(15, 3)) * np.array([2.0, 0.05, 40.0])
    _, R, perm = scipy.linalg.qr(J, pivoting=True, mode="economic")
    assert not np.array_equal(perm, np.arange(3))
    cov = pivoted_inverse(R[None], perm.astype(np.int32)[None])
    assert isinstance(cov, np.ndarray) and cov.shape == (1, 3, 3)
    ref = np.linalg.inv(J.T @ J)
    tol = 10 * np.finfo(float).eps * np.linalg.cond(J) ** 2 * np.abs(ref).max()
    np.testing.assert_allclose(cov[0], ref, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pivoted_inverse_numpy_singular_is_nan_and_keeps_the_others(dtype):
    """A singular ``R`` beside a regular one, in the dtype of ``R`` (float32 included)."""
    R = np.stack([np.array([[2.0, 1.0], [0.0, 0.0]]),
                  np.array([[2.0, 1.0], [0.0, 4.0]])]).astype(dtype)
    cov = pivoted_inverse(R, np.array([[1, 0], [0, 1]]))
    assert cov.dtype == dtype
    assert np.isnan(cov[0]).all()
    ref = np.linalg.inv(R[1].astype(float).T @ R[1].astype(float))
    np.testing.assert_allclose(cov[1], ref, rtol=10 * np.finfo(dtype).eps)


def test_finish_covariance_numpy_rules():
    """The rules of the tensor version, on numpy arrays (exact: 6 / (5 - 2) = 2)."""
    cov = np.broadcast_to(np.eye(2), (4, 2, 2)).copy()
    cov[1, 0, 0] = np.nan
    ok = np.array([True, True, True, False])
    chisq = np.full(4, 6.0)
    m = np.array([5, 5, 2, 5])
    out, bad = finish_covariance(cov, ok, 2, m, chisq, absolute_sigma=False)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out[0], 2.0 * np.eye(2))
    assert np.isinf(out[1]).all() and np.isinf(out[2]).all()
    assert np.isnan(out[3]).all()
    assert bad == 2
    out, bad = finish_covariance(cov, ok, 2, 5, chisq, absolute_sigma=True)
    np.testing.assert_array_equal(out[2], np.eye(2))
    assert bad == 1
    assert not np.isnan(cov[0]).any()  # the input is not modified


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_lm_pcov_kind_and_values(kind):
    """'lm' computes pcov on the host; it comes back in the caller's kind and equals
    ``s^2 (J^T J)^{-1}`` at the solution within the differences' accuracy."""
    x = np.linspace(0.0, 3.0, 30)
    rng = np.random.default_rng(2)
    y = 1.5 * x + 0.3 + 0.05 * rng.normal(size=x.size)
    if kind == "numpy":
        popt, pcov = curve_fit(lambda t, a, b: a * t + b, x, y)
        assert isinstance(pcov, np.ndarray)
    else:
        popt, pcov = curve_fit(lambda t, a, b: a * t + b, torch.from_numpy(x),
                               torch.from_numpy(y))
        assert isinstance(pcov, torch.Tensor) and pcov.dtype == torch.float64
        popt, pcov = popt.numpy(), pcov.numpy()
    A = np.stack([x, np.ones_like(x)], axis=1)
    s2 = np.sum((A @ popt - y) ** 2) / (x.size - 2)
    ref = s2 * np.linalg.inv(A.T @ A)
    # forward differences of a linear model: exact up to rounding of (f(p + h) - f(p)) / h
    np.testing.assert_allclose(pcov, ref, rtol=1e-6)
