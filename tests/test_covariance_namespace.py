"""The covariance helpers run one body for numpy arrays and tensors (issue 14).

``inverse_from_r``, ``pivoted_inverse`` and ``finish_covariance`` take either
kind and return the same kind; the two must give the same covariances, with
the same NaN (singular ``R``, failed problem) and ``inf`` (indeterminate, too
few observations) entries.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _parity import ONE_EVAL_RTOL

from torchimize_scipy._curve_fit._covariance import (
    finish_covariance,
    inverse_from_r,
    pivoted_inverse,
)


def _triangles(dtype=np.float64):
    rng = np.random.default_rng(7)
    R = np.triu(rng.normal(size=(3, 3, 3))) + 3 * np.eye(3)
    R[1, 2, 2] = 0.0  # an exactly zero pivot: indeterminate
    perm = np.array([[2, 0, 1], [0, 1, 2], [1, 2, 0]])
    return R.astype(dtype), perm


def _same(a_np, a_t, rtol=ONE_EVAL_RTOL):
    assert isinstance(a_np, np.ndarray) and isinstance(a_t, torch.Tensor)
    np.testing.assert_allclose(a_np, a_t.numpy(), rtol=rtol, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inverse_from_r_numpy_and_torch_agree(dtype):
    R, _ = _triangles(dtype)
    got_np, got_t = inverse_from_r(R), inverse_from_r(torch.from_numpy(R))
    assert got_np.dtype == dtype and got_t.dtype == torch.from_numpy(R).dtype
    _same(got_np, got_t, rtol=1e-5 if dtype == np.float32 else ONE_EVAL_RTOL)
    assert np.isnan(got_np[1]).all() and not np.isnan(got_np[[0, 2]]).any()
    ref = np.linalg.inv(R[0].T.astype(np.float64) @ R[0].astype(np.float64))
    np.testing.assert_allclose(got_np[0], ref, rtol=1e-4 if dtype == np.float32 else 1e-10)


def test_pivoted_inverse_numpy_and_torch_agree():
    R, perm = _triangles()
    got_np = pivoted_inverse(R, perm)
    got_t = pivoted_inverse(torch.from_numpy(R), torch.from_numpy(perm))
    _same(got_np, got_t)
    # variable perm[k] is column k: P R^-1 R^-T P^T
    inv = inverse_from_r(R[:1])[0]
    P = np.eye(3)[:, perm[0]]
    np.testing.assert_allclose(got_np[0], P @ inv @ P.T, rtol=1e-12)


@pytest.mark.parametrize("n", [1, 3, 7, 8])
@pytest.mark.parametrize("singular", [False, True])
def test_one_problem_numpy_and_torch_agree(n, singular):
    """One problem (curve_fit's): ``R^{-1} R^{-T}`` summed on the host below torch's own
    bmm kernel's limit (n <= 7), then unpermuted by indexing; as the torch path."""
    rng = np.random.default_rng(n)
    R = (np.triu(rng.normal(size=(1, n, n))) + 3 * np.eye(n)) * 10.0 ** rng.integers(
        -3, 4, size=(1, 1, n))
    if singular:
        R[0, n - 1, n - 1] = 0.0
    perm = rng.permutation(n)[None]
    got_np = pivoted_inverse(R, perm)
    got_t = pivoted_inverse(torch.from_numpy(R), torch.from_numpy(perm))
    assert got_np.shape == (1, n, n)
    _same(got_np, got_t)
    assert np.isnan(got_np).all() == singular
    if not singular:
        P = np.eye(n)[:, perm[0]]
        inv = np.linalg.inv(R[0].T @ R[0])
        np.testing.assert_allclose(got_np[0], P @ inv @ P.T, rtol=1e-9,
                                   atol=1e-12 * np.abs(inv).max())
        if n ** 3 < 400:  # (the host sums: symmetric by construction)
            np.testing.assert_array_equal(got_np[0], got_np[0].T)


@pytest.mark.parametrize("absolute_sigma", [False, True])
@pytest.mark.parametrize("per_problem_m", [False, True])
def test_finish_covariance_numpy_and_torch_agree(absolute_sigma, per_problem_m):
    R, perm = _triangles()
    cov = pivoted_inverse(R, perm)
    ok = np.array([True, True, False])
    chisq = np.array([2.0, 3.0, 4.0])
    m = np.array([10, 3, 10]) if per_problem_m else 10  # problem 1: m = n, no dof
    got_np, bad_np = finish_covariance(cov, ok, 3, m, chisq, absolute_sigma)
    got_t, bad_t = finish_covariance(torch.from_numpy(cov), torch.from_numpy(ok), 3,
                                     torch.from_numpy(m) if per_problem_m else m,
                                     torch.from_numpy(chisq), absolute_sigma)
    _same(got_np, got_t)
    assert bad_np == bad_t == 1  # problem 1 is indeterminate (a zero pivot); 2 is not ok
    assert np.isinf(got_np[1]).all() and np.isnan(got_np[2]).all()
    scale = 1.0 if absolute_sigma else chisq[0] / (10 - 3)
    np.testing.assert_allclose(got_np[0], cov[0] * scale, rtol=1e-15)


def test_finish_covariance_too_few_observations_is_inf():
    cov = np.eye(2)[None].repeat(2, 0)
    out, bad = finish_covariance(cov, np.array([True, True]), 2, np.array([5, 2]),
                                 np.array([1.0, 1.0]), absolute_sigma=False)
    assert bad == 1
    assert np.isinf(out[1]).all()
    np.testing.assert_allclose(out[0], np.eye(2) / 3)
