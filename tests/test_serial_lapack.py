"""Batched factorisations of small matrices run single-threaded (``linalg.serial_lapack``).

torch factorises a batch matrix by matrix; MKL's threaded LAPACK drivers open
a parallel region inside each small factorisation, which costs several times
the work (issue 14's batch tail). ``serial_lapack`` holds the calling
thread's counts at 1 around them where the thread has more than one thread
and one matrix is small, and does nothing otherwise.
"""

from __future__ import annotations

import pytest
import torch

from torchimize_scipy import _blas_threads
from torchimize_scipy._engine import linalg
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
    assert seen == [1]
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
