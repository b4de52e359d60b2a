r"""MINPACK's pivoted QR and basic Gauss-Newton step, batched, for rank-deficient 'lm'.

For 'lm' on rank-deficient Jacobians, :func:`pivoted_qr` and
:func:`basic_gauss_newton` reproduce MINPACK's ``qrfac`` and the basic
Gauss-Newton step of ``lmpar`` (Moré, Garbow & Hillstrom, ANL-80-74, 1980),
batched with a loop over the ``n`` columns only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm

from . import host_lapack, host_scalars
from .counts import count_true, remember
from .linalg import Factors, svd_direct
from .problem import host_transposed_rows

#: Rows whose smallest singular value is at most this multiple of ``eps * s_max`` are
#: (numerically) rank deficient for 'lm': they take MINPACK's pivoted-QR Gauss-Newton step.
LM_RANK_FACTOR = 100.0

#: machine epsilon of the float dtypes (``torch.finfo`` costs a call each time)
_EPS = {dt: torch.finfo(dt).eps for dt in (torch.float64, torch.float32)}


def _xp(a: Any) -> Any:
    """``torch`` for a tensor, ``numpy`` for an array."""
    return torch if isinstance(a, Tensor) else np


def _copy(a: Any) -> Any:
    return a.clone() if isinstance(a, Tensor) else a.copy()


def _sqrt(a: Any) -> Any:
    """Square root, torch's also for an array: torch's float64 ``sqrt`` is not always
    correctly rounded (numpy's is), and the results must not depend on the route. An
    array is a temporary of the caller's and is overwritten (in place through torch's
    view of it, the same kernel on the same layout)."""
    if isinstance(a, Tensor):
        return a.sqrt()
    torch.from_numpy(a).sqrt_()
    return a


def _seq_sum(a: Any, dim: int) -> Any:
    """Sum along ``dim`` (-1 or -2) accumulated in index order (a running sum on the
    CPU, in torch as in numpy), as a loop in MINPACK would: exactly dependent columns
    then leave exact zeros in ``R`` where MINPACK finds them, which decides its rank (a
    pairwise sum would leave rounding)."""
    c = a.cumsum(dim)  # (numpy's method and torch's: the same running sum)
    return c[..., -1] if dim == -1 else c[..., -1, :]


def _seq_norm(a: Any, dim: int) -> Any:
    """Euclidean norm along ``dim`` from :func:`_seq_sum` of the squares."""
    return _sqrt(_seq_sum(a * a, dim))


def _back_substitute(R: Any, b: Any, transpose: bool = False) -> Any:
    """Solve ``R w = b`` (or ``R^T w = b``) with ``R (B, n, n)`` upper triangular.

    Column-oriented, in MINPACK's order of operations (``n`` small); every
    diagonal entry must be non-zero. Tensors or numpy arrays.
    """
    n = b.shape[-1]
    w = _copy(b)  # work array of this function: updated in place
    if not transpose:  # R w = b: last unknown first, eliminated from the rows above
        for j in range(n - 1, -1, -1):
            w[:, j] = w[:, j] / R[:, j, j]
            if j:
                w[:, :j] -= R[:, :j, j] * w[:, j:j + 1]
        return w
    w[:, 0] = w[:, 0] / R[:, 0, 0]
    for j in range(1, n):  # R^T w = b: first unknown first, with the column of R above it
        w[:, j] = (w[:, j] - _seq_sum(R[:, :j, j] * w[:, :j], -1)) / R[:, j, j]
    return w


def pivoted_qr(J: Any, f: Any) -> tuple[Any, Any, Any]:
    r"""Householder QR with column pivoting, ``J P = Q R``, as MINPACK's ``qrfac``.

    The column of largest remaining norm is brought forward at each stage
    (Businger & Golub, Numer. Math. 7, 1965); the remaining norms are
    downdated and recomputed when cancellation has eaten more than about
    half of their digits, and a column whose remaining part is exactly zero
    leaves a zero on the diagonal of ``R`` (Moré, Garbow & Hillstrom,
    ANL-80-74, 1980). The loop runs over the ``n`` columns; every problem of
    the batch is reduced at once. Tensors, or numpy arrays (what
    :func:`basic_gauss_newton` uses on the CPU: each of the many small
    elementwise steps then costs a fraction of a torch operation's dispatch,
    with the same bits).

    Parameters
    ----------
    J : Tensor or ndarray, shape (B, m, n), ``m >= n``
    f : Tensor or ndarray, shape (B, m)

    Returns
    -------
    R : shape (B, n, n)
        Upper triangular; its diagonal has non-increasing magnitude.
    perm : shape (B, n), integer
        Column ``j`` of ``R`` belongs to variable ``perm[:, j]``.
    qtf : shape (B, n)
        The first ``n`` entries of ``Q^T f``.
    """
    xp = _xp(J)
    host = xp is np
    B, m, n = J.shape
    if host and B == 1 and n:
        return _pivoted_qr_one(J[0], f[0])
    eps = torch.finfo(J.dtype).eps if xp is torch else np.finfo(J.dtype).eps
    # the work array of this function, updated in place: J with f appended as column n
    # (reflected with the others, never pivoted), and below them three rows holding each
    # column's remaining norm, its norm when last computed in full, and its variable
    # (exact as a float), so that a pivot is one swap of two columns of it all
    W = (np.empty((B, m + 3, n + 1), dtype=J.dtype) if host
         else J.new_empty(B, m + 3, n + 1))
    W[:, :m, :n] = J
    W[:, :m, n] = f
    norms, ref, perm = W[:, m, :n], W[:, m + 1, :n], W[:, m + 2, :n]  # (views)
    norms[...] = _seq_norm(J, -2)  # remaining column norms
    ref[...] = norms
    if xp is torch:
        cols = torch.arange(n, device=J.device)
        rows = torch.arange(B, device=J.device)
    else:
        cols, rows = np.arange(n), np.arange(B)
    perm[...] = cols
    rdiag = xp.zeros_like(norms)
    for j in range(n):
        # bring the column of largest remaining norm (the first such) into position j:
        # columns j and kmax trade places in each problem (copies: the same bits); on the
        # host, a stage where no problem pivots swaps nothing
        kmax = j + xp.argmax(norms[:, j:], -1)  # (B,)
        if not host or (kmax != j).any():
            at_j = _copy(W[:, :, j])  # (a view: kept before it is overwritten)
            W[:, :, j] = W[rows, :, kmax]
            W[rows, :, kmax] = at_j
        # Householder vector of the column's tail, scaled so that v[0] = 1 + |a_jj| / |a|
        a = W[:, j:m, j]  # (B, m - j)
        ajnorm = _seq_norm(a, -1)
        ajnorm = xp.where(a[:, 0] < 0, -ajnorm, ajnorm)
        move = ajnorm != 0  # a zero column is left alone
        # (on the host, where every column moves, the selections below would keep every
        # value: skipped)
        every = host and bool(move.all())
        v = a / (ajnorm if every else xp.where(move, ajnorm, 1.0))[:, None]
        v[:, 0] += 1
        if not every:
            v = xp.where(move[:, None], v, 0.0)
        v0 = v[:, 0] if every else xp.where(move, v[:, 0], 1.0)
        # reflect the remaining columns and the right-hand side (in place: a view of W)
        tail = W[:, j:m, j + 1:]  # (B, m - j, n - j)
        coef = _seq_sum(v[:, :, None] * tail, -2) / v0[:, None]
        tail -= coef[:, None, :] * v[:, :, None]
        rdiag[:, j] = -ajnorm
        if j + 1 == n:
            break
        # downdate the remaining norms; recompute those that lost too many digits
        rest, refr = norms[:, j + 1:], ref[:, j + 1:]
        live = (rest != 0) if every else move[:, None] & (rest != 0)
        # (on the host, where every remaining norm is live, so is every reference norm: one
        # is zero only while its column's norm is; the selections would keep every value)
        all_live = host and bool(live.all())
        ratio = W[:, j, j + 1:n] / (rest if all_live else xp.where(live, rest, 1.0))
        lost = 1 - ratio * ratio
        down = rest * _sqrt(lost.clamp(min=0) if xp is torch else np.maximum(lost, 0.0))
        scaled = down / (refr if all_live else xp.where(refr != 0, refr, 1.0))
        stale = 0.05 * (scaled * scaled) <= eps  # (x * x is x ** 2 exactly)
        if not all_live:
            stale = live & stale
        kept = down if all_live else xp.where(live, down, rest)
        if xp is torch:
            full = _seq_norm(W[:, j + 1:m, j + 1:n], -2)
            norms[:, j + 1:] = xp.where(stale, full, kept)
            ref[:, j + 1:] = xp.where(stale, full, refr)
            continue
        # on the host, only the columns where some norm is recomputed (each column's
        # norm is its own running sum: the same bits)
        norms[:, j + 1:] = kept
        if not stale.any():
            continue
        some = np.flatnonzero(stale.any(0))
        full = _seq_norm(W[:, j + 1:m, j + 1 + some], -2)
        hit = stale[:, some]
        norms[:, j + 1 + some] = np.where(hit, full, kept[:, some])
        ref[:, j + 1 + some] = np.where(hit, full, refr[:, some])
    D = xp.zeros_like(W[:, :n, :n])
    D[:, cols, cols] = rdiag
    R = xp.triu(W[:, :n, :n], 1) + D
    if host:
        return R, perm.astype(np.int64), np.ascontiguousarray(W[:, :n, n])
    return R, perm.long(), W[:, :n, n].contiguous()


def _pivoted_qr_one(J: np.ndarray, f: np.ndarray) -> tuple[Any, Any, Any]:
    """:func:`pivoted_qr` of one problem on the host: ``J (m, n)``, ``f (m,)``; the same
    outputs with a batch axis of one, bit for bit.

    The batch's operations on one problem's values, in the same order (each
    column's sums sequential, the square roots torch's on arrays of the same
    lengths), with the per-problem decisions (pivot, zero column, live and
    stale norms) taken as Python values instead of masks, and each column of
    ``[J f]`` stored as a contiguous row of the work array ``C (n + 1, m)``: a
    stage then costs about a third of the batch's numpy operations (a pivot
    swaps two rows; a zero column, which the batch reflects by a zero vector,
    still does so, since ``0 * inf`` must stay NaN as there).
    """
    m, n = J.shape
    eps = np.finfo(J.dtype).eps
    C = np.empty((n + 1, m), dtype=J.dtype)  # work array: column k of [J f] is row k
    C[:n] = J.T
    C[n] = f
    # remaining column norms, their last full norms, and the variables (as in pivoted_qr)
    norms = _sqrt(np.ascontiguousarray((C[:n] * C[:n]).cumsum(1)[:, -1]))
    ref = norms.copy()
    perm = np.arange(n)
    rdiag = np.zeros(n, dtype=J.dtype)
    for j in range(n):
        k = j + int(np.argmax(norms[j:]))
        if k != j:  # (the batch's swap of two columns of its work array)
            at_j = C[j].copy()
            C[j] = C[k]
            C[k] = at_j
            norms[j], norms[k] = norms[k], norms[j]
            ref[j], ref[k] = ref[k], ref[j]
            perm[j], perm[k] = perm[k], perm[j]
        a = C[j, j:]
        ajnorm = _sqrt((a * a).cumsum()[-1:])  # (an array of one: torch's sqrt as the batch's)
        if a[0] < 0:
            ajnorm = -ajnorm
        norm = ajnorm[0]
        move = norm != 0
        if move:
            v = a / norm
            v[0] += 1
            v0 = v[0]
        else:  # (the batch's zero vector and unit divisor for a column left alone)
            v = np.zeros_like(a)
            v0 = 1.0
        tail = C[j + 1:, j:]  # the remaining columns and f, rows j .. m - 1 (a view)
        coef = (v * tail).cumsum(1)[:, -1] / v0  # (v first, as the batch: NaN payloads)
        tail -= coef[:, None] * v
        rdiag[j] = -norm
        if j + 1 == n:
            break
        rest, refr = norms[j + 1:], ref[j + 1:]
        live = (rest != 0) if move else np.zeros(rest.shape, dtype=bool)
        all_live = bool(live.all())
        ratio = C[j + 1:n, j] / (rest if all_live else np.where(live, rest, 1.0))
        lost = 1 - ratio * ratio
        down = rest * _sqrt(np.maximum(lost, 0.0))
        scaled = down / (refr if all_live else np.where(refr != 0, refr, 1.0))
        stale = 0.05 * (scaled * scaled) <= eps
        if not all_live:
            stale = live & stale
        norms[j + 1:] = down if all_live else np.where(live, down, rest)
        if not stale.any():
            continue
        some = j + 1 + np.flatnonzero(stale)
        rows = C[some, j + 1:]
        full = _sqrt(np.ascontiguousarray((rows * rows).cumsum(1)[:, -1]))
        norms[some] = full
        ref[some] = full
    D = np.zeros((n, n), dtype=J.dtype)
    D[np.arange(n), np.arange(n)] = rdiag
    R = np.triu(C[:n, :n].T, 1) + D
    return R[None], perm.astype(np.int64)[None], C[n, :n][None].copy()


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
    rows with non-finite factors are not selected either. On the CPU the test
    runs on the host (:mod:`.host_scalars`), which then knows the mask's count.
    """
    s = fac.s
    B = s.shape[0]
    if s.shape[-1] == 0 or (fac.gram is not None and count_true(fac.gram) == B):
        # no variables (nothing to pivot), or every row on the Gram route
        return remember(torch.zeros(B, dtype=torch.bool, device=s.device), 0)
    eps = _EPS.get(s.dtype) or torch.finfo(s.dtype).eps
    hs = host_scalars.scalars(s)
    sv, = hs.view(s)
    if hs.floats and fac.gram is None:  # one problem: a comparison of two numbers
        one = sv[0, -1] <= LM_RANK_FACTOR * eps * sv[0, 0]
        return remember(hs.tensors(one)[0], int(one))
    low = sv[:, -1] <= LM_RANK_FACTOR * eps * sv[:, 0]
    if fac.gram is not None:
        low = low & ~hs.view(fac.gram)[0]
    if not hs.host:
        return low
    return remember(hs.tensors(low)[0], int(np.count_nonzero(low)))


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
    # on the CPU the column loops run in numpy (the same operations, far cheaper on small
    # matrices); the square roots, the two sums and the SVD stay torch's
    host = host_scalars.scalars(J).host
    xp = np if host else torch
    Jx, fx, dx = (J.numpy(), f.numpy(), diag.numpy()) if host else (J, f, diag)
    with np.errstate(all="ignore"):  # (numpy: the infinities of a failed row are expected)
        R, perm, qtf = pivoted_qr(Jx, fx)
        zero = xp.diagonal(R, 0, -2, -1) == 0
        if host and not zero.any():  # (no zero pivot: the selections below keep every value)
            Rt, rhs, full = R, qtf, np.ones(B, dtype=bool)
        else:
            cut = xp.cumsum(zero, -1) > 0  # from the first zero diagonal on
            full = ~cut[:, -1]
            eye = (np.eye(n, dtype=R.dtype) if host
                   else torch.eye(n, dtype=R.dtype, device=R.device))
            Rt = xp.where(cut[:, :, None] | cut[:, None, :], eye, R)
            rhs = xp.where(cut, 0.0, qtf)
        w = _back_substitute(Rt, rhs)
        at = (np.arange(B) if host else torch.arange(B, device=R.device))[:, None], perm
        x = xp.zeros_like(w)
        x[at] = w
        p = -dx * x  # x[perm[j]] = w[j] above
        dxnorm = vnorm(torch.from_numpy(p) if host else p, dim=-1)
        dxnorm = dxnorm.numpy() if host else dxnorm
        safe = xp.where(dxnorm > 0, dxnorm, 1.0)
        wa = (dx * p / safe[:, None])[at]  # (entry j from variable perm[j])
        z = _back_substitute(Rt, wa, transpose=True)
        zz = z * z
        curv = (torch.from_numpy(zz) if host else zz).sum(-1)
        if host and B == 1:
            one = _basic_one(R, perm, qtf, p, curv, full, dx)
            if one is not None:
                return one
    if host:
        R, perm, qtf, p, full = (torch.from_numpy(a) for a in (R, perm, qtf, p, full))
    # SVD data of R P^T D^-1: column j of R scaled by 1 / diag[perm[j]], rows of V unpermuted
    s, Vr, uf = svd_direct(R / diag.gather(1, perm).unsqueeze(-2), qtf, None)
    V = torch.zeros_like(Vr).scatter(1, perm.unsqueeze(-1).expand_as(Vr), Vr)
    ok = (torch.isfinite(p).all(-1) & torch.isfinite(curv) & torch.isfinite(s).all(-1)
          & torch.isfinite(uf).all(-1))
    return (BasicStep(ok, torch.where(ok.unsqueeze(-1), p, 0.0), torch.where(ok, curv, 0.0),
                      full), Factors(s, V, uf))


def _basic_one(R: np.ndarray, perm: np.ndarray, qtf: np.ndarray, p: np.ndarray,
               curv: Tensor, full: np.ndarray,
               dx: np.ndarray) -> tuple[BasicStep, Factors] | None:
    """The end of :func:`basic_gauss_newton` for one float64 problem on the host, from its
    host arrays (each with a batch axis of one): the SVD of ``R P^T D^-1`` is torch's own
    LAPACK routine called on the host array (:mod:`.host_lapack`, the same bits as
    ``torch.linalg.svd``), ``U^T Q^T f`` is summed in the order of torch's small ``bmm``
    kernel (:func:`~.problem.host_transposed_rows`), and the scatter of ``V``'s rows and
    the finiteness tests are numpy's: the same values as the tensor operations, without
    their dispatch. None where that does not apply (another dtype, a larger ``R``, a
    non-finite entry, or LAPACK reporting a failure): the caller then takes the tensors'
    path, which isolates such a problem.
    """
    n = R.shape[-1]
    if R.dtype != np.float64 or not host_lapack.AVAILABLE or n * n > host_lapack.MAX_ENTRIES:
        return None
    # column j of R scaled by 1 / diag[perm[j]] (torch's division, elementwise)
    A = R[0] / dx[0][perm[0]]
    if not np.isfinite(A).all():
        return None
    out = host_lapack.svd(A)
    if out is None:
        return None
    U, s, Vh = out
    uf = host_transposed_rows(U, qtf[0])
    V = np.zeros((n, n))
    V[perm[0]] = Vh.T  # (row perm[j] of V is row j of R's V)
    curv_h = curv.numpy()
    ok = bool(np.isfinite(p).all() and np.isfinite(curv_h[0]) and np.isfinite(s).all()
              and np.isfinite(uf).all())
    if not ok:  # (a failed row: the tensors' path sets its values as ever)
        return None
    t = torch.from_numpy
    return (BasicStep(torch.ones(1, dtype=torch.bool), t(p), curv, t(full)),
            Factors(t(s[None]), t(V[None]), t(uf[None])))
