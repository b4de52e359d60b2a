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


# ---- linalg.one_host_svd: one float64 problem's SVD factors for trf and dogbox ----------

def _tensor_factors(A, f, diag):
    """svd_direct's tensor path (the host path switched off)."""
    from torchimize_scipy._engine import linalg
    saved = host_lapack.AVAILABLE
    host_lapack.AVAILABLE = False
    try:
        return linalg.svd_direct(A, f, diag)
    finally:
        host_lapack.AVAILABLE = saved


@pytest.mark.parametrize("m,n,augmented", [(2, 2, False), (2, 2, True), (1, 2, True),
                                           (15, 3, False), (9, 9, True), (3, 5, False)])
def test_one_host_svd_gives_the_tensor_paths_factors(m, n, augmented):
    from torchimize_scipy._engine.host_scalars import host_rows
    from torchimize_scipy._engine.linalg import one_host_svd

    rng = np.random.default_rng(m * 10 + n)
    A = torch.from_numpy(_matrix(rng, m, n)[None])
    f = torch.from_numpy(rng.standard_normal((1, m)))
    # a Coleman-Li diagonal: zeros (of either sign) where no bound is near
    diag = (torch.from_numpy(rng.random((1, n))) * torch.tensor([0.0, -0.0, 1.0] * n)[:n]
            if augmented else None)
    got = one_host_svd(A, f, diag)
    s, V, uf = _tensor_factors(A, f, diag)
    assert got is not None
    s_h, V_h, uf_h = got
    scale = float(s.max())
    tol = 64 * (m + n) * EPS
    np.testing.assert_allclose(s_h.numpy(), s.numpy(), rtol=0, atol=tol * scale)
    # (the same routine on both paths; magnitudes, so that a sign LAPACK may pick
    # otherwise on another build cannot fail the test)
    np.testing.assert_allclose(np.abs(V_h.numpy()), np.abs(V.numpy()), rtol=0, atol=tol)
    np.testing.assert_allclose(np.abs(uf_h.numpy()), np.abs(uf.numpy()), rtol=0,
                               atol=tol * float(f.abs().sum()))
    for t in (s_h, V_h, uf_h):  # the host rows the trust-region solve reads, in C order
        known = host_rows(t)
        assert known is not None and known.flags.c_contiguous
        np.testing.assert_array_equal(known, t.numpy())


def test_one_host_svd_leaves_other_cases_to_the_tensor_path():
    from torchimize_scipy._engine import host_scalars
    from torchimize_scipy._engine.linalg import one_host_svd

    rng = np.random.default_rng(0)
    A = torch.from_numpy(rng.standard_normal((1, 4, 2)))
    f = torch.from_numpy(rng.standard_normal((1, 4)))
    assert one_host_svd(A, f, None) is not None
    assert one_host_svd(A.expand(2, 4, 2), f.expand(2, 4), None) is None  # a batch
    assert one_host_svd(A.float(), f.float(), None) is None  # float32
    big = torch.from_numpy(rng.standard_normal((1, 200, 2)))  # above MAX_ENTRIES
    assert one_host_svd(big, torch.zeros(1, 200, dtype=torch.float64), None) is None
    bad = torch.tensor([[1.0, float("nan")]], dtype=torch.float64)
    assert one_host_svd(A, f, bad) is None  # a non-finite diagonal: the tensor path tests it
    with torch.enable_grad():
        assert one_host_svd(A.clone().requires_grad_(), f, None) is None
    saved = host_scalars.HOST
    host_scalars.HOST = False  # (the code a GPU runs)
    try:
        assert one_host_svd(A, f, None) is None
    finally:
        host_scalars.HOST = saved
