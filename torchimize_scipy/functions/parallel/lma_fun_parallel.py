"""Levenberg-Marquardt for a batch of multi-channel problems."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .._core import check_lm_options, run_torchimize
from ._docs import fill_doc


@fill_doc
def lsq_lma_parallel(
    p: torch.Tensor,
    function: Callable,
    jac_function: Callable | None = None,
    args: Sequence = (),
    wvec: torch.Tensor | None = None,
    ftol: float = 1e-8,
    ptol: float = 1e-8,
    gtol: float = 1e-8,
    tau: float = 1e-3,
    meth: str = "lev",
    rho1: float = 0.25,
    rho2: float = 0.75,
    beta: float = 2,
    gama: float = 3,
    max_iter: int = 100,
) -> list[torch.Tensor]:
    r"""Minimise each problem's weighted cost by Levenberg-Marquardt.

    Runs the engine's ``'lm'`` rule, MINPACK's trust-region Levenberg-Marquardt
    method (scipy's ``method='lm'``), on the stacked weighted residuals of
    every problem. Each problem stops on its own tests and is frozen afterwards.

    Parameters
    ----------
    {common}
    ftol, ptol, gtol : float, optional
        MINPACK's tests, as scipy's ``ftol``, ``xtol`` and ``gtol`` for
        ``method='lm'``: relative reductions of the cost (actual and predicted)
        ``<= ftol``; trust radius ``<= ptol * ||D p||``; largest cosine between
        the residuals and a column of the Jacobian ``<= gtol``.
    tau, rho1, rho2, beta, gama : float, optional
        torchimize's damping schedule. MINPACK controls the damping through its
        trust radius instead; only the defaults (which select MINPACK's rule,
        whose gain-ratio thresholds are exactly ``rho1=0.25`` and
        ``rho2=0.75``) are accepted, other values raise ``ValueError``.
    meth : {'lev', 'marq'}, optional
        ``'lev'``: Levenberg's damping :math:`\lambda I` (``x_scale=1``);
        ``'marq'``: Marquardt's damping :math:`\lambda\,\mathrm{diag}(J^\top J)`
        (MINPACK's ``x_scale='jac'``).
    max_iter : int, optional
        Maximum number of iterations (trial steps, accepted or not), i.e. of
        returned tensors.

    Returns
    -------
    list of Tensor
        The ``(B, n)`` iterates after each iteration (at least one); the last
        holds the results.
    """
    return run_torchimize("lm", p, function, jac_function, args, parallel=True,
                          tolerances=(ftol, ptol, gtol), max_iter=max_iter,
                          rule_options=lambda: {"meth": check_lm_options(
                              tau, meth, rho1, rho2, beta, gama)},
                          wvec=wvec)
