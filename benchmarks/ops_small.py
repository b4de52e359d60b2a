"""Operations per evaluation outside the engine for small single calls (torch profiler).

``bench_ops.py`` counts per method on Rosenbrock; this script covers the
per-call path of the everyday small calls, with the curve_fit package as a
region of its own:

* scipy's ``curve_fit`` documentation example (``a exp(-b x) + c``, 50
  points, default 'lm', numpy model);
* ``least_squares`` Rosenbrock from (-1.2, 1), 'trf' and 'lm', analytic
  Jacobian, numpy and torch ``fun``.

For each it prints the top-level aten operations, host syncs and host reads
per residual evaluation by region (the counting of ``bench_ops.py``), the
outside operations by name, and the process CPU time of a call (median).
Load-independent: the counts do not depend on the machine's load.

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/ops_small.py [--cases cf,trf-np,lm-np,trf-t,lm-t]
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import bench_ops
import torch
from _common import base_parser, md_table, setup, write_json
from _small_problems import decay, decay_data, rosenbrock, rosenbrock_jac
from torch.profiler import ProfilerActivity, profile

from torchimize_scipy import curve_fit, least_squares

# bench_ops' regions with this script as "user" and curve_fit's package apart
# (before the catch-all "frontend" entry: the innermost match wins, order matters)
bench_ops.REGIONS = ((("ops_small.py", "user"),) + bench_ops.REGIONS[1:-1]
                     + (("torchimize_scipy/_curve_fit/", "curve_fit"), bench_ops.REGIONS[-1]))
REGIONS = ("engine", "loss", "adapters", "jacobian", "curve_fit", "frontend", "results",
           "user", "other")


class Counted:
    """Wrap ``fn`` and count its calls."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.fn(*args)


def rosen_t(x):
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def rosen_jac_t(x):
    return torch.stack([torch.stack([-20 * x[0], torch.ones_like(x[0]) * 10]),
                        torch.stack([-torch.ones_like(x[0]), torch.zeros_like(x[0])])])


def cases() -> dict[str, tuple[Any, Counted]]:
    xd, yd = decay_data()
    out: dict[str, tuple[Any, Counted]] = {}
    f = Counted(decay)
    out["cf"] = (lambda f=f: curve_fit(f, xd, yd, p0=[1.0, 1.0, 1.0]), f)
    for method in ("trf", "lm"):
        g = Counted(rosenbrock)
        out[f"{method}-np"] = (lambda g=g, m=method: least_squares(
            g, [-1.2, 1.0], jac=rosenbrock_jac, method=m), g)
        h = Counted(rosen_t)
        x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
        out[f"{method}-t"] = (lambda h=h, m=method, x0=x0: least_squares(
            h, x0, jac=rosen_jac_t, method=m), h)
    return out


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--cases", default="cf,trf-np,lm-np,trf-t,lm-t")
    p.add_argument("--repeat", type=int, default=15, help="timed calls (CPU time)")
    p.add_argument("--top", type=int, default=12, help="outside op names listed per case")
    args = p.parse_args()
    setup(args)
    every = cases()
    rows, payload = [], {}
    for name in args.cases.split(","):
        call, fun = every[name]
        call()
        fun.calls = 0
        with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
            call()
        calls = fun.calls
        counts = bench_ops.count_events(prof.events())
        per = {k: {r: counts[k][r] / calls for r in REGIONS if counts[k][r]}
               for k in ("ops", "syncs", "reads")}
        cpu = []
        for _ in range(args.repeat):
            c0 = time.process_time()
            call()
            cpu.append(time.process_time() - c0)
        outside = {k: sum(v for r, v in per[k].items() if r not in ("engine", "user"))
                   for k in per}
        names = Counter({k: v for k, v in counts["names"].items()
                         if not k.startswith(("engine:", "user:"))})
        print(f"\n{name}: {calls} evaluations; per evaluation: ops {per['ops']}, "
              f"syncs {per['syncs']}, reads {per['reads']}")
        print("  outside ops (whole call): " + ", ".join(
            f"{k} {v}" for k, v in names.most_common(args.top)))
        rows.append([name, calls, f"{sum(per['ops'].values()):.1f}",
                     f"{per['ops'].get('engine', 0):.1f}", f"{outside['ops']:.1f}",
                     f"{outside['syncs']:.2f}", f"{outside['reads']:.2f}",
                     f"{1e3 * statistics.median(cpu):.2f}"])
        payload[name] = {"calls": calls, "per_eval": per,
                         "outside_names": dict(names), "cpu_ms": cpu}
    print()
    print(md_table(["case", "evals", "ops/eval", "engine", "outside", "outside syncs",
                    "outside reads", "CPU ms/call"], rows))
    path = write_json(args, "ops_small", payload)
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
