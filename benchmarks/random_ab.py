"""Randomised bit-for-bit A/B of single problems: an older commit against the working tree.

``engine_ab.py`` runs a fixed set of problems; this script draws random ones,
so that a change meant to give the same bits (a host path for one problem,
say) meets shapes, starts, bounds and options nobody listed. Each problem is
a sum of exponentials and sines, ``y(t) = sum_k x_k exp(-(k+1) t / 2)`` (even
``k``) or ``sin(x_k t)`` (odd ``k``), with ``n`` from 1 to 5 parameters and
``n`` to ``n + 29`` residuals, fitted from a perturbed start with a random
method ('trf', 'dogbox', 'lm'), Jacobian (analytic, '2-point', '3-point';
with ``--torch``, 'autograd' instead of analytic), bounds on some variables,
a robust loss and ``x_scale`` ('jac', an array, ones or the default). Every
field of the two results (``x``, ``cost``, ``fun``, ``grad``, ``optimality``,
``active_mask``, ``nfev``, ``njev``, ``status``) and the types of ``cost``
and ``active_mask`` must be equal; the differing problems are printed, with how
they differ (the fields, the change of ``x`` and ``cost``, the counts).

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/random_ab.py --before bd6958d [--count 400]
           [--seed 0] [--torch]
"""

from __future__ import annotations

import tempfile
import warnings
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import torch
from _common import base_parser
from ab_small import import_commit


def _problem(seed: int, use_torch: bool) -> tuple[Any, Any, dict]:
    r = np.random.default_rng(seed)
    n = int(r.integers(1, 6))
    m = int(r.integers(n, n + 30))
    xp = torch if use_torch else np
    t = torch.linspace(0, 3, m, dtype=torch.float64) if use_torch else np.linspace(0, 3, m)

    def model(x):
        return sum((x[k] * xp.exp(-(k + 1) * 0.5 * t) if k % 2 == 0 else xp.sin(x[k] * t))
                   for k in range(n))

    def jac(x):
        cols = [xp.exp(-(k + 1) * 0.5 * t) if k % 2 == 0 else t * xp.cos(x[k] * t)
                for k in range(n)]
        return xp.stack(cols, 1) if use_torch else np.column_stack(cols)

    truth = r.normal(size=n)
    noise = 0.01 * r.normal(size=m)
    x0 = truth + r.normal(size=n)
    if use_torch:
        truth, noise, x0 = (torch.from_numpy(a) for a in (truth, noise, x0))
    y = model(truth) + noise
    method = str(r.choice(["trf", "dogbox", "lm"]))
    kw: dict[str, Any] = {"method": method,
                          "jac": str(r.choice(["analytic", "2-point", "3-point"]))}
    if kw["jac"] == "analytic":
        kw["jac"] = "autograd" if use_torch else jac
    if method != "lm":
        if r.random() < 0.5:
            x0_h = np.asarray(x0)
            kw["bounds"] = (np.where(r.random(n) < 0.5, x0_h - r.random(n), -np.inf),
                            np.where(r.random(n) < 0.5, x0_h + 0.3 * r.random(n), np.inf))
        if r.random() < 0.3:
            kw["loss"] = str(r.choice(["soft_l1", "huber", "cauchy", "arctan"]))
            kw["f_scale"] = 0.5
    pick = r.random()
    if pick < 0.2:
        kw["x_scale"] = "jac"
    elif pick < 0.35:
        kw["x_scale"] = r.random(n) + 0.5
    elif pick < 0.45:
        kw["x_scale"] = np.ones(n)
    return (lambda x: model(x) - y), x0, kw


def _equal(u: Any, v: Any) -> bool:
    if u is None or v is None:
        return u is v
    u, v = np.asarray(u), np.asarray(v)
    return bool(np.array_equal(u, v, equal_nan=u.dtype.kind == "f"))


def _how(a: Any, b: Any, keys: tuple[str, ...]) -> str:
    """How two results differ: the fields, the largest change of ``x`` relative to
    ``1 + |x|``, of ``cost`` relative to ``max(cost, 1e-300)``, and the counts."""
    if isinstance(a, Exception) or isinstance(b, Exception):
        return f"{a!r} / {b!r}"
    fields = [k for k in keys if not _equal(getattr(a, k), getattr(b, k))]
    xa, xb = np.asarray(a.x, dtype=float), np.asarray(b.x, dtype=float)
    dx = float(np.max(np.abs(xa - xb) / (1 + np.abs(xa)))) if xa.size else 0.0
    ca, cb = float(a.cost), float(b.cost)
    dc = abs(ca - cb) / max(abs(ca), 1e-300)
    counts = (f"nfev {a.nfev}->{b.nfev}, status {a.status}->{b.status}"
              if ("nfev" in fields or "status" in fields) else "nfev, status equal")
    return f"fields {fields}; x {dx:.1e} rel, cost {dc:.1e} rel; {counts}"


def _solve(lib: Any, fun: Any, x0: Any, kw: dict) -> Any:
    try:
        return lib.least_squares(fun, x0.copy() if isinstance(x0, np.ndarray) else x0.clone(),
                                 **kw)
    except Exception as exc:  # noqa: BLE001 - an error must be the same error
        return exc


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--before", required=True, help="commit of version A (e.g. bd6958d)")
    p.add_argument("--count", type=int, default=400)
    p.add_argument("--torch", action="store_true", help="torch functions and x0")
    args = p.parse_args()
    import torchimize_scipy as after

    warnings.simplefilter("ignore")
    keys = ("x", "cost", "fun", "grad", "optimality", "active_mask", "nfev", "njev", "status")
    rng = np.random.default_rng(args.seed)
    differ = 0
    with tempfile.TemporaryDirectory() as folder:
        before = import_commit(args.before, folder)
        for i in range(args.count):
            fun, x0, kw = _problem(int(rng.integers(1 << 30)), args.torch)
            a, b = _solve(before, fun, x0, kw), _solve(after, fun, x0, kw)
            if isinstance(a, Exception) or isinstance(b, Exception):
                same = type(a) is type(b) and str(a) == str(b)
            else:
                same = (all(_equal(getattr(a, k), getattr(b, k)) for k in keys)
                        and type(a.cost) is type(b.cost)
                        and type(a.active_mask) is type(b.active_mask))
            if not same:
                differ += 1
                shown = {k: v for k, v in kw.items() if isinstance(v, str)}
                print(f"problem {i} differs: {shown}, bounds: {'bounds' in kw}; "
                      f"{_how(a, b, keys)}")
    print(f"{args.count} problems ({'torch' if args.torch else 'numpy'} functions), "
          f"{differ} differ from {args.before}")


if __name__ == "__main__":
    main()
