r"""Batched dense factorisations for the step computations, and the routing between them.

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
  eigen-decomposition on the CPU. On the host, a batch whose entries are all
  finite (one read of two sums) and whose every row is proven within the limit
  by :math:`\kappa_1 \le n^2 \max|H| \max|H^{-1}|` (one read) takes the
  route without computing :math:`\kappa_1` (the same rows, fewer passes);
  that proof is tried only on batches of at least ``WITHIN_MIN_ROWS`` rows
  (a few rows' tail computes :math:`\kappa_1` at once). A batch that the route
  rejects entirely takes its SVD data from its whole tensors, without selecting
  every row first. Each row's verdict is remembered (``Factors.rejected``): a
  row rejected once takes the direct SVD (scipy's own factorisation) for the
  rest of its run, without the test, whatever its neighbours do, so that its
  route, and its bits, depend on its own history alone (a batch cut into other
  chunks gives the same results); a batch whose every row was rejected skips
  the LU and the test (``cond1``, ``eigh``) at once.

A row whose Jacobian has not changed since its factors were made (a running
batch row whose last trial was rejected, when the loop rebuilds the models of
a batch most of whose rows are fresh and keeps the fresh rows' alone) is given
its factors (``known``): the direct SVD, the costly part of a batch's tail
(about 30 us a 12 x 12 triangle), skips it.

The trust-region subproblem solves built on these factors are in
:mod:`.trust_region`; MINPACK's pivoted QR for rank-deficient 'lm' steps is in
:mod:`.minpack_qr`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm

from .._blas_threads import GRAIN_SIZE, serial_blas
from . import csr, host_lapack, host_scalars
from .counts import count_true, known_count, known_finite, known_unit, mark_finite, remember
from .host_scalars import host_array, host_rows, remember_rows
from .problem import host_transposed_rows


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
    rejected : Tensor, shape (B,), bool, or None
        True where the Gram route's test rejected the problem at its last
        test (a factorisation that skipped the test keeps it True: see
        :func:`factorize`'s ``rejected``); None without the Gram route.
    """

    s: Tensor
    V: Tensor
    uf: Tensor
    H: Tensor | None = None
    Hinv: Tensor | None = None
    b: Tensor | None = None
    gram: Tensor | None = None
    rejected: Tensor | None = None


class KnownFactors(NamedTuple):
    """SVD data that :func:`factorize` need not compute again (its ``known``).

    Attributes
    ----------
    rows : numpy.ndarray, shape (B,), bool
        True where the row's factors are known: its ``J``, ``d``, ``f`` and
        ``diag`` are those its ``s``, ``V`` and ``uf`` below were made from.
    s, V, uf : Tensor
        :class:`Factors`' fields of every row of the batch (read on the known
        rows only).
    """

    rows: np.ndarray
    s: Tensor
    V: Tensor
    uf: Tensor


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
    with serial_lapack(H):
        Hinv, info = torch.linalg.inv_ex(H)
    return Hinv, _condition(H, Hinv, info)


def _condition(H: Tensor, Hinv: Tensor, info: Tensor) -> Tensor:
    """:func:`inverse_and_condition`'s ``cond1`` from ``H``, ``Hinv`` and LU's ``info``."""
    return torch.where(info == 0, _condition_product(H, Hinv), torch.inf)


def _condition_product(H: Tensor, Hinv: Tensor) -> Tensor:
    """``|H|_1 |H^{-1}|_1`` per matrix: :func:`_condition` before LU's ``info`` is applied."""
    return H.abs().sum(-2).amax(-1) * Hinv.abs().sum(-2).amax(-1)


def _all_within(H: Tensor, Hinv: Tensor, info: Tensor, limit: float) -> bool:
    r"""Whether every row's ``cond1`` (:func:`_condition`) is provably at most ``limit``,
    from the largest entries alone (one host read; False off the host, see
    :func:`_all_finite_on_host`).

    A column of :math:`n` entries sums to at most :math:`n` times the largest entry
    of the matrix, so :math:`\kappa_1 \le n^2 \max|H| \max|H^{-1}|`; the computed
    sums and product exceed the exact ones by a factor of at most :math:`(1 +
    \epsilon)^{2n}`, which the margin of 2 below covers. Where the test holds in
    every row (LU succeeded, nothing NaN), each row's computed ``cond1`` is at
    most ``limit``: the same Gram rows as computing it, without the column sums
    over the short middle axis (at 8,192 rows of 4 x 4: 0.27 ms for the test
    against 0.70 ms for ``cond1``, issue 14). A largest entry is exact
    whatever the order it is found in.
    """
    if not H.is_cpu or host_scalars.HOST is False:
        return False
    n = H.shape[-1]
    largest = H.abs().amax((-2, -1)) * Hinv.abs().amax((-2, -1))
    within = (largest <= limit / (2.0 * n * n)) & (info == 0)
    return count_true(within) == H.shape[0]


def factorize(
    J: Tensor, d: Tensor | None, f: Tensor, diag: Tensor | None = None,
    gram: Tensor | None = None, g: Tensor | None = None, use_gram: bool = False,
    rejected: Tensor | None = None, known: KnownFactors | None = None,
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
    rejected : Tensor, shape (B,), bool, optional
        The previous factorisation's :attr:`Factors.rejected` of these rows. A
        row rejected once keeps the direct SVD (scipy's own factorisation) for
        the rest of its run, without the test, whatever the other rows of the
        batch do: each problem's route, and so its arithmetic, depends on its
        own history alone (a batch cut into other chunks gives the same bits).
        A batch whose every row was rejected skips the LU and the test at once
        (a batch's ill-conditioned tail).
    known : KnownFactors, optional
        Rows (on the host) whose factors are known already: the direct SVD of
        the rows the Gram route rejects skips them, and they take the known
        ``s``, ``V`` and ``uf``. The other rows' values are those of a
        factorisation of every row (each row is factorised on its own).

    Returns
    -------
    Factors
    """
    B, m, n = J.shape
    if not (use_gram and m >= n):
        return Factors(*svd_factors(J, d, f, diag))
    if known_unit(d):  # (an x_scale of ones: products by 1 are exact, skip them)
        d = None
    Jt = J.transpose(-1, -2)
    H = torch.bmm(Jt, J) if gram is None else gram
    Atf = torch.bmm(Jt, f.unsqueeze(-1)).squeeze(-1) if g is None else g
    if d is not None:
        H = H * d.unsqueeze(-1) * d.unsqueeze(-2)
        Atf = Atf * d
    if diag is not None:
        H = H + torch.diag_embed(diag.clamp(min=0))
    n_sticky = None if rejected is None else _count_rejected(rejected)
    if n_sticky == B:
        # every row was rejected before: the direct SVD at once, as each row's own rule
        # says. ``H`` stands in for ``Hinv``, which no row reads (no Gram row).
        s, V, uf = _direct_svd_factors(J, d, f, diag, known)
        none = remember(torch.zeros(B, dtype=torch.bool, device=H.device), 0)
        return Factors(s, V, uf, H, H, Atf, none, rejected)
    if _all_finite_on_host(H, Atf):
        finite = None  # (every row: no mask, and no copy of H by torch.where)
    else:
        finite = torch.isfinite(H.sum((-2, -1)) + Atf.sum(-1))
        # keep the inversion away from non-finite rows
        H = torch.where(finite.view(-1, 1, 1), H, _eye(n, H.dtype, H.device))
    with serial_lapack(H):
        Hinv, info = torch.linalg.inv_ex(H)
    limit = gram_cond_limit(H.dtype)
    if finite is None and not n_sticky and B >= WITHIN_MIN_ROWS \
            and _all_within(H, Hinv, info, limit / n):
        # every row on the Gram route, proven without its condition number
        ok = remember(torch.ones(B, dtype=torch.bool, device=H.device), B)
        return Factors(mark_finite(H.new_zeros(B, n)), H.new_zeros(B, n, n), H.new_zeros(B, n),
                       H, Hinv, Atf, ok, remember(torch.zeros_like(ok), 0))
    # the routes as per-problem values of ``hs``: on the host (CPU) numpy's comparisons,
    # selections and counts, exact as torch's, without a dispatch or a read each
    hs = host_scalars.Scalars(info, floats=False)
    xp = hs.xp
    cond1 = xp.where(hs.get(info) == 0, hs.get(_condition_product(H, Hinv)), math.inf)
    ok = cond1 <= limit / n  # a NaN cond1 fails too
    fin = None if finite is None else hs.get(finite)
    if fin is not None:
        ok = fin & ok
    # (None: no row rejected before, or nothing remembered)
    sticky = None if rejected is None or n_sticky == 0 else hs.get(rejected)
    if sticky is not None:
        ok = ok & ~sticky
    n_ok = hs.count(ok)
    # (the count serves routes() too; the tensor remembers no host value: one problem's
    # rules read their own, as numpy scalars)
    ok_t = remember(torch.from_numpy(ok) if hs.host else ok, n_ok)
    rejected_t = remember(torch.from_numpy(~ok) if hs.host else ~ok, B - n_ok)
    if n_ok == B:
        return Factors(mark_finite(H.new_zeros(B, n)), H.new_zeros(B, n, n), H.new_zeros(B, n),
                       H, Hinv, Atf, ok_t, rejected_t)
    # beyond this, the eigen-decomposition of H cannot be trusted either: to the SVD (as
    # every row rejected before)
    eig_hopeless = ~(cond1 <= n * limit)
    if sticky is not None:
        eig_hopeless = eig_hopeless | sticky
    if n_ok == 0:  # (every row rejected, as in an ill-conditioned tail: no selection)
        return Factors(*_rejected_factors(H, Atf, J, d, f, diag, fin, eig_hopeless, hs, known),
                       H, Hinv, Atf, ok_t, rejected_t)
    rows = hs.indices(~ok)

    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.index_select(0, rows)

    eig_rows = (~eig_hopeless if fin is None else fin & ~eig_hopeless)[
        rows.numpy() if hs.host else rows]
    n_eig = hs.count(eig_rows)
    if n_eig:
        # (J, d, f and diag stay whole: only the rows eigh does not serve are picked)
        s_b, V_b, uf_b = _eig_factors(pick(H), pick(Atf), J, d, f, diag, eig_rows, rows, n_eig)
    else:  # (a batch's ill-conditioned tail: every rejected problem to the direct SVD)
        s_b, V_b, uf_b = _direct_svd_factors(J, d, f, diag, _known_of(known, rows), rows)
    s = mark_finite(H.new_zeros(B, n)).index_copy(0, rows, s_b)
    V = H.new_zeros(B, n, n).index_copy(0, rows, V_b)
    uf = H.new_zeros(B, n).index_copy(0, rows, uf_b)
    return Factors(s, V, uf, H, Hinv, Atf, ok_t, rejected_t)


def _rejected_factors(H: Tensor, Atf: Tensor, J: Tensor, d: Tensor | None, f: Tensor,
                      diag: Tensor | None, finite, eig_hopeless, hs: host_scalars.Scalars,
                      known: KnownFactors | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SVD data of every row of a batch that the Gram route rejected entirely.

    The rows :func:`factorize` would select are all of them, so each tensor is used
    whole instead of through ``index_select`` with ``0, 1, ..., B-1`` (the same
    values, one fewer copy each): a contiguous copy where a tensor is not contiguous
    (as the selection's copy is), and a fresh alias of ``J`` where it is, so that the
    SVD sees none of the marks the loop put on ``J`` (the selection's copy carries
    none: :func:`svd_factors` then tests the entries itself, as before). Rows of
    ``known`` skip the direct SVD (:func:`_direct_svd_factors`).
    """
    eig_rows = ~eig_hopeless if finite is None else finite & ~eig_hopeless
    n_eig = hs.count(eig_rows)
    if n_eig:
        return _eig_factors(_whole(H), _whole(Atf), J, d, f, diag, eig_rows, None, n_eig)
    return _direct_svd_factors(J, d, f, diag, known)


def _direct_svd_factors(J: Tensor, d: Tensor | None, f: Tensor, diag: Tensor | None,
                        known: KnownFactors | None = None,
                        rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SVD data of the rows ``rows`` of a batch, from the SVD of ``J diag(d)`` itself;
    with ``rows`` None every row, from the whole tensors (:func:`_whole`). The rows of
    ``known`` (indexed as the result's) take their known factors instead and only the
    others are selected (the same values: each matrix is factorised on its own)."""
    k = J.shape[0] if rows is None else rows.shape[0]
    if known is not None and known.rows.any() and known.s.shape == (k, J.shape[-1]):
        need = torch.from_numpy(np.flatnonzero(~known.rows)).to(J.device)
        if not need.numel():
            return known.s, known.V, known.uf
        s_b, V_b, uf_b = _direct_svd_factors(J, d, f, diag, None,
                                             need if rows is None else rows.index_select(0, need))
        s = known.s.index_copy(0, need, s_b)
        if known_finite(s_b) and known_finite(known.s):
            mark_finite(s)
        return s, known.V.index_copy(0, need, V_b), known.uf.index_copy(0, need, uf_b)
    if rows is not None:
        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, rows)

        A = pick(J) if d is None else pick(J) * pick(d).unsqueeze(-2)
        return svd_factors(A, None, pick(f), pick(diag), qr_first=True)
    A = _whole(J) if d is None else _whole(J) * _whole(d).unsqueeze(-2)
    return svd_factors(A, None, _whole(f), _whole(diag), qr_first=True)


def _known_of(known: KnownFactors | None, rows: Tensor) -> KnownFactors | None:
    """``known`` of the batch rows ``rows`` alone (None where none of them is known)."""
    if known is None:
        return None
    sub = known.rows[rows.numpy()]
    if not sub.any():
        return None
    return KnownFactors(sub, known.s.index_select(0, rows), known.V.index_select(0, rows),
                        known.uf.index_select(0, rows))


def _whole(t: Tensor | None) -> Tensor | None:
    """All of ``t``'s rows, for a factorisation of every row (:func:`_rejected_factors`): a
    contiguous copy where it is not contiguous (as a selection's copy is), a fresh alias
    where it is, so that the SVD sees none of the loop's marks on ``J`` and tests the
    entries itself."""
    if t is None:
        return None
    return t.view_as(t) if t.is_contiguous() else t.contiguous()


def _count_rejected(rejected: Tensor) -> int | None:
    """How many rows of ``rejected`` (a bool tensor) are True: its remembered count, or
    numpy's on the host; None off the host, where no count is read (the rows' own masks
    send them to the SVD all the same, one selection later)."""
    count = known_count(rejected)
    if count is not None:
        return count
    if not rejected.is_cpu or host_scalars.HOST is False:
        return None
    return int(np.count_nonzero(rejected.numpy()))


#: Fewest rows for which :func:`factorize` first tries :func:`_all_within` (which saves
#: the condition numbers when every row passes) before computing ``cond1``: below it,
#: the few rows of a batch's tail, the test costs about as many torch operations as
#: ``cond1`` itself (8 and 10, each with one host read), and an ill-conditioned tail
#: fails it round after round ('lm' on ``bench_tail.py``: 1,000 of 1,012 models).
#: Either way the same rows take the Gram route, with the same values. (A row rejected
#: before is not tested again at any batch size: :func:`factorize`'s ``rejected``.)
WITHIN_MIN_ROWS = 64


def _all_finite_on_host(H: Tensor, Atf: Tensor) -> bool:
    """Whether every entry of ``H (B, n, n)`` and ``A^T b (B, n)`` is finite, decided by one
    host read of their sums (finite only when every entry is; an overflowing sum says
    False), where the per-problem values live on the host (:mod:`.host_scalars`).

    On the CPU that read costs less than the per-row test it replaces (a sum per row,
    ``isfinite`` and the ``torch.where`` that keeps the inversion away from non-finite
    rows: about 0.35 ms of 4.3 ms per 'lm' model at 8,192 rows of 64 x 4, issue 14);
    elsewhere (a device, or its code run on the CPU, ``host_scalars.HOST = False``) it
    says False without reading, and the per-row test runs as ever.
    """
    if not H.is_cpu or host_scalars.HOST is False:
        return False
    return math.isfinite(float(H.sum()) + float(Atf.sum()))


@functools.lru_cache(maxsize=32)
def _eye(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.eye(n)``, made once per (n, dtype, device); never modified."""
    return torch.eye(n, dtype=dtype, device=device)


def serial_lapack(A: Tensor) -> contextlib.AbstractContextManager:
    """Run the block's batched factorisations of ``A (B, m, n)`` single-threaded.

    torch factorises a batch matrix by matrix (LAPACK's ``gesdd``, ``syevd``,
    ``getrf``); with more than one thread, MKL's threaded drivers start a
    parallel region inside each small factorisation, which costs far more than
    the work: on 2 cores, the SVDs of 10,000 matrices 64 x 4 took 2.7 s
    against 0.21 s single-threaded, 2,000 of 100 x 12 1.6 s against 0.24 s,
    30 inverses 12 x 12 0.5-1.3 ms against 0.2 ms on average (2 busy cores). So
    on the CPU, where this thread still has more than one thread and one
    matrix holds at most torch's grain size of entries, the block runs under
    :func:`~torchimize_scipy._blas_threads.serial_blas` (thread-local: other
    threads keep their counts). Elsewhere (one thread already, as for small
    runs, a large matrix, another device) it does nothing. MKL's sequential
    and threaded ``gesdd`` can differ in the last bits for some shapes (64 x 4
    does, 100 x 12 does not); the sequential one no longer depends on the
    thread count nor on how many problems a batch still holds.
    """
    m, n = A.shape[-2], A.shape[-1]
    if A.is_cpu and m * n <= GRAIN_SIZE and torch.get_num_threads() > 1:
        return serial_blas(A.device, m, n)
    return contextlib.nullcontext()


def svd_factors(J: Tensor, d: Tensor | None, f: Tensor, diag: Tensor | None = None,
                qr_first: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD data of the (optionally augmented) scaled Jacobian, per problem.

    Parameters are those of :func:`factorize`; ``qr_first``: a tall matrix
    (:data:`QR_FIRST_RATIO`) is factorised by :func:`qr_svd` (batches' SVD
    rows; single problems keep the SVD of the matrix itself, as scipy).
    Problems with non-finite entries get NaN factors without disturbing the
    others.

    Returns
    -------
    s : Tensor, shape (B, k)
        Singular values in decreasing order, ``k = n`` when augmented or
        ``m >= n``, else ``m``.
    V : Tensor, shape (B, n, k)
    uf : Tensor, shape (B, k)
    """
    A = J if d is None or known_unit(d) else J * d.unsqueeze(-2)
    if known_finite(A) or (A is not J and known_finite(J) and known_finite(d)):
        # (a caller marks d finite only where J d cannot overflow: 'lm' under x_scale='jac')
        # a Jacobian the loop proved finite (its J^T J is: loop._marked_finite), unscaled,
        # needs no test; its singular values are finite too (s_max^2 <= trace(J^T J)),
        # so the step rules need not test them either, unless LAPACK failed
        if diag is None:
            host = None if _takes_qr_first(A, qr_first) else one_host_svd(A, f, None)
            if host is not None:
                return mark_finite(host[0]), host[1], host[2]
            try:
                if _takes_qr_first(A, qr_first):
                    s, V, uf = qr_svd(A, f)
                    return mark_finite(s), V, uf
                U, s, Vh = thin_svd(A)
            except RuntimeError:  # (did not converge: svd_direct isolates the problem)
                return svd_direct(A, f, None)
            uf = torch.bmm(U.transpose(-1, -2), f.unsqueeze(-1)).squeeze(-1)
            return mark_finite(s), Vh.transpose(-1, -2), uf
        return svd_direct(A, f, diag, qr_first)
    known = host_rows(A) if A.shape[0] == 1 else None
    if known is not None and np.isfinite(known).all():  # (one problem's rows on the host)
        return svd_direct(A, f, diag, qr_first)
    if math.isfinite(float(A.detach().sum())):  # a finite sum: every entry is finite
        return svd_direct(A, f, diag, qr_first)
    ok = torch.isfinite(A).flatten(1).all(-1)
    # non-finite rows get NaN factors without disturbing the others
    zero = torch.zeros((), dtype=A.dtype, device=A.device)
    s, V, uf = svd_direct(torch.where(ok[:, None, None], A, zero),
                          torch.where(ok[:, None], f, zero),
                          None if diag is None else torch.where(ok[:, None], diag, zero),
                          qr_first)
    nan = torch.full((), float("nan"), dtype=A.dtype, device=A.device)
    return (torch.where(ok[:, None], s, nan), torch.where(ok[:, None, None], V, nan),
            torch.where(ok[:, None], uf, nan))


def svd_direct(A: Tensor, f: Tensor, diag: Tensor | None,
               qr_first: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of the (augmented) matrix itself, as scipy computes it (with ``qr_first``, a
    tall one through :func:`qr_svd`; where LAPACK fails there, the SVD of the matrix
    itself, which isolates the failing problem). The callers have proven ``A`` finite (one
    problem's goes to :func:`one_host_svd`)."""
    host = None if _takes_qr_first(A, qr_first) else one_host_svd(A, f, diag)
    if host is not None:
        return host
    rhs = f
    if diag is not None:
        A = torch.cat([A, torch.diag_embed(diag.clamp(min=0).sqrt())], dim=-2)
        rhs = torch.cat([rhs, torch.zeros_like(diag)], dim=-1)
    if _takes_qr_first(A, qr_first):
        with contextlib.suppress(RuntimeError):
            return qr_svd(A, rhs)
    try:
        U, s, Vh = thin_svd(A)
    except RuntimeError:  # LAPACK did not converge for some problem: isolate it
        U, s, Vh = _svd_rowwise(A)
    uf = torch.bmm(U.transpose(-1, -2), rhs.unsqueeze(-1)).squeeze(-1)
    return s, Vh.transpose(-1, -2), uf


def one_host_svd(A: Tensor, f: Tensor,
                 diag: Tensor | None) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`svd_direct`'s factors of one float64 problem on the CPU, from its host arrays.

    The same values as the tensor path, bit for bit: the matrix augmented by
    ``diag(sqrt(max(diag, 0)))`` (torch's ``clamp`` and ``sqrt``; its float64
    ``sqrt`` on the CPU is not numpy's in the last bit now and then), and
    :func:`host_svd_factors` of it. The factors remember their host rows
    (:func:`~.host_scalars.remember_rows`), which the trust-region solve
    reads. The finite ``A`` has been proven so by the
    caller. None where the path does not apply (a batch, another dtype or
    device, gradients recorded, more than :data:`~.host_lapack.MAX_ENTRIES`
    entries, a non-finite ``diag``, :data:`~.host_scalars.HOST` off) or LAPACK
    failed: the caller's tensor path then runs as before.
    """
    B, m, n = A.shape
    rows = m if diag is None else m + n
    if (B != 1 or not host_lapack.AVAILABLE or not 0 < rows * n <= host_lapack.MAX_ENTRIES
            or A.dtype != torch.float64 or not A.is_cpu or host_scalars.HOST is False
            or (A.requires_grad and torch.is_grad_enabled()) or f.requires_grad):
        return None
    a, f_h = host_array(A)[0], host_array(f)[0]
    if diag is not None:
        # (torch's own square roots: its float64 sqrt on the CPU is not correctly rounded
        # everywhere, and numpy's would differ from it in the last bit now and then)
        root = diag.clamp(min=0).sqrt().numpy()[0]
        if not np.isfinite(root).all():
            return None
        a = np.concatenate([a, np.diag(root)])
        f_h = np.concatenate([f_h, np.zeros(n)])
    return host_svd_factors(a, f_h)


def host_svd_factors(a: np.ndarray, f: np.ndarray) -> tuple[Tensor, Tensor, Tensor] | None:
    """``s (1, k)``, ``V (1, n, k)`` and ``U^T f (1, k)`` of one finite float64 host matrix
    ``a (m, n)`` with at most :data:`~.host_lapack.MAX_ENTRIES` entries, as CPU tensors
    remembering their host rows, with the values ``torch.linalg.svd`` and ``torch.bmm``
    give (:mod:`.host_lapack`'s ``gesdd``; ``U^T f`` summed in the order of torch's small
    ``bmm`` kernel, :func:`~.problem.host_transposed_rows`); None where LAPACK failed.
    Requires :data:`.host_lapack.AVAILABLE`."""
    out = host_lapack.svd(a)
    if out is None:  # (did not converge: the caller's tensor path isolates the problem)
        return None
    U_h, s_h, Vh_h = out
    n, k = a.shape[1], s_h.shape[0]
    s_h = s_h.reshape(1, k)
    # (V contiguous, as Scalars.rows gives it: numpy's products depend on the layout)
    V_h = np.ascontiguousarray(Vh_h.T).reshape(1, n, k)
    uf_h = np.ascontiguousarray(host_transposed_rows(U_h, f)).reshape(1, k)
    return (remember_rows(torch.from_numpy(s_h), s_h),
            remember_rows(torch.from_numpy(V_h), V_h),
            remember_rows(torch.from_numpy(uf_h), uf_h))


def thin_svd(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(A, full_matrices=False)`` of a batch ``A (B, m, k)``, each matrix
    factorised single-threaded (:func:`serial_lapack`).

    torch factorises a batch's matrices one after another in the calling
    thread. On the host, a batch of at least :data:`SPLIT_MIN_ROWS` small
    matrices (each at most torch's grain size of entries) holding more than
    the grain size in all is cut into row chunks that the calling thread
    shares with the helper threads of :mod:`~torchimize_scipy._engine.csr`
    (:class:`~.csr.CallsOnHelpers`: each thread claims the next chunk, so a
    helper that gets no core leaves its chunks to the caller instead of
    stalling it), one helper per intra-op thread the caller has less one,
    counted before a batch's tail held it at 1 (:func:`~.csr.lapack_helpers`).
    No OpenMP region is started, so no worker is left spinning beside them.
    Each matrix is still one sequential ``gesdd``, so the values are those of
    the whole batch's call, bit for bit. Raises ``RuntimeError`` when LAPACK did
    not converge for some matrix, as torch does.
    """
    B, m, n = A.shape
    helpers = _lapack_helpers(A)
    if not helpers:
        with serial_lapack(A):
            return torch.linalg.svd(A, full_matrices=False)
    k = min(m, n)
    U, s, Vh = A.new_empty(B, m, k), A.new_empty(B, k), A.new_empty(B, k, n)

    def chunk(lo: int, hi: int) -> None:
        with serial_lapack(A):  # (per thread: a helper's own counts too)
            torch.linalg.svd(A[lo:hi], full_matrices=False,
                             out=(U[lo:hi], s[lo:hi], Vh[lo:hi]))

    _on_helpers(B, chunk, helpers)
    return U, s, Vh


def _lapack_helpers(A: Tensor) -> int:
    """How many helper threads share the factorisations of the batch ``A (B, m, n)``
    (:func:`thin_svd`'s rule; 0: the calling thread factorises it in one call)."""
    B, m, n = A.shape
    return (csr.lapack_helpers() if A.is_cpu and B >= SPLIT_MIN_ROWS
            and m * n <= GRAIN_SIZE < B * m * n
            and not (A.requires_grad and torch.is_grad_enabled()) else 0)


def _on_helpers(B: int, chunk, helpers: int) -> None:
    """``chunk(lo, hi)`` over row chunks of ``0..B``, two per thread, shared by the
    calling thread and ``helpers`` helper threads (:class:`~.csr.CallsOnHelpers`); raises
    ``RuntimeError`` when LAPACK did not converge in some chunk, as torch does."""
    chunks = 2 * (helpers + 1)
    cuts = [B * i // chunks for i in range(chunks + 1)]
    failed: list[int] = []

    def guarded(lo: int, hi: int) -> None:
        try:
            chunk(lo, hi)
        except RuntimeError:
            failed.append(lo)

    csr.CallsOnHelpers([functools.partial(guarded, cuts[i], cuts[i + 1])
                        for i in range(chunks)], helpers).wait()
    if failed:
        raise RuntimeError("linalg.svd: the algorithm failed to converge for some matrix")


#: Smallest ``m / n`` for which a batch's SVD rows are factorised by :func:`qr_svd`
#: (``svd_factors``' ``qr_first``). Per row, one thread, 150 rows a call (RESULTS
#: §35): 100 x 12 47-53 us directly against 34 us QR first, 200 x 5 11-16 against
#: 9.5, 1000 x 3 19-49 against 9.4-12; 48 x 12 gains nothing (the 12 x 12 SVD is
#: most of it) and 24 x 12 loses. A call costs one LAPACK driver more, so a batch of
#: a few rows gains nothing (8 rows of 100 x 12: 0.90-0.93x).
QR_FIRST_RATIO = 4


def _takes_qr_first(A: Tensor, qr_first: bool) -> bool:
    """Whether :func:`svd_direct` factorises ``A (B, m, n)`` by :func:`qr_svd` (not for
    a matrix that records gradients: ``qr_svd`` writes into its outputs)."""
    return (qr_first and A.shape[-2] >= QR_FIRST_RATIO * A.shape[-1]
            and not (A.requires_grad and torch.is_grad_enabled()))


def qr_svd(A: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""SVD data of tall matrices ``A (B, m, n)``, ``m >= n``, from their QR factors.

    :math:`A = Q R` (LAPACK's ``geqrf``), then the SVD of the small triangle,
    :math:`R = U_R \Sigma V^\top`, so that :math:`A = (Q U_R) \Sigma V^\top`
    and :math:`U^\top b = U_R^\top (Q^\top b)_{1:n}`, where
    :math:`(Q^\top b)_{1:n}` is what the factorisation of ``[A b]`` leaves in
    its last column (the first ``n`` reflectors are those of ``A``; no
    ``ormqr`` call). The thin :math:`U` (``m x n``) is never formed, which is
    the part of a tall matrix's SVD that QR first saves (Golub and Van Loan,
    *Matrix Computations*, 4th ed., §8.6.3, the R-SVD). The singular values
    and vectors are those of ``A`` to rounding. Each matrix is factorised on
    its own (single-threaded, and shared with the helper threads as in
    :func:`thin_svd`), so a row's values do not depend on its batch. Raises
    ``RuntimeError`` where LAPACK failed.

    Returns
    -------
    s : Tensor, shape (B, n)
    V : Tensor, shape (B, n, n)
    uf : Tensor, shape (B, n)
        ``U^T rhs``.
    """
    B, m, n = A.shape
    U = A.new_empty(B, n, n)
    s = A.new_empty(B, n)
    Vh = A.new_empty(B, n, n)
    qtb = A.new_empty(B, n, 1)
    # rhs as one more column: the reflectors of the first n columns do not see it, and
    # it leaves them holding (Q^T rhs)_{1:n} in its first n entries
    Ab = torch.cat([A, rhs.unsqueeze(-1)], dim=-1)

    def chunk(lo: int, hi: int) -> None:
        with serial_lapack(A):
            qr = torch.geqrf(Ab[lo:hi])[0]
            qtb[lo:hi] = qr[:, :n, n:]
            torch.linalg.svd(qr[:, :n, :n].triu(), full_matrices=False,
                             out=(U[lo:hi], s[lo:hi], Vh[lo:hi]))

    helpers = _lapack_helpers(A)
    if helpers:
        _on_helpers(B, chunk, helpers)
    else:
        chunk(0, B)
    uf = torch.bmm(U.transpose(-1, -2), qtb).squeeze(-1)
    return s, Vh.transpose(-1, -2), uf


#: Fewest matrices for which :func:`thin_svd` shares a batch with the helper threads
#: (the batch must also hold more than torch's grain size of entries): below that the
#: hand-off costs about what it saves (2 idle cores, median of 200 calls: 100 x 12
#: matrices, 16 took 0.78 ms in one call and 0.76 ms shared, 32 1.31 and 1.18 ms, 150
#: 7.4 and 3.8 ms, 400 16.8 and 8.5 ms; 64 x 4, 64 took 0.38 and 0.56 ms, 128 1.12
#: and 0.83 ms, 512 5.0 and 3.1 ms; 8 of 400 x 12 0.67 and 0.74 ms).
SPLIT_MIN_ROWS = 32


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
    with serial_lapack(A):
        for i in range(B):
            try:
                U[i], s[i], Vh[i] = torch.linalg.svd(A[i], full_matrices=False)
            except RuntimeError:
                pass
    return U, s, Vh


def _eig_factors(H: Tensor, Atf: Tensor, J: Tensor, d: Tensor | None, f: Tensor,
                 diag: Tensor | None, finite, rows: Tensor | None = None,
                 n_finite: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """SVD data of the problems the Gram inverse does not serve.

    The eigen-decomposition of ``H = A^T A`` (``(R, n, n)``, with ``A^T b`` in
    ``Atf``) gives them when ``cond(A)**2 <= gram_cond_limit(dtype)``; problems
    beyond that, and those marked False in ``finite`` (non-finite ``H``, or a
    condition already known to be beyond the limit), are redone with the
    direct SVD of ``A``, which also handles rank deficiency as scipy does.
    ``J``, ``d``, ``f`` and ``diag`` are the whole batch's when ``rows`` (the
    batch rows of ``H``'s rows) is given, else ``H``'s rows; only the rows
    sent to the SVD are gathered from them. ``finite`` is a mask of per-problem
    values of :class:`~.host_scalars.Scalars` (a numpy array on the host, where the
    test of the eigenvalues is numpy's too: comparisons, exact either way), or a tensor;
    ``n_finite``: its count when known.
    """
    hs = host_scalars.Scalars(H, floats=False)
    xp = hs.xp
    if isinstance(finite, Tensor):
        finite = hs.get(finite)
    lam = torch.zeros_like(H[..., 0])
    V = torch.zeros_like(H)
    R = H.shape[0]
    if n_finite is None:
        n_finite = hs.count(finite)
    try:
        if n_finite == R:
            with serial_lapack(H):
                lam, V = torch.linalg.eigh(H)
        elif n_finite:  # the others go to the SVD
            sel = hs.indices(finite)
            with serial_lapack(H):
                lam_r, V_r = torch.linalg.eigh(H.index_select(0, sel))
            lam, V = lam.index_copy(0, sel, lam_r), V.index_copy(0, sel, V_r)
    except RuntimeError:  # send every problem through the (per-problem safe) SVD
        finite = xp.zeros_like(finite)
    lam = lam.flip(-1)
    V = V.flip(-1)
    ev = hs.rows(lam)
    bad = (~(ev[:, -1] > ev[:, 0] / gram_cond_limit(H.dtype)) | ~xp.isfinite(ev[:, 0])
           | ~finite)
    # (the square roots on the (R, n) rows as ever: torch's vectorised sqrt rounds
    # some entries differently from its scalar tail, so the layout stays)
    s = lam.clamp(min=0).sqrt()
    suf = torch.bmm(V.transpose(-1, -2), Atf.unsqueeze(-1)).squeeze(-1)
    uf = safe_div(suf, s)
    bad_rows = hs.indices(bad)
    if bad_rows.numel():
        src = bad_rows if rows is None else rows.index_select(0, bad_rows)
        A = J.index_select(0, src)
        if d is not None:
            A = A * d.index_select(0, src).unsqueeze(-2)
        s_b, V_b, uf_b = svd_factors(A, None, f.index_select(0, src),
                                     None if diag is None else diag.index_select(0, src),
                                     qr_first=True)
        s = s.index_copy(0, bad_rows, s_b)
        V = V.index_copy(0, bad_rows, V_b)
        uf = uf.index_copy(0, bad_rows, uf_b)
    return s, V, uf


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den`` is 0 (the numerators vanish there too).

    The quotients where ``den`` is 0 are computed and discarded (no gradient
    flows through the engine).
    """
    return torch.where(den != 0, num / den, 0.0)


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


def routes(fac: Factors) -> tuple[bool, bool]:
    """Whether any problem takes the Gram route, and whether any takes the SVD route."""
    if fac.gram is None:
        return False, True
    count = count_true(fac.gram)
    return count > 0, count < fac.gram.shape[0]


def mix_routes(fac: Factors, gram_value: Tensor | None, svd_value: Tensor | None) -> Tensor:
    """Gram rows from ``gram_value``, the others from ``svd_value`` (either may be None)."""
    if svd_value is None:
        return gram_value
    if gram_value is None:
        return svd_value
    mask = fac.gram.view(-1, *([1] * (svd_value.ndim - 1)))
    return torch.where(mask, gram_value, svd_value)


def gram_solve(fac: Factors, alpha: Tensor | None, keepdim: bool = False,
               with_q: bool = True) -> tuple[Tensor, Tensor | None]:
    """``p = -(H + alpha I)^{-1} b`` and ``q = p^T (H + alpha I)^{-1} p`` on Gram rows.

    ``alpha`` has shape ``(B,)`` or ``(B, 1)``; None means 0 (the stored
    inverse is used). ``q`` has shape ``(B, 1)`` with ``keepdim``, else
    ``(B,)``; None without ``with_q`` (for callers that take the step
    alone: two products and a sum fewer). Rows that do not take the Gram
    route get meaningless values.
    """
    if alpha is None:
        M = fac.Hinv
    else:
        column = alpha if alpha.ndim == 2 else alpha.unsqueeze(-1)
        # H + alpha I: alpha added to a copy's diagonal (the off-diagonal entries are
        # H's, as H + 0 gives them, up to the sign of a zero)
        H = fac.H.clone()
        H.diagonal(dim1=-2, dim2=-1).add_(column)
        with serial_lapack(H):
            M = torch.linalg.inv_ex(H)[0]
    p = -torch.bmm(M, fac.b.unsqueeze(-1))
    if not with_q:
        return p.squeeze(-1), None
    Mp = torch.bmm(M, p)
    q = (p * Mp).sum(-2) if keepdim else (p * Mp).sum((-2, -1))
    return p.squeeze(-1), q


def grad_norm(fac: Factors, route: tuple[bool, bool] | None = None,
              suf: Tensor | None = None, keepdim: bool = False) -> Tensor:
    """``|A^T b|`` per problem, ``(B,)`` (``(B, 1)`` with ``keepdim``).

    ``route`` (:func:`routes`) and ``suf = s * uf`` may be passed when known.
    """
    has_gram, has_svd = routes(fac) if route is None else route
    if has_svd and suf is None:
        suf = fac.s * fac.uf
    return mix_routes(fac, vnorm(fac.b, dim=-1, keepdim=keepdim) if has_gram else None,
                      vnorm(suf, dim=-1, keepdim=keepdim) if has_svd else None)


def gauss_newton_step(fac: Factors, rcond: float | None = None,
                      rank_limit: Tensor | None = None) -> Tensor:
    """Minimum-norm least-squares step ``-pinv(A) b``, ``(B, n)``.

    On SVD rows, singular values below ``rcond * s_max`` (default: the
    dtype's epsilon) are treated as zero, and so are those beyond
    ``rank_limit (B,)`` (the count of columns not zeroed, where the caller
    zeroed columns: their singular values are rounding noise, see
    :func:`~.trust_region.minimum_norm_step`); Gram rows have full rank and
    use ``H^{-1}``.
    """
    has_gram, has_svd = routes(fac)
    p_svd = None
    if has_svd:
        s, uf = fac.s, fac.uf
        if rcond is None:
            rcond = torch.finfo(s.dtype).eps
        keep = s > rcond * s[:, :1]
        if rank_limit is not None:
            index = torch.arange(s.shape[-1], device=s.device)
            keep = keep & (index < rank_limit.to(s.device).unsqueeze(-1))
        coef = torch.where(keep, safe_div(uf, s), 0.0)
        p_svd = -torch.bmm(fac.V, coef.unsqueeze(-1)).squeeze(-1)
    return mix_routes(fac, gram_solve(fac, None, with_q=False)[0] if has_gram else None,
                      p_svd)


#: The Gram rows whose Gauss-Newton step predicts a residual norm below this fraction of
#: the current one get :func:`refine_gauss_newton`'s correction.
REFINE_BELOW = 1e-2


def refine_gauss_newton(fac: Factors, p: Tensor, J: Tensor, d: Tensor | None,
                        f: Tensor, ff: Tensor | None = None) -> Tensor:
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
    a residual) are returned unchanged and cost nothing. ``ff``: ``(f * f).sum(-1)``
    when the caller has it (twice a linear cost: 'lm', ``steps.lm._squares_from_cost``).
    """
    if fac.gram is None or count_true(fac.gram) == 0:  # (no Gram row: nothing to refine)
        return p
    if ff is None:
        ff = (f * f).sum(-1)
    predicted = ff + (p * fac.b).sum(-1)  # |f + A p|^2 = |f|^2 + p.b when H p = -b
    pick = fac.gram & (predicted <= REFINE_BELOW**2 * ff)
    if not count_true(pick):
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
