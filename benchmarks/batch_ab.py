"""Interleaved A/B of one batch call: an older commit against the working tree.

The Gaussian-peak batch of ``bench_batch.py`` (B problems, 4 parameters, 64
points) fitted by one of three workloads:

* ``least_squares``: ``batch_least_squares`` with one ``--variant`` of
  ``bench_batch.py`` (numpy or torch model, analytic or automatic Jacobian);
* ``curve_fit``: ``batch_curve_fit`` as ``bench_curve_fit.py`` runs it (the
  numpy-style model given ``(b, 1)`` parameter columns, default Jacobian,
  ``pcov``);
* ``xarray``: ``batch_curve_fit`` as ``torchimize_scipy.xarray.curvefit``
  calls it for a block of pixels (the same model, per-pixel ``p0`` and
  bounds ``(-inf, inf)``, ``nan_policy='raise'``); report CPU seconds per
  2,000 fits.

One method, with both versions of the package imported
into one process (``ab_small.import_commit``) and their calls alternated:
A, B, A, B, ... Each call is timed in wall and process-CPU time; the medians
and their ratio come from the same stretch of time, so a drifting load
affects both alike. ``--profile`` adds a cProfile of one call of each
version (the functions whose cumulative times differ most are listed).
``--device-path`` adds a third call, the working tree running the code a GPU
runs on the CPU (per-problem scalars as tensors, ``host_scalars.HOST =
False``), to weigh the host path against the tensor path on large batches.

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/batch_ab.py --before ef58869 \\
        --variant "torch model, analytic jac" --method trf --batch 10000 --repeat 7
    PYTHONPATH=$PWD python benchmarks/batch_ab.py --before 13bfbc6 --workload xarray \\
        --method lm --batch 2000 --repeat 7
"""

from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import torch
from _common import (
    PEAK_T,
    base_parser,
    peak_data,
    peak_jac_np,
    peak_jac_torch,
    peak_np,
    peak_torch,
    setup,
    write_json,
)
from ab_small import import_commit

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = ("numpy model, analytic jac", "numpy model, 2-point", "torch model, autograd",
            "torch model, analytic jac")


def peak_model(x, a, mu, s, c):
    """Gaussian peak, numpy-style (``bench_curve_fit.model``): scalars or ``(b, 1)`` columns."""
    return a * np.exp(-0.5 * ((x - mu) / s) ** 2) + c


def make_call(lib: Any, workload: str, variant: str, p0: np.ndarray, y: np.ndarray,
              method: str, return_jac: bool = True) -> Any:
    """A zero-argument call of ``lib`` for the workload (and variant; ``return_jac``:
    ``batch_least_squares``'s option)."""
    if workload == "curve_fit":
        return lambda: lib.batch_curve_fit(peak_model, PEAK_T, y, p0, method=method)
    if workload == "xarray":
        lower, upper = np.full_like(p0, -np.inf), np.full_like(p0, np.inf)
        return lambda: lib.batch_curve_fit(peak_model, PEAK_T, y, p0, bounds=(lower, upper),
                                           nan_policy="raise", method=method)
    if variant.startswith("numpy"):
        fun: Any = peak_np
        jac: Any = peak_jac_np if variant.endswith("analytic jac") else "2-point"
        x0: Any = p0
        data: Any = y
    else:
        fun = peak_torch
        jac = peak_jac_torch if variant.endswith("analytic jac") else "autograd"
        x0 = torch.as_tensor(p0)
        data = torch.as_tensor(y)

    def call() -> Any:
        return lib.batch_least_squares(fun, x0, jac=jac, method=method, args=(data,),
                                       return_jac=return_jac)

    return call


def _device_path(call: Any) -> Any:
    """``call`` run with the working tree's per-problem scalars as tensors (``HOST = False``)."""
    from torchimize_scipy._engine import host_scalars

    def run() -> Any:
        host_scalars.HOST = False
        try:
            return call()
        finally:
            host_scalars.HOST = None

    return run


def timed(fn: Any) -> tuple[float, float, Any]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def profile_diff(calls: dict[str, Any], top: int) -> None:
    """cProfile one call of each version; print the largest differences of cumulative time."""
    stats = {}
    for k, fn in calls.items():
        prof = cProfile.Profile()
        prof.enable()
        fn()
        prof.disable()
        st = pstats.Stats(prof)
        agg: dict[str, tuple[int, float, float]] = {}
        for (file, _line, func), (_, nc, tt, ct, _) in st.stats.items():  # type: ignore[attr-defined]
            key = f"{Path(file).name}:{func}"
            n0, t0, c0 = agg.get(key, (0, 0.0, 0.0))
            agg[key] = (n0 + nc, t0 + tt, c0 + ct)
        stats[k] = agg
        print(f"\n--- {k}: total {st.total_tt:.3f} s")  # type: ignore[attr-defined]
    a, b = stats["before"], stats["after"]
    keys = set(a) | set(b)
    rows = sorted(keys, key=lambda s: -abs(b.get(s, (0, 0, 0))[1] - a.get(s, (0, 0, 0))[1]))
    print("\nlargest differences of own time (tottime), before -> after (calls):")
    for s in rows[:top]:
        ba, bb = a.get(s, (0, 0.0, 0.0)), b.get(s, (0, 0.0, 0.0))
        print(f"  {s:60s} {ba[1]:8.4f} ({ba[0]:6d}) -> {bb[1]:8.4f} ({bb[0]:6d})")


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--before", required=True, help="commit of version A (e.g. ef58869)")
    p.add_argument("--workload", default="least_squares",
                   choices=("least_squares", "curve_fit", "xarray"))
    p.add_argument("--variant", default="torch model, analytic jac", choices=VARIANTS,
                   help="model and Jacobian of the least_squares workload")
    p.add_argument("--method", default="trf", choices=("trf", "dogbox", "lm"))
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=7, help="calls of each version (default 7)")
    p.add_argument("--profile", action="store_true", help="cProfile one call of each")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--device-path", action="store_true",
                   help="also time the working tree with its per-problem scalars as tensors "
                        "(host_scalars.HOST = False, the code a GPU runs) as 'after-dev'")
    p.add_argument("--no-return-jac", action="store_true",
                   help="least_squares workload: return_jac=False (no Jacobians kept)")
    args = p.parse_args()
    setup(args)
    import torchimize_scipy as after

    if Path(after.__file__).resolve().parent != ROOT / "torchimize_scipy":
        sys.exit(f"torchimize_scipy comes from {after.__file__}, not this tree: "
                 "run with PYTHONPATH=<repository root>")
    y, _, p0 = peak_data(args.batch, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        before = import_commit(args.before, folder)
        calls = {k: make_call(lib, args.workload, args.variant, p0, y, args.method,
                           not args.no_return_jac)
                 for k, lib in (("before", before), ("after", after))}
        if args.device_path:
            calls["after-dev"] = _device_path(calls["after"])
        res = {k: fn() for k, fn in calls.items()}  # warm-up, and the results to compare
        if args.workload == "least_squares":
            same = all(np.array_equal(np.asarray(getattr(res["before"], f)),
                                      np.asarray(getattr(res[k], f)), equal_nan=True)
                       for f in ("x", "cost", "nfev", "status") for k in res)
        else:  # popt, pcov
            same = all(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
                       for k in res for a, b in zip(res["before"], res[k], strict=True))
        samples: dict[str, list[tuple[float, float]]] = {k: [] for k in calls}
        order = list(calls.items())
        for i in range(args.repeat):
            # (the order turns every round: a call right after another pays for the
            # memory that one freed, about 7 % at B = 20,000, 'lm', one code against itself)
            for k, fn in (order if i % 2 == 0 else order[::-1]):
                w, c, _ = timed(fn)
                samples[k].append((w, c))
        med = {k: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v))
               for k, v in samples.items()}
        label = args.variant if args.workload == "least_squares" else args.workload
        print(f"{label}, {args.method}, B = {args.batch}, {args.repeat} alternations, "
              f"load average {os.getloadavg()[0]:.1f}; results bitwise equal: {same}")
        for k in calls:
            print(f"  {k:6s} wall {med[k][0]:.3f} s ({args.batch / med[k][0]:,.0f} fits/s)  "
                  f"CPU {med[k][1]:.3f} s ({2000 * med[k][1] / args.batch:.3f} CPU-s per 2,000 "
                  "fits)   all wall: "
                  + " ".join(f"{s[0]:.3f}" for s in samples[k]))
        for k in calls:
            if k != "before":
                print(f"  {k}/before: wall {med[k][0] / med['before'][0]:.3f}, "
                      f"CPU {med[k][1] / med['before'][1]:.3f}")
        if args.profile:
            profile_diff({k: calls[k] for k in ("before", "after")}, args.top)
    write_json(args, f"batch_ab_{args.workload}_{args.method}_{args.before}", {
        "workload": args.workload, "variant": args.variant, "method": args.method,
        "batch": args.batch,
        "repeat": args.repeat, "equal": same, "samples": samples,
        "median_wall": {k: v[0] for k, v in med.items()},
        "median_cpu": {k: v[1] for k, v in med.items()}})


if __name__ == "__main__":
    main()
