"""Where the time of the bundle adjustment goes, per phase, ours and scipy's (issue 13).

The problem of ``bench_sparse.py --case ba`` (n = 23,769, m = 62,208,
``jac_sparsity``, ``x_scale='jac'``, ``ftol=1e-4``, 'trf', '2-point'), solved
``--repeat`` times after one warm-up solve, with the functions of each phase
wrapped by timers: wall time (``perf_counter``) and the calling thread's CPU
time (``thread_time``; the products' pool threads are not in it), exclusive of
the nested phases. Phases, ours: the residual function (``fun``), the grouped
differences without ``fun`` (``fd``; with several torch threads the wait for
the groups' gathers handed to a helper thread apart), LSMR's products (with the subtraction
that follows each), the wait for a product started ahead, the rest of LSMR
(scalar recurrence and vector updates), the CSR forms and their scaling, the
column norms (``x_scale='jac'``), the other products of the step
(``op matvec``...), the 2-D subspace step, and what is left (the loop, the
frontend). scipy's: ``fun``, ``approx_derivative`` without ``fun``, ``lsmr``
(its products included), ``compute_jac_scale`` and what is left.

Ours also gets two tables that depend little on the load: the CPU time of
the calling thread and of the other threads of the process per solve (Linux,
``/proc/self/task``; the calling thread's is a floor under the wall time),
and the CSR kernels' own CPU time per entry streamed inside the solve, by
kind of product and by thread (caller or helper): set beside a hot loop
(``bench_sparse.py --case matvec``) it shows what the solve's other memory
traffic costs the products.

``--regions`` instead counts, for one solve of ours, the torch operations
that may open a parallel region of torch's OpenMP team: those over more than
torch's grain size (32,768 elements) that run while the calling thread has
more than one torch thread (views, detaches and constructors left out), by
the innermost two frames of the package that issued them. A count, not a
timing: it does not depend on the load.

Usage (``PYTHONPATH=.`` from a checkout whose package is not the installed one)::

    python benchmarks/profile_sparse.py [--case ba broyden] [--solver ours scipy]
           [--torch-residuals] [--threads 2] [--repeat 3] [--quick] [--regions]
"""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Callable
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import torch
from _common import base_parser, md_table, setup

_ACC: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
_STACK: list[list[float]] = []


def wrap(owner: Any, name: str, label: str) -> None:
    """Time ``owner.name`` under ``label``, exclusive of the wrapped calls inside it."""
    orig = getattr(owner, name)

    def timed(*a: Any, **k: Any) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        _STACK.append([0.0, 0.0])
        try:
            return orig(*a, **k)
        finally:
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            inner = _STACK.pop()
            e = _ACC[label]
            e[0] += 1
            e[1] += dt - inner[0]
            e[2] += dc - inner[1]
            if _STACK:
                _STACK[-1][0] += dt
                _STACK[-1][1] += dc

    setattr(owner, name, timed)


class _Fun:
    """Holder of the residual function, so that it can be wrapped like the phases."""

    fun: Callable


def instrument_ours() -> None:
    import torchimize_scipy._frontend as frontend
    from torchimize_scipy._engine import csr, lsmr_vectors
    from torchimize_scipy._engine import operator as op
    from torchimize_scipy._engine.steps import trf_lsmr

    wrap(lsmr_vectors.HostVectors, "product_sub", "LSMR products (+ subtraction)")
    wrap(lsmr_vectors.HostVectors, "product", "LSMR products (+ subtraction)")
    wrap(csr._Transposed, "wait", "LSMR wait for the pass over J (J v - c u, J^T of it)")
    wrap(csr.BlockCSR, "start_fused", "LSMR start of the pass over J")
    wrap(trf_lsmr, "lsmr", "LSMR rest (scalars, vector updates)")
    wrap(frontend, "grouped_difference", "fd without fun (grouped differences)")
    wrap(csr.CallsOnHelpers, "wait", "fd: wait for the gathers handed to a helper")
    wrap(csr.BlockCSR, "__init__", "CSR build")
    wrap(csr.BlockCSR, "scaled", "CSR scaling (folded)")
    wrap(op.JacobianOperator, "column_sq_norms", "column norms (x_scale='jac')")
    for name in ("matvec", "rmatvec", "matmat"):
        wrap(op.JacobianOperator, name, "other products of the step")
    wrap(trf_lsmr.TRFLSMR, "build_model", "build_model rest")
    wrap(trf_lsmr.TRFLSMR, "propose_step", "propose_step (2-D step)")
    instrument_kernels(csr)


#: (kind, thread) -> [entries streamed, kernel CPU seconds] of the CSR kernels (ours)
_KERNELS: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0, 0.0])


def instrument_kernels(csr: Any) -> None:
    """Count the entries and CPU time of every CSR kernel call of ours, by kind and thread."""
    import threading

    caller = threading.get_ident()
    forward, scatter = csr._csr_matvec, csr._csc_matvec

    def who() -> str:
        return "caller" if threading.get_ident() == caller else "helper"

    def timed(kernel: Any, label: str) -> Any:
        def run(n_row: int, n_col: int, ptr: np.ndarray, *rest: Any) -> None:
            c0 = time.thread_time()
            kernel(n_row, n_col, ptr, *rest)
            e = _KERNELS[(label, who())]
            e[0] += int(ptr[-1] - ptr[0])
            e[1] += time.thread_time() - c0
        return run

    csr._csr_matvec = timed(forward, "CSR kernel (J v rows)")
    csr._csc_matvec = timed(scatter, "CSC kernel (J^T u scattered along J's rows)")


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process so far, by thread id (Linux; else empty)."""
    import os

    out: dict[str, float] = {}
    try:
        tids = os.listdir("/proc/self/task")
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return out
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = (int(fields[11]) + int(fields[12])) / tick
    return out


#: aten operations that never start a parallel region (views, metadata, constructors)
_NO_REGION = {"detach", "resolve_conj", "resolve_neg", "lift_fresh", "select", "values",
              "reshape", "unsqueeze", "indices", "is_coalesced", "flatten", "view", "_values",
              "_indices", "alias", "expand", "t", "transpose", "slice", "_reshape_alias",
              "as_strided", "squeeze", "unbind", "permute", "empty", "new_zeros", "new_empty",
              "_sparse_coo_tensor_with_dims_and_tensors"}


def count_regions(solve: Callable[[], Any]) -> None:
    """Print the operations of one ``solve()`` that may open a torch parallel region."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    counts: collections.Counter = collections.Counter()

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__.split(".")[0]
            sizes = [a.numel() for a in (*args, out)
                     if isinstance(a, torch.Tensor) and a.layout == torch.strided]
            if (max(sizes, default=0) > 32768 and torch.get_num_threads() > 1
                    and name not in _NO_REGION):
                stack = traceback.extract_stack()
                if any(f.name in _USER_FUNS and f.filename.endswith(_BENCH_FILES) for f in stack):
                    counts[(name, "(inside the caller's fun)")] += 1
                    return out
                frames = [f for f in stack
                          if "torchimize_scipy" in f.filename.replace("\\", "/")]
                where = " < ".join(f"{f.filename.rsplit('torchimize_scipy', 1)[-1][1:]}:"
                                   f"{f.lineno}:{f.name}" for f in frames[-2:][::-1])
                counts[(name, where)] += 1
            return out

    with _Mode():
        res = solve()
    user = sum(c for (_, where), c in counts.items() if where.startswith("(inside"))
    print(f"cost {res.cost:.6f}, nfev {res.nfev}; {sum(counts.values()) - user} operations "
          f"of the package and {user} of the caller's fun over 32,768 elements with "
          f"{torch.get_num_threads()} torch threads")
    rows = [[c, name, where] for (name, where), c in sorted(counts.items(), key=lambda kv:
                                                             kv[0][1])]
    print(md_table(["count", "operation", "issued at"], rows))


#: names of the benchmarks' residual functions (their operations are the caller's own)
_USER_FUNS = {"fun_torch", "fun_np", "broyden_np", "broyden_torch"}
_BENCH_FILES = ("bench_sparse.py", "profile_sparse.py")


def broyden_torch(x: torch.Tensor) -> torch.Tensor:
    """Broyden's tridiagonal residuals in torch (``bench_sparse.broyden_np``'s)."""
    f = (3 - x) * x + 1
    return torch.cat([f[:1], f[1:] - x[:-1]]) - torch.cat([2 * x[1:], x[:0].new_zeros(1)])


def instrument_scipy() -> None:
    import scipy.optimize._lsq.trf as trf

    differentiable = sys.modules["scipy.optimize._differentiable_functions"]
    wrap(trf, "lsmr", "lsmr (products included)")
    wrap(differentiable, "approx_derivative", "fd without fun (approx_derivative)")
    wrap(trf, "compute_jac_scale", "compute_jac_scale")


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--solver", choices=["ours", "scipy"], default="ours")
    p.add_argument("--case", choices=["ba", "broyden"], default="ba",
                   help="the bundle adjustment or Broyden tridiagonal, n = 100,000")
    p.add_argument("--torch-residuals", action="store_true",
                   help="ours with the torch residual function (batched differences)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--regions", action="store_true",
                   help="count the torch operations that may open a parallel region (ours)")
    args = p.parse_args()
    setup(args)
    from bench_sparse import broyden_np, bundle_adjustment, tridiagonal

    if args.case == "broyden":
        n = 2000 if args.quick else 100_000
        prob = {"x0": -np.ones(n), "n": n, "m": n, "fun_np": broyden_np,
                "fun_torch": broyden_torch}
        opts = dict(jac_sparsity=tridiagonal(n), tr_solver="lsmr", method="trf")
    else:
        size = dict(n_cameras=8, n_points=500) if args.quick else {}
        prob = bundle_adjustment(seed=args.seed, **size)
        opts = dict(jac_sparsity=prob["sparsity"], x_scale="jac", ftol=1e-4, method="trf")
    _Fun.fun = staticmethod(prob["fun_torch"] if args.torch_residuals else prob["fun_np"])
    wrap(_Fun, "fun", "fun (the residuals)")
    if args.solver == "scipy":
        import scipy.optimize

        instrument_scipy()
        x0 = prob["x0"]

        def solve() -> Any:
            return scipy.optimize.least_squares(_Fun.fun, x0, **opts)
    else:
        import torchimize_scipy

        x0 = torch.as_tensor(prob["x0"]) if args.torch_residuals else prob["x0"]

        def solve() -> Any:
            return torchimize_scipy.least_squares(_Fun.fun, x0, **opts)
        if args.regions:
            solve()
            count_regions(solve)
            return
        instrument_ours()
    solve()
    _ACC.clear()
    _KERNELS.clear()
    R = max(1, args.repeat)
    threads0 = thread_cpu()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(R):
        res = solve()
    wall, cpu = (time.perf_counter() - t0) / R, (time.process_time() - c0) / R
    threads1 = thread_cpu()
    rows, w_sum, c_sum = [], 0.0, 0.0
    for label, (calls, w, c) in sorted(_ACC.items(), key=lambda kv: -kv[1][1]):
        rows.append([label, calls / R, w / R, c / R])
        w_sum += w / R
        c_sum += c / R
    rows.append(["(the rest: loop, frontend, ...)", "", wall - w_sum, ""])
    if args.solver == "ours":
        print(f"ours: {sys.modules['torchimize_scipy'].__file__}")
    print(f"{args.solver}{' (torch residuals)' if args.torch_residuals else ''}, "
          f"{torch.get_num_threads()} threads, n={prob['n']}, m={prob['m']}: wall {wall:.3f} s, "
          f"process CPU {cpu:.3f} s per solve (mean of {R}); cost {res.cost:.6f}, "
          f"nfev {res.nfev}")
    print(md_table(["phase", "calls", "wall s", "caller-thread CPU s"], rows))
    if args.solver == "ours" and threads1:
        import os

        me = str(os.getpid())  # the main thread's id is the process id
        spent = {t: c - threads0.get(t, 0.0) for t, c in threads1.items()}
        others = sum(c for t, c in spent.items() if t != me)
        print(md_table(["thread", "CPU s per solve"],
                       [["calling thread", spent.get(me, 0.0) / R],
                        ["all other threads (products' helpers, ...)", others / R]]))
    if _KERNELS:
        krows = [[kind, who, n / R / 1e6, c / R, 1e9 * c / n if n else float("nan")]
                 for (kind, who), (n, c) in sorted(_KERNELS.items())]
        print(md_table(["CSR kernel", "thread", "million entries per solve", "CPU s per solve",
                        "ns per entry"], krows))


if __name__ == "__main__":
    main()
