"""Parallel functions: ``B`` problems with ``C`` weighted cost channels each.

``p (B, n)``, ``function(p, *args) -> (B, C, N)``, ``jac_function(p, *args) ->
(B, C, N, n)``, ``wvec (C,)``. Module names follow torchimize's.
"""

from .gda_fun_parallel import gradient_descent_parallel, gradient_descent_parallel_plain
from .gna_fun_parallel import lsq_gna_parallel, lsq_gna_parallel_plain
from .lma_fun_parallel import lsq_lma_parallel

__all__ = ["gradient_descent_parallel", "gradient_descent_parallel_plain", "lsq_gna_parallel",
           "lsq_gna_parallel_plain", "lsq_lma_parallel"]
