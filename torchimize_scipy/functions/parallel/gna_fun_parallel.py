"""Gauss-Newton for a batch of multi-channel problems."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._core import check_step, run_torchimize
from ._docs import fill_doc


@fill_doc
def lsq_gna_parallel(
    p: torch.Tensor,
    function: Callable,
    jac_function: Callable | None = None,
    args: Sequence = (),
    wvec: torch.Tensor | None = None,
    ftol: float = 1e-8,
    ptol: float = 1e-8,
    gtol: float = 1e-8,
    l: float = 1.0,
    max_iter: int = 100,
) -> list[torch.Tensor]:
    r"""Minimise each problem's weighted cost by Gauss-Newton with a line search.

    Runs the engine's ``'gn'`` rule on every problem: the Gauss-Newton step
    (minimum-norm solution of :math:`\min\lVert J h + f\rVert` for the stacked
    weighted residuals) is tried in full and halved until the cost decreases
    sufficiently (Armijo). Each problem stops on its own tests and is frozen
    afterwards.

    Parameters
    ----------
    {common}
    ftol, ptol, gtol : float, optional
        scipy's ``ftol`` (relative cost decrease), ``xtol`` (``||step|| <
        ptol * (ptol + ||p||)``) and ``max |g| < gtol`` tests, per problem.
    l : float, optional
        Fraction of the Gauss-Newton step tried first in every iteration, > 0
        (then halved while the cost does not decrease enough).
    max_iter : int, optional
        Maximum number of iterations (trial steps), i.e. of returned tensors.

    Returns
    -------
    list of Tensor
        The ``(B, n)`` iterates after each iteration (at least one); the last
        holds the results.
    """
    return run_torchimize("gn", p, function, jac_function, args, parallel=True,
                          tolerances=(ftol, ptol, gtol), max_iter=max_iter,
                          rule_options=lambda: {"step_size": check_step(
                              l, "Gauss-Newton step fraction")},
                          wvec=wvec)


def lsq_gna_parallel_plain(
    p: torch.Tensor,
    function: Callable,
    jac_function: Callable,
    wvec: torch.Tensor,
    l: float = 1.0,
    max_iter: int = 100,
) -> torch.Tensor:
    """:func:`lsq_gna_parallel` without stop tests; returns the final ``(B, n)``.

    Runs exactly ``max_iter`` iterations (tolerances 0); ``jac_function`` may
    be None for autograd.
    """
    return run_torchimize("gn", p, function, jac_function, (), parallel=True,
                          tolerances=None, max_iter=max_iter,
                          rule_options=lambda: {"step_size": check_step(
                              l, "Gauss-Newton step fraction")},
                          wvec=wvec, plain=True)
