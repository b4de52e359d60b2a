r"""Batched helpers for the quadratic model of the least-squares cost.

Around the current point the Gauss-Newton model of the change in cost along a
step :math:`s` is

.. math:: q(s) = \tfrac12 \lVert J s \rVert^2 + \tfrac12 s^\top \operatorname{diag}(c)\, s
          + g^\top s ,

where :math:`g = J^\top f` and the optional diagonal term :math:`c` comes from the
Coleman-Li scaling of bounded problems (Branch, Coleman & Li 1999, eq. 2.5).
Trust-region methods compare :math:`-q(s)` (the predicted reduction) with the
actual reduction of the cost. All functions work on a batch: ``J (B, m, n)``,
``g, s, c (B, n)``; scalars per problem have shape ``(B,)``.

The matrix ``J`` is never scaled in memory: a scaled Jacobian ``J diag(d)`` is
represented by ``(J, d)`` and applied as ``J @ (d * s)``. Problems that take
the Gram route of ``linalg.factorize`` (well-conditioned members of a batch)
may pass ``G = J^T J`` with a row mask ``gram``: their squared norms
:math:`\lVert J u\rVert^2 = u^\top G u` then cost :math:`O(n^2)` instead of
:math:`O(mn)` per problem.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .counts import count_true, times
from .host_scalars import Scalars


def jac_times(J: Tensor, s: Tensor, d: Tensor | None = None) -> Tensor:
    """Return ``J diag(d) s`` for a batch: ``(B, m, n) x (B, n) -> (B, m)``.

    ``J`` may also be a :class:`~torchimize_scipy._engine.operator.JacobianOperator`
    (``tr_solver='lsmr'``): its ``matvec`` is used.
    """
    s = times(d, s)
    if not isinstance(J, Tensor):
        return J.matvec(s)
    return torch.bmm(J, s.unsqueeze(-1)).squeeze(-1)


def _on_host(sc: Scalars | None) -> bool:
    return sc is not None and sc.host


def _product(A: Any, s: Any, sc: Scalars | None) -> Any:
    """``A s`` per problem for ``A (B, m, n)`` and rows ``s (B, n)``.

    With ``sc`` on the host, ``A`` and ``s`` are host arrays (``A`` may also be
    a Jacobian operator, applied to a tensor of ``s``) and so is the product;
    tensors otherwise (:func:`jac_times`).
    """
    if not _on_host(sc):
        return jac_times(A, s)
    if type(A) is np.ndarray:
        return np.matmul(A, s[..., None])[..., 0]
    return sc.rows(A.matvec(sc.tensor_rows(s)))


def _row_sum(a: Any, sc: Scalars | None) -> Any:
    """Sums of the rows of ``a``: torch's on tensors, :meth:`Scalars.row_sum` on the host."""
    return sc.row_sum(a) if _on_host(sc) else a.sum(-1)


def _count(mask: Any, sc: Scalars | None) -> int:
    return count_true(mask) if sc is None else sc.count(mask)


def gram_form(G: Tensor, u: Tensor, v: Tensor | None = None,
              sc: Scalars | None = None) -> Tensor:
    """``u^T G v`` per problem (``v = u`` by default), ``(B,)``. ``sc``: see :func:`cross_jac`."""
    Gv = _product(G, u if v is None else v, sc)
    return _row_sum(u * Gv, sc)


def _gram_rows(gram: Tensor | None, sc: Scalars | None = None) -> int:
    """How many problems use the Gram form: 0, some, or all (``gram.shape[0]``)."""
    return 0 if gram is None else _count(gram, sc)


def cross_jac(J: Tensor, u: Tensor, v: Tensor, G: Tensor | None = None,
              gram: Tensor | None = None, sc: Scalars | None = None) -> Tensor:
    """``(J u) . (J v)`` per problem; through ``G = J^T J`` on rows where ``gram`` holds.

    ``u`` and ``v`` are already scaled; ``v`` may be ``u``. With ``sc``
    (:class:`~.host_scalars.Scalars`) every argument is as ``sc`` keeps it
    (rows, per-problem values; ``J`` may be a Jacobian operator) and so is the
    result: on the host, the products and sums run in numpy.
    """
    count = _gram_rows(gram, sc)
    if count:
        via_g = gram_form(G, u, None if v is u else v, sc)
        if v is u:
            via_g = via_g.clamp(min=0) if not _on_host(sc) else sc.xp.where(via_g < 0, 0.0,
                                                                              via_g)
        if count == (gram.shape[0] if sc is None else sc.B):
            return via_g
    Ju = _product(J, u, sc)
    direct = _row_sum(Ju * (Ju if v is u else _product(J, v, sc)), sc)
    if not count:
        return direct
    return (torch if sc is None else sc.xp).where(gram, via_g, direct)


def _scaled(d: Any, s: Any) -> Any:
    """``s * d`` (:func:`~.counts.times` for tensors; None stands for ones)."""
    return s if d is None else times(d, s) if isinstance(d, Tensor) else s * d


def evaluate_quadratic(
    J: Tensor, d: Tensor | None, g: Tensor, s: Tensor, diag: Tensor | None = None,
    G: Tensor | None = None, gram: Tensor | None = None, sc: Scalars | None = None,
) -> Tensor:
    """Value of the model ``0.5 |J_h s|^2 + 0.5 s.diag.s + g.s`` with ``J_h = J diag(d)``.

    ``G``/``gram``/``sc``: see :func:`cross_jac`.
    """
    u = _scaled(d, s)
    q = cross_jac(J, u, u, G, gram, sc)
    if diag is not None:
        q = q + _row_sum(diag * s * s, sc)
    return 0.5 * q + _row_sum(g * s, sc)


def build_quadratic_1d(
    J: Tensor,
    d: Tensor | None,
    g: Tensor,
    s: Tensor,
    diag: Tensor | None = None,
    s0: Tensor | None = None,
    G: Tensor | None = None,
    gram: Tensor | None = None,
    sc: Scalars | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Coefficients ``a t^2 + b t + c`` of the model along the line ``s0 + t s``.

    ``G``/``gram``/``sc``: see :func:`cross_jac`.
    """
    if not _gram_rows(gram, sc):
        G = gram = None
    v = _scaled(d, s)
    Jv = None if gram is not None else _product(J, v, sc)
    a = cross_jac(J, v, v, G, gram, sc) if Jv is None else _row_sum(Jv * Jv, sc)
    if diag is not None:
        a = a + _row_sum(diag * s * s, sc)
    a = 0.5 * a
    b = _row_sum(g * s, sc)
    if s0 is None:
        c = torch.zeros_like(b) if not _on_host(sc) else sc.full(0.0)
    else:
        u = _scaled(d, s0)
        if Jv is None:
            b = b + cross_jac(J, u, v, G, gram, sc)
            uu = cross_jac(J, u, u, G, gram, sc)
        else:
            Ju = _product(J, u, sc)
            b = b + _row_sum(Ju * Jv, sc)
            uu = _row_sum(Ju * Ju, sc)
        c = 0.5 * uu + _row_sum(g * s0, sc)
        if diag is not None:
            b = b + _row_sum(diag * s0 * s, sc)
            c = c + 0.5 * _row_sum(diag * s0 * s0, sc)
    return a, b, c


def minimize_quadratic_1d(
    a: Any, b: Any, lb: Any, ub: Any, c: Any = None, xp: Any = torch
) -> tuple[Any, Any]:
    """Minimise ``a t^2 + b t + c`` over ``[lb, ub]`` for each problem.

    The candidates are the two ends and, when it lies strictly inside, the
    stationary point; ties go to the first candidate in that order. A NaN
    value never wins; as with ``torch.nan_to_num(y, nan=inf)``, an infinite
    value is reported as the largest finite one (and a NaN as ``inf``). The
    arguments are per-problem values of the namespace ``xp`` (``(B,)``
    tensors by default; see :class:`~.host_scalars.Scalars`).
    """
    nonzero = a != 0
    safe_a = xp.where(nonzero, a, 1.0)
    extremum = -0.5 * b / safe_a
    inside = nonzero & (lb < extremum) & (extremum < ub)
    extremum = xp.where(inside, extremum, lb)
    ts = (lb, ub, extremum)
    ys = []
    for t in ts:
        y = t * (a * t + b)
        # (adding 0.0 without ``c`` turns -0.0 into 0.0 as adding a zero ``c`` would)
        ys.append(y + (0.0 if c is None else c))
    ys[2] = xp.where(inside, ys[2], math.inf)
    return _first_minimum(xp, ts, ys)


def _first_minimum(xp: Any, ts: tuple, ys: list) -> tuple[Any, Any]:
    """The candidate ``ts[k]`` of the least ``ys[k]`` (the first of equal ones), and that value.

    NaN values never win: values go through ``nan_to_num(y, nan=inf)`` (so an
    infinite value is reported as the dtype's largest finite one, a NaN as
    ``inf``). On tensors one ``argmin`` over the stacked candidates (few
    kernels on a device); elsewhere (the host's values, or a float per
    problem) strict comparisons in order, which pick the same candidate.
    """
    if xp is torch:
        t = torch.stack(ts, dim=-1)
        y = torch.nan_to_num(torch.stack(ys, dim=-1), nan=math.inf)
        k = torch.argmin(y, dim=-1, keepdim=True)
        return t.gather(-1, k).squeeze(-1), y.gather(-1, k).squeeze(-1)
    big = _finite_max(ts[0])
    best_t = best_y = None
    for t, y in zip(ts, ys, strict=True):
        y = xp.where(y == math.inf, big, xp.where(y == -math.inf, -big, y))
        y = xp.where(y != y, math.inf, y)  # NaN
        if best_y is None:
            best_t, best_y = t, y
        else:
            better = y < best_y
            best_t = xp.where(better, t, best_t)
            best_y = xp.where(better, y, best_y)
    return best_t, best_y


def _finite_max(like: Any) -> float:
    """The largest finite value of the dtype of ``like``."""
    if isinstance(like, Tensor):
        return torch.finfo(like.dtype).max
    return float(np.finfo(np.asarray(like).dtype).max)


def intersect_trust_region(x: Any, s: Any, delta: Any,
                           sc: Scalars | None = None) -> tuple[Any, Any]:
    """Roots ``t`` of ``|x + t s| = delta`` (negative one first), per problem.

    Uses the cancellation-free form of the quadratic formula. Rows with ``s = 0``
    give ``(-inf, inf)``. With ``sc`` (:class:`~.host_scalars.Scalars`) the
    arguments are rows and per-problem values as ``sc`` keeps them; tensors
    otherwise.
    """
    if sc is None:
        xp, row_sum = torch, _sum_last
    else:
        xp, row_sum = sc.xp, sc.row_sum
    a = row_sum(s * s)
    b = row_sum(x * s)
    c = row_sum(x * x) - delta * delta
    disc2 = b * b - a * c
    disc = xp.sqrt(xp.where(disc2 < 0, 0.0, disc2))
    q = -(b + xp.copysign(disc, b))
    safe_a = xp.where(a != 0, a, 1.0)
    safe_q = xp.where(q != 0, q, 1.0)
    t1 = q / safe_a
    t2 = c / safe_q
    lo = xp.minimum(t1, t2)
    hi = xp.maximum(t1, t2)
    lo = xp.where(a != 0, lo, -math.inf)
    hi = xp.where(a != 0, hi, math.inf)
    return lo, hi


def _sum_last(a: Tensor) -> Tensor:
    return a.sum(-1)


def update_tr_radius(
    delta: Any,
    actual_reduction: Any,
    predicted_reduction: Any,
    step_norm: Any,
    bound_hit: Any,
    xp: Any = torch,
) -> tuple[Any, Any]:
    """Trust-region radius update of Moré (1983) as used by scipy's 'trf'/'dogbox'.

    ``ratio = actual / predicted``; shrink to a quarter of the step when
    ``ratio < 0.25``; double when ``ratio > 0.75`` and the step reached the
    boundary. Returns the new radius and the ratio. The arguments are
    per-problem values of the namespace ``xp`` (``(B,)`` tensors by default;
    see :class:`~.host_scalars.Scalars` for the host's).
    """
    pos = predicted_reduction > 0
    safe_pred = xp.where(pos, predicted_reduction, 1.0)
    # 1 where both reductions are exactly zero, else 0
    both_zero = (predicted_reduction == 0) & (actual_reduction == 0)
    ratio = xp.where(pos, actual_reduction / safe_pred, xp.where(both_zero, 1.0, 0.0))
    new = xp.where(ratio < 0.25, 0.25 * step_norm,
                   xp.where((ratio > 0.75) & bound_hit, 2.0 * delta, delta))
    return new, ratio
