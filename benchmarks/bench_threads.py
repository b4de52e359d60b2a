"""Stress run: concurrent calls from several threads against the same calls made in turn.

Each of ``--workers`` Python threads solves its own ``--batch`` Gaussian peaks
(torch model written with ``p.unbind(-1)``, m = 64, n = 4; the peaks of
``benchmarks/_common.peak_data``) with ``batch_least_squares`` (or, with
``--api curve_fit``, ``batch_curve_fit``). The threads start together behind a
barrier and the concurrent round is repeated ``--repeat`` times. Every result
must equal, bit for bit, the same call made sequentially beforehand: both runs
take the same code path, so any difference means one thread disturbed another
(issue 17: forward-mode AD keeps process-wide state in torch).

Printed per method and Jacobian: the largest difference in ``x`` and in the
cost (``pcov`` with ``--api curve_fit``) over all threads and repetitions,
how many results differed, and the wall time of the sequential calls and of
one concurrent round (information only: on 2 cores, with torch's own intra-op
threads, the concurrent round is not expected to be faster). The script exits
with status 1 when any result differed.

Usage::

    python benchmarks/bench_threads.py [--workers 4] [--batch 3000] [--repeat 3]
           [--methods lm trf dogbox gn gd] [--jacs autograd 2-point 3-point callable cs]
           [--api least_squares|curve_fit] [--quick]
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import torch
from _common import (
    PEAK_T,
    base_parser,
    environment,
    md_table,
    peak_data,
    peak_jac_torch,
    peak_torch,
    setup,
    write_json,
)

from torchimize_scipy import batch_curve_fit, batch_least_squares

JACS = ("autograd", "2-point", "3-point", "callable")  # the default set
JAC_CHOICES = (*JACS, "cs")


def peak_model(t: torch.Tensor, a: torch.Tensor, mu: torch.Tensor, s: torch.Tensor,
               c: torch.Tensor) -> torch.Tensor:
    """Gaussian peak for ``batch_curve_fit``: parameters ``(b, 1)``, ``t (m,)``."""
    z = (t - mu) / s
    return a * torch.exp(-0.5 * z * z) + c


def make_call(api: str, method: str, jac: str, p0: torch.Tensor, y: torch.Tensor):
    """A callable solving one block: ``(x, cost)``, or ``(popt, pcov)`` for curve_fit."""
    if api == "least_squares":
        jac_arg: Any = peak_jac_torch if jac == "callable" else jac

        def call():
            res = batch_least_squares(peak_torch, p0, jac=jac_arg, method=method, args=(y,))
            return res.x.numpy(), res.cost.numpy()

        return call

    t = torch.as_tensor(PEAK_T, dtype=p0.dtype, device=p0.device)
    if jac == "callable":
        def jac_arg(tt: torch.Tensor, *cols: torch.Tensor) -> torch.Tensor:
            return peak_jac_torch(torch.cat(cols, dim=-1), y)

    else:
        jac_arg = jac

    def call():
        popt, pcov = batch_curve_fit(peak_model, t, y, p0=p0, jac=jac_arg, method=method)
        return popt.numpy(), pcov.numpy()

    return call


def run_case(api: str, method: str, jac: str, blocks: list, repeat: int) -> dict[str, Any]:
    """Sequential reference, then ``repeat`` concurrent rounds; the differences found."""
    calls = [make_call(api, method, jac, p0, y) for p0, y in blocks]
    make_call(api, method, jac, blocks[0][0][:8], blocks[0][1][:8])()  # warm-up, untimed
    t0 = time.perf_counter()
    ref = [call() for call in calls]
    t_seq = time.perf_counter() - t0
    workers = len(calls)
    barrier = threading.Barrier(workers)
    max_dx = max_dother = 0.0
    mismatches = 0
    errors: list[str] = []
    t_conc = []
    for _ in range(repeat):
        out: list[Any] = [None] * workers

        def work(k: int, out: list = out) -> None:
            barrier.wait()
            try:
                out[k] = calls[k]()
            except Exception as exc:  # reported below, makes the run fail
                out[k] = exc

        threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        t_conc.append(time.perf_counter() - t0)
        for k in range(workers):
            if isinstance(out[k], Exception):
                errors.append(f"{type(out[k]).__name__}: {out[k]}")
                mismatches += 1
                continue
            x, other = out[k]
            x_ref, other_ref = ref[k]
            same = np.array_equal(x, x_ref, equal_nan=True) and np.array_equal(
                other, other_ref, equal_nan=True)
            mismatches += not same
            max_dx = max(max_dx, float(np.nanmax(np.abs(x - x_ref), initial=0.0)))
            max_dother = max(max_dother, float(np.nanmax(np.abs(other - other_ref), initial=0.0)))
    return {"api": api, "method": method, "jac": jac, "max_dx": max_dx, "max_dother": max_dother,
            "mismatches": mismatches, "results_compared": repeat * workers,
            "seconds_sequential": t_seq, "seconds_concurrent_median": float(np.median(t_conc)),
            "errors": errors[:3]}


def main() -> int:
    p = base_parser(__doc__.split("\n\n")[0], dtypes=("float64", "float32"))
    p.add_argument("--workers", type=int, default=4, help="Python threads calling at once")
    p.add_argument("--batch", type=int, default=None, help="problems per thread (default 3000; "
                   "quick 300)")
    p.add_argument("--repeat", type=int, default=None, help="concurrent rounds (default 3; "
                   "quick 2)")
    p.add_argument("--methods", nargs="+", default=["lm", "trf"],
                   choices=["lm", "trf", "dogbox", "gn", "gd"])
    p.add_argument("--jacs", nargs="+", default=list(JACS), choices=JAC_CHOICES)
    p.add_argument("--api", default="least_squares", choices=["least_squares", "curve_fit"],
                   help="batch_least_squares (default) or batch_curve_fit")
    p.add_argument("--no-json", action="store_true", help="do not write the JSON result")
    args = p.parse_args()
    dev, dt = setup(args)
    B = args.batch or (300 if args.quick else 3000)
    repeat = args.repeat or (2 if args.quick else 3)
    y, _, p0 = peak_data(B * args.workers, seed=args.seed)
    blocks = [(torch.as_tensor(p0[k * B:(k + 1) * B], dtype=dt).to(dev),
               torch.as_tensor(y[k * B:(k + 1) * B], dtype=dt).to(dev))
              for k in range(args.workers)]
    print(f"{args.workers} threads x {B} peaks (m = 64, n = 4), {repeat} concurrent rounds, "
          f"api {args.api}, torch threads {torch.get_num_threads()}\n", flush=True)
    rows = []
    for method in args.methods:
        for jac in args.jacs:
            r = run_case(args.api, method, jac, blocks, repeat)
            rows.append(r)
            print(f"  {method:6s} {jac:9s} max |dx| {r['max_dx']:.3g}  differing "
                  f"{r['mismatches']}/{r['results_compared']}  "
                  f"sequential {r['seconds_sequential']:.2f} s, concurrent "
                  f"{r['seconds_concurrent_median']:.2f} s", flush=True)
            for e in r["errors"]:
                print(f"    error: {e}")
    print()
    print(md_table(["method", "jac", "max |dx|", "max |dcost| or |dpcov|", "differing results",
                    "sequential (s)", "concurrent (s)"],
                   [[r["method"], r["jac"], f"{r['max_dx']:.3g}", f"{r['max_dother']:.3g}",
                     f"{r['mismatches']}/{r['results_compared']}", r["seconds_sequential"],
                     r["seconds_concurrent_median"]] for r in rows]))
    bad = sum(r["mismatches"] for r in rows)
    if not args.no_json:
        path = write_json(args, f"bench_threads_{args.api}",
                          {"environment": environment(args), "workers": args.workers,
                           "batch": B, "repeat": repeat, "rows": rows})
        print(f"\nJSON: {path}")
    print("\nOK: every concurrent result equals the sequential one." if not bad else
          f"\nFAIL: {bad} concurrent results differ from the sequential ones.")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
