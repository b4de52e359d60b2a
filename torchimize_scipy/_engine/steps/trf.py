r"""Trust Region Reflective ('trf') step rule.

M. A. Branch, T. F. Coleman and Y. Li, "A Subspace, Interior, and Conjugate
Gradient Method for Large-Scale Bound-Constrained Minimization Problems",
SIAM J. Sci. Comput. 21(1), 1999.

With the Coleman-Li vector :math:`v(x)` and its derivative :math:`\partial v`,
the first-order optimality measure is :math:`\lVert v \odot g\rVert_\infty`.
Variables are scaled by :math:`D = \mathrm{diag}(v^{1/2} \odot s)` (``s`` the
``x_scale``), and the step in scaled variables solves the trust-region problem
for the augmented system :math:`[J D;\ \mathrm{diag}(g \odot \partial v \odot
s)^{1/2}]` (Moré's method on one SVD). If the step leaves the box, the best of
three candidates is taken: the step cut back to ``theta`` of the way to the
boundary, its reflection off the boundary, and the scaled anti-gradient, each
minimising the quadratic model along its line. Iterates are kept strictly
feasible. Without finite bounds all of this reduces to a plain scaled
trust-region Gauss-Newton method (Moré 1978).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm

from ..bounds import (
    coleman_li_scaling,
    in_bounds,
    make_strictly_feasible,
    step_size_to_bound,
)
from ..counts import known_unit, times
from ..host_scalars import Scalars, for_rows, is_host_value
from ..linalg import factorize
from ..problem import Problem
from ..quadratic import (
    build_quadratic_1d,
    evaluate_quadratic,
    intersect_trust_region,
    minimize_quadratic_1d,
    update_tr_radius,
)
from ..termination import RUNNING, trust_region_code
from ..trust_region import solve_trust_region_scipy
from ._common import (
    FACTOR_KEYS,
    alloc_factors,
    bound_activity,
    flag_singular_factors,
    inf_norm,
    initial_scale,
    known_factors,
    load_factors,
    store_factors,
    update_jac_scale,
)
from .base import ResultFields, StepRule, Verdict


def _coleman_li(state: dict) -> tuple[Tensor, Tensor]:
    """Coleman-Li ``v`` and ``dv`` at the current point (not yet scaled by ``x_scale``)."""
    return coleman_li_scaling(state["x"], state["g"], state["lb"], state["ub"])


def _scaled_v(v: Tensor, dv: Tensor, scale_inv: Tensor) -> Tensor:
    """``v / x_scale`` where ``dv != 0`` (``v`` itself for an ``x_scale`` of ones)."""
    if known_unit(scale_inv):
        return v
    return torch.where(dv != 0, v * scale_inv, v)


def _keep(sc: Scalars, state: dict, *values: Any) -> tuple[Any, ...]:
    """Per-problem values of the host ``sc`` in the form the state holds its radius:
    host values where ``init_state`` made it one (one float64 problem,
    :meth:`~.host_scalars.Scalars.keep`: no ``(1,)`` tensor made and read back per
    value), else ``(B,)`` tensors (a batch, and rules such as ``trf_lsmr``'s whose
    state holds tensors)."""
    if is_host_value(state["delta"]):
        return sc.keep(*values)
    return tuple(sc.tensor(v) for v in values)


class TRFTrial(NamedTuple):
    """A trial of 'trf': the point, the step's norms, the model's reduction, the damping."""

    x_new: Tensor
    step_norm: Tensor
    step_h_norm: Tensor  # in the scaled variables of the trust region
    predicted: Tensor
    alpha: Tensor


class TRF(StepRule):
    """Step rule of the Trust Region Reflective method."""

    state_keys = frozenset({
        "delta",  # trust radius (scaled variables)
        "alpha",  # Levenberg-Marquardt parameter of the last subproblem
        "tr_scaling",  # D = diag(v^(1/2) * x_scale): scaled variables are x / D
        "diag_h",  # the Coleman-Li term g * dv * x_scale of the augmented system
        "g_h",  # the scaled gradient D g
        "theta",  # how close to the bounds a cut-back step may go
        "coleman_li_v", "coleman_li_dv",  # bounded: Coleman-Li v, dv of the outer iteration
        *FACTOR_KEYS,
    })

    def init_state(self, problem: Problem, state: dict) -> None:
        initial_scale(problem, state)
        if problem.bounded:
            v, dv = _coleman_li(state)
            v = _scaled_v(v, dv, state["scale_inv"])
            delta = vnorm(state["x"] * state["scale_inv"] / v.sqrt(), dim=-1)
        else:  # v = 1: the division by sqrt(v) is exact (and a product by ones too)
            delta = vnorm(times(state["scale_inv"], state["x"]), dim=-1)
        x = state["x"]
        sc = for_rows(x)
        if sc.floats:  # one problem: its radius, damping and theta as host values
            delta = sc.get(delta)
            state["delta"], state["alpha"], state["theta"] = sc.keep(
                sc.xp.where(delta == 0, 1.0, delta), sc.full(0.0), sc.full(0.0))
        else:
            delta = torch.where(delta == 0, 1.0, delta)
            state["delta"] = delta
            state["alpha"] = torch.zeros_like(delta)
            state["theta"] = torch.zeros_like(delta)
        state["tr_scaling"] = torch.ones_like(x)
        state["diag_h"] = torch.zeros_like(x)
        state["g_h"] = torch.zeros_like(x)
        alloc_factors(problem, state, augmented=problem.bounded)
        if problem.bounded:  # Coleman-Li data of the outer iteration, to build_model()
            state["coleman_li_v"] = torch.ones_like(x)
            state["coleman_li_dv"] = torch.zeros_like(x)

    def measure_optimality(self, problem: Problem, state: dict) -> Tensor:
        sc = for_rows(state["x"])
        if (sc.host or problem.bounded) and problem.n:  # (a maximum: exact on either side)
            with sc.quiet():
                g = sc.rows(state["g"])
                if problem.bounded:
                    v, dv = coleman_li_scaling(sc.rows(state["x"]), g, sc.rows(state["lb"]),
                                               sc.rows(state["ub"]), sc)
                    state["coleman_li_v"] = sc.tensor_rows(v)
                    state["coleman_li_dv"] = sc.tensor_rows(dv)
                    g = g * v
                optimality = sc.max_rows(abs(g))
            state["optimality"], = _keep(sc, state, optimality)
            return sc.tensor(optimality < problem.gtol)
        if problem.bounded:
            v, dv = _coleman_li(state)
            state["coleman_li_v"], state["coleman_li_dv"] = v, dv
            state["optimality"] = inf_norm(state["g"] * v)
        else:
            state["optimality"] = inf_norm(state["g"])
        return state["optimality"] < problem.gtol

    def build_model(self, problem: Problem, state: dict) -> None:
        if problem.bounded:
            v, dv = state["coleman_li_v"], state["coleman_li_dv"]  # x, g as measured
            v = _scaled_v(v, dv, state["scale_inv"])
            d = times(state["scale"], v.sqrt())
            diag_h = times(state["scale"], state["g"] * dv)
            state["diag_h"] = diag_h
            sc = for_rows(state["x"])  # (the optimality is a host value on the CPU)
            theta = 1 - sc.get(state["optimality"])
            # (NaN kept)
            state["theta"], = _keep(sc, state, sc.xp.where(theta < 0.995, 0.995, theta))
        else:
            d = state["scale"]
            diag_h = None
        state["tr_scaling"] = d
        state["g_h"] = times(d, state["g"])
        fac = factorize(state["J"], d, state["f"], diag_h, gram=state["G"], g=state["g"],
                        use_gram=problem.use_gram, rejected=state.get("fac_rejected"),
                        known=known_factors(state))
        store_factors(state, fac)
        flag_singular_factors(state, fac.s)

    def propose_step(self, problem: Problem, state: dict) -> TRFTrial:
        sc = for_rows(state["x"])
        p_h, alpha = solve_trust_region_scipy(load_factors(state), state["delta"], state["alpha"],
                                              problem.m, problem.n, host=sc.host)
        d = state["tr_scaling"]
        diag_h = state["diag_h"] if problem.bounded else None
        if problem.bounded:
            with sc.quiet():
                step, step_h, value = _select_step(state, p_h, diag_h, sc)
                x_new = make_strictly_feasible(sc.rows(state["x"]) + step, sc.rows(state["lb"]),
                                               sc.rows(state["ub"]), 0, sc)
            step, step_h, x_new = (sc.tensor_rows(v) for v in (step, step_h, x_new))
        else:
            step_h = p_h
            step = times(d, p_h)
            model, kw = _model_rows(state, None, sc)
            with sc.quiet():
                value = evaluate_quadratic(*model, sc.rows(p_h), **kw)
                # (one problem: numpy's sum of the host rows, the same values, which the
                # residual function's adapter then reads without a conversion)
                x_new = (sc.tensor_rows(sc.rows(state["x"]) + sc.rows(step)) if sc.floats
                         else state["x"] + step)
        # (on the host the negation is numpy's, on a scalar)
        predicted, = _keep(sc, state, -value) if sc.host else (-value,)
        # (x_scale of ones: the step is the scaled step, the same tensor)
        if sc.floats:  # (torch's norms, host values: a Gauss-Newton step's is known)
            step_norm = sc.norm(step)
            step_h_norm = step_norm if step_h is step else sc.norm(step_h)
            step_norm, step_h_norm = _keep(sc, state, step_norm, step_h_norm)
        else:
            step_norm = vnorm(step, dim=-1)
            step_h_norm = step_norm if step_h is step else vnorm(step_h, dim=-1)
        return TRFTrial(x_new, step_norm, step_h_norm, predicted, alpha)

    def assess_trial(self, problem: Problem, state: dict, trial: TRFTrial, f_new: Tensor,
                     cost_new: Tensor, finite: Tensor) -> Verdict:
        # per-problem scalar work, on the host when on the CPU (see host_scalars)
        sc = Scalars(cost_new)
        xp = sc.xp
        with sc.quiet():
            delta, cost, cost_new_h, predicted, step_norm, step_h_norm, alpha = sc.get_many(
                state["delta"], state["cost"], cost_new, trial.predicted, trial.step_norm,
                trial.step_h_norm, trial.alpha)
            fin = sc.get(finite)
            actual = cost - cost_new_h
            delta_new, ratio = update_tr_radius(delta, actual, predicted, step_h_norm,
                                                step_h_norm > 0.95 * delta, xp)
            status = trust_region_code(actual, cost, step_norm, sc.norm(state["x"]), ratio, fin,
                                       problem.ftol, problem.xtol, xp)
            cont = fin & (status == RUNNING)
            safe_new = xp.where(delta_new > 0, delta_new, 1.0)
            alpha = xp.where(cont, alpha * delta / safe_new, alpha)
            delta = xp.where(cont, delta_new, xp.where(fin, delta, 0.25 * step_h_norm))
            accept = fin & (actual > 0)
        state["alpha"], state["delta"] = _keep(sc, state, alpha, delta)
        return Verdict(sc.tensor(accept), sc.tensor(status), trial.x_new)

    def after_jacobian(self, problem: Problem, state: dict) -> None:
        update_jac_scale(problem, state)

    def result_fields(self, problem: Problem, state: dict) -> ResultFields:
        return bound_activity(problem, state)


def select_step(state: dict, p_h: Tensor, diag_h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Choose between the cut-back, reflected and anti-gradient steps (batched).

    Returns ``(step, step_h, predicted_reduction)``. The products with ``J``
    are torch operations; the elementwise work on ``(B, n)`` rows and the
    per-problem scalars is on the host when the tensors are on the CPU
    (:class:`~.host_scalars.Scalars`).
    """
    sc = Scalars(state["delta"])
    with sc.quiet():
        step, step_h, value = _select_step(state, p_h, diag_h, sc)
    return (sc.tensor_rows(step), sc.tensor_rows(step_h),
            sc.tensor(-value) if sc.host else -value)


def _select_step(state: dict, p_h: Tensor, diag_h: Tensor,
                 sc: Scalars) -> tuple[Any, Any, Any]:
    """:func:`select_step` with the rows and the model's values kept by ``sc``.

    The caller holds ``sc.quiet()``. The model's values (products with ``J``,
    or with ``G = J^T J`` on the Gram route) are computed on rows as ``sc``
    keeps them too: in numpy on the host.
    """
    xp = sc.xp
    rows, col = sc.rows, sc.as_col
    x_, lb_, ub_, d_, p_h_ = (rows(t) for t in (state["x"], state["lb"], state["ub"],
                                                  state["tr_scaling"], p_h))
    model, kw = _model_rows(state, diag_h, sc)
    p_ = d_ * p_h_
    inside = in_bounds(x_ + p_, lb_, ub_, sc)
    n_inside = sc.count(inside)
    if n_inside == sc.B:
        return p_, p_h_, evaluate_quadratic(*model, p_h_, **kw)

    delta, theta = sc.get(state["delta"]), sc.get(state["theta"])
    p_stride, hits = step_size_to_bound(x_, p_, lb_, ub_, sc)
    p_stride = xp.where(inside, 1.0, p_stride)
    r_h = xp.where(hits != 0, -p_h_, p_h_)
    r = d_ * r_h
    p_cut = p_ * col(p_stride)
    p_h_cut = p_h_ * col(p_stride)
    x_on_bound = x_ + p_cut
    _, to_tr = intersect_trust_region(p_h_cut, r_h, delta, sc)
    to_bound, _ = step_size_to_bound(x_on_bound, r, lb_, ub_, sc)
    r_stride = xp.minimum(to_bound, to_tr)
    positive = r_stride > 0
    safe_rs = xp.where(positive, r_stride, 1.0)
    r_lo = xp.where(positive, (1 - theta) * p_stride / safe_rs, 0.0)
    r_hi = xp.where(positive, xp.where(r_stride == to_bound, theta * to_bound, to_tr), -1.0)
    usable = r_lo <= r_hi
    p_theta = p_cut * col(theta)
    p_h_theta = p_h_cut * col(theta)
    a, b, c = build_quadratic_1d(*model, r_h, s0=p_h_cut, **kw)
    p_value = evaluate_quadratic(*model, p_h_theta, **kw)
    r_hi_f = xp.where(usable & xp.isfinite(r_hi), r_hi, r_lo)
    t_r, r_value = minimize_quadratic_1d(a, b, r_lo, r_hi_f, c=c, xp=xp)
    r_h_new = r_h * col(t_r) + p_h_cut
    r_value = xp.where(usable, r_value, math.inf)

    ag_h = -model[2]
    ag = d_ * ag_h
    ag_norm = sc.norm(state["g_h"])  # (torch's norm, as the tensor path's)
    to_tr_ag = delta / xp.where(ag_norm > 0, ag_norm, 1.0)
    to_bound_ag, _ = step_size_to_bound(x_, ag, lb_, ub_, sc)
    ag_stride = xp.where(to_bound_ag < to_tr_ag, theta * to_bound_ag, to_tr_ag)
    a2, b2, _ = build_quadratic_1d(*model, ag_h, **kw)
    t_ag, ag_value = minimize_quadratic_1d(a2, b2, sc.full(0.0), ag_stride, xp=xp)
    ag_h = ag_h * col(t_ag)
    ag = ag * col(t_ag)

    use_p = (p_value < r_value) & (p_value < ag_value)
    use_r = (use_p == 0) & (r_value < p_value) & (r_value < ag_value)
    step_h = xp.where(col(use_p), p_h_theta, xp.where(col(use_r), r_h_new, ag_h))
    step = xp.where(col(use_p), p_theta, xp.where(col(use_r), d_ * r_h_new, ag))
    value = xp.where(use_p, p_value, xp.where(use_r, r_value, ag_value))
    step_h = xp.where(col(inside), p_h_, step_h)
    step = xp.where(col(inside), p_, step)
    if n_inside:
        value = xp.where(inside, evaluate_quadratic(*model, p_h_, **kw), value)
    return step, step_h, value


def _model_rows(state: dict, diag_h: Tensor | None, sc: Scalars) -> tuple[tuple, dict]:
    """The quadratic model's data as rows kept by ``sc``: the positional arguments
    ``(J, d, g_h)`` of :func:`~.quadratic.evaluate_quadratic` and
    :func:`~.quadratic.build_quadratic_1d` (``d`` None for a scaling of ones) and their
    keywords ``diag``, ``G``, ``gram`` and ``sc``. ``J`` stays an operator under
    ``tr_solver='lsmr'``; a tensor is converted once (``sc`` remembers its rows)."""
    J, d, G, gram = state["J"], state["tr_scaling"], state["G"], state.get("fac_gram")
    rows = sc.rows
    if gram is not None:
        gram = sc.get(gram)
        if not sc.count(gram):
            G = gram = None
    kw = {"diag": None if diag_h is None else rows(diag_h),
          "G": None if G is None else rows(G), "gram": gram, "sc": sc}
    return (rows(J) if isinstance(J, Tensor) else J, None if known_unit(d) else rows(d),
            rows(state["g_h"])), kw
