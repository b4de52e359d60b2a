"""Probe: a batch whose rows take the SVD route, each row against scipy's own fit.

300 fits of ``a exp(-b t) + c exp(-d t) + e`` to 60 points, starts 30 % off
the true values: tall, often ill-conditioned Jacobians (two rates close
together), so that the batch's rows are factorised by the direct SVD (the
R-SVD of ``linalg.qr_svd``). For each method and option mix it counts the rows
whose final cost is worse or better than scipy's ``least_squares`` on the same
row by more than 1e-6 relative; with ``--before REV`` the package at that
commit is counted beside the working tree (RESULTS §35)::

    PYTHONPATH=$PWD python benchmarks/probe_svd_rows.py [--before 9af17e5]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import numpy as np
import scipy.optimize as so

from torchimize_scipy import batch_least_squares

T = np.linspace(0, 4, 60)
CASES = [("trf", {}), ("lm", {}), ("dogbox", {}), ("trf", {"bounds": (0, 10)}),
         ("trf", {"loss": "soft_l1"}), ("trf", {"x_scale": "jac"})]


def model(p: np.ndarray) -> np.ndarray:
    """``(..., 60)`` values for parameters ``p (..., 5)``."""
    return (p[..., 0:1] * np.exp(-p[..., 1:2] * T) + p[..., 2:3] * np.exp(-p[..., 3:4] * T)
            + p[..., 4:5])


def residuals(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    return model(p) - y


def jacobian(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    e1, e2 = np.exp(-p[..., 1:2] * T), np.exp(-p[..., 3:4] * T)
    return np.stack([e1, -p[..., 0:1] * T * e1, e2, -p[..., 2:3] * T * e2, np.ones_like(e1)], -1)


def data(B: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = np.stack([1 + rng.random(B), 0.5 + rng.random(B), 1 + rng.random(B),
                     0.6 + rng.random(B), 0.1 * rng.random(B)], 1)
    y = model(true) + 0.01 * rng.normal(size=(B, T.size))
    return y, true * (1 + 0.3 * rng.normal(size=true.shape))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default=None, help="commit to count beside the working tree")
    p.add_argument("--B", type=int, default=300)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    libs = {"now": batch_least_squares}
    if args.before:
        from ab_small import import_commit

        libs[args.before] = import_commit(args.before, tempfile.mkdtemp()).batch_least_squares
    y, p0 = data(args.B, args.seed)
    for method, kw in CASES:
        scipy_cost = np.array([
            so.least_squares(residuals, p0[i], jac=jacobian, args=(y[i],), method=method,
                             **kw).cost for i in range(args.B)])
        line = f"{method:6s} {str(kw):22s}"
        for name, solve in libs.items():
            cost = np.asarray(solve(residuals, p0, jac=jacobian, args=(y,), method=method,
                                    **kw).cost)
            worse = int((cost > scipy_cost * (1 + 1e-6) + 1e-12).sum())
            better = int((cost < scipy_cost * (1 - 1e-6) - 1e-12).sum())
            nan = int(np.isnan(cost).sum())
            line += f" | {name}: worse {worse:3d} better {better:3d} NaN {nan}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
