"""Gradient descent for one least-squares problem (torchimize's ``gradient_descent``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._core import check_step, run_torchimize


def gradient_descent(
    p: torch.Tensor,
    function: Callable,
    jac_function: Callable | None = None,
    args: Sequence = (),
    ftol: float = 1e-8,
    ptol: float = 1e-8,
    gtol: float = 1e-8,
    l: float = 1.0,
    max_iter: int = 100,
) -> list[torch.Tensor]:
    r"""Minimise :math:`\tfrac12\lVert f(p)\rVert^2` by gradient descent.

    Runs the engine's ``'gd'`` rule: steps :math:`p \leftarrow p - t\,g` along
    the negative gradient :math:`g = J^\top f`; every iteration first tries
    :math:`t = l` (so the first trial is exactly :math:`p_0 - l\,g(p_0)`), and
    a trial that does not decrease the cost enough (Armijo) is rejected and
    :math:`t` halved.

    Parameters
    ----------
    p : Tensor, shape (n,)
        Starting point (never modified).
    function : callable
        ``function(p, *args) -> (m,)`` residuals.
    jac_function : callable, optional
        ``jac_function(p, *args) -> (m, n)``; default: exact Jacobian by autograd.
    args : tuple or list, optional
        Extra arguments of ``function`` and ``jac_function``.
    ftol : float, optional
        Stop when the cost decreases by less than ``ftol * cost`` in a step
        (scipy's ``ftol`` test).
    ptol : float, optional
        Stop when ``||step|| < ptol * (ptol + ||p||)`` (scipy's ``xtol`` test).
    gtol : float, optional
        Stop when ``max |g| < gtol``.
    l : float, optional
        Step size tried first in every iteration, > 0.
    max_iter : int, optional
        Maximum length of the returned list (the start point included), i.e.
        at most ``max_iter - 1`` trial steps.

    Returns
    -------
    list of Tensor
        ``[p0, p1, ...]``, each of shape ``(n,)``; the last is the result. The
        list's ``info`` attribute holds the final cost, status and counters.
    """
    return run_torchimize("gd", p, function, jac_function, args, parallel=False,
                          tolerances=(ftol, ptol, gtol), max_iter=max_iter,
                          rule_options=lambda: {"step_size": check_step(
                              l, "gradient-descent step size")})
