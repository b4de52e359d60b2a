"""Gradient descent for a batch of multi-channel problems."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._core import check_step, run_torchimize
from ._docs import fill_doc


@fill_doc
def gradient_descent_parallel(
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
    r"""Minimise each problem's weighted cost by gradient descent.

    Runs the engine's ``'gd'`` rule on every problem: steps :math:`p \leftarrow
    p - t\,g` along the negative gradient :math:`g = \sum_c w_c J_c^\top f_c`,
    every iteration first trying :math:`t = l` (the first trial is exactly
    :math:`p_0 - l\,g(p_0)`); a trial that does not decrease the cost enough
    (Armijo) is rejected and :math:`t` halved.
    Each problem stops on its own tests and is frozen afterwards.

    Parameters
    ----------
    {common}
    ftol : float, optional
        Stop a problem when its cost decreases by less than ``ftol * cost``.
    ptol : float, optional
        Stop when ``||step|| < ptol * (ptol + ||p||)``.
    gtol : float, optional
        Stop when ``max |g| < gtol``.
    l : float, optional
        Step size tried first in every iteration, > 0.
    max_iter : int, optional
        Maximum number of iterations (trial steps), i.e. of returned tensors.

    Returns
    -------
    list of Tensor
        The ``(B, n)`` iterates after each iteration (at least one); the last
        holds the results. The list's ``info`` attribute holds per-problem
        cost, status and counters.
    """
    return run_torchimize("gd", p, function, jac_function, args, parallel=True,
                          tolerances=(ftol, ptol, gtol), max_iter=max_iter,
                          rule_options=lambda: {"step_size": check_step(
                              l, "gradient-descent step size")},
                          wvec=wvec)


def gradient_descent_parallel_plain(
    p: torch.Tensor,
    function: Callable,
    jac_function: Callable,
    wvec: torch.Tensor,
    l: float = 1.0,
    max_iter: int = 100,
) -> torch.Tensor:
    """:func:`gradient_descent_parallel` without stop tests; returns the final ``(B, n)``.

    Runs exactly ``max_iter`` iterations (tolerances 0); ``jac_function`` may
    be None for autograd.
    """
    return run_torchimize("gd", p, function, jac_function, (), parallel=True,
                          tolerances=None, max_iter=max_iter,
                          rule_options=lambda: {"step_size": check_step(
                              l, "gradient-descent step size")},
                          wvec=wvec, plain=True)
