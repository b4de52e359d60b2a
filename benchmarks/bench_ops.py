"""Operations and host synchronisations per function evaluation (torch profiler).

For every method ('trf', 'dogbox', 'lm'), unbounded (from ``(-1.2, 1)``) and
bounded (``x1 >= 1.5`` from ``(2, 2)``, as in ``bench_single.py``; not 'lm'),
one problem (``least_squares``, B = 1) and a batch (``batch_least_squares``,
B = 10,000 by default, starts shifted by ``U(0, 0.5)`` per coordinate), with a
numpy and a torch residual function (analytic Jacobian), this script runs one
solve of the Rosenbrock problem under :mod:`torch.profiler` and counts

* **ops**: top-level aten operations (an aten event none of whose ancestors is
  an aten event: ``aten::linalg_norm`` counts once, not with the ``abs``,
  ``pow`` and ``sum`` it runs inside);
* **syncs**: host synchronisations, the outermost of ``aten::is_nonzero``,
  ``aten::item``, ``aten::_local_scalar_dense`` (``bool(t)``, ``int(t)``,
  ``t.item()``) and the data-dependent-shape ops ``aten::nonzero``,
  ``aten::masked_select``, ``aten::unique*`` (boolean indexing runs
  ``nonzero``); on a GPU each one stalls the host until the device is done;
* **host reads**: ``Tensor.tolist()`` and ``Tensor.numpy()`` calls (no aten
  event on the CPU, a device-to-host copy and a sync on a GPU; numpy functions
  need one per evaluation). The engine gathers the counts a round needs and
  reads them with one ``tolist()``: its column "engine syncs+reads" is what
  it makes a GPU wait for; "in torch ops" are the syncs torch issues inside
  its own operations (``torch.linalg.svd``'s info check, the pivot check of
  the LU solve behind ``torch.linalg.inv_ex``), which the engine cannot avoid
  short of another algorithm.
* **host-scalar reads**: the syncs and reads issued by
  ``_engine/host_scalars.py``. On the CPU the trust-region methods keep their
  per-problem scalars on the host (numpy views of CPU tensors, ``item()`` of
  one problem's values): no device is waited for, and a GPU never runs that
  code (its scalars stay tensors). They are counted apart and left out of the
  engine's syncs and reads; their operations stay in the engine's ops.
  ``--device-path`` runs, on the CPU, the code a GPU runs
  (``host_scalars.HOST = False``): its "engine syncs+reads" are what a GPU
  would wait for.

Each count is divided by the number of calls of the residual function by the
solver (the nfev of one problem; the rounds of batched evaluations for a
batch) and split by where the operation was issued, from the innermost
Python frame of the package (or of this script) on the profiler's stack:

* ``engine``: ``torchimize_scipy/_engine/`` (loop, step rules, linear algebra);
* ``loss``: ``_loss.py`` (robust losses, called by the engine);
* ``adapters``: ``_user_functions.py`` and ``_arrays.py`` (numpy <-> torch for
  ``fun``/``jac``);
* ``jacobian``: ``_jacobian.py``;
* ``frontend``: ``_least_squares.py``, ``_batch.py``, ``_frontend.py``,
  ``_validation.py``, ``_driver.py``, ``_curve_fit.py`` (per call);
* ``results``: ``_results.py`` (per call);
* ``user``: the residual function's own torch operations (torch functions).

``outside`` is everything but ``engine`` and ``user``. Also timed without the
profiler: the median wall time of a call and per evaluation.

Usage::

    python benchmarks/bench_ops.py [--quick] [--batch 10000] [--threads 2]
           [--methods trf,dogbox,lm] [--only-b1] [--device-path]
           [--loss soft_l1 --f-scale 0.1]

``--problem expfit`` counts, instead of Rosenbrock, scipy's robust-fit example
of ``ab_small.py`` and ``bench_single.py`` (``0.5 + 2 exp(-t)`` on 15 points
with three outliers, n = 3, numpy ``fun`` and analytic Jacobian from ``(1, 1,
1)``) with ``loss='soft_l1', f_scale=0.1`` unless ``--loss`` says otherwise,
one problem ('trf' and 'dogbox'; unbounded only)::

    python benchmarks/bench_ops.py --only-b1 --problem expfit --methods trf --kinds numpy

``--loss`` gives every case a robust loss (the 'lm' cases are then skipped:
'lm' takes the linear loss only); its JSON name carries the loss. The table
is printed as markdown; the JSON goes to
``benchmarks/results/bench_ops_<device>_<dtype>.json``.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import torch
from _common import base_parser, cuda_requested_but_missing, md_table, setup, sync, write_json
from torch.profiler import ProfilerActivity, profile

from torchimize_scipy import batch_least_squares, least_squares

#: aten operations that make the host wait for the device (the outermost one of a chain counts).
SYNC_OPS = frozenset({
    "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::nonzero",
    "aten::nonzero_static", "aten::masked_select", "aten::unique", "aten::_unique",
    "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim", "aten::equal",
    "aten::allclose", "aten::_assert_async",
})
#: Python-level tensor methods that read device memory on the host.
HOST_READS = ("built-in method tolist of Tensor", "built-in method numpy of Tensor")

#: (substring of a Python frame, region), innermost match wins; order matters.
REGIONS = (
    ("bench_ops.py", "user"),
    ("torchimize_scipy/_engine/", "engine"),
    ("torchimize_scipy/_loss.py", "loss"),
    ("torchimize_scipy/_user_functions.py", "adapters"),
    ("torchimize_scipy/_arrays.py", "adapters"),
    ("torchimize_scipy/_jacobian.py", "jacobian"),
    ("torchimize_scipy/_results.py", "results"),
    ("torchimize_scipy/", "frontend"),
)
REGION_NAMES = ("engine", "loss", "adapters", "jacobian", "frontend", "results", "user",
                "other")


# --------------------------------------------------------------------------- problems
def rosen_np(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def rosen_jac_np(x):
    return np.array([[-20 * x[0], 10.0], [-1.0, 0.0]])


def rosen_t(x):
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def rosen_jac_t(x):
    one = torch.ones_like(x[0])
    return torch.stack([torch.stack([-20 * x[0], 10 * one]), torch.stack([-one, 0 * one])])


def rosen_batch_np(x):
    return np.stack([10 * (x[:, 1] - x[:, 0] ** 2), 1 - x[:, 0]], axis=1)


def rosen_batch_jac_np(x):
    J = np.zeros((x.shape[0], 2, 2))
    J[:, 0, 0] = -20 * x[:, 0]
    J[:, 0, 1] = 10.0
    J[:, 1, 0] = -1.0
    return J


def rosen_batch_t(x):
    return torch.stack([10 * (x[:, 1] - x[:, 0] ** 2), 1 - x[:, 0]], dim=1)


def rosen_batch_jac_t(x):
    col0 = torch.stack([-20 * x[:, 0], -torch.ones_like(x[:, 0])], dim=1)
    col1 = torch.stack([torch.full_like(x[:, 0], 10.0), torch.zeros_like(x[:, 0])], dim=1)
    return torch.stack([col0, col1], dim=2)


class Counted:
    """Wrap ``fn`` and count its calls."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0

    def __call__(self, x, *args, **kwargs):
        self.calls += 1
        return self.fn(x, *args, **kwargs)


def make_expfit_case(method: str, dev: torch.device, dt: torch.dtype, loss: str,
                     f_scale: float):
    """``ab_small.py``'s robust exponential fit (one problem, numpy ``fun``)."""
    from bench_single import exp_fit, exp_fit_data, exp_fit_jac

    t, y = exp_fit_data(0)
    fun = Counted(exp_fit)

    def call():
        return least_squares(fun, np.ones(3), jac=exp_fit_jac, method=method, loss=loss,
                             f_scale=f_scale, args=(t, y), device=dev, dtype=dt)
    return call, fun


def make_case(method: str, bounded: bool, B: int, kind: str, dev: torch.device,
              dt: torch.dtype, seed: int, loss: str = "linear", f_scale: float = 1.0,
              problem: str = "rosenbrock"):
    """A zero-argument solve of the case and the counter of its residual calls."""
    if problem == "expfit":
        return make_expfit_case(method, dev, dt, loss, f_scale)
    robust = {} if loss == "linear" else {"loss": loss, "f_scale": f_scale}
    lb = [-np.inf, 1.5] if bounded else [-np.inf, -np.inf]
    start = [2.0, 2.0] if bounded else [-1.2, 1.0]
    if B == 1:
        fun = Counted(rosen_np if kind == "numpy" else rosen_t)
        jac = rosen_jac_np if kind == "numpy" else rosen_jac_t
        x0: Any = np.array(start)
        bounds: Any = (lb, np.inf)
        if kind == "torch":
            x0 = torch.tensor(x0, dtype=dt, device=dev)
            bounds = (torch.tensor(lb, dtype=dt, device=dev), torch.inf)

        def call():
            return least_squares(fun, x0, jac=jac, method=method, bounds=bounds, device=dev,
                                 dtype=dt, **robust)
        return call, fun
    rng = np.random.default_rng(seed)
    x0b = np.array(start) + rng.uniform(0.0, 0.5, (B, 2))
    fun = Counted(rosen_batch_np if kind == "numpy" else rosen_batch_t)
    jac = rosen_batch_jac_np if kind == "numpy" else rosen_batch_jac_t
    bounds = (lb, np.inf)
    if kind == "torch":
        x0b = torch.tensor(x0b, dtype=dt, device=dev)
        bounds = (torch.tensor(lb, dtype=dt, device=dev), torch.inf)

    def call():
        return batch_least_squares(fun, x0b, jac=jac, method=method, bounds=bounds,
                                   device=dev, dtype=dt, **robust)
    return call, fun


# --------------------------------------------------------------------------- counting
def _region(ev) -> str:
    """Region of an event: its innermost Python frame of the package or of this script."""
    p = ev.cpu_parent
    while p is not None:
        name = p.name
        for key, region in REGIONS:
            if key in name:
                return region
        p = p.cpu_parent
    return "other"


def _from_host_scalars(ev) -> bool:
    """Whether the innermost package frame of an event is ``_engine/host_scalars.py``."""
    p = ev.cpu_parent
    while p is not None:
        if "torchimize_scipy/" in p.name:
            return "_engine/host_scalars.py" in p.name
        p = p.cpu_parent
    return False


def _has_ancestor(ev, pred) -> bool:
    p = ev.cpu_parent
    while p is not None:
        if pred(p.name):
            return True
        p = p.cpu_parent
    return False


def count_events(events) -> dict[str, Counter]:
    """Top-level aten ops, syncs and host reads per region, plus the op names."""
    ops: Counter = Counter()
    syncs: Counter = Counter()
    inner: Counter = Counter()  # syncs issued inside another aten op (torch's own checks)
    reads: Counter = Counter()
    host: Counter = Counter()  # host-scalar reads of CPU tensors (no device wait)
    names: Counter = Counter()
    sync_names: Counter = Counter()
    for ev in events:
        name = ev.name
        if name.startswith("aten::"):
            if name in SYNC_OPS and not _has_ancestor(ev, SYNC_OPS.__contains__):
                region = _region(ev)
                if _from_host_scalars(ev):
                    host[region] += 1
                    continue
                syncs[region] += 1
                if _has_ancestor(ev, lambda s: s.startswith("aten::")):
                    inner[region] += 1
                sync_names[f"{region}: {name}"] += 1
            if not _has_ancestor(ev, lambda s: s.startswith("aten::")):
                region = _region(ev)
                ops[region] += 1
                names[f"{region}: {name}"] += 1
        elif any(h in name for h in HOST_READS):
            (host if _from_host_scalars(ev) else reads)[_region(ev)] += 1
    return {"ops": ops, "syncs": syncs, "inner": inner, "reads": reads, "host": host,
            "names": names, "sync_names": sync_names}


def profile_case(call, fun: Counted) -> dict[str, Any]:
    call()  # warm-up (lazy imports, first-call caches)
    fun.calls = 0
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        res = call()
    calls = fun.calls
    counts = count_events(prof.events())
    kinds = ("ops", "syncs", "inner", "reads", "host")
    per = {k: {r: counts[k][r] / calls for r in REGION_NAMES if counts[k][r]} for k in kinds}
    return {"fun_calls": calls, "per_eval": per,
            "totals": {k: dict(counts[k]) for k in kinds},
            "top_ops": counts["names"].most_common(25),
            "sync_sites": dict(counts["sync_names"]),
            "status": _first_status(res)}


def _first_status(res) -> int:
    s = res.status
    s = s.cpu() if isinstance(s, torch.Tensor) else s
    return int(s if np.ndim(s) == 0 else np.asarray(s).ravel()[0])


def time_case(call, fun: Counted, dev, repeat: int) -> tuple[float, int]:
    times = []
    for _ in range(repeat):
        fun.calls = 0
        sync(dev)
        t0 = time.perf_counter()
        call()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), fun.calls


def _outside(d: dict[str, float]) -> float:
    return sum(v for r, v in d.items() if r not in ("engine", "user"))


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--batch", type=int, default=10_000, help="B of the batch cases")
    p.add_argument("--methods", default="trf,dogbox,lm")
    p.add_argument("--kinds", default="numpy,torch", help="residual functions: numpy,torch")
    p.add_argument("--only-b1", action="store_true", help="skip the batch cases")
    p.add_argument("--repeat", type=int, default=None, help="timed calls (default 5; quick 2)")
    p.add_argument("--loss", default="linear",
                   help="robust loss of every case ('lm' cases are skipped unless linear)")
    p.add_argument("--f-scale", type=float, default=None,
                   help="f_scale of --loss (default 1; 0.1 with --problem expfit)")
    p.add_argument("--problem", default="rosenbrock", choices=("rosenbrock", "expfit"),
                   help="expfit: the soft_l1 exponential fit of ab_small.py (B = 1, "
                        "unbounded, numpy fun; --loss defaults to soft_l1)")
    p.add_argument("--device-path", action="store_true",
                   help="run the code a GPU runs (per-problem scalars as tensors) on the CPU")
    args = p.parse_args()
    expfit = args.problem == "expfit"
    if expfit:
        args.only_b1 = True
        args.kinds = "numpy"
        if args.loss == "linear" and "--loss" not in " ".join(__import__("sys").argv):
            args.loss = "soft_l1"
    if args.f_scale is None:
        args.f_scale = 0.1 if expfit else 1.0
    if args.device_path:
        from torchimize_scipy._engine import host_scalars

        host_scalars.HOST = False
    dev, dt = setup(args)
    if cuda_requested_but_missing(dev):
        print("CUDA is not available on this machine: nothing to run with --device cuda.")
        return
    repeat = args.repeat or (2 if args.quick else 5)
    batch = min(args.batch, 1000) if args.quick else args.batch
    sizes = (1,) if args.only_b1 else (1, batch)
    rows, records = [], []
    for B in sizes:
        for method in args.methods.split(","):
            for bounded in (False, True):
                if method == "lm" and (bounded or args.loss != "linear"):
                    continue
                if expfit and bounded:
                    continue
                for kind in args.kinds.split(","):
                    call, fun = make_case(method, bounded, B, kind, dev, dt, args.seed,
                                          args.loss, args.f_scale, args.problem)
                    rec = profile_case(call, fun)
                    t, calls = time_case(call, fun, dev, repeat)
                    rec.update({"method": method, "bounded": bounded, "B": B, "fun": kind,
                                "seconds": t, "us_per_eval": 1e6 * t / max(calls, 1)})
                    records.append(rec)
                    per = rec["per_eval"]
                    engine_waits = per["syncs"].get("engine", 0) + per["reads"].get("engine", 0)
                    rows.append([method, "yes" if bounded else "no", B, kind,
                                 rec["fun_calls"], sum(rec["totals"]["ops"].values()),
                                 f"{sum(per['ops'].values()):.0f}",
                                 f"{per['ops'].get('engine', 0):.0f}",
                                 f"{_outside(per['ops']):.0f}",
                                 f"{sum(per['syncs'].values()):.1f}",
                                 f"{per['syncs'].get('engine', 0):.1f}",
                                 f"{per['inner'].get('engine', 0):.1f}",
                                 f"{_outside(per['syncs']):.1f}",
                                 f"{sum(per['reads'].values()):.1f}",
                                 f"{per['reads'].get('engine', 0):.1f}",
                                 f"{engine_waits:.1f}",
                                 f"{per['host'].get('engine', 0):.1f}",
                                 f"{rec['us_per_eval']:.0f}"])
                    print(f"{method:6s} bounded={bounded!s:5s} B={B:<6d} {kind:5s} "
                          f"evals={rec['fun_calls']:3d} ops/eval={rows[-1][6]:>5s} "
                          f"syncs/eval={rows[-1][9]:>5s} engine syncs+reads/eval="
                          f"{rows[-1][15]:>5s} {rec['us_per_eval']:.0f} us/eval", flush=True)
    headers = ["method", "bounds", "B", "fun", "evals", "ops/call", "ops/eval", "engine",
               "outside", "syncs/eval", "engine", "in torch ops", "outside",
               "host reads/eval", "engine", "engine syncs+reads", "host-scalar reads",
               "µs/eval"]
    robust = "" if args.loss == "linear" else f", loss={args.loss}, f_scale={args.f_scale:g}"
    title = "robust exponential fit (n = 3, m = 15)" if expfit else "Rosenbrock"
    print(f"\n### aten operations and host syncs per evaluation of `fun` ({title}, "
          f"analytic Jacobian{robust})\n")
    print(md_table(headers, rows))
    print("\n'outside' = adapters + jacobian + frontend + results + loss (the user's own "
          "torch ops are excluded from both columns but included in ops/eval); evals = "
          "calls of fun by the solver (batched rounds for B > 1); 'in torch ops' = the "
          "engine's syncs issued inside a torch operation (the info checks of "
          "torch.linalg.svd, the pivot checks of inv_ex's LU solve); 'engine syncs+reads' "
          "= the engine's syncs plus its Tensor.tolist() reads (each a device-to-host copy "
          "on a GPU); 'host-scalar reads' = the engine's reads of CPU tensors into host "
          "scalars (_engine/host_scalars.py: no device wait; a GPU runs the tensor code).")
    name = "bench_ops_device_path" if args.device_path else "bench_ops"
    if args.loss != "linear":
        name += f"_{args.loss}"
    if expfit:
        name += "_expfit"
    path = write_json(args, name, {
        "note": "per evaluation of fun: top-level aten ops, host syncs, host reads by region; "
                "Rosenbrock from (-1.2, 1) (bounded: x1 >= 1.5 from (2, 2)), analytic "
                "Jacobian; the profiled call follows one warm-up call",
        "regions": {r: k for k, r in REGIONS}, "batch": batch, "repeat": repeat,
        "device_path": args.device_path, "loss": args.loss, "f_scale": args.f_scale,
        "cases": records})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
