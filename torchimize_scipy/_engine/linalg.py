r"""Batched dense linear algebra for the step computations.

Every trust-region method here needs, for each problem, the minimiser of

.. math:: \lVert A p + b \rVert^2 + \alpha \lVert p \rVert^2,
          \qquad A = \begin{bmatrix} J\,\mathrm{diag}(d) \\ \mathrm{diag}(c)^{1/2} \end{bmatrix}

for several values of the Levenberg-Marquardt parameter :math:`\alpha`, that is
:math:`p(\alpha) = -(A^\top A + \alpha I)^{-1} A^\top b`. :func:`factorize`
prepares one of two representations per problem (a :class:`Factors`):

* **SVD rows.** One thin SVD :math:`A = U \Sigma V^\top` serves every
  :math:`\alpha`: :math:`p(\alpha) = -V (\Sigma^2 + \alpha I)^{-1} \Sigma U^\top b`.
  This never forms :math:`J^\top J`, so the condition number is not squared
  (the stacked-system view of Moré 1977). Single problems always take this
  route, with the SVD of :math:`A` itself, as scipy does.
* **Gram rows** (batches, and tall large single problems). The small matrix
  :math:`H = A^\top A` is formed once (:math:`O(mn^2)`) and every solve is an
  :math:`n \times n` one: :math:`H^{-1}` is kept for :math:`\alpha = 0`, and
  :math:`(H + \alpha I)^{-1}` is formed for each trial :math:`\alpha > 0`.
  Squaring the matrix squares its condition number, so a problem takes this
  route only when :math:`\mathrm{cond}_1(H) \le 10^{10}/n` (hence
  :math:`\mathrm{cond}_2(H) \le 10^{10}`; in float32 the limit is
  :math:`0.01/\epsilon`) and every entry is finite; any other
  problem of the batch gets SVD data instead, from the eigen-decomposition of
  :math:`H` or, when even that is not trusted, from the SVD of :math:`A`.
  For a batch of small matrices an inverse costs about one twentieth of an
  eigen-decomposition on the CPU.

The radius-matching root finders follow J. J. Moré, "The Levenberg-Marquardt
algorithm: implementation and theory", Lecture Notes in Mathematics 630 (1978),
pp. 105-116: Newton's method on :math:`1/\lVert p(\alpha)\rVert - 1/\Delta`
safeguarded by the interval :math:`[\alpha_l, \alpha_u]`, with
:math:`\mathrm{d}\lVert p\rVert / \mathrm{d}\alpha = -p^\top (A^\top A +
\alpha I)^{-1} p / \lVert p\rVert` (from the SVD data, or from the inverse on
Gram rows).

For 'lm' on rank-deficient Jacobians, :func:`pivoted_qr` and
:func:`basic_gauss_newton` reproduce MINPACK's ``qrfac`` and the basic
Gauss-Newton step of ``lmpar`` (Moré, Garbow & Hillstrom, ANL-80-74, 1980),
batched with a loop over the ``n`` columns only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm


class Factors(NamedTuple):
    """What :func:`factorize` prepares for each problem of a batch.

    Attributes
    ----------
    s : Tensor, shape (B, k)
        Singular values in decreasing order (SVD rows; zeros on Gram rows).
    V : Tensor, shape (B, n, k)
        Right singular vectors (SVD rows).
    uf : Tensor, shape (B, k)
        ``U^T b`` (SVD rows).
    H, Hinv : Tensor, shape (B, n, n), or None without the Gram route
        ``A^T A`` and its inverse (Gram rows).
    b : Tensor, shape (B, n), or None
        ``A^T [f; 0]``, the scaled gradient (Gram rows).
    gram : Tensor, shape (B,), bool, or None
        True where the problem is solved through ``H`` rather than the SVD
        data; None when no problem takes the Gram route (single problems).
    """

    s: Tensor
    V: Tensor
    uf: Tensor
    H: Tensor | None = None
    Hinv: Tensor | None = None
    b: Tensor | None = None
    gram: Tensor | None = None


#: Largest ``cond_2(A^T A) = cond(A)**2`` for which the Gram route is trusted
#: in float64; see :func:`gram_cond_limit` for other dtypes.
GRAM_COND2_LIMIT = 1e10


def gram_cond_limit(dtype: torch.dtype) -> float:
    """``min(GRAM_COND2_LIMIT, 0.01 / eps)``: Gram solves keep about 1 % accuracy.

    1e10 in float64 (relative error of a step about ``eps * cond`` = 2e-6);
    about 8e4 in float32, where 1e10 would leave no correct digit.
    """
    return min(GRAM_COND2_LIMIT, 0.01 / torch.finfo(dtype).eps)


def inverse_and_condition(H: Tensor) -> tuple[Tensor, Tensor]:
    r"""Inverses of finite square matrices ``H (B, n, n)`` and their 1-norm condition numbers.

    :math:`\kappa_1(H) = \lVert H\rVert_1 \lVert H^{-1}\rVert_1`, infinite
    where the LU factorisation failed. Since :math:`\kappa_1 / n \le \kappa_2
    \le n \kappa_1` for :math:`n \times n` matrices, trusting the inverse
    where :math:`\kappa_1 \le \mathrm{limit} / n` keeps :math:`\kappa_2(H)
    \le \mathrm{limit}` (a relative error of about ``eps * limit`` at most),
    and :math:`\kappa_1 > n\,\mathrm{limit}` proves :math:`\kappa_2 >
    \mathrm{limit}`. The caller keeps non-finite matrices out (replace them
    by the identity first).

    Returns
    -------
    Hinv : Tensor, shape (B, n, n)
    cond1 : Tensor, shape (B,)
    """
    Hinv, info = torch.linalg.inv_ex(H)
    cond1 = H.abs().sum(-2).amax(-1) * Hinv.abs().sum(-2).amax(-1)
    return Hinv, torch.where(info == 0, cond1, torch.inf)


def factorize(
    J: Tensor, d: Tensor | None, f: Tensor, diag: Tensor | None = None,
    gram: Tensor | None = None, g: Tensor | None = None, use_gram: bool = False,
) -> Factors:
    """Prepare the damped least-squares solves of ``A = [J diag(d); diag(diag)^(1/2)]``.

    Parameters
    ----------
    J : Tensor, shape (B, m, n)
    d : Tensor, shape (B, n), optional
        Column scaling; the matrix factorised is ``J diag(d)``.
    f : Tensor, shape (B, m)
        Right-hand side (``b = [f; 0]``).
    diag : Tensor, shape (B, n), optional
        Non-negative diagonal appended below as ``diag(sqrt(diag))`` rows.
    gram, g : Tensor, shapes (B, n, n) and (B, n), optional
        ``J^T J`` and ``J^T f`` if already known (used by the Gram route).
    use_gram : bool, optional
        Take the Gram route where it is trusted (batches) instead of the
        direct SVD (single problems, as scipy).

    Returns
    -------
    Factors
    """
    B, m, n = J.shape
    if not (use_gram and m >= n):
        return Factors(*svd_factors(J, d, f, diag))
    Jt = J.transpose(-1, -2)
    H = torch.bmm(Jt, J) if gram is None else gram
    Atf = torch.bmm(Jt, f.unsqueeze(-1)).squeeze(-1) if g is None else g
    if d is not None:
        H = H * d.unsqueeze(-1) * d.unsqueeze(-2)
        Atf = Atf * d
    if diag is not None:
        H = H + torch.diag_embed(diag.clamp(min=0))
    finite = torch.isfinite(H.sum((-2, -1)) + Atf.sum(-1))
    if not bool(finite.all()):  # keep the inversion away from non-finite rows
        H = torch.where(finite[:, None, None], H, torch.eye(n, dtype=H.dtype, device=H.device))
    Hinv, cond1 = inverse_and_condition(H)
    limit = gram_cond_limit(H.dtype)
    ok = finite & (cond1 <= limit / n)  # a NaN cond1 fails too
    # beyond this, the eigen-decomposition of H cannot be trusted either: straight to the SVD
    eig_hopeless = ~(cond1 <= n * limit)
    s = H.new_zeros(B, n)
    V = H.new_zeros(B, n, n)
    uf = H.new_zeros(B, n)
    if not bool(ok.all()):
        rows = (~ok).nonzero().squeeze(-1)

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, rows)

        s_b, V_b, uf_b = _eig_factors(pick(H), pick(Atf), pick(J), pick(d), pick(f), pick(diag),
                                      pick(finite & ~eig_hopeless))
        s = s.index_copy(0, rows, s_b)
        V = V.index_copy(0, rows, V_b)
        uf = uf.index_copy(0, rows, uf_b)
    return Factors(s, V, uf, H, Hinv, Atf, ok)


def svd_factors(J: Tensor, d: Tensor | None, f: Tensor,
                diag: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD data of the (optionally augmented) scaled Jacobian, per problem.

    Parameters are those of :func:`factorize`. Problems with non-finite
    entries get NaN factors without disturbing the others.

    Returns
    -------
    s : Tensor, shape (B, k)
        Singular values in decreasing order, ``k = n`` when augmented or
        ``m >= n``, else ``m``.
    V : Tensor, shape (B, n, k)
    uf : Tensor, shape (B, k)
    """
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


def _eig_factors(H: Tensor, Atf: Tensor, J: Tensor, d: Tensor | None, f: Tensor,
                 diag: Tensor | None, finite: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD data of the problems the Gram inverse does not serve.

    The eigen-decomposition of ``H = A^T A`` gives them when
    ``cond(A)**2 <= gram_cond_limit(dtype)``; problems beyond that, and those
    marked False in ``finite`` (non-finite ``H``, or a condition already known
    to be beyond the limit), are redone with the direct SVD of ``A``, which
    also handles rank deficiency as scipy does.
    """
    lam = torch.zeros_like(H[..., 0])
    V = torch.zeros_like(H)
    try:
        if bool(finite.all()):
            lam, V = torch.linalg.eigh(H)
        elif bool(finite.any()):  # the others go to the SVD
            rows = finite.nonzero().squeeze(-1)
            lam_r, V_r = torch.linalg.eigh(H.index_select(0, rows))
            lam, V = lam.index_copy(0, rows, lam_r), V.index_copy(0, rows, V_r)
    except RuntimeError:  # send every problem through the (per-problem safe) SVD
        finite = torch.zeros_like(finite)
    lam = lam.flip(-1)
    V = V.flip(-1)
    lam_max = lam[:, :1]
    bad = (~(lam[:, -1:] > lam_max / gram_cond_limit(H.dtype)).squeeze(-1)
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


def full_rank_mask(fac: Factors, m: int, n: int) -> Tensor:
    """Numerical full column rank, judged as scipy's 'trf' does (``eps * m * s_max``).

    Gram rows have full rank by construction (their condition is bounded).
    """
    s = fac.s
    if m < n or s.shape[-1] < n:
        return torch.zeros_like(s[:, 0], dtype=torch.bool) if fac.gram is None else fac.gram
    eps = torch.finfo(s.dtype).eps
    svd_rank = s[:, -1] > eps * m * s[:, 0]
    return svd_rank if fac.gram is None else svd_rank | fac.gram


def _routes(fac: Factors) -> tuple[bool, bool]:
    """Whether any problem takes the Gram route, and whether any takes the SVD route."""
    if fac.gram is None:
        return False, True
    count = int(fac.gram.sum())
    return count > 0, count < fac.gram.shape[0]


def _mix(fac: Factors, gram_value: Tensor | None, svd_value: Tensor | None) -> Tensor:
    """Gram rows from ``gram_value``, the others from ``svd_value`` (either may be None)."""
    if svd_value is None:
        return gram_value
    if gram_value is None:
        return svd_value
    mask = fac.gram.view(-1, *([1] * (svd_value.ndim - 1)))
    return torch.where(mask, gram_value, svd_value)


def _gram_solve(fac: Factors, alpha: Tensor | None) -> tuple[Tensor, Tensor]:
    """``p = -(H + alpha I)^{-1} b`` and ``q = p^T (H + alpha I)^{-1} p`` on Gram rows.

    ``alpha=None`` means 0 (the stored inverse is used). Rows that do not
    take the Gram route get meaningless values.
    """
    if alpha is None:
        M = fac.Hinv
    else:
        H = fac.H + torch.diag_embed(alpha.unsqueeze(-1).expand_as(fac.b))
        M = torch.linalg.inv_ex(H)[0]
    p = -torch.bmm(M, fac.b.unsqueeze(-1))
    q = (p * torch.bmm(M, p)).sum((-2, -1))
    return p.squeeze(-1), q


def grad_norm(fac: Factors) -> Tensor:
    """``|A^T b|`` per problem."""
    has_gram, has_svd = _routes(fac)
    return _mix(fac, vnorm(fac.b, dim=-1) if has_gram else None,
                vnorm(fac.s * fac.uf, dim=-1) if has_svd else None)


def gauss_newton_step(fac: Factors, rcond: float | None = None) -> Tensor:
    """Minimum-norm least-squares step ``-pinv(A) b``, ``(B, n)``.

    On SVD rows, singular values below ``rcond * s_max`` (default: the
    dtype's epsilon) are treated as zero; Gram rows have full rank and use
    ``H^{-1}``.
    """
    has_gram, has_svd = _routes(fac)
    p_svd = None
    if has_svd:
        s, uf = fac.s, fac.uf
        if rcond is None:
            rcond = torch.finfo(s.dtype).eps
        keep = s > rcond * s[:, :1]
        coef = torch.where(keep, _safe_div(uf, s), torch.zeros_like(uf))
        p_svd = -torch.bmm(fac.V, coef.unsqueeze(-1)).squeeze(-1)
    return _mix(fac, _gram_solve(fac, None)[0] if has_gram else None, p_svd)


#: The Gram rows whose Gauss-Newton step predicts a residual norm below this fraction of
#: the current one get :func:`refine_gauss_newton`'s correction.
REFINE_BELOW = 1e-2


def refine_gauss_newton(fac: Factors, p: Tensor, J: Tensor, d: Tensor | None,
                        f: Tensor) -> Tensor:
    r"""Iterative refinement of the Gauss-Newton steps of nearly zero-residual Gram rows.

    ``p = -H^{-1} A^\top f`` from the normal equations (``A = J diag(d)``)
    carries a relative error of about :math:`\epsilon\,\kappa(A)^2`, against
    :math:`\epsilon\,\kappa(A)` for the SVD of a single problem. That only
    shows when the step is to end on a zero residual: whether it lands
    exactly there (and the ``gtol`` test stops the problem, as MINPACK's QR
    solve and a single problem do) is decided by the last digits. On the Gram
    rows whose model predicts :math:`\lVert f + A p\rVert \le`
    :data:`REFINE_BELOW` :math:`\lVert f\rVert`, one correction
    :math:`p \leftarrow p - H^{-1} A^\top (f + A p)` (the corrected
    semi-normal equations, Björck, BIT 27, 1987) brings the error to about
    :math:`\epsilon\,\kappa(A)`. Other rows (nearly all, on problems with
    a residual) are returned unchanged and cost nothing.
    """
    if fac.gram is None:
        return p
    ff = (f * f).sum(-1)
    predicted = ff + (p * fac.b).sum(-1)  # |f + A p|^2 = |f|^2 + p.b when H p = -b
    pick = fac.gram & (predicted <= REFINE_BELOW**2 * ff)
    if not bool(pick.any()):
        return p
    rows = pick.nonzero().squeeze(-1)
    Jr, pr, fr = J.index_select(0, rows), p.index_select(0, rows), f.index_select(0, rows)
    dr = None if d is None else d.index_select(0, rows)
    Ap = pr if dr is None else pr * dr
    r = fr + torch.bmm(Jr, Ap.unsqueeze(-1)).squeeze(-1)
    Atr = torch.bmm(r.unsqueeze(1), Jr).squeeze(1)
    if dr is not None:
        Atr = Atr * dr
    fixed = pr - torch.bmm(fac.Hinv.index_select(0, rows), Atr.unsqueeze(-1)).squeeze(-1)
    return p.index_copy(0, rows, fixed)


def _phi(fac: Factors, alpha: Tensor, delta: Tensor,
         zero: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``|p(alpha)| - delta``, its derivative in alpha, and ``|p(alpha)|``.

    ``zero=True`` says that ``alpha`` is 0 for every problem.
    """
    has_gram, has_svd = _routes(fac)
    pn_s = dphi_s = pn_g = dphi_g = None
    if has_svd:
        suf = fac.s * fac.uf
        denom = fac.s * fac.s + alpha.unsqueeze(-1)
        pn_s = vnorm(_safe_div(suf, denom), dim=-1)
        dphi_s = -_safe_div(suf * suf, denom**3).sum(-1) / torch.where(
            pn_s > 0, pn_s, torch.ones_like(pn_s))
    if has_gram:
        p, q = _gram_solve(fac, None if zero else alpha)
        pn_g = vnorm(p, dim=-1)
        dphi_g = -q / torch.where(pn_g > 0, pn_g, torch.ones_like(pn_g))
    p_norm = _mix(fac, pn_g, pn_s)
    return p_norm - delta, _mix(fac, dphi_g, dphi_s), p_norm


def _step_for_alpha(fac: Factors, alpha: Tensor, zero: bool = False) -> Tensor:
    """``p(alpha) = -(A^T A + alpha I)^+ A^T b`` (zero singular values dropped)."""
    has_gram, has_svd = _routes(fac)
    p_svd = None
    if has_svd:
        coef = _safe_div(fac.s * fac.uf, fac.s * fac.s + alpha.unsqueeze(-1))
        p_svd = -torch.bmm(fac.V, coef.unsqueeze(-1)).squeeze(-1)
    p_gram = _gram_solve(fac, None if zero else alpha)[0] if has_gram else None
    return _mix(fac, p_gram, p_svd)


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
    p_gn = _step_for_alpha(fac, zeros, zero=True)
    inside = full_rank & (vnorm(p_gn, dim=-1) <= delta)
    if bool(inside.all()):
        return p_gn, zeros

    upper = grad_norm(fac) / delta
    phi0, dphi0, _ = _phi(fac, zeros, delta, zero=True)
    lower = torch.where(full_rank, -phi0 / torch.where(dphi0 != 0, dphi0, torch.ones_like(dphi0)),
                        zeros)

    def restart(lo: Tensor, up: Tensor) -> Tensor:
        return torch.maximum(0.001 * up, (lo * up).sqrt())

    alpha = torch.where(~full_rank & (alpha0 == 0), restart(lower, upper), alpha0)
    running = ~inside
    for _ in range(max_iter):
        out = (alpha < lower) | (alpha > upper)
        alpha_it = torch.where(out, restart(lower, upper), alpha)
        phi, dphi, _ = _phi(fac, alpha_it, delta)
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
    p = _step_for_alpha(fac, alpha)
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
    phi0, dphi0, _ = _phi(fac, zeros, delta, zero=True)
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
        phi, dphi, pnorm = _phi(fac, par_it, delta)
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
    p = _step_for_alpha(fac, par)
    p = torch.where(gn_ok.unsqueeze(-1), p_gn, p)
    par = torch.where(gn_ok, zeros, par)
    return p, par


# --------------------------------------------------------------------------- MINPACK's basic step
#: Rows whose smallest singular value is at most this multiple of ``eps * s_max`` are
#: (numerically) rank deficient for 'lm': they take MINPACK's pivoted-QR Gauss-Newton step.
LM_RANK_FACTOR = 100.0


def _seq_sum(a: Tensor, dim: int) -> Tensor:
    """Sum along ``dim`` accumulated in index order (a running sum on the CPU), as a loop
    in MINPACK would: exactly dependent columns then leave exact zeros in ``R`` where
    MINPACK finds them, which decides its rank (a pairwise sum would leave rounding)."""
    return torch.cumsum(a, dim).select(dim, -1)


def _seq_norm(a: Tensor, dim: int) -> Tensor:
    """Euclidean norm along ``dim`` from :func:`_seq_sum` of the squares."""
    return _seq_sum(a * a, dim).sqrt()


def _back_substitute(R: Tensor, b: Tensor, transpose: bool = False) -> Tensor:
    """Solve ``R w = b`` (or ``R^T w = b``) with ``R (B, n, n)`` upper triangular.

    Column-oriented, in MINPACK's order of operations (``n`` small); every
    diagonal entry must be non-zero.
    """
    n = b.shape[-1]
    w = b.clone()  # work array of this function: updated in place
    if not transpose:  # R w = b: last unknown first, eliminated from the rows above
        for j in range(n - 1, -1, -1):
            w[:, j] = w[:, j] / R[:, j, j]
            if j:
                w[:, :j] = w[:, :j] - R[:, :j, j] * w[:, j:j + 1]
        return w
    for j in range(n):  # R^T w = b: first unknown first, with the column of R above it
        if j:
            w[:, j] = w[:, j] - _seq_sum(R[:, :j, j] * w[:, :j], -1)
        w[:, j] = w[:, j] / R[:, j, j]
    return w


def pivoted_qr(J: Tensor, f: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Householder QR with column pivoting, ``J P = Q R``, as MINPACK's ``qrfac``.

    The column of largest remaining norm is brought forward at each stage
    (Businger & Golub, Numer. Math. 7, 1965); the remaining norms are
    downdated and recomputed when cancellation has eaten more than about
    half of their digits, and a column whose remaining part is exactly zero
    leaves a zero on the diagonal of ``R`` (Moré, Garbow & Hillstrom,
    ANL-80-74, 1980). The loop runs over the ``n`` columns; every problem of
    the batch is reduced at once.

    Parameters
    ----------
    J : Tensor, shape (B, m, n), ``m >= n``
    f : Tensor, shape (B, m)

    Returns
    -------
    R : Tensor, shape (B, n, n)
        Upper triangular; its diagonal has non-increasing magnitude.
    perm : Tensor, shape (B, n), long
        Column ``j`` of ``R`` belongs to variable ``perm[:, j]``.
    qtf : Tensor, shape (B, n)
        The first ``n`` entries of ``Q^T f``.
    """
    B, m, n = J.shape
    eps = torch.finfo(J.dtype).eps
    A = J.clone()  # work arrays of this function only: updated in place
    b = f.clone()
    norms = _seq_norm(A, -2)  # remaining column norms
    ref = norms.clone()  # the norms when last computed in full
    perm = torch.arange(n, device=J.device).expand(B, n).clone()
    rdiag = A.new_zeros(B, n)
    cols = torch.arange(n, device=J.device)
    one = A.new_ones(())
    for j in range(n):
        # bring the column of largest remaining norm (the first such) into position j
        kmax = j + torch.argmax(norms[:, j:], dim=-1)  # (B,)
        swap = cols.expand(B, n).clone()
        swap[:, j] = kmax
        swap.scatter_(1, kmax.unsqueeze(-1), torch.full_like(kmax.unsqueeze(-1), j))
        A = A.gather(2, swap.unsqueeze(1).expand(B, m, n))
        norms, ref, perm = norms.gather(1, swap), ref.gather(1, swap), perm.gather(1, swap)
        # Householder vector of the column's tail, scaled so that v[0] = 1 + |a_jj| / |a|
        a = A[:, j:, j]  # (B, m - j)
        ajnorm = _seq_norm(a, -1)
        ajnorm = torch.where(a[:, 0] < 0, -ajnorm, ajnorm)
        move = ajnorm != 0  # a zero column is left alone
        v = a / torch.where(move, ajnorm, one).unsqueeze(-1)
        v[:, 0] += 1
        v = torch.where(move.unsqueeze(-1), v, 0.0)
        v0 = torch.where(move, v[:, 0], one)
        # reflect the remaining columns and the right-hand side
        tail = A[:, j:, j + 1:]  # (B, m - j, n - j - 1)
        coef = _seq_sum(v.unsqueeze(-1) * tail, -2) / v0.unsqueeze(-1)
        A[:, j:, j + 1:] = tail - coef.unsqueeze(-2) * v.unsqueeze(-1)
        coef_b = _seq_sum(v * b[:, j:], -1) / v0
        b[:, j:] = b[:, j:] - coef_b.unsqueeze(-1) * v
        rdiag[:, j] = -ajnorm
        if j + 1 == n:
            break
        # downdate the remaining norms; recompute those that lost too many digits
        rest, refr = norms[:, j + 1:], ref[:, j + 1:]
        live = move.unsqueeze(-1) & (rest != 0)
        ratio = A[:, j, j + 1:] / torch.where(live, rest, one)
        down = rest * (1 - ratio * ratio).clamp(min=0).sqrt()
        stale = live & (0.05 * (down / torch.where(refr != 0, refr, one)) ** 2 <= eps)
        full = _seq_norm(A[:, j + 1:, j + 1:], -2)
        norms[:, j + 1:] = torch.where(stale, full, torch.where(live, down, rest))
        ref[:, j + 1:] = torch.where(stale, full, refr)
    R = torch.triu(A[:, :n, :], diagonal=1) + torch.diag_embed(rdiag)
    return R, perm, b[:, :n]


class BasicStep(NamedTuple):
    """MINPACK's Gauss-Newton data for the rows that take it (see :func:`basic_gauss_newton`).

    Attributes
    ----------
    rows : Tensor, shape (B,), bool
        Rows whose Gauss-Newton step comes from here rather than from the SVD.
    p : Tensor, shape (B, n)
        The basic Gauss-Newton step in scaled variables (``diag * step``).
    curv : Tensor, shape (B,)
        :math:`\\lVert R^{-\\top} P^\\top D^2 x / \\lVert D x\\rVert \\rVert^2`, the
        curvature MINPACK's lower bound on the damping uses (full rank only).
    full : Tensor, shape (B,), bool
        No zero on the diagonal of ``R`` (MINPACK's ``nsing == n``).
    """

    rows: Tensor
    p: Tensor
    curv: Tensor
    full: Tensor


def rank_deficient_rows(fac: Factors) -> Tensor:
    """``(B,)`` mask of the SVD rows whose ``s_min <= LM_RANK_FACTOR * eps * s_max``.

    Gram and eigen rows have a bounded condition number and are never selected;
    rows with non-finite factors are not selected either.
    """
    s = fac.s
    if s.shape[-1] == 0:  # no variables: nothing to pivot
        return torch.zeros(s.shape[0], dtype=torch.bool, device=s.device)
    eps = torch.finfo(s.dtype).eps
    low = s[:, -1] <= LM_RANK_FACTOR * eps * s[:, 0]
    return low if fac.gram is None else low & ~fac.gram


def basic_gauss_newton(J: Tensor, diag: Tensor, f: Tensor) -> tuple[BasicStep, Factors]:
    r"""MINPACK's Gauss-Newton step for (nearly) rank-deficient Jacobians.

    With :math:`J P = Q R` from :func:`pivoted_qr`, the step solves
    :math:`R\,P^\top s = -Q^\top f` over the leading block of ``R`` that ends
    before its first exactly zero diagonal entry and leaves the other
    (pivoted-last) variables where they are: the *basic* least-squares
    solution (Moré 1978, section 3; MINPACK ``lmpar``). Where ``R`` has no
    zero diagonal, this is the ordinary solve with the tiny pivots kept, as
    MINPACK does. Unlike the minimum-norm solution of the SVD, it moves only
    the variables of the pivot columns, which breaks the symmetry between
    interchangeable parameters.

    Parameters
    ----------
    J : Tensor, shape (B, m, n), ``m >= n``
    diag : Tensor, shape (B, n)
        MINPACK's variable scaling (positive).
    f : Tensor, shape (B, m)

    Returns
    -------
    BasicStep
        With ``rows`` true where the result is finite.
    Factors
        SVD data (``s``, ``V``, ``uf``) of the scaled triangular factor
        :math:`R P^\top D^{-1}` with right-hand side :math:`Q^\top f`: the damped
        steps of these rows are then those of MINPACK's ``qrsolv`` on the same
        ``R`` (whose tiny pivots carry the rounding that decides how MINPACK
        leaves a saddle), rather than those of the SVD of ``J``.
    """
    B, n = diag.shape
    R, perm, qtf = pivoted_qr(J, f)
    zero = torch.diagonal(R, dim1=-2, dim2=-1) == 0
    cut = zero.cumsum(-1) > 0  # from the first zero diagonal on
    full = ~cut[:, -1]
    eye = torch.eye(n, dtype=R.dtype, device=R.device)
    Rt = torch.where(cut.unsqueeze(-1) | cut.unsqueeze(-2), eye, R)
    w = _back_substitute(Rt, torch.where(cut, 0.0, qtf))
    x = torch.zeros_like(w).scatter(1, perm, w)  # x[perm[j]] = w[j]
    p = -diag * x
    dxnorm = vnorm(p, dim=-1)
    safe = torch.where(dxnorm > 0, dxnorm, torch.ones_like(dxnorm))
    wa = (diag * p / safe.unsqueeze(-1)).gather(1, perm)
    z = _back_substitute(Rt, wa, transpose=True)
    curv = (z * z).sum(-1)
    # SVD data of R P^T D^-1: column j of R scaled by 1 / diag[perm[j]], rows of V unpermuted
    s, Vr, uf = _svd_factors_direct(R / diag.gather(1, perm).unsqueeze(-2), qtf, None)
    V = torch.zeros_like(Vr).scatter(1, perm.unsqueeze(-1).expand_as(Vr), Vr)
    ok = (torch.isfinite(p).all(-1) & torch.isfinite(curv) & torch.isfinite(s).all(-1)
          & torch.isfinite(uf).all(-1))
    return (BasicStep(ok, torch.where(ok.unsqueeze(-1), p, 0.0), torch.where(ok, curv, 0.0),
                      full), Factors(s, V, uf))
