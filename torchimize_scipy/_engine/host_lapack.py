"""One small matrix's SVD from LAPACK's ``dgesdd``, called on host arrays without torch.

Why: one float64 'lm' problem factorises its scaled Jacobian ``J / diag`` at
every outer iteration (:func:`~.steps.lm._host_svd`). For a ``2 x 2`` or
``50 x 3`` matrix, ``torch.linalg.svd`` spends most of its time around the
factorisation: the dispatch, the column-major copy of the input, the outputs
and a workspace allocated anew, a workspace query before every call, the
check of LAPACK's ``info`` (about 17-25 µs per call on this machine, against
5-9 µs for the same ``dgesdd`` called here; 15 calls per Rosenbrock solve),
and its results then cross to the host for the rule's arithmetic.

What: :func:`svd` calls the very routine torch's CPU SVD calls, with the same
arguments, from the same library: MKL's ``dgesdd_`` exported by
``libtorch_cpu`` (found as :mod:`torchimize_scipy._blas_threads` finds MKL's
thread setting), ``jobz='S'`` (torch's ``full_matrices=False``), the input
and outputs in column-major order with the leading dimensions torch passes
(``lda = ldu = m``, ``ldvt = min(m, n)``), ``8 min(m, n)`` integers of
``iwork`` and the workspace size LAPACK reports for the shape. The same
routine on the same numbers in the same thread setting gives the same bits
(checked on 27,000 random, scaled and rank-deficient matrices of nine shapes
from ``1 x 1`` to ``100 x 5``, and by ``benchmarks/engine_ab.py``). The input,
outputs and workspace are kept per thread and per shape, the matrices on
64-byte boundaries as torch allocates them (MKL's vectorised kernels may
round by alignment); the results are copies.

Scope: a caller uses it for one float64 problem on the CPU whose matrix
has at most :data:`MAX_ENTRIES` entries, and otherwise (or when torch is not
built with MKL, or whose ``dgesdd_`` does not reproduce torch's SVD of a fixed
matrix at import: :data:`AVAILABLE` False) keeps ``torch.linalg.svd``.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import torch

#: Largest ``m n`` for which :func:`svd` is used (``U^T f`` then stays within torch's
#: own ``bmm`` kernel below 400 multiply-adds, whose order the host reproduces, and the
#: factorisation within LAPACK's unblocked code).
MAX_ENTRIES = 399


def _find_gesdd():
    """MKL's ``dgesdd_`` from torch's library (already loaded), or None."""
    if not torch.backends.mkl.is_available():
        return None
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    if not os.path.exists(path):
        return None
    try:
        fn = ctypes.CDLL(path).dgesdd_
    except (OSError, AttributeError):
        return None
    fn.restype = None
    return fn


_GESDD = _find_gesdd()
#: whether :func:`svd` can run (torch built with MKL, its ``dgesdd_`` found)
AVAILABLE = _GESDD is not None
_LOCAL = threading.local()


def _aligned(shape: tuple[int, int], order: str) -> np.ndarray:
    """A float64 array of ``shape`` whose data starts on a 64-byte boundary."""
    size = shape[0] * shape[1]
    raw = np.empty(size * 8 + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + size * 8].view(np.float64).reshape(shape, order=order)


class _Call:
    """The buffers and the argument list of ``dgesdd_`` for one shape (one thread)."""

    __slots__ = ("a", "s", "u", "vt", "info", "args", "_keep")

    def __init__(self, m: int, n: int) -> None:
        k = min(m, n)
        self.a = _aligned((m, n), "F")
        self.u = _aligned((m, k), "F")
        self.vt = _aligned((k, n), "F")
        self.s = _aligned((1, k), "C")[0]
        iwork = np.empty(8 * k, dtype=np.int32)
        self.info = ctypes.c_int(0)
        ints = [ctypes.c_int(v) for v in (m, n, m, m, k)]
        jobz = ctypes.c_char(b"S")

        def ptr(a: np.ndarray) -> ctypes.c_void_p:
            return ctypes.c_void_p(a.ctypes.data)

        head = [ctypes.byref(jobz), ctypes.byref(ints[0]), ctypes.byref(ints[1]), ptr(self.a),
                ctypes.byref(ints[2]), ptr(self.s), ptr(self.u), ctypes.byref(ints[3]),
                ptr(self.vt), ctypes.byref(ints[4])]
        query = np.empty(1)
        size = ctypes.c_int(-1)  # workspace query: LAPACK writes the size it wants
        _GESDD(*head, ptr(query), ctypes.byref(size), ptr(iwork), ctypes.byref(self.info))
        work = np.empty(max(1, int(query[0])))
        lwork = ctypes.c_int(work.shape[0])
        self.args = (*head, ptr(work), ctypes.byref(lwork), ptr(iwork),
                     ctypes.byref(self.info))
        # (what the pointers point to lives as long as this object)
        self._keep = (work, iwork, ints, jobz, lwork)


def svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``U (m, k)``, ``s (k,)`` and ``Vh (k, n)`` of the finite float64 matrix ``a (m, n)``
    as ``torch.linalg.svd(a, full_matrices=False)`` computes them (the same bits; ``U`` and
    ``Vh`` in column-major order, as torch returns them), or None where LAPACK reports a
    failure (no convergence; torch raises there). Requires :data:`AVAILABLE`."""
    m, n = a.shape
    calls = getattr(_LOCAL, "calls", None)
    if calls is None:
        calls = _LOCAL.calls = {}
    call = calls.get((m, n))
    if call is None:
        call = calls[(m, n)] = _Call(m, n)
    np.copyto(call.a, a)
    _GESDD(*call.args)
    if call.info.value != 0:
        return None
    return call.u.copy(order="F"), call.s.copy(), call.vt.copy(order="F")


def _agrees_with_torch() -> bool:
    """Whether :func:`svd` reproduces ``torch.linalg.svd`` on a fixed matrix, bit for bit.

    A guard run once at import: a torch whose exported ``dgesdd_`` takes other integer
    widths (an ILP64 build) or rounds otherwise than its own SVD is left to
    ``torch.linalg.svd``."""
    a = np.array([[4.0, -2.5, 0.125], [1.0, 3.0, -7.0], [0.5, 0.25, 2.0], [-1.5, 6.0, 1.0]])
    try:
        got = svd(a)
    except Exception:  # noqa: BLE001 - any failure of the foreign call disables it
        return False
    if got is None:
        return False
    u, s, vh = torch.linalg.svd(torch.from_numpy(a), full_matrices=False)
    return all(np.array_equal(x, y.numpy()) for x, y in zip(got, (u, s, vh), strict=True))


AVAILABLE = AVAILABLE and _agrees_with_torch()
