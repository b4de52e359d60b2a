"""``tr_solver='lsmr'`` against ``'exact'`` on a dense Jacobian, ours and scipy's, one run.

Broyden's tridiagonal system (scipy's own test problem, ``n = m``), started
from ``x0 = -1``, with the analytic Jacobian returned as a dense numpy array,
method 'trf' (and 'dogbox' with ``--methods``):

* ``tr_solver='lsmr'``: scipy's ``least_squares`` and ours, both on the dense
  array (our Jacobian is used through products only: two per LSMR
  iteration, no ``J^T J``, no SVD);
* ``tr_solver='exact'``: the same for sizes up to ``--exact-max`` (its SVD
  costs ``O(n^3)`` per iteration; at ``n = 10,000`` it would take minutes).

Per row: median wall time, the ratio ours/scipy, the final costs, ``nfev``
and ``njev``, and the peak resident memory of the process after the row.

Usage::

    python benchmarks/bench_lsmr.py [--sizes 1000 10000] [--exact-max 2000]
           [--methods trf dogbox] [--repeat 3] [--threads 2]
"""

from __future__ import annotations

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import scipy.optimize
from _common import (
    base_parser,
    environment,
    fmt,
    gib,
    md_table,
    median_time,
    peak_rss_bytes,
    setup,
    write_json,
)

import torchimize_scipy


def broyden(n: int):
    """Residuals and dense Jacobian of Broyden's tridiagonal system of size ``n``."""
    def fun(x):
        f = (3 - x) * x + 1
        f[1:] -= x[:-1]
        f[:-1] -= 2 * x[1:]
        return f

    def jac(x):
        J = np.zeros((n, n))
        i = np.arange(n)
        J[i, i] = 3 - 2 * x
        J[i[1:], i[:-1]] = -1
        J[i[:-1], i[1:]] = -2
        return J

    return fun, jac


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--exact-max", type=int, default=2000,
                        help="largest n run with tr_solver='exact' (default 2000)")
    parser.add_argument("--methods", nargs="+", default=["trf"])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    dev, dt = setup(args)
    if args.quick:
        args.sizes, args.exact_max, args.repeat = [200], 200, 1
    rows, records = [], []
    for n in args.sizes:
        fun, jac = broyden(n)
        x0 = -np.ones(n)
        for method in args.methods:
            for solver in ("lsmr", "exact"):
                if solver == "exact" and n > args.exact_max:
                    continue
                kw = dict(jac=jac, method=method, tr_solver=solver)
                t_s, ref = median_time(
                    lambda kw=kw, fun=fun, x0=x0: scipy.optimize.least_squares(fun, x0, **kw),
                    repeat=args.repeat)
                t_o, got = median_time(
                    lambda kw=kw, fun=fun, x0=x0: torchimize_scipy.least_squares(
                        fun, x0, device=dev, dtype=dt, **kw),
                    repeat=args.repeat)
                rec = {"n": n, "method": method, "tr_solver": solver, "scipy_s": t_s,
                       "ours_s": t_o, "ratio": t_o / t_s, "cost_scipy": float(ref.cost),
                       "cost_ours": float(got.cost), "nfev_scipy": int(ref.nfev),
                       "nfev_ours": int(got.nfev), "njev_scipy": int(ref.njev),
                       "njev_ours": int(got.njev), "status_scipy": int(ref.status),
                       "status_ours": int(got.status), "peak_rss_gib": gib(peak_rss_bytes())}
                records.append(rec)
                rows.append([n, method, solver, fmt(t_s), fmt(t_o), fmt(rec["ratio"]),
                             f"{ref.cost:.3e}", f"{got.cost:.3e}",
                             f"{ref.nfev}/{ref.njev}", f"{got.nfev}/{got.njev}",
                             fmt(rec["peak_rss_gib"])])
                print(md_table(["n", "method", "tr_solver", "scipy s", "ours s", "ours/scipy",
                                "cost scipy", "cost ours", "nfev/njev scipy", "nfev/njev ours",
                                "peak RSS GiB"], rows[-1:]), flush=True)
    print()
    print(md_table(["n", "method", "tr_solver", "scipy s", "ours s", "ours/scipy",
                    "cost scipy", "cost ours", "nfev/njev scipy", "nfev/njev ours",
                    "peak RSS GiB"], rows))
    path = write_json(args, "bench_lsmr", {"env": environment(args), "rows": records})
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
