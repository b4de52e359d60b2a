"""'lm' with residuals near float64's overflow (issue 14).

MINPACK's norms scale their sums of squares, so scipy's 'lm' solves problems
whose residuals are around ``1e160``; ours summed squares directly and stopped
at ``x0`` (status 3, ``cost = inf``, ``nfev = 2``). Such rows now run on
residuals scaled by a power of two (``_driver._LMScaling``), which leaves
MINPACK's iteration unchanged; ``cost`` stays ``0.5 f.f`` of the problem's
own residuals.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize as so
import torch
from _parity import (
    assert_bitwise_equal,
    assert_cost_close,
    assert_counts_close,
    assert_status_equivalent,
    assert_x_close,
)

from torchimize_scipy import batch_least_squares, least_squares
from torchimize_scipy._driver import LM_SCALE_ABOVE, _LMScaling

BIG = 1e160


def fun_big(x, big=BIG):
    return np.array([big * (x[0] - 1), big * (x[1] - 2) * (1 + x[0] ** 2)])


def jac_big(x, big=BIG):
    return np.array([[big, 0.0], [big * (x[1] - 2) * 2 * x[0], big * (1 + x[0] ** 2)]])


def fun_big_v(x, big):
    """Batched :func:`fun_big`, ``x (B, 2)``, ``big (B,)``."""
    return torch.stack([big * (x[:, 0] - 1), big * (x[:, 1] - 2) * (1 + x[:, 0] ** 2)], -1)


def _scipy(fun, x0, **kw):
    with warnings.catch_warnings():  # (scipy's initial cost overflows: a RuntimeWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return so.least_squares(fun, x0, method="lm", **kw)


@pytest.mark.parametrize("kw", [{}, {"jac": jac_big}, {"x_scale": [1.0, 1.0]}],
                         ids=["2-point", "analytic", "x_scale"])
def test_huge_residuals_solved_like_scipy(kw):
    """The defect: stopped at x0 with cost inf after 2 evaluations."""
    ref = _scipy(fun_big, [3.0, 4.0], **kw)
    res = least_squares(fun_big, [3.0, 4.0], method="lm", **kw)
    assert ref.cost == 0.0 and ref.status in (2, 3, 4)
    assert_x_close(res.x, ref.x)
    assert res.cost == 0.0  # 0.5 f.f of the problem's residuals, not of scaled ones
    assert_status_equivalent(res.status, ref.status)
    assert_counts_close(res.status, ref.status, res.nfev, ref.nfev)
    assert np.all(np.isfinite(res.fun)) and np.all(np.isfinite(res.jac))
    np.testing.assert_allclose(res.jac, jac_big(res.x), rtol=1e-6)


def test_reported_fields_are_the_problems_own():
    """A huge problem stopped by its budget reports its own f, J, cost and optimality."""
    big = 1e150  # (0.5 f.f stays finite, so the cost can be checked)
    res = least_squares(fun_big, [3.0, 4.0], jac=jac_big, method="lm", args=(big,),
                        max_nfev=2)
    f = fun_big(res.x, big)
    np.testing.assert_array_equal(res.fun, f)
    np.testing.assert_array_equal(res.jac, jac_big(res.x, big))
    assert_cost_close(res.cost, 0.5 * float(f @ f), rtol=1e-14)
    g = res.jac.T @ f
    np.testing.assert_allclose(res.grad, g, rtol=1e-12)
    assert res.optimality == pytest.approx(np.abs(g).max(), rel=1e-12)


def test_scaled_run_takes_the_unscaled_steps():
    """Scaling f by a power of two leaves the iteration unchanged: a problem just below
    the threshold runs bit for bit like itself scaled above it, divided back."""
    k = 2.0**600  # a power of two: f * k is exact
    small = least_squares(fun_big, [3.0, 4.0], jac=jac_big, method="lm", args=(1.0,))
    huge = least_squares(fun_big, [3.0, 4.0], jac=jac_big, method="lm", args=(k,))
    assert_bitwise_equal(huge.x, small.x)
    assert (huge.nfev, huge.njev, huge.status) == (small.nfev, small.njev, small.status)


def test_batch_member_with_huge_residuals_leaves_others_alone():
    x0 = torch.tensor([[3.0, 4.0], [0.5, -1.0], [3.0, 4.0]], dtype=torch.float64)
    big = torch.tensor([1.0, 3.0, BIG], dtype=torch.float64)
    res = batch_least_squares(fun_big_v, x0, method="lm", args=(big,))
    alone = batch_least_squares(fun_big_v, x0[:2], method="lm", args=(big[:2],))
    for key in ("x", "cost", "fun", "nfev", "status"):
        assert_bitwise_equal(res[key][:2], alone[key])
    ref = _scipy(fun_big, [3.0, 4.0])
    assert_x_close(res.x[2], ref.x)
    assert float(res.cost[2]) == 0.0
    assert_status_equivalent(int(res.status[2]), ref.status)


def test_factors_are_powers_of_two_only_for_huge_rows():
    f0 = torch.tensor([[1.0, 2.0], [LM_SCALE_ABOVE, 0.0], [3e300, 1.0], [np.inf, 1e300]],
                      dtype=torch.float64)
    J0 = torch.ones(4, 2, 1, dtype=torch.float64)
    c = _LMScaling.factors(f0, J0)
    assert c[0] == 1 and c[3] == 1  # a normal row, and a non-finite one (stopped at x0)
    for i in (1, 2):
        scaled = float(f0[i].abs().max() * c[i])
        assert 1.0 <= scaled < 2.0
        assert np.frexp(float(c[i]))[0] == 0.5  # a power of two
    assert _LMScaling.factors(f0[:1], J0[:1]) is None


def test_largest_finite_entries_keep_a_finite_inverse():
    f0 = torch.tensor([[1.7e308, 1.0]], dtype=torch.float64)
    c = _LMScaling.factors(f0, torch.ones(1, 2, 1, dtype=torch.float64))
    assert torch.isfinite(1.0 / c).all()


def test_a_nan_row_does_not_hide_a_huge_one():
    # the whole-batch screen reads NaN when any entry is NaN; the rows are then
    # screened one by one, so the huge row still gets its factor
    f0 = torch.tensor([[np.nan, 1.0], [3e300, 1.0], [1.0, 2.0]], dtype=torch.float64)
    J0 = torch.ones(3, 2, 1, dtype=torch.float64)
    c = _LMScaling.factors(f0, J0)
    assert c is not None
    assert c[0] == 1 and c[2] == 1
    assert 1.0 <= float(f0[1].abs().max() * c[1]) < 2.0


@pytest.mark.parametrize("tiny", [1e-170, 1e-200, 1e-300])
def test_tiny_residuals_solved_like_scipy(tiny):
    """Residuals and Jacobian far below 1e-154: their squares underflow to 0, so the
    gradient test passed at x0 (status 1 after 1 evaluation); MINPACK's scaled norms and
    ratios solve it, and so does the run scaled up by a power of two."""
    def fun(x):
        return tiny * np.array([x[0] - 1, 10 * (x[1] - x[0] ** 2), x[0] * x[1] - 1.5])

    ref = so.least_squares(fun, [0.5, 0.3], method="lm")
    res = least_squares(fun, [0.5, 0.3], method="lm")
    assert ref.nfev > 2 and ref.status in (2, 3, 4)
    assert_x_close(res.x, ref.x)
    assert_status_equivalent(res.status, ref.status)
    assert_counts_close(res.status, ref.status, res.nfev, ref.nfev)
    assert res.cost == ref.cost == 0.0  # (0.5 f.f of the problem's residuals: underflows)
    np.testing.assert_allclose(res.fun, fun(res.x), rtol=1e-6, atol=1e-6 * tiny)


def test_factors_scale_tiny_rows_up_and_leave_zero_rows():
    f0 = torch.tensor([[1e-170, 0.0], [0.0, 0.0], [1.0, 2.0], [5e-324, 0.0]],
                      dtype=torch.float64)
    J0 = torch.cat([torch.full((1, 2, 1), 1e-170), torch.zeros(1, 2, 1),
                    torch.ones(1, 2, 1), torch.zeros(1, 2, 1)]).double()
    c = _LMScaling.factors(f0, J0)
    assert c[1] == 1 and c[2] == 1  # a zero row (nothing to scale) and a normal one
    assert 1.0 <= float(f0[0].abs().max() * c[0]) < 2.0
    assert np.frexp(float(c[0]))[0] == 0.5
    assert torch.isfinite(c[3]) and c[3] > 1  # (a subnormal row: c capped, finite)
