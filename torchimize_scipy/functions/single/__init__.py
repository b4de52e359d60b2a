"""Single-problem functions: ``p (n,)``, ``function(p, *args) -> (m,)``.

Module names follow torchimize's (``single.gda_fun_single`` etc.) so that
imports port by renaming the package.
"""

from .gda_fun_single import gradient_descent
from .gna_fun_single import lsq_gna
from .lma_fun_single import lsq_lma

__all__ = ["gradient_descent", "lsq_gna", "lsq_lma"]
