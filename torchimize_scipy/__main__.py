"""Demo: ``python -m torchimize_scipy``.

Solves a few of scipy's documented least-squares problems with numpy and with
torch inputs next to :func:`scipy.optimize.least_squares` and prints how close
the answers are and how long each took; compares one ``curve_fit`` with
scipy's; then fits a batch of Gaussian peaks with :func:`batch_least_squares`
against a loop of scipy calls.
"""

from __future__ import annotations

import time

import numpy as np
import scipy
import scipy.optimize
import torch
from scipy.optimize import least_squares as scipy_least_squares

from . import __version__, batch_least_squares, curve_fit, least_squares


def _rosenbrock(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def _rosenbrock_torch(x):
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def _broyden(x):
    f = (3 - x) * x + 1
    f[1:] -= x[:-1]
    f[:-1] -= 2 * x[1:]
    return f


_T = np.linspace(0, 10, 60)
_Y = 0.5 + 2.0 * np.exp(-1.3 * _T) + 0.05 * np.random.default_rng(0).standard_normal(60)
_Y[::12] += 2.0  # outliers


def _exp_model(x, t, y):
    return x[0] + x[1] * np.exp(x[2] * t) - y


def _timed(fn, *args, repeat=5, **kwargs):
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return out, best


def _single_problems() -> None:
    cases = [
        ("Rosenbrock", _rosenbrock, np.array([2.0, 2.0]), {}),
        ("Rosenbrock, x1 <= 1.5 bound", _rosenbrock, np.array([2.0, 2.0]),
         {"bounds": ([-np.inf, 1.5], np.inf)}),
        ("Broyden tridiagonal", _broyden, -np.ones(9), {}),
        ("Exponential fit, soft_l1", _exp_model, np.array([1.0, 1.0, -0.5]),
         {"args": (_T, _Y), "loss": "soft_l1", "f_scale": 0.1}),
    ]
    print(f"{'problem':32s}{'method':8s}{'input':7s}{'max|dx|':>10s}{'dcost':>11s}"
          f"{'status':>8s}{'ours ms':>9s}{'scipy ms':>10s}")
    for name, fun, x0, kw in cases:
        for method in ("trf", "dogbox", "lm"):
            if method == "lm" and ("bounds" in kw or "loss" in kw):
                continue
            ref, t_ref = _timed(scipy_least_squares, fun, x0, method=method, **kw)
            ours, t_ours = _timed(least_squares, fun, x0, method=method, **kw)
            dx = np.max(np.abs(ours.x - ref.x))
            dc = abs(ours.cost - ref.cost) / (1.0 + abs(ref.cost))
            print(f"{name:32s}{method:8s}{'numpy':7s}{dx:10.1e}{dc:11.1e}"
                  f"{f'{ours.status}/{ref.status}':>8s}{1e3 * t_ours:9.2f}{1e3 * t_ref:10.2f}")
    x0 = torch.tensor([2.0, 2.0], dtype=torch.float64)
    ref = scipy_least_squares(_rosenbrock, x0.numpy())
    for jac in ("2-point", "autograd"):
        ours, t_ours = _timed(least_squares, _rosenbrock_torch, x0, jac=jac)
        dx = float((ours.x - torch.from_numpy(ref.x)).abs().max())
        print(f"{'Rosenbrock, jac=' + jac:32s}{'trf':8s}{'torch':7s}{dx:10.1e}"
              f"{abs(float(ours.cost) - ref.cost):11.1e}{f'{ours.status}/{ref.status}':>8s}"
              f"{1e3 * t_ours:9.2f}{'':>10s}")


def _curve_fit_demo() -> None:
    def decay(x, a, b, c):
        return a * np.exp(-b * x) + c

    rng = np.random.default_rng(2)
    x = np.linspace(0, 4, 50)
    y = decay(x, 2.5, 1.3, 0.5) + 0.2 * rng.normal(size=x.size)
    ref, ref_cov = scipy.optimize.curve_fit(decay, x, y)
    ours, cov = curve_fit(decay, x, y)
    print(f"\ncurve_fit(a*exp(-b*x)+c): popt {np.array2string(ours, precision=4)}, "
          f"max|dpopt| vs scipy {np.max(np.abs(ours - ref)):.1e}, "
          f"max rel. dpcov {np.max(np.abs(cov - ref_cov)) / np.max(np.abs(ref_cov)):.1e}")


def _batch_demo(B: int = 4000, m: int = 64) -> None:
    rng = np.random.default_rng(1)
    t = np.linspace(-3, 3, m)
    truth = np.column_stack([rng.uniform(1, 3, B), rng.uniform(-1, 1, B),
                             rng.uniform(0.5, 1.5, B), rng.uniform(0, 0.5, B)])
    y = (truth[:, :1] * np.exp(-0.5 * ((t - truth[:, 1:2]) / truth[:, 2:3]) ** 2)
         + truth[:, 3:] + 0.05 * rng.standard_normal((B, m)))

    def peaks(p, y):
        return p[:, :1] * np.exp(-0.5 * ((t - p[:, 1:2]) / p[:, 2:3]) ** 2) + p[:, 3:] - y

    def peak(p, y):
        return p[0] * np.exp(-0.5 * ((t - p[1]) / p[2]) ** 2) + p[3] - y

    x0 = np.tile([2.0, 0.0, 1.0, 0.2], (B, 1))
    t0 = time.perf_counter()
    res = batch_least_squares(peaks, x0, args=(y,), method="trf")
    t_batch = time.perf_counter() - t0
    n_ref = 200
    t0 = time.perf_counter()
    ref = [scipy_least_squares(peak, x0[i], args=(y[i],), method="trf") for i in range(n_ref)]
    t_loop = (time.perf_counter() - t0) * B / n_ref
    ref_cost = np.array([r.cost for r in ref])
    agree = np.mean(res.cost[:n_ref] <= ref_cost * (1 + 1e-6))
    print(f"\n{B} Gaussian-peak fits (n=4, m={m}, 'trf', 2-point Jacobian):")
    print(f"  batch_least_squares  {t_batch:7.2f} s   ({B / t_batch:9.0f} fits/s)")
    print(f"  scipy loop (est.)    {t_loop:7.2f} s   ({B / t_loop:9.0f} fits/s)")
    print(f"  speed-up {t_loop / t_batch:.1f}x; cost equal to scipy's (rel 1e-6) or lower "
          f"on {100 * agree:.1f}% of the {n_ref} problems checked")
    print(f"  {res!r}")


def main() -> None:
    """Print the comparison tables."""
    print(f"torchimize_scipy {__version__}  (torch {torch.__version__}, scipy "
          f"{scipy.__version__}, {torch.get_num_threads()} threads)\n")
    _single_problems()
    _curve_fit_demo()
    _batch_demo()


if __name__ == "__main__":
    main()
