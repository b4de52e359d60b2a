"""cProfile of one 'lm' problem (Rosenbrock from (-1.2, 1), analytic Jacobian) per call.

Prints Python function calls per solve and per evaluation (load-independent
counts) and the top functions by own time::

    python benchmarks/profile_lm_one.py [--calls 50] [--top 25] [--method lm]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torchimize_scipy as ts  # noqa: E402


def rosen(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def rosen_jac(x):
    return np.array([[-20 * x[0], 10.0], [-1.0, 0.0]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--method", default="lm")
    args = ap.parse_args()
    x0 = np.array([-1.2, 1.0])
    for _ in range(5):
        res = ts.least_squares(rosen, x0, jac=rosen_jac, method=args.method)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        ts.least_squares(rosen, x0, jac=rosen_jac, method=args.method)
    prof.disable()
    stats = pstats.Stats(prof)
    per_solve = stats.total_calls / args.calls
    print(f"nfev {res.nfev}, njev {res.njev}: {per_solve:.0f} Python calls per solve, "
          f"{per_solve / res.nfev:.0f} per evaluation")
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
