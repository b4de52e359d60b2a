"""A synthetic hyperspectral cube: ``torchimize_scipy.xarray.curvefit`` against xarray's.

The cube has ``--ny`` x ``--nx`` pixels and 64 bands, one noisy Gaussian
``a exp(-((w - mu) / s)^2 / 2) + c`` per pixel (the peaks of ``_common.py``),
dask-backed in blocks of ``--block`` rows of pixels. Both functions fit it
with the same numpy model, the same initial guesses and the same default
method ('lm') on the same ``LocalCluster`` (``--workers`` processes, one
thread each), and the coefficients are compared (largest difference
relative to ``1 + |coefficient|``).

xarray calls ``scipy.optimize.curve_fit`` once per pixel (about a thousand
pixels a second per core), so its share of the cube is limited to the first
``--xarray-rows`` rows; the speed-up is measured on those rows, with both
functions in the same run, and our function alone also fits the whole cube.
Besides wall time, the CPU seconds that the workers spent (``process_time``
summed over the workers) are reported: on a shared, overloaded machine they
measure the cost of each function where wall time mostly measures the
machine's load.

Usage::

    python benchmarks/bench_xarray.py [--quick] [--ny 1000] [--nx 1000]
           [--xarray-rows 10] [--block 25] [--workers 2]
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
from _common import PEAK_T, base_parser, md_table, peak_data, write_json
from scipy.optimize import OptimizeWarning

import torchimize_scipy

try:
    import dask
    import distributed
    import xarray as xr

    from torchimize_scipy.xarray import curvefit
except ImportError as exc:  # pragma: no cover
    raise SystemExit(f"{exc}: pip install 'torchimize-scipy[dask,xarray]'") from exc


def gaussian(w, a, mu, s, c):
    z = (w - mu) / s
    return a * np.exp(-0.5 * z * z) + c


def make_cube(ny: int, nx: int, block: int, seed: int) -> xr.DataArray:
    y, _, _ = peak_data(ny * nx, seed=seed)
    data = xr.DataArray(y.reshape(ny, nx, -1), dims=("row", "col", "band"),
                        coords={"band": PEAK_T})
    return data.chunk({"row": block, "col": -1, "band": -1})


P0 = {"a": 2.0, "mu": 0.0, "s": 0.7, "c": 0.0}


def cpu_seconds() -> float:
    """CPU time of this process so far (every thread)."""
    return time.process_time()


def timed_fit(fit, cube: xr.DataArray, client=None) -> tuple[float, np.ndarray, float]:
    """Wall time, coefficients and the CPU seconds the workers spent (load-independent)."""
    before = sum(client.run(cpu_seconds).values()) if client is not None else 0.0
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        out = fit(cube).compute()
    wall = time.perf_counter() - t0
    cpu = sum(client.run(cpu_seconds).values()) - before if client is not None else 0.0
    return wall, out.curvefit_coefficients.values, cpu


def main(argv: list[str]) -> int:
    p = base_parser(__doc__.split("\n", 1)[0])
    p.add_argument("--ny", type=int, default=1000)
    p.add_argument("--nx", type=int, default=1000)
    p.add_argument("--xarray-rows", type=int, default=10,
                   help="rows of the cube that xarray's curvefit fits too")
    p.add_argument("--block", type=int, default=25, help="rows of pixels per dask block")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    ny, nx = (20, 100) if args.quick else (args.ny, args.nx)
    rows_x = min(ny, 4 if args.quick else args.xarray_rows)
    block = min(args.block, rows_x)
    root = str(Path(torchimize_scipy.__file__).resolve().parents[1])
    bench = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join([bench, root, os.environ.get("PYTHONPATH", "")])

    # dask's nanny default MALLOC_TRIM_THRESHOLD_=65536 slows batched fits 2.2x (see
    # bench_dask.worker_malloc_environ); both functions run with the same tunables
    dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": os.environ.get(k, v)
                     for k, v in (("MALLOC_TRIM_THRESHOLD_", "4294967296"),
                                  ("MALLOC_MMAP_THRESHOLD_", "1073741824"))})
    ours = lambda c: curvefit(c, "band", gaussian, p0=P0)  # noqa: E731
    theirs = lambda c: c.curvefit("band", gaussian, p0=P0)  # noqa: E731
    with distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1,
                                  processes=True, dashboard_address=None,
                                  host="127.0.0.1") as cluster, \
            distributed.Client(cluster) as client:
        client.run(__import__, "torchimize_scipy.xarray")
        warm = make_cube(2, 50, 1, seed=99)
        timed_fit(ours, warm)  # first-call costs of fresh processes stay out of the timing
        timed_fit(theirs, warm)
        sub = make_cube(rows_x, nx, block, args.seed)
        t_theirs, c_theirs, cpu_theirs = timed_fit(theirs, sub, client)
        t_ours_sub, c_ours, cpu_ours_sub = timed_fit(ours, sub, client)
        t_ours = cpu_ours = None
        if ny > rows_x:
            t_ours, _, cpu_ours = timed_fit(ours, make_cube(ny, nx, args.block, args.seed),
                                            client)
    both = np.isfinite(c_theirs).all(-1) & np.isfinite(c_ours).all(-1)
    diff = np.abs(c_ours - c_theirs)[both] / (1 + np.abs(c_theirs[both]))
    n_sub = rows_x * nx
    rows = [["xarray curvefit", f"{n_sub:,}", f"{t_theirs:.1f}", f"{n_sub / t_theirs:,.0f}", "",
             f"{cpu_theirs:.1f}", f"{n_sub / cpu_theirs:,.0f}", ""],
            ["torchimize_scipy.xarray.curvefit", f"{n_sub:,}", f"{t_ours_sub:.1f}",
             f"{n_sub / t_ours_sub:,.0f}", f"{t_theirs / t_ours_sub:.1f}x", f"{cpu_ours_sub:.1f}",
             f"{n_sub / cpu_ours_sub:,.0f}", f"{cpu_theirs / cpu_ours_sub:.1f}x"]]
    if t_ours is not None:
        rows.append(["torchimize_scipy.xarray.curvefit, whole cube", f"{ny * nx:,}",
                     f"{t_ours:.1f}", f"{ny * nx / t_ours:,.0f}",
                     f"{(ny * nx / t_ours) / (n_sub / t_theirs):.1f}x", f"{cpu_ours:.1f}",
                     f"{ny * nx / cpu_ours:,.0f}",
                     f"{(ny * nx / cpu_ours) / (n_sub / cpu_theirs):.1f}x"])
    print(md_table(["fit", "pixels", "wall (s)", "pixels/s", "speed-up", "worker CPU (s)",
                    "pixels per CPU-s", "speed-up (CPU)"], rows))
    print(f"pixels both fitted: {both.sum():,} of {n_sub:,}; largest coefficient difference "
          f"{diff.max() if diff.size else float('nan'):.2e} (relative to 1 + |coef|); "
          f"median {np.median(diff) if diff.size else float('nan'):.2e}")
    path = write_json(args, "bench_xarray", {
        "ny": ny, "nx": nx, "bands": len(PEAK_T), "workers": args.workers, "block": block,
        "xarray_rows": rows_x, "xarray_s": t_theirs, "ours_subset_s": t_ours_sub,
        "ours_cube_s": t_ours, "speedup_subset": t_theirs / t_ours_sub,
        "worker_cpu_s": {"xarray": cpu_theirs, "ours_subset": cpu_ours_sub, "ours_cube": cpu_ours},
        "both_fitted": int(both.sum()), "max_rel_diff": float(diff.max()) if diff.size else None,
        "median_rel_diff": float(np.median(diff)) if diff.size else None})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
