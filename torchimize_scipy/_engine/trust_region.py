r"""Batched trust-region subproblems on the factors of :func:`.linalg.factorize`.

The radius-matching root finders follow J. J. Moré, "The Levenberg-Marquardt
algorithm: implementation and theory", Lecture Notes in Mathematics 630 (1978),
pp. 105-116: Newton's method on :math:`1/\lVert p(\alpha)\rVert - 1/\Delta`
safeguarded by the interval :math:`[\alpha_l, \alpha_u]`, with
:math:`\mathrm{d}\lVert p\rVert / \mathrm{d}\alpha = -p^\top (A^\top A +
\alpha I)^{-1} p / \lVert p\rVert` (from the SVD data, or from the inverse on
Gram rows). :func:`solve_trust_region_scipy` is the variant of scipy's 'trf'
(the step is put on the boundary), :func:`solve_trust_region_minpack` that of
MINPACK's ``lmpar`` ('lm'). Both keep their per-problem scalars on the host
when the factors are on the CPU (:mod:`.host_scalars`). 'lm''s takes the norms
and sums of a batch from torch on either path (bit for bit the same results);
one float64 problem on the host runs the whole iteration in numpy (norms,
sums, square roots and the product with ``V``: the same operations, rounded
as numpy rounds them, :func:`host_norm`); its lmpar is written out on
``numpy.float64`` scalars (:func:`_solve_minpack_one`: the same operations
and values as the general body, without a namespace call per scalar; the
general body on that problem cost 15-21 % more per Rosenbrock solve, issue
14). 'trf''s one float64 problem keeps the general body; with fewer than 8
singular values its radius terms are taken on Python floats by the same
helper (:func:`_radius_one`; the same values), and a radius kept as a host
value gives its ``alpha`` back as one (:meth:`~.host_scalars.Scalars.keep`).
On the CPU both Newton iterations continue on the rows that still
iterate once fewer than a quarter of the batch do (:func:`_newton_alpha`,
:func:`_lmpar_newton`; issue 16), bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm

from .host_scalars import Scalars, host_rows, scalars
from .linalg import (
    Factors,
    gauss_newton_step,
    gram_solve,
    mix_routes,
    routes,
)
from .minpack_qr import BasicStep
from .problem import host_matvec_rows


def radius_mismatch(fac: Factors, alpha: Tensor | None,
                    delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``|p(alpha)| - delta``, its derivative in alpha, and ``|p(alpha)|``, shape ``(B,)``.

    ``alpha=None`` means 0 for every problem. The tensor form of
    :func:`_radius_terms`.
    """
    sc = Scalars(delta, host=False)
    phi, dpos, p_norm = _radius_terms(sc, fac, _spectral(sc, fac),
                                      None if alpha is None else alpha.unsqueeze(-1),
                                      delta.unsqueeze(-1))
    return phi.squeeze(-1), -dpos.squeeze(-1), p_norm.squeeze(-1)


def damped_step(fac: Factors, alpha: Tensor | None) -> Tensor:
    """``p(alpha) = -(A^T A + alpha I)^+ A^T b`` (zero singular values dropped).

    ``alpha``: ``(B,)``, or None for 0.
    """
    sc = Scalars(fac.s, host=False)
    alpha_c = (torch.zeros_like(fac.s[..., :1]) if alpha is None else alpha.unsqueeze(-1))
    return _damped_step_column(sc, fac, _spectral(sc, fac), alpha_c)


def _restart(lower: Tensor, upper: Tensor) -> Tensor:
    """Moré's restart point inside ``[lower, upper]``."""
    return torch.maximum(0.001 * upper, (lower * upper).sqrt())


class _Spectral(NamedTuple):
    """What every damped solve of one subproblem shares, where ``Scalars`` keeps it.

    ``route``: :func:`~.linalg.routes` (any Gram rows, any SVD rows);
    ``s, suf, s2, suf2`` are rows (``s``, ``s * uf`` and the squares; the last
    three None without SVD rows); ``gram`` the Gram rows as columns where both
    routes are taken (None otherwise); ``gram_rows`` those rows' damped-solve
    data (:class:`_GramRows`) where both routes are taken on the host.
    """

    route: tuple[bool, bool]
    s: Any
    suf: Any
    s2: Any
    suf2: Any
    gram: Any
    gram_rows: _GramRows | None = None
    #: one float64 problem on the host with the SVD route (:attr:`Scalars.floats`) and
    #: fewer than :data:`_FOLD` singular values: a list that the first
    #: :func:`_radius_terms` fills with the rows ``s**2``, ``s uf`` and ``(s uf)**2``
    #: as lists of Python floats, for :func:`_radius_one` (the same values as the
    #: arrays' operations, without a numpy call per operation: 10 % of a Rosenbrock
    #: 'trf' subproblem; on longer rows the arrays are the cheaper); ``suf2`` is then
    #: None (a Gauss-Newton step inside the region needs none of them)
    floats: list | None = None


class _GramRows(NamedTuple):
    """The Gram rows of a batch that takes both routes, as a batch of their own.

    A damped solve ``(H + alpha I)^{-1}`` costs an ``n x n`` inverse per row;
    on the rows of the SVD route its values are thrown away (on a batch's
    ill-conditioned tail about half the rows). With these the solves run on
    the Gram rows alone: every row's inverse and products are the same
    per-matrix operations (single-threaded, :func:`~.linalg.serial_lapack`),
    so the values are bit for bit those of the whole batch. Host only (the
    indices are read from the host columns; on a device the selection would
    cost a synchronisation).
    """

    rows: np.ndarray  # indices of the Gram rows (may be empty)
    index: Tensor  # the same as a tensor
    fac: Factors  # their ``H`` and ``A^T b``
    sc: Scalars


def _gram_rows(sc: Scalars, fac: Factors, gram: Any) -> _GramRows | None:
    """:class:`_GramRows` of the columns ``gram`` on the host where some rows take the SVD.

    None where every row is a Gram row or the values live on a device.
    """
    if not sc.host or gram is None or fac.H is None:
        return None
    rows = np.flatnonzero(gram)
    if rows.size == sc.B:
        return None
    index = torch.from_numpy(rows)
    b = fac.b.index_select(0, index)
    sub = Factors(fac.s, None, None, fac.H.index_select(0, index), None, b, None)
    return _GramRows(rows, index, sub, Scalars(b, host=True, floats=False))


def _spectral(sc: Scalars, fac: Factors) -> _Spectral:
    route = routes(fac)
    has_gram, has_svd = route
    s = sc.rows(fac.s)
    suf = s2 = suf2 = floats = None
    if has_svd:
        suf = s * sc.rows(fac.uf)
        s2 = s * s
        if sc.floats and not has_gram and s.shape[-1] < _FOLD:  # (longer rows: numpy's)
            floats = []  # (filled when needed, _radius_terms)
        else:
            suf2 = suf * suf
    gram = sc.get_col(fac.gram) if has_gram and has_svd else None
    return _Spectral(route, s, suf, s2, suf2, gram, _gram_rows(sc, fac, gram), floats)


def _mix(sc: Scalars, sp: _Spectral, gram_value: Any, svd_value: Any) -> Any:
    """:func:`~.linalg.mix_routes` for columns."""
    if svd_value is None:
        return gram_value
    if gram_value is None:
        return svd_value
    return sc.xp.where(sp.gram, gram_value, svd_value)


def _radius_terms(sc: Scalars, fac: Factors, sp: _Spectral, alpha: Any, delta: Any,
                  coef0: Any = None, exact: bool = False,
                  positive: bool = False) -> tuple[Any, Any, Any]:
    """``phi = |p(alpha)| - delta``, ``-dphi/dalpha`` and ``|p|`` as columns kept by ``sc``.

    ``alpha`` and ``delta`` are columns ``(B, 1)`` (``alpha=None``: 0);
    ``coef0``, when given, is ``s * uf / s**2`` (0 where ``s = 0``) of the
    undamped step. The derivative is returned with its sign flipped (it is
    never positive): the Newton updates divide by it, and a flipped divisor
    saves the negations (``-a / b == a / -b`` exactly). ``exact``: every
    norm and sum of a batch is torch's reduction ('lm', whose host and
    tensor paths agree bit for bit on batches; one problem takes numpy's,
    :func:`host_norm`). ``positive``: the caller knows every ``alpha > 0``
    (:func:`_all_positive`), so no denominator ``s**2 + alpha`` is zero and
    the guards are dropped (the same values).
    """
    rows = sp.floats
    if rows is not None:  # one problem's SVD rows as Python floats: the same values
        if not rows:
            suf = sp.suf[0].tolist()
            rows.extend((sp.s2[0].tolist(), suf, [b * b for b in suf]))
        return _radius_one(*rows, alpha, delta)
    xp = sc.xp
    has_gram, has_svd = sp.route
    pn_s = dpos_s = pn_g = dpos_g = None
    if has_svd:
        # (with alpha = 0, s * s + 0 is s * s exactly; torch's denom**3 is one
        # operation computing denom * denom * denom, numpy's calls pow)
        denom = sp.s2 if alpha is None else sp.s2 + alpha
        nonzero = None if positive else denom != 0
        if coef0 is not None:
            coef = coef0
        else:
            coef = sp.suf / denom if positive else xp.where(nonzero, sp.suf / denom, 0.0)
        pn_s = _torch_row_norm(sc, coef) if exact else sc.row_norm(coef, keepdim=True)
        cube = denom**3 if xp is torch else denom * denom * denom
        terms = sp.suf2 / cube if positive else xp.where(nonzero, sp.suf2 / cube, 0.0)
        if denom.dtype == torch.float32 or denom.dtype == np.float32:
            # float32's denom**3 underflows to 0 below denom ~ 1e-15 (alpha shrinking to
            # a zero singular value: 0 / 0 = NaN would stop the row); there the same
            # term as (suf / denom)**2 / denom. float64 would need denom < 1e-103.
            under = (cube == 0) & (denom != 0)
            terms = xp.where(under, coef * coef / xp.where(under, denom, 1.0), terms)
        total = _torch_row_sum(sc, terms) if exact else sc.row_sum(terms, keepdim=True)
        dpos_s = total / xp.where(pn_s > 0, pn_s, 1.0)
    gr = sp.gram_rows
    if has_gram and gr is not None and alpha is not None:
        # the Gram rows alone (the values of the others are not taken)
        if gr.rows.size:
            p, q = gram_solve(gr.fac, gr.sc.tensor_rows(alpha[gr.rows]), keepdim=True)
            pn_r = gr.sc.norm(p, keepdim=True)
            pn_g = np.zeros((sc.B, 1), dtype=pn_r.dtype)
            q_g = np.zeros((sc.B, 1), dtype=pn_r.dtype)
            pn_g[gr.rows] = pn_r
            q_g[gr.rows] = gr.sc.get(q)
            dpos_g = q_g / xp.where(pn_g > 0, pn_g, 1.0)
    elif has_gram:
        p, q = gram_solve(fac, None if alpha is None else sc.tensor_rows(alpha), keepdim=True)
        pn_g = sc.norm(p, keepdim=True)
        dpos_g = sc.get(q) / xp.where(pn_g > 0, pn_g, 1.0)
    p_norm = _mix(sc, sp, pn_g, pn_s)
    return p_norm - delta, _mix(sc, sp, dpos_g, dpos_s), p_norm


def _v_times(sc: Scalars, fac: Factors, coef: Any) -> Tensor:
    """``V coef`` for rows ``coef`` ``(B, k)`` kept by ``sc``: a new ``(B, n)`` tensor.

    Host rows enter the product as a view (no ``unsqueeze`` of a tensor of
    their own); the product is squeezed in place. A step is ``-V coef``:
    callers that only take its norm, or scale it, fold the sign into the
    scale instead of negating the rows (``(-a) b`` and ``a (-b)`` are the
    same numbers, signed zeros included).
    """
    if sc.floats:  # one problem: summed on the host in bmm's order (the same values)
        V = host_rows(fac.V)
        Vc = None if V is None else host_matvec_rows(V, coef)
        if Vc is not None:
            return sc.tensor_rows(Vc)
    col = torch.from_numpy(coef[..., None]) if sc.host else coef.unsqueeze(-1)
    return torch.bmm(fac.V, col).squeeze_(-1)


def _minus_v_times(sc: Scalars, fac: Factors, coef: Any) -> Tensor:
    """``-V coef`` (:func:`_v_times`, negated in place)."""
    return _v_times(sc, fac, coef).neg_()


def _all_positive(sc: Scalars, alpha: Any) -> bool:
    """Whether every entry of the columns ``alpha`` is known to be positive.

    Only on the host, where the count costs no read of a device (False
    elsewhere: the callers then keep their guards, which change nothing).
    """
    return sc.host and sc.count(alpha > 0) == sc.B


def _damped_coef(sc: Scalars, sp: _Spectral, alpha: Any) -> Any:
    """Rows ``s uf / (s**2 + alpha)`` (0 where the denominator is), for columns ``alpha``."""
    denom = sp.s2 + alpha
    # (s**2 >= 0: with every alpha > 0 no denominator is zero)
    if _all_positive(sc, alpha):
        return sp.suf / denom
    return sc.xp.where(denom != 0, sp.suf / denom, 0.0)


def _damped_step_column(sc: Scalars, fac: Factors, sp: _Spectral, alpha: Any) -> Tensor:
    """:func:`damped_step` for columns ``alpha`` ``(B, 1)`` kept by ``sc``."""
    has_gram, has_svd = sp.route
    p_svd = None
    if has_svd:
        p_svd = _minus_v_times(sc, fac, _damped_coef(sc, sp, alpha))
    gr = sp.gram_rows
    if has_gram and gr is not None:  # the Gram rows alone, into the new SVD steps
        if not gr.rows.size:
            return p_svd
        p_r = gram_solve(gr.fac, gr.sc.tensor_rows(alpha[gr.rows]), with_q=False)[0]
        return p_svd.index_copy_(0, gr.index, p_r)
    p_gram = gram_solve(fac, sc.tensor_rows(alpha), with_q=False)[0] if has_gram else None
    return mix_routes(fac, p_gram, p_svd)


#: machine epsilon of the float dtypes (``torch.finfo`` costs a call each time)
_EPS = {dt: torch.finfo(dt).eps for dt in (torch.float64, torch.float32)}
#: smallest positive normal number of the float dtypes (MINPACK's ``dwarf``)
_TINY = {dt: torch.finfo(dt).tiny for dt in (torch.float64, torch.float32)}


def _full_rank_columns(sc: Scalars, fac: Factors, sp: _Spectral, m: int, n: int) -> Any:
    """:func:`~.linalg.full_rank_mask` as columns."""
    if m < n or fac.s.shape[-1] < n:
        gram = fac.gram
        return sc.get_col(torch.zeros(sc.B, dtype=torch.bool, device=sc.device)
                          if gram is None else gram)
    eps = _EPS.get(fac.s.dtype) or torch.finfo(fac.s.dtype).eps
    svd_rank = sc.column(sp.s, -1) > eps * m * sc.column(sp.s, 0)
    if fac.gram is None:
        return svd_rank
    return svd_rank | (sc.get_col(fac.gram) if sp.gram is None else sp.gram)


def _restart_xp(xp: Any, lower: Any, upper: Any) -> Any:
    """:func:`_restart` in the namespace ``xp``."""
    return xp.maximum(0.001 * upper, xp.sqrt(lower * upper))


def solve_trust_region_scipy(
    fac: Factors, delta: Tensor, alpha0: Tensor, m: int, n: int,
    rtol: float = 0.01, max_iter: int = 10, host: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Trust-region subproblem ``min |A p + b|, |p| <= delta`` as in scipy's 'trf'.

    The Gauss-Newton step is returned (with ``alpha = 0``) when the matrix has
    full rank and the step fits; otherwise ``alpha`` is found by Moré's
    safeguarded Newton iteration to ``|p| = delta (1 +- rtol)`` and the step is
    rescaled onto the boundary.

    The Newton iteration works on the singular values, ``U^T b`` and a few
    scalars per problem (as ``(B, 1)`` columns, which broadcast against the
    ``(B, k)`` spectral data). With the factors on the CPU these live on the
    host (:class:`~.host_scalars.Scalars`: numpy arrays, or ``numpy.float64``
    for one float64 problem), where the host knows at no cost which problems
    still iterate; only the products with ``V``, the Gram solves and the row
    norms are torch operations. On other devices the same code runs on
    tensors and the host reads one count before the iteration (how many
    steps fit) and one per iteration (how many problems still iterate).
    While every problem iterates, its updates need no masking. On the host,
    where such counts are free, the restart point is computed only when a
    problem needs it and the quotients ``s uf / (s**2 + alpha)`` drop their
    guards when every ``alpha > 0``; with the SVD route alone the steps are
    kept as ``V coef`` and the sign goes into the final scale. These change
    no value, only the number of operations (issue 14). ``host``
    overrides the choice (for the tests).

    Returns
    -------
    p : Tensor, shape (B, n)
    alpha : Tensor, shape (B,)
        A ``numpy.float64`` where ``delta`` is one problem's host value (the host
        values 'trf' keeps in its state, :meth:`~.host_scalars.Scalars.keep`).
    """
    # (one problem's radius may be a host value, Scalars.keep: the factors tell the batch)
    sc = scalars(delta if isinstance(delta, Tensor) else fac.s, host=host)
    with sc.quiet():
        return _solve_scipy(sc, fac, delta, alpha0, m, n, rtol, max_iter)


def _solve_scipy(sc: Scalars, fac: Factors, delta: Tensor, alpha0: Tensor, m: int, n: int,
                 rtol: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """The body of :func:`solve_trust_region_scipy`."""
    xp = sc.xp
    B = sc.B
    sp = _spectral(sc, fac)
    has_gram, has_svd = sp.route
    full_rank = _full_rank_columns(sc, fac, sp, m, n)
    # With the SVD route alone (one problem, or a batch without Gram rows) the
    # steps are kept as V coef, their negatives, until they are returned: the
    # norms do not see the sign, and the final scale takes it (one negation
    # fewer per step).
    svd_only = not has_gram
    coef0 = q_svd = None
    if has_svd:
        if sp.floats is not None:  # one problem's rows: the quotients on Python floats
            coef0 = np.array([[a / b if b != 0 else 0.0 for a, b in
                               zip(sp.suf[0].tolist(), sp.s2[0].tolist(), strict=True)]])
        else:
            coef0 = xp.where(sp.s2 != 0, sp.suf / sp.s2, 0.0)
        q_svd = _v_times(sc, fac, coef0)
    if svd_only:
        p_gn = q_svd  # (the Gauss-Newton step negated)
    else:
        p_gn = mix_routes(fac, gram_solve(fac, None, with_q=False)[0],
                          None if q_svd is None else q_svd.neg_())
    delta_c = sc.get_col(delta)
    inside = full_rank & (sc.norm(p_gn, keepdim=True) <= delta_c)
    n_inside = sc.count(inside)
    if n_inside == B:
        # (on the host a tensor of zeros remembering them, no dispatch)
        zero = _alpha_out(sc, delta, sc.full(0.0)) if sc.host else torch.zeros_like(delta)
        return (p_gn.neg_() if svd_only else p_gn), zero

    gnorm = _mix(sc, sp, sc.norm(fac.b, keepdim=True) if has_gram else None,
                 sc.row_norm(sp.suf, keepdim=True) if has_svd else None)
    upper = gnorm / delta_c
    phi0, dpos0, _ = _radius_terms(sc, fac, sp, None, delta_c, coef0)
    # -phi0 / dphi0 (phi0 itself where the derivative vanishes)
    lower = xp.where(full_rank, phi0 / xp.where(dpos0 != 0, dpos0, -1.0), 0.0)
    alpha = sc.get_col(alpha0)
    # (for booleans ``a > b`` is ``a & ~b``)
    restart = (alpha == 0) > full_rank
    if not sc.host or sc.count(restart):  # (on the host the count is free)
        alpha = xp.where(restart, _restart_xp(xp, lower, upper), alpha)
    running = inside == 0  # not inside (``~`` of a Python bool would not do)
    n_running = B - n_inside
    tol = rtol * delta_c
    if n_inside and n_running < RESTRICT_BELOW * B and sc.device.type == "cpu":
        # only the problems whose step leaves the trust region need alpha: their rows alone
        rows, pick, sub_sc, sub_fac, sub_sp = _gather_rows(sc, fac, sp, running, True)
        delta_r = pick(delta_c)
        alpha_r = _newton_alpha(sub_sc, sub_fac, sub_sp, pick(alpha), pick(lower), pick(upper),
                                delta_r, pick(tol), pick(running), n_running, max_iter)
        p_r = _boundary_step(sub_sc, sub_fac, sub_sp, svd_only, alpha_r, delta_r)
        p = (p_gn.neg_() if svd_only else p_gn).index_copy(0, _torch_rows(rows), p_r)
        return p, _alpha_out(sc, delta, _scatter_rows(sc, rows, xp.where(inside, 0.0, alpha),
                                                     alpha_r))
    alpha = _newton_alpha(sc, fac, sp, alpha, lower, upper, delta_c, tol, running, n_running,
                          max_iter)
    p = _boundary_step(sc, fac, sp, svd_only, alpha, delta_c)
    if n_inside:
        p = torch.where(sc.tensor(inside).unsqueeze(-1), p_gn.neg_() if svd_only else p_gn, p)
        alpha = xp.where(inside, 0.0, alpha)
    return p, _alpha_out(sc, delta, alpha)


def _alpha_out(sc: Scalars, delta: Any, alpha: Any) -> Any:
    """:func:`_solve_scipy`'s ``alpha`` in the form of the caller's ``delta``: a host value
    (:meth:`~.host_scalars.Scalars.keep`) for a radius held as one, else a tensor."""
    return sc.tensor(alpha) if isinstance(delta, Tensor) else sc.keep(alpha)[0]


def _boundary_step(sc: Scalars, fac: Factors, sp: _Spectral, svd_only: bool, alpha: Any,
                   delta_c: Any) -> Tensor:
    """The damped steps ``p(alpha)`` rescaled onto the trust-region boundary ``|p| = delta``.

    ``svd_only``: the route of :func:`_solve_scipy`'s batch had no Gram row;
    the steps are then kept as ``V coef`` and the sign goes into the scale.
    """
    xp = sc.xp
    if svd_only:  # V coef, scaled by -delta / |p|
        p = _v_times(sc, fac, _damped_coef(sc, sp, alpha))
        pn = sc.norm(p, keepdim=True)
        return sc.scale_rows(p, -(delta_c / xp.where(pn > 0, pn, 1.0)))
    p = _damped_step_column(sc, fac, sp, alpha)
    pn = sc.norm(p, keepdim=True)
    return sc.scale_rows(p, delta_c / xp.where(pn > 0, pn, 1.0))


#: :func:`_solve_scipy` works on the rows that still need ``alpha`` alone once fewer
#: than this fraction of the batch do (:func:`_newton_alpha`).
RESTRICT_BELOW = 0.25


def _newton_alpha(sc: Scalars, fac: Factors, sp: _Spectral, alpha: Any, lower: Any,
                  upper: Any, delta_c: Any, tol: Any, running: Any, n_running: int,
                  max_iter: int) -> Any:
    """Moré's safeguarded Newton iteration of :func:`_solve_scipy`; the new ``alpha`` columns.

    The problems marked in ``running`` iterate (the others keep their
    ``alpha``) until ``|phi| < tol`` or ``max_iter`` iterations. Once fewer
    than :data:`RESTRICT_BELOW` of the batch still run, the iteration goes on
    with their rows alone (their factors, spectral rows and columns gathered,
    the result scattered back): after the first iteration typically about 1 %
    of a large batch still iterates (issue 16), and the damped solves of the
    others (an ``n x n`` inverse per Gram row) would be computed and thrown
    away. Every row's arithmetic is the same either way (elementwise
    operations, per-row reductions and per-matrix inverses), so the results
    are bit for bit those of the whole batch. CPU only: on a GPU the wasted
    rows run in parallel, and the selection of the rows (``nonzero``) would
    cost a synchronisation.
    """
    xp = sc.xp
    B = sc.B
    for k in range(max_iter):
        out = (alpha < lower) | (alpha > upper)
        alpha_it = alpha
        if not sc.host or sc.count(out):
            alpha_it = xp.where(out, _restart_xp(xp, lower, upper), alpha)
        phi, dpos, _ = _radius_terms(sc, fac, sp, alpha_it, delta_c,
                                     positive=_all_positive(sc, alpha_it))
        upper_it = xp.where(phi < 0, alpha_it, upper)
        neg_ratio = phi / xp.where(dpos != 0, dpos, -1.0)  # -phi / dphi
        lower_it = xp.maximum(lower, alpha_it + neg_ratio)
        alpha_next = alpha_it + (phi + delta_c) * neg_ratio / delta_c
        if n_running == B:
            alpha, lower, upper = alpha_next, lower_it, upper_it
        else:
            alpha = xp.where(running, alpha_next, alpha)
            lower = xp.where(running, lower_it, lower)
            upper = xp.where(running, upper_it, upper)
        running = running > (abs(phi) < tol)  # running and not converged
        n_running = sc.count(running)
        if not n_running:
            break
        if n_running < RESTRICT_BELOW * B and k + 1 < max_iter and sc.device.type == "cpu":
            rows, pick, sub_sc, sub_fac, sub_sp = _gather_rows(sc, fac, sp, running, False)
            alpha_r = _newton_alpha(sub_sc, sub_fac, sub_sp, pick(alpha), pick(lower),
                                    pick(upper), pick(delta_c), pick(tol), pick(running),
                                    n_running, max_iter - k - 1)
            return _scatter_rows(sc, rows, alpha, alpha_r)
    return alpha


def _gather_rows(sc: Scalars, fac: Factors, sp: _Spectral, mask: Any,
                 steps: bool) -> tuple[Any, Any, Scalars, Factors, _Spectral]:
    """The problems marked in the columns ``mask`` as a batch of their own.

    Returns their indices (a numpy array on the host, else a ``long``
    tensor; :func:`_torch_rows` makes either a tensor), a function picking
    their entries of columns or rows kept by ``sc``, and their ``Scalars``,
    factors and spectral data. The factors hold what the iteration reads
    (the Gram rows' ``H`` and ``A^T b``; ``V`` only with ``steps``, for the
    final damped steps); the routes stay the whole batch's (a route without
    rows of its own among them only computes values no row takes).
    """
    if sc.host:
        rows = np.flatnonzero(mask)
        index = torch.from_numpy(rows)

        def pick(a: Any) -> Any:
            return None if a is None else a[rows]
    else:
        rows = index = mask.reshape(-1).nonzero().squeeze(-1)

        def pick(a: Any) -> Any:
            return None if a is None else a.index_select(0, rows)

    def pick_t(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.index_select(0, index)

    s = pick_t(fac.s)
    sub_fac = Factors(s, pick_t(fac.V) if steps else None, None, pick_t(fac.H), None,
                      pick_t(fac.b), pick_t(fac.gram))
    # (arrays, never numpy scalars: the batch code, whatever the number of rows)
    sub_sc = Scalars(s, host=sc.host, floats=False)
    gram = pick(sp.gram)
    sub_sp = _Spectral(sp.route, pick(sp.s), pick(sp.suf), pick(sp.s2), pick(sp.suf2),
                       gram, _gram_rows(sub_sc, sub_fac, gram))
    return rows, pick, sub_sc, sub_fac, sub_sp


def _torch_rows(rows: Any) -> Tensor:
    """:func:`_gather_rows`' indices as a tensor."""
    return torch.from_numpy(rows) if isinstance(rows, np.ndarray) else rows


def _scatter_rows(sc: Scalars, rows: Any, base: Any, values: Any) -> Any:
    """``base`` (columns kept by ``sc``) with its entries at ``rows`` replaced by ``values``."""
    if sc.host:
        out = base.copy()
        out[rows] = values
        return out
    return base.index_copy(0, rows, values)


def minimum_norm_step(fac: Factors, host: bool | None = None, quiet: bool = True,
                      rcond: float | None = None, torch_product: bool = False,
                      rank_limit: Tensor | None = None) -> Tensor:
    """:func:`~.linalg.gauss_newton_step`, its spectral work on the host.

    With the factors on the CPU the cut-off of the singular values (below
    ``rcond`` times the largest; default the dtype's epsilon, as
    :func:`~.linalg.gauss_newton_step`) and the quotients ``uf / s`` are
    taken on the host rows that the subproblem then reuses
    (:meth:`~.host_scalars.Scalars.rows`); the product with ``V`` is torch's
    for a batch (the same values as :func:`~.linalg.gauss_newton_step`: the
    same elementwise operations) and numpy's for one float64 problem
    (:func:`host_norm`), unless ``torch_product`` ('dogbox': torch's, so the
    values of :func:`~.linalg.gauss_newton_step` bit for bit, 11 torch
    operations to 4). ``host`` as for :class:`~.host_scalars.Scalars`;
    ``quiet=False`` where the caller holds :meth:`~.host_scalars.Scalars.quiet`
    already (numpy's ``errstate`` costs about 2 µs per entry).

    ``rank_limit (B,)``: where the caller zeroed columns of ``J`` (the
    variables 'dogbox' freezes), the count of the others. A zeroed column
    adds an exact zero singular value, which the SVD returns as rounding
    noise (about ``eps s_max``) that may pass the cut-off and send a long
    step through every variable; the singular values beyond that count are
    dropped, which is the SVD of the free columns alone (scipy's
    ``lstsq(J[:, free], -f)``) up to rounding.
    """
    sc = scalars(fac.s, host=host)
    has_gram, has_svd = routes(fac)
    if not sc.host or not has_svd:
        return gauss_newton_step(fac, rcond, rank_limit)
    s, uf = sc.rows(fac.s), sc.rows(fac.uf)
    eps = rcond if rcond is not None else _EPS.get(fac.s.dtype) or torch.finfo(fac.s.dtype).eps
    limit = None if rank_limit is None else sc.rows(rank_limit)
    if sc.floats and not has_gram:
        # one problem: the quotients on Python floats (the same operations, see
        # _radius_one), the product with V on the host too (numpy's, see host_norm)
        s_l = s[0].tolist()
        cut = eps * s_l[0] if s_l else 0.0
        rank = len(s_l) if limit is None else int(limit[0])
        coef = np.array([[u / v if (v > cut and v != 0 and i < rank) else 0.0
                          for i, (v, u) in enumerate(zip(s_l, uf[0].tolist(), strict=True))]])
        if not torch_product:
            return sc.tensor_rows(-(sc.rows(fac.V) @ coef[..., None])[..., 0])
        V = host_rows(fac.V)
        Vc = None if V is None else host_matvec_rows(V, coef)
        if Vc is not None:  # (torch's bmm, summed on the host in its order: the same values)
            return sc.tensor_rows(-Vc)
    else:
        with sc.quiet() if quiet else contextlib.nullcontext():
            keep = s > eps * s[:, :1]
            if limit is not None:
                keep = keep & (np.arange(s.shape[-1]) < limit[:, None])
            coef = np.where(keep, np.where(s != 0, uf / s, 0.0), 0.0)
    p_svd = -torch.bmm(fac.V, torch.from_numpy(coef.reshape(*coef.shape, 1))).squeeze(-1)
    return mix_routes(fac, gram_solve(fac, None, with_q=False)[0] if has_gram else None, p_svd)


#: attribute of a Gauss-Newton step tensor: its norms, as columns on the host
_DXNORM = "_tsc_lm_dxnorm"


def _bound(xp: Any, a: Any, lower: float | None = None, upper: float | None = None) -> Any:
    """``a`` clamped to ``[lower, upper]`` in the namespace ``xp`` (NaN stays NaN)."""
    if xp is torch:
        return torch.clamp(a, min=lower, max=upper)
    if lower is not None:
        a = xp.maximum(a, lower)
    return a if upper is None else xp.minimum(a, upper)


def host_norm(a: Any) -> Any:
    """Euclidean norm of the one row of a ``(1, k)`` host array, a ``numpy.float64``.

    One float64 problem on the host (:attr:`Scalars.floats`) takes its norms,
    sums and square roots from numpy, whose results may differ from torch's
    in the last bits (the summation order of torch's vectorised reductions,
    and its square root, which is not always correctly rounded); a batch
    keeps torch's, bit for bit on the host and tensor paths.
    """
    row = a[0]
    # (a sum of squares is not negative: NaN and infinity pass through math.sqrt)
    if row.shape[0] >= _FOLD:
        return np.float64(math.sqrt(np.add.reduce(row * row)))
    # (a short row: numpy's sum in its order, on Python floats)
    return np.float64(math.sqrt(_row_sum([v * v for v in row.tolist()])))


def _torch_row_norm(sc: Scalars, a: Any) -> Any:
    """Euclidean norms of rows kept by ``sc``, as columns, by torch's reduction.

    'lm' takes the norms of a batch from torch (whose rounding differs from
    numpy's even for two entries), so that its host and tensor paths agree
    bit for bit; one problem takes numpy's (:func:`host_norm`).
    """
    if not sc.host:
        return vnorm(a, dim=-1, keepdim=True)
    if sc.floats:
        return host_norm(a)
    return sc.get_col(vnorm(torch.from_numpy(a), dim=-1))


def _torch_row_sum(sc: Scalars, a: Any) -> Any:
    """Sums of rows kept by ``sc`` as columns, by torch's reduction (see above)."""
    if not sc.host:
        return a.sum(-1, keepdim=True)
    if sc.floats:
        return np.add.reduce(a[0])
    return sc.get_col(torch.from_numpy(a).sum(-1))


def _torch_norm(sc: Scalars, t: Tensor) -> Any:
    """Row norms of a ``(B, k)`` tensor as columns kept by ``sc`` (torch's reduction)."""
    if not sc.host:
        return vnorm(t, dim=-1, keepdim=True)
    if sc.floats:
        return host_norm(sc.rows(t))
    return sc.get_col(vnorm(t, dim=-1))


def _lm_damped_step(sc: Scalars, fac: Factors, sp: _Spectral, alpha: Any) -> Tensor:
    """:func:`_damped_step_column` for 'lm': one problem takes the product with ``V``
    on the host too (numpy's; see :func:`host_norm`)."""
    if not (sc.floats and sp.route == (False, True)):
        return _damped_step_column(sc, fac, sp, alpha)
    denom = sp.s2 + alpha
    coef = np.where(denom != 0, sp.suf / denom, 0.0)
    return sc.tensor_rows(-(sc.rows(fac.V) @ coef[..., None])[..., 0])


def solve_trust_region_minpack(
    fac: Factors, delta: Tensor, par0: Tensor, m: int, n: int, max_iter: int = 10,
    basic: BasicStep | None = None, p_gn: Tensor | None = None, host: bool | None = None,
    quiet: bool = True,
) -> tuple[Tensor, Tensor]:
    """Levenberg-Marquardt parameter search of MINPACK's ``lmpar`` (Moré 1978).

    Works in scaled variables (``A = J diag(1/D)``) and stops when
    ``| |p| - delta | <= 0.1 delta``. Unlike the 'trf' variant, the step is not
    rescaled onto the boundary. ``p_gn``, if given, is the Gauss-Newton step
    (default :func:`gauss_newton_step`); on the host its norms are remembered
    on it for the next call (an engine tensor, never modified in place). On
    the rows of ``basic`` the lower
    bound of the damping is MINPACK's (pivoted QR, see
    :func:`basic_gauss_newton`; ``p_gn`` must then hold its basic step there);
    every damped step (``par > 0``) comes from ``fac``.

    As in :func:`solve_trust_region_scipy`, the per-problem scalars and the
    spectral rows live on the host when the factors are on the CPU
    (:class:`~.host_scalars.Scalars`; ``host`` overrides the choice, for the
    tests), so that the Newton iteration costs no torch operation but its
    norms and sums, which are torch's reductions on either path for a batch
    (the two paths agree bit for bit); one float64 problem takes them, and
    the product with ``V``, from numpy (:func:`host_norm`: no torch operation
    but the tensor of the step). Off the CPU the host reads one count before
    the iteration and one per iteration. ``quiet=False`` where the caller
    holds :meth:`~.host_scalars.Scalars.quiet` already.

    Returns
    -------
    p : Tensor, shape (B, n)
        Step in scaled variables.
    par : Tensor, shape (B,)
        A ``numpy.float64`` for one float64 problem on the host whose ``delta``
        is one (the host values 'lm' keeps in its state,
        :meth:`~.host_scalars.Scalars.keep`).
    """
    # (one problem's radius may be a host value, Scalars.keep: the factors tell the batch)
    sc = scalars(delta if isinstance(delta, Tensor) else fac.s, host=host)
    with sc.quiet() if quiet else contextlib.nullcontext():
        if sc.floats and fac.gram is None:
            p, par = _solve_minpack_one(sc, fac, delta, par0, m, n, max_iter, basic,
                                        gauss_newton_step(fac) if p_gn is None else p_gn)
            # (a host value for a caller that keeps its radius as one, Scalars.keep)
            return p, (par if not isinstance(delta, Tensor) else sc.tensor(par))
        return _solve_minpack(sc, fac, delta, par0, m, n, max_iter, basic, p_gn)


def _solve_minpack(sc: Scalars, fac: Factors, delta: Tensor, par0: Tensor, m: int, n: int,
                   max_iter: int, basic: BasicStep | None,
                   p_gn: Tensor | None) -> tuple[Tensor, Tensor]:
    """The body of :func:`solve_trust_region_minpack`."""
    xp = sc.xp
    B = sc.B
    dwarf = _TINY.get(sc.dtype) or torch.finfo(sc.dtype).tiny
    if p_gn is None:
        p_gn = gauss_newton_step(fac)
    delta_c = sc.get_col(delta)
    dxnorm = getattr(p_gn, _DXNORM, None) if sc.host else None
    if dxnorm is None:  # (the same step serves every trial of an outer iteration)
        dxnorm = _torch_norm(sc, p_gn)
        if sc.host:
            setattr(p_gn, _DXNORM, dxnorm)
    fp = dxnorm - delta_c
    gn_ok = fp <= 0.1 * delta_c
    n_gn = sc.count(gn_ok)
    if n_gn == B:
        return p_gn, sc.tensor(sc.full(0.0))

    sp = _spectral(sc, fac)
    has_gram, has_svd = sp.route
    full_rank = _full_rank_columns(sc, fac, sp, m, n)
    phi0, dpos0, _ = _radius_terms(sc, fac, sp, None, delta_c, exact=True)
    # -phi0 / dphi0 (phi0 itself where the derivative vanishes)
    ratio0 = phi0 / xp.where(dpos0 != 0, dpos0, -1.0)
    parl = xp.where(full_rank, ratio0 * (dxnorm / delta_c), 0.0)
    if basic is not None:  # MINPACK's bound from R, zero when R has a zero pivot
        curv, full, rows = (sc.get_col(t) for t in (basic.curv, basic.full, basic.rows))
        safe_c = xp.where(curv > 0, curv, 1.0)
        parl_qr = xp.where(full & (curv > 0), (fp / delta_c) / safe_c, 0.0)
        parl = xp.where(rows, parl_qr, parl)
    gnorm = _mix(sc, sp, _torch_norm(sc, fac.b) if has_gram else None,
                 _torch_row_norm(sc, sp.suf) if has_svd else None)
    paru = gnorm / delta_c
    paru = xp.where(paru == 0, dwarf / _bound(xp, delta_c, upper=0.1), paru)
    par = xp.minimum(xp.maximum(sc.get_col(par0), parl), paru)
    par = xp.where(par == 0, gnorm / xp.where(dxnorm > 0, dxnorm, 1.0), par)
    running = gn_ok == 0  # not gn_ok (``~`` of a Python bool would not do)
    n_running = B - n_gn
    par = _lmpar_newton(sc, fac, sp, par, parl, paru, fp, delta_c, running, n_running,
                        1, max_iter)
    p = _lm_damped_step(sc, fac, sp, par)
    if n_gn:
        p = torch.where(sc.tensor(gn_ok).unsqueeze(-1), p_gn, p)
        par = xp.where(gn_ok, 0.0, par)
    return p, sc.tensor(par)


def _lmpar_newton(sc: Scalars, fac: Factors, sp: _Spectral, par: Any, parl: Any, paru: Any,
                  fp: Any, delta_c: Any, running: Any, n_running: int, first: int,
                  max_iter: int) -> Any:
    """lmpar's Newton iterations ``first .. max_iter`` of :func:`_solve_minpack`; the new
    ``par`` columns.

    The problems marked in ``running`` iterate (the others keep their
    ``par``) until ``| |p| - delta | <= 0.1 delta``, MINPACK's second stop
    test, or the last iteration, which every running problem stops at (with
    the parameter it was evaluated at). Whenever fewer than
    :data:`RESTRICT_BELOW` of the batch run (from the start, where most
    Gauss-Newton steps fit, or after an iteration), the iteration goes on
    with their rows alone
    (gathered as :func:`_solve_scipy`'s Newton iteration gathers them, issue
    16): after the first iteration typically about 1 % of a large batch still
    iterates, and the damped solves of the others would be computed and
    thrown away. Every row's arithmetic is the same either way (elementwise
    operations, per-row reductions and per-matrix inverses), so the results
    are bit for bit those of the whole batch. CPU only (see
    :func:`_newton_alpha`).
    """
    xp = sc.xp
    B = sc.B
    dwarf = _TINY.get(sc.dtype) or torch.finfo(sc.dtype).tiny
    tenth = 0.1 * delta_c
    for it in range(first, max_iter + 1):
        if n_running < RESTRICT_BELOW * B and not sc.floats and sc.device.type == "cpu":
            # the few rows that still iterate, as a batch of their own
            rows, pick, sub_sc, sub_fac, sub_sp = _gather_rows(sc, fac, sp, running, False)
            par_r = _lmpar_newton(sub_sc, sub_fac, sub_sp, pick(par), pick(parl), pick(paru),
                                  pick(fp), pick(delta_c), pick(running), n_running, it,
                                  max_iter)
            return _scatter_rows(sc, rows, par, par_r)
        par_it = xp.where(par == 0, _bound(xp, 0.001 * paru, lower=dwarf), par)
        phi, dpos, pnorm = _radius_terms(sc, fac, sp, par_it, delta_c, exact=True)
        temp = fp
        fp_it = phi
        if it == max_iter:
            stop = running | True
        else:
            stop = (abs(fp_it) <= tenth) | ((parl == 0) & (fp_it <= temp) & (temp < 0))
        # -phi / dphi (phi itself where the derivative vanishes)
        parc = (phi / xp.where(dpos != 0, dpos, -1.0)) * (pnorm / delta_c)
        parl_it = xp.where(fp_it > 0, xp.maximum(parl, par_it), parl)
        paru_it = xp.where(fp_it < 0, xp.minimum(paru, par_it), paru)
        par_next = xp.maximum(parl_it, par_it + parc)
        # rows that stop keep the parameter they were evaluated at
        if n_running == B:
            par = xp.where(stop, par_it, par_next)
            parl = xp.where(stop, parl, parl_it)
            paru = xp.where(stop, paru, paru_it)
            fp = fp_it
            running = stop == 0
        else:
            par = xp.where(running, xp.where(stop, par_it, par_next), par)
            moving = running > stop  # running and not stopping
            parl = xp.where(moving, parl_it, parl)
            paru = xp.where(moving, paru_it, paru)
            fp = xp.where(running, fp_it, fp)
            running = moving
        n_running = sc.count(running)
        if not n_running:
            break
    return par


def _fmax(a: Any, b: Any) -> Any:
    """``max`` of two numbers propagating NaN (as ``numpy.maximum``, ``Floats.maximum``)."""
    return a if (a >= b or a != a) else b


def _fmin(a: Any, b: Any) -> Any:
    """``min`` of two numbers propagating NaN (as ``numpy.minimum``, ``Floats.minimum``)."""
    return a if (a <= b or a != a) else b


#: numpy's pairwise summation adds rows of fewer than this many entries one after
#: another from zero (``np.add.reduce``; blocks of 8 accumulators from there on):
#: :func:`_row_sum` adds such rows of Python floats in that order, the same sums
_FOLD = 8


def _row_sum(v: list[float]) -> float:
    """``numpy.add.reduce`` of one row of Python floats, bit for bit: a short row added in
    order from zero as numpy adds it, a longer one by numpy itself."""
    if len(v) >= _FOLD:
        return float(np.add.reduce(np.array(v, dtype=np.float64)))
    total = 0.0
    for t in v:
        total += t
    return total


def _radius_one(s2: list[float], suf: list[float], suf2: list[float], alpha: Any,
                delta: Any) -> tuple[Any, Any, Any]:
    """:func:`_radius_terms` of one problem's SVD rows (lists of Python floats), ``exact``,
    with the same operations: ``phi``, ``-dphi/dalpha`` and ``|p|`` as ``numpy.float64``.

    Python's float arithmetic is IEEE double arithmetic, as numpy's on these rows (an
    overflow gives inf), and the sums are numpy's (:func:`_row_sum`): the same values
    as the arrays gave, without a numpy call per operation on two or three entries.
    The one case Python would raise on, a nonzero ``denom`` whose cube underflows to
    zero, divides as numpy scalars (the caller holds ``errstate``).
    """
    add = 0.0 if alpha is None else float(alpha)
    squares = []
    terms = []
    for a, b, c in zip(s2, suf, suf2, strict=True):
        denom = a + add if alpha is not None else a
        if denom != 0:
            coef = b / denom
            cube = denom * denom * denom
            squares.append(coef * coef)
            terms.append(c / cube if cube != 0 else float(np.float64(c) / cube))
        else:
            squares.append(0.0)
            terms.append(0.0)
    pn = np.float64(math.sqrt(_row_sum(squares)))
    total = np.float64(_row_sum(terms))
    return pn - delta, total / (pn if pn > 0 else 1.0), pn


def _solve_minpack_one(sc: Scalars, fac: Factors, delta_t: Tensor, par0: Tensor, m: int,
                       n: int, max_iter: int, basic: BasicStep | None,
                       p_gn: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_solve_minpack` of one float64 problem on the host with the SVD route.

    The same iteration, operations and values as the general body with
    :class:`~.host_scalars.Floats` (``numpy.float64`` scalars and the ``(k,)``
    spectral rows), written out for one problem: its masks are plain
    conditions and no per-scalar call goes through a namespace (issue 14).
    """
    delta = sc.get(delta_t)
    dxnorm = getattr(p_gn, _DXNORM, None)
    if dxnorm is None:  # (the same step serves every trial of an outer iteration)
        dxnorm = host_norm(sc.rows(p_gn))
        setattr(p_gn, _DXNORM, dxnorm)
    fp = dxnorm - delta
    if fp <= 0.1 * delta:
        return p_gn, np.float64(0.0)
    dwarf = _TINY[torch.float64]
    # the spectral rows as Python floats (see _radius_one)
    s = sc.rows(fac.s)[0].tolist()
    suf = [a * b for a, b in zip(s, sc.rows(fac.uf)[0].tolist(), strict=True)]
    s2 = [a * a for a in s]
    suf2 = [b * b for b in suf]
    full_rank = (m >= n and len(s) >= n > 0
                 and s[-1] > _EPS[torch.float64] * m * s[0])
    phi0, dpos0, _ = _radius_one(s2, suf, suf2, None, delta)
    # -phi0 / dphi0 (phi0 itself where the derivative vanishes)
    ratio0 = phi0 / (dpos0 if dpos0 != 0 else -1.0)
    parl = ratio0 * (dxnorm / delta) if full_rank else np.float64(0.0)
    if basic is not None:  # MINPACK's bound from R, zero when R has a zero pivot
        curv, full, rows = (sc.get(t) for t in (basic.curv, basic.full, basic.rows))
        if rows:
            parl = ((fp / delta) / curv if (full and curv > 0) else np.float64(0.0))
    gnorm = np.float64(math.sqrt(_row_sum(suf2)))
    paru = gnorm / delta
    if paru == 0:
        paru = dwarf / _fmin(delta, 0.1)
    par = _fmin(_fmax(sc.get(par0), parl), paru)
    if par == 0:
        par = gnorm / (dxnorm if dxnorm > 0 else 1.0)
    tenth = 0.1 * delta
    for it in range(1, max_iter + 1):
        par_it = _fmax(0.001 * paru, dwarf) if par == 0 else par
        phi, dpos, pnorm = _radius_one(s2, suf, suf2, par_it, delta)
        stop = (it == max_iter or abs(phi) <= tenth
                or (parl == 0 and phi <= fp and fp < 0))
        fp = phi
        if stop:  # the parameter it was evaluated at
            par = par_it
            break
        # -phi / dphi (phi itself where the derivative vanishes)
        parc = (phi / (dpos if dpos != 0 else -1.0)) * (pnorm / delta)
        if phi > 0:
            parl = _fmax(parl, par_it)
        if phi < 0:
            paru = _fmin(paru, par_it)
        par = _fmax(parl, par_it + parc)
    add = float(par)
    coef = np.array([b / d if d != 0 else 0.0
                     for b, d in zip(suf, [a + add for a in s2], strict=True)])
    p = sc.tensor_rows(-(sc.rows(fac.V) @ coef[None, :, None])[..., 0])
    return p, sc.keep(par)[0]  # (a numpy.float64)
