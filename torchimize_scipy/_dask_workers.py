"""Settings of dask workers for batched fits: automatic (:func:`prepare_worker`) and explicit.

Two settings of a worker process decide how fast a block of batched fits runs
there (RESULTS §16, §19-§21; docs/cluster.md):

* **glibc's malloc thresholds.** dask's nanny starts every worker process
  with ``MALLOC_TRIM_THRESHOLD_=65536``. Setting any of glibc's malloc
  thresholds turns its adaptive mmap threshold off, so the threshold stays at
  128 KiB and every larger array (a block's tensors are megabytes) is mapped
  anew and unmapped when freed: each use of fresh pages is a page fault, and
  a batched fit spends about half its CPU on them
  (``benchmarks/pixel_cost.py --allocator dask``).
* **torch's intra-op threads.** The nanny starts workers with
  ``OMP_NUM_THREADS=1``: one torch thread per dask thread. But a worker
  process started by ``multiprocessing``'s *spawn* (the nanny's way) first
  imports the caller's main module again, as ``__mp_main__``; a script that
  sets ``OMP_NUM_THREADS`` (or calls ``torch.set_num_threads``) at import, and
  imports torch, thus gives every worker its own thread count, before the
  nanny's environment is restored. On a 2-core machine 2 workers with 2
  torch threads each spent 4x the CPU per pixel (OpenMP's threads spin at
  their barriers while the other worker's compete for the cores): this was
  ``benchmarks/bench_xarray.py``'s "default workers" (its ``_env`` import set
  ``OMP_NUM_THREADS=2`` in the workers), not dask's defaults
  (``benchmarks/probe_worker_threads.py``).

:func:`prepare_worker` runs at the start of every block task of
:mod:`torchimize_scipy.dask` and :mod:`torchimize_scipy.xarray`:

* :func:`worker_allocator`: once per worker process, raise both malloc
  thresholds with glibc's ``mallopt`` when that process was started with
  ``MALLOC_TRIM_THRESHOLD_`` and without ``MALLOC_MMAP_THRESHOLD_`` (dask's
  default). The dask configuration key :data:`AUTO_KEY` set to False turns
  it off.
* :func:`worker_threads`: in a worker process started with
  ``OMP_NUM_THREADS=k`` (the nanny's ``k = 1``), lower torch's intra-op
  thread count of the block's thread to ``k`` when it is higher. The key
  :data:`THREADS_KEY` set to False turns it off.

:func:`configure_workers` makes the allocator change (with thresholds of the
caller's choice) and sets torch's thread count on every running worker of a
client's cluster, whatever their environment; the automatic settings then
leave what it set alone.

glibc's allocator is changed with ``mallopt`` (the run-time form of the
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` environment variables),
torch's intra-op threads with ``torch.set_num_threads``.
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
#: dask configuration key: False turns :func:`worker_threads` off (default True).
THREADS_KEY = "torchimize_scipy.worker-threads"
#: This process's decisions, None until made: ``applied`` what :func:`worker_allocator`
#: returns; ``threads`` the count of :func:`worker_threads` (0: leave torch's alone),
#: ``exact`` whether it is :func:`configure_workers`' count (else an upper bound).
_AUTO: dict[str, Any] = {"applied": None, "threads": None, "exact": False}


def configure_workers(client: Any, *, mmap_threshold: int | None = MMAP_THRESHOLD,
                      trim_threshold: int | None = TRIM_THRESHOLD,
                      torch_threads: int | None = 1,
                      quiet: bool = False) -> dict[str, dict[str, Any]]:
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
    quiet : bool, optional
        Also cut what each worker spends CPU on besides its tasks (default
        False: dask's settings kept): stop its statistical profiler (a
        sample of the computing threads' stacks every 10 ms, what the
        dashboard's profile pages show; they stay empty from then on) and
        slow its event-loop tick (20 ms) and system monitor (0.5 s) to
        :data:`QUIET_INTERVAL_S`. These cost a worker about 5 % of a core
        for as long as it runs, busy or idle (``docs/cluster.md``); the
        same as the dask configuration of ``docs/cluster.md`` set before
        the cluster starts, for workers already running.

    Returns
    -------
    dict
        For each worker address: ``{"malloc": bool, "torch_threads": int}``,
        ``malloc`` False where the allocator is not glibc's (macOS, musl,
        Windows), which is then left as it is; with ``quiet``, also
        ``"quiet": bool`` (False where the worker had none of those
        callbacks to change).

    Raises
    ------
    ValueError
        If a threshold is not None or an integer in ``[0, 2**31 - 1]``,
        ``torch_threads`` is not None or a positive integer, or ``quiet``
        is not a bool.

    Notes
    -----
    The blocks of :mod:`torchimize_scipy.dask` and
    :mod:`torchimize_scipy.xarray` apply the default thresholds by
    themselves in workers started with dask's default environment, and keep
    torch's threads at most at the worker's start ``OMP_NUM_THREADS`` (see
    :func:`prepare_worker`); this function is for explicit control: other
    thresholds or thread counts, workers started otherwise, or the allocator
    set before the first block. Once it has run on a worker, the automatic
    settings leave what it set alone, and each block sets ``torch_threads``
    in the thread that runs it (torch's count is per thread, and this
    function runs in the worker's event loop). Workers started with
    ``distributed.nanny.pre-spawn-environ`` set as in ``docs/cluster.md`` need
    none of this.
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if value is not None and (not isinstance(value, (int, np.integer))
                                  or isinstance(value, bool) or not 0 <= value <= _INT_MAX):
            raise ValueError(f"`{name}` must be None or an integer in [0, 2**31 - 1].")
    if torch_threads is not None and (not isinstance(torch_threads, (int, np.integer))
                                      or isinstance(torch_threads, bool) or torch_threads < 1):
        raise ValueError("`torch_threads` must be None or a positive integer.")
    if not isinstance(quiet, (bool, np.bool_)):
        raise ValueError("`quiet` must be True or False.")
    done = client.run(_configure_worker,
                      None if mmap_threshold is None else int(mmap_threshold),
                      None if trim_threshold is None else int(trim_threshold),
                      None if torch_threads is None else int(torch_threads))
    if quiet:
        for address, changed in client.run(_quiet_worker).items():
            done[address]["quiet"] = changed
    return done


#: ``configure_workers(quiet=True)``: the period (seconds) of a worker's event-loop tick
#: and system monitor (dask's defaults: 0.02 s and 0.5 s).
QUIET_INTERVAL_S = 1.0


def _quiet_worker(dask_worker: Any) -> bool:
    """Run on one worker by :func:`configure_workers` (in its event loop, as ``client.run`` does).

    Stops the statistical profiler's periodic callbacks and slows the tick
    and the system monitor, as ``distributed.worker.profile.enabled: False``
    and 1 s for ``distributed.admin.tick.interval`` and
    ``distributed.admin.system-monitor.interval`` would at the worker's start.
    """
    callbacks = getattr(dask_worker, "periodic_callbacks", {})
    changed = False
    for name in ("profile", "profile-cycle"):
        pc = callbacks.get(name)
        if pc is not None and pc.is_running():
            pc.stop()
            changed = True
    period_ms = 1000 * QUIET_INTERVAL_S
    for name in ("tick", "monitor"):
        pc = callbacks.get(name)
        if pc is not None and pc.callback_time < period_ms:
            pc.callback_time = period_ms  # tornado reads it when scheduling the next call
            changed = True
    if hasattr(dask_worker, "_tick_interval"):  # what the tick's own bookkeeping expects
        dask_worker._tick_interval = max(dask_worker._tick_interval, QUIET_INTERVAL_S)
    return changed


def _configure_worker(mmap_threshold: int | None, trim_threshold: int | None,
                      torch_threads: int | None) -> dict[str, Any]:
    """Run on one worker by :func:`configure_workers`."""
    malloc = _mallopt(mmap_threshold, trim_threshold)
    if malloc and (mmap_threshold is not None or trim_threshold is not None):
        _AUTO["applied"] = False  # the user's thresholds: the automatic setting stays out
    if torch_threads is not None:
        # torch's count is per thread: this sets the event loop's thread and threads that
        # start computing later; the blocks set it in executor threads that already have
        torch.set_num_threads(torch_threads)
        _AUTO["threads"], _AUTO["exact"] = torch_threads, True
    return {"malloc": malloc, "torch_threads": torch.get_num_threads()}


def prepare_worker() -> None:
    """At the start of every block task: the automatic settings of a dask worker.

    :func:`worker_allocator` (glibc's thresholds, once per process) and
    :func:`worker_threads` (torch's thread count of the calling thread); both
    do nothing outside a ``distributed`` worker and cost a few microseconds
    after their first call.
    """
    worker_allocator()
    worker_threads()


def worker_threads(force: bool = False) -> int | None:
    """Keep torch's intra-op threads in a dask worker at the count the worker was started with.

    dask's nanny starts worker processes with ``OMP_NUM_THREADS=1`` so that
    each dask thread computes with one thread; a caller's main module, which
    *spawn* imports again in every worker before the nanny's environment is
    restored, can raise torch's count there (see the module docstring). The
    first call in a process decides the cap: the ``OMP_NUM_THREADS`` of the
    environment the process was *started* with (its first number), when all
    of these hold:

    * the dask configuration value :data:`THREADS_KEY` is not False (read at
      each call until the decision is made);
    * the call runs in a ``distributed`` worker (not in the caller's own
      process under dask's threaded or synchronous scheduler);
    * that start environment has a positive ``OMP_NUM_THREADS``, and
      :func:`configure_workers` has not set torch's threads in this process.

    Every call then lowers the calling thread's count to the cap when it is
    above it (torch's count is per thread: ``torch.set_num_threads`` sets
    OpenMP's and MKL's counts of the calling thread, and the default of
    threads that start computing later). A count at or below the cap is left
    as it is. After :func:`configure_workers` with ``torch_threads=k``, every
    call sets the calling thread's count to ``k`` instead (that function runs
    in the worker's event loop, which does not reach executor threads that
    have computed before).

    Parameters
    ----------
    force : bool, optional
        Skip the worker condition (benchmarks that emulate a worker in a plain
        process); the configuration key still applies.

    Returns
    -------
    int or None
        The cap, or None where there is none.
    """
    cap = _AUTO["threads"]
    if cap is None:
        if not _auto_enabled(THREADS_KEY):
            return None  # not recorded: the key may be set to True later
        cap = _start_thread_count() if force or _in_distributed_worker() else None
        cap = _AUTO["threads"] = cap or 0
    if cap:
        count = torch.get_num_threads()
        if count > cap or (_AUTO["exact"] and count != cap):
            torch.set_num_threads(cap)
    return cap or None


def _start_thread_count() -> int | None:
    """``OMP_NUM_THREADS`` of the environment this process was started with, if positive."""
    value = _start_environment().get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        count = int(value)
    except ValueError:
        return None
    return count if count > 0 else None


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
    if not _auto_enabled(AUTO_KEY):
        return False  # not recorded: the key may be set to True later
    if not force and not (_in_distributed_worker() and _started_with_fixed_threshold()):
        _AUTO["applied"] = False
        return False
    _AUTO["applied"] = _mallopt(MMAP_THRESHOLD, TRIM_THRESHOLD)
    return bool(_AUTO["applied"])


def _auto_enabled(key: str) -> bool:
    if "dask" not in sys.modules:
        return True
    import dask

    return dask.config.get(key, True) is not False


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
