"""How often one block of xarray-style fits calls the model, against scipy's ``curve_fit``.

One block of ``--pixels`` Gaussian peaks (64 bands, the numpy model and
start of ``bench_xarray.py`` and ``pixel_cost.py``, no ``jac``: MINPACK's
forward differences) is fitted by ``batch_curve_fit`` with 'lm' (no bounds)
and 'trf' (the bounds of ``pixel_cost.py``), with a model that counts the
rows it is called for and the CPU time spent inside it. The first
``--scipy-pixels`` pixels are fitted by ``scipy.optimize.curve_fit`` one by
one with the same counting model. Reported per pixel: the model's rows (one
row is one evaluation of one pixel's 64 points), our summed ``nfev``
(``full_output``: for 'lm' it counts the differences' evaluations, as
``leastsq``; for 'trf' only the residuals', as ``least_squares``), the calls
of the model, the CPU of the whole fit and of
the model alone (``time.process_time``, which load changes less than wall
time). Counts do not depend on the machine's load.

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/pixel_calls.py --threads 1 [--pixels 10000]
        [--scipy-pixels 300]
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import torch
from _common import PEAK_T, base_parser, md_table, peak_data, write_json
from scipy.optimize import OptimizeWarning, curve_fit

from torchimize_scipy import batch_curve_fit

P0 = (2.0, 0.0, 0.7, 0.0)
BOUNDS = {"lm": (-np.inf, np.inf),
          "trf": (np.array([0.0, -3.0, 0.05, -1.0]), np.array([10.0, 3.0, 5.0, 1.0]))}


class CountingModel:
    """The Gaussian of ``bench_xarray.py``, counting its rows, calls and CPU time."""

    def __init__(self) -> None:
        self.rows = self.calls = 0
        self.cpu = 0.0

    def __call__(self, w: Any, a: Any, mu: Any, s: Any, c: Any) -> Any:
        t = time.process_time()
        self.rows += np.shape(a)[0] if np.ndim(a) else 1
        self.calls += 1
        z = (w - mu) / s
        out = a * np.exp(-0.5 * z * z) + c
        self.cpu += time.process_time() - t
        return out


def main(argv: list[str]) -> int:
    p = base_parser(__doc__.split("\n", 1)[0])
    p.add_argument("--pixels", type=int, default=10000)
    p.add_argument("--scipy-pixels", type=int, default=300)
    args = p.parse_args(argv)
    if args.quick:
        args.pixels, args.scipy_pixels = 500, 20
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", OptimizeWarning)
    y, _, _ = peak_data(args.pixels, seed=0)
    start = np.tile(P0, (args.pixels, 1))
    batch_curve_fit(CountingModel(), PEAK_T, y[:100], start[:100])  # first-call costs
    rows, raw = [], {}
    for method, bounds in BOUNDS.items():
        model = CountingModel()
        t = time.process_time()
        _, _, info, _, _ = batch_curve_fit(model, PEAK_T, y, start, bounds=bounds,
                                           method=method, full_output=True)
        cpu = time.process_time() - t
        ours = {"rows_per_pixel": model.rows / args.pixels,
                "nfev_per_pixel": float(np.asarray(info["nfev"]).sum()) / args.pixels,
                "calls": model.calls, "cpu_us_per_pixel": 1e6 * cpu / args.pixels,
                "model_cpu_us_per_pixel": 1e6 * model.cpu / args.pixels}
        k = min(args.scipy_pixels, args.pixels)
        model = CountingModel()
        t = time.process_time()
        for i in range(k):
            curve_fit(model, PEAK_T, y[i], start[i], bounds=bounds, method=method)
        cpu = time.process_time() - t
        theirs = {"rows_per_pixel": model.rows / k, "cpu_us_per_pixel": 1e6 * cpu / k,
                  "model_cpu_us_per_pixel": 1e6 * model.cpu / k}
        raw[method] = {"ours": ours, "scipy": theirs}
        rows.append([method, f"{ours['rows_per_pixel']:.2f}", f"{ours['nfev_per_pixel']:.2f}",
                     f"{theirs['rows_per_pixel']:.2f}", ours["calls"],
                     f"{ours['cpu_us_per_pixel']:.1f}", f"{ours['model_cpu_us_per_pixel']:.1f}",
                     f"{theirs['cpu_us_per_pixel']:.1f}",
                     f"{theirs['model_cpu_us_per_pixel']:.1f}"])
    print(f"\n{args.pixels:,} pixels in one block (scipy: the first "
          f"{min(args.scipy_pixels, args.pixels):,}), {args.threads} thread(s)\n")
    print(md_table(["method", "ours: model rows/pixel", "ours: nfev/pixel",
                    "scipy: model rows/pixel", "ours: model calls", "ours: CPU µs/pixel",
                    "ours: model CPU µs/pixel", "scipy: CPU µs/pixel",
                    "scipy: model CPU µs/pixel"], rows))
    path = write_json(args, "pixel_calls", {"pixels": args.pixels,
                                            "scipy_pixels": args.scipy_pixels, "raw": raw})
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
