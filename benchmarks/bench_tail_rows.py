"""A/B of the tail's two switches on the slow problems of ``bench_tail.py`` (issue 14).

The ``--rows`` problems of ``bench_tail.py``'s batch (``--B`` datasets) that
take the most evaluations are solved as a batch of their own with
``max_nfev = --max-nfev`` (so that every iteration runs with many of them
live: 27 down to about 12 rows by default, the range where the full batch
spends most of its iterations), alternating in one process:

* ``gram_rows``: the damped Gram solves of the trust-region subproblem on the
  Gram rows alone (``trust_region._GramRows``) against every row;
* ``tail_hold``: the one-thread hold from ``loop.TAIL_ENTRIES`` against
  torch's grain size (only rows above the grain size differ; use
  ``--rows 60`` to see it).

Process CPU time and wall time, median of ``--repeat`` alternations each;
the costs must be identical (the switches change no result).

Usage::

    PYTHONPATH=$PWD python benchmarks/bench_tail_rows.py [--rows 27] [--repeat 6] [--method trf]
"""

from __future__ import annotations

import statistics
import time

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import bench_tail as bt
import numpy as np
from _common import base_parser, setup

import torchimize_scipy._driver as driver
from torchimize_scipy import _blas_threads, batch_least_squares
from torchimize_scipy._engine import loop, trust_region

_RUN = driver.run


def _run_all_admitted(problem, rule, start, out, on_finish=None, on_iteration=None,
                      refill=None, capacity=None):
    """The engine's loop told at once that nothing is left to admit (one block)."""
    if refill is not None and refill(1 << 30) is not None:
        raise RuntimeError("the batch does not fit one block")
    return _RUN(problem, rule, start, out, on_finish, on_iteration, None, capacity)


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--B", type=int, default=2000)
    p.add_argument("--rows", type=int, default=27)
    p.add_argument("--max-nfev", type=int, default=150)
    p.add_argument("--repeat", type=int, default=6)
    p.add_argument("--method", default="trf", choices=("trf", "lm"))
    args = p.parse_args()
    setup(args)
    y, p0 = bt.data(args.B, args.seed)
    full = batch_least_squares(bt.peaks, p0, jac=bt.peaks_jac, args=(y,), method=args.method,
                               return_jac=False)
    idx = np.argsort(-np.asarray(full.nfev), kind="stable")[:args.rows]
    y, p0 = y[idx], p0[idx]
    driver.run = _run_all_admitted
    gram_rows = trust_region._gram_rows
    variants = {
        "now": (gram_rows, loop.TAIL_ENTRIES),
        "no gram_rows": (lambda *a: None, loop.TAIL_ENTRIES),
        "no tail_hold": (gram_rows, _blas_threads.GRAIN_SIZE),
    }
    times = {k: ([], []) for k in variants}
    costs = {}
    try:
        for r in range(args.repeat + 1):
            order = list(variants) if r % 2 else list(reversed(variants))
            for name in order:
                trust_region._gram_rows, loop.TAIL_ENTRIES = variants[name]
                c0, w0 = time.process_time(), time.perf_counter()
                res = batch_least_squares(bt.peaks, p0, jac=bt.peaks_jac, args=(y,),
                                          method=args.method, return_jac=False,
                                          max_nfev=args.max_nfev)
                if r:  # (the first round warms up)
                    times[name][0].append(time.process_time() - c0)
                    times[name][1].append(time.perf_counter() - w0)
                costs[name] = np.asarray(res.cost)
    finally:
        driver.run = _RUN
        trust_region._gram_rows, loop.TAIL_ENTRIES = variants["now"]
    print(f"{args.method}: the {args.rows} slowest of {args.B:,} datasets, max_nfev "
          f"{args.max_nfev}, median of {args.repeat}")
    for name, (cpu, wall) in times.items():
        same = np.array_equal(costs[name], costs["now"])
        print(f"  {name:>13}: CPU {statistics.median(cpu):.3f} s, wall "
              f"{statistics.median(wall):.3f} s, costs identical to now: {same}")


if __name__ == "__main__":
    main()
