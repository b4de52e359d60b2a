r"""Gauss-Newton ('gn') and gradient descent ('gd') step rules with a line search.

Both methods move along a direction :math:`p` by a length :math:`t`, found by
backtracking (Nocedal & Wright, *Numerical Optimization*, 2nd ed., 2006,
Algorithm 3.1): a trial is accepted when the cost decreases by at least
:math:`10^{-4}` of the decrease the Gauss-Newton model predicts for it
(Armijo's condition); otherwise :math:`t` is halved. With bounds the trial
point is projected onto the box (projected search, Bertsekas 1982).

* Gauss-Newton: :math:`p` is the minimum-norm solution of
  :math:`\min \lVert J p + f \rVert` (SVD) over the free variables (those
  not held at a bound by an outward-pointing gradient), or the projected
  steepest-descent direction if that is not a descent direction; each outer
  iteration starts from
  the full step :math:`t = 1`, so near a zero-residual solution the method
  converges quadratically, and the search keeps it from diverging elsewhere.
* Gradient descent: :math:`p = -D^2 g`, steepest descent in the variables
  scaled by ``x_scale`` (``D = diag(x_scale)``); the length carries over
  between iterations and doubles after each accepted step. The first length
  is :math:`\Delta_0 / \lVert D g \rVert` with scipy's initial trust radius
  :math:`\Delta_0 = \lVert x_0 / D \rVert` (1 when that is 0). With a fixed
  ``step_length`` :math:`l` (the torchimize layer's ``l``), every iteration
  tries :math:`x - l D^2 g` first and only halves it when that fails.

Optimality and the ``gtol`` test use scipy's bounded measure
:math:`\lVert v \odot g \rVert_\infty` (Coleman-Li ``v``; :math:`\lVert g
\rVert_\infty` without bounds); ``ftol`` and ``xtol`` are scipy's trust-region
tests, applied to each trial.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm

from ..bounds import coleman_li_scaling
from ..linalg import factorize, gauss_newton_step
from ..problem import Problem
from ..quadratic import evaluate_quadratic
from ..termination import trust_region_status
from ._common import (
    bound_activity,
    flag_singular_factors,
    inf_norm,
    initial_scale,
    update_jac_scale,
)
from .base import ResultFields, StepRule, Verdict

ARMIJO = 1e-4


class LineSearchTrial(NamedTuple):
    """A trial of a line search: the point and the reduction the model predicts."""

    x_new: Tensor
    step_norm: Tensor
    predicted: Tensor


class _LineSearch(StepRule):
    """Shared acceptance rule of the line-search methods."""

    state_keys = frozenset({
        "direction",  # (B, n) search direction of the outer iteration
        "step_length",  # (B,) length along it of the next trial
    })

    def init_state(self, problem: Problem, state: dict) -> None:
        initial_scale(problem, state)
        x = state["x"]
        state["direction"] = torch.zeros_like(x)
        state["step_length"] = x.new_ones(x.shape[0])

    def measure_optimality(self, problem: Problem, state: dict) -> Tensor:
        v, _ = coleman_li_scaling(state["x"], state["g"], state["lb"], state["ub"])
        state["optimality"] = inf_norm(state["g"] * v)
        return state["optimality"] < problem.gtol

    def propose_step(self, problem: Problem, state: dict) -> LineSearchTrial:
        x = state["x"]
        x_new = x + state["step_length"].unsqueeze(-1) * state["direction"]
        if problem.bounded:
            x_new = torch.minimum(torch.maximum(x_new, state["lb"]), state["ub"])
        step = x_new - x
        predicted = -evaluate_quadratic(state["J"], None, state["g"], step)
        return LineSearchTrial(x_new, vnorm(step, dim=-1), predicted)

    def assess_trial(self, problem: Problem, state: dict, trial: LineSearchTrial,
                     f_new: Tensor, cost_new: Tensor, finite: Tensor) -> Verdict:
        actual = state["cost"] - cost_new
        predicted = trial.predicted
        safe = torch.where(predicted > 0, predicted, torch.ones_like(predicted))
        ratio = torch.where(predicted > 0, actual / safe,
                            ((actual == 0) & (predicted == 0)).to(actual.dtype))
        accept = finite & (actual > 0) & (actual >= ARMIJO * predicted)
        status = trust_region_status(actual, state["cost"], trial.step_norm, state["x"], ratio,
                                     finite, problem.ftol, problem.xtol)
        self.update_length(problem, state, accept)
        return Verdict(accept, status, trial.x_new)

    def update_length(self, problem: Problem, state: dict, accept: Tensor) -> None:
        """Halve the length after a rejected trial."""
        length = state["step_length"]
        state["step_length"] = torch.where(accept, length, 0.5 * length)

    def after_jacobian(self, problem: Problem, state: dict) -> None:
        update_jac_scale(problem, state)

    @staticmethod
    def free_variables(problem: Problem, state: dict) -> Tensor:
        """Variables not held at a bound by a gradient pointing out of the box."""
        if not problem.bounded:
            return torch.ones_like(state["x"], dtype=torch.bool)
        x, g = state["x"], state["g"]
        held = ((x <= state["lb"]) & (g > 0)) | ((x >= state["ub"]) & (g < 0))
        return ~held

    def result_fields(self, problem: Problem, state: dict) -> ResultFields:
        return bound_activity(problem, state)


class GaussNewton(_LineSearch):
    """Gauss-Newton direction, full step first, backtracking."""

    def build_model(self, problem: Problem, state: dict) -> None:
        # Gauss-Newton step on the free variables (active-set projection,
        # Bertsekas 1982), falling back to projected steepest descent if it
        # is not a descent direction.
        free = self.free_variables(problem, state)
        d = state["scale"] * free
        g = state["g"]
        fac = factorize(state["J"], d, state["f"], gram=state["G"], g=g,
                        use_gram=problem.use_gram)
        direction = d * gauss_newton_step(fac)
        flag_singular_factors(state, fac.s)
        steepest = -(d * d) * g
        descent = (direction * g).sum(-1) < 0
        state["direction"] = torch.where(descent.unsqueeze(-1), direction, steepest)
        first = 1.0 if problem.step_length is None else problem.step_length
        state["step_length"] = torch.full_like(state["step_length"], first)


class GradientDescent(_LineSearch):
    """Scaled steepest descent with a carried-over, adaptive step length."""

    def init_state(self, problem: Problem, state: dict) -> None:
        super().init_state(problem, state)
        delta = vnorm((state["x"] * state["scale_inv"]), dim=-1)
        delta = torch.where(delta == 0, torch.ones_like(delta), delta)
        dg = vnorm((state["scale"] * state["g"]), dim=-1)
        state["step_length"] = delta / torch.where(dg > 0, dg, torch.ones_like(dg))

    def build_model(self, problem: Problem, state: dict) -> None:
        d = state["scale"] * self.free_variables(problem, state)
        state["direction"] = -(d * d) * state["g"]
        if problem.step_length is not None:  # a fixed first length, as classic GD
            state["step_length"] = torch.full_like(state["step_length"], problem.step_length)

    def update_length(self, problem: Problem, state: dict, accept: Tensor) -> None:
        """Halve after a rejected trial; double after an accepted one (adaptive mode)."""
        grow = 2.0 if problem.step_length is None else 1.0
        length = state["step_length"]
        state["step_length"] = torch.where(accept, grow * length, 0.5 * length)
