"""Per-pixel CPU cost of one block of ``batch_curve_fit``, as xarray's curvefit runs it.

One block of ``--pixels`` Gaussian peaks (64 bands, the numpy model of
``bench_xarray.py``, MINPACK's forward differences, ``'lm'`` and ``'trf'``) is
fitted in this process, and the process CPU time (``time.process_time``,
which the machine's load changes far less than wall time) is reported per
pixel. With ``--before REV`` the package as of commit ``REV`` is imported
next to the working tree (as ``ab_small.py`` does) and the two are alternated
call by call, so both are measured over the same stretch of time.

``--allocator dask`` runs the measurement in a child process started with the
environment that dask's nanny gives its workers (``MALLOC_TRIM_THRESHOLD_=65536``,
``OMP_NUM_THREADS=1``), which fixes glibc's mmap threshold at 128 KiB; the
child then applies the working tree's automatic worker setting
(``_dask_workers.worker_allocator``, as the first block on a worker does),
unless ``--no-auto`` is given (dask's default as it is). Both trees of an
A/B run share the process, hence its allocator. ``--allocator default``
keeps glibc's defaults (adaptive threshold).

``--chunk-elements 32768 131072 0`` measures the working tree with each value
of ``torchimize_scipy._curve_fit._model.CHUNK_ELEMENTS`` (residuals per call of
``f``; 0 calls ``f`` for all rows at once), alternated round by round.

``--profile`` prints the top of a cProfile of one call of the working tree;
``--torch-profile`` the torch operations of one call by their own CPU time
(``torch.profiler``, with the number of calls and the share of the call's
CPU time that torch's operations take).

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/pixel_cost.py --threads 1 [--before 2e43c09]
        [--pixels 10000] [--rounds 5] [--methods lm trf] [--allocator default|dask]
        [--chunk-elements N ...] [--profile] [--torch-profile]
"""

from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import torch
from _common import PEAK_T, base_parser, md_table, peak_data, write_json
from ab_small import ROOT, import_commit
from scipy.optimize import OptimizeWarning

P0 = (2.0, 0.0, 0.7, 0.0)


def gaussian(w: Any, a: Any, mu: Any, s: Any, c: Any) -> Any:
    z = (w - mu) / s
    return a * np.exp(-0.5 * z * z) + c


def one_block(lib: Any, y: np.ndarray, method: str) -> float:
    """CPU seconds of one ``batch_curve_fit`` call of ``lib`` on the block ``y``."""
    start = np.tile(P0, (y.shape[0], 1))
    bounds = (-np.inf, np.inf) if method == "lm" else (
        np.array([0.0, -3.0, 0.05, -1.0]), np.array([10.0, 3.0, 5.0, 1.0]))
    t = time.process_time()
    lib.batch_curve_fit(gaussian, PEAK_T, y, start, bounds=bounds, method=method)
    return time.process_time() - t


def child_env(allocator: str) -> dict[str, str]:
    env = dict(os.environ)
    if allocator == "dask":  # what distributed's nanny gives every worker
        env.update(MALLOC_TRIM_THRESHOLD_="65536", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def main(argv: list[str]) -> int:
    p = base_parser(__doc__.split("\n", 1)[0])
    p.add_argument("--pixels", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=["lm", "trf"])
    p.add_argument("--before", default=None, help="commit to alternate with the working tree")
    p.add_argument("--allocator", choices=("default", "dask"), default="default")
    p.add_argument("--no-auto", action="store_true",
                   help="(with --allocator dask) do not apply the tree's automatic setting")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--torch-profile", action="store_true")
    p.add_argument("--chunk-elements", type=int, nargs="+", default=None,
                   help="values of _model.CHUNK_ELEMENTS to alternate (0: no grouping)")
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    args = p.parse_args(argv)
    if args.quick:
        args.pixels, args.rounds = 2000, 1
    if args.allocator == "dask" and not args.child:
        cmd = [sys.executable, __file__, *argv, "--child"]
        return subprocess.run(cmd, env=child_env("dask"), check=False).returncode
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", OptimizeWarning)
    import torchimize_scipy as after

    if Path(after.__file__).resolve().parent != ROOT / "torchimize_scipy":
        sys.exit(f"torchimize_scipy comes from {after.__file__}, not this tree: "
                 "run with PYTHONPATH=<repository root>")
    auto = None
    if args.allocator == "dask" and not args.no_auto:
        try:
            from torchimize_scipy._dask_workers import worker_allocator
        except ImportError:
            worker_allocator = None
        if worker_allocator is not None:
            auto = worker_allocator(force=True)
    y, _, _ = peak_data(args.pixels, seed=0)
    results: dict[str, dict[str, list[float]]] = {}
    from torchimize_scipy._curve_fit import _model

    default_chunk = _model.CHUNK_ELEMENTS

    def variant(lib: Any, chunk: int | None) -> Any:
        def call(y: np.ndarray, method: str) -> float:
            _model.CHUNK_ELEMENTS = default_chunk if chunk is None else (chunk or 2**62)
            try:
                return one_block(lib, y, method)
            finally:
                _model.CHUNK_ELEMENTS = default_chunk
        return call

    with tempfile.TemporaryDirectory() as folder:
        libs = {"after": variant(after, None)}
        if args.before:
            libs = {"before": variant(import_commit(args.before, folder), None), **libs}
        if args.chunk_elements:
            libs = {f"chunk {c}": variant(after, c) for c in args.chunk_elements}
        for method in args.methods:
            rec = results.setdefault(method, {k: [] for k in libs})
            for call in libs.values():
                call(y[:200], method)  # warm-up
            for _ in range(args.rounds):
                for k, call in libs.items():
                    rec[k].append(call(y, method))
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                one_block(after, y, method)
                prof.disable()
                print(f"\n--- cProfile, working tree, {method}")
                pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            if args.torch_profile:
                torch_profile(after, y, method)
    rows = []
    for method, rec in results.items():
        med = {k: statistics.median(v) for k, v in rec.items()}
        row = [method, *(f"{1e6 * med[k] / args.pixels:.1f}" for k in rec)]
        if "before" in med and "after" in med:
            row.append(f"{med['before'] / med['after']:.2f}x")
        rows.append(row)
    headers = ["method", *(f"{k}: CPU us/pixel" for k in libs)]
    if "before" in libs:
        headers.append("speed-up")
    note = (f"{args.pixels:,} pixels, median of {args.rounds} rounds, allocator "
            f"{args.allocator}{' (auto setting: ' + str(auto) + ')' if auto is not None else ''}"
            f", load average {os.getloadavg()[0]:.1f}")
    print(f"\n### batch_curve_fit, numpy Gaussian, 64 bands: {note}\n")
    print(md_table(headers, rows))
    path = write_json(args, f"pixel_cost_{args.allocator}", {
        "note": note, "before": args.before, "raw": results})
    print(f"\nresults: {path}")
    return 0


def torch_profile(lib: Any, y: np.ndarray, method: str, top: int = 25) -> None:
    """Print the torch operations of one call by their own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        cpu = one_block(lib, y, method)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"\n--- torch profiler, working tree, {method}: {cpu:.3f} CPU-s in the call "
          f"(profiled), {total:.3f} s in torch operations ({100 * total / cpu:.0f} %)")
    print(f"{'operation':<40} {'calls':>8} {'self CPU s':>11} {'share':>7}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        s = e.self_cpu_time_total / 1e6
        print(f"{e.key[:40]:<40} {e.count:>8} {s:>11.4f} {100 * s / cpu:>6.1f}%")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
