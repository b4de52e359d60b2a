"""Compare scipy and torchimize_scipy ``least_squares`` on the NIST StRD datasets.

Runs every NIST StRD nonlinear regression dataset from both starting points
with the analytic Jacobian and ``ftol = xtol = gtol = 1e-15``,
``max_nfev = 10000`` (the configs of ``tests/test_nist_strd.py``), once with
``scipy.optimize.least_squares`` and once with
``torchimize_scipy.least_squares``, and prints a markdown table of the
parameter LRE (number of correct significant digits, LREb), evaluation counts,
statuses and wall times.

Usage::

    python benchmarks/nist_table.py [--methods trf lm] [--datasets Misra1a MGH09 ...]

The last column applies the rule of the tests (``tests/test_nist_strd.py``):
``ok`` when scipy did not solve the case (LREb < 4) or ours reaches
``min(scipy - 0.5, 6)`` parameter digits, ``LOW`` otherwise; ``-`` in the
summary also counts the rows within half a digit of scipy (past 6 digits
the last digits of a converged fit are decided by rounding).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import scipy.optimize

REPO = Path(__file__).resolve().parents[1]
SOLVED_LRE = 4.0
LRE_ALLOWANCE = 0.5
NOISE_FLOOR_LRE = 6.0


def _load_nist_module() -> ModuleType:
    """Import ``tests/nist_strd.py`` (``tests`` is not a package)."""
    spec = importlib.util.spec_from_file_location("nist_strd", REPO / "tests" / "nist_strd.py")
    if spec is None or spec.loader is None:
        raise ImportError("cannot load tests/nist_strd.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


nist = _load_nist_module()


@dataclass
class Run:
    """Outcome of one ``least_squares`` call."""

    lre: float
    nfev: int
    status: int
    seconds: float


def _solve(solver: Callable[..., Any], problem: Any, start: int, options: dict[str, Any]) -> Run:
    """Run ``solver`` on ``problem`` from ``start`` and measure the parameter LRE."""

    def fun(b: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):  # trial steps may overflow the models
            return problem.residual(b)

    def jac(b: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return problem.jac(b)

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = solver(fun, problem.start(start), jac=jac, **options)
    seconds = time.perf_counter() - t0
    x = np.asarray(res.x, dtype=np.float64)
    return Run(nist.lre(x, problem.certified_params), int(res.nfev), int(res.status), seconds)


def _import_ours() -> Callable[..., Any] | None:
    """Return ``torchimize_scipy.least_squares``, or None while it does not exist.

    Falls back to the checkout this script lives in when the package is not
    installed.
    """
    if importlib.util.find_spec("torchimize_scipy") is None:
        sys.path.insert(0, str(REPO))
    try:
        from torchimize_scipy import least_squares
    except ImportError as exc:
        print(f"> torchimize_scipy.least_squares unavailable ({exc}); 'ours' columns are empty.\n")
        return None
    return least_squares


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table; return the number of ``LOW`` rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(nist.SOLVER_CONFIGS))
    parser.add_argument("--datasets", nargs="+", default=list(nist.DATASET_NAMES))
    args = parser.parse_args(argv)

    ours_solver = _import_ours()
    header = (
        "| dataset | start | method | scipy LREb | ours LREb | scipy nfev | ours nfev "
        "| scipy status | ours status | scipy s | ours s | check |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))

    low = 0
    totals = {"scipy": 0.0, "ours": 0.0}
    solved = {"scipy": 0, "ours": 0}
    for name in args.datasets:
        problem = nist.load_problem(name)
        for start in (1, 2):
            for method in args.methods:
                options = nist.SOLVER_CONFIGS[method].options
                ref = _solve(scipy.optimize.least_squares, problem, start, options)
                totals["scipy"] += ref.seconds
                solved["scipy"] += ref.lre >= SOLVED_LRE
                if ours_solver is None:
                    cells = ["—"] * 4
                    check = "—"
                else:
                    try:
                        run = _solve(ours_solver, problem, start, options)
                    except Exception as exc:  # report and go on with the table
                        cells = [f"error: {type(exc).__name__}", "—", "—", "—"]
                        check = "ERROR"
                        low += 1
                    else:
                        totals["ours"] += run.seconds
                        solved["ours"] += run.lre >= SOLVED_LRE
                        cells = [f"{run.lre:.1f}", str(run.nfev), str(run.status),
                                 f"{run.seconds:.3f}"]  # fmt: skip
                        ok = ref.lre < SOLVED_LRE or run.lre >= min(ref.lre - LRE_ALLOWANCE,
                                                                     NOISE_FLOOR_LRE)
                        check = "ok" if ok else "LOW"
                        low += not ok
                print(
                    f"| {name} | {start} | {method} | {ref.lre:.1f} | {cells[0]} "
                    f"| {ref.nfev} | {cells[1]} | {ref.status} | {cells[2]} "
                    f"| {ref.seconds:.3f} | {cells[3]} | {check} |"
                )

    n_cases = 2 * len(args.datasets) * len(args.methods)
    print()
    print(
        f"solved (LREb >= {SOLVED_LRE:g}): scipy {solved['scipy']}/{n_cases}, "
        f"ours {solved['ours'] if ours_solver else '—'}/{n_cases}; "
        f"time scipy {totals['scipy']:.2f} s, ours {totals['ours']:.2f} s; "
        f"LOW/ERROR rows: {low}"
    )
    return low


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
