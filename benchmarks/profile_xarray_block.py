"""Where the CPU of one block of ``torchimize_scipy.xarray.curvefit`` goes, worker by worker.

The same block of ``--pixels`` Gaussian peaks (64 bands, the numpy model and
start of ``bench_xarray.py``) is fitted, in interleaved rounds, along four
paths that add one layer each:

1. ``batch_curve_fit`` in this process (one torch thread);
2. ``torchimize_scipy.xarray.curvefit`` on a numpy-backed DataArray in this
   process (adds our xarray wrapper);
3. ``batch_curve_fit`` submitted to a worker (``client.submit``: adds the
   worker process and its allocator settings);
4. ``curvefit`` on a dask-backed DataArray, one block per worker (adds
   ``apply_ufunc``'s graph, the transfer of the block and of the results).

Every figure is CPU seconds per block (``time.process_time``, summed over
the workers for 3 and 4), which does not depend on the machine's load the way
wall time does. For 3 and 4 the CPU that the fit itself spent in the task's
thread (``time.thread_time`` around the ``batch_curve_fit`` call) and the
CPU that an idle worker spends per second (its event loop, heartbeats and
memory monitor) are reported too, so that the rest is what dask's path adds.

Each configuration of the workers' allocator is a fresh ``LocalCluster``
(``--workers`` processes, one thread each):

* ``nanny``: dask's default, ``MALLOC_TRIM_THRESHOLD_=65536`` in every worker
  (it turns glibc's adaptive mmap threshold off), which our first block on a
  worker corrects (``torchimize_scipy._dask_workers.worker_allocator``; the
  ``client.submit`` path calls ``batch_curve_fit`` directly and so keeps
  dask's setting until a block of the ``curvefit`` graph has run there);
* ``nanny-off``: the same with that automatic setting turned off
  (``torchimize_scipy.worker-allocator: False``), dask's default as it is;
* ``environ``: the nanny given ``MALLOC_TRIM_THRESHOLD_`` and
  ``MALLOC_MMAP_THRESHOLD_`` of ``docs/cluster.md`` before the workers start;
* ``configured``: the nanny's default, then
  :func:`torchimize_scipy.dask.configure_workers` on the running workers;
* ``quiet``: the nanny's default, then ``configure_workers(client,
  mmap_threshold=None, trim_threshold=None, torch_threads=None, quiet=True)``:
  the allocator left to the automatic setting, the workers' statistical
  profiler stopped and their tick and system monitor slowed to 1 s.

Usage::

    python benchmarks/profile_xarray_block.py [--pixels 2000] [--rounds 3]
           [--configs nanny,nanny-off,environ,configured,quiet] [--xarray]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    # not in the workers: spawn imports this module there again (as __mp_main__), and
    # _env's thread variables would give each worker's torch that many threads
    import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import torch
from _common import PEAK_T, base_parser, md_table, peak_data, write_json
from scipy.optimize import OptimizeWarning

import torchimize_scipy
from torchimize_scipy import batch_curve_fit

try:
    import dask
    import distributed
    import xarray as xr

    import torchimize_scipy.dask as tdask
    from torchimize_scipy.xarray import curvefit
except ImportError as exc:  # pragma: no cover
    raise SystemExit(f"{exc}: pip install 'torchimize-scipy[dask,xarray]'") from exc

P0 = {"a": 2.0, "mu": 0.0, "s": 0.7, "c": 0.0}
TUNED = {"MALLOC_TRIM_THRESHOLD_": "4294967296", "MALLOC_MMAP_THRESHOLD_": "1073741824"}


def gaussian(w, a, mu, s, c):
    z = (w - mu) / s
    return a * np.exp(-0.5 * z * z) + c


def cube(pixels: int, blocks: int) -> xr.DataArray:
    y, _, _ = peak_data(pixels * blocks, seed=0)
    return xr.DataArray(y.reshape(blocks, pixels, -1), dims=("row", "col", "band"),
                        coords={"band": PEAK_T})


# --- run on the workers. This script is __main__, so cloudpickle ships these functions by
# value with a copy of their globals: the record lives on the worker's wrapper instead.
def instrument() -> None:
    """Wrap the worker's ``batch_curve_fit`` of the xarray module to record its thread CPU."""
    import torchimize_scipy.xarray as txr

    if hasattr(txr.batch_curve_fit, "cpu"):
        return
    inner = txr.batch_curve_fit

    def timed(*args: Any, **kwargs: Any) -> Any:
        t = time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            timed.cpu.append(time.thread_time() - t)  # type: ignore[attr-defined]

    timed.cpu = []  # type: ignore[attr-defined]
    txr.batch_curve_fit = timed


def fit_cpu() -> float:
    """CPU of the fits recorded since the last call (seconds), then reset."""
    import torchimize_scipy.xarray as txr

    record = txr.batch_curve_fit.cpu
    total = sum(record)
    record.clear()
    return total


def submitted_fit(y: np.ndarray) -> float:
    """``batch_curve_fit`` on a worker; returns its thread CPU."""
    start = np.tile([P0[k] for k in ("a", "mu", "s", "c")], (y.shape[0], 1))
    t = time.thread_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        batch_curve_fit(gaussian, PEAK_T, y, start)
    return time.thread_time() - t


def automatic_allocator_off() -> None:
    """On a worker: keep dask's allocator setting (no ``worker_allocator``)."""
    dask.config.set({"torchimize_scipy.worker-allocator": False})


def environ() -> tuple[str | None, str | None, int]:
    return (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            torch.get_num_threads())


# --- measurements
def plain(y: np.ndarray) -> float:
    start = np.tile([P0[k] for k in ("a", "mu", "s", "c")], (y.shape[0], 1))
    t = time.process_time()
    batch_curve_fit(gaussian, PEAK_T, y, start)
    return time.process_time() - t


def plain_curvefit(data: xr.DataArray) -> float:
    t = time.process_time()
    curvefit(data, "band", gaussian, p0=P0).compute()
    return time.process_time() - t


def worker_cpu(client: distributed.Client) -> float:
    return sum(client.run(time.process_time).values())


def on_workers(client: distributed.Client, job) -> tuple[float, float]:
    """(worker CPU over the job, wall time of the job)."""
    c0, t0 = worker_cpu(client), time.perf_counter()
    job()
    return worker_cpu(client) - c0, time.perf_counter() - t0


def measure_cluster(config: str, args, data: xr.DataArray, results: dict) -> None:
    workers = args.workers
    settings = ({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in TUNED.items()}
                if config == "environ" else {})
    # the nanny writes its environment into this process's os.environ (and prefers that
    # to the config when the next cluster starts): each cluster starts from a clean one
    for name in dask.config.get("distributed.nanny.pre-spawn-environ"):
        os.environ.pop(name, None)
    for name in TUNED:
        os.environ.pop(name, None)
    with dask.config.set(settings), \
            distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                     dashboard_address=None, host="127.0.0.1") as cluster, \
            distributed.Client(cluster) as client:
        if config == "configured":
            tdask.configure_workers(client)
        elif config == "quiet":
            tdask.configure_workers(client, mmap_threshold=None, trim_threshold=None,
                                    torch_threads=None, quiet=True)
        elif config == "nanny-off":
            client.run(automatic_allocator_off)
        client.run(instrument)
        env = client.run(environ)
        print(f"[{config}] workers' (MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_, "
              f"torch threads): {sorted(set(env.values()))}", flush=True)
        lazy = data.chunk({"row": 1})
        first = data.isel(row=slice(0, workers))
        curvefit(first.isel(col=slice(0, 50)).chunk({"row": 1}), "band", gaussian,
                 p0=P0).compute()  # imports and first calls out of the timing
        client.run(fit_cpu)
        ys = [client.scatter(first.values[i], workers=[w])
              for i, w in enumerate(sorted(client.nthreads()))]
        rec = results.setdefault(config, {k: [] for k in (
            "idle_cpu_per_s", "submit_cpu", "submit_fit_cpu", "submit_wall", "graph_cpu",
            "graph_fit_cpu", "graph_wall", "xarray_cpu")})
        for _ in range(args.rounds):
            cpu, wall = on_workers(client, lambda: time.sleep(1.0))
            idle = cpu / wall / workers
            rec["idle_cpu_per_s"].append(idle)
            fits: list[float] = []

            def submit(fits: list[float] = fits) -> None:
                fits.extend(client.gather([client.submit(submitted_fit, y, pure=False)
                                           for y in ys]))

            cpu, wall = on_workers(client, submit)
            rec["submit_cpu"].append(cpu / workers)
            rec["submit_fit_cpu"].append(sum(fits) / workers)
            rec["submit_wall"].append(wall)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                cpu, wall = on_workers(client, lambda: curvefit(
                    lazy.isel(row=slice(0, workers)), "band", gaussian, p0=P0).compute())
            rec["graph_cpu"].append(cpu / workers)
            rec["graph_wall"].append(wall)
            rec["graph_fit_cpu"].append(sum(client.run(fit_cpu).values()) / workers)
            if args.xarray:
                cpu, _ = on_workers(client, lambda: lazy.isel(row=slice(0, workers)).curvefit(
                    "band", gaussian, p0=P0).compute())
                rec["xarray_cpu"].append(cpu / workers)


def main(argv: list[str]) -> int:
    p = base_parser(__doc__.split("\n", 1)[0])
    p.add_argument("--pixels", type=int, default=2000, help="pixels per block")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--configs", default="nanny,nanny-off,environ,configured")
    p.add_argument("--xarray", action="store_true",
                   help="also fit each block with xarray's curvefit (about 1 ms a pixel)")
    args = p.parse_args(argv)
    if args.quick:
        args.pixels, args.rounds = 500, 1
    torch.set_num_threads(1)
    root = str(Path(torchimize_scipy.__file__).resolve().parents[1])
    bench = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join([bench, root, os.environ.get("PYTHONPATH", "")])
    warnings.simplefilter("ignore", OptimizeWarning)
    data = cube(args.pixels, args.workers)
    y0 = data.values[0]
    plain(y0[:50])
    results: dict[str, Any] = {"plain": [], "plain_curvefit": []}
    for config in args.configs.split(","):
        for _ in range(args.rounds):  # in-process rounds interleaved with the clusters
            results["plain"].append(plain(y0))
            results["plain_curvefit"].append(plain_curvefit(data.isel(row=slice(0, 1))))
        measure_cluster(config, args, data, results)

    med = {k: statistics.median(v) for k, v in results.items() if isinstance(v, list)}
    rows = [["batch_curve_fit in this process", "", f"{med['plain']:.3f}", "", ""],
            ["curvefit, numpy DataArray, in this process", "", f"{med['plain_curvefit']:.3f}",
             "", ""]]
    summary: dict[str, Any] = {"plain_cpu_s": med["plain"],
                               "plain_curvefit_cpu_s": med["plain_curvefit"]}
    for config in args.configs.split(","):
        m = {k: statistics.median(v) if v else float("nan")
             for k, v in results[config].items()}
        idle_block = m["idle_cpu_per_s"] * m["graph_wall"]
        idle_submit = m["idle_cpu_per_s"] * m["submit_wall"]
        rows.append([f"batch_curve_fit, client.submit ({config})", f"{m['idle_cpu_per_s']:.3f}",
                     f"{m['submit_cpu']:.3f}", f"{m['submit_fit_cpu']:.3f}",
                     f"{m['submit_cpu'] - m['submit_fit_cpu'] - idle_submit:.3f}"])
        rows.append([f"curvefit graph, one block per worker ({config})", "",
                     f"{m['graph_cpu']:.3f}", f"{m['graph_fit_cpu']:.3f}",
                     f"{m['graph_cpu'] - m['graph_fit_cpu'] - idle_block:.3f}"])
        if args.xarray:
            rows.append([f"xarray's curvefit, same block ({config})", "",
                         f"{m['xarray_cpu']:.3f}", "", ""])
        summary[config] = m
    print(f"\nCPU seconds per block of {args.pixels:,} pixels (median of {args.rounds} "
          "rounds; worker figures per worker)")
    print(md_table(["path", "idle worker CPU per s", "CPU per block", "of which the fit "
                    "(task thread)", "rest, less idle CPU"], rows))
    path = write_json(args, "profile_xarray_block", {"pixels": args.pixels,
                                                     "rounds": args.rounds,
                                                     "workers": args.workers,
                                                     "median": summary, "raw": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
