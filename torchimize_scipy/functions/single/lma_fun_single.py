"""Levenberg-Marquardt for one least-squares problem (torchimize's ``lsq_lma``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._core import check_lm_options, run_torchimize


def lsq_lma(
    p: torch.Tensor,
    function: Callable,
    jac_function: Callable | None = None,
    args: Sequence = (),
    ftol: float = 1e-8,
    ptol: float = 1e-8,
    gtol: float = 1e-8,
    tau: float = 1e-3,
    meth: str = "lev",
    rho1: float = 0.25,
    rho2: float = 0.75,
    bet: float = 2,
    gam: float = 3,
    max_iter: int = 100,
) -> list[torch.Tensor]:
    r"""Minimise :math:`\tfrac12\lVert f(p)\rVert^2` by Levenberg-Marquardt.

    Runs the engine's ``'lm'`` rule, MINPACK's trust-region Levenberg-Marquardt
    method (scipy's ``method='lm'``).

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
        MINPACK's tests, as scipy's ``ftol``, ``xtol`` and ``gtol`` for
        ``method='lm'``: relative reductions of the cost (actual and predicted)
        ``<= ftol``; trust radius ``<= ptol * ||D p||``; largest cosine between
        ``f`` and a column of ``J`` ``<= gtol``.
    tau, rho1, rho2, bet, gam : float, optional
        torchimize's damping schedule. MINPACK controls the damping through its
        trust radius instead; only the defaults (which select MINPACK's rule,
        whose gain-ratio thresholds are exactly ``rho1=0.25`` and
        ``rho2=0.75``) are accepted, other values raise ``ValueError``.
    meth : {'lev', 'marq'}, optional
        ``'lev'``: Levenberg's damping :math:`\lambda I` (``x_scale=1``);
        ``'marq'``: Marquardt's damping :math:`\lambda\,\mathrm{diag}(J^\top J)`
        (MINPACK's ``x_scale='jac'``, running maximum of the column norms).
    max_iter : int, optional
        Maximum length of the returned list (the start point included); one
        iteration is one trial step, accepted or not.

    Returns
    -------
    list of Tensor
        ``[p0, p1, ...]``, each of shape ``(n,)``; a rejected trial repeats the
        previous point. The last is the result.
    """
    return run_torchimize("lm", p, function, jac_function, args, parallel=False,
                          tolerances=(ftol, ptol, gtol), max_iter=max_iter,
                          rule_options=lambda: {"meth": check_lm_options(
                              tau, meth, rho1, rho2, bet, gam, names=("bet", "gam"))})
