r"""MINPACK's pivoted QR and basic Gauss-Newton step, batched, for rank-deficient 'lm'.

For 'lm' on rank-deficient Jacobians, :func:`pivoted_qr` and
:func:`basic_gauss_newton` reproduce MINPACK's ``qrfac`` and the basic
Gauss-Newton step of ``lmpar`` (Moré, Garbow & Hillstrom, ANL-80-74, 1980),
batched with a loop over the ``n`` columns only.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm

from .counts import count_true, remember
from .linalg import Factors, svd_direct

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
    B = s.shape[0]
    if s.shape[-1] == 0 or (fac.gram is not None and count_true(fac.gram) == B):
        # no variables (nothing to pivot), or every row on the Gram route
        return remember(torch.zeros(B, dtype=torch.bool, device=s.device), 0)
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
    s, Vr, uf = svd_direct(R / diag.gather(1, perm).unsqueeze(-2), qtf, None)
    V = torch.zeros_like(Vr).scatter(1, perm.unsqueeze(-1).expand_as(Vr), Vr)
    ok = (torch.isfinite(p).all(-1) & torch.isfinite(curv) & torch.isfinite(s).all(-1)
          & torch.isfinite(uf).all(-1))
    return (BasicStep(ok, torch.where(ok.unsqueeze(-1), p, 0.0), torch.where(ok, curv, 0.0),
                      full), Factors(s, V, uf))
