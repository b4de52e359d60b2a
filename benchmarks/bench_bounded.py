"""Bounded batches: ``batch_least_squares`` with box constraints vs a scipy loop.

The Gaussian-peak problems of ``_common.peak_data`` with bounds that are active
for part of the batch: amplitude in [0, 2.2], centre in [-0.8, 0.8], width in
[0.45, 5], offset free (the truth is drawn from wider ranges, so some fits end
on a bound). Methods 'trf' and 'dogbox', analytic Jacobian (numpy), against a
loop of ``scipy.optimize.least_squares`` with the same method on the first
``--scipy-subset`` problems, extrapolated.

Usage::

    python benchmarks/bench_bounded.py [--quick] [--threads 2] [--B 20000]
"""

from __future__ import annotations

import time

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
from _common import (
    base_parser,
    compare_costs,
    environment,
    md_table,
    peak_1d,
    peak_data,
    peak_jac_1d,
    peak_jac_np,
    peak_np,
    scipy_loop,
    setup,
    write_json,
)

from torchimize_scipy import batch_least_squares

LB = np.array([0.0, -0.8, 0.45, -np.inf])
UB = np.array([2.2, 0.8, 5.0, np.inf])


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--B", type=int, default=20_000)
    p.add_argument("--scipy-subset", type=int, default=1_000)
    args = p.parse_args()
    setup(args)
    B = 2_000 if args.quick else args.B
    sub = min(B, 200 if args.quick else args.scipy_subset)
    y, _, p0 = peak_data(B, seed=args.seed)
    p0 = np.clip(p0, LB + 1e-3, np.minimum(UB - 1e-3, 1e9))
    rows, figures = [], []
    for method in ("trf", "dogbox"):
        batch_least_squares(peak_np, p0[:64], jac=peak_jac_np, bounds=(LB, UB), method=method,
                            args=(y[:64],))  # warm-up
        t0 = time.perf_counter()
        res = batch_least_squares(peak_np, p0, jac=peak_jac_np, bounds=(LB, UB), method=method,
                                  args=(y,))
        t_batch = time.perf_counter() - t0
        ref = scipy_loop(peak_1d, peak_jac_1d, p0[:sub], y[:sub], method, bounds=(LB, UB))
        t_scipy = ref["seconds"] * B / sub
        agree = compare_costs(np.asarray(res.cost[:sub]), ref["cost"])
        active = float(np.mean(np.any(np.asarray(res.active_mask) != 0, axis=1)))
        rows.append([method, f"{B / t_batch:,.0f}", f"{B / t_scipy:,.0f}",
                     f"{t_scipy / t_batch:.1f}x", f"{100 * agree['reached']:.1f}%",
                     f"{100 * active:.0f}%"])
        figures.append({"method": method, "B": B, "batch_s": t_batch,
                        "scipy_s_extrapolated": t_scipy, "scipy_subset": sub,
                        "speedup": t_scipy / t_batch, **agree, "share_with_active_bound": active})
    print(f"{B} bounded Gaussian-peak fits (n=4, m=64, analytic Jacobian); scipy loop timed on "
          f"{sub} problems and extrapolated\n")
    print(md_table(["method", "ours fits/s", "scipy fits/s", "speed-up",
                    "cost equal or lower (1e-6)", "fits with an active bound"], rows))
    write_json(args, "bench_bounded", {"env": environment(args), "results": figures})


if __name__ == "__main__":
    main()
