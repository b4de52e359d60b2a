"""Interleaved A/B of 'lm' on small problems: a commit, this tree, this tree with the
host scalars off, and scipy, in one process.

Cases: Rosenbrock (analytic and '2-point' Jacobian), scipy's docs example of
``curve_fit`` (``a exp(-b x) + c``), and a two-exponential ``curve_fit`` from
the symmetric start ``p0 = 1`` (issue 19), whose Jacobian is rank deficient
at the start, so that 'lm' takes MINPACK's pivoted-QR step
(``_engine/minpack_qr.py``). Calls are alternated (before, after, after with
``host_scalars.HOST = False``, scipy) ``--repeat`` times; medians of the
wall time and of the calling thread's CPU time (``time.thread_time``: it
leaves out time spent waiting to be scheduled and the spinning of idle
OpenMP workers, which ``process_time`` counts), and the minimum wall time.

Usage (a few minutes)::

    PYTHONPATH=$PWD python benchmarks/ab_lm.py --before 2e43c09 [--repeat 21] \
        [--threads 2] [--only curve_fit]

The table is printed as markdown; the JSON goes to
``benchmarks/results/ab_lm_<commit>_<device>_<dtype>.json``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import scipy.optimize
from _common import base_parser, md_table, setup, write_json
from _small_problems import decay, decay_data, rosenbrock, rosenbrock_jac
from ab_small import ROOT, import_commit


def biexp(x, a1, k1, a2, k2):
    return a1 * np.exp(-k1 * x) + a2 * np.exp(-k2 * x)


def biexp_jac(x, a1, k1, a2, k2):
    e1, e2 = np.exp(-k1 * x), np.exp(-k2 * x)
    return np.stack([e1, -a1 * x * e1, e2, -a2 * x * e2], -1)


def cases() -> dict[str, Callable[[Any], Any]]:
    xd, yd = decay_data()
    xb = np.linspace(0, 6, 40)
    yb = biexp(xb, 0.5, 0.25, 1.0, 2.0)
    return {
        "Rosenbrock lm analytic": lambda L: L.least_squares(
            rosenbrock, [-1.2, 1.0], jac=rosenbrock_jac, method="lm"),
        "Rosenbrock lm 2-point": lambda L: L.least_squares(rosenbrock, [-1.2, 1.0],
                                                           method="lm"),
        "curve_fit exp decay (lm)": lambda L: L.curve_fit(decay, xd, yd),
        "curve_fit biexp, p0 = 1 (rank-deficient lm)": lambda L: L.curve_fit(
            biexp, xb, yb, jac=biexp_jac),
    }


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--before", required=True, help="commit of version A (e.g. 2e43c09)")
    p.add_argument("--repeat", type=int, default=None, help="calls of each (default 21)")
    p.add_argument("--only", default=None, help="run only the cases containing this text")
    args = p.parse_args()
    setup(args)
    repeat = args.repeat or (5 if args.quick else 21)
    import torchimize_scipy as after
    from torchimize_scipy._engine import host_scalars

    if Path(after.__file__).resolve().parent != ROOT / "torchimize_scipy":
        sys.exit(f"torchimize_scipy comes from {after.__file__}, not this tree: "
                 "run with PYTHONPATH=<repository root>")
    warnings.simplefilter("ignore", RuntimeWarning)  # exp overflow at a trial point
    variants = ("before", "after", "after, host scalars off", "scipy")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        before = import_commit(args.before, folder)
        libs = {"before": (before, None), "after": (after, True),
                "after, host scalars off": (after, False), "scipy": (scipy.optimize, None)}
        for name, fn in cases().items():
            if args.only is not None and args.only not in name:
                continue
            wall: dict[str, list[float]] = {k: [] for k in variants}
            cpu: dict[str, list[float]] = {k: [] for k in variants}
            for k in variants:  # warm-up
                lib, host = libs[k]
                host_scalars.HOST = None if host is not False else False
                fn(lib)
            for _ in range(repeat):
                for k in variants:
                    lib, host = libs[k]
                    host_scalars.HOST = None if host is not False else False
                    c0, t0 = time.thread_time(), time.perf_counter()
                    fn(lib)
                    wall[k].append(time.perf_counter() - t0)
                    cpu[k].append(time.thread_time() - c0)
            host_scalars.HOST = None
            med = {k: statistics.median(wall[k]) for k in variants}
            mcpu = {k: statistics.median(cpu[k]) for k in variants}
            row = {"case": name,
                   **{f"ms_{k}": 1e3 * med[k] for k in variants},
                   **{f"min_ms_{k}": 1e3 * min(wall[k]) for k in variants},
                   **{f"cpu_ms_{k}": 1e3 * mcpu[k] for k in variants}}
            for k in variants[:3]:
                row[f"ratio_{k}"] = med[k] / med["scipy"]
                row[f"cpu_ratio_{k}"] = mcpu[k] / max(mcpu["scipy"], 1e-9)
            row["cpu_after_over_before"] = mcpu["after"] / mcpu["before"]
            rows.append(row)
            off = 1e3 * mcpu["after, host scalars off"]
            print(f"{name:44s} thread CPU ms: before {1e3 * mcpu['before']:7.2f} after "
                  f"{1e3 * mcpu['after']:7.2f} (host off {off:7.2f})"
                  f" scipy {1e3 * mcpu['scipy']:6.3f}", flush=True)
    headers = ["case", "scipy (ms)", "before/scipy", "after/scipy", "CPU before/scipy",
               "CPU after/scipy", "CPU host off/scipy", "CPU after/before"]
    table = [[r["case"], f"{r['ms_scipy']:.3f}", f"{r['ratio_before']:.1f}",
              f"{r['ratio_after']:.1f}", f"{r['cpu_ratio_before']:.1f}",
              f"{r['cpu_ratio_after']:.1f}", f"{r['cpu_ratio_after, host scalars off']:.1f}",
              f"{r['cpu_after_over_before']:.3f}"] for r in rows]
    print()
    print(md_table(headers, table))
    path = write_json(args, f"ab_lm_{args.before}",
                      {"before": args.before, "repeat": repeat, "rows": rows})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
