r"""Batched trust-region subproblems on the factors of :func:`.linalg.factorize`.

The radius-matching root finders follow J. J. Moré, "The Levenberg-Marquardt
algorithm: implementation and theory", Lecture Notes in Mathematics 630 (1978),
pp. 105-116: Newton's method on :math:`1/\lVert p(\alpha)\rVert - 1/\Delta`
safeguarded by the interval :math:`[\alpha_l, \alpha_u]`, with
:math:`\mathrm{d}\lVert p\rVert / \mathrm{d}\alpha = -p^\top (A^\top A +
\alpha I)^{-1} p / \lVert p\rVert` (from the SVD data, or from the inverse on
Gram rows). :func:`solve_trust_region_scipy` is the variant of scipy's 'trf'
(the step is put on the boundary), :func:`solve_trust_region_minpack` that of
MINPACK's ``lmpar`` ('lm').
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm

from .linalg import (
    Factors,
    full_rank_mask,
    gauss_newton_step,
    grad_norm,
    gram_solve,
    mix_routes,
    routes,
    safe_div,
)
from .minpack_qr import BasicStep


def radius_mismatch(fac: Factors, alpha: Tensor, delta: Tensor,
         zero: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``|p(alpha)| - delta``, its derivative in alpha, and ``|p(alpha)|``.

    ``zero=True`` says that ``alpha`` is 0 for every problem.
    """
    has_gram, has_svd = routes(fac)
    pn_s = dphi_s = pn_g = dphi_g = None
    if has_svd:
        suf = fac.s * fac.uf
        denom = fac.s * fac.s + alpha.unsqueeze(-1)
        pn_s = vnorm(safe_div(suf, denom), dim=-1)
        dphi_s = -safe_div(suf * suf, denom**3).sum(-1) / torch.where(
            pn_s > 0, pn_s, torch.ones_like(pn_s))
    if has_gram:
        p, q = gram_solve(fac, None if zero else alpha)
        pn_g = vnorm(p, dim=-1)
        dphi_g = -q / torch.where(pn_g > 0, pn_g, torch.ones_like(pn_g))
    p_norm = mix_routes(fac, pn_g, pn_s)
    return p_norm - delta, mix_routes(fac, dphi_g, dphi_s), p_norm


def damped_step(fac: Factors, alpha: Tensor, zero: bool = False) -> Tensor:
    """``p(alpha) = -(A^T A + alpha I)^+ A^T b`` (zero singular values dropped)."""
    has_gram, has_svd = routes(fac)
    p_svd = None
    if has_svd:
        coef = safe_div(fac.s * fac.uf, fac.s * fac.s + alpha.unsqueeze(-1))
        p_svd = -torch.bmm(fac.V, coef.unsqueeze(-1)).squeeze(-1)
    p_gram = gram_solve(fac, None if zero else alpha)[0] if has_gram else None
    return mix_routes(fac, p_gram, p_svd)


def solve_trust_region_scipy(
    fac: Factors, delta: Tensor, alpha0: Tensor, m: int, n: int,
    rtol: float = 0.01, max_iter: int = 10,
) -> tuple[Tensor, Tensor]:
    """Trust-region subproblem ``min |A p + b|, |p| <= delta`` as in scipy's 'trf'.

    The Gauss-Newton step is returned (with ``alpha = 0``) when the matrix has
    full rank and the step fits; otherwise ``alpha`` is found by Moré's
    safeguarded Newton iteration to ``|p| = delta (1 +- rtol)`` and the step is
    rescaled onto the boundary.

    Returns
    -------
    p : Tensor, shape (B, n)
    alpha : Tensor, shape (B,)
    """
    full_rank = full_rank_mask(fac, m, n)
    zeros = torch.zeros_like(delta)
    p_gn = damped_step(fac, zeros, zero=True)
    inside = full_rank & (vnorm(p_gn, dim=-1) <= delta)
    if bool(inside.all()):
        return p_gn, zeros

    upper = grad_norm(fac) / delta
    phi0, dphi0, _ = radius_mismatch(fac, zeros, delta, zero=True)
    lower = torch.where(full_rank, -phi0 / torch.where(dphi0 != 0, dphi0, torch.ones_like(dphi0)),
                        zeros)

    def restart(lo: Tensor, up: Tensor) -> Tensor:
        return torch.maximum(0.001 * up, (lo * up).sqrt())

    alpha = torch.where(~full_rank & (alpha0 == 0), restart(lower, upper), alpha0)
    running = ~inside
    for _ in range(max_iter):
        out = (alpha < lower) | (alpha > upper)
        alpha_it = torch.where(out, restart(lower, upper), alpha)
        phi, dphi, _ = radius_mismatch(fac, alpha_it, delta)
        upper_it = torch.where(phi < 0, alpha_it, upper)
        ratio = phi / torch.where(dphi != 0, dphi, torch.ones_like(dphi))
        lower_it = torch.maximum(lower, alpha_it - ratio)
        alpha_next = alpha_it - (phi + delta) * ratio / delta
        alpha = torch.where(running, alpha_next, alpha)
        lower = torch.where(running, lower_it, lower)
        upper = torch.where(running, upper_it, upper)
        running = running & ~(phi.abs() < rtol * delta)
        if not bool(running.any()):
            break
    p = damped_step(fac, alpha)
    pn = vnorm(p, dim=-1)
    p = p * (delta / torch.where(pn > 0, pn, torch.ones_like(pn))).unsqueeze(-1)
    p = torch.where(inside.unsqueeze(-1), p_gn, p)
    alpha = torch.where(inside, zeros, alpha)
    return p, alpha


def solve_trust_region_minpack(
    fac: Factors, delta: Tensor, par0: Tensor, m: int, n: int, max_iter: int = 10,
    basic: BasicStep | None = None, p_gn: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Levenberg-Marquardt parameter search of MINPACK's ``lmpar`` (Moré 1978).

    Works in scaled variables (``A = J diag(1/D)``) and stops when
    ``| |p| - delta | <= 0.1 delta``. Unlike the 'trf' variant, the step is not
    rescaled onto the boundary. ``p_gn``, if given, is the Gauss-Newton step
    (default :func:`gauss_newton_step`). On the rows of ``basic`` the lower
    bound of the damping is MINPACK's (pivoted QR, see
    :func:`basic_gauss_newton`; ``p_gn`` must then hold its basic step there);
    every damped step (``par > 0``) comes from ``fac``.

    Returns
    -------
    p : Tensor, shape (B, n)
        Step in scaled variables.
    par : Tensor, shape (B,)
    """
    dtype = delta.dtype
    dwarf = torch.finfo(dtype).tiny
    if p_gn is None:
        p_gn = gauss_newton_step(fac)
    dxnorm = vnorm(p_gn, dim=-1)
    fp = dxnorm - delta
    gn_ok = fp <= 0.1 * delta
    if bool(gn_ok.all()):
        return p_gn, torch.zeros_like(delta)

    full_rank = full_rank_mask(fac, m, n)
    zeros = torch.zeros_like(delta)
    phi0, dphi0, _ = radius_mismatch(fac, zeros, delta, zero=True)
    safe_d = torch.where(dphi0 != 0, dphi0, torch.ones_like(dphi0))
    parl = torch.where(full_rank, (-phi0 / safe_d) * (dxnorm / delta), zeros)
    if basic is not None:  # MINPACK's bound from R, zero when R has a zero pivot
        safe_c = torch.where(basic.curv > 0, basic.curv, torch.ones_like(basic.curv))
        parl_qr = torch.where(basic.full & (basic.curv > 0), (fp / delta) / safe_c, zeros)
        parl = torch.where(basic.rows, parl_qr, parl)
    gnorm = grad_norm(fac)
    paru = gnorm / delta
    paru = torch.where(paru == 0, dwarf / torch.clamp(delta, max=0.1), paru)
    par = torch.minimum(torch.maximum(par0, parl), paru)
    par = torch.where(par == 0, gnorm / torch.where(dxnorm > 0, dxnorm, torch.ones_like(dxnorm)),
                      par)
    running = ~gn_ok
    for it in range(1, max_iter + 1):
        par_it = torch.where(par == 0, torch.clamp(0.001 * paru, min=dwarf), par)
        phi, dphi, pnorm = radius_mismatch(fac, par_it, delta)
        temp = fp
        fp_it = phi
        stop = ((fp_it.abs() <= 0.1 * delta) | ((parl == 0) & (fp_it <= temp) & (temp < 0))
                | torch.full_like(running, it == max_iter))
        parc = -(phi / torch.where(dphi != 0, dphi, torch.ones_like(dphi))) * (pnorm / delta)
        parl_it = torch.where(fp_it > 0, torch.maximum(parl, par_it), parl)
        paru_it = torch.where(fp_it < 0, torch.minimum(paru, par_it), paru)
        par_next = torch.maximum(parl_it, par_it + parc)
        # rows that stop keep the parameter they were evaluated at
        par = torch.where(running, torch.where(stop, par_it, par_next), par)
        parl = torch.where(running & ~stop, parl_it, parl)
        paru = torch.where(running & ~stop, paru_it, paru)
        fp = torch.where(running, fp_it, fp)
        running = running & ~stop
        if not bool(running.any()):
            break
    p = damped_step(fac, par)
    p = torch.where(gn_ok.unsqueeze(-1), p_gn, p)
    par = torch.where(gn_ok, zeros, par)
    return p, par
