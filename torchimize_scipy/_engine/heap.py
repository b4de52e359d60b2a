"""Freed memory kept in the C library's heap while a large CPU batch runs.

A batch round allocates and frees tensors of many megabytes: the user's
residuals and Jacobian (a ``(B, m, n)`` block of 16 MiB at 8,192 peaks of
64 x 4), their products, the rows gathered by a compaction. glibc's
``malloc`` serves blocks above its mmap threshold by ``mmap`` and gives
them back by ``munmap``, and trims the top of its heap beyond its trim
threshold (both adapt, up to 32 MiB and 64 MiB): each new block then costs a
page fault and the kernel's zeroing per 4 KiB page, round after round. At
20,000 Gaussian peaks ('lm', analytic Jacobian, one thread, calls 2-6 of a
process) that was 41,000-42,000 faults and 0.10-0.11 s of system time per call
of 0.61-0.62 s of CPU time; with both thresholds raised for the run,
20,000-30,000 faults and 0.57-0.59 s (two alternated processes each; issue 14).
The faults left are those of the result buffers, of what the driver allocates
before the run, and of the heap's growth in a run's first rounds.

:func:`keep_freed_memory` raises both thresholds (``mallopt``) for a run whose
working set is at least :data:`MIN_BYTES`, on the CPU, where the process's C
library is glibc. When the last such run ends (runs may overlap in threads)
it sets them to the ceilings of glibc's own adaptation (:data:`AFTER_MMAP`,
:data:`AFTER_TRIM`: where a process that freed blocks of 32 MiB stands), so
the heap keeps at most about that much freed memory at its top afterwards
(handing all of it back with ``malloc_trim`` made the next call fault more
than before: 47,000-48,000). One lasting effect: glibc no longer adapts its
thresholds after the first such run (``mallopt`` turns that off). Set
:data:`ENABLED` to False to leave ``malloc`` alone. Values are unaffected:
torch aligns its blocks to 64 bytes wherever they come from.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from collections.abc import Iterator

import torch

#: Whether large CPU runs keep their freed memory in the heap.
ENABLED = True
#: Working set (bytes of one ``(B, m, n)`` Jacobian block) from which a run does.
MIN_BYTES = 8 << 20
#: mmap and trim thresholds during such a run.
RUN_THRESHOLD = 1 << 30
#: glibc's ceilings of its adaptive mmap and trim thresholds, set after the last run.
AFTER_MMAP = 32 << 20
AFTER_TRIM = 64 << 20
#: ``mallopt`` parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_active = 0
_libc: object | None = None  # the C library once looked up; False where not glibc


def _glibc():
    """The process's glibc (its ``mallopt``), or False."""
    global _libc
    if _libc is None:
        lib = False
        if sys.platform.startswith("linux"):
            try:
                found = ctypes.CDLL(None)
                if all(hasattr(found, name)
                       for name in ("gnu_get_libc_version", "mallopt")):
                    lib = found
            except OSError:
                pass
        _libc = lib
    return _libc


@contextlib.contextmanager
def keep_freed_memory(device: torch.device, nbytes: int) -> Iterator[None]:
    """Keep freed blocks in the heap while the block runs (see the module docstring):
    a run on ``device`` whose working set is ``nbytes``; nothing off the CPU, below
    :data:`MIN_BYTES`, without glibc or with :data:`ENABLED` False."""
    global _active
    lib = (_glibc() if ENABLED and device.type == "cpu" and nbytes >= MIN_BYTES
           else False)
    if not lib:
        yield
        return
    with _lock:
        if _active == 0:
            lib.mallopt(M_MMAP_THRESHOLD, RUN_THRESHOLD)
            lib.mallopt(M_TRIM_THRESHOLD, RUN_THRESHOLD)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                lib.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP)
                lib.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM)
