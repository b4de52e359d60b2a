"""Fits from a symmetric start: ours against scipy, per method (issue 19, item 1).

Sums of interchangeable terms (two- and three-term exponential decays, two- and
three-peak Gaussian mixtures) fitted from scipy's default guess, all ones: at
that point the terms are equal, the Jacobian has equal column groups (rank
deficient) and a step that treats the terms alike keeps them equal for ever.
scipy's 'dogbox' and 'lm' break the tie (the least-squares solvers keep
singular values at rounding level, whose step is large and not symmetric); a
solver that drops them stays in the symmetric subspace at a much worse fit.

For every model, ``--per-model`` random true parameter sets (distinct terms)
and noise levels, every method ('trf', 'dogbox', 'lm') with the analytic
Jacobian, this script fits the same data with ``scipy.optimize.curve_fit``,
``torchimize_scipy.curve_fit`` and one ``torchimize_scipy.batch_curve_fit``
call per model and method, and counts the fits where ours ends at a worse,
better or equal sum of squared residuals (SSR) than scipy's: equal within
``rtol * max(SSR) + atol * |y|^2``. A failed fit (RuntimeError, or NaN from
the batch) counts as SSR = inf. Nothing is timed.

Run from the repository root::

    python benchmarks/sweep_symmetric.py            # 12 data sets per model
    python benchmarks/sweep_symmetric.py --quick    # 5, to check the script
"""

from __future__ import annotations

import json
import platform
import warnings
from collections.abc import Callable

import _env  # noqa: F401  (thread variables before numpy)
import numpy as np
import scipy
import scipy.optimize
import torch
from _common import base_parser, setup

import torchimize_scipy

METHODS = ("trf", "dogbox", "lm")


# --------------------------------------------------------------------------- models
def exp_sum(k: int) -> tuple[Callable, Callable]:
    """``sum_j a_j exp(-r_j x)`` with parameters ``a_1, r_1, a_2, r_2, ...``."""

    def f(x, *p):
        return sum(p[2 * j] * np.exp(-p[2 * j + 1] * x) for j in range(k))

    def jac(x, *p):
        cols = []
        for j in range(k):
            e = np.exp(-p[2 * j + 1] * x)
            cols += [e, -p[2 * j] * x * e]
        return np.stack(cols, -1)

    return f, jac


def gauss_sum(k: int) -> tuple[Callable, Callable]:
    """``sum_j a_j exp(-(x - c_j)^2 / (2 w_j^2))`` with parameters ``a, c, w`` per peak."""

    def f(x, *p):
        return sum(p[3 * j] * np.exp(-0.5 * ((x - p[3 * j + 1]) / p[3 * j + 2]) ** 2)
                   for j in range(k))

    def jac(x, *p):
        cols = []
        for j in range(k):
            a, c, w = p[3 * j:3 * j + 3]
            u = (x - c) / w
            e = np.exp(-0.5 * u**2)
            cols += [e, a * e * u / w, a * e * u**2 / w]
        return np.stack(cols, -1)

    return f, jac


def exp_truth(rng: np.random.Generator, k: int) -> np.ndarray:
    """Amplitudes in [0.3, 2], rates spread over [0.1, 3] (log-uniform, distinct)."""
    rates = np.sort(np.exp(rng.uniform(np.log(0.1), np.log(3.0), k)))
    rates *= np.geomspace(1.0, 1.5 ** (k - 1), k)  # keep them apart
    return np.ravel(np.column_stack([rng.uniform(0.3, 2.0, k), rates]))


def gauss_truth(rng: np.random.Generator, k: int) -> np.ndarray:
    """Amplitudes in [0.3, 2], centres spread over [-2, 4], widths in [0.3, 1]."""
    centres = np.sort(rng.uniform(-2.0, 4.0, k)) + np.arange(k) * 0.5
    return np.ravel(np.column_stack([rng.uniform(0.3, 2.0, k), centres,
                                     rng.uniform(0.3, 1.0, k)]))


MODELS = {
    "2-exp": (exp_sum(2), lambda rng: exp_truth(rng, 2), np.linspace(0.0, 6.0, 40)),
    "3-exp": (exp_sum(3), lambda rng: exp_truth(rng, 3), np.linspace(0.0, 8.0, 60)),
    "2-gauss": (gauss_sum(2), lambda rng: gauss_truth(rng, 2), np.linspace(-4.0, 6.0, 60)),
    "3-gauss": (gauss_sum(3), lambda rng: gauss_truth(rng, 3), np.linspace(-4.0, 7.0, 80)),
}
NOISE = (0.0, 1e-3, 1e-2)  # relative to max |y|


def ssr(f: Callable, x: np.ndarray, y: np.ndarray, p: np.ndarray) -> float:
    if not np.all(np.isfinite(p)):
        return np.inf
    with np.errstate(all="ignore"):
        r = f(x, *p) - y
    value = float(r @ r)
    return value if np.isfinite(value) else np.inf


def budget(method: str, max_nfev: int) -> dict:
    """The evaluation budget as ``curve_fit`` names it for ``method``."""
    return {"maxfev": max_nfev} if method == "lm" else {"max_nfev": max_nfev}


def single_fit(lib, f, jac, x, y, n, method, max_nfev) -> np.ndarray:
    """``popt`` of one ``curve_fit`` from all ones; NaN when it raises."""
    try:
        popt, _ = lib.curve_fit(f, x, y, p0=np.ones(n), jac=jac, method=method,
                                **budget(method, max_nfev))
        return np.asarray(popt, dtype=float)
    except (RuntimeError, ValueError):
        return np.full(n, np.nan)


def classify(ours: float, ref: float, scale: float, rtol: float, atol: float) -> str:
    if ours == ref or abs(ours - ref) <= rtol * max(ours, ref) + atol * scale:
        return "equal"
    return "worse" if ours > ref else "better"


def main() -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--per-model", type=int, default=12, help="data sets per model (default 12)")
    p.add_argument("--rtol", type=float, default=1e-6, help="relative SSR tolerance")
    p.add_argument("--atol", type=float, default=1e-12,
                   help="absolute SSR tolerance, times |y|^2 (default 1e-12)")
    p.add_argument("--no-batch", action="store_true", help="skip batch_curve_fit")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated methods (default: all three)")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated models (default: all of {', '.join(MODELS)})")
    p.add_argument("--max-nfev", type=int, default=300,
                   help="evaluation budget of every fit, scipy's and ours (default 300; "
                        "a fit that needs more fails, SSR = inf)")
    args = p.parse_args()
    dev, dt = setup(args)
    per_model = 5 if args.quick else args.per_model
    warnings.simplefilter("ignore")

    counts: dict = {}
    rows: list = []
    for mi, (name, ((f, jac), truth, x)) in enumerate(MODELS.items()):
        if name not in args.models.split(","):
            continue
        rng = np.random.default_rng([args.seed, mi])
        Y = []
        for i in range(per_model):
            y = f(x, *truth(rng))
            noise = NOISE[i % len(NOISE)]
            Y.append(y + noise * np.abs(y).max() * rng.standard_normal(x.size))
        Y = np.asarray(Y)
        n = len(truth(np.random.default_rng(0)))
        for method in args.methods.split(","):
            ref, ours = [], []
            for y in Y:
                for lib, out in ((scipy.optimize, ref), (torchimize_scipy, ours)):
                    out.append(ssr(f, x, y, single_fit(lib, f, jac, x, y, n, method,
                                                       args.max_nfev)))
            apis = {"curve_fit": ours}
            if not args.no_batch:
                popt, _ = torchimize_scipy.batch_curve_fit(
                    f, x, Y, np.ones((per_model, n)), jac=jac, method=method,
                    device=dev, dtype=dt, **budget(method, args.max_nfev))
                popt = np.asarray(popt.cpu() if isinstance(popt, torch.Tensor) else popt)
                apis["batch_curve_fit"] = [ssr(f, x, y, q) for y, q in zip(Y, popt, strict=True)]
            for api, values in apis.items():
                c = counts.setdefault((api, method), {"worse": 0, "better": 0, "equal": 0})
                mc = {"worse": 0, "better": 0, "equal": 0}
                for y, o, r in zip(Y, values, ref, strict=True):
                    k = classify(o, r, float(y @ y), args.rtol, args.atol)
                    c[k] += 1
                    mc[k] += 1
                rows.append({"model": name, "method": method, "api": api, **mc})
                print(f"{name:8s} {method:7s} {api:16s} worse {mc['worse']:3d}  "
                      f"better {mc['better']:3d}  equal {mc['equal']:3d}", flush=True)

    print()
    n_models = len(args.models.split(","))
    print(f"{per_model} data sets per model x {n_models} models, all-ones p0, analytic jac, "
          f"budget {args.max_nfev} evaluations; SSR equal within rtol {args.rtol:g} + atol "
          f"{args.atol:g} |y|^2")
    print()
    print("| API | method | ours worse | ours better | equal |")
    print("|---|---|---:|---:|---:|")
    for (api, method), c in counts.items():
        print(f"| `{api}` | '{method}' | {c['worse']} | {c['better']} | {c['equal']} |")
    if not args.quick:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        out = args.out_dir / "sweep_symmetric.json"
        out.write_text(json.dumps({
            "per_model": per_model, "max_nfev": args.max_nfev, "rtol": args.rtol,
            "atol": args.atol, "seed": args.seed,
            "device": str(dev), "dtype": str(dt), "python": platform.python_version(),
            "torch": torch.__version__, "scipy": scipy.__version__,
            "processor": platform.processor() or platform.machine(),
            "totals": [{"api": a, "method": m, **c} for (a, m), c in counts.items()],
            "rows": rows}, indent=1))
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
