"""``_engine/host_lapack.py``: one small matrix's SVD from LAPACK's ``dgesdd`` on host arrays.

The engine relies on it giving torch's own SVD (the same routine and arguments);
``benchmarks/engine_ab.py`` checks the bits on the parity problems. Here: the
factorisation's properties, its agreement with ``torch.linalg.svd`` to rounding,
the layout the caller relies on, and per-thread buffers.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from torchimize_scipy._engine import host_lapack

pytestmark = pytest.mark.skipif(not host_lapack.AVAILABLE,
                                reason="torch without MKL: the engine keeps torch's SVD")

EPS = np.finfo(np.float64).eps


def _matrix(rng, m, n, deficient=False):
    a = rng.standard_normal((m, n)) * 10.0 ** rng.integers(-6, 6)
    if deficient and n > 1:
        a[:, -1] = 3.0 * a[:, 0]
    return a


@pytest.mark.parametrize("m,n", [(1, 1), (2, 2), (3, 2), (2, 3), (50, 3), (20, 19)])
@pytest.mark.parametrize("deficient", [False, True])
def test_svd_factorises_like_torch(m, n, deficient):
    rng = np.random.default_rng(m * 100 + n)
    for _ in range(20):
        a = _matrix(rng, m, n, deficient)
        U, s, Vh = host_lapack.svd(a)
        k = min(m, n)
        assert U.shape == (m, k) and s.shape == (k,) and Vh.shape == (k, n)
        # column-major, as torch's SVD returns U and Vh
        assert U.flags.f_contiguous and Vh.flags.f_contiguous
        tol = 32 * max(m, n) * EPS * s[0]
        np.testing.assert_allclose((U * s) @ Vh, a, rtol=0, atol=tol)
        np.testing.assert_allclose(U.T @ U, np.eye(k), rtol=0, atol=32 * m * EPS)
        assert np.all(np.diff(s) <= 0) and s[-1] >= 0
        s_ref = torch.linalg.svdvals(torch.from_numpy(a)).numpy()
        np.testing.assert_allclose(s, s_ref, rtol=0, atol=tol)


def test_svd_results_are_copies():
    rng = np.random.default_rng(0)
    a, b = _matrix(rng, 3, 2), _matrix(rng, 3, 2)
    first = host_lapack.svd(a)
    kept = [x.copy() for x in first]
    host_lapack.svd(b)  # (the same shape: the same buffers inside)
    for x, y in zip(first, kept, strict=True):
        np.testing.assert_array_equal(x, y)


def test_svd_threads_keep_their_own_buffers():
    rng = np.random.default_rng(1)
    mats = [_matrix(rng, 4, 3) for _ in range(8)]
    wrong = []

    def work(a):
        s_ref = torch.linalg.svdvals(torch.from_numpy(a)).numpy()
        for _ in range(300):
            s = host_lapack.svd(a)[1]
            if np.max(np.abs(s - s_ref)) > 64 * EPS * s_ref[0]:
                wrong.append(1)
                return

    threads = [threading.Thread(target=work, args=(a,)) for a in mats]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
