"""Settings of dask workers for batched fits: automatic (:func:`worker_allocator`) and explicit.

dask's nanny starts every worker process with ``MALLOC_TRIM_THRESHOLD_=65536``.
Setting any of glibc's malloc thresholds turns its adaptive mmap threshold
off, so the threshold stays at 128 KiB and every larger array (a block's
tensors are megabytes) is mapped anew and unmapped when freed: each use of
fresh pages is a page fault, and a batched fit spends about half its CPU on
them (``benchmarks/pixel_cost.py --allocator dask``; RESULTS §16, §19).

* :func:`worker_allocator` runs at the start of every block task of
  :mod:`torchimize_scipy.dask` and :mod:`torchimize_scipy.xarray`; once per
  worker process it raises both thresholds with glibc's ``mallopt`` when that
  process was started with ``MALLOC_TRIM_THRESHOLD_`` and without
  ``MALLOC_MMAP_THRESHOLD_`` (dask's default). The dask configuration key
  :data:`AUTO_KEY` set to False turns it off.
* :func:`configure_workers` makes the same change (with thresholds of the
  caller's choice, and torch's thread count) on every running worker of a
  client's cluster, whatever their environment.

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
#: The thresholds set by default (the README's tunables; ``mallopt`` takes an int).
MMAP_THRESHOLD, TRIM_THRESHOLD = 2**30, _INT_MAX
#: dask configuration key: False turns :func:`worker_allocator` off (default True).
AUTO_KEY = "torchimize_scipy.worker-allocator"
#: This process's decision: None until made; then what :func:`worker_allocator` returns.
_AUTO: dict[str, bool | None] = {"applied": None}


def configure_workers(client: Any, *, mmap_threshold: int | None = MMAP_THRESHOLD,
                      trim_threshold: int | None = TRIM_THRESHOLD,
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
    The blocks of :mod:`torchimize_scipy.dask` and
    :mod:`torchimize_scipy.xarray` apply the default thresholds by
    themselves in workers started with dask's default environment (see
    :func:`worker_allocator`); this function is for explicit control: other
    thresholds, workers started otherwise, or the allocator set before the
    first block. Once it has run on a worker, the automatic setting leaves
    that worker alone. Workers started with
    ``distributed.nanny.pre-spawn-environ`` set as in ``docs/cluster.md`` need
    none of this. Process workers started by the nanny already use one torch
    thread (it sets ``OMP_NUM_THREADS=1``).
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
    malloc = _mallopt(mmap_threshold, trim_threshold)
    if malloc and (mmap_threshold is not None or trim_threshold is not None):
        _AUTO["applied"] = False  # the user's thresholds: the automatic setting stays out
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    return {"malloc": malloc, "torch_threads": torch.get_num_threads()}


def worker_allocator(force: bool = False) -> bool:
    """Raise glibc's malloc thresholds once in a dask worker started with dask's default.

    Called at the start of every block task; the first call in a process
    decides, later calls return that decision at once. The thresholds
    (:data:`MMAP_THRESHOLD`, :data:`TRIM_THRESHOLD`, as
    :func:`configure_workers`) are set when all of these hold:

    * the dask configuration value :data:`AUTO_KEY` is not False (read at
      each call until the setting is made, so it can be changed on running
      workers);
    * the call runs in a ``distributed`` worker (not in the caller's own
      process under dask's threaded or synchronous scheduler);
    * the process was *started* with ``MALLOC_TRIM_THRESHOLD_`` (or
      ``GLIBC_TUNABLES`` naming a malloc threshold) and without
      ``MALLOC_MMAP_THRESHOLD_``: glibc then keeps its mmap threshold at 128
      KiB, which is the cost this removes; a process started without them
      has glibc's adaptive threshold, and one started with an mmap threshold
      has the user's choice;
    * the C library is glibc (Linux), and :func:`configure_workers` has not
      set thresholds in this process.

    Parameters
    ----------
    force : bool, optional
        Skip the worker and environment conditions (benchmarks that emulate
        a worker in a plain process); the configuration key still applies.

    Returns
    -------
    bool
        Whether this process's thresholds were set by this function.
    """
    done = _AUTO["applied"]
    if done is not None:
        return done
    if not _auto_enabled():
        return False  # not recorded: the key may be set to True later
    if not force and not (_in_distributed_worker() and _started_with_fixed_threshold()):
        _AUTO["applied"] = False
        return False
    _AUTO["applied"] = _mallopt(MMAP_THRESHOLD, TRIM_THRESHOLD)
    return bool(_AUTO["applied"])


def _auto_enabled() -> bool:
    if "dask" not in sys.modules:
        return True
    import dask

    return dask.config.get(AUTO_KEY, True) is not False


def _in_distributed_worker() -> bool:
    if "distributed" not in sys.modules:
        return False
    from distributed import get_worker

    try:
        get_worker()
    except ValueError:
        return False
    return True


def _start_environment() -> dict[str, str]:
    """The environment this process was started with (Linux), else ``os.environ``.

    glibc reads its malloc variables when the process starts; later changes
    of ``os.environ`` (a ``LocalCluster`` writes its workers' variables into
    the starting process's) do not reach the allocator.
    """
    try:
        with open("/proc/self/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return dict(os.environ)
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _started_with_fixed_threshold() -> bool:
    """glibc's mmap threshold was fixed at start by a malloc variable other than its own."""
    env = _start_environment()
    tunables = env.get("GLIBC_TUNABLES", "")
    if "MALLOC_MMAP_THRESHOLD_" in env or "mmap_threshold" in tunables:
        return False
    return any(k in env for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                                  "MALLOC_MMAP_MAX_")) or any(
        f"malloc.{k}" in tunables for k in ("trim_threshold", "top_pad", "mmap_max"))


def _mallopt(mmap_threshold: int | None, trim_threshold: int | None) -> bool:
    """Set glibc's thresholds (None: leave one); False where the allocator is not glibc's."""
    libc = _glibc()
    if libc is None:
        return False
    return all(libc.mallopt(param, ctypes.c_int(value)) == 1
               for param, value in ((_M_MMAP_THRESHOLD, mmap_threshold),
                                    (_M_TRIM_THRESHOLD, trim_threshold))
               if value is not None)


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
