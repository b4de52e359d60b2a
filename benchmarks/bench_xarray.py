"""A synthetic hyperspectral cube: ``torchimize_scipy.xarray.curvefit`` against xarray's.

The cube has ``--ny`` x ``--nx`` pixels and 64 bands, one noisy Gaussian
``a exp(-((w - mu) / s)^2 / 2) + c`` per pixel (the peaks of ``_common.py``),
in dask blocks of ``--block`` rows of pixels. The blocks are generated on the
workers and persisted there before any timing, as a cube read from a store
would be (no data travels through the scheduler). Both functions fit it with
the same numpy model, the same initial guesses and the same default method
('lm', '2-point' Jacobian) on the same ``LocalCluster`` (``--workers``
processes, one thread each), and the coefficients are compared (largest
difference relative to ``1 + |coefficient|``).

xarray calls ``scipy.optimize.curve_fit`` once per pixel (about a millisecond
a pixel), so its share of the cube is the first ``--xarray-rows`` rows; the
speed-up is measured on those rows, with both functions in the same run and
on the same blocks, and our function alone also fits the whole cube.
Besides wall time, the CPU seconds that the workers spent (``process_time``
summed over the workers) are reported: on a shared machine they measure the
cost of each function where wall time mostly measures the machine's load.

``--allocators`` runs the comparison once per setting of the workers' memory
allocator, each on a fresh cluster: ``nanny`` (dask's defaults, as a user's
``Client()`` gets them: the nanny's ``MALLOC_TRIM_THRESHOLD_=65536`` fixes
glibc's mmap threshold at 128 KiB, and our first block on each worker raises
it, ``torchimize_scipy._dask_workers.worker_allocator``), ``nanny-off``
(the same with that automatic setting turned off, ``dask.config``
``torchimize_scipy.worker-allocator: False``: every array above 128 KiB is
mapped anew, what our blocks got before the setting existed) and
``configured`` (:func:`torchimize_scipy.dask.configure_workers` on the running
workers). The automatic setting changes the whole worker process, so in the
``nanny`` run xarray's curvefit runs with it too (it allocates per-pixel
arrays far below the threshold, so it is not measurably affected). The
workers are started with dask's ``OMP_NUM_THREADS=1`` in every setting: this
script imports ``_env`` (which sets the thread variables to ``--threads``) only
as the main program, not when spawn imports it again in each worker (before
2026-11-30 it did, and every worker's torch ran 2 threads: that, not the
allocator, was the gap between ``nanny`` and ``configured``;
``probe_worker_threads.py``). ``--worker-config quiet`` also
turns off what an idle dask worker spends CPU on (its statistical profiler,
its 20 ms event-loop tick and 0.5 s system monitor: about 6 % of a core per
worker, and more of the total when the machine is loaded and wall time
stretches); ``--worker-config quiet-running`` makes the same change on the
running workers, with ``configure_workers(client, quiet=True)`` (allocator
and threads left to the ``--allocators`` setting).

Usage::

    python benchmarks/bench_xarray.py            # 200 x 1,000 pixels (~5 minutes idle)
    python benchmarks/bench_xarray.py --full     # the issue's 1,000 x 1,000 x 64 cube
    python benchmarks/bench_xarray.py [--quick] [--ny 200] [--nx 1000] [--block 10]
           [--xarray-rows 40] [--workers 2] [--allocators nanny,nanny-off,configured]
           [--worker-config default|quiet|quiet-running]
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

if __name__ == "__main__":
    # not in the workers: spawn imports this module there again (as __mp_main__), and
    # _env's thread variables would give each worker's torch that many threads
    import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
from _common import PEAK_M, PEAK_T, base_parser, md_table, peak_data, write_json
from scipy.optimize import OptimizeWarning

import torchimize_scipy

try:
    import dask
    import dask.array as da
    import distributed
    import xarray as xr

    from torchimize_scipy.dask import configure_workers
    from torchimize_scipy.xarray import curvefit
except ImportError as exc:  # pragma: no cover
    raise SystemExit(f"{exc}: pip install 'torchimize-scipy[dask,xarray]'") from exc

P0 = {"a": 2.0, "mu": 0.0, "s": 0.7, "c": 0.0}
#: ``--worker-config quiet``: what an idle worker spends CPU on, turned off or slowed
QUIET_WORKERS = {"distributed.worker.profile.enabled": False,
                 "distributed.admin.tick.interval": "1s",
                 "distributed.admin.system-monitor.interval": "1s"}


def gaussian(w, a, mu, s, c):
    z = (w - mu) / s
    return a * np.exp(-0.5 * z * z) + c


def block_of_peaks(block_id: tuple[int, ...], rows: int, nx: int, seed: int) -> np.ndarray:
    """The peaks of one block of rows (seeded by the block: the same for every run)."""
    y, _, _ = peak_data(rows * nx, seed=seed * 1_000_003 + block_id[0])
    return y.reshape(rows, nx, PEAK_M)


def make_cube(ny: int, nx: int, block: int, seed: int) -> xr.DataArray:
    """A lazy cube whose blocks are generated where they are computed."""
    row_chunks = (block,) * (ny // block) + ((ny % block,) if ny % block else ())

    def generate(block_id: tuple[int, ...] | None = None) -> np.ndarray:
        return block_of_peaks(block_id, row_chunks[block_id[0]], nx, seed)

    data = da.map_blocks(generate, chunks=(row_chunks, (nx,), (PEAK_M,)), dtype=np.float64,
                         meta=np.empty((0, 0, 0)))
    return xr.DataArray(data, dims=("row", "col", "band"), coords={"band": PEAK_T})


def cpu_seconds() -> float:
    """CPU time of this process so far (every thread)."""
    return time.process_time()


def timed_fit(fit, cube: xr.DataArray, client) -> tuple[float, np.ndarray, float]:
    """Wall time, coefficients and the CPU seconds the workers spent (load-independent)."""
    before = sum(client.run(cpu_seconds).values())
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        out = fit(cube).compute()
    wall = time.perf_counter() - t0
    cpu = sum(client.run(cpu_seconds).values()) - before
    return wall, out.curvefit_coefficients.values, cpu


def ours(c: xr.DataArray) -> xr.Dataset:
    return curvefit(c, "band", gaussian, p0=P0)


def theirs(c: xr.DataArray) -> xr.Dataset:
    return c.curvefit("band", gaussian, p0=P0)


def _automatic_allocator_off() -> None:
    """On a worker: keep dask's allocator setting (no ``worker_allocator``)."""
    dask.config.set({"torchimize_scipy.worker-allocator": False})


def compare(args, allocator: str, ny: int, nx: int, rows_x: int) -> dict:
    """One fresh cluster: xarray and ours on the first rows, then ours on the whole cube."""
    # the nanny writes its worker environment into this process's os.environ, and a later
    # cluster would take it from there: every cluster starts from the defaults
    for name in dask.config.get("distributed.nanny.pre-spawn-environ"):
        os.environ.pop(name, None)
    with dask.config.set(QUIET_WORKERS if args.worker_config == "quiet" else {}), \
            distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1,
                                     processes=True, dashboard_address=None,
                                     host="127.0.0.1") as cluster, \
            distributed.Client(cluster) as client:
        if allocator == "configured":
            configure_workers(client)
        elif allocator == "nanny-off":
            client.run(_automatic_allocator_off)
        if args.worker_config == "quiet-running":
            configure_workers(client, mmap_threshold=None, trim_threshold=None,
                              torch_threads=None, quiet=True)
        client.run(__import__, "torchimize_scipy.xarray")
        cube = make_cube(ny, nx, args.block, args.seed).persist()
        distributed.wait(cube.data)
        warm = cube.isel(row=slice(0, args.workers), col=slice(0, 50))
        timed_fit(ours, warm, client)  # first-call costs of fresh processes stay out
        timed_fit(theirs, warm, client)
        sub = cube.isel(row=slice(0, rows_x))
        t_theirs, c_theirs, cpu_theirs = timed_fit(theirs, sub, client)
        t_ours_sub, c_ours, cpu_ours_sub = timed_fit(ours, sub, client)
        t_ours = cpu_ours = None
        if ny > rows_x:
            t_ours, _, cpu_ours = timed_fit(ours, cube, client)
    both = np.isfinite(c_theirs).all(-1) & np.isfinite(c_ours).all(-1)
    diff = np.abs(c_ours - c_theirs)[both] / (1 + np.abs(c_theirs[both]))
    return {"allocator": allocator, "xarray_s": t_theirs, "ours_subset_s": t_ours_sub,
            "ours_cube_s": t_ours, "xarray_cpu_s": cpu_theirs, "ours_subset_cpu_s": cpu_ours_sub,
            "ours_cube_cpu_s": cpu_ours, "speedup_wall": t_theirs / t_ours_sub,
            "speedup_cpu": cpu_theirs / cpu_ours_sub, "both_fitted": int(both.sum()),
            "max_rel_diff": float(diff.max()) if diff.size else None,
            "median_rel_diff": float(np.median(diff)) if diff.size else None}


def main(argv: list[str]) -> int:
    p = base_parser(__doc__.split("\n", 1)[0])
    p.add_argument("--full", action="store_true",
                   help="the issue's cube: 1,000 x 1,000 pixels, blocks of 25 rows, xarray on "
                        "the first 100 rows (pass --xarray-rows 1000 for all of it)")
    p.add_argument("--ny", type=int, default=None, help="rows of pixels (default 200)")
    p.add_argument("--nx", type=int, default=1000)
    p.add_argument("--xarray-rows", type=int, default=None,
                   help="rows of the cube that xarray's curvefit fits too (default 40)")
    p.add_argument("--block", type=int, default=None,
                   help="rows of pixels per dask block (default 10; 25 with --full)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--allocators", default="nanny,nanny-off,configured",
                   help="worker allocator settings to compare, comma-separated: "
                        "nanny, configured")
    p.add_argument("--worker-config", default="default",
                   choices=("default", "quiet", "quiet-running"),
                   help="dask's worker defaults, or its profiler off and 1 s ticks (set "
                        "before the start, or by configure_workers(quiet=True) after it)")
    args = p.parse_args(argv)
    if args.quick:
        ny, nx, rows_x, args.block = 8, 100, 4, 2
    else:
        ny = args.ny or (1000 if args.full else 200)
        nx = args.nx
        rows_x = min(ny, args.xarray_rows or (100 if args.full else 40))
        args.block = args.block or (25 if args.full else 10)
    allocators = args.allocators.split(",")
    if not set(allocators) <= {"nanny", "nanny-off", "configured"}:
        raise SystemExit("--allocators: any of nanny, nanny-off, configured")
    root = str(Path(torchimize_scipy.__file__).resolve().parents[1])
    bench = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join([bench, root, os.environ.get("PYTHONPATH", "")])

    runs = [compare(args, a, ny, nx, rows_x) for a in allocators]
    n_sub, n_all = rows_x * nx, ny * nx
    rows = []
    for r in runs:
        a = r["allocator"]
        rows.append([f"xarray curvefit ({a})", f"{n_sub:,}", f"{r['xarray_s']:.1f}",
                     f"{n_sub / r['xarray_s']:,.0f}", "", f"{r['xarray_cpu_s']:.1f}",
                     f"{n_sub / r['xarray_cpu_s']:,.0f}", ""])
        rows.append([f"torchimize_scipy.xarray.curvefit ({a})", f"{n_sub:,}",
                     f"{r['ours_subset_s']:.1f}", f"{n_sub / r['ours_subset_s']:,.0f}",
                     f"{r['speedup_wall']:.1f}x", f"{r['ours_subset_cpu_s']:.1f}",
                     f"{n_sub / r['ours_subset_cpu_s']:,.0f}", f"{r['speedup_cpu']:.1f}x"])
        if r["ours_cube_s"] is not None:
            rows.append([f"torchimize_scipy.xarray.curvefit, whole cube ({a})", f"{n_all:,}",
                         f"{r['ours_cube_s']:.1f}", f"{n_all / r['ours_cube_s']:,.0f}",
                         f"{(n_all / r['ours_cube_s']) / (n_sub / r['xarray_s']):.1f}x",
                         f"{r['ours_cube_cpu_s']:.1f}", f"{n_all / r['ours_cube_cpu_s']:,.0f}",
                         f"{(n_all / r['ours_cube_cpu_s']) / (n_sub / r['xarray_cpu_s']):.1f}x"])
    print(f"cube {ny} x {nx} x {PEAK_M}, blocks of {args.block} rows ({args.block * nx:,} "
          f"pixels), {args.workers} workers x 1 thread, {args.worker_config} worker config")
    print(md_table(["fit (workers' allocator)", "pixels", "wall (s)", "pixels/s", "speed-up",
                    "worker CPU (s)", "pixels per CPU-s", "speed-up (CPU)"], rows))
    for r in runs:
        print(f"[{r['allocator']}] pixels both fitted: {r['both_fitted']:,} of {n_sub:,}; "
              f"largest coefficient difference {r['max_rel_diff']:.2e} (relative to "
              f"1 + |coef|); median {r['median_rel_diff']:.2e}")
    path = write_json(args, "bench_xarray", {
        "ny": ny, "nx": nx, "bands": PEAK_M, "workers": args.workers, "block_rows": args.block,
        "xarray_rows": rows_x, "worker_config": args.worker_config, "runs": runs})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
