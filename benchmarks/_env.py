"""Set the thread-count environment before numpy, scipy or torch are imported.

Every benchmark script imports this module first: it reads ``--threads N``
(default 2) from the command line and exports it as ``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and friends, so that numpy's and
scipy's BLAS/LAPACK use the same number of threads as torch (which the scripts
set with :func:`torch.set_num_threads`). It imports only the standard library.
"""

from __future__ import annotations

import os
import sys

DEFAULT_THREADS = 2
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def threads_from_argv(argv: list[str]) -> int:
    """The value of ``--threads`` in ``argv`` (``--threads N`` or ``--threads=N``)."""
    for i, arg in enumerate(argv):
        value = None
        if arg == "--threads" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--threads="):
            value = arg.split("=", 1)[1]
        if value is not None:
            try:
                return max(1, int(value))
            except ValueError:
                return DEFAULT_THREADS
    return DEFAULT_THREADS


THREADS = threads_from_argv(sys.argv[1:])
if "numpy" in sys.modules:  # pragma: no cover - only when imported too late
    print("warning: numpy was imported before benchmarks/_env.py; BLAS thread count "
          "may not follow --threads", file=sys.stderr)
for _var in THREAD_VARS:
    os.environ[_var] = str(THREADS)
