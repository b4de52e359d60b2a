"""Interleaved A/B of the per-call pieces of one small fit, outside the engine (issue 14).

The pieces of ``least_squares``/``curve_fit`` that run once per call or once
per evaluation around the engine, timed in process-CPU time with an older
commit's version (imported as ``ab_small.py`` does) alternated with the
working tree's, so that the machine's load drifts equally over both:

* MINPACK's ``fjac, ipvt, qtf, R`` of a 50 x 3 Jacobian (``curve_fit``'s
  'lm' path; ``minpack_qr_outputs``);
* one residual evaluation recorded by the 'lm' book of one problem
  (``LeastsqBook.record_call``) and the last MINPACK Jacobian read from it;
* one problem's ``OptimizeResult`` from the engine's tensors;
* the frontend's checks and conversion of Rosenbrock's call (``prepare``).

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/ab_per_call.py --before b08df67 [--rounds 7]

Prints the median microseconds per operation of each version and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import torch
from _small_problems import rosenbrock, rosenbrock_jac
from ab_small import ROOT, import_commit


def pieces(lib: Any) -> dict[str, Callable[[], Any]]:
    """name -> zero-argument call of one piece of ``lib`` (a torchimize_scipy package)."""
    lsq = sys.modules[lib.__name__ + "._curve_fit._leastsq"]
    results = sys.modules[lib.__name__ + "._results"]
    frontend = sys.modules[lib.__name__ + "._frontend"]
    arrays = sys.modules[lib.__name__ + "._arrays"]
    driver = sys.modules[lib.__name__ + "._driver"]
    rng = np.random.default_rng(0)
    J, f = rng.normal(size=(50, 3)), rng.normal(size=50)
    ids = torch.zeros(1, dtype=torch.long)
    x = torch.ones(1, 3, dtype=torch.float64)
    r = torch.ones(1, 50, dtype=torch.float64)
    Jt = torch.ones(1, 50, 3, dtype=torch.float64)
    book = lsq.LeastsqBook(10**9, 1.49e-8, 1, "cpu", keep_residuals=True)
    book.record_call(ids, x, r)
    book.record_jac(ids, Jt, lambda: r)
    if hasattr(book, "last_minpack_jacobian_of_one"):
        def last() -> Any:
            return book.last_minpack_jacobian_of_one(1)
    else:
        def last() -> Any:
            J, f, njev = book.at_last_minpack_jacobian(torch.tensor([1]))
            return J[0], f[0], int(njev[0])
    ns = arrays.detect_namespace(np.ones(2), None, None)
    out = driver.result_buffers(1, 2, 2, torch.float64, torch.device("cpu"))
    for v in out.values():
        v.zero_()
    if hasattr(results, "build_one_result"):
        def result() -> Any:
            return results.build_one_result(out, ns, "lm", rosenbrock_jac, False)
    else:
        def result() -> Any:
            return results.build_result(out, ns, "lm", rosenbrock_jac, False)[0]
    return {
        "minpack_qr_outputs (50 x 3)": lambda: lsq.minpack_qr_outputs(J, f),
        "LeastsqBook.record_call (B = 1)": lambda: book.record_call(ids, x, r),
        "last MINPACK Jacobian (B = 1)": last,
        "one OptimizeResult": result,
        "prepare (Rosenbrock, lm)": lambda: frontend.prepare(
            rosenbrock, [-1.2, 1.0], rosenbrock_jac, (-np.inf, np.inf), "lm", 1e-8, 1e-8,
            1e-8, None, None, (), None, device=None, dtype=None, batch=False),
    }


def per_call_us(fn: Callable[[], Any], calls: int) -> float:
    c0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - c0) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="commit of version A (e.g. b08df67)")
    p.add_argument("--rounds", type=int, default=7, help="alternated rounds (default 7)")
    p.add_argument("--calls", type=int, default=500, help="calls per round (default 500)")
    args = p.parse_args()
    import torchimize_scipy as after

    if Path(after.__file__).resolve().parent != ROOT / "torchimize_scipy":
        sys.exit(f"torchimize_scipy comes from {after.__file__}, not this tree: "
                 "run with PYTHONPATH=<repository root>")
    with tempfile.TemporaryDirectory() as folder:
        before = import_commit(args.before, folder)
        libs = {"before": pieces(before), "after": pieces(after)}
        print("| piece | before (us) | after (us) | after/before |\n|---|---:|---:|---:|")
        for name in libs["after"]:
            samples: dict[str, list[float]] = {k: [] for k in libs}
            for k in libs:
                per_call_us(libs[k][name], 20)  # warm-up
            for _ in range(args.rounds):
                for k in libs:
                    samples[k].append(per_call_us(libs[k][name], args.calls))
            b, a = (statistics.median(samples[k]) for k in ("before", "after"))
            print(f"| {name} | {b:.1f} | {a:.1f} | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
