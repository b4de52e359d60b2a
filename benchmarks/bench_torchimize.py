"""torchimize's batched solvers on the Gaussian-peak problems of ``bench_batch.py``.

torchimize (https://github.com/hahnec/torchimize, GPL-3.0) is used here only
as a point of comparison: it is never imported by ``torchimize_scipy`` or its
tests. Install it for the benchmark only, e.g. ``pip install torchimize``, or
``pip install --no-deps --target DIR torchimize`` and pass
``--torchimize-path DIR`` (or set ``TORCHIMIZE_PATH``). Without it the script
says so and exits with status 0.

Runs on the same ``B`` problems (default 20,000; n=4, m=64; same seed):

* torchimize ``lsq_lma_parallel`` (meth='lev' and 'marq') and
  ``lsq_gna_parallel``, with the analytic Jacobian and with torchimize's own
  autograd Jacobian (``jac_function=None``); ``ftol = ptol = gtol = 1e-8``,
  ``max_iter = 100``; the model returns ``(B, 1, 64)`` (one cost channel,
  ``wvec = [1]``) and the Jacobian ``(B, 1, 64, 4)``;
* ``torchimize_scipy.batch_least_squares`` 'lm' and 'trf' with the same torch
  model (analytic Jacobian and ``jac='autograd'``), for reference;

and a scipy ``least_squares(method='lm')`` loop with the analytic Jacobian on
the first ``--scipy-subset`` problems (default 1,000). Reported: time, fits/s,
the share of fits whose final cost reaches scipy's (equal within relative
1e-6, or lower) on that subset, and the share that is non-finite.

Usage::

    python benchmarks/bench_torchimize.py [--quick] [--device cuda] [--dtype float32]
           [--threads 2] [--batch 20000] [--scipy-subset 1000] [--max-iter 100]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import torch
from _common import (
    base_parser,
    compare_costs,
    cuda_requested_but_missing,
    md_table,
    peak_1d,
    peak_data,
    peak_jac_1d,
    peak_jac_torch,
    peak_torch,
    scipy_loop,
    setup,
    timed,
    to_numpy,
    write_json,
)

from torchimize_scipy import batch_least_squares


def import_torchimize(path: str | None) -> Any:
    """``torchimize.functions``, or None with a message when it is not installed."""
    for extra in (path, os.environ.get("TORCHIMIZE_PATH")):
        if extra and Path(extra).is_dir() and extra not in sys.path:
            sys.path.insert(0, extra)
    try:
        import torchimize.functions as tf
    except ImportError as exc:
        print(f"torchimize is not available ({exc}).\n"
              "Install it for this benchmark only (GPL-3.0, never a dependency of "
              "torchimize_scipy): `pip install torchimize`, or "
              "`pip install --no-deps --target DIR torchimize` and pass --torchimize-path DIR.")
        return None
    return tf


def tz_model(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """torchimize's convention: residuals ``(B, 1, m)``."""
    return peak_torch(p, y)[:, None, :]


def tz_jac(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """torchimize's convention: Jacobian ``(B, 1, m, n)``."""
    return peak_jac_torch(p, y)[:, None, :, :]


def cost_of(p: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Final cost ``0.5 * sum(f^2)`` in float64."""
    with torch.no_grad():
        f = peak_torch(p.to(torch.float64), y.to(torch.float64))
    return to_numpy(0.5 * (f * f).sum(-1))


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--batch", type=int, default=None, help="problems (default 20000; quick 2000)")
    p.add_argument("--scipy-subset", type=int, default=None,
                   help="problems solved by scipy (default 1000; quick 200)")
    p.add_argument("--max-iter", type=int, default=100, help="torchimize's max_iter")
    p.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance of 'equal cost'")
    p.add_argument("--jacs", nargs="+", default=["analytic", "autograd"],
                   choices=["analytic", "autograd"],
                   help="Jacobians to run (torchimize's autograd one is slow with meth='lev')")
    p.add_argument("--torchimize-path", default=None,
                   help="folder holding the torchimize package (pip install --target)")
    args = p.parse_args()
    dev, dt = setup(args)
    if cuda_requested_but_missing(dev):
        print("CUDA is not available on this machine: nothing to run with --device cuda.")
        return
    tf = import_torchimize(args.torchimize_path)
    if tf is None:
        return
    import torchimize

    B = args.batch or (2000 if args.quick else 20000)
    S = min(B, args.scipy_subset or (200 if args.quick else 1000))
    y_np, _, p0_np = peak_data(B, seed=args.seed)
    y = torch.as_tensor(y_np, dtype=dt).to(dev)
    p0 = torch.as_tensor(p0_np, dtype=dt).to(dev)
    print(f"{B:,} Gaussian-peak fits, {args.device}, {args.dtype}, {args.threads} threads; "
          f"scipy 'lm' loop on {S:,}", flush=True)
    ref = scipy_loop(peak_1d, peak_jac_1d, p0_np[:S], y_np[:S], "lm")
    wvec = torch.ones(1, device=dev, dtype=dt)
    tol = {"ftol": 1e-8, "ptol": 1e-8, "gtol": 1e-8, "max_iter": args.max_iter}

    def tz_call(kind: str, jac: str):
        jf = tz_jac if jac == "analytic" else None

        def call(pp: torch.Tensor, yy: torch.Tensor):
            # torchimize updates p in place: always hand it a copy
            if kind == "gna":
                return tf.lsq_gna_parallel(pp.clone(), tz_model, jac_function=jf, args=(yy,),
                                           wvec=wvec, **tol)
            return tf.lsq_lma_parallel(pp.clone(), tz_model, jac_function=jf, args=(yy,),
                                       wvec=wvec, meth=kind, **tol)

        return call

    def ours_call(method: str, jac: str):
        jac_arg = peak_jac_torch if jac == "analytic" else "autograd"

        def call(pp: torch.Tensor, yy: torch.Tensor):
            return batch_least_squares(peak_torch, pp, jac=jac_arg, method=method, args=(yy,))

        return call

    solvers = []
    for jac in args.jacs:
        solvers += [("torchimize lsq_lma_parallel(meth='lev')", jac, "tz", tz_call("lev", jac)),
                    ("torchimize lsq_lma_parallel(meth='marq')", jac, "tz",
                     tz_call("marq", jac)),
                    ("torchimize lsq_gna_parallel", jac, "tz", tz_call("gna", jac)),
                    ("torchimize_scipy batch_least_squares('lm')", jac, "ours",
                     ours_call("lm", jac)),
                    ("torchimize_scipy batch_least_squares('trf')", jac, "ours",
                     ours_call("trf", jac))]
    rows: list[dict[str, Any]] = []
    for name, jac, kind, call in solvers:
        with np.errstate(all="ignore"):
            call(p0[:64], y[:64])  # warm-up
            seconds, out = timed(lambda call=call: call(p0, y), dev)
        if kind == "tz":
            x = out[-1]
            iters = len(out)
            cost = cost_of(x, y)
        else:
            x = out.x
            iters = None
            cost = to_numpy(out.cost).astype(float)
        cmp = compare_costs(cost[:S], ref["cost"], args.rtol)
        rows.append({"solver": name, "jac": jac, "seconds": seconds, "fits_per_s": B / seconds,
                     "iterations": iters, "cost_equal": cmp["equal"],
                     "cost_lower": cmp["lower"], "cost_higher": cmp["higher"],
                     "cost_reached": cmp["reached"],
                     "nonfinite": float((~np.isfinite(cost[:S])).mean()),
                     "median_cost_ratio": float(np.nanmedian(cost[:S] / ref["cost"]))})
        print(f"  {name:44s} {jac:8s} {seconds:8.3f} s", flush=True)

    print(f"\n### torchimize vs torchimize_scipy: {B:,} Gaussian-peak fits (n=4, m=64)\n")
    headers = ["solver", "jac", "time (s)", "fits/s", "iterations", "reached scipy cost",
               "= scipy", "< scipy", "> scipy", "non-finite"]
    table = [[r["solver"], r["jac"], r["seconds"], r["fits_per_s"],
              "–" if r["iterations"] is None else r["iterations"],
              f"{100 * r['cost_reached']:.1f}%", f"{100 * r['cost_equal']:.1f}%",
              f"{100 * r['cost_lower']:.1f}%", f"{100 * r['cost_higher']:.1f}%",
              f"{100 * r['nonfinite']:.1f}%"] for r in rows]
    print(md_table(headers, table))
    print(f"\nscipy reference: least_squares(method='lm', analytic jac) looped over the first "
          f"{S:,} problems ({S / ref['seconds']:.0f} fits/s); cost shares are on those problems "
          f"(relative {args.rtol:g}). torchimize: ftol=ptol=gtol=1e-8, max_iter={args.max_iter}; "
          f"'iterations' = length of its returned p_list (the whole batch iterates until all "
          f"converge). One timed call after a warm-up on 64 problems.")
    path = write_json(args, "bench_torchimize", {
        "torchimize_version": getattr(torchimize, "__version__", "?"), "B": B,
        "scipy_subset": S, "scipy_fits_per_s": S / ref["seconds"], "rtol": args.rtol,
        "torchimize_options": tol, "rows": rows})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
