"""One float64 problem's 'trf' and 'dogbox' keep their per-problem values on the host.

On the CPU one float64 problem keeps its trust radius (and, for 'trf', the
damping and ``theta``) in the state as ``numpy.float64`` host values
(:meth:`~torchimize_scipy._engine.host_scalars.Scalars.keep`), and the trial's
predicted reduction and step norms too, so that no ``(1,)`` tensor is made and
read back per value (issue 14). These tests check that the values are kept so,
that a batch and the LSMR rule (whose own code takes tensors) keep tensors, and
that the solutions still agree with scipy's.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch
from _parity import assert_result_parity

import torchimize_scipy as ts
from torchimize_scipy._engine.steps.dogbox import Dogbox
from torchimize_scipy._engine.steps.trf import TRF


def rosen(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def rosen_jac(x):
    return np.array([[-20 * x[0], 10.0], [-1.0, 0.0]])


def _record(monkeypatch, rule):
    """Record the types of the radius and the trial's values at every assessment."""
    seen = []
    orig = rule.assess_trial

    def assess(self, problem, state, trial, *args):
        verdict = orig(self, problem, state, trial, *args)
        seen.append((type(state["delta"]), type(trial.predicted), type(trial.step_norm),
                     state["x"].shape[0]))
        return verdict

    monkeypatch.setattr(rule, "assess_trial", assess)
    return seen


@pytest.mark.parametrize("bounds", [(-np.inf, np.inf), ([-np.inf, 1.5], np.inf)],
                         ids=["unbounded", "bounded"])
@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_one_problem_keeps_host_values(monkeypatch, method, bounds):
    seen = _record(monkeypatch, TRF if method == "trf" else Dogbox)
    x0 = [2.0, 2.0] if np.isfinite(bounds[0]).any() else [-1.2, 1.0]
    res = ts.least_squares(rosen, x0, jac=rosen_jac, method=method, bounds=bounds)
    ref = scipy.optimize.least_squares(rosen, x0, jac=rosen_jac, method=method, bounds=bounds)
    assert seen and all(kinds[:3] == (np.float64,) * 3 for kinds in seen)
    assert_result_parity(res, ref)


@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_batches_and_float32_keep_tensors(monkeypatch, method):
    seen = _record(monkeypatch, TRF if method == "trf" else Dogbox)
    x0 = np.array([[-1.2, 1.0], [-1.0, 1.2]])

    def fun(x):
        return torch.stack([10 * (x[:, 1] - x[:, 0] ** 2), 1 - x[:, 0]], -1)

    res = ts.batch_least_squares(fun, torch.as_tensor(x0), method=method)
    np.testing.assert_allclose(np.asarray(res.x), np.ones((2, 2)), atol=1e-6)
    # (while two problems run: a batch compacted to one may keep host values, as the
    # loop's own keys do)
    assert seen and all(kinds[0] is torch.Tensor for kinds in seen if kinds[3] > 1)
    seen.clear()
    res = ts.least_squares(rosen, [-1.2, 1.0], jac=rosen_jac, method=method,
                           dtype=torch.float32)
    np.testing.assert_allclose(res.x, [1.0, 1.0], atol=1e-3)
    assert seen and all(kinds[0] is torch.Tensor for kinds in seen)


def test_lsmr_rule_keeps_tensors(monkeypatch):
    # TRFLSMR shares TRF.assess_trial but its own code takes tensors
    seen = _record(monkeypatch, TRF)
    res = ts.least_squares(rosen, [-1.2, 1.0], jac=rosen_jac, tr_solver="lsmr")
    np.testing.assert_allclose(res.x, [1.0, 1.0], atol=1e-6)
    assert seen and all(kinds[0] is torch.Tensor for kinds in seen)


@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_iteration_table_with_host_values(capsys, method):
    # verbose=2 reads the trial's step norm (a host value for one problem)
    res = ts.least_squares(rosen, [-1.2, 1.0], jac=rosen_jac, method=method, verbose=2)
    out = capsys.readouterr().out
    assert "Step norm" in out and out.count("\n") > res.nfev // 2
    np.testing.assert_allclose(res.x, [1.0, 1.0], atol=1e-8)
