"""Batched factorisations of small matrices run single-threaded (``linalg.serial_lapack``).

torch factorises a batch matrix by matrix; MKL's threaded LAPACK drivers open
a parallel region inside each small factorisation, which costs several times
the work (issue 14's batch tail). ``serial_lapack`` holds the calling
thread's counts at 1 around them where the thread has more than one thread
and one matrix is small, and does nothing otherwise.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from torchimize_scipy import _blas_threads
from torchimize_scipy._engine import csr, linalg
from torchimize_scipy._engine.linalg import factorize, serial_lapack, svd_factors

needs_threads = pytest.mark.skipif(
    _blas_threads._SET_LOCAL is None or _blas_threads._OMP is None,
    reason="needs torch built with MKL and OpenMP (thread-local counts)")



def _recording(monkeypatch, name: str) -> list[int]:
    """Replace ``torch.linalg.<name>`` by a wrapper that records the thread count it sees."""
    seen: list[int] = []
    original = getattr(torch.linalg, name)

    def wrapper(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, name, wrapper)
    return seen


@needs_threads
def test_batch_svd_runs_single_threaded(two_threads, monkeypatch):
    # 40 matrices 100 x 12: 48,000 entries in all (above torch's grain size, so
    # neither the driver nor the loop's tail holds the thread at 1 already)
    J = torch.randn(40, 100, 12, dtype=torch.float64)
    f = torch.randn(40, 100, dtype=torch.float64)
    seen = _recording(monkeypatch, "svd")
    svd_factors(J, None, f)
    # (one call, or one per chunk shared with the helper threads: linalg.thin_svd)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2  # restored afterwards


@needs_threads
def test_gram_route_inverses_and_eigh_run_single_threaded(two_threads, monkeypatch):
    g = torch.Generator().manual_seed(0)
    J = torch.randn(40, 100, 12, dtype=torch.float64, generator=g)
    # cond(J)**2 about 1e10: rows the Gram inverse rejects and the eigh route takes
    J[::4, :, -1] = J[::4, :, 0] + 3e-5 * J[::4, :, -1]
    f = torch.randn(40, 100, dtype=torch.float64, generator=g)
    inv = _recording(monkeypatch, "inv_ex")
    eigh = _recording(monkeypatch, "eigh")
    fac = factorize(J, None, f, use_gram=True)
    linalg.gram_solve(fac, torch.full((40,), 0.5, dtype=torch.float64))
    assert inv == [1, 1]
    assert eigh and set(eigh) == {1}
    assert torch.get_num_threads() == 2


@needs_threads
def test_large_matrices_keep_their_threads(two_threads):
    # one matrix above the grain size: MKL's threads may help inside it
    with serial_lapack(torch.empty(1, 40_000, 1, dtype=torch.float64)):
        assert torch.get_num_threads() == 2
    with serial_lapack(torch.empty(3, 100, 12, dtype=torch.float64)):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_single_thread_is_left_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with serial_lapack(torch.empty(3, 100, 12, dtype=torch.float64)) as held:
            assert held is None  # nothing entered
    finally:
        torch.set_num_threads(before)


@needs_threads
def test_a_rows_svd_does_not_depend_on_the_batch_size(two_threads):
    # MKL's threaded and sequential gesdd differ in the last bits for 64 x 4
    # matrices; with every factorisation sequential, a problem's factors are
    # the same in a batch of 200 (51,200 entries) and in a batch of 5
    g = torch.Generator().manual_seed(3)
    J = torch.randn(200, 64, 4, dtype=torch.float64, generator=g)
    f = torch.randn(200, 64, dtype=torch.float64, generator=g)
    big = svd_factors(J, None, f)
    small = svd_factors(J[:5].clone(), None, f[:5].clone())
    for x, y in zip(big, small, strict=True):
        assert torch.equal(x[:5], y)


# ---- linalg.thin_svd: a batch's SVDs shared with the helper threads ----------------


def _plain_svd(A: torch.Tensor):
    with serial_lapack(A):
        return torch.linalg.svd(A, full_matrices=False)


@pytest.mark.parametrize(("shape", "calls"), [
    ((150, 100, 12), 4), ((200, 64, 4), 4), ((33, 40, 40), 4),  # shared: 2 chunks a thread
    # below SPLIT_MIN_ROWS matrices, at most the grain size in all, or matrices above it:
    # one call of torch's, as before
    ((31, 100, 12), 1), ((200, 10, 3), 1), ((40, 200, 200), 1)])
def test_thin_svd_equals_one_call(monkeypatch, shape, calls):
    # one helper whatever this machine's cores: the chunks' factors are the whole
    # batch's, bit for bit (each matrix is one sequential gesdd either way)
    monkeypatch.setattr(csr, "lapack_helpers", lambda: 1)
    seen = _recording(monkeypatch, "svd")
    A = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = linalg.thin_svd(A)
    assert len(seen) == calls
    seen.clear()
    want = _plain_svd(A)
    assert len(seen) == 1
    for x, y in zip(got, want, strict=True):
        assert x.shape == y.shape and torch.equal(x, y)


def test_thin_svd_reports_a_failed_chunk(monkeypatch):
    # LAPACK failing for one matrix of one chunk: RuntimeError, as torch's own call
    # raises (the callers then factorise problem by problem)
    monkeypatch.setattr(csr, "lapack_helpers", lambda: 1)
    A = torch.randn(64, 100, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    A[50, 3, 2] = float("nan")
    with pytest.raises(RuntimeError, match="converge"):
        linalg.thin_svd(A)
    s, V, uf = linalg.svd_direct(A, torch.zeros(64, 100, dtype=torch.float64), None)
    assert torch.isnan(s[50]).all() and torch.isfinite(s[:50]).all()
    assert torch.isfinite(s[51:]).all()


def test_thin_svd_does_not_wait_for_a_busy_helper(monkeypatch):
    # a helper that gets no core: the caller factorises every chunk itself
    monkeypatch.setattr(csr, "lapack_helpers", lambda: 1)
    A = torch.randn(96, 100, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    release, busy, returned = threading.Event(), threading.Event(), threading.Event()

    def block() -> None:
        busy.set()
        release.wait(30)
        returned.set()

    csr._helpers(1)[0].queue.put(block)
    assert busy.wait(30)
    try:
        got = linalg.thin_svd(A)
        assert not returned.is_set()  # done without the helper
    finally:
        release.set()
    for x, y in zip(got, _plain_svd(A), strict=True):
        assert torch.equal(x, y)
    done = threading.Event()  # once free, the helper finds every chunk claimed
    csr._helpers(1)[0].queue.put(done.set)
    assert done.wait(30)


@needs_threads
def test_a_held_tail_still_counts_its_helpers(two_threads):
    # serial_blas holds this thread's counts at 1 (a batch's tail) and remembers the
    # two it had: the tail's SVDs are still shared with one helper
    cpus = os.cpu_count() or 1
    assert csr.lapack_helpers() == min(2, cpus) - 1
    with _blas_threads.serial_blas(torch.device("cpu"), 100, 12):
        assert torch.get_num_threads() == 1
        assert csr.helper_threads() == 0  # (the products' count is the thread's own)
        assert csr.lapack_helpers() == min(2, cpus) - 1
        with _blas_threads.serial_blas(torch.device("cpu"), 100, 12):  # nested
            assert csr.lapack_helpers() == min(2, cpus) - 1
        assert csr.lapack_helpers() == min(2, cpus) - 1
    assert getattr(csr._LOCAL, "outer", None) is None
    torch.set_num_threads(1)
    assert csr.lapack_helpers() == 0
