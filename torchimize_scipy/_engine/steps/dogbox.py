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
point.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm

from .. import status as codes
from ..bounds import in_bounds, step_size_to_bound
from ..linalg import factorize, gauss_newton_step
from ..problem import Problem
from ..quadratic import (
    build_quadratic_1d,
    check_termination,
    evaluate_quadratic,
    minimize_quadratic_1d,
    update_tr_radius,
)
from ._common import (
    StepRule,
    flag_singular_factors,
    inf_norm,
    initial_scale,
)


class Dogbox(StepRule):
    """Step rule of the rectangular-trust-region dogleg method."""

    name = "dogbox"

    def init(self, problem: Problem, state: dict) -> None:
        initial_scale(problem, state)
        x = state["x"]
        delta = inf_norm(x * state["scale_inv"])
        state["delta"] = torch.where(delta == 0, torch.ones_like(delta), delta)
        on_bound = torch.zeros_like(x, dtype=torch.long)
        on_bound = torch.where(x == state["lb"], -1, on_bound)
        state["on_bound"] = torch.where(x == state["ub"], 1, on_bound)
        state["free"] = torch.ones_like(x, dtype=torch.bool)
        state["newton"] = torch.zeros_like(x)
        state["qa"] = torch.zeros_like(delta)
        state["qb"] = torch.zeros_like(delta)

    def top(self, problem: Problem, state: dict) -> Tensor:
        free = ~(state["on_bound"] * state["g"] < 0)
        state["free"] = free
        state["optimality"] = inf_norm(torch.where(free, state["g"], 0.0))
        return state["optimality"] < problem.gtol

    def prepare(self, problem: Problem, state: dict) -> None:
        free = state["free"]
        J_free = state["J"] * free.unsqueeze(-2)
        g_free = torch.where(free, state["g"], 0.0)
        G = state["G"]
        G_free = None
        if problem.use_gram:
            # Gram matrix of the free columns; a fixed variable gets a lone
            # diagonal entry of the same scale (its right-hand side is 0, so its
            # step is 0) rather than a zero row that would make it singular
            fm = free.to(G.dtype)
            col2 = torch.diagonal(G, dim1=-2, dim2=-1)
            fixed_diag = torch.where(col2 > 0, col2, torch.ones_like(col2)) * (1 - fm)
            G_free = G * fm.unsqueeze(-1) * fm.unsqueeze(-2) + torch.diag_embed(fixed_diag)
        fac = factorize(J_free, None, state["f"], gram=G_free, g=g_free,
                        use_gram=problem.use_gram)
        # gelsd's threshold (eps/2 * s_max) and no step on the frozen variables: see the
        # module notes
        newton = gauss_newton_step(fac, rcond=0.5 * torch.finfo(J_free.dtype).eps)
        state["newton"] = torch.where(free, newton, 0.0)
        flag_singular_factors(state, fac.s)
        # -g_free vanishes on the fixed variables: J_free (-g_free) = J (-g_free)
        state["qa"], state["qb"], _ = build_quadratic_1d(J_free, None, g_free, -g_free, G=G,
                                                         gram=fac.gram)

    def propose(self, problem: Problem, state: dict) -> dict:
        x, lb, ub, free = state["x"], state["lb"], state["ub"], state["free"]
        g_free = torch.where(free, state["g"], 0.0)
        tr = state["delta"].unsqueeze(-1) * state["scale"]
        step, hits, tr_hit = dogleg_step(x, state["newton"], g_free, state["qa"], state["qb"],
                                         tr, lb, ub)
        step = torch.where(free, step, 0.0)
        J_free = state["J"] * free.unsqueeze(-2)
        predicted = -evaluate_quadratic(J_free, None, g_free, step)
        x_new = torch.minimum(torch.maximum(x + step, lb), ub)
        on_bound_new = torch.where(free, hits, state["on_bound"])
        return {"x_new": x_new, "step": step, "predicted": predicted, "tr_hit": tr_hit,
                "on_bound": on_bound_new, "step_norm": vnorm(step, dim=-1),
                "step_h_norm": inf_norm(step * state["scale_inv"])}

    def judge(self, problem, state, trial, f_new, cost_new, finite):
        actual = state["cost"] - cost_new
        delta_new, ratio = update_tr_radius(state["delta"], actual, trial["predicted"],
                                            trial["step_h_norm"], trial["tr_hit"])
        state["delta"] = torch.where(finite, delta_new, 0.25 * trial["step_h_norm"])
        code = check_termination(actual, state["cost"], trial["step_norm"],
                                 vnorm(state["x"], dim=-1), ratio, problem.ftol, problem.xtol)
        stop = finite & (code != 0)
        status = torch.where(stop, code, torch.full_like(code, codes.RUNNING))
        accept = finite & (actual > 0)
        on_bound = torch.where(accept.unsqueeze(-1), trial["on_bound"], state["on_bound"])
        state["on_bound"] = on_bound
        x_acc = torch.where(on_bound == -1, state["lb"],
                            torch.where(on_bound == 1, state["ub"], trial["x_new"]))
        return accept, status, x_acc

    def finalize(self, problem: Problem, state: dict) -> dict:
        return {"active_mask": state["on_bound"]}


def dogleg_step(x: Tensor, newton: Tensor, g: Tensor, a: Tensor, b: Tensor, tr_bounds: Tensor,
                lb: Tensor, ub: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Dogleg step inside the intersection of the trust box and the feasible box.

    Returns the step ``(B, n)``, the bounds it hits (``-1``/``1``/``0`` per
    variable, original bounds only) and whether it hit the trust box ``(B,)``.
    """
    lb_c = lb - x
    ub_c = ub - x
    lb_total = torch.maximum(lb_c, -tr_bounds)
    ub_total = torch.minimum(ub_c, tr_bounds)
    orig_l = lb_total == lb_c
    orig_u = ub_total == ub_c
    tr_l = lb_total == -tr_bounds
    tr_u = ub_total == tr_bounds
    newton_ok = in_bounds(newton, lb_total, ub_total)
    if bool(newton_ok.all()):  # every Newton step fits: no dogleg needed
        return (newton, torch.zeros_like(x, dtype=torch.long),
                torch.zeros_like(newton_ok))
    zero = torch.zeros_like(x)
    to_bounds, _ = step_size_to_bound(zero, -g, lb_total, ub_total)
    t_c, _ = minimize_quadratic_1d(a, b, torch.zeros_like(to_bounds),
                                   torch.where(torch.isfinite(to_bounds), to_bounds,
                                               torch.zeros_like(to_bounds)))
    cauchy = -t_c.unsqueeze(-1) * g
    diff = newton - cauchy
    t, hits = step_size_to_bound(cauchy, diff, lb_total, ub_total)
    t = torch.where(torch.isfinite(t), t, torch.zeros_like(t))
    step = cauchy + t.unsqueeze(-1) * diff
    bound_hits = torch.zeros_like(hits)
    bound_hits = torch.where((hits < 0) & orig_l, -1, bound_hits)
    bound_hits = torch.where((hits > 0) & orig_u, 1, bound_hits)
    tr_hit = (((hits < 0) & tr_l) | ((hits > 0) & tr_u)).any(-1)
    ok = newton_ok.unsqueeze(-1)
    return (torch.where(ok, newton, step), torch.where(ok, torch.zeros_like(bound_hits),
                                                       bound_hits),
            newton_ok.logical_not() & tr_hit)
