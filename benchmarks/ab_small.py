"""Interleaved A/B timing of small problems: an older commit against the working tree.

On a shared machine whose load drifts by the second, two benchmark runs minutes
apart are not comparable. This script imports both versions into one process
(the older commit is extracted with ``git archive`` into a temporary folder
and imported under another package name; the package uses relative imports
only) and alternates them call by call. The order of the three calls turns every round through all
six permutations (A B scipy, A scipy B, B A scipy, ...), so that each version
runs equally often first, second and third and after each of the others: a
call right after another pays for what that one left behind (freed memory,
cold caches), which biased a fixed order by 4-8 % in a same-code A/B
(``batch_ab.py``). Every call is timed in wall and process-CPU time; the
medians and the ratios to scipy come from the same stretch of time. A
same-code run (``--before HEAD``, with a clean tree) shows the remaining
noise: its before/after ratios should straddle 1.

Cases (numpy functions, as ``bench_single.py`` part 1): Rosenbrock from
(-1.2, 1) with 'trf', 'dogbox', 'lm', analytic and '2-point'; Broyden
tridiagonal (n = 9) 'trf'; the soft_l1 exponential fit 'trf'; bounded
Rosenbrock 'trf'; scipy's ``curve_fit`` documentation example (default 'lm').
``--set single``: instead, the 16 'trf' and 'dogbox' cases of ``bench_single.py``
part 1 (its starts: Rosenbrock from (2, 2)).

Usage (from the repository root, so that the working tree's package is the
one imported)::

    PYTHONPATH=$PWD python benchmarks/ab_small.py --before ef58869 [--repeat 41]
"""

from __future__ import annotations

import importlib
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import scipy.optimize
from _common import base_parser, md_table, setup, write_json
from _small_problems import decay, decay_data, rosenbrock, rosenbrock_jac
from bench_single import (
    broyden,
    broyden_jac,
    exp_fit,
    exp_fit_data,
    exp_fit_jac,
    small_problems,
)

ROOT = Path(__file__).resolve().parent.parent


def import_commit(commit: str, folder: str) -> Any:
    """The package as of ``commit``, imported as ``torchimize_scipy_<commit>``."""
    name = f"torchimize_scipy_{commit}"
    target = Path(folder) / name
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "torchimize_scipy"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target), "--strip-components=1"], input=archive,
                   check=True)
    sys.path.insert(0, folder)
    return importlib.import_module(name)


def cases(lib: Any) -> dict[str, Callable[[], Any]]:
    """name -> zero-argument call with ``lib`` (a package module, or ``scipy.optimize``)."""
    ls = lib.least_squares
    t, y = exp_fit_data(0)
    xd, yd = decay_data()
    out: dict[str, Callable[[], Any]] = {}
    for method in ("trf", "dogbox", "lm"):
        for jac_name, jac in (("analytic", rosenbrock_jac), ("2-point", "2-point")):
            out[f"Rosenbrock {method} {jac_name}"] = (
                lambda m=method, j=jac: ls(rosenbrock, [-1.2, 1.0], jac=j, method=m))
    out["Broyden n=9 trf analytic"] = lambda: ls(broyden, -np.ones(9), jac=broyden_jac)
    out["exp fit soft_l1 trf analytic"] = lambda: ls(exp_fit, np.ones(3), jac=exp_fit_jac,
                                                     loss="soft_l1", f_scale=0.1, args=(t, y))
    out["bounded Rosenbrock trf analytic"] = lambda: ls(
        rosenbrock, [2.0, 2.0], jac=rosenbrock_jac, bounds=([-np.inf, 1.5], np.inf))
    out["curve_fit exp decay (lm)"] = lambda: lib.curve_fit(decay, xd, yd)
    return out


def single_cases(lib: Any) -> dict[str, Callable[[], Any]]:
    """``--set single``: the 'trf' and 'dogbox' cases of ``bench_single.py`` part 1 (its
    problems and starts: Rosenbrock from (2, 2), Broyden, the soft_l1 fit, bounded
    Rosenbrock; analytic and '2-point'), the cases issue 14's <= 3x target names."""
    out: dict[str, Callable[[], Any]] = {}
    for prob in small_problems(0):
        for method in ("trf", "dogbox"):
            for jac_name, jac in (("analytic", prob.jac), ("2-point", "2-point")):
                out[f"{prob.name.split(' (')[0]} {method} {jac_name}"] = (
                    lambda p=prob, m=method, j=jac: lib.least_squares(
                        p.fun, p.x0, jac=j, method=m, **p.options))
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--before", required=True, help="commit of version A (e.g. ef58869)")
    p.add_argument("--repeat", type=int, default=None, help="calls of each (default 41)")
    p.add_argument("--set", default="issue", choices=("issue", "single"),
                   help="cases: 'issue' (issue 14's starts) or 'single' (bench_single.py's "
                        "trf/dogbox cases)")
    p.add_argument("--only", default=None,
                   help="run only the cases whose name contains this text (e.g. curve_fit)")
    args = p.parse_args()
    setup(args)
    repeat = args.repeat or (5 if args.quick else 41)
    import torchimize_scipy as after

    if Path(after.__file__).resolve().parent != ROOT / "torchimize_scipy":
        sys.exit(f"torchimize_scipy comes from {after.__file__}, not this tree: "
                 "run with PYTHONPATH=<repository root>")
    with tempfile.TemporaryDirectory() as folder:
        before = import_commit(args.before, folder)
        make = cases if args.set == "issue" else single_cases
        libs = {"before": make(before), "after": make(after),
                "scipy": make(scipy.optimize)}
        rows = []
        for name in libs["after"]:
            if args.only is not None and args.only not in name:
                continue
            samples: dict[str, list[tuple[float, float]]] = {k: [] for k in libs}
            for k in libs:
                libs[k][name]()  # warm-up
            orders = list(itertools.permutations(libs))
            for i in range(repeat):
                for k in orders[i % len(orders)]:
                    samples[k].append(timed(libs[k][name]))
            med = {k: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v))
                   for k, v in samples.items()}
            row = {"case": name, **{f"ms_{k}": 1e3 * v[0] for k, v in med.items()},
                   **{f"cpu_ms_{k}": 1e3 * v[1] for k, v in med.items()}}
            for k in ("before", "after"):
                row[f"ratio_{k}"] = med[k][0] / med["scipy"][0]
                row[f"cpu_ratio_{k}"] = med[k][1] / max(med["scipy"][1], 1e-9)
            row["after_over_before"] = med["after"][0] / med["before"][0]
            row["cpu_after_over_before"] = med["after"][1] / max(med["before"][1], 1e-9)
            rows.append(row)
            print(f"{name:34s} before {row['ms_before']:8.2f} after {row['ms_after']:8.2f} "
                  f"scipy {row['ms_scipy']:7.3f} ms | ratio {row['ratio_before']:6.1f} -> "
                  f"{row['ratio_after']:6.1f} | CPU ratio {row['cpu_ratio_before']:6.1f} -> "
                  f"{row['cpu_ratio_after']:6.1f} | after/before {row['after_over_before']:.3f} "
                  f"(CPU {row['cpu_after_over_before']:.3f})", flush=True)
    print(f"\n### Interleaved A/B: {args.before} vs working tree, {args.threads} threads "
          f"(load average {os.getloadavg()[0]:.1f})\n")
    print(md_table(["case", "scipy (ms)", "before (ms)", "after (ms)", "before/scipy",
                    "after/scipy", "CPU before/scipy", "CPU after/scipy", "after/before"],
                   [[r["case"], f"{r['ms_scipy']:.3f}", f"{r['ms_before']:.2f}",
                     f"{r['ms_after']:.2f}", f"{r['ratio_before']:.1f}",
                     f"{r['ratio_after']:.1f}", f"{r['cpu_ratio_before']:.1f}",
                     f"{r['cpu_ratio_after']:.1f}", f"{r['after_over_before']:.3f}"]
                    for r in rows]))
    suffix = "" if args.set == "issue" else f"_{args.set}"
    path = write_json(args, f"ab_small_{args.before}{suffix}", {
        "note": ("interleaved calls, the order turning through all permutations; medians "
                 "of wall and process-CPU time"),
        "before": args.before, "set": args.set, "repeat": repeat, "rows": rows})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
