"""The step-rule contract (``_engine/steps/base.py``) and the loop's checks of it."""

from __future__ import annotations

import pytest
import torch

from torchimize_scipy._driver import initial_state
from torchimize_scipy._engine import loop
from torchimize_scipy._engine.problem import Problem
from torchimize_scipy._engine.steps import RULES, TRF
from torchimize_scipy._engine.steps.base import LOOP_KEYS, StepRule


def _fun(x, idx):
    return torch.stack([10 * (x[:, 1] - x[:, 0] ** 2), 1 - x[:, 0], x[:, 0] * x[:, 1]], -1)


def _jac(x, f, idx):
    z = torch.zeros_like(x[:, 0])
    return torch.stack([torch.stack([-20 * x[:, 0], 10 + z], -1),
                        torch.stack([-1 + z, z], -1),
                        torch.stack([x[:, 1], x[:, 0]], -1)], -2)


def _problem(bounded: bool, use_gram: bool) -> Problem:
    return Problem(fun=_fun, jac=_jac, m=3, n=2, loss=None, ftol=1e-8, xtol=1e-8, gtol=1e-8,
                   max_nfev=200, jac_scale=False, bounded=bounded, use_gram=use_gram)


def _start(bounded: bool) -> dict:
    x0 = torch.tensor([[-1.2, 1.0], [0.5, 0.5]], dtype=torch.float64)
    inf = torch.full_like(x0, torch.inf)
    lb, ub = (x0 - 2, x0 + 2) if bounded else (-inf, inf)
    return initial_state(torch.arange(2), x0, _fun(x0, None), _jac(x0, None, None), lb, ub,
                         torch.ones_like(x0))


@pytest.mark.parametrize("method", sorted(RULES))
@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("use_gram", [False, True])
def test_rules_create_only_declared_keys(method, bounded, use_gram):
    """Every key a rule keeps is declared in its ``state_keys``, through a whole run."""
    rule = RULES[method]()
    assert isinstance(rule, StepRule)
    problem = _problem(bounded, use_gram)
    seen: set[str] = set()
    loop.run(problem, rule, _start(bounded), {}, on_iteration=lambda s: seen.update(s))
    assert seen, "the run made no iteration"
    assert seen - LOOP_KEYS <= rule.state_keys
    assert not (rule.state_keys & LOOP_KEYS)


def test_admit_rejects_undeclared_keys():
    class Leaky(TRF):
        def init_state(self, problem, state):
            super().init_state(problem, state)
            state["scratch"] = torch.zeros_like(state["x"])

    with pytest.raises(KeyError, match="undeclared state keys \\['scratch'\\]"):
        loop.run(_problem(False, False), Leaky(), _start(False), {})


def test_incomplete_rule_cannot_be_built():
    class NoAssessment(StepRule):
        def init_state(self, problem, state): ...
        def measure_optimality(self, problem, state): ...
        def build_model(self, problem, state): ...
        def propose_step(self, problem, state): ...
        def after_jacobian(self, problem, state): ...
        def result_fields(self, problem, state): ...

    with pytest.raises(TypeError, match="assess_trial"):
        NoAssessment()


def test_rules_have_no_name_attribute():
    """The unused ``StepRule.name`` leftover is gone: RULES' keys name the methods."""
    for cls in RULES.values():
        assert not hasattr(cls, "name")
