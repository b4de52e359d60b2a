"""Small problems on an idle and on a busy machine: MKL's thread fan-out (issue 14).

Three small fits with numpy functions -- Rosenbrock from (-1.2, 1) with 'trf'
and 'lm' (analytic Jacobian) and scipy's ``curve_fit`` documentation example
(``a exp(-b x) + c``, 50 points, default 'lm') -- timed for scipy and for ours
in the same run, under three settings of ours:

* ``2 threads, MKL fan-out``: torch's intra-op pool at ``--threads`` (default
  2) with the per-thread serial MKL of ``torchimize_scipy._blas_threads``
  switched off (the behaviour before issue 14);
* ``2 threads``: the same pool, library as shipped (small problems run MKL
  single-threaded in the calling thread);
* ``1 thread``: ``torch.set_num_threads(1)``, the reference.

Each setting runs with the machine as it is ("idle") and with ``--busy`` extra
processes spinning in a busy loop (default: one per CPU), which is what other
jobs on a shared machine do to a parallel region: a worker thread that is not
scheduled keeps the caller waiting at the region's barrier.

Usage::

    python benchmarks/bench_busy.py [--threads 2] [--busy N] [--repeat 21]
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import scipy.optimize
import torch
from _common import base_parser, md_table, setup, write_json
from _small_problems import decay, decay_data, rosenbrock, rosenbrock_jac

import torchimize_scipy._blas_threads as blas_threads
from torchimize_scipy import curve_fit, least_squares


def cases() -> list[tuple[str, Callable[[], Any], Callable[[], Any]]]:
    """(name, ours, scipy) zero-argument calls."""
    xd, yd = decay_data()
    out = []
    for method in ("trf", "lm"):
        out.append((f"Rosenbrock, {method}",
                    lambda m=method: least_squares(rosenbrock, [-1.2, 1.0], jac=rosenbrock_jac,
                                                   method=m),
                    lambda m=method: scipy.optimize.least_squares(
                        rosenbrock, [-1.2, 1.0], jac=rosenbrock_jac, method=m)))
    out.append(("curve_fit exp decay (lm)", lambda: curve_fit(decay, xd, yd),
                lambda: scipy.optimize.curve_fit(decay, xd, yd)))
    return out


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def _spin() -> None:  # pragma: no cover - runs in the busy processes
    while True:
        pass


SETTINGS = (("2 threads, MKL fan-out (before)", False), ("2 threads (now)", True),
            ("1 thread", True))


def run_condition(condition: str, threads: int, repeat: int) -> list[dict[str, Any]]:
    rows = []
    set_local = blas_threads._SET_LOCAL
    for name, ours, ref in cases():
        for label, serial in SETTINGS:
            nthreads = 1 if label == "1 thread" else threads
            torch.set_num_threads(nthreads)
            blas_threads._SET_LOCAL = set_local if serial else None
            try:
                t_ours = median_ms(ours, repeat)
            finally:
                blas_threads._SET_LOCAL = set_local
            t_scipy = median_ms(ref, repeat)
            rows.append({"condition": condition, "problem": name,
                         "setting": label.replace("2 threads", f"{threads} threads"),
                         "ms_ours": t_ours, "ms_scipy": t_scipy, "ratio": t_ours / t_scipy})
            print(f"{condition:5s} {name:26s} {rows[-1]['setting']:34s} ours {t_ours:8.2f} ms "
                  f"scipy {t_scipy:7.3f} ms  ratio {t_ours / t_scipy:7.1f}", flush=True)
    torch.set_num_threads(threads)
    return rows


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--busy", type=int, default=os.cpu_count() or 2,
                   help="busy-loop processes for the 'busy' condition (default: one per CPU)")
    p.add_argument("--repeat", type=int, default=None, help="timed calls (default 21; quick 5)")
    args = p.parse_args()
    setup(args)
    repeat = args.repeat or (5 if args.quick else 21)
    if blas_threads._SET_LOCAL is None:
        print("torch is not built with MKL here: the serial-MKL switch is a no-op.")
    load = os.getloadavg()[0]
    rows = run_condition("idle", args.threads, repeat)
    ctx = multiprocessing.get_context("spawn")
    spinners = [ctx.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for s in spinners:
        s.start()
    try:
        time.sleep(0.5)
        rows += run_condition("busy", args.threads, repeat)
    finally:
        for s in spinners:
            s.terminate()
        for s in spinners:
            s.join()
    print(f"\n### Small problems, idle vs {args.busy} busy-loop processes "
          f"(load average before: {load:.1f})\n")
    print(md_table(["condition", "problem", "ours", "ours (ms)", "scipy (ms)", "ours/scipy"],
                   [[r["condition"], r["problem"], r["setting"], f"{r['ms_ours']:.2f}",
                     f"{r['ms_scipy']:.3f}", f"{r['ratio']:.1f}"] for r in rows]))
    path = write_json(args, "bench_busy", {
        "note": "median wall time per call after one warm-up; numpy functions; 'busy' adds "
                "busy-loop processes", "busy": args.busy, "repeat": repeat,
        "load_average_before": load, "rows": rows})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
