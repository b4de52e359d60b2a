"""Small problems run torch's MKL single-threaded, in the calling thread only.

Why: on the CPU, torch's own kernels (``at::parallel_for``) never start a
parallel region for fewer elements than their grain size (32,768), but the
MKL routines behind ``bmm``/``matmul`` and the LAPACK factorisations decide
for themselves, and they do fan out to every intra-op thread for a ``3 x 50``
times ``50 x 3`` product. Each such call wakes the OpenMP team and waits at
its barrier; when the other cores are busy, a worker that is not scheduled
holds the caller for a time slice. A 3-parameter ``curve_fit`` measured
~100 ms with torch's default two threads against ~4 ms with
``OMP_NUM_THREADS=1`` on a loaded machine (issue 14; RESULTS §14), with the
time spent in ``mkl_blas_dgemm_omp_driver`` entering ``GOMP_parallel``.

What: while the engine runs work whose Jacobians have at most
:data:`GRAIN_SIZE` entries in all (``B m n <= 32,768``, torch's own
threshold for splitting work), :func:`serial_blas` sets MKL's *thread-local*
thread count to 1 (``mkl_set_num_threads_local``) and puts back the previous
value afterwards, and likewise the OpenMP thread count of the calling
thread (``omp_set_num_threads`` sets the calling thread's own
``nthreads-var``), which torch's own parallel regions follow: the batched LU
behind ``torch.linalg.inv_ex`` wakes the OpenMP team even under MKL's
thread-local count of 1 (3 matrices 12 x 12 on 2 busy cores: 11.9 ms median
with the team against 0.05 ms without; a batch's tail factorises so at every
iteration). The rows of a batch count together (the caller passes
``B m`` for ``m``): a batch of many small problems keeps MKL's threads,
because torch's ``bmm`` hands such a batch to MKL's batched product, which
does use them (B = 10,000 Gaussian peaks, 64 x 4: ``bmm`` took 0.061 s
threaded against 0.092 s single-threaded on 2 idle cores).

The driver decides once per call from the batch's size; the engine's loop
(:func:`torchimize_scipy._engine.loop.run`) revisits the decision for the
tail of a batch: once no problem is left to admit and the running rows hold
at most ``loop.TAIL_ENTRIES`` (8 x :data:`GRAIN_SIZE`) Jacobian entries, it
runs the rest of the solve under :func:`serial_blas` too (RESULTS §18-§19, §32).
The block remembers the count the caller had (``csr._LOCAL.outer``), so that
a tail's batched SVDs still use the other cores on the helper threads of
:mod:`~torchimize_scipy._engine.csr` (``linalg.thin_svd``), outside any
parallel region.

Why not ``torch.set_num_threads(1)``: that setting is process-global (torch's
pool size and MKL's global count), so changing and restoring it around a call
would race with concurrent calls from other threads (docs/threads.md) and with
the caller's own setting. MKL's thread-local count touches only the calling
thread, nests (an inner call restores the outer value) and is restored even
when the solve raises.

Scope and limits: CPU only; a no-op when torch is not built with MKL (the
symbol is not found) or the device is not the CPU. MKL calls that the
caller's own torch ``fun`` makes in the calling thread during such a solve are
single-threaded too, and ``torch.get_num_threads()`` reads 1 in that thread
meanwhile (other threads keep their count).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ._engine import csr

#: torch's grain size (``at::internal::GRAIN_SIZE``): its kernels do not split
#: fewer elements than this across threads; the per-problem Jacobian size
#: ``m n`` at or below which the engine's MKL calls run single-threaded.
GRAIN_SIZE = 32768


def _find_set_local() -> Callable[[int], int] | None:
    """MKL's ``mkl_set_num_threads_local`` (C interface) from torch's library, or None."""
    if not torch.backends.mkl.is_available():
        return None
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        path = os.path.join(lib_dir, name)
        if not os.path.exists(path):
            continue
        try:
            # already loaded by torch: the same handle. PyDLL keeps the GIL during the
            # call (it takes well under a microsecond): CDLL would release it and then
            # wait to get it back from a helper thread (csr's) that holds it meanwhile
            lib = ctypes.PyDLL(path)
            fn = lib.MKL_Set_Num_Threads_Local  # by value; the lower-case name takes a pointer
        except (OSError, AttributeError):
            return None
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int]
        return fn
    return None


_SET_LOCAL = _find_set_local()


def _find_omp() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """The OpenMP runtime's ``omp_get_max_threads``/``omp_set_num_threads`` that torch's
    own parallel regions use (through torch's library), or None."""
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = os.path.join(os.path.dirname(torch.__file__), "lib", name)
        if not os.path.exists(path):
            continue
        try:
            lib = ctypes.PyDLL(path)  # (the GIL kept, as for _find_set_local)
            get, put = lib.omp_get_max_threads, lib.omp_set_num_threads
        except (OSError, AttributeError):
            return None
        get.restype, get.argtypes = ctypes.c_int, []
        put.restype, put.argtypes = None, [ctypes.c_int]
        return get, put
    return None


_OMP = _find_omp()


def is_small(m: int, n: int, limit: int = GRAIN_SIZE) -> bool:
    """Whether one problem's Jacobian ``(m, n)`` holds at most ``limit`` entries.

    ``limit`` defaults to torch's grain size; the engine's loop passes a larger
    one for the tail of a batch (``loop.TAIL_ENTRIES``).
    """
    return m * n <= limit


@contextmanager
def serial_blas(device: torch.device, m: int, n: int,
                limit: int = GRAIN_SIZE) -> Iterator[bool]:
    """Run the block with MKL single-threaded in this thread when ``(m, n)`` is small.

    Small means at most ``limit`` entries (:func:`is_small`). Yields whether
    it did. See the module docstring for the rule and why it is safe for
    concurrent calls.
    """
    if _SET_LOCAL is None or device.type != "cpu" or not is_small(m, n, limit):
        yield False
        return
    if getattr(csr._LOCAL, "serial", False):
        # inside another such block of this thread (the driver's, around a small run's
        # loop): the counts are 1 already, and that block restores them
        yield True
        return
    # torch sets MKL's thread-local count itself the first time a thread asks
    # for its thread count; let it do so now rather than inside the block.
    threads = torch.get_num_threads()
    previous = _SET_LOCAL(1)
    # torch's own parallel regions (the batched LU behind inv_ex, for one) wake the
    # OpenMP team too: the thread's OpenMP count goes to 1 as well, a per-thread
    # setting (the nthreads-var of the calling thread only)
    omp_previous = None if _OMP is None else _OMP[0]()
    if omp_previous is not None:
        _OMP[1](1)
    # the count the caller had, for the helper threads that share a batch's SVDs
    # (csr.lapack_helpers: outside any parallel region, so none left spinning)
    mark = threads > 1 and getattr(csr._LOCAL, "outer", None) is None
    if mark:
        csr._LOCAL.outer = threads
    csr._LOCAL.serial = True
    try:
        yield True
    finally:
        csr._LOCAL.serial = False
        if mark:
            csr._LOCAL.outer = None
        _SET_LOCAL(previous)
        if omp_previous is not None:
            _OMP[1](omp_previous)


def mkl_local_threads() -> int | None:
    """MKL's thread-local count in this thread (0: the global one), None without MKL."""
    if _SET_LOCAL is None:
        return None
    value = _SET_LOCAL(0)
    _SET_LOCAL(value)
    return value


@contextmanager
def serial_torch(device: torch.device) -> Iterator[bool]:
    """Hold the calling thread's torch (OpenMP) and MKL counts at 1; products keep theirs.

    For the sparse products' solves (``tr_solver='lsmr'`` with a CSR Jacobian
    on the CPU): their products already run on the lean helper threads of
    :mod:`~torchimize_scipy._engine.csr`, so a torch parallel region over the
    ``m``-long vectors gains nothing there, and its OpenMP worker keeps
    spinning for milliseconds after each region, on the core the helpers
    need. Inside the block the products still cut their rows for the
    thread count the caller had (:func:`~torchimize_scipy._engine.csr.product_threads`).
    The driver enters it around a whole solve whose Jacobian is sparse on the
    CPU (the step rules and the grouped differences enter it too, nested, when
    they are called on their own); the caller's ``fun``, ``jac`` and ``loss``
    run inside with the caller's own counts (:func:`user_threads`). Per thread
    and nested like :func:`serial_blas`; yields whether it did anything (CPU,
    OpenMP found, more than one thread).
    """
    threads = csr.product_threads()
    if device.type != "cpu" or _OMP is None or threads <= 1:
        yield False
        return
    torch.get_num_threads()  # (torch's own first-use setting of MKL's local count, now)
    held = getattr(csr._LOCAL, "threads", None)
    saved = getattr(csr._LOCAL, "saved", None)
    omp_previous = _OMP[0]()
    mkl_previous = None if _SET_LOCAL is None else _SET_LOCAL(1)
    csr._LOCAL.threads = threads
    # (the outermost block's counts are the caller's own: user_threads puts them back)
    csr._LOCAL.saved = saved if saved is not None else (omp_previous, mkl_previous)
    _OMP[1](1)
    try:
        yield True
    finally:
        _OMP[1](omp_previous)
        if mkl_previous is not None:
            _SET_LOCAL(mkl_previous)
        csr._LOCAL.threads = held
        csr._LOCAL.saved = saved


@contextmanager
def user_threads() -> Iterator[bool]:
    """Give a call of the caller's code the thread counts it had before :func:`serial_torch`.

    The driver holds the calling thread's torch count at 1 for a whole solve
    whose Jacobian is sparse on the CPU; a torch ``fun``, ``jac`` or ``loss``
    the engine calls meanwhile runs inside this block, with the caller's own
    OpenMP and MKL counts (and ``torch.get_num_threads()`` reads them), and
    the count goes back to 1 afterwards, also when the call raises. Outside a
    :func:`serial_torch` block it does nothing; yields whether it did.
    """
    saved = getattr(csr._LOCAL, "saved", None)
    if saved is None:
        yield False
        return
    omp_previous, mkl_previous = saved
    held = csr._LOCAL.threads
    csr._LOCAL.threads = None
    csr._LOCAL.saved = None
    _OMP[1](omp_previous)
    if mkl_previous is not None:
        _SET_LOCAL(mkl_previous)
    try:
        yield True
    finally:
        _OMP[1](1)
        if mkl_previous is not None:
            _SET_LOCAL(1)
        csr._LOCAL.threads = held
        csr._LOCAL.saved = saved

