"""torchimize_scipy: scipy.optimize.least_squares and curve_fit, batched on PyTorch.

Public functions
----------------
least_squares
    Drop-in replacement for :func:`scipy.optimize.least_squares`.
batch_least_squares
    Thousands to millions of independent problems in one call.
"""

from ._batch import BatchOptimizeResult, batch_least_squares
from ._least_squares import least_squares

__all__ = ["least_squares", "batch_least_squares", "BatchOptimizeResult"]
__version__ = "0.1.0"
