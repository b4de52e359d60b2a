"""cProfile of ``curve_fit`` on one small problem: function calls and the model's pieces.

scipy's ``curve_fit`` documentation example (``a exp(-b x) + c``, 50 points,
default 'lm'), fitted 200 times under :mod:`cProfile` after 20 warm-up fits.
Prints the number of Python function calls per fit (independent of the
machine's load) and, per fit, the calls and cumulative microseconds of the
pieces of :mod:`torchimize_scipy._curve_fit` named in issue 14 (forward
differences, evaluations, covariance) and of the array helpers they used.
Compare two trees by running it in each (profiler times are inflated and move
with the load; the call counts do not)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/profile_curve_fit_one.py
"""

from __future__ import annotations

import cProfile
import pstats

import numpy as np

from torchimize_scipy import curve_fit

#: The functions reported (by name, in torchimize_scipy or the array helpers).
NAMES = ("curve_fit", "fd_jacobian", "_evaluate", "_call", "select", "pivoted_inverse",
         "inverse_from_r", "finish_covariance", "array_namespace", "broadcast_to")


def func(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a * np.exp(-b * x) + c


def main(fits: int = 200) -> None:
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


if __name__ == "__main__":
    main()
