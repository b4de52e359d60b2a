"""Settings of running dask workers for batched fits (:func:`configure_workers`).

glibc's allocator is changed with ``mallopt`` (the run-time form of the
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` environment variables),
torch's intra-op threads with ``torch.set_num_threads``; see docs/cluster.md.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

import numpy as np
import torch

# ---------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------
#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_INT_MAX = 2**31 - 1


def configure_workers(client: Any, *, mmap_threshold: int | None = 2**30,
                      trim_threshold: int | None = _INT_MAX,
                      torch_threads: int | None = 1) -> dict[str, dict[str, Any]]:
    """Set the memory allocator and torch's threads of a cluster's running workers for fits.

    dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``,
    which turns glibc's adaptive mmap threshold off: every array above 128
    KiB (a block of 2,000 problems of 64 points is 1 MiB) is then mapped and
    unmapped again, and a batched fit spends about half its CPU in page
    faults (``benchmarks/profile_xarray_block.py``). This function changes
    the allocator of the workers that are running, with ``mallopt``, as
    ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` would at their
    start, and sets the number of torch threads. It is the user's choice: it
    makes the workers keep freed memory up to ``trim_threshold`` instead of
    returning it to the system at once (dask's reason for its default).

    Parameters
    ----------
    client : distributed.Client
        A client of the cluster; every worker it knows now is configured
        (workers that join later are not).
    mmap_threshold : int or None, optional
        Bytes above which glibc maps an allocation on its own (default 1 GiB,
        the README's setting); None leaves it unchanged.
    trim_threshold : int or None, optional
        Bytes of free memory at the top of the heap above which glibc returns
        it to the system (default 2**31 - 1); None leaves it unchanged.
    torch_threads : int or None, optional
        ``torch.set_num_threads`` on each worker (default 1: a worker runs
        one block per dask thread, so that it computes with as many threads
        as dask gives it); None leaves it unchanged.

    Returns
    -------
    dict
        For each worker address: ``{"malloc": bool, "torch_threads": int}``,
        ``malloc`` False where the allocator is not glibc's (macOS, musl,
        Windows), which is then left as it is.

    Raises
    ------
    ValueError
        If a threshold is not None or an integer in ``[0, 2**31 - 1]``, or
        ``torch_threads`` is not None or a positive integer.

    Notes
    -----
    Workers started with ``distributed.nanny.pre-spawn-environ`` set as in
    ``docs/cluster.md`` need none of this; this function is for clusters
    that are already running. Process workers started by the nanny already
    use one torch thread (it sets ``OMP_NUM_THREADS=1``).
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if value is not None and (not isinstance(value, (int, np.integer))
                                  or isinstance(value, bool) or not 0 <= value <= _INT_MAX):
            raise ValueError(f"`{name}` must be None or an integer in [0, 2**31 - 1].")
    if torch_threads is not None and (not isinstance(torch_threads, (int, np.integer))
                                      or isinstance(torch_threads, bool) or torch_threads < 1):
        raise ValueError("`torch_threads` must be None or a positive integer.")
    return client.run(_configure_worker, None if mmap_threshold is None else int(mmap_threshold),
                      None if trim_threshold is None else int(trim_threshold),
                      None if torch_threads is None else int(torch_threads))


def _configure_worker(mmap_threshold: int | None, trim_threshold: int | None,
                      torch_threads: int | None) -> dict[str, Any]:
    """Run on one worker by :func:`configure_workers`."""
    malloc = False
    libc = _glibc()
    if libc is not None:
        malloc = all(libc.mallopt(param, ctypes.c_int(value)) == 1
                     for param, value in ((_M_MMAP_THRESHOLD, mmap_threshold),
                                          (_M_TRIM_THRESHOLD, trim_threshold))
                     if value is not None)
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    return {"malloc": malloc, "torch_threads": torch.get_num_threads()}


def _glibc() -> Any:
    """This process's C library if it is glibc (it has ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") else None
    except (ValueError, OSError, AttributeError):
        return None
