"""Single problems: scipy ``least_squares`` vs ``torchimize_scipy.least_squares``.

Part 1 -- small problems with numpy functions (the per-call overhead regime):

* Rosenbrock (n=2, m=2) from x0 = [2, 2];
* Broyden tridiagonal (n=m=9) from x0 = -1;
* exponential fit ``a + b exp(c t)`` to 15 points with 3 outliers,
  ``loss='soft_l1'``, ``f_scale=0.1`` (scipy's documentation example);
* Rosenbrock with bounds ``x1 >= 1.5`` from x0 = [2, 2].

Each with 'trf', 'dogbox' and 'lm' (where scipy allows it: no bounds, linear
loss) and with ``jac='2-point'`` and the analytic Jacobian: median wall time
of a call for scipy and for ours, timed in ``--rounds`` alternating blocks (the
machine's load drifts between blocks; each round's ratio comes from two blocks
measured moments apart, and the ratio reported is their median), evaluation
counts and the relative difference of the final costs. The median CPU time of the
process (all its threads) is recorded too, with its ratio: on a shared,
loaded machine it does not count the time the process waits to be scheduled,
so its ratio is the steadier one there (threads spinning or working count).

Part 2 -- one dense problem: m = 200,000 residuals, n = 20 parameters (a sum
of 10 Gaussian peaks of fixed width with free amplitudes and centres;
``--dense-model exp`` uses a sum of 10 exponentials ``a_k exp(-b_k t)``
instead, which is ill-conditioned and needs hundreds of evaluations),
``method='trf'``, analytic Jacobian and '2-point': median time, ratio and the
final costs.

Usage::

    python benchmarks/bench_single.py [--quick] [--device cpu] [--dtype float64]
           [--threads 2] [--repeat 7] [--rounds 5] [--dense-m 200000]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import scipy.optimize
from _common import (
    base_parser,
    cuda_requested_but_missing,
    md_table,
    setup,
    sync,
    write_json,
)

from torchimize_scipy import least_squares


@dataclass
class Problem:
    name: str
    fun: Callable
    jac: Callable
    x0: np.ndarray
    options: dict[str, Any] = field(default_factory=dict)
    methods: tuple[str, ...] = ("trf", "dogbox", "lm")


# --------------------------------------------------------------------------- small problems
def rosenbrock(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def rosenbrock_jac(x):
    return np.array([[-20 * x[0], 10], [-1, 0]], dtype=float)


def broyden(x):
    f = (3 - x) * x + 1
    f[1:] -= x[:-1]
    f[:-1] -= 2 * x[1:]
    return f


def broyden_jac(x):
    n = x.size
    J = np.diag(3 - 2 * x)
    J[np.arange(1, n), np.arange(n - 1)] = -1
    J[np.arange(n - 1), np.arange(1, n)] = -2
    return J


def exp_fit_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scipy's robust-fit example: 15 points of 0.5 + 2 exp(-t), noise 0.1, 3 outliers."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 10, 15)
    y = 0.5 + 2.0 * np.exp(-1.0 * t)
    error = 0.1 * rng.standard_normal(t.size)
    outliers = rng.integers(0, t.size, 3)
    error[outliers] *= 10
    return t, y + error


def exp_fit(x, t, y):
    return x[0] + x[1] * np.exp(x[2] * t) - y


def exp_fit_jac(x, t, y):
    e = np.exp(x[2] * t)
    return np.column_stack([np.ones_like(t), e, x[1] * t * e])


def small_problems(seed: int) -> list[Problem]:
    t, y = exp_fit_data(seed)
    return [
        Problem("Rosenbrock (n=2)", rosenbrock, rosenbrock_jac, np.array([2.0, 2.0])),
        Problem("Broyden tridiagonal (n=9)", broyden, broyden_jac, -np.ones(9)),
        Problem("exp fit + outliers, soft_l1 (n=3, m=15)", exp_fit, exp_fit_jac, np.ones(3),
                {"loss": "soft_l1", "f_scale": 0.1, "args": (t, y)}, ("trf", "dogbox")),
        Problem("bounded Rosenbrock (x1 >= 1.5)", rosenbrock, rosenbrock_jac,
                np.array([2.0, 2.0]), {"bounds": ([-np.inf, 1.5], np.inf)}, ("trf", "dogbox")),
    ]


# --------------------------------------------------------------------------- dense problem
def dense_problem(m: int, model: str, seed: int) -> Problem:
    """m residuals, 20 parameters: 10 Gaussian peaks (amplitude, centre) or 10 exponentials."""
    K = 10
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 10.0, m)
    if model == "gauss":
        width = 0.4
        amp = 1 + rng.random(K)
        centre = np.linspace(0.5, 9.5, K)
        truth = np.concatenate([amp, centre])
        x0 = np.concatenate([amp * (1 + 0.2 * rng.uniform(-1, 1, K)),
                             centre + 0.15 * rng.uniform(-1, 1, K)])

        def values(p):
            z = (t[:, None] - p[K:]) / width
            E = np.exp(-0.5 * z * z)
            return E, z

        def fun(p, y):
            E, _ = values(p)
            return E @ p[:K] - y

        def jac(p, y):
            E, z = values(p)
            return np.hstack([E, E * (z / width) * p[:K]])

        name = f"10 Gaussian peaks (n=20, m={m:,})"
    else:
        amp = np.linspace(1.0, 2.0, K)
        rate = np.geomspace(0.1, 5.0, K)
        truth = np.concatenate([amp, rate])
        x0 = truth * (1 + 0.1 * rng.uniform(-1, 1, 2 * K))

        def fun(p, y):
            return np.exp(-np.outer(t, p[K:])) @ p[:K] - y

        def jac(p, y):
            E = np.exp(-np.outer(t, p[K:]))
            return np.hstack([E, -t[:, None] * E * p[:K]])

        name = f"10 exponentials (n=20, m={m:,})"
    y = fun(truth, np.zeros(m)) + 0.05 * rng.standard_normal(m)
    return Problem(name, fun, jac, x0, {"args": (y,)}, ("trf",))


# --------------------------------------------------------------------------- running
def median_times(fn: Callable[[], Any], repeat: int, min_time: float,
                 dev=None) -> tuple[float, float, Any]:
    """Median wall and process-CPU seconds of ``fn`` (one warm-up call first).

    At least ``repeat`` calls, and more until ``min_time`` seconds have passed
    (at most 1000). Returns (wall, cpu, last result).
    """
    out = fn()
    wall: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    while len(wall) < repeat or (time.perf_counter() - start < min_time and len(wall) < 1000):
        sync(dev)
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        sync(dev)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), out


def compare(problem: Problem, method: str, jac_kind: str, args, dev, dt, repeat: int,
            min_time: float, rounds: int = 1) -> dict[str, Any]:
    """One case: scipy's and our median time per call, and their ratio.

    With ``rounds > 1`` the two are timed in alternating blocks (scipy then ours,
    then ours then scipy, ...), each block a :func:`median_times` of its own
    (consecutive calls of one implementation, warm as in a loop of fits); the
    ratio is the median of the rounds' ratios, each from two blocks measured
    moments apart, so that a change of the machine's load between blocks moves
    one round, not the result. The times reported are the medians over the
    rounds.
    """
    jac = problem.jac if jac_kind == "analytic" else jac_kind

    def run_scipy():
        return scipy.optimize.least_squares(problem.fun, problem.x0, jac=jac, method=method,
                                            **problem.options)

    def run_ours():
        return least_squares(problem.fun, problem.x0, jac=jac, method=method, device=dev,
                             dtype=dt, **problem.options)

    per_round = []
    for r in range(max(1, rounds)):
        if r % 2 == 0:
            t_s, c_s, rs = median_times(run_scipy, repeat, min_time)
            t_o, c_o, ro = median_times(run_ours, repeat, min_time, dev)
        else:
            t_o, c_o, ro = median_times(run_ours, repeat, min_time, dev)
            t_s, c_s, rs = median_times(run_scipy, repeat, min_time)
        per_round.append((t_s, t_o, c_s, c_o))
    t_s, t_o, c_s, c_o = (statistics.median(v) for v in zip(*per_round, strict=True))
    ratio = statistics.median(o / s for s, o, _, _ in per_round)
    cpu_ratio = statistics.median(o / max(s, 1e-9) for _, _, s, o in per_round)
    # costs below 1e-20 (zero-residual problems) are compared absolutely
    rel = abs(float(ro.cost) - rs.cost) / max(abs(rs.cost), 1e-20)
    return {"problem": problem.name, "method": method, "jac": jac_kind,
            "seconds_scipy": t_s, "seconds_ours": t_o, "ratio": ratio,
            "round_ratios": [o / s for s, o, _, _ in per_round],
            "cpu_seconds_scipy": c_s, "cpu_seconds_ours": c_o,
            "cpu_ratio": cpu_ratio,
            "nfev_scipy": int(rs.nfev), "nfev_ours": int(ro.nfev),
            "cost_scipy": float(rs.cost), "cost_ours": float(ro.cost), "cost_rel_diff": rel,
            "status_scipy": int(rs.status), "status_ours": int(ro.status)}


def print_rows(rows: list[dict[str, Any]], unit: str) -> None:
    scale = 1e3 if unit == "ms" else 1.0
    headers = ["problem", "method", "jac", f"scipy ({unit})", f"ours ({unit})", "ours/scipy",
               "CPU ours/scipy", "nfev scipy/ours", "cost scipy", "cost rel. diff",
               "status scipy/ours"]
    table = [[r["problem"], r["method"], r["jac"], r["seconds_scipy"] * scale,
              r["seconds_ours"] * scale, f"{r['ratio']:.2f}", f"{r['cpu_ratio']:.2f}",
              f"{r['nfev_scipy']}/{r['nfev_ours']}", f"{r['cost_scipy']:.6g}",
              f"{r['cost_rel_diff']:.1e}", f"{r['status_scipy']}/{r['status_ours']}"]
             for r in rows]
    print(md_table(headers, table))


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--repeat", type=int, default=None,
                   help="timed calls per case (default 7 small / 3 dense; quick 3 / 1)")
    p.add_argument("--min-time", type=float, default=None,
                   help="keep repeating small cases until this many seconds (default 0.5)")
    p.add_argument("--rounds", type=int, default=None,
                   help="alternating scipy/ours blocks per small case; the ratio is the "
                        "median of the rounds' ratios (default 5; quick 1)")
    p.add_argument("--dense-m", type=int, default=None,
                   help="residuals of the dense problem (default 200000; quick 20000)")
    p.add_argument("--dense-model", choices=("gauss", "exp"), default="gauss")
    p.add_argument("--no-dense", action="store_true", help="skip part 2")
    args = p.parse_args()
    dev, dt = setup(args)
    if cuda_requested_but_missing(dev):
        print("CUDA is not available on this machine: nothing to run with --device cuda.")
        return
    repeat = args.repeat or (3 if args.quick else 7)
    min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.5)
    rounds = args.rounds or (1 if args.quick else 5)

    print(f"part 1: small problems ({args.device}, {args.dtype}, {args.threads} threads)",
          flush=True)
    small: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for prob in small_problems(args.seed):
        for method in prob.methods:
            for jac_kind in ("2-point", "analytic"):
                small.append(compare(prob, method, jac_kind, args, dev, dt, repeat, min_time,
                                     rounds))
    print(f"({time.perf_counter() - t0:.1f} s)\n")
    print("### Small problems: median time of one call\n")
    print_rows(small, "ms")
    ratios = np.array([r["ratio"] for r in small])
    cpu_ratios = np.array([r["cpu_ratio"] for r in small])
    print(f"\nours/scipy time ratio: median {np.median(ratios):.1f}, "
          f"range {ratios.min():.1f}-{ratios.max():.1f}; CPU time ratio: median "
          f"{np.median(cpu_ratios):.1f}, range {cpu_ratios.min():.1f}-{cpu_ratios.max():.1f} "
          f"(numpy functions; ours runs the torch "
          f"engine on {args.device} in {args.dtype}; scipy in float64). Cost rel. diff = "
          f"|cost_ours - cost_scipy| / max(cost_scipy, 1e-20).")

    dense: list[dict[str, Any]] = []
    if not args.no_dense:
        m = args.dense_m or (20_000 if args.quick else 200_000)
        prob = dense_problem(m, args.dense_model, args.seed)
        print(f"\npart 2: {prob.name}", flush=True)
        drepeat = args.repeat or (1 if args.quick else 3)
        for jac_kind in ("analytic", "2-point"):
            dense.append(compare(prob, "trf", jac_kind, args, dev, dt, drepeat, 0.0))
        print("\n### Dense problem, method='trf': median time of one call\n")
        print_rows(dense, "s")

    path = write_json(args, "bench_single", {
        "note": ("median wall time per call after one warm-up call; numpy functions; small "
                 "cases in alternating scipy/ours blocks, the ratio the median of the "
                 "rounds' ratios"),
        "repeat": repeat, "min_time": min_time, "rounds": rounds, "small": small,
        "dense": dense, "dense_model": args.dense_model})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
