"""Fits from a Zarr store to a Zarr store on a Dask ``LocalCluster``, against one process.

Problems: the Gaussian peaks of ``memory_10m.py`` (n = 4 parameters, m = 64
points, 'lm', torch model with analytic Jacobian, ``return_jac=False``),
``--problems`` of them (default 1,000,000; 10,000,000 with ``--full``)
stored once in a chunked Zarr store under ``--store`` (default
/tmp/torchimize_dask_bench; generated chunk by chunk if missing, never in the
repository): ``y (B, 64)`` and ``p0 (B, 4)`` in chunks of ``--chunk``
problems.

Runs, each reading the store, fitting every problem and writing ``x``,
``cost`` and ``status`` back to a Zarr store:

* in-process: the whole store read into memory, one ``batch_least_squares``
  call, the results written (torch threads = the number of workers);
* distributed: ``batch_least_squares`` on the dask arrays of the store
  (``da.from_zarr``), ``da.to_zarr`` of the lazy results, on a
  ``LocalCluster`` of 1 and of 2 worker processes with one thread each and a
  memory limit of ``--memory-limit`` per worker; each worker's peak resident
  set size (``VmHWM``) is read after the run. Every process fits 256
  problems before the timing starts (imports and first-call costs of a fresh
  process); the cluster's start-up is reported apart.

The overhead of the distributed path is its time over the in-process time
with as many threads as workers. Results of the two paths are compared (they
solve the same problems with the same code: equal to the last bit). The
workers' CPU is split into the fits themselves (the CPU time of the thread
that runs each block task, summed over the blocks) and the rest of the
worker processes (dask's event loop, profiler, monitors, communication, the
Zarr reads and writes): the first against the in-process CPU says whether a
block fits more slowly on a worker, the second what dask's worker adds.

The workers' allocator is set as docs/cluster.md advises
(``distributed.nanny.pre-spawn-environ``: ``MALLOC_TRIM_THRESHOLD_`` and
``MALLOC_MMAP_THRESHOLD_``). ``--worker-config quiet`` also turns off what
an idle dask worker spends CPU on (its statistical profiler, sampling every
10 ms, and the 20 ms event-loop tick and 0.5 s system monitor, set to 1 s),
which costs about 6 % of a core per worker with dask's defaults;
``--worker-config quiet-running`` makes the same change on the running
workers instead, with ``torchimize_scipy.dask.configure_workers(client,
quiet=True)`` (for a cluster that was started with dask's defaults).

Usage::

    python benchmarks/bench_dask.py               # 1,000,000 problems (~5 minutes idle)
    python benchmarks/bench_dask.py --full        # the issue's 10,000,000 problems
    python benchmarks/bench_dask.py [--quick] [--problems 1000000] [--chunk 125000]
           [--workers 1,2] [--memory-limit 3GiB]
           [--worker-config default|quiet|quiet-running]
           [--store /tmp/torchimize_dask_bench]
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # not in the workers: spawn imports this module there again (as __mp_main__), and
    # _env's thread variables would give each worker's torch that many threads
    import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import torch
from _common import base_parser, md_table, peak_data, peak_jac_torch, peak_torch, write_json

import torchimize_scipy
from torchimize_scipy import batch_least_squares

try:
    import dask
    import dask.array as da
    import distributed
    import zarr

    from torchimize_scipy.dask import configure_workers
except ImportError as exc:  # pragma: no cover
    raise SystemExit(f"{exc}: pip install 'torchimize-scipy[dask]'") from exc


def generate(store: Path, B: int, chunk: int) -> None:
    """Write ``y`` and ``p0`` chunk by chunk (chunk ``k`` from seed ``k``)."""
    if (store / "done").exists():
        root = zarr.open_group(str(store), mode="r")
        if root["y"].shape[0] == B and root["y"].chunks[0] == chunk:
            return
    shutil.rmtree(store, ignore_errors=True)
    root = zarr.open_group(str(store), mode="w")
    y = root.create_array("y", shape=(B, 64), chunks=(chunk, 64), dtype="f8")
    p0 = root.create_array("p0", shape=(B, 4), chunks=(chunk, 4), dtype="f8")
    for k, start in enumerate(range(0, B, chunk)):
        stop = min(B, start + chunk)
        yk, _, pk = peak_data(stop - start, seed=k)
        y[start:stop] = yk
        p0[start:stop] = pk
    (store / "done").write_text("ok\n")


def solve_kwargs() -> dict[str, Any]:
    return {"jac": peak_jac_torch, "method": "lm", "return_jac": False, "device": "cpu"}


def in_process(store: Path, out: Path, threads: int) -> tuple[float, dict]:
    """Read everything, one call, write the results."""
    torch.set_num_threads(threads)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    root = zarr.open_group(str(store), mode="r")
    y = torch.from_numpy(root["y"][:])
    p0 = torch.from_numpy(root["p0"][:])
    res = batch_least_squares(peak_torch, p0, args=(y,), **solve_kwargs())
    shutil.rmtree(out, ignore_errors=True)
    g = zarr.open_group(str(out), mode="w")
    chunk = root["y"].chunks[0]
    fields = {}
    for name in ("x", "cost", "status"):
        a = res[name].numpy()
        g.create_array(name, shape=a.shape, chunks=(chunk,) + a.shape[1:], dtype=a.dtype)[:] = a
        fields[name] = a
    fields["cpu_s"] = time.process_time() - cpu0
    return time.perf_counter() - t0, fields


def warm_up() -> None:
    """A small fit, so that first-call costs of a fresh process stay out of the timing."""
    y, _, p0 = peak_data(256, seed=99)
    batch_least_squares(peak_torch, torch.from_numpy(p0), args=(torch.from_numpy(y),),
                        **solve_kwargs())


def worker_peak_rss() -> int:
    """This process's peak resident set size in bytes.

    Linux's ``ru_maxrss`` survives ``fork`` and ``exec``: a worker process
    spawned by a large benchmark process reports that process's peak (seen
    here: the same value to the byte for every worker). ``VmHWM`` in
    ``/proc/self/status`` belongs to the process's own address space and
    starts again at ``exec``; ``ru_maxrss`` is the fallback elsewhere.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_malloc_environ() -> None:
    """Give the workers this process's glibc malloc tunables, not the nanny's default.

    dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in every worker, which
    turns off glibc's adaptive mmap threshold: each large temporary array is
    mapped and unmapped again, and batched fits ran 2.2x slower (5,000 peaks
    through ``batch_curve_fit``: 14.1 s against 6.5 s on this machine). The
    workers get the values of this process instead (the README's tunables when
    set, else glibc's adaptive defaults, approximated by a 1 GiB threshold).
    """
    dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": os.environ.get(k, v)
                     for k, v in (("MALLOC_TRIM_THRESHOLD_", "4294967296"),
                                  ("MALLOC_MMAP_THRESHOLD_", "1073741824"))})


#: ``--worker-config quiet``: what an idle worker spends CPU on, turned off or slowed
QUIET_WORKERS = {"distributed.worker.profile.enabled": False,
                 "distributed.admin.tick.interval": "1s",
                 "distributed.admin.system-monitor.interval": "1s"}


def time_blocks() -> None:
    """On a worker: record the thread CPU time of every block task from now on.

    Wraps ``torchimize_scipy._dask_blocks._run_block``, which the block tasks
    name by reference (they find the wrapper when the worker loads them).
    """
    from torchimize_scipy import _dask_blocks

    run_block = getattr(_dask_blocks._run_block, "__wrapped__", _dask_blocks._run_block)
    log: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return run_block(*args, **kwargs)
        finally:
            log.append(time.thread_time() - start)

    timed.__wrapped__ = run_block  # type: ignore[attr-defined]
    timed.log = log  # type: ignore[attr-defined]
    _dask_blocks._run_block = timed


def block_cpu() -> float:
    """On a worker: the thread CPU seconds of the blocks recorded by :func:`time_blocks`."""
    from torchimize_scipy import _dask_blocks

    return float(sum(getattr(_dask_blocks._run_block, "log", [])))


def on_cluster(store: Path, out: Path, workers: int, memory_limit: str,
               worker_config: str) -> dict[str, Any]:
    """The same fits on a LocalCluster: from_zarr -> batch_least_squares -> to_zarr."""
    # the nanny writes its worker environment into this process's os.environ, and the
    # next cluster would take it from there: every cluster starts from the defaults
    for name in dask.config.get("distributed.nanny.pre-spawn-environ"):
        os.environ.pop(name, None)
    worker_malloc_environ()
    bench = str(Path(__file__).resolve().parent)
    root = str(Path(torchimize_scipy.__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join([bench, root, os.environ.get("PYTHONPATH", "")])
    t_start = time.perf_counter()
    with dask.config.set(QUIET_WORKERS if worker_config == "quiet" else {}), \
            distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  dashboard_address=None, host="127.0.0.1",
                                  memory_limit=memory_limit) as cluster, \
            distributed.Client(cluster) as client:
        client.run(__import__, "torchimize_scipy.dask")  # imports outside the timing
        if worker_config == "quiet-running":
            configure_workers(client, mmap_threshold=None, trim_threshold=None,
                              torch_threads=None, quiet=True)
        client.run(warm_up)
        client.run(time_blocks)
        started = time.perf_counter() - t_start
        cpu0 = sum(client.run(time.process_time).values())
        t0 = time.perf_counter()
        y = da.from_zarr(str(store), component="y")
        p0 = da.from_zarr(str(store), component="p0")
        res = batch_least_squares(peak_torch, p0, args=(y,), **solve_kwargs())
        shutil.rmtree(out, ignore_errors=True)
        writes = [da.to_zarr(res[name], str(out), component=name, compute=False)
                  for name in ("x", "cost", "status")]
        dask.compute(*writes)
        elapsed = time.perf_counter() - t0
        cpu = sum(client.run(time.process_time).values()) - cpu0
        fits = sum(client.run(block_cpu).values())
        peaks = client.run(worker_peak_rss)
    return {"workers": workers, "time_s": elapsed, "worker_cpu_s": cpu, "block_fit_cpu_s": fits,
            "cluster_start_s": started,
            "worker_peak_rss_bytes": sorted(peaks.values())}


def main(argv: list[str]) -> int:
    p = base_parser(__doc__.split("\n", 1)[0])
    p.add_argument("--full", action="store_true",
                   help="the issue's size: 10,000,000 problems in chunks of 250,000")
    p.add_argument("--problems", type=int, default=None, help="default 1,000,000")
    p.add_argument("--chunk", type=int, default=None,
                   help="problems per Zarr chunk (default 125,000; 250,000 with --full)")
    p.add_argument("--worker-config", default="default",
                   choices=("default", "quiet", "quiet-running"),
                   help="dask's worker defaults, or its profiler off and 1 s ticks (set "
                        "before the start, or by configure_workers(quiet=True) after it)")
    p.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    p.add_argument("--memory-limit", default="3GiB", help="memory limit of each worker")
    p.add_argument("--store", type=Path, default=Path("/tmp/torchimize_dask_bench"))
    args = p.parse_args(argv)
    if args.quick:
        B, chunk = 20_000, 5_000
    else:
        B = args.problems or (10_000_000 if args.full else 1_000_000)
        chunk = args.chunk or (250_000 if args.full else 125_000)
    store = args.store / f"peaks_{B}_{chunk}.zarr"
    t0 = time.perf_counter()
    generate(store, B, chunk)
    print(f"store {store}: {B:,} problems in chunks of {chunk:,} "
          f"({time.perf_counter() - t0:.1f} s to open or generate)")

    warm_up()
    counts = [int(w) for w in args.workers.split(",")]
    rows, runs = [], []
    for w in counts:
        t_mem, ref = in_process(store, args.store / "out_inprocess.zarr", threads=w)
        run = on_cluster(store, args.store / "out_cluster.zarr", w, args.memory_limit,
                         args.worker_config)
        got = zarr.open_group(str(args.store / "out_cluster.zarr"), mode="r")
        same = all(np.array_equal(got[k][:], ref[k], equal_nan=True)
                   for k in ("x", "cost", "status"))
        run_cpu = ref.pop("cpu_s")
        run.update(in_process_s=t_mem, in_process_cpu_s=run_cpu,
                   in_process_threads=w, identical_to_in_process=same,
                   overhead=run["time_s"] / t_mem - 1.0,
                   cpu_overhead=run["worker_cpu_s"] / run_cpu - 1.0,
                   fit_cpu_overhead=run["block_fit_cpu_s"] / run_cpu - 1.0,
                   worker_rest_cpu_share=(run["worker_cpu_s"] - run["block_fit_cpu_s"]) / run_cpu,
                   fits_per_s=B / run["time_s"], in_process_fits_per_s=B / t_mem)
        runs.append(run)
        rows.append([w, f"{t_mem:.1f}", f"{B / t_mem:,.0f}", f"{run['time_s']:.1f}",
                     f"{B / run['time_s']:,.0f}", f"{100 * run['overhead']:+.1f} %",
                     f"{run['in_process_cpu_s']:.1f} / {run['worker_cpu_s']:.1f}",
                     f"{100 * run['cpu_overhead']:+.1f} %",
                     f"{run['block_fit_cpu_s']:.1f} ({100 * run['fit_cpu_overhead']:+.1f} %)",
                     f"{100 * run['worker_rest_cpu_share']:.1f} %",
                     f"{run['cluster_start_s']:.1f}",
                     " / ".join(f"{r / 2**30:.2f}" for r in run["worker_peak_rss_bytes"]),
                     "yes" if same else "NO"])
    print(md_table(["workers (= threads in-process)", "in-process (s)", "fits/s",
                    "cluster (s)", "fits/s", "overhead", "CPU s: in-process / workers",
                    "CPU overhead", "of which fits: CPU s (vs in-process)",
                    "rest of the workers (% of in-process CPU)",
                    "cluster start (s)",
                    "worker peak RSS (GiB)", "identical"], rows))
    path = write_json(args, "bench_dask", {"problems": B, "chunk": chunk, "runs": runs,
                                           "memory_limit": args.memory_limit,
                                           "worker_config": args.worker_config})
    print(f"wrote {path}")
    return 0 if all(r["identical_to_in_process"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
