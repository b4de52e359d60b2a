"""A batch with a tail of slow problems: four overlapping Gaussian peaks per dataset.

Each dataset is a sum of K = 4 Gaussian peaks on m = 100 points (n = 12
parameters), starting 5 % off the truth; the peaks overlap, so some fits are
ill-conditioned and wander for hundreds of iterations, and a few (about 0.2 %)
run to ``max_nfev`` (scipy's default, 100 n = 1,200 for 'trf'). Such a tail
sets the wall time of a batch: every iteration has a fixed cost however few
problems are left. ``batch_least_squares`` streams problems through its
``chunk_size`` rows (the next ones join when half are done), so the slow
problems of one block run beside the next block.

The batch call (numpy model, analytic Jacobian) is timed once on all
datasets and a scipy loop on the first ``--scipy-subset``, extrapolated.

With ``--before REV`` the package at commit ``REV`` (imported under another
name, as ``ab_small.py`` does) and the working tree are timed alternately on
the same datasets, ``--repeat`` times each, in wall and process-CPU time
(the scipy loop is then skipped): an A/B of the engine that a drifting load
affects alike.

Usage::

    python benchmarks/bench_tail.py [--B 20000] [--scipy-subset 1000] [--quick]
    PYTHONPATH=$PWD python benchmarks/bench_tail.py --before REV [--B 5000] [--repeat 3]
        [--methods trf lm]

In the A/B the order of the two versions turns every round (before/now, then
now/before), so an even ``--repeat`` gives each version each position.

With ``--slowest K [K ...]`` (and ``--before``) the A/B runs instead on the
``K`` slowest problems alone, for each ``K``: the working tree solves the whole
batch once to rank the problems by ``nfev`` (largest first, ties by index),
then each version solves those ``K`` as a batch of their own. This is the
last slow fits of a batch running without the others: the figures are the
wall time per iteration of the slowest (``ms / it``), the fixed cost of a
round plus the per-row work of ``K`` ill-conditioned rows::

    PYTHONPATH=$PWD python benchmarks/bench_tail.py --before 13bfbc6 --slowest 1 5 20 53
"""

from __future__ import annotations

import time
import warnings

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import scipy.optimize
from _common import base_parser, environment, md_table, setup, write_json

from torchimize_scipy import batch_least_squares

K = 4
M = 100
T = np.linspace(0.0, 10.0, M)


def peaks(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Residuals ``(b, M)`` of ``b`` datasets for parameters ``p (b, 3K)``."""
    out = -y
    for k in range(K):
        a, mu, s = p[:, 3 * k:3 * k + 1], p[:, 3 * k + 1:3 * k + 2], p[:, 3 * k + 2:3 * k + 3]
        z = (T - mu) / s
        out = out + a * np.exp(-0.5 * z * z)
    return out


def peaks_jac(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Jacobians ``(b, M, 3K)``, column by column."""
    J = np.empty((p.shape[0], M, 3 * K))
    for k in range(K):
        a, mu, s = p[:, 3 * k:3 * k + 1], p[:, 3 * k + 1:3 * k + 2], p[:, 3 * k + 2:3 * k + 3]
        z = (T - mu) / s
        e = np.exp(-0.5 * z * z)
        J[:, :, 3 * k] = e
        J[:, :, 3 * k + 1] = a * e * z / s
        J[:, :, 3 * k + 2] = a * e * z * z / s
    return J


def data(B: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = np.concatenate([np.stack([1 + rng.random(B),
                                     1 + 8 * (k + 0.5 * rng.random(B)) / K,
                                     0.5 + 0.3 * rng.random(B)], 1) for k in range(K)], 1)
    y = peaks(true, np.zeros((B, M))) + 0.02 * rng.normal(size=(B, M))
    p0 = true * (1 + 0.05 * rng.normal(size=true.shape))
    return y, p0


def _alternate(args, libs: dict, y: np.ndarray, p0: np.ndarray, method: str) -> dict:
    """Each fit of ``libs`` on ``(y, p0)``, ``args.repeat`` times, the order turning every
    round; wall and process-CPU times, the last costs and nfev of each."""
    wall: dict[str, list[float]] = {k: [] for k in libs}
    cpu: dict[str, list[float]] = {k: [] for k in libs}
    costs, nfev = {}, {}
    for r in range(args.repeat):
        # (the order turns every round: a fixed one biases a drifting load)
        for name in (list(libs) if r % 2 == 0 else list(reversed(libs))):
            fit = libs[name]
            w0, c0 = time.perf_counter(), time.process_time()
            res = fit(peaks, p0, jac=peaks_jac, args=(y,), method=method, return_jac=False)
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
            costs[name], nfev[name] = np.asarray(res.cost), np.asarray(res.nfev)
    return {"wall": wall, "cpu": cpu, "costs": costs, "nfev": nfev}


def ab_slowest(args, libs: dict, y: np.ndarray, p0: np.ndarray) -> None:
    """The A/B on the ``args.slowest`` slowest problems alone (see the module docstring)."""
    import statistics

    rows, figures = [], []
    for method in args.methods:
        ranked = batch_least_squares(peaks, p0, jac=peaks_jac, args=(y,), method=method,
                                     return_jac=False)
        order = np.argsort(-np.asarray(ranked.nfev), kind="stable")
        for k in args.slowest:
            idx = np.sort(order[:k])
            runs = _alternate(args, libs, y[idx], p0[idx], method)
            wall = {n: statistics.median(runs["wall"][n]) for n in libs}
            its = int(runs["nfev"]["now"].max())
            same = bool(np.array_equal(runs["costs"]["before"], runs["costs"]["now"]))
            same_nfev = bool(np.array_equal(runs["nfev"]["before"], runs["nfev"]["now"]))
            rows.append([method, f"{k:,}", f"{its}", f"{wall['before']:.3f}",
                         f"{wall['now']:.3f}", f"{1e3 * wall['before'] / its:.2f}",
                         f"{1e3 * wall['now'] / its:.2f}",
                         f"{wall['before'] / wall['now']:.2f}x", "yes" if same else "NO",
                         "yes" if same_nfev else "NO"])
            figures.append({"method": method, "slowest": k, "nfev_max": its,
                            "wall": runs["wall"], "cpu": runs["cpu"], "cost_identical": same,
                            "nfev_identical": same_nfev})
            print(" | ".join(rows[-1]), flush=True)
    print(f"A/B on the slowest problems of {len(y):,} alone: {args.before} (before) against the "
          f"working tree (now), alternated, median of {args.repeat}\n")
    print(md_table(["method", "slowest", "nfev max", "before wall (s)", "now wall (s)",
                    "before ms / it", "now ms / it", "speed-up", "costs identical",
                    "nfev identical"], rows))
    write_json(args, f"bench_tail_slowest_{args.before}", {"env": environment(args),
                                                           "results": figures})


def ab_before(args, B: int, y: np.ndarray, p0: np.ndarray) -> None:
    """Alternate the package at ``args.before`` and the working tree on the same batch."""
    import statistics
    import tempfile

    from ab_small import import_commit

    old = import_commit(args.before, tempfile.mkdtemp())
    libs = {"before": old.batch_least_squares, "now": batch_least_squares}
    if args.slowest:
        ab_slowest(args, libs, y, p0)
        return
    rows, figures = [], []
    for method in args.methods:
        runs = _alternate(args, libs, y, p0, method)
        wall, cpu, costs = runs["wall"], runs["cpu"], runs["costs"]
        med = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in libs}
        same = bool(np.array_equal(costs["before"], costs["now"]))
        rows.append([method, f"{B:,}", f"{med['before'][0]:.2f}", f"{med['now'][0]:.2f}",
                     f"{med['before'][0] / med['now'][0]:.2f}x", f"{med['before'][1]:.2f}",
                     f"{med['now'][1]:.2f}", f"{med['before'][1] / med['now'][1]:.2f}x",
                     "yes" if same else "NO"])
        figures.append({"method": method, "B": B, "wall": wall, "cpu": cpu,
                        "cost_identical": same})
        print(" | ".join(rows[-1]), flush=True)
    print(f"A/B: {args.before} (before) against the working tree (now), alternated (the "
          f"order turning each round), median of {args.repeat}\n")
    print(md_table(["method", "datasets", "before wall (s)", "now wall (s)", "speed-up",
                    "before CPU (s)", "now CPU (s)", "CPU speed-up", "costs identical"],
                   rows))
    write_json(args, f"bench_tail_ab_{args.before}", {"env": environment(args),
                                                      "results": figures})


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--B", type=int, default=20_000)
    p.add_argument("--scipy-subset", type=int, default=1_000)
    p.add_argument("--before", default=None, help="commit to alternate with (A/B)")
    p.add_argument("--repeat", type=int, default=3, help="A/B: calls of each version")
    p.add_argument("--methods", nargs="+", default=["trf", "lm"], choices=("trf", "lm"),
                   help="methods to run (default both)")
    p.add_argument("--slowest", type=int, nargs="+", default=None,
                   help="A/B: the K slowest problems alone, for each K (with --before)")
    args = p.parse_args()
    if args.slowest and not args.before:
        p.error("--slowest needs --before")
    setup(args)
    B = 2_000 if args.quick else args.B
    sub = min(B, 50 if args.quick else args.scipy_subset)
    y, p0 = data(B, args.seed)
    if args.before:
        ab_before(args, B, y, p0)
        return
    rows, figures = [], []
    for method in args.methods:
        t0 = time.perf_counter()
        res = batch_least_squares(peaks, p0, jac=peaks_jac, args=(y,), method=method,
                                  return_jac=False)
        t_batch = time.perf_counter() - t0
        cost = np.empty(sub)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(sub):
                cost[i] = scipy.optimize.least_squares(
                    lambda q, yy: peaks(q[None], yy[None])[0], p0[i],
                    jac=lambda q, yy: peaks_jac(q[None], yy[None])[0], args=(y[i],),
                    method=method).cost
        t_scipy = (time.perf_counter() - t0) * B / sub
        ours = np.asarray(res.cost[:sub])
        rel = np.abs(ours - cost) / np.maximum(cost, 1e-300)
        equal = float(np.mean(rel <= 1e-6))
        lower = float(np.mean((rel > 1e-6) & (ours < cost)))
        nfev = np.asarray(res.nfev)
        rows.append([method, f"{B:,}", f"{t_batch:.1f}", f"{B / t_batch:,.0f}",
                     f"{B / t_scipy:,.0f}", f"{t_scipy / t_batch:.1f}x",
                     f"{np.mean(nfev):.1f} / {nfev.max()}", f"{int(np.sum(res.status == 0))}",
                     f"{100 * equal:.1f}% / {100 * lower:.1f}%"])
        figures.append({"method": method, "B": B, "batch_s": t_batch,
                        "scipy_s_extrapolated": t_scipy, "scipy_subset": sub,
                        "speedup": t_scipy / t_batch, "nfev_mean": float(nfev.mean()),
                        "nfev_max": int(nfev.max()), "max_nfev_hit": int(np.sum(res.status == 0)),
                        "cost_equal_share": equal, "cost_lower_share": lower})
    print(f"{B:,} datasets of {K} overlapping Gaussian peaks (n = {3 * K}, m = {M}); scipy loop "
          f"timed on {sub} and extrapolated\n")
    print(md_table(["method", "datasets", "ours (s)", "ours fits/s", "scipy fits/s", "speed-up",
                    "nfev mean / max", "at max_nfev", "cost = / < scipy"], rows))
    write_json(args, "bench_tail", {"env": environment(args), "results": figures})


if __name__ == "__main__":
    main()
