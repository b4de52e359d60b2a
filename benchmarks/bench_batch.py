"""Batched Gaussian-peak fits: ``batch_least_squares`` vs a loop of scipy ``least_squares``.

Problems: ``B`` (default 20,000) noisy 1-D Gaussian peaks
``a exp(-((t - mu)/s)^2 / 2) + c`` on 64 points (n = 4 parameters), fixed seed,
starting points perturbed from the truth (see ``_common.peak_data``).

Part 1 -- for each method ('lm', 'trf') and each way of giving the model:

* numpy model, analytic Jacobian (numpy)         vs scipy, analytic Jacobian
* numpy model, ``jac='2-point'``                 vs scipy, '2-point'
* torch model, ``jac='autograd'``                vs scipy, analytic Jacobian
* torch model, analytic Jacobian (torch)         vs scipy, analytic Jacobian

it times one ``batch_least_squares`` call on all B problems (median of
``--repeat`` runs after a warm-up) and a scipy loop on the first
``--scipy-subset`` problems (default 1,000), run ``--scipy-repeat`` times (default 3;
the median), whose fits/s is extrapolated to B. With ``--interleave`` the scipy
loop and our call alternate ``--repeat`` times instead, and the speed-up is the
median of the rounds' ratios (this machine's speed drifts between minutes);
``--variants`` picks some of the four ways of giving the model.
Cost agreement is computed on that subset: a problem is "equal" when
``|cost_ours - cost_scipy| <= rtol * cost_scipy`` (rtol 1e-6), "lower" when
ours is lower beyond that, "higher" otherwise.

Part 2 -- fits/s and peak memory vs batch size (1 ... 10^6, two sizes per
decade; ``--quick`` stops at 10^4), one subprocess per size so that
``ru_maxrss`` is that size's peak (on CUDA: ``torch.cuda.max_memory_allocated``),
with a plot (``benchmarks/batch_scaling.png`` for a full CPU float64 run)
when matplotlib is installed.

Part 3 -- fits/s and user/system CPU time vs ``chunk_size`` (1,000 ... the
library default) on 10^5 problems (``--quick``: 10^4).

Usage::

    python benchmarks/bench_batch.py [--quick] [--device cuda] [--dtype float32]
           [--threads 2] [--batch 20000] [--scipy-subset 1000] [--chunk-size N]
           [--interleave] [--variants "torch model, analytic jac" ...]
           [--no-comparison] [--no-scaling] [--no-chunk-sweep]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import torch
from _common import (
    BENCH_DIR,
    base_parser,
    compare_costs,
    cuda_requested_but_missing,
    current_rss_bytes,
    gib,
    md_table,
    peak_1d,
    peak_data,
    peak_jac_1d,
    peak_jac_np,
    peak_jac_torch,
    peak_np,
    peak_rss_bytes,
    peak_torch,
    result_path,
    scipy_loop,
    setup,
    status_counts,
    sync,
    timed,
    to_numpy,
    write_json,
)

from torchimize_scipy import batch_least_squares
from torchimize_scipy._batch import default_chunk_size

#: name -> (model kind, our jac, scipy jac)
VARIANTS = {
    "numpy model, analytic jac": ("numpy", "analytic", "analytic"),
    "numpy model, 2-point": ("numpy", "2-point", "2-point"),
    "torch model, autograd": ("torch", "autograd", "analytic"),
    "torch model, analytic jac": ("torch", "analytic", "analytic"),
}


def make_call(variant: str, p0: np.ndarray, y: np.ndarray, dev: torch.device, dt: torch.dtype,
              method: str, return_jac: bool = True, chunk_size: int | None = None):
    """A zero-argument callable running ``batch_least_squares`` for ``variant``."""
    kind, jac, _ = VARIANTS[variant]
    if kind == "numpy":
        fun = peak_np
        jac_arg: Any = peak_jac_np if jac == "analytic" else jac
        x0: Any = p0
        data: Any = y
        extra = {"device": dev, "dtype": dt}
    else:
        fun = peak_torch
        jac_arg = peak_jac_torch if jac == "analytic" else jac
        x0 = torch.as_tensor(p0, dtype=dt).to(dev)
        data = torch.as_tensor(y, dtype=dt).to(dev)
        extra = {}

    def call():
        return batch_least_squares(fun, x0, jac=jac_arg, method=method, args=(data,),
                                   return_jac=return_jac, chunk_size=chunk_size, **extra)

    return call


def model_seconds(variant: str, p0: np.ndarray, y: np.ndarray, dev: torch.device,
                  dt: torch.dtype, res: Any, repeat: int) -> float | None:
    """Time the user's model alone would take for the evaluations the solver made.

    ``t_f * mean(nfev) + t_J * mean(njev)``, with ``t_f``/``t_J`` the median
    time of one call on all B problems (analytic Jacobians only): a ceiling
    on the speed any solver can reach with this model on this machine.
    """
    kind, jac, _ = VARIANTS[variant]
    if jac != "analytic" or res.njev is None:
        return None
    if kind == "numpy":
        f, J, args = peak_np, peak_jac_np, (p0, y)
    else:
        f, J = peak_torch, peak_jac_torch
        args = (torch.as_tensor(p0, dtype=dt).to(dev), torch.as_tensor(y, dtype=dt).to(dev))
    t_f = float(np.median([timed(lambda: f(*args), dev)[0] for _ in range(repeat)]))
    t_J = float(np.median([timed(lambda: J(*args), dev)[0] for _ in range(repeat)]))
    return (t_f * float(to_numpy(res.nfev).mean()) + t_J * float(to_numpy(res.njev).mean()))


def run_comparison(args, dev, dt) -> list[dict[str, Any]]:
    B = args.batch or (2000 if args.quick else 20000)
    S = min(B, args.scipy_subset or (200 if args.quick else 1000))
    repeat = args.repeat or (1 if args.quick else 3)
    scipy_repeat = args.scipy_repeat or (1 if args.quick else 3)
    y, _, p0 = peak_data(B, seed=args.seed)
    scipy_jacs = {"analytic": peak_jac_1d, "2-point": "2-point"}
    ref_cache: dict[tuple[str, str], dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    variants = {k: v for k, v in VARIANTS.items() if not args.variants or k in args.variants}
    for method in args.methods:
        for name, (kind, _, sjac) in variants.items():
            if args.interleave:
                rows.append(interleaved_row(args, method, name, p0, y, B, S, dev, dt))
                continue
            if (method, sjac) not in ref_cache:
                # the scipy loop --scipy-repeat times, the median time (one loop of a few
                # hundred fits moved by 30 % between runs, RESULTS §26)
                loops = [scipy_loop(peak_1d, scipy_jacs[sjac], p0[:S], y[:S], method)
                         for _ in range(scipy_repeat)]
                ref_cache[(method, sjac)] = dict(
                    loops[0], seconds=float(np.median([r["seconds"] for r in loops])),
                    seconds_all=[r["seconds"] for r in loops])
            ref = ref_cache[(method, sjac)]
            # warm-up (first use of torch.func etc.), then the timed runs
            make_call(name, p0[:64], y[:64], dev, dt, method)()
            call = make_call(name, p0, y, dev, dt, method, chunk_size=args.chunk_size)
            times = []
            res = None
            for _ in range(repeat):
                t, res = timed(call, dev)
                times.append(t)
            seconds = float(np.median(times))
            model_s = model_seconds(name, p0, y, dev, dt, res, repeat)
            cmp = compare_costs(to_numpy(res.cost)[:S], ref["cost"], args.rtol)
            ours_fps = B / seconds
            scipy_fps = S / ref["seconds"]
            rows.append({
                "method": method, "variant": name, "model": kind, "jac_ours": VARIANTS[name][1],
                "jac_scipy": sjac, "B": B, "scipy_subset": S, "seconds_ours": seconds,
                "seconds_ours_all": times, "seconds_scipy_subset": ref["seconds"],
                "seconds_scipy_subset_all": ref["seconds_all"],
                "seconds_scipy_extrapolated": ref["seconds"] * B / S,
                "fits_per_s_ours": ours_fps, "fits_per_s_scipy": scipy_fps,
                "speedup": ours_fps / scipy_fps, "model_seconds": model_s,
                "model_share": None if model_s is None else model_s / seconds,
                "model_ceiling_speedup": None if model_s is None else B / model_s / scipy_fps,
                "cost_equal": cmp["equal"],
                "cost_lower": cmp["lower"], "cost_higher": cmp["higher"],
                "cost_reached": cmp["reached"],
                "nfev_mean_ours_subset": float(to_numpy(res.nfev)[:S].mean()),
                "nfev_mean_scipy": float(ref["nfev"].mean()),
                "status_ours": status_counts(res.status),
                "status_scipy_subset": status_counts(ref["status"]),
            })
            if VARIANTS[name][1] == "autograd":
                # autograd spares writing a Jacobian: also compare with what a
                # scipy user without one runs, jac='2-point'
                if (method, "2-point") not in ref_cache:
                    ref_cache[(method, "2-point")] = scipy_loop(
                        peak_1d, "2-point", p0[:S], y[:S], method)
                fd = ref_cache[(method, "2-point")]
                rows[-1]["fits_per_s_scipy_2point"] = S / fd["seconds"]
                rows[-1]["speedup_vs_scipy_2point"] = ours_fps / (S / fd["seconds"])
            print(f"  {method:4s} {name:28s} ours {ours_fps:10.0f} fits/s   "
                  f"scipy {scipy_fps:8.0f} fits/s", flush=True)
    return rows


def interleaved_row(args, method: str, name: str, p0: np.ndarray, y: np.ndarray, B: int, S: int,
                    dev: torch.device, dt: torch.dtype) -> dict[str, Any]:
    """One variant with the scipy loop and our call alternated (``--interleave``).

    This machine's speed drifts by up to 1.5x between minutes (RESULTS §28) and
    scipy's 500-fit loop has read 1,151 to 2,355 fits/s in different processes
    (sections 27, 28), so a ratio of one scipy loop timed before all of ours is
    only as good as the minute it ran in. Here each of ``--repeat`` rounds runs
    the scipy loop on the subset and then our call on all B problems (the order
    swapped every other round); the reported speed-up is the median of the
    rounds' ratios, each taken from two timings a few seconds apart.
    """
    kind, _, sjac = VARIANTS[name]
    sfun = {"analytic": peak_jac_1d, "2-point": "2-point"}[sjac]
    repeat = args.repeat or (1 if args.quick else 3)
    make_call(name, p0[:64], y[:64], dev, dt, method)()  # warm-up
    call = make_call(name, p0, y, dev, dt, method, chunk_size=args.chunk_size)
    ours_t: list[float] = []
    scipy_t: list[float] = []
    res = ref = None
    for i in range(repeat):
        steps = ["scipy", "ours"] if i % 2 == 0 else ["ours", "scipy"]
        for step in steps:
            if step == "scipy":
                ref = scipy_loop(peak_1d, sfun, p0[:S], y[:S], method)
                scipy_t.append(ref["seconds"])
            else:
                t, res = timed(call, dev)
                ours_t.append(t)
    ratios = [(B / to) / (S / ts) for to, ts in zip(ours_t, scipy_t, strict=True)]
    cmp = compare_costs(to_numpy(res.cost)[:S], ref["cost"], args.rtol)
    row = {
        "method": method, "variant": name, "model": kind, "jac_ours": VARIANTS[name][1],
        "jac_scipy": sjac, "B": B, "scipy_subset": S, "interleaved": True,
        "seconds_ours": float(np.median(ours_t)), "seconds_ours_all": ours_t,
        "seconds_scipy_subset": float(np.median(scipy_t)), "seconds_scipy_subset_all": scipy_t,
        "fits_per_s_ours": B / float(np.median(ours_t)),
        "fits_per_s_scipy": S / float(np.median(scipy_t)),
        "speedup": float(np.median(ratios)), "speedup_rounds": ratios,
        "model_seconds": None, "model_share": None, "model_ceiling_speedup": None,
        "cost_equal": cmp["equal"], "cost_lower": cmp["lower"], "cost_higher": cmp["higher"],
        "cost_reached": cmp["reached"],
        "nfev_mean_ours_subset": float(to_numpy(res.nfev)[:S].mean()),
        "nfev_mean_scipy": float(ref["nfev"].mean()),
        "status_ours": status_counts(res.status),
        "status_scipy_subset": status_counts(ref["status"]),
    }
    print(f"  {method:4s} {name:28s} ours {row['fits_per_s_ours']:10.0f} fits/s   "
          f"scipy {row['fits_per_s_scipy']:8.0f} fits/s   speed-up per round "
          + " ".join(f"{r:.1f}x" for r in ratios), flush=True)
    return row


def print_comparison(rows: list[dict[str, Any]], rtol: float) -> None:
    if not rows:
        return
    B, S = rows[0]["B"], rows[0]["scipy_subset"]
    print(f"\n### {B:,} Gaussian-peak fits (n=4, m=64): batch_least_squares vs scipy loop\n")
    headers = ["method", "ours: model, jac", "scipy jac", "ours fits/s", "scipy fits/s*",
               "speed-up", "model share", "model-only ceiling", "cost = scipy", "cost < scipy",
               "cost > scipy", "nfev ours/scipy"]

    def optional(v: float | None, scale: float, suffix: str) -> str:
        return "–" if v is None else f"{scale * v:.0f}{suffix}"

    table = [[r["method"], r["variant"], r["jac_scipy"], r["fits_per_s_ours"],
              r["fits_per_s_scipy"], f"{r['speedup']:.1f}x",
              optional(r.get("model_share"), 100, "%"),
              optional(r.get("model_ceiling_speedup"), 1, "x"),
              f"{100 * r['cost_equal']:.1f}%",
              f"{100 * r['cost_lower']:.1f}%", f"{100 * r['cost_higher']:.1f}%",
              f"{r['nfev_mean_ours_subset']:.2f}/{r['nfev_mean_scipy']:.2f}"] for r in rows]
    print(md_table(headers, table))
    print(f"\n\\* scipy: a Python loop of scipy.optimize.least_squares (same method) timed on "
          f"the first {S:,} problems and extrapolated to {B:,} (fits/s = {S:,} / time). "
          f"Cost columns compare the final cost on those {S:,} problems (relative {rtol:g}); "
          f"nfev = mean residual evaluations on them. Ours: median of the timed calls on all "
          f"{B:,} problems after a warm-up call. Model share: the time the user's model "
          f"alone takes for the evaluations our solver made (one call on all {B:,} problems, "
          f"times the mean nfev and njev), as a share of our time; model-only ceiling: the "
          f"speed-up over scipy if the solver itself cost nothing (analytic Jacobians only).")
    if any(r.get("interleaved") for r in rows):
        print("\nInterleaved (--interleave): each of the rounds ran the scipy loop and our call "
              "one after the other; times are medians over the rounds and the speed-up is the "
              "median of the rounds' ratios (per round: "
              + "; ".join(f"{r['method']} {r['variant']}: "
                          + ", ".join(f"{x:.1f}x" for x in r["speedup_rounds"])
                          for r in rows if r.get("interleaved")) + ").")
    auto = [r for r in rows if "speedup_vs_scipy_2point" in r]
    if auto:
        print("\n'autograd' against scipy with jac='2-point' (what a scipy user without a "
              "hand-written Jacobian runs):\n")
        print(md_table(["method", "ours: model, jac", "ours fits/s", "scipy '2-point' fits/s",
                        "speed-up"],
                       [[r["method"], r["variant"], r["fits_per_s_ours"],
                         r["fits_per_s_scipy_2point"], f"{r['speedup_vs_scipy_2point']:.1f}x"]
                        for r in auto]))


# --------------------------------------------------------------------------- scaling
def scaling_sizes(max_size: int) -> list[int]:
    """1, 3, 10, 30, ... up to ``max_size`` (two sizes per decade)."""
    sizes, k = [], 0
    while True:
        for mult in (1, 3):
            s = mult * 10**k
            if s > max_size:
                return sizes
            sizes.append(s)
        k += 1


def scaling_worker(args, dev, dt) -> None:
    """Child process: time one batch size, print one JSON line."""
    N = args.worker
    y, _, p0 = peak_data(N, seed=args.seed)
    name = args.scaling_variant
    make_call(name, p0[: min(N, 64)], y[: min(N, 64)], dev, dt, args.scaling_method)()
    call = make_call(name, p0, y, dev, dt, args.scaling_method, return_jac=not args.no_return_jac,
                     chunk_size=args.chunk_size)
    base_rss = current_rss_bytes()
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base_gpu = torch.cuda.memory_allocated(dev)
    min_time = 0.2 if args.quick else 1.0
    times: list[float] = []
    while not times or (sum(times) < min_time and len(times) < 100):
        t, res = timed(call, dev)
        times.append(t)
        del res
    out = {"B": N, "seconds": float(np.median(times)), "runs": len(times),
           "peak_rss_bytes": peak_rss_bytes(), "rss_before_solve_bytes": base_rss}
    if dev.type == "cuda":
        out["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(dev)
        out["gpu_before_solve_bytes"] = base_gpu
    out["fits_per_s"] = N / out["seconds"]
    print("RESULT " + json.dumps(out), flush=True)


def run_scaling(args) -> list[dict[str, Any]]:
    max_size = args.scaling_max or (10**4 if args.quick else 10**6)
    out = []
    for N in scaling_sizes(max_size):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(N),
               "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads),
               "--seed", str(args.seed), "--scaling-method", args.scaling_method,
               "--scaling-variant", args.scaling_variant]
        if args.quick:
            cmd.append("--quick")
        if args.no_return_jac:
            cmd.append("--no-return-jac")
        if args.chunk_size:
            cmd += ["--chunk-size", str(args.chunk_size)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"  B={N}: worker failed (rc {proc.returncode})\n{proc.stderr[-2000:]}")
            out.append({"B": N, "error": proc.stderr[-2000:]})
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        out.append(r)
        mem = (f"GPU peak {gib(r['gpu_peak_bytes']):.3f} GiB" if "gpu_peak_bytes" in r
               else f"peak RSS {gib(r['peak_rss_bytes']):.2f} GiB")
        print(f"  B={N:>9,}: {r['fits_per_s']:12.0f} fits/s  {mem}  "
              f"({time.perf_counter() - t0:.1f} s with data generation)", flush=True)
    return out


def print_scaling(rows, args) -> None:
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    gpu = "gpu_peak_bytes" in ok[0]
    print(f"\n### fits/s vs batch size ({args.scaling_method}, {args.scaling_variant}, "
          f"{args.device}, {args.dtype}, return_jac={not args.no_return_jac})\n")
    headers = ["batch size", "fits/s", "time (s)", "peak RSS (GiB)",
               "RSS before solve (GiB)"] + (["GPU peak (GiB)"] if gpu else [])
    table = []
    for r in ok:
        row = [r["B"], r["fits_per_s"], r["seconds"], f"{gib(r['peak_rss_bytes']):.2f}",
               f"{gib(r['rss_before_solve_bytes']):.2f}"]
        if gpu:
            row.append(f"{gib(r['gpu_peak_bytes']):.3f}")
        table.append(row)
    print(md_table(headers, table))
    print("\nEach size runs in a fresh process (data generation included in the peak RSS; "
          "'RSS before solve' = after imports, data and a warm-up call). Time = median of "
          "repeated calls until at least 1 s (0.2 s with --quick) was spent.")


# --------------------------------------------------------------------------- chunk sweep
def run_chunk_sweep(args, dev, dt) -> list[dict[str, Any]]:
    """fits/s and CPU time (user, system) vs ``chunk_size`` at one batch size."""
    B = args.chunk_sweep_batch or (10**4 if args.quick else 10**5)
    y, _, p0 = peak_data(B, seed=args.seed)
    name, method = args.scaling_variant, args.scaling_method
    make_call(name, p0[:64], y[:64], dev, dt, method)()
    sizes = [c for c in (1000, 4000, 16384, 64000) if c < B] + [None]
    out = []
    for cs in sizes:
        call = make_call(name, p0, y, dev, dt, method, chunk_size=cs)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        seconds, res = timed(call, dev)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        default = default_chunk_size(B, 64, 4, dev)
        out.append({"B": B, "chunk_size": cs if cs else default, "default": cs is None,
                    "seconds": seconds, "fits_per_s": B / seconds,
                    "user_s": r1.ru_utime - r0.ru_utime, "system_s": r1.ru_stime - r0.ru_stime})
        del res
        print(f"  chunk_size={out[-1]['chunk_size']:>7,}{' (default)' if cs is None else ''}: "
              f"{out[-1]['fits_per_s']:10.0f} fits/s", flush=True)
    return out


def print_chunk_sweep(rows, args) -> None:
    if not rows:
        return
    print(f"\n### fits/s vs chunk_size ({rows[0]['B']:,} problems, {args.scaling_method}, "
          f"{args.scaling_variant}, {args.device}, {args.dtype})\n")
    headers = ["chunk_size", "fits/s", "wall (s)", "user CPU (s)", "system CPU (s)"]
    table = [[f"{r['chunk_size']:,}" + (" (default)" if r["default"] else ""), r["fits_per_s"],
              r["seconds"], r["user_s"], r["system_s"]] for r in rows]
    print(md_table(headers, table))
    print("\nSystem CPU time is mostly page faults of large temporary tensors.")


def plot_scaling(rows, comparison, args) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return None
    if args.plot:
        path = Path(args.plot)
    elif args.quick:
        path = result_path(args, "batch_scaling", ".png")
    elif args.device == "cpu" and args.dtype == "float64":
        path = BENCH_DIR / "batch_scaling.png"
    else:
        path = BENCH_DIR / f"batch_scaling_{torch.device(args.device).type}_{args.dtype}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = [r["B"] for r in ok]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.loglog(sizes, [r["fits_per_s"] for r in ok], "o-",
              label=f"batch_least_squares ({args.scaling_method}, {args.scaling_variant})")
    ref = [r for r in comparison if r["method"] == args.scaling_method
           and r["jac_scipy"] == "analytic"]
    if ref:
        ax.axhline(ref[0]["fits_per_s_scipy"], color="gray", ls="--",
                   label=f"scipy loop ({args.scaling_method}, analytic jac)")
    ax.set_xlabel("batch size (problems)")
    ax.set_ylabel("fits / s")
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    gpu = "gpu_peak_bytes" in ok[0]
    mem = [gib(r["gpu_peak_bytes"] if gpu else r["peak_rss_bytes"]) for r in ok]
    ax2.semilogx(sizes, mem, "s:", color="tab:red",
                 label="peak GPU memory" if gpu else "peak RSS (process)")
    ax2.set_ylabel("GiB")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    ax.set_title(f"Gaussian-peak fits (n=4, m=64), {args.device}, {args.dtype}, "
                 f"{args.threads} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--batch", type=int, default=None, help="problems (default 20000; quick 2000)")
    p.add_argument("--scipy-repeat", type=int, default=None,
                   help="scipy loops on the subset, median time (default 3; quick 1)")
    p.add_argument("--scipy-subset", type=int, default=None,
                   help="problems solved by the scipy loop (default 1000; quick 200)")
    p.add_argument("--methods", nargs="+", default=["lm", "trf"], choices=["lm", "trf", "dogbox"])
    p.add_argument("--repeat", type=int, default=None, help="timed calls (default 3; quick 1)")
    p.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance of 'equal cost'")
    p.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                   help="part 1's ways of giving the model (default: all four)")
    p.add_argument("--interleave", action="store_true",
                   help="part 1: alternate the scipy loop and our call --repeat times and report "
                        "the median of the rounds' speed-ups (a drifting machine's speed cancels)")
    p.add_argument("--no-comparison", action="store_true", help="skip part 1")
    p.add_argument("--no-scaling", action="store_true", help="skip part 2")
    p.add_argument("--scaling-max", type=int, default=None,
                   help="largest batch of part 2 (default 10^6; quick 10^4)")
    p.add_argument("--scaling-method", default="lm", choices=["lm", "trf", "dogbox"])
    p.add_argument("--scaling-variant", default="torch model, analytic jac",
                   choices=list(VARIANTS))
    p.add_argument("--no-return-jac", action="store_true",
                   help="part 2 with return_jac=False (default: the library default, True)")
    p.add_argument("--plot", default=None, help="path of the scaling plot")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="chunk_size of parts 1 and 2 (default: the library's)")
    p.add_argument("--no-chunk-sweep", action="store_true", help="skip part 3")
    p.add_argument("--chunk-sweep-batch", type=int, default=None,
                   help="problems of part 3 (default 10^5; quick 10^4)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    dev, dt = setup(args)
    if cuda_requested_but_missing(dev):
        print("CUDA is not available on this machine: nothing to run with --device cuda.")
        return
    if args.worker is not None:
        scaling_worker(args, dev, dt)
        return
    comparison: list[dict[str, Any]] = []
    if not args.no_comparison:
        print(f"part 1: batch vs scipy loop ({args.device}, {args.dtype}, "
              f"{args.threads} threads)", flush=True)
        comparison = run_comparison(args, dev, dt)
        print_comparison(comparison, args.rtol)
    scaling: list[dict[str, Any]] = []
    plot = None
    if not args.no_scaling:
        print("\npart 2: fits/s vs batch size", flush=True)
        scaling = run_scaling(args)
        print_scaling(scaling, args)
        plot = plot_scaling(scaling, comparison, args)
        if plot is not None:
            print(f"\nplot: {plot}")
    sweep: list[dict[str, Any]] = []
    if not args.no_chunk_sweep:
        print("\npart 3: fits/s vs chunk_size", flush=True)
        sweep = run_chunk_sweep(args, dev, dt)
        print_chunk_sweep(sweep, args)
    path = write_json(args, "bench_batch", {
        "problem": "1-D Gaussian peak, n=4, m=64, noise 0.05, see benchmarks/_common.py",
        "rtol": args.rtol,
        "note": "scipy fits/s measured on the first scipy_subset problems and extrapolated",
        "comparison": comparison,
        "scaling": {"method": args.scaling_method, "variant": args.scaling_variant,
                    "return_jac": not args.no_return_jac, "rows": scaling,
                    "plot": str(plot) if plot else None},
        "chunk_sweep": sweep,
    })
    print(f"results: {path}")


if __name__ == "__main__":
    main()
