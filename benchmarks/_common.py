"""Shared helpers of the benchmark scripts: options, timing, tables, JSON, problems.

Import ``_env`` before this module (it sets the BLAS thread variables before
numpy is loaded). Nothing here is part of the ``torchimize_scipy`` package.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import scipy.optimize
import torch

import torchimize_scipy

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


# --------------------------------------------------------------------------- options
def base_parser(description: str, *, device: str = "cpu", dtype: str = "float64",
                dtypes: tuple[str, ...] = ("float64", "float32")) -> argparse.ArgumentParser:
    """An argument parser with the options every script shares."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=device,
                   help=f"torch device for our solver (cpu, cuda, ...; default {device})")
    p.add_argument("--dtype", default=dtype, choices=dtypes,
                   help=f"dtype of our solver (default {dtype}; scipy always runs in float64)")
    p.add_argument("--threads", type=int, default=2,
                   help="threads for torch and for numpy/scipy BLAS (default 2)")
    p.add_argument("--quick", action="store_true", help="small sizes, to validate the script")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                   help="folder of the JSON results (default benchmarks/results)")
    return p


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Apply ``--threads``; return the torch device and dtype of ``args``."""
    torch.set_num_threads(max(1, args.threads))
    dev = torch.device(args.device)
    dt = torch.float32 if args.dtype == "float32" else torch.float64
    return dev, dt


def cuda_requested_but_missing(dev: torch.device) -> bool:
    """True when ``dev`` is a CUDA device and CUDA is not available."""
    return dev.type == "cuda" and not torch.cuda.is_available()


# --------------------------------------------------------------------------- timing
def sync(dev: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if torch.cuda.is_available() and (dev is None or torch.device(dev).type == "cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], dev: torch.device | None = None) -> tuple[float, Any]:
    """Run ``fn`` once; return (seconds, result), GPU work included."""
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t0, out


def median_time(fn: Callable[[], Any], *, repeat: int = 5, min_time: float = 0.0,
                max_repeat: int = 1000, dev: torch.device | None = None) -> tuple[float, Any]:
    """Median wall time of ``fn`` over at least ``repeat`` runs (and ``min_time`` s).

    One untimed warm-up run comes first. Returns (median seconds, last result).
    """
    out = fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start < min_time
                                  and len(times) < max_repeat):
        t, out = timed(fn, dev)
        times.append(t)
    return statistics.median(times), out


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def current_rss_bytes() -> int:
    """Current resident set size (Linux ``/proc``; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


# --------------------------------------------------------------------------- output
def fmt(x: Any, digits: int = 3) -> str:
    """Compact number formatting for tables."""
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    x = float(x)
    if not np.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e5 or abs(x) < 1e-3:
        return f"{x:.{digits}g}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table with formatted cells."""
    cells = [[fmt(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Versions, hardware and options, stored with every JSON file."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "numpy": np.__version__, "scipy": scipy.__version__,
        "torchimize_scipy": torchimize_scipy.__version__, "threads": args.threads,
        "torch_threads": torch.get_num_threads(), "device": str(args.device),
        "dtype": args.dtype, "quick": bool(args.quick),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.device(args.device).type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def result_path(args: argparse.Namespace, stem: str, suffix: str = ".json") -> Path:
    """``<out-dir>/<stem>_<device>_<dtype>[_quick]<suffix>``."""
    dev = torch.device(args.device).type
    tag = f"{stem}_{dev}_{args.dtype}" + ("_quick" if args.quick else "")
    return Path(args.out_dir) / f"{tag}{suffix}"


def write_json(args: argparse.Namespace, stem: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus :func:`environment`) as JSON; return the path."""
    path = result_path(args, stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": stem, "environment": environment(args), **payload}
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


# --------------------------------------------------------------------------- cost checks
def compare_costs(ours: np.ndarray, ref: np.ndarray, rtol: float = 1e-6) -> dict[str, float]:
    """Shares of problems whose cost equals ``ref`` (relative ``rtol``), is lower, is higher.

    ``reached`` = equal or lower; non-finite costs of ours count as higher.
    """
    ours = np.asarray(ours, dtype=float)
    ref = np.asarray(ref, dtype=float)
    n = len(ref)
    if n == 0:
        return {"n": 0, "equal": float("nan"), "lower": float("nan"),
                "higher": float("nan"), "reached": float("nan")}
    tol = rtol * np.maximum(np.abs(ref), np.finfo(float).tiny)
    finite = np.isfinite(ours)
    equal = finite & (np.abs(ours - ref) <= tol)
    lower = finite & ~equal & (ours < ref)
    higher = ~equal & ~lower
    return {"n": n, "equal": float(equal.mean()), "lower": float(lower.mean()),
            "higher": float(higher.mean()), "reached": float((equal | lower).mean())}


# --------------------------------------------------------------------------- Gaussian peak
#: Sample points of the 1-D Gaussian-peak problems (m = 64).
PEAK_M = 64
PEAK_T = np.linspace(-3.0, 3.0, PEAK_M)
PEAK_BLOCK = 4096  # problems per random block: problem i's data does not depend on B


def peak_data(B: int, seed: int = 0, dtype: Any = np.float64,
              noise: float = 0.05) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``B`` noisy Gaussian peaks ``a exp(-((t - mu)/s)^2 / 2) + c`` on 64 points.

    Truth: ``a ~ U(1, 3)``, ``mu ~ U(-1, 1)``, ``s ~ U(0.4, 1)``,
    ``c ~ U(-0.2, 0.2)``; noise ``N(0, 0.05)``; start ``a (1 + 0.2u)``,
    ``mu + 0.3u``, ``s (1 + 0.2u)``, ``c + 0.1u`` with ``u ~ U(-1, 1)``.
    Generated in blocks of 4,096 problems seeded by ``(seed, block)``, so
    problem ``i`` is the same for every ``B`` and memory stays at ``y``.

    Returns ``y (B, 64)``, ``p_true (B, 4)``, ``p0 (B, 4)`` in ``dtype``.
    """
    y = np.empty((B, PEAK_M), dtype=dtype)
    p_true = np.empty((B, 4), dtype=dtype)
    p0 = np.empty((B, 4), dtype=dtype)
    for k, start in enumerate(range(0, B, PEAK_BLOCK)):
        rng = np.random.default_rng([seed, k])
        b = PEAK_BLOCK
        lo = np.array([1.0, -1.0, 0.4, -0.2])
        hi = np.array([3.0, 1.0, 1.0, 0.2])
        truth = lo + (hi - lo) * rng.random((b, 4))
        u = rng.uniform(-1.0, 1.0, (b, 4))
        start_pt = np.column_stack([truth[:, 0] * (1 + 0.2 * u[:, 0]),
                                    truth[:, 1] + 0.3 * u[:, 1],
                                    truth[:, 2] * (1 + 0.2 * u[:, 2]),
                                    truth[:, 3] + 0.1 * u[:, 3]])
        clean = peak_np(truth, np.zeros((b, PEAK_M)))
        data = clean + noise * rng.standard_normal((b, PEAK_M))
        stop = min(B, start + b)
        y[start:stop] = data[: stop - start]
        p_true[start:stop] = truth[: stop - start]
        p0[start:stop] = start_pt[: stop - start]
    return y, p_true, p0


def peak_np(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Residuals of a batch, numpy: ``p (b, 4)``, ``y (b, 64)`` -> ``(b, 64)``."""
    a, mu, s, c = (p[:, i : i + 1] for i in range(4))
    z = (PEAK_T - mu) / s
    return a * np.exp(-0.5 * z * z) + c - y


def peak_jac_np(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Analytic Jacobians of a batch, numpy, ``(b, 64, 4)``, written column by column."""
    a, mu, s = (p[:, i : i + 1] for i in range(3))
    z = (PEAK_T - mu) / s
    e = np.exp(-0.5 * z * z)
    J = np.empty((p.shape[0], PEAK_M, 4), dtype=np.result_type(p, y))
    J[..., 0] = e
    dmu = np.multiply(e, a / s, out=J[..., 1])
    dmu *= z
    np.multiply(dmu, z, out=J[..., 2])
    J[..., 3] = 1.0
    return J


def peak_1d(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Residuals of one problem (scipy convention): ``p (4,)``, ``y (64,)``."""
    z = (PEAK_T - p[1]) / p[2]
    return p[0] * np.exp(-0.5 * z * z) + p[3] - y


def peak_jac_1d(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Analytic Jacobian of one problem, ``(64, 4)``."""
    z = (PEAK_T - p[1]) / p[2]
    e = np.exp(-0.5 * z * z)
    J = np.empty((PEAK_M, 4))
    J[:, 0] = e
    J[:, 1] = p[0] * e * z / p[2]
    J[:, 2] = p[0] * e * z * z / p[2]
    J[:, 3] = 1.0
    return J


_T_CACHE: dict[tuple, torch.Tensor] = {}


def _peak_t(like: torch.Tensor) -> torch.Tensor:
    key = (like.device, like.dtype)
    t = _T_CACHE.get(key)
    if t is None:
        t = torch.as_tensor(PEAK_T, device=like.device, dtype=like.dtype)
        _T_CACHE[key] = t
    return t


def peak_torch(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Residuals of a batch, torch (differentiable, for ``jac='autograd'``)."""
    a, mu, s, c = p.unbind(-1)
    z = (_peak_t(p) - mu[:, None]) / s[:, None]
    return a[:, None] * torch.exp(-0.5 * z * z) + c[:, None] - y


def peak_jac_torch(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Analytic Jacobians of a batch, torch, ``(b, 64, 4)``, written column by column."""
    a, mu, s, _ = p.unbind(-1)
    t = _peak_t(p)
    J = p.new_empty((p.shape[0], t.shape[0], 4))
    z = (t - mu[:, None]) / s[:, None]
    e = torch.exp(-0.5 * z * z)
    J[..., 0] = e
    dmu = torch.mul(e, (a / s)[:, None], out=J[..., 1]).mul_(z)  # a e z / s
    torch.mul(dmu, z, out=J[..., 2])
    J[..., 3] = 1.0
    return J


def scipy_loop(fun: Callable, jac: Any, p0: np.ndarray, data: np.ndarray, method: str,
               **options: Any) -> dict[str, Any]:
    """Solve problem ``i`` = ``fun(p, data[i])`` from ``p0[i]`` with scipy, one by one."""
    B = len(p0)
    cost = np.empty(B)
    status = np.empty(B, dtype=int)
    nfev = np.empty(B, dtype=int)
    x = np.empty_like(p0, dtype=float)
    t0 = time.perf_counter()
    for i in range(B):
        r = scipy.optimize.least_squares(fun, p0[i].astype(float), jac=jac, method=method,
                                         args=(data[i].astype(float),), **options)
        cost[i], status[i], nfev[i], x[i] = r.cost, r.status, r.nfev, r.x
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cost": cost, "status": status, "nfev": nfev, "x": x}


def status_counts(status: Any) -> dict[str, int]:
    """``{status: count}`` for JSON."""
    s = np.asarray(status.cpu() if isinstance(status, torch.Tensor) else status)
    vals, counts = np.unique(s, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(vals, counts, strict=True)}


def to_numpy(a: Any) -> np.ndarray:
    """Host numpy copy of a tensor or array."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def gib(nbytes: float) -> float:
    """Bytes to GiB."""
    return nbytes / 2**30
