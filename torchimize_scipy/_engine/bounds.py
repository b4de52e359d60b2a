"""Batched helpers for box constraints ``lb <= x <= ub``.

These are the geometric pieces of the bounded trust-region methods: distance to
the box along a direction, Coleman-Li scaling (Branch, Coleman & Li, SIAM J. Sci.
Comput. 21(1), 1999, eq. 2.2), the strictly-feasible shift used by 'trf' and the
detection of active constraints reported in ``active_mask``. Unbounded
coordinates carry ``-inf``/``inf`` and fall out of every formula naturally.
All arrays are ``(B, n)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .host_scalars import Scalars


def in_bounds(x: Any, lb: Any, ub: Any, sc: Scalars | None = None) -> Any:
    """``(B,)`` mask: is every coordinate inside the box.

    With ``sc`` (:class:`~.host_scalars.Scalars`) the arguments are rows as
    ``sc`` keeps them and so is the result; tensors otherwise (as below).
    """
    inside = (x >= lb) & (x <= ub)
    return inside.all(-1) if sc is None else sc.all_rows(inside)


def step_size_to_bound(x: Any, s: Any, lb: Any, ub: Any,
                       sc: Scalars | None = None) -> tuple[Any, Any]:
    """Largest ``t >= 0`` with ``x + t s`` in the box, and which bounds it hits.

    Returns ``t (B,)`` (``inf`` when ``s`` is zero or points nowhere near a finite
    bound) and ``hits (B, n)``: -1 lower bound hit, 1 upper, 0 none. ``sc``:
    see :func:`in_bounds`.
    """
    xp = torch if sc is None else sc.xp
    nonzero = s != 0
    safe_s = xp.where(nonzero, s, 1.0)
    steps = xp.maximum((lb - x) / safe_s, (ub - x) / safe_s)
    steps = xp.where(nonzero, steps, math.inf)
    if sc is None:
        min_step = steps.amin(-1)
        hits = (steps == min_step.unsqueeze(-1)).to(s.dtype) * torch.sign(s)
        return min_step, hits.to(torch.long)
    min_step = sc.min_rows(steps)
    hits = (steps == sc.as_col(min_step)) * xp.sign(s)
    return min_step, sc.as_long(hits)


def _at_least_one(xp: Any, a: Any) -> Any:
    """``max(a, 1)`` elementwise, NaN kept (``torch.clamp(a, min=1.0)``)."""
    return xp.where(a < 1.0, 1.0, a)


def find_active_constraints(x: Any, lb: Any, ub: Any, rtol: float = 1e-10,
                            sc: Scalars | None = None) -> Any:
    """Integer mask of active bounds: -1 lower, 1 upper, 0 free.

    A bound is active when ``x`` is within ``rtol * max(1, |bound|)`` of it and
    closer to it than to the opposite bound; with ``rtol = 0`` only exact
    contact counts. ``sc``: see :func:`in_bounds`.
    """
    xp = torch if sc is None else sc.xp
    if rtol == 0:
        return xp.where(x >= ub, 1, xp.where(x <= lb, -1, 0))
    lower_dist = x - lb
    upper_dist = ub - x
    lower_thr = rtol * _at_least_one(xp, abs(lb))
    upper_thr = rtol * _at_least_one(xp, abs(ub))
    lower = xp.isfinite(lb) & (lower_dist <= xp.minimum(upper_dist, lower_thr))
    upper = xp.isfinite(ub) & (upper_dist <= xp.minimum(lower_dist, upper_thr))
    return xp.where(upper, 1, xp.where(lower, -1, 0))


def make_strictly_feasible(x: Any, lb: Any, ub: Any, rstep: float = 1e-10,
                           sc: Scalars | None = None) -> Any:
    """Move coordinates on (or within ``rstep``) of a bound into the interior.

    With ``rstep = 0`` the point moves to the next representable number.
    ``sc``: see :func:`in_bounds`.
    """
    xp = torch if sc is None else sc.xp
    active = find_active_constraints(x, lb, ub, rstep, sc)
    lower = active == -1
    upper = active == 1
    if rstep == 0:
        new_lower = xp.nextafter(lb, ub)
        new_upper = xp.nextafter(ub, lb)
    else:
        new_lower = lb + rstep * _at_least_one(xp, abs(lb))
        new_upper = ub - rstep * _at_least_one(xp, abs(ub))
    x_new = xp.where(lower, new_lower, xp.where(upper, new_upper, x))
    tight = (x_new < lb) | (x_new > ub)
    return xp.where(tight, 0.5 * (lb + ub), x_new)


def coleman_li_scaling(x: Any, g: Any, lb: Any, ub: Any,
                       sc: Scalars | None = None) -> tuple[Any, Any]:
    """Coleman-Li scaling vector ``v`` and its derivative ``dv`` (diagonal).

    ``v_i`` is the distance to the bound the anti-gradient points to (1 where
    that bound is infinite); ``dv_i`` is -1, 1 or 0 accordingly. ``sc``: see
    :func:`in_bounds`.
    """
    xp = torch if sc is None else sc.xp
    to_upper = (g < 0) & (ub < math.inf)
    to_lower = (g > 0) & (lb > -math.inf)
    v = xp.where(to_lower, x - lb, xp.where(to_upper, ub - x, 1.0))
    # -1, 1 or +0.0 (the two masks never overlap)
    if isinstance(to_lower, Tensor):
        dv = to_lower.to(x.dtype) - to_upper.to(x.dtype)
    else:
        dv = to_lower.astype(x.dtype) - to_upper.astype(x.dtype)
    return v, dv
