"""Check that a batch cut into other chunks gives every problem the same bits.

``docs/parity.md`` promises that ``batch_least_squares`` gives each problem the
same results, bit for bit, whatever its ``chunk_size`` (blocks of one problem,
streamed blocks, the whole batch at once). This script solves batches several
ways and counts the runs in which any field of any problem (``x``, ``cost``,
``nfev``, ``njev``, ``status``, ``optimality``, ``grad``) differs from the
whole batch's:

* ``grid``: the test suite's noisy exponential decays with outliers (n = 2,
  m = 15, 9 problems) for every method, loss ('linear', 'soft_l1',
  'cauchy'), '2-point' and '3-point', with and without bounds and
  ``x_scale='jac'``, three seeds, ``chunk_size`` 1, 2 and 4;
* ``broyden``: the Broyden tridiagonal problem with n = m = ``--n`` (default
  9) from six perturbed starts, 'trf' and 'dogbox', four robust losses,
  ``chunk_size`` 1 and 2. Its 9 x 9 matrices have an odd number of entries:
  MKL rounds a matrix that does not start on a 16-byte boundary differently
  (``docs/parity.md``), so expect differences here unless the environment
  sets ``MKL_CBWR=AUTO,STRICT`` before Python starts, or ``--n`` is even.

``--device-path`` runs the code a GPU runs, on the CPU (per-problem scalars as
tensors: ``host_scalars.HOST = False``). RESULTS §37 has the figures.

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/chunk_invariance.py
    MKL_CBWR=AUTO,STRICT PYTHONPATH=$PWD python benchmarks/chunk_invariance.py --only broyden
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
from _common import base_parser, setup

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_batch import fun_v, make_data  # noqa: E402  (the suite's problem)

from torchimize_scipy import batch_least_squares  # noqa: E402

FIELDS = ("x", "cost", "nfev", "njev", "status", "optimality", "grad")


def _same(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in FIELDS)


def grid() -> tuple[int, list]:
    """The exponential decays: (runs, the settings of the runs that differ)."""
    runs, differ = 0, []
    for method, loss, jac, bounded, x_scale in itertools.product(
            ("trf", "dogbox", "lm"), ("linear", "soft_l1", "cauchy"), ("2-point", "3-point"),
            (False, True), ("jac", None)):
        if method == "lm" and (loss != "linear" or bounded):
            continue  # (scipy's 'lm' takes neither)
        for seed in range(3):
            x0, y = make_data(9, seed=seed + 10, outliers=True)
            kw = dict(method=method, loss=loss, jac=jac, args=(y,), f_scale=0.1)
            if bounded:
                kw["bounds"] = (0.2, 1.6)
            if x_scale:
                kw["x_scale"] = x_scale
            whole = batch_least_squares(fun_v, x0, **kw)
            for chunk in (1, 2, 4):
                runs += 1
                if not _same(batch_least_squares(fun_v, x0, chunk_size=chunk, **kw), whole):
                    differ.append((method, loss, jac, bounded, x_scale, seed, chunk))
    return runs, differ


def _broyden(x: np.ndarray) -> np.ndarray:
    f = (3 - 2 * x) * x
    f[:, 1:] -= x[:, :-1]
    f[:, :-1] -= 2 * x[:, 1:]
    return f + 1


def broyden(n: int) -> tuple[int, list]:
    """The Broyden tridiagonal batches: (runs, the settings of the runs that differ)."""
    runs, differ = 0, []
    for method, loss in itertools.product(("trf", "dogbox"),
                                          ("soft_l1", "huber", "cauchy", "arctan")):
        for seed in range(4):
            x0 = -1 + 0.3 * np.random.default_rng(seed).standard_normal((6, n))
            kw = dict(method=method, loss=loss, f_scale=0.5)
            whole = batch_least_squares(_broyden, x0, **kw)
            for chunk in (1, 2):
                runs += 1
                if not _same(batch_least_squares(_broyden, x0, chunk_size=chunk, **kw), whole):
                    differ.append((method, loss, seed, chunk))
    return runs, differ


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--only", choices=("grid", "broyden"), default=None)
    p.add_argument("--n", type=int, default=9, help="Broyden's size (default 9)")
    p.add_argument("--device-path", action="store_true",
                   help="the code a GPU runs, on the CPU (host_scalars.HOST = False)")
    args = p.parse_args()
    setup(args)
    if args.device_path:
        from torchimize_scipy._engine import host_scalars

        host_scalars.HOST = False
    checks = {"grid": grid, "broyden": lambda: broyden(args.n)}
    for name, check in checks.items():
        if args.only not in (None, name):
            continue
        runs, differ = check()
        print(f"{name}: {len(differ)} of {runs} runs differ from the whole batch")
        for settings in differ[:20]:
            print("  ", settings)


if __name__ == "__main__":
    main()
