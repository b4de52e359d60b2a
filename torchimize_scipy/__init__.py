"""torchimize_scipy: scipy.optimize.least_squares and curve_fit, batched on PyTorch.

Public functions
----------------
least_squares
    Drop-in replacement for :func:`scipy.optimize.least_squares`.
batch_least_squares
    Thousands to millions of independent problems in one call.
curve_fit
    Drop-in replacement for :func:`scipy.optimize.curve_fit`.
batch_curve_fit
    One model fitted to many datasets at once, with a covariance for each.
"""

from ._batch import BatchOptimizeResult, batch_least_squares
from ._curve_fit import batch_curve_fit, curve_fit
from ._least_squares import least_squares

__all__ = ["least_squares", "batch_least_squares", "BatchOptimizeResult", "curve_fit",
           "batch_curve_fit"]
__version__ = "0.1.0"
