"""'lm' after a trial whose residuals are not finite takes MINPACK's path (found by
probing): MINPACK's norm of such a row is inf for one infinite entry and NaN for a NaN
or two infinities, and only an infinite norm cuts the radius by 0.1."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize as so
import torch
from _parity import assert_counts_close

from torchimize_scipy import batch_least_squares, curve_fit, least_squares
from torchimize_scipy._engine import host_scalars
from torchimize_scipy._engine.steps.lm import _enorm_nonfinite

T = np.linspace(0, 3, 25)
Y = 2.3249 * np.exp(-1.4126 * T) - 0.3143 + 0.01 * np.sin(9 * T)
X0 = np.array([0.1, 8.0, -1.0])  # the first trial overflows exp: many infinite residuals


def _fun(x):
    return x[0] * np.exp(-x[1] * T) + x[2] - Y


def _jac(x):
    e = np.exp(-x[1] * T)
    return np.stack([e, -x[0] * T * e, np.ones_like(e)], axis=-1)


def test_minpacks_norm_of_rows_that_are_not_finite():
    f = torch.tensor([[1.0, np.inf, 2.0], [np.inf, -np.inf, 0.0], [np.nan, 1.0, 1.0],
                      [np.inf, np.nan, 0.0]], dtype=torch.float64)
    got = np.asarray(_enorm_nonfinite(host_scalars.for_rows(torch.zeros(4, 2,
                                                                         dtype=torch.float64)), f))
    assert np.isposinf(got[0]) and np.isnan(got[1:]).all()


def test_the_path_after_an_overflowing_trial_is_scipys():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (exp overflows, on both sides)
        # six evaluations stop long before convergence: the counts and the point reached
        # tell the path, exactly (the defect: another point, x[1] 0.54 against 4.19)
        ours = least_squares(_fun, X0, jac=_jac, method="lm", max_nfev=6)
        ref = so.least_squares(_fun, X0, jac=_jac, method="lm", max_nfev=6)
        assert_counts_close(ours.status, ref.status, (ours.nfev, ours.njev),
                            (ref.nfev, ref.njev), exact=True)
        np.testing.assert_allclose(ours.x, ref.x, rtol=1e-6)
        # to convergence: the same solution, counts within an iteration (rounding decides
        # the last stop test; the defect cost two evaluations early on, 15 against 17)
        ours = least_squares(_fun, X0, jac=_jac, method="lm")
        ref = so.least_squares(_fun, X0, jac=_jac, method="lm")
        assert_counts_close(ours.status, ref.status, ours.nfev, ref.nfev, slack=1)
        np.testing.assert_allclose(ours.x, ref.x, rtol=1e-6)
        ours = curve_fit(lambda t, a, k, c: a * np.exp(-k * t) + c, T, Y, p0=X0,
                         full_output=True)
        ref = so.curve_fit(lambda t, a, k, c: a * np.exp(-k * t) + c, T, Y, p0=X0,
                           full_output=True)
    assert_counts_close(ours[4], ref[4], ours[2]["nfev"], ref[2]["nfev"], slack=len(X0) + 1)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6)


@pytest.mark.parametrize("host", [True, False])
def test_a_batch_takes_it_per_problem(monkeypatch, host):
    monkeypatch.setattr(host_scalars, "HOST", host)
    x0 = np.array([X0, [2.0, 1.0, 0.0], [0.1, 9.0, 1.0]])

    def fb(x):
        return x[:, :1] * np.exp(-x[:, 1:2] * T) + x[:, 2:3] - Y

    def jb(x):
        e = np.exp(-x[:, 1:2] * T)
        return np.stack([e, -x[:, :1] * T * e, np.ones_like(e)], axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = batch_least_squares(fb, x0, jac=jb, method="lm", max_nfev=6)
        for k in range(3):
            ref = so.least_squares(_fun, x0[k], jac=_jac, method="lm", max_nfev=6)
            assert_counts_close(int(res.status[k]), ref.status,
                                (int(res.nfev[k]), int(res.njev[k])), (ref.nfev, ref.njev),
                                exact=True)
            np.testing.assert_allclose(np.asarray(res.x[k]), ref.x, rtol=1e-6)


def test_float32_trial_with_overflowing_residuals_keeps_float32():
    """float32 'lm' whose trial overflows (exp of a large step): MINPACK's norm of that
    trial (inf / NaN) was a float64 value, which made the radius and the rest of the run
    float64 (TypeError in one problem's subproblem, a dtype error in a batch)."""
    import scipy.optimize as so
    import torch

    from torchimize_scipy import batch_curve_fit, curve_fit

    t = np.linspace(0, 4, 40)
    y = 1e3 * (2.5 * np.exp(-1.3 * t) + 0.5
               + 0.02 * np.random.default_rng(0).standard_normal(40))
    ref = so.curve_fit(lambda x, a, k, c: a * np.exp(-k * x) + c, t, y, p0=[1, 1, 0])[0]

    def model(x, a, k, c):
        return a * torch.exp(-k * x) + c

    tt, yy = torch.tensor(t, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    popt, _ = curve_fit(model, tt, yy, p0=torch.tensor([1.0, 1.0, 0.0]))
    assert popt.dtype == torch.float32
    np.testing.assert_allclose(popt.numpy(), ref, rtol=2e-4)
    popt, _ = batch_curve_fit(model, tt, yy[None].repeat(3, 1), p0=torch.tensor([[1.0, 1, 0]] * 3))
    assert popt.dtype == torch.float32
    np.testing.assert_allclose(popt.numpy(), np.broadcast_to(ref, (3, 3)), rtol=2e-4)
