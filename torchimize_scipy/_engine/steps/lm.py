r"""Levenberg-Marquardt ('lm') step rule with MINPACK's scaling and safeguards.

J. J. Moré, "The Levenberg-Marquardt algorithm: implementation and theory",
Lecture Notes in Mathematics 630, Springer, 1978, pp. 105-116; and the MINPACK
``lmder`` routine (Moré, Garbow & Hillstrom, Argonne ANL-80-74, 1980), which
scipy's ``method='lm'`` calls.

Variables are scaled by ``diag``: with ``x_scale='jac'`` (scipy's default for
'lm') it starts as the column norms of the first Jacobian and is the running
maximum of the column norms afterwards; otherwise ``diag = 1 / x_scale``. Each
trial solves :math:`\min \lVert J p + f\rVert` with :math:`\lVert \mathrm{diag}\,
p\rVert \le \Delta` to 10 % accuracy (``lmpar``). The radius follows MINPACK's
rules on the ratio of actual to predicted relative reductions, steps with
ratio :math:`\ge 10^{-4}` are taken, and the termination tests are MINPACK's:
``ftol`` on the relative reductions, ``xtol`` on :math:`\Delta \le
\mathrm{xtol}\,\lVert \mathrm{diag}\,x\rVert`, ``gtol`` on the largest cosine
between ``f`` and a column of ``J``. MINPACK's codes map onto scipy's status
(1 -> 2, 2 -> 3, 3 -> 4, 4 -> 1, 5 -> 0); its "tolerance too small" codes 6, 7
and 8, which scipy cannot map, are reported as 2, 3 and 1.
"""

from __future__ import annotations

import torch

from .. import status as codes
from ..linalg import solve_trust_region_minpack, svd_factors
from ..problem import Problem
from ..quadratic import jac_times
from ._common import StepRule, alloc_svd, column_norms, flag_singular, inf_norm, svd_width

FACTOR = 100.0


class LevenbergMarquardt(StepRule):
    """Step rule reproducing MINPACK ``lmder``."""

    name = "lm"
    budget_at_top = False  # MINPACK tests nfev after each trial
    prints_table = False  # scipy prints no iteration table for 'lm'

    def init(self, problem: Problem, state: dict) -> None:
        x = state["x"]
        B = x.shape[0]
        if problem.jac_scale:
            state["diag"] = torch.ones_like(x)
        else:
            state["diag"] = state["scale_inv"].clone()
        state["delta"] = x.new_zeros(B)
        state["par"] = x.new_zeros(B)
        state["xnorm"] = x.new_zeros(B)
        state["gnorm"] = x.new_zeros(B)
        state["first"] = torch.ones(B, dtype=torch.bool, device=x.device)
        state["started"] = torch.zeros(B, dtype=torch.bool, device=x.device)
        # MINPACK does not evaluate J at a point accepted by the terminating trial
        state["uncounted_jac"] = torch.zeros(B, dtype=torch.long, device=x.device)
        alloc_svd(state, svd_width(problem, False))

    def top(self, problem: Problem, state: dict) -> torch.Tensor:
        f = state["f"]
        acnorm = column_norms(state)
        fnorm = f.norm(dim=-1)
        g = state["g"]
        state["optimality"] = inf_norm(g)
        denom = fnorm.unsqueeze(-1) * acnorm
        cosines = torch.where(acnorm != 0, g.abs() / torch.where(denom != 0, denom,
                                                                  torch.ones_like(denom)),
                              torch.zeros_like(g))
        gnorm = torch.where(fnorm != 0, inf_norm(cosines), torch.zeros_like(fnorm))
        state["gnorm"] = gnorm
        # scaling and initial radius on the very first outer iteration
        start = ~state["started"]
        if problem.jac_scale:
            first_diag = torch.where(acnorm == 0, torch.ones_like(acnorm), acnorm)
            diag = torch.where(start.unsqueeze(-1), first_diag,
                               torch.maximum(state["diag"], acnorm))
        else:
            diag = state["diag"]
        xnorm = (diag * state["x"]).norm(dim=-1)
        delta0 = torch.where(xnorm == 0, torch.full_like(xnorm, FACTOR), FACTOR * xnorm)
        state["delta"] = torch.where(start, delta0, state["delta"])
        state["xnorm"] = torch.where(start, xnorm, state["xnorm"])
        state["diag"] = diag
        state["started"] = torch.ones_like(start)
        return (gnorm <= problem.gtol) & (state["status"] == codes.RUNNING)

    def prepare(self, problem: Problem, state: dict) -> None:
        state["sv"], state["V"], state["uf"] = svd_factors(
            state["J"], 1.0 / state["diag"], state["f"], gram=state["G"], g=state["g"],
            use_gram=problem.use_gram)
        flag_singular(state, torch.isfinite(state["sv"]).all(-1))

    def propose(self, problem: Problem, state: dict) -> dict:
        q, par = solve_trust_region_minpack(state["sv"], state["V"], state["uf"], state["delta"],
                                            state["par"], problem.m, problem.n)
        step = q / state["diag"]
        pnorm = q.norm(dim=-1)
        # on the first iteration the radius is cut to the first step's length
        state["delta"] = torch.where(state["first"], torch.minimum(state["delta"], pnorm),
                                     state["delta"])
        return {"x_new": state["x"] + step, "step": step, "pnorm": pnorm, "par": par,
                "step_norm": step.norm(dim=-1)}

    def judge(self, problem, state, trial, f_new, cost_new, finite):
        f = state["f"]
        fnorm = f.norm(dim=-1)
        fnorm1 = torch.where(finite, f_new.norm(dim=-1), torch.full_like(fnorm, float("inf")))
        safe_f = torch.where(fnorm != 0, fnorm, torch.ones_like(fnorm))
        actred = torch.where(0.1 * fnorm1 < fnorm, 1 - (fnorm1 / safe_f) ** 2,
                             -torch.ones_like(fnorm))
        pnorm, par = trial["pnorm"], trial["par"]
        temp1 = jac_times(state["J"], trial["step"]).norm(dim=-1) / safe_f
        temp2 = par.sqrt() * pnorm / safe_f
        prered = temp1**2 + temp2**2 / 0.5
        dirder = -(temp1**2 + temp2**2)
        ratio = torch.where(prered != 0, actred / torch.where(prered != 0, prered,
                                                               torch.ones_like(prered)),
                            torch.zeros_like(prered))
        delta = state["delta"]
        # radius and damping update
        den = dirder + 0.5 * actred
        temp = torch.where(actred >= 0, torch.full_like(actred, 0.5),
                           0.5 * dirder / torch.where(den != 0, den, torch.ones_like(den)))
        temp = torch.where((0.1 * fnorm1 >= fnorm) | (temp < 0.1), torch.full_like(temp, 0.1),
                           temp)
        shrink = ratio <= 0.25
        grow = ~shrink & ((par == 0) | (ratio >= 0.75))
        delta = torch.where(shrink, temp * torch.minimum(delta, pnorm / 0.1),
                            torch.where(grow, pnorm / 0.5, delta))
        par = torch.where(shrink, par / temp, torch.where(grow, 0.5 * par, par))
        accept = ratio >= 1e-4
        x_new = trial["x_new"]
        xnorm = torch.where(accept, (state["diag"] * x_new).norm(dim=-1), state["xnorm"])
        state["delta"], state["par"], state["xnorm"] = delta, par, xnorm
        state["first"] = state["first"] & ~accept
        # MINPACK's termination tests
        eps = torch.finfo(delta.dtype).eps
        ftol_ok = (actred.abs() <= problem.ftol) & (prered <= problem.ftol) & (0.5 * ratio <= 1)
        xtol_ok = delta <= problem.xtol * xnorm
        status = torch.full(delta.shape, codes.RUNNING, dtype=torch.long, device=delta.device)
        status = torch.where(ftol_ok, codes.FTOL, status)
        status = torch.where(xtol_ok, codes.XTOL, status)
        status = torch.where(ftol_ok & xtol_ok, codes.FTOL_XTOL, status)
        running = status == codes.RUNNING
        status = torch.where(running & (state["nfev"] >= problem.max_nfev), codes.MAX_NFEV,
                             status)
        running = status == codes.RUNNING
        tiny_f = (actred.abs() <= eps) & (prered <= eps) & (0.5 * ratio <= 1)
        status = torch.where(running & tiny_f, codes.FTOL, status)
        running = status == codes.RUNNING
        status = torch.where(running & (delta <= eps * xnorm), codes.XTOL, status)
        running = status == codes.RUNNING
        status = torch.where(running & (state["gnorm"] <= eps), codes.GTOL, status)
        state["uncounted_jac"] = (accept & (status != codes.RUNNING)).long()
        return accept, status, x_new

    def after_jacobian(self, problem: Problem, state: dict) -> None:
        """MINPACK keeps its own scaling ``diag`` (updated in ``top``)."""

    def finalize(self, problem: Problem, state: dict) -> dict:
        return {"active_mask": torch.zeros_like(state["x"], dtype=torch.long),
                "njev": state["njev"] - state["uncounted_jac"]}
