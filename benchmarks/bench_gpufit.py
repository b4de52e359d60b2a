"""Gpufit's published benchmark with ``batch_least_squares`` on a GPU.

The set-up of Gpufit's ``examples/Gpufit_Cpufit_Performance_Comparison.cpp``:
a symmetric 2-D Gaussian ``A exp(-((x - x0)^2 + (y - y0)^2) / (2 s^2)) + b``
(5 parameters) on 5 x 5 pixels (x, y = 0..4); true parameters
``[500, 2, 2, 1, 10] * (0.9 + 0.2 U(0, 1))`` drawn per fit; additive Gaussian
noise of standard deviation 17.05 (Gpufit's SNR 10); starting points
``truth * (0.9 + 0.2 U(0, 1))``; tolerance 1e-4 on the relative change of
chi-square, at most 10 iterations; 10^4 ... 10^7 fits, float32 and float64.

Here: ``method='lm'`` (``--method`` to change), analytic Jacobian, torch
model, ``ftol=1e-4`` (xtol, gtol at scipy's 1e-8), ``max_nfev=11`` (the
starting evaluation + 10 iterations; MINPACK counts one residual evaluation
per trial step, as Gpufit counts one iteration per trial step),
``return_jac=False``. As in Gpufit's timing, the measured time goes from host
arrays to host arrays: copying data and starting points to the device, the
fits, and copying the parameters back. One warm-up call precedes the timings.
A scipy loop (same options, float64, CPU) on ``--scipy-subset`` fits gives a
CPU reference.

Runs on ``--device cuda`` (the default); when CUDA is not available it says so
and exits. ``--device cpu --quick`` (10^3 and 10^4 fits) validates the script
on a CPU; ``--device cpu`` without ``--quick`` runs 10^4 ... 10^6.

Usage::

    python benchmarks/bench_gpufit.py [--device cuda] [--dtype both|float32|float64]
           [--sizes 10000 100000 1000000 10000000] [--chunk-size N] [--quick]
"""

from __future__ import annotations

from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import torch
from _common import (
    base_parser,
    cuda_requested_but_missing,
    md_table,
    scipy_loop,
    setup,
    sync,
    timed,
    to_numpy,
    write_json,
)

from torchimize_scipy import batch_least_squares

SIZE = 5
N_POINTS = SIZE * SIZE
TRUE = np.array([500.0, SIZE / 2 - 0.5, SIZE / 2 - 0.5, 1.0, 10.0])
#: Gpufit: std = mean amplitude / SNR, mean amplitude = 2 pi A s^2 / (4.292 s)^2
NOISE_STD = 2 * np.pi * TRUE[0] * TRUE[3] ** 2 / (4.292 * TRUE[3]) ** 2 / 10.0
_iy, _ix = np.divmod(np.arange(N_POINTS), SIZE)
GRID_X = _ix.astype(float)
GRID_Y = _iy.astype(float)
BLOCK = 1 << 18


def gpufit_data(n_fits: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Data ``(n, 25)``, truth ``(n, 5)`` and starting points ``(n, 5)``, float64."""
    data = np.empty((n_fits, N_POINTS))
    truth = np.empty((n_fits, 5))
    start = np.empty((n_fits, 5))
    for k, lo in enumerate(range(0, n_fits, BLOCK)):
        hi = min(n_fits, lo + BLOCK)
        rng = np.random.default_rng([seed, k])
        t = TRUE * (0.9 + 0.2 * rng.random((hi - lo, 5)))
        data[lo:hi] = gauss2d_np(t) + NOISE_STD * rng.standard_normal((hi - lo, N_POINTS))
        truth[lo:hi] = t
        start[lo:hi] = t * (0.9 + 0.2 * rng.random((hi - lo, 5)))
    return data, truth, start


def gauss2d_np(p: np.ndarray) -> np.ndarray:
    a, x0, y0, s, b = (p[:, i : i + 1] for i in range(5))
    r2 = (GRID_X - x0) ** 2 + (GRID_Y - y0) ** 2
    return a * np.exp(-0.5 * r2 / (s * s)) + b


def gauss2d_1d(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    r2 = (GRID_X - p[1]) ** 2 + (GRID_Y - p[2]) ** 2
    return p[0] * np.exp(-0.5 * r2 / (p[3] * p[3])) + p[4] - y


def gauss2d_jac_1d(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    dx, dy = GRID_X - p[1], GRID_Y - p[2]
    s2 = p[3] * p[3]
    e = np.exp(-0.5 * (dx * dx + dy * dy) / s2)
    ae = p[0] * e / s2
    return np.column_stack([e, ae * dx, ae * dy, ae * (dx * dx + dy * dy) / p[3],
                            np.ones(N_POINTS)])


_GRID: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _grid(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    key = (like.device, like.dtype)
    if key not in _GRID:
        _GRID[key] = (torch.as_tensor(GRID_X, device=like.device, dtype=like.dtype),
                      torch.as_tensor(GRID_Y, device=like.device, dtype=like.dtype))
    return _GRID[key]


def gauss2d(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Residuals ``(b, 25)`` of a batch ``p (b, 5)``."""
    gx, gy = _grid(p)
    a, x0, y0, s, b = (c[:, None] for c in p.unbind(-1))
    r2 = (gx - x0) ** 2 + (gy - y0) ** 2
    return a * torch.exp(-0.5 * r2 / (s * s)) + b - y


def gauss2d_jac(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Analytic Jacobians ``(b, 25, 5)``."""
    gx, gy = _grid(p)
    a, x0, y0, s, _ = (c[:, None] for c in p.unbind(-1))
    dx, dy = gx - x0, gy - y0
    r2 = dx * dx + dy * dy
    inv_s2 = 1.0 / (s * s)
    e = torch.exp(-0.5 * r2 * inv_s2)
    ae = a * e * inv_s2
    return torch.stack([e, ae * dx, ae * dy, ae * r2 / s, torch.ones_like(e)], dim=-1)


def run_once(data: np.ndarray, start: np.ndarray, dev: torch.device, dt: torch.dtype,
             options: dict[str, Any]) -> tuple[float, Any, torch.Tensor]:
    """Host arrays -> device -> fits -> parameters on the host; returns (seconds, res, x)."""
    # the host copies in the target dtype exist before the clock starts (Gpufit gets them so)
    data_h = torch.from_numpy(data).to(dt)
    start_h = torch.from_numpy(start).to(dt)
    if dev.type == "cuda":
        data_h = data_h.pin_memory()
        start_h = start_h.pin_memory()

    def call():
        y = data_h.to(dev, non_blocking=True)
        p0 = start_h.to(dev, non_blocking=True)
        res = batch_least_squares(gauss2d, p0, jac=gauss2d_jac, args=(y,), return_jac=False,
                                  **options)
        return res, res.x.cpu()

    seconds, (res, x) = timed(call, dev)
    return seconds, res, x


def main() -> None:
    p = base_parser(__doc__, device="cuda", dtype="both", dtypes=("both", "float32", "float64"))
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="numbers of fits (default 10^4..10^7 on CUDA, 10^4..10^6 on CPU, "
                        "10^3 10^4 with --quick)")
    p.add_argument("--method", default="lm", choices=["lm", "trf", "dogbox"])
    p.add_argument("--tolerance", type=float, default=1e-4, help="ftol (Gpufit: 1e-4)")
    p.add_argument("--max-iter", type=int, default=10, help="iterations (max_nfev = this + 1)")
    p.add_argument("--chunk-size", type=int, default=None, help="batch_least_squares chunk_size")
    p.add_argument("--scipy-subset", type=int, default=None,
                   help="fits solved by a scipy loop as CPU reference (default 1000; quick 200; "
                        "0 to skip)")
    args = p.parse_args()
    dev, _ = setup(args)
    if cuda_requested_but_missing(dev):
        print("CUDA is not available on this machine: the Gpufit benchmark needs "
              "--device cuda on a GPU machine (use --device cpu --quick to check the script).")
        return
    if args.sizes:
        sizes = args.sizes
    elif args.quick:
        sizes = [10**3, 10**4]
    elif dev.type == "cuda":
        sizes = [10**4, 10**5, 10**6, 10**7]
    else:
        sizes = [10**4, 10**5, 10**6]
    dtypes = ["float32", "float64"] if args.dtype == "both" else [args.dtype]
    options: dict[str, Any] = {"method": args.method, "ftol": args.tolerance,
                               "max_nfev": args.max_iter + 1, "chunk_size": args.chunk_size}
    print(f"generating {max(sizes):,} fits ...", flush=True)
    data, truth, start = gpufit_data(max(sizes), args.seed)

    scipy_ref = None
    ref_cost = None
    S = args.scipy_subset if args.scipy_subset is not None else (200 if args.quick else 1000)
    if S > 0:
        S = min(S, max(sizes))
        ref = scipy_loop(gauss2d_1d, gauss2d_jac_1d, start[:S], data[:S], args.method,
                         ftol=args.tolerance, max_nfev=args.max_iter + 1)
        ref_cost = ref["cost"]
        scipy_ref = {"fits": S, "seconds": ref["seconds"], "fits_per_s": S / ref["seconds"],
                     "converged": float((ref["status"] > 0).mean()),
                     "nfev_mean": float(ref["nfev"].mean())}
        print(f"scipy loop ({args.method}, CPU, float64): {scipy_ref['fits_per_s']:.0f} fits/s "
              f"on {S:,} fits", flush=True)

    rows: list[dict[str, Any]] = []
    for dname in dtypes:
        dt = torch.float32 if dname == "float32" else torch.float64
        run_once(data[:1000], start[:1000], dev, dt, options)  # warm-up
        for n_fits in sizes:
            if dev.type == "cuda":
                sync(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            seconds, res, x = run_once(data[:n_fits], start[:n_fits], dev, dt, options)
            status = to_numpy(res.status)
            nfev = to_numpy(res.nfev)
            err = np.abs(to_numpy(x).astype(float)[:, 1] - truth[:n_fits, 1])
            row = {"dtype": dname, "fits": n_fits, "seconds": seconds,
                   "fits_per_s": n_fits / seconds, "converged": float((status > 0).mean()),
                   "max_nfev_reached": float((status == 0).mean()),
                   "nfev_mean": float(nfev.mean()), "median_abs_err_x0": float(np.median(err))}
            if ref_cost is not None:
                # final cost against scipy's on its subset (float32: to 1e-3 relative)
                k = min(len(ref_cost), n_fits)
                ours = to_numpy(res.cost)[:k].astype(float)
                rtol = 1e-6 if dname == "float64" else 1e-3
                close = np.abs(ours - ref_cost[:k]) <= rtol * np.abs(ref_cost[:k])
                row["cost_rtol"] = rtol
                row["cost_equal_share"] = float(close.mean())
                row["cost_lower_share"] = float((~close & (ours < ref_cost[:k])).mean())
            if dev.type == "cuda":
                row["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
            rows.append(row)
            print(f"  {dname} {n_fits:>10,}: {row['fits_per_s']:12.0f} fits/s", flush=True)
            del res, x

    print(f"\n### Gpufit benchmark (2-D Gaussian, 5x5 pixels, 5 parameters), {args.method}, "
          f"{args.device}\n")
    gpu = dev.type == "cuda"
    headers = ["dtype", "fits", "time (s)", "fits/s", "converged", "hit 10 iterations",
               "mean nfev", "median abs. error of x0"] + (
                   ["cost = / < scipy"] if ref_cost is not None else []) + (
                   ["GPU peak (GiB)"] if gpu else [])
    table = []
    for r in rows:
        line = [r["dtype"], r["fits"], r["seconds"], r["fits_per_s"],
                f"{100 * r['converged']:.1f}%", f"{100 * r['max_nfev_reached']:.1f}%",
                f"{r['nfev_mean']:.2f}", f"{r['median_abs_err_x0']:.3g}"]
        if ref_cost is not None:
            line.append(f"{100 * r['cost_equal_share']:.1f}% / {100 * r['cost_lower_share']:.1f}%")
        if gpu:
            line.append(f"{r['gpu_peak_bytes'] / 2**30:.2f}")
        table.append(line)
    print(md_table(headers, table))
    print(f"\nTime: host arrays -> {args.device} -> fits -> parameters back on the host "
          f"(as Gpufit times it); ftol={args.tolerance:g}, max_nfev={args.max_iter + 1}, "
          f"analytic Jacobian, return_jac=False.")
    if scipy_ref:
        print(f"CPU reference: scipy least_squares loop, same options, float64: "
              f"{scipy_ref['fits_per_s']:.0f} fits/s ({scipy_ref['fits']:,} fits, "
              f"{args.threads} BLAS threads). cost = / < scipy: share of those fits whose "
              "final cost equals scipy's (relative 1e-6 in float64, 1e-3 in float32) / is "
              "lower.")
    path = write_json(args, "bench_gpufit", {
        "problem": "Gpufit GAUSS_2D, 5x5 pixels, SNR 10, see benchmarks/bench_gpufit.py",
        "options": {k: v for k, v in options.items()}, "rows": rows, "scipy": scipy_ref})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
