"""How honest is the progress bar of ``batch_least_squares``? Its ETA against the truth.

Runs one batch of Gaussian-peak fits (torch model, ``jac='autograd'``) with
``progress=True`` and records every state of the bar that tqdm displays
(elapsed time, count, total, rate). After the run, the remaining time each
display predicted is compared with the time that really remained. No scipy
run: this measures the bar, not the solver.

Usage::

    python benchmarks/progress_eta.py [--B 50000] [--method trf]
"""

from __future__ import annotations

import argparse
import io
import time

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import torch
import tqdm.auto
import tqdm.std

from torchimize_scipy import batch_least_squares

M = 64
T = torch.linspace(-3.0, 3.0, M, dtype=torch.float64)

RECORD: list[tuple[float, float, float | None, float | None]] = []


class RecordingBar(tqdm.std.tqdm):
    """A text bar writing to a buffer that records (time, n, total, rate) per display."""

    def __init__(self, *args, **kwargs):
        kwargs["file"] = io.StringIO()
        kwargs["mininterval"] = 0.0
        super().__init__(*args, **kwargs)

    def display(self, *args, **kwargs):
        d = self.format_dict
        rate = d.get("rate")
        if rate is None and d["elapsed"] > 0:
            rate = d["n"] / d["elapsed"]
        RECORD.append((time.perf_counter(), float(d["n"]), d.get("total"), rate))
        return super().display(*args, **kwargs)


def gaussian(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    a, mu, s, c = p.unbind(-1)
    return a[:, None] * torch.exp(-0.5 * ((T - mu[:, None]) / s[:, None]) ** 2) + c[:, None] - y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=50_000)
    ap.add_argument("--method", default="trf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    B = args.B
    truth = np.column_stack([rng.uniform(0.5, 2.0, B), rng.uniform(-1.0, 1.0, B),
                             rng.uniform(0.5, 1.5, B), rng.uniform(-0.2, 0.2, B)])
    p = torch.tensor(truth)
    y = gaussian(p, torch.zeros(B, M, dtype=torch.float64))
    y = y + 0.02 * torch.tensor(rng.standard_normal((B, M)))
    p0 = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64).repeat(B, 1)

    tqdm.auto.tqdm = RecordingBar  # the library imports tqdm.auto.tqdm when the bar starts
    start = time.perf_counter()
    res = batch_least_squares(gaussian, p0, args=(y,), jac="autograd", method=args.method,
                              progress=True)
    end = time.perf_counter()
    wall = end - start
    print(f"B = {B}, method {args.method}: {wall:.2f} s, {int(res.success.sum())} successes, "
          f"{len(RECORD)} displays")
    print(f"{'elapsed s':>10} {'shown ETA s':>12} {'true remaining s':>17} {'ratio':>7}")
    shown = []
    for t, n, total, rate in RECORD:
        if not total or not rate:
            continue
        eta = (total - n) / rate
        remaining = end - t
        shown.append((t - start, eta, remaining))
    marks = sorted({0, len(shown) // 10, len(shown) // 4, len(shown) // 2,
                    (3 * len(shown)) // 4, len(shown) - 2})
    for i in marks:
        if 0 <= i < len(shown):
            el, eta, rem = shown[i]
            print(f"{el:10.2f} {eta:12.2f} {rem:17.2f} {eta / max(rem, 1e-9):7.2f}")
    worst = max((eta for el, eta, rem in shown), default=float("nan"))
    print(f"largest ETA shown: {worst:.1f} s (the whole run took {wall:.1f} s)")


if __name__ == "__main__":
    main()
