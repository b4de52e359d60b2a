"""Ten million Gaussian-peak fits in one ``batch_least_squares`` call, with bounded memory.

Problems: the 1-D Gaussian peak of ``bench_batch.py`` (n = 4 parameters,
m = 64 points), 10,000,000 of them (``--quick``: 100,000), torch model and
analytic Jacobian, solved with ``chunk_size`` (default: the library's) and
``return_jac=False``. Reports the time, fits/s, the peak resident set size
of the process (``ru_maxrss``, data included; the target is < 24 GiB), an RSS
timeline sampled every 0.25 s, the statuses and, on the first
``--scipy-subset`` problems, the agreement of the final costs with a scipy
loop (relative 1e-6).

What must stay resident whatever the chunking: the data ``y (B, 64)`` and the
returned ``fun (B, 64)``, i.e. 2 x 5.1 GB for 10^7 problems in float64.

Usage::

    python benchmarks/memory_10m.py [--quick] [--problems 10000000] [--chunk-size N]
           [--method lm] [--dtype float64] [--threads 2] [--progress]
"""

from __future__ import annotations

import threading
import time
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import torch
from _common import (
    PEAK_M,
    base_parser,
    compare_costs,
    cuda_requested_but_missing,
    current_rss_bytes,
    gib,
    md_table,
    peak_1d,
    peak_data,
    peak_jac_1d,
    peak_jac_torch,
    peak_rss_bytes,
    peak_torch,
    scipy_loop,
    setup,
    status_counts,
    timed,
    to_numpy,
    write_json,
)

from torchimize_scipy import batch_least_squares

LIMIT_GIB = 24.0


class RssSampler:
    """Samples the current RSS in a background thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._t0, current_rss_bytes()))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter() - self._t0, current_rss_bytes()))

    def timeline(self, points: int = 200) -> list[tuple[float, float]]:
        """At most ``points`` (seconds, GiB) samples, evenly thinned."""
        step = max(1, len(self.samples) // points)
        return [(round(t, 2), round(gib(r), 3)) for t, r in self.samples[::step]]


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--problems", type=int, default=None,
                   help="number of problems (default 10^7; quick 10^5)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="problems per chunk (default: the library's choice)")
    p.add_argument("--method", default="lm", choices=["lm", "trf", "dogbox", "gn"])
    p.add_argument("--scipy-subset", type=int, default=None,
                   help="problems re-solved by scipy to check the costs (default 1000; "
                        "quick 200)")
    p.add_argument("--progress", action="store_true", help="tqdm progress bar")
    args = p.parse_args()
    dev, dt = setup(args)
    if cuda_requested_but_missing(dev):
        print("CUDA is not available on this machine: nothing to run with --device cuda.")
        return
    B = args.problems or (10**5 if args.quick else 10**7)
    S = min(B, args.scipy_subset if args.scipy_subset is not None
            else (200 if args.quick else 1000))
    np_dtype = np.float32 if dt == torch.float32 else np.float64
    rss_start = current_rss_bytes()

    print(f"generating {B:,} problems ({args.dtype}) ...", flush=True)
    t0 = time.perf_counter()
    y_np, _, p0_np = peak_data(B, seed=args.seed, dtype=np_dtype)
    y = torch.from_numpy(y_np).to(dev)  # shares memory on the CPU
    p0 = torch.from_numpy(p0_np).to(dev)
    t_gen = time.perf_counter() - t0
    # warm-up on a few problems (first use of the engine's code paths)
    batch_least_squares(peak_torch, p0[:256].clone(), jac=peak_jac_torch, method=args.method,
                        args=(y[:256],), return_jac=False)
    rss_before = current_rss_bytes()
    peak_before = peak_rss_bytes()
    print(f"data ready in {t_gen:.1f} s; RSS {gib(rss_before):.2f} GiB", flush=True)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    with RssSampler() as sampler:
        seconds, res = timed(lambda: batch_least_squares(
            peak_torch, p0, jac=peak_jac_torch, method=args.method, args=(y,),
            chunk_size=args.chunk_size, return_jac=False, progress=args.progress), dev)
    peak = peak_rss_bytes()
    sampled_peak = max(r for _, r in sampler.samples)
    status = status_counts(res.status)
    cost = to_numpy(res.cost).astype(float)
    success = float(to_numpy(res.success).mean())

    check = None
    if S > 0:
        ref = scipy_loop(peak_1d, peak_jac_1d, p0_np[:S], y_np[:S],
                         "lm" if args.method == "lm" else "trf")
        check = compare_costs(cost[:S], ref["cost"], 1e-6)

    elem = 4 if dt == torch.float32 else 8
    estimate = {"data_y": B * PEAK_M * elem, "result_fun": B * PEAK_M * elem,
                "result_small_fields": B * (4 * 4 * elem + 3 * elem + 4 * 8) + B * 8 * 3}
    ok = gib(peak) < LIMIT_GIB
    chunk = "library default" if args.chunk_size is None else f"{args.chunk_size:,}"
    print(f"\n### {B:,} Gaussian-peak fits (n=4, m=64), {args.method}, chunk_size="
          f"{chunk}, return_jac=False, {args.device}, {args.dtype}, "
          f"{args.threads} threads\n")
    rows = [
        ["problems", B],
        ["time (s)", f"{seconds:.1f}"],
        ["fits/s", f"{B / seconds:,.0f}"],
        ["peak RSS, whole process (GiB)", f"{gib(peak):.2f}"],
        ["peak RSS sampled during the solve (GiB)", f"{gib(sampled_peak):.2f}"],
        ["RSS before the solve: imports + data (GiB)", f"{gib(rss_before):.2f}"],
        ["peak RSS before the solve (GiB)", f"{gib(peak_before):.2f}"],
        ["size of y / of the returned fun (GiB each)", f"{gib(estimate['data_y']):.2f}"],
        [f"peak RSS < {LIMIT_GIB:g} GiB", "yes" if ok else "NO"],
        ["success", f"{100 * success:.2f}%"],
        ["statuses", ", ".join(f"{k}: {v:,}" for k, v in status.items())],
        ["median cost", f"{np.median(cost):.4g}"],
    ]
    if check is not None:
        rows.append([f"cost = / < / > scipy on {S:,}",
                     f"{100 * check['equal']:.1f}% / {100 * check['lower']:.1f}% / "
                     f"{100 * check['higher']:.1f}%"])
    if dev.type == "cuda":
        rows.append(["GPU peak (GiB)", f"{gib(torch.cuda.max_memory_allocated(dev)):.2f}"])
    print(md_table(["", "value"], rows))
    path = write_json(args, "memory_10m", {
        "problems": B, "method": args.method, "chunk_size": args.chunk_size,
        "seconds": seconds, "fits_per_s": B / seconds, "generation_seconds": t_gen,
        "peak_rss_bytes": peak, "sampled_peak_rss_bytes": sampled_peak,
        "rss_start_bytes": rss_start, "rss_before_solve_bytes": rss_before,
        "peak_rss_before_solve_bytes": peak_before, "limit_gib": LIMIT_GIB,
        "below_limit": ok, "estimate_bytes": estimate, "status": status, "success": success,
        "median_cost": float(np.median(cost)), "scipy_check": check,
        "rss_timeline_gib": sampler.timeline()})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
