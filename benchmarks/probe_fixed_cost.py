"""One small call's fixed cost and its cost per iteration, against scipy's.

Rosenbrock with the analytic Jacobian, 'trf', 'dogbox' and 'lm', from the
solution ``(1, 1)`` (the call stops at ``x0``: what every call pays) and from
``(2, 2)`` (two or three iterations more). Each is timed in ``--rounds``
alternating blocks of ``--calls`` calls (ours, then scipy's), medians of the
blocks; the ratio is the median of the blocks' ratios.

Usage::

    python benchmarks/probe_fixed_cost.py [--rounds 5] [--calls 300]
"""

from __future__ import annotations

import statistics

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import scipy.optimize
from _common import base_parser, md_table, setup, write_json
from bench_single import median_times

from torchimize_scipy import least_squares


def fun(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def jac(x):
    return np.array([[-20 * x[0], 10.0], [-1.0, 0.0]])


def block(solve, x0, method: str, calls: int) -> float:
    """Median seconds of ``calls`` consecutive calls (``bench_single.median_times``)."""
    return median_times(lambda: solve(fun, x0, jac=jac, method=method), calls, 0.0)[0]


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args()
    setup(args)
    rows = []
    for start in ((1.0, 1.0), (2.0, 2.0)):
        x0 = np.array(start)
        for method in ("trf", "dogbox", "lm"):
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(block(least_squares, x0, method, args.calls))
                theirs.append(block(scipy.optimize.least_squares, x0, method, args.calls))
            nfev = least_squares(fun, x0, jac=jac, method=method).nfev
            rows.append({"x0": list(start), "method": method, "nfev": int(nfev),
                         "us_ours": 1e6 * statistics.median(ours),
                         "us_scipy": 1e6 * statistics.median(theirs),
                         "ratio": statistics.median(a / b for a, b in zip(ours, theirs,
                                                                          strict=True))})
    print(md_table(["x0", "method", "nfev", "ours (us)", "scipy (us)", "ours/scipy"],
                   [[str(tuple(r["x0"])), r["method"], r["nfev"], f"{r['us_ours']:.0f}",
                     f"{r['us_scipy']:.0f}", f"{r['ratio']:.2f}"] for r in rows]))
    print(f"\nresults: {write_json(args, 'probe_fixed_cost', {'rows': rows})}")


if __name__ == "__main__":
    main()
