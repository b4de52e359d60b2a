"""Shape checks for the parallel functions (torchimize's ``test_fun_dims_parallel``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._jacobian import autograd_jacobian
from ._core import ParallelModel, start_point


def test_fun_dims_parallel(
    p: torch.Tensor,
    function: Callable,
    jac_function: Callable | None = None,
    args: Sequence = (),
    wvec: torch.Tensor | None = None,
) -> bool:
    """Check that ``function``, ``jac_function`` and ``wvec`` fit the parallel functions.

    Evaluates ``function(p, *args)`` and the Jacobian (``jac_function(p, *args)``,
    or autograd when it is None) once at ``p`` and checks: ``p`` is a floating
    tensor of shape ``(B, n)``; the residuals have shape ``(B, C, N)``; the
    Jacobian has shape ``(B, C, N, n)``; ``wvec`` (if given) has shape ``(C,)``
    (or ``(1,)``, one weight for all channels)
    and is finite and non-negative.

    Returns
    -------
    bool
        True when every check passes.

    Raises
    ------
    ValueError
        Naming the first check that fails, with the expected and actual shapes.
    """
    x0 = start_point(p, 2)
    model = ParallelModel(function, jac_function, args, x0, wvec)
    if jac_function is not None:
        model.raw_jacobian(x0)
    else:
        autograd_jacobian(model.residuals, x0, model.m)
    return True


test_fun_dims_parallel.__test__ = False  # a library function, not a pytest test
