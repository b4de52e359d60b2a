"""torchimize's function API on torchimize_scipy's batched engine.

The names, arguments, defaults and return conventions of
``torchimize.functions`` (torchimize 0.0.16), implemented with the step rules
of :mod:`torchimize_scipy` (no separate algorithms):

=================================  ===============================================
``gradient_descent``               one problem, engine ``'gd'``
``lsq_gna``                        one problem, engine ``'gn'``
``lsq_lma``                        one problem, engine ``'lm'`` (MINPACK)
``gradient_descent_parallel``      B problems x C weighted channels, ``'gd'``
``lsq_gna_parallel``               B problems x C weighted channels, ``'gn'``
``lsq_lma_parallel``               B problems x C weighted channels, ``'lm'``
``*_parallel_plain``               the same without stop tests, final ``(B, n)``
``test_fun_dims_parallel``         shape checks, ``ValueError`` on mismatch
=================================  ===============================================

Every solver returns the list of iterates (``(n,)`` tensors starting with
``p`` for single problems, ``(B, n)`` tensors after each iteration for parallel
ones); the list's ``info`` attribute adds the engine's final cost, status and
counters. See ``docs/torchimize_migration.md`` for the differences from
torchimize.
"""

from .fun_dims import test_fun_dims_parallel
from .parallel import (
    gradient_descent_parallel,
    gradient_descent_parallel_plain,
    lsq_gna_parallel,
    lsq_gna_parallel_plain,
    lsq_lma_parallel,
)
from .single import gradient_descent, lsq_gna, lsq_lma

__all__ = [
    "gradient_descent", "lsq_gna", "lsq_lma", "gradient_descent_parallel",
    "gradient_descent_parallel_plain", "lsq_gna_parallel", "lsq_gna_parallel_plain",
    "lsq_lma_parallel", "test_fun_dims_parallel",
]
