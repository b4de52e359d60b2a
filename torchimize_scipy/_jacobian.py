r"""Batched Jacobians by finite differences and by automatic differentiation.

Every routine works on a batch of ``B`` independent problems with parameters
``x`` of shape ``(B, n)`` and residuals ``f`` of shape ``(B, m)`` and returns
Jacobians of shape ``(B, m, n)``.

Finite differences
------------------
For column :math:`j` and absolute step :math:`h_j` (Nocedal & Wright,
*Numerical Optimization*, 2nd ed., section 8.1):

* forward / backward (``'2-point'``, first order):
  :math:`J_{:,j} \approx (f(x + h_j e_j) - f(x)) / \delta_j`;
* central (``'3-point'``, second order):
  :math:`J_{:,j} \approx (f(x + h_j e_j) - f(x - h_j e_j)) / \delta_j`;
* one-sided second order (``'3-point'`` next to a bound):
  :math:`J_{:,j} \approx (-3 f(x) + 4 f(x + h_j e_j) - f(x + 2 h_j e_j)) / \delta_j`,
  the derivative at :math:`x` of the quadratic interpolating the three points;
* complex step (``'cs'``, Squire & Trapp, "Using complex variables to estimate
  derivatives of real functions", SIAM Review 40(1), 1998):
  :math:`J_{:,j} \approx \operatorname{Im} f(x + i h_j e_j) / h_j`, free of
  subtractive cancellation; ``f`` must be analytic and accept complex input.

Here :math:`\delta_j` is the *actually representable* distance between the
evaluation points, e.g. :math:`\delta_j = (x_j + h_j) - x_j` computed in
floating point, which removes the rounding error of the step itself
(Nocedal & Wright, eq. 8.6 and the discussion around it).

Step size.  With :math:`\epsilon` the machine epsilon of the working precision
(the smaller of the precisions of ``x`` and ``f``), the default relative step is
:math:`r = \epsilon^{1/2}` for ``'2-point'`` and ``'cs'`` and
:math:`r = \epsilon^{1/3}` for ``'3-point'``, which balances truncation and
rounding error for first and second order formulas respectively.  The
absolute step is :math:`h = r\,\sigma(x)\max(1, |x|)` with
:math:`\sigma(x) = +1` for :math:`x \ge 0` and :math:`-1` otherwise.  A user
relative step ``rel_step`` gives :math:`h = \text{rel\_step}\,\sigma(x)|x|`
instead, falling back to the default rule wherever that step is lost to
rounding (:math:`(x + h) - x = 0`).

Bounds.  Steps are adjusted so that every evaluation point satisfies
:math:`lb \le x \le ub`, using the same rules as SciPy's
``scipy.optimize._numdiff.approx_derivative``: a one-sided step that would
leave the box is reversed if the reversed step fits, otherwise it is shrunk to
the larger of the two distances to the bounds; a central step that does not
fit becomes a one-sided second-order step towards the farther bound (shrunk to
half of the distance to that bound if necessary), and if that is not larger
than the smaller distance to the bounds the central scheme is kept with that
smaller distance as step.  Bounds are ignored for the complex step.

All perturbed points of all problems are built into one tensor and the
residual function is called once per Jacobian.

Automatic differentiation
-------------------------
:func:`autograd_jacobian` uses :mod:`torch.func`: forward mode (one
Jacobian-vector product per column, vectorised with ``vmap``) when
:math:`n \le m`, and reverse mode (one vector-Jacobian product per row)
otherwise, exploiting that row ``i`` of the output depends only on row ``i``
of the input so that a single tangent/cotangent direction serves the whole
batch (Griewank & Walther, *Evaluating Derivatives*, 2nd ed., 2008).
Forward mode holds a process-wide lock, because torch keeps forward-mode AD
state per process; see the comment above ``_FORWARD_AD_LOCK`` and
``docs/threads.md``. A function that converts its tensors to numpy cannot be
differentiated this way and gets a ``ValueError`` naming the alternatives.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ._engine import host_scalars

__all__ = ["autograd_jacobian", "default_rel_step", "finite_difference_jacobian"]

BatchedFun = Callable[[Tensor, Tensor], Tensor]
FDMethod = Literal["2-point", "3-point", "cs"]
_FD_METHODS = ("2-point", "3-point", "cs")


def default_rel_step(x_dtype: torch.dtype, f_dtype: torch.dtype, method: FDMethod) -> float:
    """Default relative finite-difference step for the given dtypes and method.

    Parameters
    ----------
    x_dtype, f_dtype : torch.dtype
        Dtypes of the parameters and of the residuals.
    method : {'2-point', '3-point', 'cs'}
        Finite-difference scheme.

    Returns
    -------
    float
        ``eps**0.5`` for ``'2-point'`` and ``'cs'``, ``eps**(1/3)`` for
        ``'3-point'``, where ``eps`` is the machine epsilon of ``x_dtype``, or of
        ``f_dtype`` when that is a floating/complex type with a smaller item
        size; ``float64`` epsilon when ``x_dtype`` is not floating.
    """
    eps = torch.finfo(torch.float64).eps
    x_is_fp = x_dtype.is_floating_point or x_dtype.is_complex
    if x_is_fp:
        eps = torch.finfo(x_dtype).eps
    if (f_dtype.is_floating_point or f_dtype.is_complex) and x_is_fp:
        if f_dtype.itemsize < x_dtype.itemsize:
            eps = torch.finfo(f_dtype).eps
    if method in ("2-point", "cs"):
        return eps**0.5
    if method == "3-point":
        return eps ** (1 / 3)
    raise ValueError(f"Unknown method {method!r}, should be one of {_FD_METHODS}.")


def complex_part(F: Tensor) -> Tensor:
    """``F.imag`` of ``fun``'s values at complex points (``jac='cs'``); real values (a
    ``fun`` that casts to a real dtype, or takes ``abs``) lost the imaginary part the
    Jacobian is read from: a ValueError (scipy reads a zero Jacobian from them)."""
    if not F.is_complex():
        raise ValueError("jac='cs': `fun` returned real values at complex points; "
                         "complex-step differentiation needs `fun` to carry the "
                         "imaginary part through (no cast to a real dtype, no abs or .real). "
                         "Use jac='2-point' or '3-point' for such a function.")
    return F.imag


def _absolute_step(x0: Tensor, rstep: float, rel_step: Tensor | float | None) -> Tensor:
    """Absolute steps ``h`` (same shape as ``x0``) from relative steps."""
    sign_x0 = torch.where(x0 >= 0, 1.0, -1.0).to(x0.dtype)
    default = rstep * sign_x0 * torch.clamp(torch.abs(x0), min=1.0)
    if rel_step is None:
        return default
    rel_step = torch.as_tensor(rel_step, dtype=x0.dtype, device=x0.device)
    h = rel_step * sign_x0 * torch.abs(x0)
    dx = (x0 + h) - x0
    return torch.where(dx == 0, default, h)


def _adjust_one_sided(x0: Tensor, h: Tensor, num_steps: int, lb: Tensor, ub: Tensor) -> Tensor:
    """Bound-adjusted steps for a one-sided scheme (see module docstring)."""
    h_total = h * num_steps
    lower_dist = x0 - lb
    upper_dist = ub - x0
    x = x0 + h_total
    violated = (x < lb) | (x > ub)
    fitting = torch.abs(h_total) <= torch.maximum(lower_dist, upper_dist)
    h_adj = torch.where(violated & fitting, -h, h)
    forward = (upper_dist >= lower_dist) & ~fitting
    backward = (upper_dist < lower_dist) & ~fitting
    h_adj = torch.where(forward, upper_dist / num_steps, h_adj)
    h_adj = torch.where(backward, -lower_dist / num_steps, h_adj)
    return h_adj


def three_point_points(x0: Tensor, h: Tensor, lb: Tensor | None,
                       ub: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The two points of a '3-point' difference and the spacing that divides it.

    Central (``x0 - h``, ``x0 + h``) where the bounds allow, else one-sided
    (``x0 + h``, ``x0 + 2h``) as scipy's ``approx_derivative`` chooses; ``lb``
    None means unbounded. Returns ``(xa, xb, dx, one_sided)``.
    """
    if lb is not None:
        h, one_sided = _adjust_two_sided(x0, h, 1, lb, ub)
    else:
        h = torch.abs(h)
        one_sided = torch.zeros_like(x0, dtype=torch.bool)
    xa = torch.where(one_sided, x0 + h, x0 - h)
    xb = torch.where(one_sided, x0 + 2 * h, x0 + h)
    dx = torch.where(one_sided, xb - x0, xb - xa)
    return xa, xb, dx, one_sided


def _adjust_two_sided(
    x0: Tensor, h: Tensor, num_steps: int, lb: Tensor, ub: Tensor
) -> tuple[Tensor, Tensor]:
    """Bound-adjusted steps and one-sided mask for a central scheme."""
    h = torch.abs(h)
    h_total = h * num_steps
    lower_dist = x0 - lb
    upper_dist = ub - x0
    central = (lower_dist >= h_total) & (upper_dist >= h_total)
    forward = (upper_dist >= lower_dist) & ~central
    backward = (upper_dist < lower_dist) & ~central
    h_adj = torch.where(forward, torch.minimum(h, 0.5 * upper_dist / num_steps), h)
    h_adj = torch.where(backward, -torch.minimum(h, 0.5 * lower_dist / num_steps), h_adj)
    one_sided = forward | backward
    min_dist = torch.minimum(upper_dist, lower_dist) / num_steps
    adjusted_central = ~central & (torch.abs(h_adj) <= min_dist)
    h_adj = torch.where(adjusted_central, min_dist, h_adj)
    one_sided = one_sided & ~adjusted_central
    return h_adj, one_sided


def _on_host(x0: Tensor, f0: Tensor, method: str, rel_step: Tensor | float | None,
             lb: Tensor | None, ub: Tensor | None) -> bool:
    """Whether :func:`finite_difference_jacobian` takes :func:`_host_differences`: one
    float64 problem on the CPU, '2-point' or '3-point' with the default relative step,
    nothing recording gradients, the host path of the engine not switched off."""
    return (x0.shape[0] == 1 and method != "cs" and rel_step is None
            and x0.dtype == torch.float64 and f0.dtype == torch.float64
            and x0.device.type == "cpu" and f0.device.type == "cpu"
            and not x0.requires_grad and not f0.requires_grad
            and host_scalars.HOST is not False
            and all(b is None or (b.dtype == torch.float64 and b.device.type == "cpu")
                    for b in (lb, ub)))


def _host_differences(fun: BatchedFun, x0: Tensor, f0: Tensor, idx: Tensor, method: str,
                      rstep: float, lb: Tensor | None, ub: Tensor | None) -> Tensor:
    """:func:`finite_difference_jacobian` of one float64 problem, its steps and quotients
    taken in numpy on the host arrays.

    The same IEEE operations as the tensor path, one for one (signs, ``max(|x|, 1)``,
    the bounds' adjustments, the points by selection, the differences and quotients),
    so the same values; ``fun`` is called once with the ``n`` (or ``2 n``) points, as
    there. The Jacobian has the tensor path's layout (a transposed ``(1, n, m)``
    array), so that later products see the same strides. For one small problem
    this replaces some 40 torch operations per Jacobian by numpy's on a few entries.
    """
    def host(t: Tensor) -> np.ndarray:
        return host_scalars.host_array(t)[0]

    x, f = host(x0), host(f0)
    n, m = x.shape[0], f.shape[0]
    with host_scalars.quiet():  # (torch warns of nothing; inf - inf is NaN there too)
        sign = np.where(x >= 0, 1.0, -1.0)
        ax = np.abs(x)
        h = rstep * sign * np.where(ax < 1.0, 1.0, ax)  # (torch.clamp(min=1): NaN stays)
        lo = np.full(n, -np.inf) if lb is None else host(lb)
        hi = np.full(n, np.inf) if ub is None else host(ub)
        bounded = lb is not None or ub is not None
        if method == "2-point":
            if bounded:
                h = _host_one_sided(x, h, lo, hi)
            x1 = x + h
            points = [x1]
        else:
            if bounded:
                h, one_sided = _host_two_sided(x, h, lo, hi)
            else:
                h = np.abs(h)
                one_sided = np.zeros(n, dtype=bool)
            xa = np.where(one_sided, x + h, x - h)
            xb = np.where(one_sided, x + 2 * h, x + h)
            points = [xa, xb]
        eye = np.eye(n, dtype=bool)
        pts = np.stack([np.where(eye, xk[:, None], x[None, :]) for xk in points])
    # (the user's function outside the ignore-all state: its own warnings show, as in scipy)
    values = _call(fun, torch.from_numpy(pts.reshape(len(points), 1, n, n)), idx, m)
    v = values.detach().numpy().reshape(len(points), n, m)
    with host_scalars.quiet():
        if method == "2-point":
            jt = (v[0] - f[None, :]) / (x1 - x)[:, None]
        else:
            fa, fb = v[0], v[1]
            df = np.where(one_sided[:, None], -3.0 * f[None, :] + 4 * fa - fb, fb - fa)
            jt = df / np.where(one_sided, xb - x, xb - xa)[:, None]
    return torch.from_numpy(np.ascontiguousarray(jt).reshape(1, n, m)).transpose(-1, -2)


def _host_one_sided(x: np.ndarray, h: np.ndarray, lb: np.ndarray,
                    ub: np.ndarray) -> np.ndarray:
    """:func:`_adjust_one_sided` (one step) on host arrays: the same operations (its
    products and quotients by the one step are exact and left out)."""
    lower, upper = x - lb, ub - x
    xh = x + h
    violated = (xh < lb) | (xh > ub)
    fitting = np.abs(h) <= np.maximum(lower, upper)
    h_adj = np.where(violated & fitting, -h, h)
    h_adj = np.where((upper >= lower) & ~fitting, upper, h_adj)
    return np.where((upper < lower) & ~fitting, -lower, h_adj)


def _host_two_sided(x: np.ndarray, h: np.ndarray, lb: np.ndarray,
                    ub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_adjust_two_sided` (one step) on host arrays: the same operations (its
    products and quotients by the one step are exact and left out)."""
    h = np.abs(h)
    lower, upper = x - lb, ub - x
    central = (lower >= h) & (upper >= h)
    forward = (upper >= lower) & ~central
    backward = (upper < lower) & ~central
    h_adj = np.where(forward, np.minimum(h, 0.5 * upper), h)
    h_adj = np.where(backward, -np.minimum(h, 0.5 * lower), h_adj)
    one_sided = forward | backward
    min_dist = np.minimum(upper, lower)
    adjusted = ~central & (np.abs(h_adj) <= min_dist)
    return np.where(adjusted, min_dist, h_adj), one_sided & ~adjusted


def _perturb(x0: Tensor, xj: Tensor) -> Tensor:
    """Points ``P[b, j] = x0[b]`` with component ``j`` replaced by ``xj[b, j]``.

    Returns shape ``(B, n, n)``; uses selection (not addition) so that the
    unperturbed components are bit-identical to ``x0``.
    """
    n = x0.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=x0.device)
    return torch.where(eye, xj.unsqueeze(-1), x0.unsqueeze(-2))


#: Above this many residual values per call (``rows * n * m``), the perturbed
#: points of a batch of several problems are evaluated one column at a time:
#: every call then sees the same rows (so per-problem arguments are selected
#: once) and temporaries stay small. A single problem is always evaluated in
#: one call (its ``n`` points go to the user's function one by one anyway).
COLUMNWISE_ENTRIES = 2**16


def _column_values(fun: BatchedFun, x0: Tensor, xs: list[Tensor], j: int, idx: Tensor,
                   m: int) -> list[Tensor]:
    """``fun`` at ``x0`` with column ``j`` replaced by ``xk[:, j]``, one call per ``xk``."""
    bsz = x0.shape[0]
    out = []
    for xk in xs:
        pts = x0.clone()
        pts[:, j] = xk[:, j]
        fj = fun(pts, idx)
        if fj.shape != (bsz, m):
            raise ValueError(
                f"`fun` returned shape {tuple(fj.shape)} for {bsz} points; "
                f"expected {(bsz, m)}."
            )
        out.append(fj)
    return out


def _call(fun: BatchedFun, pts: Tensor, idx: Tensor, m: int) -> Tensor:
    """Evaluate ``fun`` on ``pts`` of shape ``(S, B, n, n)``; returns ``(S, B, n, m)``."""
    s, b, n, _ = pts.shape
    # idx.repeat_interleave(n).repeat(s), without the slow repeat_interleave
    # (one problem: its id repeated, a view)
    rows_idx = idx.expand(s * n) if b == 1 else idx.view(1, b, 1).expand(s, b, n).reshape(-1)
    out = fun(pts.reshape(s * b * n, n), rows_idx)
    if out.shape != (s * b * n, m):
        raise ValueError(
            f"`fun` returned shape {tuple(out.shape)} for {s * b * n} points; "
            f"expected {(s * b * n, m)}."
        )
    return out.reshape(s, b, n, m)


def finite_difference_jacobian(
    fun: BatchedFun,
    x: Tensor,
    f0: Tensor,
    idx: Tensor | None = None,
    method: FDMethod = "2-point",
    rel_step: Tensor | float | None = None,
    lb: Tensor | None = None,
    ub: Tensor | None = None,
) -> Tensor:
    """Finite-difference Jacobians of a batch of residual functions.

    Parameters
    ----------
    fun : callable
        ``fun(x, idx) -> f``: batched residuals.  ``x`` has shape ``(k, n)``
        and ``idx`` (a ``LongTensor`` of shape ``(k,)``) gives for each row the
        problem it belongs to; the result has shape ``(k, m)``.  Called exactly
        once.  For ``method='cs'``, ``x`` is complex and ``fun`` must be analytic.
    x : Tensor
        Points at which to differentiate, shape ``(B, n)``.
    f0 : Tensor
        ``fun(x, idx)``, shape ``(B, m)``.
    idx : Tensor, optional
        Problem index of each row of ``x``, shape ``(B,)``; defaults to
        ``arange(B)``.
    method : {'2-point', '3-point', 'cs'}
        Difference scheme (see the module docstring).
    rel_step : Tensor or float, optional
        Relative step, broadcastable to ``(B, n)`` (e.g. ``(n,)``).  Default: the
        dtype-dependent step of :func:`default_rel_step`, scaled by
        ``max(1, |x|)``.
    lb, ub : Tensor, optional
        Bounds broadcastable to ``(B, n)``; evaluation points stay within them
        (ignored for ``'cs'``).  ``x`` is assumed to satisfy them.

    Returns
    -------
    Tensor
        Jacobians, shape ``(B, m, n)``, dtype of ``f0`` and ``x`` promoted
        (real for ``'cs'``).
    """
    if method not in _FD_METHODS:
        raise ValueError(f"Unknown method {method!r}, should be one of {_FD_METHODS}.")
    if x.ndim != 2 or f0.ndim != 2 or x.shape[0] != f0.shape[0]:
        raise ValueError("`x` must have shape (B, n) and `f0` shape (B, m).")
    x0 = x.detach()
    if not x0.is_floating_point():
        x0 = x0.to(f0.dtype if f0.is_floating_point() else torch.float64)
    f0 = f0.detach()
    bsz, n = x0.shape
    m = f0.shape[1]
    if idx is None:
        idx = torch.arange(bsz, device=x0.device)

    rstep = default_rel_step(x0.dtype, f0.dtype, method)
    if _on_host(x0, f0, method, rel_step, lb, ub):
        return _host_differences(fun, x0, f0, idx, method, rstep, lb, ub)
    h = _absolute_step(x0, rstep, rel_step)

    columnwise = bsz > 1 and bsz * n * m > COLUMNWISE_ENTRIES

    def differences(base: Tensor, xs: list[Tensor],
                    formula: Callable[[list[Tensor], int | None, Tensor | None], Tensor]
                    ) -> Tensor:
        """Jacobians ``(B, m, n)`` from ``formula(values, j, out)``.

        ``values[k]`` holds ``f`` with column ``j`` of ``base`` replaced by
        ``xs[k][:, j]``: shape ``(B, m)`` for one column ``j`` (the result is
        written into ``out``), or ``(B, n, m)`` for all columns at once
        (``j=None``, one call of ``fun``, ``out=None``).
        """
        if not columnwise:
            if len(xs) == 1:
                pts = _perturb(base, xs[0]).unsqueeze(0)
            else:
                pts = torch.stack([_perturb(base, xk) for xk in xs])  # (S, B, n, n)
            values = _call(fun, pts, idx, m)
            return formula([values[k] for k in range(len(xs))], None, None).transpose(-1, -2)
        jt = None
        for j in range(n):
            values = _column_values(fun, base, xs, j, idx, m)
            if jt is None:
                dtype = values[0].real.dtype if method == "cs" else values[0].dtype
                jt = torch.empty((bsz, n, m), dtype=dtype, device=values[0].device)
            formula(values, j, jt[:, j])
        return jt.transpose(-1, -2)

    def at(t: Tensor, j: int | None) -> Tensor:
        """Per-variable ``t (B, n)`` against the values of column ``j`` (or all)."""
        return t.unsqueeze(-1) if j is None else t[:, j : j + 1]

    f0e = f0.unsqueeze(1) if not columnwise else f0
    held: list[Tensor] = []

    def scratch(out: Tensor) -> Tensor:
        """A contiguous buffer like the column ``out``, made once per Jacobian.

        A column's differences are formed there and divided into the column of
        ``jt`` (a strided ``(B, m)`` view) in one pass: the same operations as
        forming them in the column itself, with one strided pass instead of
        two (on 8,192 problems of 64 residuals, 6.1 ms per Jacobian instead of
        7.6).
        """
        if not held:
            held.append(torch.empty(out.shape, dtype=out.dtype, device=out.device))
        return held[0]

    if method == "cs":
        xc = torch.complex(x0, torch.zeros_like(x0))
        return differences(xc, [torch.complex(x0, h)],
                           lambda v, j, out: torch.div(complex_part(v[0]), at(h, j), out=out))

    bounded = lb is not None or ub is not None
    if bounded:
        inf = torch.full((), torch.inf, dtype=x0.dtype, device=x0.device)
        lb_t = -inf if lb is None else torch.as_tensor(lb, dtype=x0.dtype, device=x0.device)
        ub_t = inf if ub is None else torch.as_tensor(ub, dtype=x0.dtype, device=x0.device)
        lb_t, ub_t = torch.broadcast_tensors(lb_t, ub_t, x0)[:2]

    if method == "2-point":
        if bounded:
            h = _adjust_one_sided(x0, h, 1, lb_t, ub_t)
        x1 = x0 + h
        dx = x1 - x0

        def two_point(v: list[Tensor], j: int | None, out: Tensor | None) -> Tensor:
            if out is None:
                return torch.sub(v[0], f0e).div_(at(dx, j))
            return torch.div(torch.sub(v[0], f0e, out=scratch(out)), at(dx, j), out=out)

        return differences(x0, [x1], two_point)

    # 3-point
    limits = (lb_t, ub_t) if bounded else (None, None)
    xa, xb, dx, one_sided = three_point_points(x0, h, *limits)

    def three_point(v: list[Tensor], j: int | None, out: Tensor | None) -> Tensor:
        fa, fb = v
        df = torch.where(at(one_sided, j), -3.0 * f0e + 4 * fa - fb, fb - fa,
                         out=None if out is None else scratch(out))
        return df.div_(at(dx, j)) if out is None else torch.div(df, at(dx, j), out=out)

    return differences(x0, [xa, xb], three_point)


# Forward-mode AD and threads
# ---------------------------
# torch keeps the state of forward-mode AD per process, not per thread: the C++
# list of dual levels allows a single level in the whole process, and the Python
# counters ``torch.autograd.forward_ad._current_level`` and
# ``torch._functorch.eager_transforms.JVP_NESTING`` are module globals. When two
# threads run ``torch.func.jvp`` at once, the second one either fails ("no level
# exists", "invalid index"; the fallbacks below then answer with reverse mode,
# whose rounding differs) or silently runs inside the first thread's level, and
# when the first thread leaves, torch deletes that level's tangents: the second
# thread reads zero columns, a wrong Jacobian without any error (issue 17).
#
# So every forward-mode Jacobian of this module runs while holding one
# process-wide lock. That is safe because (1) at most one thread of this package
# is inside forward mode at any time, so it always owns the only level, exactly
# as in a single-threaded program, and its results are bit-identical to a
# sequential run; (2) the lock is re-entrant, so a ``fun`` that itself reaches
# this code in the same thread behaves as it would without the lock; (3) reverse
# mode (``torch.func.vjp``, ``vmap``, ``torch.autograd.grad``) keeps its state in
# thread-local storage (functorch's interpreter stack, grad mode), so it runs
# outside the lock and in parallel. Choosing reverse mode when the lock is busy
# would avoid the wait but make the result depend on timing; we wait instead.
# Single-threaded, the cost is one uncontended lock acquisition per Jacobian.
# Not covered: forward-mode AD run at the same time by code outside this
# package (a user's own ``torch.func.jvp`` or ``jacfwd`` in another thread).
_FORWARD_AD_LOCK = threading.RLock()
_forward_ad_ready = False  # guarded by _FORWARD_AD_LOCK


def _prepare_forward_ad() -> None:
    """Trigger torch's one-time lazy setup of forward-mode AD quietly.

    Call with ``_FORWARD_AD_LOCK`` held. On first use, forward AD compiles some
    decompositions with ``torch.jit.script``, which emits a
    ``DeprecationWarning`` in recent torch versions that is irrelevant to users
    of this package. ``warnings.catch_warnings`` is not used: it replaces the
    process-wide filter list and restores it on exit, which would discard
    filters that other threads add meanwhile (or leave ours behind for a
    thread that entered its own ``catch_warnings`` meanwhile). Instead one
    ``ignore`` entry, limited to ``DeprecationWarning`` raised from ``torch.jit``,
    is inserted into the filter list in use and removed from that same list
    afterwards; other threads only see that entry for the duration of the
    import, once per process.
    """
    global _forward_ad_ready
    if _forward_ad_ready:
        return
    loader = getattr(torch.autograd.forward_ad, "_maybe_load_decompositions", None)
    if loader is not None:
        filters = warnings.filters
        entry = ("ignore", None, DeprecationWarning, re.compile(r"torch\.jit"), 0)
        filters.insert(0, entry)
        _warning_filters_changed()
        try:
            loader()
        except Exception:  # pragma: no cover - best effort only
            pass
        finally:
            try:
                filters.remove(entry)
            except ValueError:  # pragma: no cover - the list was cleared meanwhile
                pass
            _warning_filters_changed()
    _forward_ad_ready = True


def _warning_filters_changed() -> None:
    """Invalidate the "already warned" caches after editing ``warnings.filters``.

    Done by ``warnings.filterwarnings`` and ``catch_warnings`` themselves; a
    no-op on Python versions without this hook.
    """
    hook = getattr(warnings, "_filters_mutated", None)
    if hook is not None:
        hook()


def _jac_forward(fun: Callable[[Tensor], Tensor], x: Tensor, vectorize: bool) -> Tensor:
    """Forward-mode Jacobian, ``(B, m, n)``; holds the forward-AD lock (see above)."""
    bsz, n = x.shape
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    tangents = eye.unsqueeze(1).expand(n, bsz, n)  # direction e_j for every row

    def push(t: Tensor) -> Tensor:
        return torch.func.jvp(fun, (x,), (t,))[1]

    with _FORWARD_AD_LOCK:
        _prepare_forward_ad()
        if vectorize:
            cols = torch.func.vmap(push)(tangents)  # (n, B, m)
        else:
            cols = torch.stack([push(tangents[j]) for j in range(n)])
    return cols.permute(1, 2, 0)


def _jac_reverse(
    fun: Callable[[Tensor], Tensor], x: Tensor, vectorize: bool, vjp_pair: tuple | None = None
) -> Tensor:
    """Reverse-mode Jacobian, ``(B, m, n)``."""
    out, vjp_fn = vjp_pair if vjp_pair is not None else torch.func.vjp(fun, x)
    bsz, m = out.shape
    eye = torch.eye(m, dtype=out.dtype, device=out.device)
    cotangents = eye.unsqueeze(1).expand(m, bsz, m)

    def pull(c: Tensor) -> Tensor:
        return vjp_fn(c)[0]

    if vectorize:
        rows = torch.func.vmap(pull)(cotangents)  # (m, B, n)
    else:
        rows = torch.stack([pull(cotangents[i]) for i in range(m)])
    return rows.permute(1, 0, 2)


def _jac_reverse_classic(fun: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Reverse-mode Jacobian with :func:`torch.autograd.grad`, one output column at a time."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fun(xg)
        m = out.shape[-1]
        rows = []
        for i in range(m):
            (g,) = torch.autograd.grad(
                out[:, i].sum(), xg, retain_graph=i < m - 1, allow_unused=True
            )
            rows.append(torch.zeros_like(xg) if g is None else g)
    return torch.stack(rows, dim=1)


#: Up to this many variables, forward mode loops over directions instead of vmapping.
SMALL_N = 8


def autograd_jacobian(
    fun_torch: Callable[[Tensor], Tensor], x: Tensor, m: int | None = None
) -> Tensor:
    """Jacobians of a batch of row-independent differentiable functions.

    Parameters
    ----------
    fun_torch : callable
        ``fun_torch(x) -> f`` with ``x`` of shape ``(B, n)`` and ``f`` of shape
        ``(B, m)``, differentiable with :mod:`torch.func`; row ``i`` of ``f``
        must depend on row ``i`` of ``x`` only.
    x : Tensor
        Points, shape ``(B, n)``.
    m : int, optional
        Number of residuals, if known; it lets forward mode be chosen without
        a preliminary evaluation.

    Returns
    -------
    Tensor
        Detached Jacobians, shape ``(B, m, n)``.

    Raises
    ------
    ValueError
        When every formulation fails because ``fun_torch`` converts the tensors
        it receives to numpy (:data:`AUTOGRAD_NEEDS_TORCH`, chained to torch's
        error). Any other error of the last formulation is raised unchanged.
        An exception that is not a ``RuntimeError`` (what torch's transforms
        raise for what they cannot do) comes from the caller's code: it is
        raised at once, not answered by another formulation (which would call
        ``fun_torch`` again and could let a one-off error pass).

    Notes
    -----
    Forward mode is used when ``n <= m`` and reverse mode otherwise, both
    vectorised with :func:`torch.func.vmap`.  If vectorisation fails for
    ``fun_torch`` (e.g. data-dependent control flow or unsupported ops) the
    directions are processed in a Python loop instead; if forward mode is not
    supported by an operation, reverse mode is tried, and as a last resort
    plain :func:`torch.autograd.grad` (which supports any
    :class:`torch.autograd.Function`) is looped over the ``m`` outputs.

    Safe to call from several threads at once: forward mode, whose state torch
    keeps per process, runs under a process-wide lock (see the comment above
    ``_FORWARD_AD_LOCK``); reverse mode needs none.
    """
    x = x.detach()
    n = x.shape[-1]
    vjp_pair = None
    if m is None:
        try:
            vjp_pair = torch.func.vjp(fun_torch, x)
            m = vjp_pair[0].shape[-1]
        except Exception:
            with torch.no_grad():
                m = fun_torch(x).shape[-1]

    attempts: list[Callable[[], Tensor]]
    if n <= m:
        # for a few directions a plain loop of jvp is faster than vmapping them
        # (about 1.5x for n = 4 on the CPU with torch 2.13)
        vectorize_first = n > SMALL_N
        attempts = [
            lambda: _jac_forward(fun_torch, x, vectorize_first),
            lambda: _jac_forward(fun_torch, x, not vectorize_first),
            lambda: _jac_reverse(fun_torch, x, False, vjp_pair),
            lambda: _jac_reverse_classic(fun_torch, x),
        ]
    else:
        attempts = [
            lambda: _jac_reverse(fun_torch, x, True, vjp_pair),
            lambda: _jac_reverse(fun_torch, x, False, vjp_pair),
            lambda: _jac_reverse_classic(fun_torch, x),
        ]
    errors: list[Exception] = []
    for attempt in attempts:
        try:
            jac = attempt()
        except RuntimeError as exc:  # (torch's transforms fail with RuntimeError only)
            errors.append(exc)  # the next formulation may work
        else:
            # the kept errors' tracebacks reference this frame: free them now
            # rather than leave a reference cycle (and its tensors) to the GC
            errors.clear()
            # (torch's forward mode can return float64 tangents for float32 x: a 0-d
            # float32 tensor times a Python float; the Jacobian is taken in x's dtype)
            return jac.detach() if jac.dtype == x.dtype else jac.detach().to(x.dtype)
    for exc in reversed(errors):  # chain the plainest formulation's message
        if _converts_to_numpy(exc):
            raise ValueError(AUTOGRAD_NEEDS_TORCH) from exc
    raise errors[-1]


#: Raised when ``jac='autograd'`` meets a function that leaves torch.
AUTOGRAD_NEEDS_TORCH = (
    "jac='autograd' differentiates `fun` with torch.func, so `fun` must compute its "
    "result with torch operations on the tensors it receives; it converted them to "
    "numpy (or another library) instead. Use jac='2-point', '3-point' or 'cs' "
    "(finite differences), or pass a callable `jac`."
)

#: Messages of torch's errors when a tensor being differentiated is turned into a
#: numpy array: plain autograd, forward mode / vmap (no storage), tensor subclasses.
_NUMPY_MARKERS = (
    "Can't call numpy() on Tensor that requires grad",
    "Cannot access data pointer of Tensor that doesn't have storage",
    ".numpy() is not supported for tensor subclasses",
)


def _converts_to_numpy(exc: BaseException) -> bool:
    """True when ``exc`` is torch's error for converting a traced tensor to numpy."""
    return isinstance(exc, RuntimeError) and any(k in str(exc) for k in _NUMPY_MARKERS)
