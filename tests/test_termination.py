"""The engine's stop tests (``_engine/termination.py``), one function per test.

Each test feeds hand-made per-problem values (a batch whose rows exercise the
branches) and checks the status code of every row.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchimize_scipy._engine import status
from torchimize_scipy._engine import termination as term

R = term.RUNNING


def _t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def test_trust_region_status_rows():
    # rows: ftol only, xtol only, both, neither, ftol with a poor ratio, non-finite trial
    actual = _t(1e-12, 1.0, 1e-12, 1.0, 1e-12, 1e-12)
    cost = _t(1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    step_norm = _t(1.0, 1e-12, 1e-12, 1.0, 1.0, 1e-12)
    x = torch.ones(6, 2, dtype=torch.float64)
    ratio = _t(0.5, 0.5, 0.5, 0.5, 0.25, 0.5)
    finite = torch.tensor([True, True, True, True, True, False])
    got = term.trust_region_status(actual, cost, step_norm, x, ratio, finite, 1e-8, 1e-8)
    assert got.tolist() == [term.FTOL, term.XTOL, term.FTOL_XTOL, R, R, R]


def test_trust_region_status_xtol_scale():
    """``xtol`` is relative to ``xtol + |x|``: the same step passes at a large ``|x|`` only."""
    x = torch.tensor([[1e-3, 0.0], [1e3, 0.0]], dtype=torch.float64)
    ones = torch.ones(2, dtype=torch.float64)
    got = term.trust_region_status(ones, ones, _t(1e-6, 1e-6), x, ones,
                                   torch.ones(2, dtype=torch.bool), 0.0, 1e-8)
    assert got.tolist() == [R, term.XTOL]


def _minpack(actred, prered, ratio, delta, xnorm, gnorm, nfev, max_nfev=100, ftol=1e-8,
             xtol=1e-8):
    return term.minpack_status(_t(*actred), _t(*prered), _t(*ratio), _t(*delta), _t(*xnorm),
                               _t(*gnorm), torch.tensor(nfev), max_nfev, ftol, xtol).tolist()


def test_minpack_status_rows():
    # rows: running, ftol, xtol, both, budget, budget with ftol (ftol wins, as in MINPACK)
    got = _minpack(actred=[1e-3, 1e-9, 1e-3, 1e-9, 1e-3, 1e-9],
                   prered=[1e-3, 1e-9, 1e-3, 1e-9, 1e-3, 1e-9], ratio=[1.0] * 6,
                   delta=[1.0, 1.0, 1e-9, 1e-9, 1.0, 1.0], xnorm=[1.0] * 6, gnorm=[1.0] * 6,
                   nfev=[1, 1, 1, 1, 100, 100], ftol=1e-8, xtol=1e-8)
    assert got == [R, term.FTOL, term.XTOL, term.FTOL_XTOL, term.MAX_NFEV, term.FTOL]


def test_minpack_tolerance_too_small_tests():
    """MINPACK's info 6-8 (relative reductions, radius, ``gnorm`` at rounding level) have
    codes of their own, failures; in MINPACK's order the last that holds wins (8 over 7
    over 6 over the budget's 5), and the ftol/xtol tests before all of them."""
    eps = np.finfo(float).eps
    # rows: gnorm, radius, reductions at rounding level; with zero tolerances
    got = _minpack(actred=[1e-3, 1e-3, eps / 2], prered=[1e-3, 1e-3, eps / 2],
                   ratio=[1.0] * 3, delta=[1.0, eps / 2, 1.0], xnorm=[1.0] * 3,
                   gnorm=[eps / 2, 1.0, 1.0], nfev=[1, 1, 1], ftol=0.0, xtol=0.0)
    assert got == [term.GTOL_TINY, term.XTOL_TINY, term.FTOL_TINY]
    assert not any(term.success(np.array(got)))
    # several at once, and the budget spent too: the last of 5, 6, 7, 8 that holds
    got = _minpack(actred=[eps / 2] * 4, prered=[eps / 2] * 4, ratio=[1.0] * 4,
                   delta=[eps / 2, eps / 2, 1.0, 1.0], xnorm=[1.0] * 4,
                   gnorm=[eps / 2, 1.0, 1.0, 1.0], nfev=[9, 9, 9, 1], max_nfev=9,
                   ftol=0.0, xtol=0.0)
    assert got == [term.GTOL_TINY, term.XTOL_TINY, term.FTOL_TINY, term.FTOL_TINY]
    got = _minpack(actred=[1e-3], prered=[1e-3], ratio=[1.0], delta=[1.0], xnorm=[1.0],
                   gnorm=[1.0], nfev=[9], max_nfev=9, ftol=0.0, xtol=0.0)
    assert got == [term.MAX_NFEV]
    # tolerances of at least eps: the ftol / xtol tests hold wherever these do
    got = _minpack(actred=[1e-3, eps / 2], prered=[1e-3, eps / 2], ratio=[1.0] * 2,
                   delta=[eps / 2, 1.0], xnorm=[1.0] * 2, gnorm=[1.0] * 2, nfev=[1, 1],
                   ftol=eps, xtol=eps)
    assert got == [term.XTOL, term.FTOL]


def test_minpack_ftol_needs_a_fair_ratio():
    """MINPACK's ftol test also asks ``0.5 * ratio <= 1``."""
    got = _minpack(actred=[1e-9, 1e-9], prered=[1e-9, 1e-9], ratio=[2.0, 2.5], delta=[1.0, 1.0],
                   xnorm=[1.0, 1.0], gnorm=[1.0, 1.0], nfev=[1, 1])
    assert got == [term.FTOL, R]


def test_gtol_status_overrides_only_tolerance_codes():
    before = torch.tensor([R, term.FTOL, term.XTOL, term.FTOL_XTOL, term.MAX_NFEV,
                           term.NONFINITE, term.SINGULAR, term.CALLBACK_STOP, R])
    hit = torch.tensor([True] * 8 + [False])
    got = term.gtol_status(before, hit)
    assert got.tolist() == [term.GTOL] * 4 + [term.MAX_NFEV, term.NONFINITE, term.SINGULAR,
                                              term.CALLBACK_STOP, R]


def test_budget_status_only_stops_running_problems():
    before = torch.tensor([R, R, term.FTOL])
    got = term.budget_status(before, torch.tensor([9, 10, 10]), 10)
    assert got.tolist() == [R, term.MAX_NFEV, term.FTOL]


def test_stop_running_keeps_earlier_codes():
    before = torch.tensor([R, R, term.XTOL])
    got = term.stop_running(before, torch.tensor([True, False, True]), term.NONFINITE)
    assert got.tolist() == [term.NONFINITE, R, term.XTOL]


def test_uncounted_jacobian_and_reported_njev():
    accept = torch.tensor([True, True, False])
    st = torch.tensor([term.FTOL, R, term.XTOL])
    unc = term.uncounted_jacobian(accept, st)
    assert unc.tolist() == [1, 0, 0]
    assert term.reported_njev(torch.tensor([5, 5, 5]), unc).tolist() == [4, 5, 5]


@pytest.mark.parametrize(("code", "ok"), [(-2, False), (-1, False), (0, False), (1, True),
                                           (2, True), (3, True), (4, True), (5, False),
                                           (6, False)])
def test_success_rule_int(code, ok):
    assert bool(term.success(code)) is ok
    assert status.success is term.success  # one definition, re-exported for the frontends


def test_success_rule_arrays():
    codes = [-2, -1, 0, 1, 2, 3, 4, 5, 6]
    want = [False, False, False, True, True, True, True, False, False]
    assert term.success(torch.tensor(codes)).tolist() == want
    assert term.success(np.array(codes)).tolist() == want


def test_every_code_has_a_message():
    for name in ("CALLBACK_STOP", "IMPROPER_INPUT", "MAX_NFEV", "GTOL", "FTOL", "XTOL",
                 "FTOL_XTOL", "NONFINITE", "SINGULAR"):
        assert isinstance(status.message(getattr(term, name)), str)
    with pytest.raises(KeyError):
        status.message(term.RUNNING)
