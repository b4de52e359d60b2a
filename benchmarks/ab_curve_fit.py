"""Interleaved A/B of ``curve_fit`` (one problem) and ``batch_curve_fit``: an older commit
against the working tree, in one process.

Part 1, one problem: scipy's ``curve_fit`` documentation example (``a exp(-b
x) + c``, 50 points) with the default 'lm', with 'lm' and an analytic
Jacobian, and bounded ('trf'). The older commit (imported under another
package name, as ``ab_small.py`` does), the working tree and scipy are called
in blocks of ``--block`` fits, the order of the three turning through all six
permutations, ``--rounds`` rounds; reported are the medians of the per-fit
process-CPU and wall times, the ratios to scipy and the median of the
per-round after/before CPU ratios (blocks make a fit of a millisecond long
enough for the process clock; a round's two blocks share the machine's load).

Part 2, many problems (``--batch B``, 0 to skip): ``batch_curve_fit`` on ``B``
Gaussian peaks (``_common.peak_data``, numpy model, '2-point'), 'lm' and
'trf', old and new alternated ``--batch-rounds`` times, with a check that
``popt`` and ``pcov`` are bitwise equal.

Usage (from the repository root, so that the working tree's package is the one
imported)::

    PYTHONPATH=$PWD python benchmarks/ab_curve_fit.py --before bd42b82 --threads 1
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import scipy.optimize
from _common import PEAK_T, base_parser, peak_data, setup
from _small_problems import decay, decay_data
from ab_small import import_commit


def decay_jac(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    e = np.exp(-b * x)
    return np.stack([e, -a * x * e, np.ones_like(x)], axis=1)


def peak(t: np.ndarray, a: Any, mu: Any, s: Any, c: Any) -> Any:
    return a * np.exp(-0.5 * ((t - mu) / s) ** 2) + c


def one_problem_cases(curve_fit: Callable) -> dict[str, Callable[[], Any]]:
    xd, yd = decay_data()
    return {
        "curve_fit exp decay (lm)": lambda: curve_fit(decay, xd, yd),
        "curve_fit exp decay (lm, analytic jac)": lambda: curve_fit(decay, xd, yd,
                                                                    jac=decay_jac),
        "curve_fit exp decay (trf, bounds)": lambda: curve_fit(
            decay, xd, yd, bounds=(0, [3.0, 1.0, 0.5])),
    }


def part_one(before: Any, after: Any, rounds: int, block: int) -> None:
    libs = {"before": one_problem_cases(before.curve_fit),
            "after": one_problem_cases(after.curve_fit),
            "scipy": one_problem_cases(scipy.optimize.curve_fit)}
    orders = list(itertools.permutations(libs))
    for name in libs["after"]:
        cpu: dict[str, list[float]] = {k: [] for k in libs}
        wall: dict[str, list[float]] = {k: [] for k in libs}
        for k in libs:
            for _ in range(3):
                libs[k][name]()  # warm-up
        for i in range(rounds):
            for k in orders[i % len(orders)]:
                fn = libs[k][name]
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(block):
                    fn()
                wall[k].append((time.perf_counter() - t0) / block * 1e3)
                cpu[k].append((time.process_time() - c0) / block * 1e3)
        mc = {k: statistics.median(v) for k, v in cpu.items()}
        mw = {k: statistics.median(v) for k, v in wall.items()}
        per_round = statistics.median(a / b for a, b in zip(cpu["after"], cpu["before"],
                                                            strict=True))
        print(f"{name:40s} CPU ms: before {mc['before']:7.2f} after {mc['after']:7.2f} "
              f"scipy {mc['scipy']:6.3f} | CPU/scipy {mc['before'] / mc['scipy']:5.1f} -> "
              f"{mc['after'] / mc['scipy']:5.1f} | wall/scipy "
              f"{mw['before'] / mw['scipy']:5.1f} -> {mw['after'] / mw['scipy']:5.1f} | "
              f"after/before CPU {per_round:.3f}")


def part_two(before: Any, after: Any, B: int, rounds: int) -> None:
    y, _, p0 = peak_data(B)
    for method in ("lm", "trf"):
        libs = {"before": before.batch_curve_fit, "after": after.batch_curve_fit}
        outs = {k: fn(peak, PEAK_T, y, p0, method=method) for k, fn in libs.items()}
        same = all(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
                   for a, b in zip(outs["before"][:2], outs["after"][:2], strict=True))
        cpu: dict[str, list[float]] = {k: [] for k in libs}
        wall: dict[str, list[float]] = {k: [] for k in libs}
        for i in range(rounds):
            for k in (("before", "after") if i % 2 == 0 else ("after", "before")):
                c0, t0 = time.process_time(), time.perf_counter()
                libs[k](peak, PEAK_T, y, p0, method=method)
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        ratio = statistics.median(a / b for a, b in zip(cpu["after"], cpu["before"],
                                                        strict=True))
        w_before, w_after = statistics.median(wall["before"]), statistics.median(wall["after"])
        print(f"batch_curve_fit {method} B={B}: wall before {w_before:.3f}"
              f" s, after {w_after:.3f} s; after/before CPU "
              f"{ratio:.3f}; popt and pcov bitwise equal: {same}")


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--before", required=True, help="commit of version A (e.g. bd42b82)")
    p.add_argument("--rounds", type=int, default=15, help="rounds of part 1 (default 15)")
    p.add_argument("--block", type=int, default=20, help="fits per block (default 20)")
    p.add_argument("--batch", type=int, default=2000,
                   help="problems of part 2 (default 2000; 0 skips it)")
    p.add_argument("--batch-rounds", type=int, default=6,
                   help="alternations of part 2 (default 6)")
    args = p.parse_args()
    setup(args)
    if args.quick:
        args.rounds, args.block, args.batch, args.batch_rounds = 6, 5, 500, 2
    import torchimize_scipy as after

    with tempfile.TemporaryDirectory() as folder:
        before = import_commit(args.before, folder)
        part_one(before, after, args.rounds, args.block)
        if args.batch:
            part_two(before, after, args.batch, args.batch_rounds)


if __name__ == "__main__":
    main()
