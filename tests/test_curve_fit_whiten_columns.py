"""A covariance ``sigma`` whitens each column on its own: the same bits in every chunking.

``whiten`` applies ``L^{-1}`` (``L`` the lower Cholesky factor of a problem's
covariance) to the columns of ``(b, M, k)``. A triangular solve of several
columns at once (``trsm``) rounds a column differently by how many others it
has and where it stands; 'lm''s residuals at a point were whitened alone at a
trial and beside MINPACK's shifted points elsewhere, so ``batch_curve_fit``
with ``(B, M, M)`` covariances gave other bits when cut into other chunks (a
poorly determined fit moved by 1.6e-6), against ``batch_least_squares``'
promise. Each column is now solved on its own.
"""

from __future__ import annotations

import numpy as np
import pytest

from torchimize_scipy import batch_curve_fit
from torchimize_scipy._curve_fit._model import whiten


def _covariances(rng, B: int, M: int) -> np.ndarray:
    L = rng.normal(0.0, 0.2, (B, M, M))
    return L @ L.transpose(0, 2, 1) + np.eye(M)


@pytest.mark.parametrize("M", [24, 100])
def test_a_column_whitens_to_the_same_bits_alone_and_beside_others(M):
    rng = np.random.default_rng(0)
    T = np.linalg.cholesky(_covariances(rng, 3, M))
    a = rng.standard_normal((3, M, 9))
    alone = np.concatenate([whiten(np.ascontiguousarray(a[..., j:j + 1]), "chol", T)
                            for j in range(9)], -1)
    for k in (2, 3, 5, 9):
        np.testing.assert_array_equal(whiten(np.ascontiguousarray(a[..., :k]), "chol", T),
                                      alone[..., :k])
    # and L times the result gives the columns back (to rounding)
    np.testing.assert_allclose(T @ alone, a, rtol=0, atol=1e-12 * np.abs(a).max() * M)


def _model(x, A, k, c):
    return A * np.exp(-k * x) + c


@pytest.mark.parametrize("method", ["lm", "trf"])
def test_batch_curve_fit_with_covariances_gives_the_same_bits_in_every_chunking(method):
    rng = np.random.default_rng(0)
    B, M = 6, 24
    x = np.linspace(0, 3, M)
    truth = np.column_stack([rng.uniform(0.5, 3, B), rng.uniform(0.2, 3, B),
                             rng.uniform(-1, 1, B)])
    y = _model(x, truth[:, :1], truth[:, 1:2], truth[:, 2:]) + 0.05 * rng.standard_normal((B, M))
    cov = _covariances(rng, B, M)
    p0 = np.ones((B, 3))
    popt, pcov = batch_curve_fit(_model, x, y, p0, sigma=cov, method=method)
    for chunk in (1, 2, 4):
        p, c = batch_curve_fit(_model, x, y, p0, sigma=cov, method=method, chunk_size=chunk)
        np.testing.assert_array_equal(p, popt)
        np.testing.assert_array_equal(c, pcov)
    # the problems in reverse order: each keeps its bits
    p, c = batch_curve_fit(_model, x, y[::-1], p0, sigma=cov[::-1], method=method)
    np.testing.assert_array_equal(p[::-1], popt)
    np.testing.assert_array_equal(c[::-1], pcov)
