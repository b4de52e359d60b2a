r"""Dogleg in rectangular trust regions ('dogbox').

C. Voglis and I. E. Lagaris, "A Rectangular Trust Region Dogleg Approach for
Unconstrained and Bound Constrained Nonlinear Optimization", WSEAS
International Conference on Applied Mathematics, 2004.

The trust region is the box :math:`|p_i| \le \Delta s_i` (``s`` the
``x_scale``), intersected with the feasible box. Variables sitting on a bound
whose anti-gradient points outward are frozen for the iteration. On the free
variables the step is Powell's dogleg between the Cauchy point (the minimiser
of the model along :math:`-g` inside the box) and the Gauss-Newton step (the
minimum-norm least-squares solution), cut where it leaves the box.

The Gauss-Newton step is that of LAPACK's ``gelsd`` with a negative ``rcond``
(what scipy calls): singular values above :math:`\epsilon/2` (LAPACK's machine
epsilon) times the largest are kept. At a rank-deficient point, such as a sum
of interchangeable terms started with equal parameters, a kept singular value
at rounding level gives a long step out of the symmetric subspace, which the
dogleg then cuts to the box; dropping it (an :math:`\epsilon` threshold) kept
the iterates symmetric for ever. Which rounding-level values pass is chance,
for scipy and for us alike (``benchmarks/sweep_symmetric.py``). The frozen
variables take exactly no Gauss-Newton step: the SVD of the Jacobian with
their columns zeroed leaves rounding noise on them, which would fail the
dogleg's in-bounds test at an active bound and cut every step to the Cauchy
point. Each zeroed column adds a zero singular value, which the SVD returns
as rounding noise near :math:`\epsilon` times the largest; such a value can
pass the cut-off and send a long step through the free variables too, so the
singular values beyond the count of free variables are dropped (the step is
then that of the free columns alone, as scipy's ``lstsq(J[:, free], -f)``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm

from ..bounds import in_bounds, step_size_to_bound
from ..counts import known_count, remember
from ..host_scalars import SMALL_ENTRIES, Scalars, for_rows
from ..linalg import factorize
from ..problem import Problem
from ..quadratic import (
    build_quadratic_1d,
    evaluate_quadratic,
    minimize_quadratic_1d,
    update_tr_radius,
)
from ..termination import trust_region_code
from ..trust_region import minimum_norm_step
from ._common import (
    flag_singular_factors,
    inf_norm,
    initial_scale,
    update_jac_scale,
)
from .base import ResultFields, StepRule, Verdict


class DogboxTrial(NamedTuple):
    """A trial of 'dogbox': the point, the model's reduction and the boxes the step hit."""

    x_new: Tensor
    step_norm: Tensor
    step_h_norm: Tensor  # max-norm in the variables scaled by x_scale
    predicted: Tensor
    tr_hit: Tensor  # (B,) the step reached the trust box
    on_bound: Tensor  # (B, n) the bounds the new point lies on (-1, 1, 0)


class Dogbox(StepRule):
    """Step rule of the rectangular-trust-region dogleg method."""

    state_keys = frozenset({
        "delta",  # trust-box half-width (variables scaled by x_scale)
        "on_bound",  # (B, n) -1/1 on a lower/upper bound, 0 free
        "free",  # (B, n) variables not frozen at a bound in this outer iteration
        "newton",  # (B, n) Gauss-Newton step on the free variables
        "antigrad_quad", "antigrad_lin",  # model a t^2 + b t along the free anti-gradient
    })

    def init_state(self, problem: Problem, state: dict) -> None:
        initial_scale(problem, state)
        x = state["x"]
        sc = for_rows(x)
        if sc.floats:  # one float64 problem: its start's values on the host, exact as torch's
            with sc.quiet():
                x_h, lb_h, ub_h, scale_inv = (sc.rows(state[k])
                                              for k in ("x", "lb", "ub", "scale_inv"))
                delta = _max_abs(sc, x_h * scale_inv)
                state["delta"] = _kept(sc, sc.xp.where(delta == 0, 1.0, delta))
                state["on_bound"] = sc.tensor_rows(
                    np.where(x_h == ub_h, 1, np.where(x_h == lb_h, -1, 0)).astype(np.int64))
            state["free"] = sc.tensor_rows(np.ones(x.shape, dtype=bool))
            state["newton"] = sc.tensor_rows(np.zeros(x.shape))
            state["antigrad_quad"] = _kept(sc, sc.full(0.0))
            state["antigrad_lin"] = _kept(sc, sc.full(0.0))
            return
        delta = inf_norm(x * state["scale_inv"])
        delta = torch.where(delta == 0, 1.0, delta)
        state["delta"] = delta
        on_bound = torch.zeros_like(x, dtype=torch.long)
        on_bound = torch.where(x == state["lb"], -1, on_bound)
        state["on_bound"] = torch.where(x == state["ub"], 1, on_bound)
        state["free"] = torch.ones_like(x, dtype=torch.bool)
        state["newton"] = torch.zeros_like(x)
        state["antigrad_quad"] = torch.zeros_like(delta)
        state["antigrad_lin"] = torch.zeros_like(delta)

    def measure_optimality(self, problem: Problem, state: dict) -> Tensor:
        # elementwise work and a maximum: on the host when on the CPU (the same values)
        sc = for_rows(state["x"])
        g = sc.rows(state["g"])
        on_bound, = sc.view(state["on_bound"])
        if sc.floats:  # one problem: its few values as Python numbers (the same IEEE values)
            free, optimality = _free_and_optimality(on_bound[0].tolist(), g[0].tolist())
        else:
            free = (on_bound * g < 0) == 0  # (not frozen at a bound)
            optimality = _max_abs(sc, sc.xp.where(free, g, 0.0))
        state["free"] = free_t = sc.tensor_rows(free)
        if sc.host:  # (the host knows whether every variable is free: _all_free)
            remember(free_t, int(np.count_nonzero(free)))
        state["optimality"] = _kept(sc, optimality)
        return sc.tensor(optimality < problem.gtol)

    def build_model(self, problem: Problem, state: dict) -> None:
        free = state["free"]
        every = _all_free(free)
        sc = for_rows(state["x"])
        J = state["J"]
        # one small problem with frozen variables: J's and g's free parts on the host
        # (numpy's products and selections: the same values; the rows C-ordered, as the
        # host's copy of the tensor path's J_free would be)
        host_free = (not every and sc.floats and isinstance(J, Tensor)
                     and J.shape[-2] * J.shape[-1] <= SMALL_ENTRIES)
        if host_free:
            free_h = sc.rows(free)
            with sc.quiet():  # (inf * 0 is NaN there as here, without a warning)
                J_free = sc.tensor_rows(sc.rows(J) * free_h[:, None, :])
            g_free = sc.tensor_rows(np.where(free_h, sc.rows(state["g"]), 0.0))
        else:
            J_free = _free_columns(J, free, every)
            g_free = state["g"] if every else torch.where(free, state["g"], 0.0)
        G = state["G"]
        G_free = None
        if problem.use_gram:
            # Gram matrix of the free columns; a fixed variable gets a lone
            # diagonal entry of the same scale (its right-hand side is 0, so its
            # step is 0) rather than a zero row that would make it singular
            fm = free.to(G.dtype)
            col2 = torch.diagonal(G, dim1=-2, dim2=-1)
            fixed_diag = torch.where(col2 > 0, col2, 1.0) * (1 - fm)
            G_free = G * fm.unsqueeze(-1) * fm.unsqueeze(-2) + torch.diag_embed(fixed_diag)
        fac = factorize(J_free, None, state["f"], gram=G_free, g=g_free,
                        use_gram=problem.use_gram)
        # gelsd's threshold (eps/2 * s_max) and no step on the frozen variables: see the
        # module notes (the cut-off and quotients on the host when on the CPU)
        # (the zeroed columns' singular values dropped: the SVD of the free columns alone)
        n_free = None if every else free.sum(-1)
        newton = minimum_norm_step(fac, rcond=0.5 * torch.finfo(J_free.dtype).eps,
                                   torch_product=True, rank_limit=n_free)
        if every:
            state["newton"] = newton
        elif host_free:
            state["newton"] = sc.tensor_rows(np.where(free_h, sc.rows(newton), 0.0))
        else:
            state["newton"] = torch.where(free, newton, 0.0)
        flag_singular_factors(state, fac.s)
        # -g_free vanishes on the fixed variables: J_free (-g_free) = J (-g_free); the
        # model's coefficients on the host when on the CPU (Scalars; numpy's products)
        gram = fac.gram
        if gram is not None:
            gram = sc.get(gram)
            if not sc.count(gram):
                G = gram = None
        g_rows = sc.rows(g_free)
        with sc.quiet():
            quad, lin, _ = build_quadratic_1d(sc.rows(J_free), None, g_rows, -g_rows,
                                              G=None if G is None else sc.rows(G), gram=gram,
                                              sc=sc)
        state["antigrad_quad"], state["antigrad_lin"] = _kept(sc, quad), _kept(sc, lin)

    def propose_step(self, problem: Problem, state: dict) -> DogboxTrial:
        # the elementwise work on (B, n) rows on the host when on the CPU (Scalars); the
        # model's value (products with J) and the step's norm are torch operations
        # (every variable free, as always without bounds: the selections by ``free`` are
        # the identity, and without bounds so is the clip to them; skipped, the same values)
        sc = for_rows(state["x"])
        xp, rows = sc.xp, sc.rows
        x, lb, ub = rows(state["x"]), rows(state["lb"]), rows(state["ub"])
        every = _all_free(state["free"])
        free, on_bound = sc.view(state["free"], state["on_bound"])
        with sc.quiet():
            g_free = rows(state["g"]) if every else xp.where(free, rows(state["g"]), 0.0)
            tr = sc.get_col(state["delta"]) * rows(state["scale"])
            step, hits, tr_hit = _dogleg(sc, x, rows(state["newton"]), g_free,
                                         state["antigrad_quad"], state["antigrad_lin"], tr, lb,
                                         ub)
            if not every:
                step = xp.where(free, step, 0.0)
            x_new = x + step
            if problem.bounded:
                x_new = xp.minimum(xp.maximum(x_new, lb), ub)
            on_bound_new = hits if every else xp.where(free, hits, on_bound)
            step_h_norm = _max_abs(sc, step * rows(state["scale_inv"]))
        step_t = sc.tensor_rows(step)
        predicted = self.predicted_reduction(state, sc.tensor_rows(g_free), step_t)
        # (one problem: torch's norm as a host value, Scalars.keep)
        step_norm = _kept(sc, sc.norm(step_t)) if sc.floats else vnorm(step_t, dim=-1)
        return DogboxTrial(sc.tensor_rows(x_new), step_norm, _kept(sc, step_h_norm),
                           predicted, sc.tensor(tr_hit), sc.tensor_rows(on_bound_new))

    def predicted_reduction(self, state: dict, g_free: Tensor, step: Tensor) -> Tensor:
        """The decrease of the quadratic model along ``step`` (zero on frozen variables)."""
        # on the host when on the CPU (Scalars): the products in numpy
        free = state["free"]
        sc = for_rows(state["x"])
        J = sc.rows(state["J"])
        if not _all_free(free):  # (J with the frozen variables' columns zeroed)
            free_rows = sc.rows(free)
            J = J * (free_rows[:, None, :] if sc.host else free_rows.unsqueeze(-2))
        with sc.quiet():
            value = evaluate_quadratic(J, None, sc.rows(g_free), sc.rows(step), sc=sc)
        return _kept(sc, -value)

    def assess_trial(self, problem: Problem, state: dict, trial: DogboxTrial, f_new: Tensor,
                     cost_new: Tensor, finite: Tensor) -> Verdict:
        # per-problem scalar work, on the host when on the CPU (see host_scalars)
        sc = Scalars(cost_new)
        xp = sc.xp
        with sc.quiet():
            delta, cost, cost_new_h, predicted, step_norm, step_h_norm = sc.get_many(
                state["delta"], state["cost"], cost_new, trial.predicted, trial.step_norm,
                trial.step_h_norm)
            fin, tr_hit = sc.get_many(finite, trial.tr_hit)
            actual = cost - cost_new_h
            delta_new, ratio = update_tr_radius(delta, actual, predicted, step_h_norm, tr_hit,
                                                xp)
            delta = xp.where(fin, delta_new, 0.25 * step_h_norm)
            status = trust_region_code(actual, cost, step_norm, sc.norm(state["x"]), ratio, fin,
                                       problem.ftol, problem.xtol, xp)
            accept_h = fin & (actual > 0)
            on_bound_new, on_bound = sc.view(trial.on_bound, state["on_bound"])
            on_bound = xp.where(sc.as_col(accept_h), on_bound_new, on_bound)
            x_acc = xp.where(on_bound == -1, sc.rows(state["lb"]),
                             xp.where(on_bound == 1, sc.rows(state["ub"]), sc.rows(trial.x_new)))
        state["delta"] = _kept(sc, delta)
        state["on_bound"] = sc.tensor_rows(on_bound)
        return Verdict(sc.tensor(accept_h), sc.tensor(status), sc.tensor_rows(x_acc))

    def after_jacobian(self, problem: Problem, state: dict) -> None:
        update_jac_scale(problem, state)

    def result_fields(self, problem: Problem, state: dict) -> ResultFields:
        return ResultFields(state["on_bound"])


def _kept(sc: Scalars, value):
    """Per-problem values kept by ``sc`` in the form the state holds them: one float64
    problem's host value as it is (:meth:`~.host_scalars.Scalars.keep`: no ``(1,)``
    tensor made and read back per value), else the ``(B,)`` tensor."""
    if sc.floats:
        return sc.keep(value)[0]
    return sc.tensor(value) if sc.host else value


def _free_and_optimality(on_bound: list[int], g: list[float]) -> tuple[np.ndarray, np.float64]:
    """:meth:`Dogbox.measure_optimality`'s free variables ``(1, n)`` and max-norm of the
    free gradient of one problem from its rows as Python numbers: the same products,
    comparisons and maximum as numpy's (a NaN propagates, as through ``numpy.amax``)."""
    free = [not b * v < 0 for b, v in zip(on_bound, g, strict=True)]
    best = 0.0
    for keep, v in zip(free, g, strict=True):
        if keep:
            a = abs(v)
            if a != a:  # (NaN)
                best = a
                break
            if a > best:
                best = a
    return np.array([free], dtype=bool), np.float64(best)


def _max_abs(sc: Scalars, a) -> object:
    """Max-norm of rows ``a`` kept by ``sc`` (0 for empty rows): exact on either side."""
    return sc.max_rows(abs(a)) if a.shape[-1] else sc.full(0.0)


def dogleg_step(x: Tensor, newton: Tensor, g: Tensor, a: Tensor, b: Tensor, tr_bounds: Tensor,
                lb: Tensor, ub: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Dogleg step inside the intersection of the trust box and the feasible box.

    Returns the step ``(B, n)``, the bounds it hits (``-1``/``1``/``0`` per
    variable, original bounds only) and whether it hit the trust box ``(B,)``.
    Every operation is elementwise or a row's minimum, on the host when the
    tensors are on the CPU (:class:`~.host_scalars.Scalars`; the same results).
    """
    sc = Scalars(a)
    rows = sc.rows
    with sc.quiet():
        step, hits, tr_hit = _dogleg(sc, rows(x), rows(newton), rows(g), a, b, rows(tr_bounds),
                                     rows(lb), rows(ub))
    return sc.tensor_rows(step), sc.tensor_rows(hits), sc.tensor(tr_hit)


def _dogleg(sc: Scalars, x_h, newton_h, g_h, a: Tensor, b: Tensor, tr_h, lb_h, ub_h):
    """:func:`dogleg_step` on rows kept by ``sc`` (the caller holds ``sc.quiet()``).

    ``a`` and ``b`` are tensors; the bounds hit are rows of integers.
    """
    xp = sc.xp
    lb_c = lb_h - x_h
    ub_c = ub_h - x_h
    lb_total = xp.maximum(lb_c, -tr_h)
    ub_total = xp.minimum(ub_c, tr_h)
    newton_ok = in_bounds(newton_h, lb_total, ub_total, sc)
    if sc.count(newton_ok) == sc.B:  # every Newton step fits: no dogleg
        return newton_h, sc.as_long(xp.zeros_like(newton_h)), newton_ok == 0
    to_bounds, _ = step_size_to_bound(xp.zeros_like(x_h), -g_h, lb_total,
                                      ub_total, sc)
    t_c, _ = minimize_quadratic_1d(sc.get(a), sc.get(b), sc.full(0.0),
                                   xp.where(xp.isfinite(to_bounds), to_bounds, 0.0), xp=xp)
    cauchy = -sc.as_col(t_c) * g_h
    diff = newton_h - cauchy
    t, hits = step_size_to_bound(cauchy, diff, lb_total, ub_total, sc)
    t = xp.where(xp.isfinite(t), t, 0.0)
    step = cauchy + sc.as_col(t) * diff
    bound_hits = xp.where((hits < 0) & (lb_total == lb_c), -1, 0)
    bound_hits = xp.where((hits > 0) & (ub_total == ub_c), 1, bound_hits)
    tr_hit = sc.any_rows(((hits < 0) & (lb_total == -tr_h))
                         | ((hits > 0) & (ub_total == tr_h)))
    ok = sc.as_col(newton_ok)
    step = xp.where(ok, newton_h, step)
    bound_hits = sc.as_long(xp.where(ok, 0, bound_hits))
    tr_hit = (newton_ok == 0) & tr_hit
    return step, bound_hits, tr_hit


def _all_free(free: Tensor) -> bool:
    """Whether every variable of every row is free, known without a read (the host's
    count, remembered by ``measure_optimality``; False when not known)."""
    return known_count(free) == free.numel()


def _free_columns(J: Tensor, free: Tensor, every: bool) -> Tensor:
    """``J`` with the columns of the frozen variables zeroed (``J`` itself if none is:
    ``J * 1`` is ``J`` exactly, and a Jacobian marked finite keeps its mark)."""
    return J if every else J * free.unsqueeze(-2)
