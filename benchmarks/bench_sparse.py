"""Large sparse problems against scipy in the same run (issue 13, RESULTS §15).

Cases (``--case``, default all):

* ``ba``: bundle adjustment shaped like the scipy cookbook's BAL
  problem-49-7776 (49 cameras with 9 parameters each, 7,776 points, 4
  observations a point: n = 23,769, m = 62,208), synthetic data from a fixed
  seed; ``jac_sparsity``, ``x_scale='jac'``, ``ftol=1e-4``, method 'trf', as
  the cookbook solves it. scipy with the numpy residuals; ours with the same
  numpy residuals, then with a torch residual function (the grouped finite
  differences evaluate all column groups in one vmapped call). With
  ``--workers K`` both also run with ``workers=ThreadPool(K).map`` (scipy's
  map-like ``workers``: the column groups' evaluations of the finite
  differences in K threads; numpy releases the GIL in its loops), as extra
  rows: a parallel ``fun`` is the caller's choice, not the headline.
* ``broyden``: Broyden tridiagonal, n = 100,000, ``jac_sparsity``,
  ``tr_solver='lsmr'`` (scipy's test problem, at scale), numpy residuals.
* ``big``: Broyden tridiagonal with n = 1,000,000, ours only, in a child
  process whose peak resident set size (``ru_maxrss``) is reported (target
  < 4 GiB).
* ``matvec``: the products ``J v`` and ``J^T u`` of the bundle adjustment's
  Jacobian (random values on its structure): scipy's CSR (``J @ v`` and
  ``J.T @ u``, as scipy's lsmr does them), torch's CSR kernel, and ours as
  LSMR runs them (:meth:`~torchimize_scipy._engine.csr.BlockCSR.matvec_into`
  and ``rmatvec_into`` into a zeroed buffer: scipy's CSR kernel on row blocks
  of ``J``, two per torch thread, and for ``J^T u`` scipy's CSC kernel along
  ``J``'s rows in the structure's transposed blocks), and LSMR's pair
  ``t = J v - c u``, ``J^T t`` in one pass (``start_fused``); medians of
  process CPU time and wall time per product.
* ``kernels``: formulations of the bundle adjustment's products (random
  values on its structure), each checked bit for bit against scipy's CSR
  kernel (``csr_matvec``, what the solver runs): the CSR kernel on ``J`` and
  on ``J^T``'s CSR; ``J^T u`` scattered along ``J``'s rows (``csc_matvec``);
  an ELL layout (every row of ``J`` has 12 entries) summed column pass by
  column pass in numpy (``take``, ``multiply``, ``add``: each row's sum in
  the kernel's order); scipy's BSR kernel on 2 x 3 blocks (``J``) and 3 x 2
  blocks (``J^T``), whose per-block loops sum each row in the same order;
  ``J^T u`` as column panels of ``J`` (equal entry counts) scattered one
  panel per thread. Calling-thread CPU nanoseconds per entry, medians of
  rounds that alternate the formulations, with 1 thread and with 2 threads
  (each runs half of the rows, or one panel; ``J v`` then ``J^T u``, as LSMR
  alternates them).
* ``threads``: the bundle adjustment (numpy residuals) by the working tree
  with 1 and with ``--threads`` torch threads, alternated in this process
  (``torch.set_num_threads`` before each solve), ``--repeat`` rounds: what a
  second thread gains, under the same load for both.
* ``groups``: the column grouping of the bundle adjustment and of the Broyden
  structure: scipy's compiled ``group_columns``, ours in scipy's order
  (the same groups) and ours largest first (what ``jac_sparsity`` uses):
  number of groups and process CPU time.

Each solve reports wall time and process CPU time (``time.process_time``, all
threads of the process: on a loaded machine the more stable of the two), the
final costs, ``nfev``/``njev`` and the status, and our speed-up (scipy time /
our time) measured in the same run. The solves of a case run in turn,
``--repeat`` rounds (default 3), and the tables give the medians.
``--before REV`` also runs the package as of commit ``REV`` (imported from
``git archive`` under another name, as ``ab_small.py`` does) in the same
process, alternating with the working tree, for a before/after on the same
load. ``--quick`` shrinks every size to check
the script.

Usage::

    python benchmarks/bench_sparse.py [--case ba broyden big matvec kernels groups threads]
           [--quick] [--workers K]
           [--threads 2] [--before REV] [--repeat 3]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import scipy.optimize
import scipy.sparse as sp
import torch
from _common import base_parser, md_table, peak_rss_bytes, setup, timed, write_json

import torchimize_scipy
from torchimize_scipy import least_squares

# ----------------------------------------------------------------------------- bundle adjustment


def rotate_np(points: np.ndarray, rot_vecs: np.ndarray) -> np.ndarray:
    """Rodrigues' rotation of each point by its rotation vector (numpy)."""
    theta = np.linalg.norm(rot_vecs, axis=1)[:, None]
    with np.errstate(invalid="ignore"):
        v = np.nan_to_num(rot_vecs / theta)
    dot = np.sum(points * v, axis=1)[:, None]
    cos, sin = np.cos(theta), np.sin(theta)
    return cos * points + sin * np.cross(v, points) + dot * (1 - cos) * v


def project_np(points: np.ndarray, cams: np.ndarray) -> np.ndarray:
    """BAL's pinhole camera with radial distortion: rotation, translation, f, k1, k2."""
    p = rotate_np(points, cams[:, :3]) + cams[:, 3:6]
    p = -p[:, :2] / p[:, 2, None]
    f, k1, k2 = cams[:, 6], cams[:, 7], cams[:, 8]
    n2 = np.sum(p**2, axis=1)
    return p * (f * (1 + k1 * n2 + k2 * n2**2))[:, None]


def rotate_torch(points: torch.Tensor, rot_vecs: torch.Tensor) -> torch.Tensor:
    theta = torch.linalg.vector_norm(rot_vecs, dim=1, keepdim=True)
    v = rot_vecs / torch.clamp(theta, min=torch.finfo(theta.dtype).tiny)
    dot = (points * v).sum(1, keepdim=True)
    cos, sin = torch.cos(theta), torch.sin(theta)
    return cos * points + sin * torch.linalg.cross(v, points, dim=1) + dot * (1 - cos) * v


def project_torch(points: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
    p = rotate_torch(points, cams[:, :3]) + cams[:, 3:6]
    p = -p[:, :2] / p[:, 2:3]
    f, k1, k2 = cams[:, 6], cams[:, 7], cams[:, 8]
    n2 = (p * p).sum(1)
    return p * (f * (1 + k1 * n2 + k2 * n2 * n2)).unsqueeze(1)


def bundle_adjustment(n_cameras: int = 49, n_points: int = 7776, per_point: int = 4,
                      seed: int = 0) -> dict[str, Any]:
    """A synthetic BAL-like problem: true scene, noisy observations, a perturbed start."""
    rng = np.random.default_rng(seed)
    cams = np.zeros((n_cameras, 9))
    cams[:, :3] = 0.3 * rng.standard_normal((n_cameras, 3))
    cams[:, 3:5] = 0.5 * rng.standard_normal((n_cameras, 2))
    cams[:, 5] = -6.0 + 0.5 * rng.standard_normal(n_cameras)
    cams[:, 6] = 500.0 * (1 + 0.05 * rng.standard_normal(n_cameras))
    cams[:, 7] = 1e-2 * rng.standard_normal(n_cameras)
    cams[:, 8] = 1e-3 * rng.standard_normal(n_cameras)
    pts = rng.uniform(-1.0, 1.0, (n_points, 3))
    camera_idx = np.concatenate([rng.choice(n_cameras, per_point, replace=False)
                                 for _ in range(n_points)])
    point_idx = np.repeat(np.arange(n_points), per_point)
    obs = project_np(pts[point_idx], cams[camera_idx])
    obs = obs + rng.standard_normal(obs.shape)  # one pixel of noise
    x_true = np.concatenate([cams.ravel(), pts.ravel()])
    x0 = x_true.copy()
    start = cams.copy()
    start[:, :3] += 0.01 * rng.standard_normal((n_cameras, 3))
    start[:, 3:6] += 0.02 * rng.standard_normal((n_cameras, 3))
    x0[:n_cameras * 9] = start.ravel()
    x0[n_cameras * 9:] += 0.02 * rng.standard_normal(n_points * 3)

    def fun_np(params: np.ndarray) -> np.ndarray:
        c = params[:n_cameras * 9].reshape((n_cameras, 9))
        p = params[n_cameras * 9:].reshape((n_points, 3))
        return (project_np(p[point_idx], c[camera_idx]) - obs).ravel()

    ci, pi, obs_t = (torch.as_tensor(camera_idx), torch.as_tensor(point_idx),
                     torch.as_tensor(obs))

    def fun_torch(params: torch.Tensor) -> torch.Tensor:
        c = params[:n_cameras * 9].reshape(n_cameras, 9)
        p = params[n_cameras * 9:].reshape(n_points, 3)
        dev = params.device
        return (project_torch(p[pi.to(dev)], c[ci.to(dev)]) - obs_t.to(params)).reshape(-1)

    m = 2 * camera_idx.size
    n = x0.size
    S = sp.lil_array((m, n), dtype=int)
    i = np.arange(camera_idx.size)
    for s in range(9):
        S[2 * i, camera_idx * 9 + s] = 1
        S[2 * i + 1, camera_idx * 9 + s] = 1
    for s in range(3):
        S[2 * i, n_cameras * 9 + point_idx * 3 + s] = 1
        S[2 * i + 1, n_cameras * 9 + point_idx * 3 + s] = 1
    return {"x0": x0, "fun_np": fun_np, "fun_torch": fun_torch, "sparsity": S.tocsr(),
            "m": m, "n": n}


# ----------------------------------------------------------------------------- Broyden


def broyden_np(x: np.ndarray) -> np.ndarray:
    f = (3 - x) * x + 1
    f[1:] -= x[:-1]
    f[:-1] -= 2 * x[1:]
    return f


def tridiagonal(n: int) -> sp.csr_array:
    return sp.diags_array([np.ones(n - 1), np.ones(n), np.ones(n - 1)], offsets=[-1, 0, 1],
                          format="csr")


def summary(res: Any) -> dict[str, Any]:
    return {"cost": float(res.cost), "nfev": int(res.nfev),
            "njev": None if res.njev is None else int(res.njev), "status": int(res.status),
            "optimality": float(res.optimality)}


def timed_cpu(fn: Callable[[], Any], dev: torch.device | None = None) -> tuple[dict, Any]:
    """Run ``fn`` once: wall and process CPU seconds, and its result."""
    c0 = time.process_time()
    t, res = timed(fn, dev)
    return {"time_s": t, "cpu_s": time.process_time() - c0}, res


def alternated(calls: dict[str, Callable[[], Any]], repeat: int,
               dev: torch.device | None = None) -> dict[str, dict[str, Any]]:
    """Run the ``calls`` in turn, ``repeat`` rounds: medians of wall and CPU time, results.

    Alternating the solvers round by round puts them under the same load;
    the medians are what the tables report (``*_all`` keep every round).
    """
    rounds: dict[str, list] = {k: [] for k in calls}
    results: dict[str, Any] = {}
    for _ in range(max(1, repeat)):
        for name, fn in calls.items():
            times, res = timed_cpu(fn, dev)
            rounds[name].append(times)
            results[name] = res
    out = {}
    for name, rs in rounds.items():
        out[name] = {"time_s": statistics.median(r["time_s"] for r in rs),
                     "cpu_s": statistics.median(r["cpu_s"] for r in rs),
                     "time_s_all": [r["time_s"] for r in rs],
                     "cpu_s_all": [r["cpu_s"] for r in rs], **summary(results[name])}
    return out


def solvers(args: Any) -> dict[str, Any]:
    """'ours' (the working tree) and, with ``--before``, 'before' (that commit's package)."""
    out = {"ours": torchimize_scipy}
    if args.before:
        from ab_small import import_commit

        out = {"before": import_commit(args.before, tempfile.mkdtemp(prefix="bench_sparse_")),
               **out}
    return out


def run_ba(args: Any, dev: torch.device, dt: torch.dtype) -> dict[str, Any]:
    size = dict(n_cameras=8, n_points=500) if args.quick else {}
    prob = bundle_adjustment(seed=args.seed, **size)
    opts = dict(jac_sparsity=prob["sparsity"], x_scale="jac", ftol=1e-4, method="trf")
    x0t = torch.as_tensor(prob["x0"], device=dev, dtype=dt)
    calls: dict[str, Callable[[], Any]] = {
        "scipy": lambda: scipy.optimize.least_squares(prob["fun_np"], prob["x0"], **opts)}
    for name, lib in solvers(args).items():
        calls[f"{name}_numpy"] = lambda lib=lib: lib.least_squares(prob["fun_np"], prob["x0"],
                                                                   **opts)
        calls[f"{name}_torch"] = lambda lib=lib: lib.least_squares(prob["fun_torch"], x0t, **opts)
    if not args.workers:
        return {"m": prob["m"], "n": prob["n"], "repeat": args.repeat,
                **alternated(calls, args.repeat, dev)}
    from multiprocessing.pool import ThreadPool

    with ThreadPool(args.workers) as pool:
        wopts = dict(opts, workers=pool.map)
        calls["scipy_workers"] = lambda: scipy.optimize.least_squares(prob["fun_np"], prob["x0"],
                                                                      **wopts)
        for name, lib in solvers(args).items():
            calls[f"{name}_workers"] = lambda lib=lib: lib.least_squares(
                prob["fun_np"], prob["x0"], **wopts)
        return {"m": prob["m"], "n": prob["n"], "repeat": args.repeat, "workers": args.workers,
                **alternated(calls, args.repeat, dev)}


def run_threads(args: Any) -> dict[str, Any]:
    """The bundle adjustment with 1 and with ``args.threads`` torch threads, alternated."""
    size = dict(n_cameras=8, n_points=500) if args.quick else {}
    prob = bundle_adjustment(seed=args.seed, **size)
    opts = dict(jac_sparsity=prob["sparsity"], x_scale="jac", ftol=1e-4, method="trf")

    def solve_with(k: int) -> Any:
        torch.set_num_threads(k)
        try:
            return least_squares(prob["fun_np"], prob["x0"], **opts)
        finally:
            torch.set_num_threads(args.threads)

    calls = {f"{k} threads": (lambda k=k: solve_with(k)) for k in sorted({1, args.threads})}
    return {"m": prob["m"], "n": prob["n"], "repeat": args.repeat,
            **alternated(calls, args.repeat)}


def run_broyden(args: Any, dev: torch.device, dt: torch.dtype) -> dict[str, Any]:
    n = 2000 if args.quick else 100_000
    x0 = -np.ones(n)
    opts = dict(jac_sparsity=tridiagonal(n), tr_solver="lsmr", method="trf")
    calls: dict[str, Callable[[], Any]] = {
        "scipy": lambda: scipy.optimize.least_squares(broyden_np, x0, **opts)}
    for name, lib in solvers(args).items():
        calls[f"{name}_numpy"] = lambda lib=lib: lib.least_squares(broyden_np, x0, **opts)
    return {"n": n, "repeat": args.repeat, **alternated(calls, args.repeat)}


def _median_times(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """Median wall and process CPU seconds of ``fn`` over ``repeat`` calls (after one)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def run_matvec(args: Any) -> dict[str, Any]:
    """Products with the bundle adjustment's Jacobian structure: scipy, torch CSR, ours."""
    import warnings

    from torchimize_scipy._engine.csr import BlockCSR

    size = dict(n_cameras=8, n_points=500) if args.quick else {}
    S = sp.csr_array(bundle_adjustment(seed=args.seed, **size)["sparsity"], dtype=float)
    rng = np.random.default_rng(args.seed)
    S.data = rng.standard_normal(S.nnz)
    m, n = S.shape
    v, u = rng.standard_normal(n), rng.standard_normal(m)
    coo = S.tocoo()
    J = torch.sparse_coo_tensor(np.stack([np.zeros(S.nnz, dtype=np.int64), coo.row, coo.col]),
                                coo.data, (1, m, n), check_invariants=False).coalesce()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        A = J[0].to_sparse_csr()
        At = J[0].t().coalesce().to_sparse_csr()
    ours = BlockCSR(J)
    vt, ut = torch.as_tensor(v)[None], torch.as_tensor(u)[None]
    v2, u2 = v[None].copy(), u[None].copy()
    out_m, out_n = np.zeros((1, m)), np.zeros((1, n))

    def ours_jv() -> None:
        out_m.fill(0)
        ours.matvec_into(v2, out_m)

    def ours_jtu() -> None:
        out_n.fill(0)
        ours.rmatvec_into(u2, out_n)

    tmp_m = np.empty((1, m))

    def ours_pair() -> None:
        ours.start_fused(v2, u2, 0.5, out_m, tmp_m, out_n).wait()
    repeat = 50 if args.quick else 200
    out: dict[str, Any] = {"m": m, "n": n, "nnz": int(S.nnz), "threads": torch.get_num_threads()}
    cases = {
        "scipy J v": lambda: S @ v, "scipy J^T u": lambda: S.T @ u,
        "torch CSR J v": lambda: A @ vt.reshape(-1, 1),
        "torch CSR J^T u": lambda: At @ ut.reshape(-1, 1),
        "ours J v": ours_jv, "ours J^T u": ours_jtu,
        "ours J v - c u and J^T of it, one pass": ours_pair,
    }
    for name, fn in cases.items():
        wall, cpu = _median_times(fn, repeat)
        out[name] = {"wall_ms": 1e3 * wall, "cpu_ms": 1e3 * cpu}
    return out


def run_kernels(args: Any) -> dict[str, Any]:
    """ns per entry of formulations of ``J v`` and ``J^T u`` (module notes), 1 and 2 threads."""
    import threading

    from scipy.sparse._sparsetools import bsr_matvec, csc_matvec, csr_matvec

    size = dict(n_cameras=8, n_points=500) if args.quick else {}
    S = sp.csr_array(bundle_adjustment(seed=args.seed, **size)["sparsity"], dtype=float)
    S.sort_indices()
    rng = np.random.default_rng(args.seed)
    m, n = S.shape
    nnz = S.nnz
    ip, ix = S.indptr.astype(np.int32), S.indices.astype(np.int32)
    data = rng.standard_normal(nnz)
    St = sp.csr_array((data, ix, ip), shape=(m, n)).T.tocsr()
    St.sort_indices()
    tp, tx, td = St.indptr.astype(np.int32), St.indices.astype(np.int32), St.data
    v, u = rng.standard_normal(n), rng.standard_normal(m)
    k = int(ip[1] - ip[0])
    assert np.all(np.diff(ip) == k)  # every row of the bundle adjustment: 12 entries
    ell_cols = np.ascontiguousarray(ix.reshape(m, k).T).astype(np.intp)
    ell_vals = np.ascontiguousarray(data.reshape(m, k).T)
    bsr = sp.bsr_array(sp.csr_array((data, ix, ip), shape=(m, n)), blocksize=(2, 3))
    bsr.sort_indices()
    bsr_t = sp.bsr_array(St, blocksize=(3, 2))
    bsr_t.sort_indices()
    assert bsr.data.size == nnz and bsr_t.data.size == nnz  # dense 2 x 3 blocks, no fill
    col_end = np.cumsum(np.bincount(ix, minlength=n))
    cut = int(np.searchsorted(col_end, nnz / 2)) + 1
    panels = []
    for c0, c1 in ((0, cut), (cut, n)):
        P = sp.csr_array((data, ix, ip), shape=(m, n))[:, c0:c1].tocsr()
        P.sort_indices()
        panels.append((c0, c1, P.indptr.astype(np.int32), (P.indices + c0).astype(np.int32),
                       P.data.copy()))

    def halves(ptr: np.ndarray, rows: int) -> list[tuple[int, int]]:
        mid = int(np.searchsorted(ptr, ptr[-1] / 2))
        return [(0, mid), (mid, rows)]

    rows_j, rows_t = halves(ip, m), halves(tp, n)
    rows_b, rows_bt = halves(bsr.indptr, m // 2), halves(bsr_t.indptr, n // 3)
    tmp = np.empty(m)

    def csr_fwd(out: np.ndarray, lo: int, hi: int) -> None:
        part = out[lo:hi]
        part.fill(0)
        csr_matvec(hi - lo, n, ip[lo:hi + 1] - ip[lo], ix[ip[lo]:ip[hi]], data[ip[lo]:ip[hi]],
                   v, part)

    def csr_bwd(out: np.ndarray, lo: int, hi: int) -> None:
        part = out[lo:hi]
        part.fill(0)
        csr_matvec(hi - lo, m, tp[lo:hi + 1] - tp[lo], tx[tp[lo]:tp[hi]], td[tp[lo]:tp[hi]],
                   u, part)

    def ell_fwd(out: np.ndarray, lo: int, hi: int) -> None:
        part, t = out[lo:hi], tmp[lo:hi]
        part.fill(0)
        for j in range(k):  # acc += vals_j * v[cols_j]: each row's sum in the kernel's order
            np.take(v, ell_cols[j, lo:hi], out=t)
            np.multiply(t, ell_vals[j, lo:hi], out=t)
            np.add(part, t, out=part)

    def bsr_fwd(out: np.ndarray, lo: int, hi: int) -> None:
        part = out[2 * lo:2 * hi]
        part.fill(0)
        a, b = bsr.indptr[lo], bsr.indptr[hi]
        bsr_matvec(hi - lo, n // 3, 2, 3, bsr.indptr[lo:hi + 1] - a, bsr.indices[a:b],
                   bsr.data[a:b].reshape(-1), v, part)

    def bsr_bwd(out: np.ndarray, lo: int, hi: int) -> None:
        part = out[3 * lo:3 * hi]
        part.fill(0)
        a, b = bsr_t.indptr[lo], bsr_t.indptr[hi]
        bsr_matvec(hi - lo, m // 2, 3, 2, bsr_t.indptr[lo:hi + 1] - a, bsr_t.indices[a:b],
                   bsr_t.data[a:b].reshape(-1), u, part)

    def scatter_bwd(out: np.ndarray, which: int, _: int) -> None:
        if which < 0:  # one thread: the whole of J
            out.fill(0)
            csc_matvec(n, m, ip, ix, data, u, out)
            return
        c0, c1, pp, px, pd = panels[which]
        out[c0:c1] = 0
        csc_matvec(n, m, pp, px, pd, u, out)

    one_fwd, one_bwd = [(0, m)], [(0, n)]
    forms = {  # name: (J v over row ranges, its ranges per thread, J^T u, its ranges per thread)
        "CSR kernel (J, J^T's CSR): the solver's before RESULTS §38": (csr_fwd, rows_j, csr_bwd,
                                                                    rows_t),
        "ELL column passes (numpy), J^T u as CSR": (ell_fwd, rows_j, csr_bwd, rows_t),
        "BSR 2x3 / 3x2 (scipy bsr_matvec)": (bsr_fwd, rows_b, bsr_bwd, rows_bt),
        "CSR J v; J^T u scattered (csc_matvec; 2 threads: column panels)":
            (csr_fwd, rows_j, scatter_bwd, [(0, 0), (1, 0)]),
    }
    ref_f, ref_b = np.zeros(m), np.zeros(n)
    csr_fwd(ref_f, 0, m)
    csr_bwd(ref_b, 0, n)
    out: dict[str, Any] = {"m": m, "n": n, "nnz": int(nnz)}
    outs = {"f": np.zeros(m), "b": np.zeros(n)}
    for name, (fw, _, bw, parts_b) in forms.items():
        fw(outs["f"], 0, m if fw is not bsr_fwd else m // 2)
        if bw is scatter_bwd:
            for which, _x in parts_b:
                bw(outs["b"], which, 0)
        else:
            bw(outs["b"], 0, n if bw is not bsr_bwd else n // 3)
        out[name] = {"bitwise": bool(np.array_equal(outs["f"], ref_f)
                                     and np.array_equal(outs["b"], ref_b))}

    def one_round(fw: Any, bw: Any, rf: list, rb: list, threads: int, it: int) -> float:
        """Thread CPU ns per entry of ``it`` pairs (J v, J^T u), split over ``threads``."""
        barrier = threading.Barrier(threads)
        cpu = [0.0] * threads

        def work(t: int) -> None:
            c0 = time.thread_time()
            for _ in range(it):
                for r in (rf if threads == 2 else one_fwd_of(fw))[t::threads]:
                    fw(outs["f"], *r)
                barrier.wait()
                for r in (rb if threads == 2 else one_bwd_of(bw))[t::threads]:
                    bw(outs["b"], *r)
                barrier.wait()
            cpu[t] = time.thread_time() - c0

        helpers = [threading.Thread(target=work, args=(t,)) for t in range(1, threads)]
        for h in helpers:
            h.start()
        work(0)
        for h in helpers:
            h.join()
        return 1e9 * sum(cpu) / (it * 2 * nnz)

    def one_fwd_of(fw: Any) -> list:
        return [(0, m // 2)] if fw is bsr_fwd else one_fwd

    def one_bwd_of(bw: Any) -> list:
        if bw is scatter_bwd:
            return [(-1, 0)]
        return [(0, n // 3)] if bw is bsr_bwd else one_bwd

    it = 5 if args.quick else 20
    samples: dict[tuple, list] = {}
    for _ in range(max(3, args.repeat)):
        for name, (fw, rf, bw, rb) in forms.items():
            for threads in (1, 2):
                samples.setdefault((name, threads), []).append(
                    one_round(fw, bw, rf, rb, threads, it))
    for (name, threads), xs in samples.items():
        out[name][f"ns_per_entry_{threads}t"] = statistics.median(xs)
    return out


def run_groups(args: Any) -> dict[str, Any]:
    """Column grouping: scipy's compiled one, ours in scipy's order, ours largest first."""
    from scipy.optimize._numdiff import group_columns as scipy_groups

    from torchimize_scipy._sparsity import fewest_groups, group_columns

    size = dict(n_cameras=8, n_points=500) if args.quick else {}
    structures = {"bundle adjustment": bundle_adjustment(seed=args.seed, **size)["sparsity"],
                  "Broyden tridiagonal": tridiagonal(2000 if args.quick else 100_000)}
    out: dict[str, Any] = {}
    for name, S in structures.items():
        row = {"shape": list(S.shape), "nnz": int(S.nnz)}
        for label, fn in (("scipy", scipy_groups), ("ours scipy order", group_columns),
                          ("ours largest first", fewest_groups)):
            groups = fn(S)
            wall, cpu = _median_times(lambda fn=fn, S=S: fn(S), 3 if not args.quick else 5)
            row[label] = {"groups": int(groups.max()) + 1, "cpu_s": cpu, "wall_s": wall}
        out[name] = row
    return out


def big_child(n: int, threads: int) -> None:
    """Child process of the ``big`` case: solve, print JSON with the peak RSS."""
    torch.set_num_threads(threads)
    x0 = -np.ones(n)
    t, res = timed(lambda: least_squares(broyden_np, x0, jac_sparsity=tridiagonal(n),
                                         tr_solver="lsmr"))
    print(json.dumps({"n": n, "time_s": t, **summary(res),
                      "peak_rss_gib": peak_rss_bytes() / 2**30}))


def run_big(args: Any) -> dict[str, Any]:
    n = 20_000 if args.quick else 1_000_000
    proc = subprocess.run([sys.executable, __file__, "--big-child", str(n), "--threads",
                           str(args.threads)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _solve_rows(label: str, r: dict[str, Any], kind: str) -> list[list[Any]]:
    rows = []
    ref = r.get("scipy_workers" if kind == "workers" else "scipy")
    if ref is None:  # (no ``--workers``: no such rows)
        return rows
    what = (f"numpy residuals, workers={r.get('workers')} threads for both" if kind == "workers"
            else f"{kind} residuals")
    for who in ("before", "ours"):
        key = f"{who}_{kind}"
        if key not in r:
            continue
        mine = r[key]
        rows.append([f"{label} ({what}, {who})", ref["time_s"],
                     mine["time_s"], ref["time_s"] / mine["time_s"],
                     ref["cpu_s"], mine["cpu_s"], ref["cpu_s"] / mine["cpu_s"],
                     ref["cost"], mine["cost"], f"{ref['nfev']}/{mine['nfev']}"])
    return rows


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--case", nargs="+", default=["ba", "broyden", "big"],
                   choices=["ba", "broyden", "big", "matvec", "kernels", "groups", "threads"])
    p.add_argument("--before", default=None,
                   help="also run the package as of this commit, in the same process")
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds of the solves, alternated; medians reported (default 3)")
    p.add_argument("--workers", type=int, default=0,
                   help="'ba': also solve with workers=ThreadPool(K).map, scipy and ours "
                        "(extra rows; default 0: not)")
    p.add_argument("--big-child", type=int, default=None, help=argparse_hidden())
    args = p.parse_args()
    dev, dt = setup(args)
    if args.big_child is not None:
        big_child(args.big_child, args.threads)
        return
    # 'ours' is the package Python imports: run with PYTHONPATH=<checkout> from a
    # worktree whose package is not the one installed (the path is printed and kept)
    results: dict[str, Any] = {"threads": args.threads, "before": args.before,
                               "ours": str(torchimize_scipy.__file__)}
    print(f"ours: {torchimize_scipy.__file__}")
    rows = []
    if "ba" in args.case:
        r = results["ba"] = run_ba(args, dev, dt)
        for kind in ("numpy", "torch", "workers"):
            rows += _solve_rows(f"bundle adjustment n={r['n']}, m={r['m']}", r, kind)
    if "broyden" in args.case:
        r = results["broyden"] = run_broyden(args, dev, dt)
        rows += _solve_rows(f"Broyden tridiagonal n={r['n']}, lsmr", r, "numpy")
    if "big" in args.case:
        r = results["big"] = run_big(args)
        rows.append([f"Broyden tridiagonal n={r['n']} (peak RSS {r['peak_rss_gib']:.2f} GiB)",
                     "", r["time_s"], "", "", "", "", "", r["cost"], f"-/{r['nfev']}"])
    if rows:
        print(md_table(["problem", "scipy s", "ours s", "speed-up", "scipy CPU s", "ours CPU s",
                        "CPU speed-up", "scipy cost", "our cost", "nfev scipy/ours"], rows))
    if "matvec" in args.case:
        r = results["matvec"] = run_matvec(args)
        print(f"\nproducts, bundle adjustment structure (m={r['m']}, n={r['n']}, "
              f"nnz={r['nnz']}, {r['threads']} torch threads), medians per product:")
        base = {"J v": r["scipy J v"]["cpu_ms"], "J^T u": r["scipy J^T u"]["cpu_ms"]}
        base["pair"] = base["J v"] + base["J^T u"]  # (scipy's lsmr: two products)

        def scipys(k: str) -> float:
            if k.endswith("one pass"):
                return base["pair"]
            return base[k.split(" ", 1)[1] if k.startswith(("scipy", "ours"))
                        else k.split(" ", 2)[2]]
        print(md_table(["product", "CPU ms", "wall ms", "CPU / scipy's"],
                       [[k, v["cpu_ms"], v["wall_ms"], v["cpu_ms"] / scipys(k)]
                        for k, v in r.items() if isinstance(v, dict)]))
    if "kernels" in args.case:
        r = results["kernels"] = run_kernels(args)
        print(f"\nformulations of J v and J^T u, bundle adjustment structure (m={r['m']}, "
              f"n={r['n']}, nnz={r['nnz']}): thread CPU ns per entry, medians (1 thread; 2 "
              f"threads, each half of the rows or one panel); bit for bit against the CSR kernel:")
        print(md_table(["formulation", "1 thread ns/entry", "2 threads ns/entry", "bitwise"],
                       [[k, v["ns_per_entry_1t"], v["ns_per_entry_2t"], v["bitwise"]]
                        for k, v in r.items() if isinstance(v, dict)]))
    if "threads" in args.case:
        r = results["threads"] = run_threads(args)
        print(f"\nbundle adjustment (n={r['n']}, numpy residuals), ours, torch threads "
              f"alternated, medians of {r['repeat']} rounds:")
        print(md_table(["threads", "wall s", "CPU s", "cost", "nfev"],
                       [[k, v["time_s"], v["cpu_s"], v["cost"], v["nfev"]]
                        for k, v in r.items() if isinstance(v, dict)]))
    if "groups" in args.case:
        r = results["groups"] = run_groups(args)
        print("\ncolumn grouping (median process CPU time):")
        print(md_table(["structure", "grouping", "groups", "CPU s", "CPU / scipy's"],
                       [[name, label, v["groups"], v["cpu_s"],
                         v["cpu_s"] / row["scipy"]["cpu_s"]]
                        for name, row in r.items() for label, v in row.items()
                        if isinstance(v, dict)]))
    path = write_json(args, "bench_sparse", results)
    print(f"wrote {path}")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
