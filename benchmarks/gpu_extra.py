"""GPU checks beyond ``gpu_session.sh``: large sparse problems and Dask workers on a GPU.

Two parts, for a session lent a GPU machine (RESULTS §9):

``sparse`` (issue 13: "where a GPU is available, the same three on it,
float64, and float32 with its cost")
    The bundle adjustment of ``bench_sparse.py`` (49 cameras, 7,776 points:
    n = 23,769, m ~ 62,000, ``jac_sparsity``, ``x_scale='jac'``,
    ``ftol=1e-4``, 'trf') with its torch residuals on the device, and the
    Broyden tridiagonal problem (``jac_sparsity``, ``tr_solver='lsmr'``) at
    n = 100,000 and n = 1,000,000 with torch residuals on the device, each in
    float64 and float32, against scipy (numpy residuals, on the machine's CPU)
    in the same run: wall time, final cost, nfev, peak GPU memory.

``dask`` (issue 16: workers that have GPUs, ``device=`` applied on each)
    A ``distributed.LocalCluster`` of one worker process; 10^5 Gaussian peaks
    as dask arrays solved with ``device="cuda"`` and a torch model that
    captures a CUDA tensor (shipped by cloudpickle) and checks on every call
    that it runs on the GPU; the result must equal the in-process call on the
    same blocks. docs/cluster.md's "GPUs" example, run for real.

Usage (on the GPU machine; dask and distributed travel as wheels there)::

    python benchmarks/gpu_extra.py sparse dask --device cuda
    python benchmarks/gpu_extra.py sparse dask --device cpu --quick   # dry run here
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import scipy.optimize
import torch
from _common import base_parser, md_table, peak_data, setup, timed, write_json
from bench_sparse import broyden_np, bundle_adjustment, tridiagonal

from torchimize_scipy import batch_least_squares, least_squares


def broyden_torch(x: torch.Tensor) -> torch.Tensor:
    """Broyden tridiagonal residuals in torch (the same formula as ``broyden_np``)."""
    f = (3 - x) * x + 1
    f[1:] -= x[:-1]
    f[:-1] -= 2 * x[1:]
    return f


def _gpu_peak(dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(dev) / 2**30


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _row(res: Any) -> dict[str, Any]:
    return {"cost": float(res.cost), "nfev": int(res.nfev), "status": int(res.status)}


def run_sparse(args: Any, dev: torch.device) -> list[dict[str, Any]]:
    """The three large problems in float64 and float32 on ``dev``, scipy beside them."""
    rows: list[dict[str, Any]] = []
    size = dict(n_cameras=8, n_points=500) if args.quick else {}
    ba = bundle_adjustment(seed=args.seed, **size)
    opts_ba = dict(jac_sparsity=ba["sparsity"], x_scale="jac", ftol=1e-4, method="trf")
    t, ref = timed(lambda: scipy.optimize.least_squares(ba["fun_np"], ba["x0"], **opts_ba))
    rows.append({"problem": "bundle adjustment", "who": "scipy (CPU, numpy)", "dtype": "float64",
                 "time_s": t, **_row(ref)})
    for dt in (torch.float64, torch.float32):
        x0 = torch.as_tensor(ba["x0"], device=dev, dtype=dt)
        least_squares(ba["fun_torch"], x0, **opts_ba)  # warm-up (kernels, allocator)
        _reset_peak(dev)
        t, res = timed(lambda x0=x0: least_squares(ba["fun_torch"], x0, **opts_ba), dev)
        rows.append({"problem": "bundle adjustment", "who": f"ours ({dev.type}, torch)",
                     "dtype": str(dt).split(".")[1], "time_s": t, **_row(res),
                     "gpu_peak_gib": _gpu_peak(dev)})
        print(rows[-1], flush=True)
    for n in ((2000, 20_000) if args.quick else (100_000, 1_000_000)):
        S = tridiagonal(n)
        opts = dict(jac_sparsity=S, tr_solver="lsmr", method="trf")
        x0n = -np.ones(n)
        t, ref = timed(lambda x0n=x0n, opts=opts: scipy.optimize.least_squares(
            broyden_np, x0n, **opts))
        rows.append({"problem": f"Broyden n={n:,}", "who": "scipy (CPU, numpy)",
                     "dtype": "float64", "time_s": t, **_row(ref)})
        for dt in (torch.float64, torch.float32):
            x0 = torch.full((n,), -1.0, device=dev, dtype=dt)
            least_squares(broyden_torch, x0, **opts)
            _reset_peak(dev)
            t, res = timed(lambda x0=x0, opts=opts: least_squares(broyden_torch, x0, **opts),
                           dev)
            rows.append({"problem": f"Broyden n={n:,}", "who": f"ours ({dev.type}, torch)",
                         "dtype": str(dt).split(".")[1], "time_s": t, **_row(res),
                         "gpu_peak_gib": _gpu_peak(dev)})
            print(rows[-1], flush=True)
    print(md_table(["problem", "who", "dtype", "time (s)", "cost", "nfev", "status",
                    "GPU peak (GiB)"],
                   [[r["problem"], r["who"], r["dtype"], r["time_s"], r["cost"], r["nfev"],
                     r["status"], r.get("gpu_peak_gib") or ""] for r in rows]))
    return rows


def run_dask(args: Any, dev: torch.device) -> dict[str, Any]:
    """One GPU worker process: dask blocks solved with ``device=``, against in-process."""
    import dask.array as da
    from _common import PEAK_T
    from distributed import Client, LocalCluster

    B = 20_000 if args.quick else 100_000
    chunk = B // 4
    y, _, p0 = peak_data(B, seed=args.seed)
    tt = torch.as_tensor(PEAK_T, device=dev)  # captured by the model, shipped with it
    want = dev.type

    def peak_torch(p: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if p.device.type != want:
            raise RuntimeError(f"the model ran on {p.device}, not on {want}")
        a, mu, s, c = p.unbind(-1)
        z = (tt.to(p.device) - mu[:, None]) / s[:, None]
        return a[:, None] * torch.exp(-0.5 * z * z) + c[:, None] - yb

    opts = dict(jac="autograd", method="lm", device=args.device)
    # in process, the same blocks as torch tensors on the device (what a worker hands `fun`)
    p0t, yt = torch.as_tensor(p0, device=dev), torch.as_tensor(y, device=dev)
    t_mem, mem = timed(lambda: [batch_least_squares(peak_torch, p0t[i:i + chunk],
                                                    args=(yt[i:i + chunk],), **opts)
                                for i in range(0, B, chunk)], dev)
    x_mem = torch.cat([r.x for r in mem]).cpu().numpy()
    t0 = time.perf_counter()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        t_start = time.perf_counter() - t0
        client.run(__import__, "torchimize_scipy")
        yd = da.from_array(y, chunks=(chunk, -1))
        pd = da.from_array(p0, chunks=(chunk, -1))
        lazy = batch_least_squares(peak_torch, pd, args=(yd,), **opts)
        t_dask, res = timed(lambda: lazy.compute())
    same = bool(np.array_equal(res.x, x_mem))
    dx = float(np.max(np.abs(res.x - x_mem)))
    out = {"B": B, "chunk": chunk, "device": str(dev), "in_process_s": t_mem,
           "cluster_start_s": t_start, "dask_compute_s": t_dask, "bitwise_equal": same,
           "max_abs_dx": dx, "all_success": bool(np.all(res.status > 0)),
           "result_type": type(res.x).__name__}
    print(json.dumps(out, indent=1))
    return out


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0], device="cuda")
    p.add_argument("parts", nargs="+", choices=["sparse", "dask"])
    args = p.parse_args()
    dev, _ = setup(args)
    print("python", sys.version.split()[0], "| torch", torch.__version__, "| device", dev,
          torch.cuda.get_device_name(dev) if dev.type == "cuda" else "", flush=True)
    results: dict[str, Any] = {}
    if "sparse" in args.parts:
        results["sparse"] = run_sparse(args, dev)
    if "dask" in args.parts:
        results["dask"] = run_dask(args, dev)
    print("results:", write_json(args, "gpu_extra", results))


if __name__ == "__main__":
    main()
