r"""Batched dense linear algebra for the step computations.

Every trust-region method here needs, for each problem, the minimiser of

.. math:: \lVert A p + b \rVert^2 + \alpha \lVert p \rVert^2,
          \qquad A = \begin{bmatrix} J\,\mathrm{diag}(d) \\ \mathrm{diag}(c)^{1/2} \end{bmatrix}

for several values of the Levenberg-Marquardt parameter :math:`\alpha`. One thin
SVD :math:`A = U \Sigma V^\top` serves them all:
:math:`p(\alpha) = -V (\Sigma^2 + \alpha I)^{-1} \Sigma U^\top b`. This never forms
:math:`J^\top J`, so the condition number is not squared (the stacked-system
view of Moré 1977). For tall matrices the SVD is taken of the triangular factor
of the eigen-decomposition of the small Gram matrix when a batch holds
several well-conditioned problems (:math:`O(mn^2)` once, then only
:math:`n \times n` work per problem); a single problem, and any problem with
:math:`\mathrm{cond}(A)^2 > 10^{10}`, takes the SVD of :math:`A` itself as scipy
does.

The radius-matching root finders follow J. J. Moré, "The Levenberg-Marquardt
algorithm: implementation and theory", Lecture Notes in Mathematics 630 (1978),
pp. 105-116: Newton's method on :math:`1/\lVert p(\alpha)\rVert - 1/\Delta`
safeguarded by the interval :math:`[\alpha_l, \alpha_u]`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm


def svd_factors(
    J: Tensor, d: Tensor | None, f: Tensor, diag: Tensor | None = None,
    gram: Tensor | None = None, g: Tensor | None = None, use_gram: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD data of the (optionally augmented) scaled Jacobian.

    Parameters
    ----------
    J : Tensor, shape (B, m, n)
    d : Tensor, shape (B, n), optional
        Column scaling; the matrix factorised is ``J diag(d)``.
    f : Tensor, shape (B, m)
        Right-hand side; ``uf = U^T [f; 0]`` is returned.
    diag : Tensor, shape (B, n), optional
        Non-negative diagonal appended below as ``diag(sqrt(diag))`` rows.
    gram, g : Tensor, shapes (B, n, n) and (B, n), optional
        ``J^T J`` and ``J^T f`` if already known (used by the Gram route).
    use_gram : bool, optional
        Take the Gram-matrix route (batches) instead of the direct SVD
        (single problems, as scipy).

    Returns
    -------
    s : Tensor, shape (B, k)
        Singular values in decreasing order, ``k = n`` when augmented or
        ``m >= n``, else ``m``.
    V : Tensor, shape (B, n, k)
    uf : Tensor, shape (B, k)
    """
    B, m, n = J.shape
    if use_gram and m >= n:
        return _svd_factors_gram(J, d, f, diag, gram, g)
    A = J if d is None else J * d.unsqueeze(-2)
    if math.isfinite(float(A.sum())):  # a finite sum: every entry is finite
        return _svd_factors_direct(A, f, diag)
    ok = torch.isfinite(A).flatten(1).all(-1)
    # non-finite rows get NaN factors without disturbing the others
    zero = torch.zeros((), dtype=A.dtype, device=A.device)
    s, V, uf = _svd_factors_direct(torch.where(ok[:, None, None], A, zero),
                                   torch.where(ok[:, None], f, zero),
                                   None if diag is None else torch.where(ok[:, None], diag, zero))
    nan = torch.full((), float("nan"), dtype=A.dtype, device=A.device)
    return (torch.where(ok[:, None], s, nan), torch.where(ok[:, None, None], V, nan),
            torch.where(ok[:, None], uf, nan))


#: Largest ``cond(A)**2`` for which the Gram-matrix route is trusted.
GRAM_COND2_LIMIT = 1e10


def _svd_factors_direct(A: Tensor, f: Tensor,
                        diag: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of the (augmented) matrix itself, as scipy computes it."""
    rhs = f
    if diag is not None:
        A = torch.cat([A, torch.diag_embed(diag.clamp(min=0).sqrt())], dim=-2)
        rhs = torch.cat([rhs, torch.zeros_like(diag)], dim=-1)
    try:
        U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    except RuntimeError:  # LAPACK did not converge for some problem: isolate it
        U, s, Vh = _svd_rowwise(A)
    uf = torch.bmm(U.transpose(-1, -2), rhs.unsqueeze(-1)).squeeze(-1)
    return s, Vh.transpose(-1, -2), uf


def _svd_rowwise(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD problem by problem; a problem whose SVD fails gets NaN factors.

    The step rules turn NaN factors into the status ``SINGULAR`` for that
    problem only.
    """
    B, m, n = A.shape
    k = min(m, n)
    U = A.new_full((B, m, k), float("nan"))
    s = A.new_full((B, k), float("nan"))
    Vh = A.new_full((B, k, n), float("nan"))
    for i in range(B):
        try:
            U[i], s[i], Vh[i] = torch.linalg.svd(A[i], full_matrices=False)
        except RuntimeError:
            pass
    return U, s, Vh


def _svd_factors_gram(J: Tensor, d: Tensor | None, f: Tensor, diag: Tensor | None,
                      gram: Tensor | None, g: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """SVD data from the eigen-decomposition of the small Gram matrix ``A^T A``.

    For a batch of small problems this is several times cheaper than QR and
    SVD of each tall matrix. Squaring the matrix squares its condition number,
    so problems with ``cond(A)**2 > GRAM_COND2_LIMIT`` (and any whose Gram
    matrix is not finite) are redone with the direct SVD.
    """
    Jt = J.transpose(-1, -2)
    H = torch.bmm(Jt, J) if gram is None else gram
    Atf = torch.bmm(Jt, f.unsqueeze(-1)).squeeze(-1) if g is None else g
    if d is not None:
        H = H * d.unsqueeze(-1) * d.unsqueeze(-2)
        Atf = Atf * d
    if diag is not None:
        H = H + torch.diag_embed(diag.clamp(min=0))
    finite = torch.isfinite(H.sum((-2, -1)))
    if not bool(finite.all()):  # non-finite rows go to the direct route, which isolates them
        H = torch.where(finite[:, None, None], H, torch.eye(H.shape[-1], dtype=H.dtype,
                                                             device=H.device))
    try:
        lam, V = torch.linalg.eigh(H)
    except RuntimeError:  # send every problem through the (per-problem safe) SVD
        lam = torch.zeros_like(H[..., 0])
        V = torch.zeros_like(H)
        finite = torch.zeros_like(finite)
    lam = lam.flip(-1)
    V = V.flip(-1)
    lam_max = lam[:, :1]
    bad = (~(lam[:, -1:] > lam_max / GRAM_COND2_LIMIT).squeeze(-1)
           | ~torch.isfinite(lam_max[:, 0]) | ~finite)
    s = lam.clamp(min=0).sqrt()
    suf = torch.bmm(V.transpose(-1, -2), Atf.unsqueeze(-1)).squeeze(-1)
    uf = _safe_div(suf, s)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(-1)
        A = J.index_select(0, rows)
        if d is not None:
            A = A * d.index_select(0, rows).unsqueeze(-2)
        s_b, V_b, uf_b = svd_factors(A, None, f.index_select(0, rows),
                                     None if diag is None else diag.index_select(0, rows))
        s = s.index_copy(0, rows, s_b)
        V = V.index_copy(0, rows, V_b)
        uf = uf.index_copy(0, rows, uf_b)
    return s, V, uf


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den`` is 0 (the numerators vanish there too)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def full_rank_mask(s: Tensor, m: int, n: int) -> Tensor:
    """Numerical full column rank, judged as scipy's 'trf' does (``eps * m * s_max``)."""
    if m < n or s.shape[-1] < n:
        return torch.zeros(s.shape[0], dtype=torch.bool, device=s.device)
    eps = torch.finfo(s.dtype).eps
    return s[:, -1] > eps * m * s[:, 0]


def gauss_newton_step(s: Tensor, V: Tensor, uf: Tensor, rcond: float | None = None) -> Tensor:
    """Minimum-norm least-squares step ``-pinv(A) b`` from SVD data, ``(B, n)``.

    Singular values below ``rcond * s_max`` (default: the dtype's epsilon times
    the larger dimension, as ``numpy.linalg.lstsq``) are treated as zero.
    """
    if rcond is None:
        rcond = torch.finfo(s.dtype).eps
    cutoff = rcond * s[:, :1]
    keep = s > cutoff
    coef = torch.where(keep, _safe_div(uf, s), torch.zeros_like(uf))
    return -torch.bmm(V, coef.unsqueeze(-1)).squeeze(-1)


def _phi(alpha: Tensor, suf: Tensor, s: Tensor, delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``|p(alpha)| - delta``, its derivative in alpha, and ``|p(alpha)|``."""
    denom = s * s + alpha.unsqueeze(-1)
    p_norm = vnorm(_safe_div(suf, denom), dim=-1)
    phi = p_norm - delta
    dphi = -_safe_div(suf * suf, denom**3).sum(-1) / torch.where(
        p_norm > 0, p_norm, torch.ones_like(p_norm))
    return phi, dphi, p_norm


def _step_for_alpha(alpha: Tensor, suf: Tensor, s: Tensor, V: Tensor) -> Tensor:
    coef = _safe_div(suf, s * s + alpha.unsqueeze(-1))
    return -torch.bmm(V, coef.unsqueeze(-1)).squeeze(-1)


def solve_trust_region_scipy(
    s: Tensor, V: Tensor, uf: Tensor, delta: Tensor, alpha0: Tensor, m: int, n: int,
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
    suf = s * uf
    full_rank = full_rank_mask(s, m, n)
    p_gn = _step_for_alpha(torch.zeros_like(delta), suf, s, V)
    inside = full_rank & (vnorm(p_gn, dim=-1) <= delta)
    if bool(inside.all()):
        return p_gn, torch.zeros_like(delta)

    upper = vnorm(suf, dim=-1) / delta
    phi0, dphi0, _ = _phi(torch.zeros_like(delta), suf, s, delta)
    lower = torch.where(full_rank, -phi0 / torch.where(dphi0 != 0, dphi0, torch.ones_like(dphi0)),
                        torch.zeros_like(delta))

    def restart(lo: Tensor, up: Tensor) -> Tensor:
        return torch.maximum(0.001 * up, (lo * up).sqrt())

    alpha = torch.where(~full_rank & (alpha0 == 0), restart(lower, upper), alpha0)
    running = ~inside
    for _ in range(max_iter):
        out = (alpha < lower) | (alpha > upper)
        alpha_it = torch.where(out, restart(lower, upper), alpha)
        phi, dphi, _ = _phi(alpha_it, suf, s, delta)
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
    p = _step_for_alpha(alpha, suf, s, V)
    pn = vnorm(p, dim=-1)
    p = p * (delta / torch.where(pn > 0, pn, torch.ones_like(pn))).unsqueeze(-1)
    p = torch.where(inside.unsqueeze(-1), p_gn, p)
    alpha = torch.where(inside, torch.zeros_like(alpha), alpha)
    return p, alpha


def solve_trust_region_minpack(
    s: Tensor, V: Tensor, uf: Tensor, delta: Tensor, par0: Tensor, m: int, n: int,
    max_iter: int = 10,
) -> tuple[Tensor, Tensor]:
    """Levenberg-Marquardt parameter search of MINPACK's ``lmpar`` (Moré 1978).

    Works in scaled variables (``A = J diag(1/D)``) and stops when
    ``| |p| - delta | <= 0.1 delta``. Unlike the 'trf' variant, the step is not
    rescaled onto the boundary.

    Returns
    -------
    p : Tensor, shape (B, n)
        Step in scaled variables.
    par : Tensor, shape (B,)
    """
    dtype = s.dtype
    dwarf = torch.finfo(dtype).tiny
    p_gn = gauss_newton_step(s, V, uf)
    dxnorm = vnorm(p_gn, dim=-1)
    fp = dxnorm - delta
    gn_ok = fp <= 0.1 * delta
    if bool(gn_ok.all()):
        return p_gn, torch.zeros_like(delta)

    suf = s * uf
    full_rank = full_rank_mask(s, m, n)
    zeros = torch.zeros_like(delta)
    phi0, dphi0, _ = _phi(zeros, suf, s, delta)
    safe_d = torch.where(dphi0 != 0, dphi0, torch.ones_like(dphi0))
    parl = torch.where(full_rank, (-phi0 / safe_d) * (dxnorm / delta), zeros)
    gnorm = vnorm(suf, dim=-1)
    paru = gnorm / delta
    paru = torch.where(paru == 0, dwarf / torch.clamp(delta, max=0.1), paru)
    par = torch.minimum(torch.maximum(par0, parl), paru)
    par = torch.where(par == 0, gnorm / torch.where(dxnorm > 0, dxnorm, torch.ones_like(dxnorm)),
                      par)
    running = ~gn_ok
    for it in range(1, max_iter + 1):
        par_it = torch.where(par == 0, torch.clamp(0.001 * paru, min=dwarf), par)
        phi, dphi, pnorm = _phi(par_it, suf, s, delta)
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
    p = _step_for_alpha(par, suf, s, V)
    p = torch.where(gn_ok.unsqueeze(-1), p_gn, p)
    par = torch.where(gn_ok, zeros, par)
    return p, par
