"""A/B of 'lm''s basic Gauss-Newton step for rank-deficient rows (``minpack_qr``).

In ``bench_tail.py``'s 'lm' tail one problem stays rank deficient for about a
thousand rounds, so :func:`~torchimize_scipy._engine.minpack_qr.basic_gauss_newton`
(MINPACK's pivoted QR and basic solution) runs on one row per round, at a cost
set by its Python-level numpy operations rather than by the arithmetic. This
script builds rows like that problem's (four Gaussian peaks on 100 points, the
last one moved out of the window, so that its three columns are below 1e-60
and the QR's last pivots are tiny), and times the working tree's call against
the package at ``--before REV`` (imported under another name, as
``ab_small.py`` does), the two alternating call by call, on 1, 4 and 16 rows.
It also checks that both return the same bits (NaN payloads aside).

Usage::

    PYTHONPATH=$PWD python benchmarks/ab_basic_step.py --before REV [--calls 3000]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import bench_tail as bt
import numpy as np
import torch
from _common import md_table
from ab_small import import_commit

from torchimize_scipy._engine import minpack_qr


def rows(B: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``J (B, 100, 12)``, MINPACK's column scaling and residuals of rank-deficient rows."""
    y, p = bt.data(B, seed)
    p[:, 10] = 40.0  # the last peak's centre far outside [0, 10]: its columns vanish
    J = torch.from_numpy(bt.peaks_jac(p, y))
    f = torch.from_numpy(bt.peaks(p, y))
    return J, J.norm(dim=1).clamp(min=1.0), f


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        nan = a.isnan() & b.isnan()
        a, b = a.masked_fill(nan, 0.0), b.masked_fill(nan, 0.0)
        return torch.equal(a.view(torch.int64), b.view(torch.int64))
    return torch.equal(a, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the commit to compare against")
    parser.add_argument("--calls", type=int, default=3000, help="calls of each version")
    args = parser.parse_args()
    torch.set_num_threads(1)
    old = import_commit(args.before, tempfile.mkdtemp()).__name__
    old_mqr = __import__(f"{old}._engine.minpack_qr", fromlist=["basic_gauss_newton"])
    versions = {"before": old_mqr.basic_gauss_newton, "now": minpack_qr.basic_gauss_newton}
    table = []
    for B in (1, 4, 16):
        J, diag, f = rows(B)
        outs = {k: fn(J, diag, f) for k, fn in versions.items()}
        equal = all(same(a, b) for a, b in zip(
            list(outs["before"][0]) + list(outs["before"][1]),
            list(outs["now"][0]) + list(outs["now"][1]), strict=True))
        times: dict[str, list[float]] = {"before": [], "now": []}
        for i in range(args.calls):
            for k in (("before", "now") if i % 2 else ("now", "before")):
                t = time.perf_counter()
                versions[k](J, diag, f)
                times[k].append(time.perf_counter() - t)
        med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
        table.append([B, f"{med['before']:.3f}", f"{med['now']:.3f}",
                      f"{med['before'] / med['now']:.2f}x", "yes" if equal else "NO"])
    print(f"basic_gauss_newton, {args.before} (before) against the working tree (now), "
          f"median of {args.calls} alternated calls")
    print(md_table(["rows", "before (ms)", "now (ms)", "speed-up", "same bits"], table))


if __name__ == "__main__":
    main()
