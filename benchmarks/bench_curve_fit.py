"""``batch_curve_fit`` on 20,000 datasets vs a loop of ``scipy.optimize.curve_fit``.

Each dataset is a noisy Gaussian peak on 64 points (4 parameters, see
``_common.peak_data``); the model is written once, numpy-style,
``a * exp(-0.5 * ((x - mu) / s)**2) + c``, and ``batch_curve_fit`` hands it each
parameter as a ``(b, 1)`` column so the same code broadcasts over the batch.
For each method ('lm', 'trf') the batch call is timed on all datasets (median
of ``--repeat`` runs after a warm-up call, as ``bench_batch.py`` does) and the
scipy loop on the first ``--scipy-subset`` (default 1,000), extrapolated to B.
``popt`` and ``pcov`` are compared with scipy's on that subset.

A second run (``--B-cov`` datasets, default 2,000; scipy loop on 200) gives
each dataset its own 64 x 64 error covariance matrix (2-D ``sigma``):
independent noise with a per-point scale plus an exponentially correlated
component.

Usage::

    python benchmarks/bench_curve_fit.py [--quick] [--threads 2] [--B 20000]
           [--B-cov 2000] [--repeat 3]
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import scipy.optimize
from _common import (
    PEAK_T,
    base_parser,
    environment,
    md_table,
    median_time,
    peak_data,
    setup,
    write_json,
)

from torchimize_scipy import batch_curve_fit


def model(x, a, mu, s, c):
    """Gaussian peak; works for scalars (scipy) and ``(b, 1)`` columns (batch)."""
    return a * np.exp(-0.5 * ((x - mu) / s) ** 2) + c


def compare(label: str, B: int, sub: int, y: np.ndarray, p0: np.ndarray, sigma: Any,
            sigma_row: Callable[[int], Any], repeat: int) -> tuple[list, list]:
    """Time ``batch_curve_fit`` on all datasets and a scipy loop on ``sub``, per method."""
    rows, figures = [], []
    for method in ("lm", "trf"):
        t_batch, (popt, pcov) = median_time(
            lambda method=method: batch_curve_fit(model, PEAK_T, y, p0, sigma=sigma,
                                                  method=method),
            repeat=repeat)
        ref_popt = np.empty((sub, 4))
        ref_pcov = np.empty((sub, 4, 4))
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(sub):
                ref_popt[i], ref_pcov[i] = scipy.optimize.curve_fit(
                    model, PEAK_T, y[i], p0=p0[i], sigma=sigma_row(i), method=method)
        t_scipy = (time.perf_counter() - t0) * B / sub
        dp = np.abs(popt[:sub] - ref_popt) / (1 + np.abs(ref_popt))
        dc = np.abs(pcov[:sub] - ref_pcov) / (np.abs(ref_pcov).max(axis=(1, 2))[:, None, None])
        share = float(np.mean(dp.max(axis=1) < 1e-6))
        rows.append([label, method, f"{B:,}", f"{B / t_batch:,.0f}", f"{B / t_scipy:,.0f}",
                     f"{t_scipy / t_batch:.1f}x", f"{100 * share:.1f}%",
                     f"{np.median(dc.max(axis=(1, 2))):.1e}"])
        figures.append({"sigma": label, "method": method, "B": B, "batch_s": t_batch,
                        "scipy_s_extrapolated": t_scipy, "scipy_subset": sub,
                        "speedup": t_scipy / t_batch, "popt_match_share": share})
    return rows, figures


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--B", type=int, default=20_000)
    p.add_argument("--B-cov", type=int, default=2_000,
                   help="datasets of the run with a full covariance matrix per dataset")
    p.add_argument("--scipy-subset", type=int, default=1_000)
    p.add_argument("--repeat", type=int, default=None,
                   help="timed batch calls per method (default 3, 1 with --quick)")
    args = p.parse_args()
    setup(args)
    repeat = args.repeat or (1 if args.quick else 3)
    B = 2_000 if args.quick else args.B
    sub = min(B, 200 if args.quick else args.scipy_subset)
    y, _, p0 = peak_data(B, seed=args.seed)
    rows, figures = compare("none", B, sub, y, p0, None, lambda i: None, repeat)

    # one covariance matrix per dataset (2-D sigma): independent noise of
    # per-point scale plus a correlated component
    Bc = 500 if args.quick else args.B_cov
    subc = min(Bc, 100 if args.quick else 200)
    rng = np.random.default_rng(args.seed + 1)
    scale = 0.05 + 0.1 * rng.random((Bc, PEAK_T.size))
    corr = 0.002 * np.exp(-np.abs(PEAK_T[:, None] - PEAK_T[None, :]))
    cov = scale[:, :, None] ** 2 * np.eye(PEAK_T.size) + corr
    r2, f2 = compare("2-D (per dataset)", Bc, subc, y[:Bc], p0[:Bc], cov, lambda i: cov[i],
                     repeat)
    rows += r2
    figures += f2

    print(f"batch_curve_fit on Gaussian-peak datasets (4 parameters, 64 points); scipy loop "
          f"timed on {sub} datasets ({subc} with 2-D sigma) and extrapolated\n")
    print(md_table(["sigma", "method", "datasets", "ours fits/s", "scipy fits/s", "speed-up",
                    "popt equal (1e-6)", "median rel. pcov diff"], rows))
    write_json(args, "bench_curve_fit", {"env": environment(args), "results": figures})


if __name__ == "__main__":
    main()
