"""cProfile of ``curve_fit`` on one small problem: Python calls per fit and where the time goes.

scipy's ``curve_fit`` documentation example (``a exp(-b x) + c``, 50 points,
default 'lm'), fitted ``--fits`` times (default 200) under :mod:`cProfile`
after 20 warm-up fits. Prints the number of Python function calls per fit
(independent of the machine's load), then, per fit, the calls and cumulative
microseconds of the pieces of :mod:`torchimize_scipy._curve_fit` named in
issue 14 (forward differences, evaluations, the book, covariance) and, with
``--top N``, the ``N`` functions with the most own time (``--sort own``) or
cumulative time (``--sort cumulative``). Profiler times are inflated and move
with the load; the call counts do not. Compare two trees by running it in
each::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/profile_curve_fit_one.py [--top 30]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import numpy as np

from torchimize_scipy import curve_fit

#: The functions reported (by name, in torchimize_scipy or the array helpers).
NAMES = ("curve_fit", "_fit_lm", "residuals", "fd_jacobian", "_evaluate", "_call", "select",
         "record_call", "_record_call_one", "record_jac", "value_at", "minpack_qr_outputs",
         "pivoted_inverse", "inverse_from_r", "finish_covariance", "array_namespace",
         "broadcast_to")


def func(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a * np.exp(-b * x) + c


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fits", type=int, default=200, help="profiled fits (default 200)")
    p.add_argument("--top", type=int, default=0,
                   help="also list the N functions with the most time (default 0: none)")
    p.add_argument("--sort", choices=("own", "cumulative"), default="own",
                   help="order of --top: own time (default) or cumulative time")
    args = p.parse_args()
    fits = args.fits
    xdata = np.linspace(0, 4, 50)
    ydata = func(xdata, 2.5, 1.3, 0.5) + 0.2 * np.random.default_rng(0).normal(size=50)
    for _ in range(20):
        curve_fit(func, xdata, ydata)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(fits):
        curve_fit(func, xdata, ydata)
    prof.disable()
    stats = pstats.Stats(prof)
    print(f"Python function calls per curve_fit: {stats.total_calls / fits:.0f}")  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])  # type: ignore[attr-defined]
    for (path, _, name), (_, ncalls, _, cum, _) in rows:
        if name in NAMES and ("torchimize" in path or "array_api" in path or "stride" in path):
            where = path.split("/")[-1]
            print(f"{name:18s} {where:24s} calls/fit {ncalls / fits:5.1f}   "
                  f"cumulative us/fit {cum / fits * 1e6:9.1f}")
    if args.top:
        key = 2 if args.sort == "own" else 3
        print(f"\nTop {args.top} by {args.sort} time (us per fit, calls per fit):")
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][key])  # type: ignore[attr-defined]
        for (path, line, name), (_, ncalls, own, cum, _) in rows[:args.top]:
            where = "/".join(path.split("/")[-2:]) if path != "~" else "(builtin)"
            print(f"{own / fits * 1e6:9.1f} own {cum / fits * 1e6:9.1f} cum "
                  f"{ncalls / fits:7.1f} calls  {where}:{line}({name})")


if __name__ == "__main__":
    main()
