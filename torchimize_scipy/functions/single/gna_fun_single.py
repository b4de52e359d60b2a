"""Gauss-Newton for one least-squares problem (torchimize's ``lsq_gna``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._core import check_step, run_torchimize


def lsq_gna(
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
    r"""Minimise :math:`\tfrac12\lVert f(p)\rVert^2` by Gauss-Newton with a line search.

    Runs the engine's ``'gn'`` rule: the Gauss-Newton step (minimum-norm
    solution of :math:`\min\lVert J h + f\rVert`) is tried in full and halved
    until the cost decreases sufficiently (Armijo backtracking).

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
    ftol, ptol, gtol : float, optional
        scipy's ``ftol`` (relative cost decrease), ``xtol`` (relative step) and
        ``max |g| < gtol`` tests.
    l : float, optional
        Fraction of the Gauss-Newton step tried first in every iteration, > 0
        (then halved while the cost does not decrease enough).
    max_iter : int, optional
        Maximum length of the returned list (the start point included).

    Returns
    -------
    list of Tensor
        ``[p0, p1, ...]``, each of shape ``(n,)``; the last is the result.
    """
    return run_torchimize("gn", p, function, jac_function, args, parallel=False,
                          tolerances=(ftol, ptol, gtol), max_iter=max_iter,
                          rule_options=lambda: {"step_size": check_step(
                              l, "Gauss-Newton step fraction")})
