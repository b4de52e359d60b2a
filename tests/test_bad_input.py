"""Bad and edge-case input (issue 11): a clear answer for each, compared with scipy.

Each test pins one defect found by the bad-input catalogue: where scipy 1.17
raises, we raise the same exception type (and scipy's message, or a message
that starts with it and names the cause); where scipy runs, we return what it
returns; inside a batch a bad problem fails alone, with a status, and leaves
the others as they would be without it.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import scipy.optimize as so
import torch

from torchimize_scipy import batch_least_squares, least_squares
from torchimize_scipy._engine import status as codes

NAN_MSG = "array must not contain infs or NaNs"


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def scipy_raises(exc, *args, **kwargs) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc) as info:
            so.least_squares(*args, **kwargs)
    return str(info.value)


def fun_lin(x):
    return np.array([x[0] - 1.0, x[1] - 2.0, x[0] + x[1]])


def jac_lin(x):
    return np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])


def fun_const(x):
    return np.array([1.0, 2.0])


# ============================================================ 1. no variables (n = 0)
@pytest.mark.parametrize("jac", ["2-point", "3-point", "callable"])
@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
@pytest.mark.parametrize("loss", ["linear", "soft_l1"])
def test_no_variables_like_scipy(method, jac, loss):
    """``x0 = []``: scipy runs ('trf'/'dogbox' stop on gtol, 'lm' reports improper input)."""
    if method == "lm" and loss != "linear":
        pytest.skip("'lm' has only the linear loss")
    jac_arg = (lambda x: np.zeros((2, 0))) if jac == "callable" else jac
    ref = quiet(so.least_squares, fun_const, [], jac=jac_arg, method=method, loss=loss)
    res = quiet(least_squares, fun_const, [], jac=jac_arg, method=method, loss=loss)
    assert res.x.shape == (0,) and res.grad.shape == (0,) and res.active_mask.shape == (0,)
    assert res.jac.shape == ref.jac.shape == (2, 0)
    np.testing.assert_allclose(res.fun, ref.fun, rtol=0, atol=0)  # fun(x0), evaluated once
    np.testing.assert_allclose(res.cost, ref.cost, rtol=1e-14)
    assert res.optimality == ref.optimality == 0.0
    # nothing to decide by rounding here: the status is fixed before any iteration
    assert (res.status, res.message, res.success) == (ref.status, ref.message, ref.success)
    assert (res.nfev, res.njev) == (ref.nfev, ref.njev)


def test_no_variables_torch_and_bounds():
    x0 = torch.zeros(0, dtype=torch.float64)
    res = least_squares(lambda x: torch.stack([x.sum() + 1.0, x.sum() - 2.0]), x0,
                        bounds=(torch.zeros(0), torch.ones(0)))
    assert isinstance(res.x, torch.Tensor) and res.x.shape == (0,)
    assert res.status == codes.GTOL and float(res.cost) == pytest.approx(2.5)


def test_no_variables_nonfinite_residuals():
    fun = lambda x: np.array([np.nan, 1.0])  # noqa: E731
    msg = "Residuals are not finite in the initial point."
    assert scipy_raises(ValueError, fun, []) == msg
    with pytest.raises(ValueError, match=re.escape(msg)):
        least_squares(fun, [])


# ============================================================ 2. complex residuals
def fun_complex(x):
    return np.array([x[0] - 1.0 + 1j, x[0] + 2j])


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_complex_residuals_refused(method):
    """scipy casts complex residuals with a ComplexWarning into a meaningless result
    (a complex cost) or, for 'lm', raises; we refuse them with a ValueError."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            ref = so.least_squares(fun_complex, [0.5], method=method)
        except Exception:  # noqa: BLE001 - MINPACK's own error type
            ref = None
    assert any(issubclass(w.category, np.exceptions.ComplexWarning) for w in seen)
    assert ref is None or np.iscomplexobj(ref.cost)
    with pytest.raises(ValueError, match=r"`fun` returned complex values .* must be real"):
        least_squares(fun_complex, [0.5], method=method)


def test_complex_jacobian_refused():
    with pytest.raises(ValueError, match=r"`jac` returned complex values"):
        least_squares(fun_lin, [0.0, 0.0], jac=lambda x: jac_lin(x) + 0j)


def test_complex_residuals_refused_torch_and_batch():
    with pytest.raises(ValueError, match=r"`fun` returned complex values"):
        least_squares(lambda x: torch.stack([x[0] + 1j, x[0] - 1j]),
                      torch.tensor([0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"`fun` returned complex values"):
        batch_least_squares(lambda x: np.concatenate([x, x], axis=1) + 1j, np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"`fun` returned complex values"):
        batch_least_squares(lambda x: np.array([x[0] + 1j, x[0]]), np.zeros((3, 1)),
                            vectorized=False)


def test_complex_step_still_works():
    """jac='cs' evaluates fun at complex points on purpose: that is not refused."""
    res = least_squares(lambda x: np.exp(x) - 2.0, [0.0], jac="cs")
    np.testing.assert_allclose(res.x, [np.log(2.0)], rtol=1e-7)


# ============================================================ 3. NaN Jacobian at x0, f_scale = 0
def jac_nan(x):
    return np.full((3, 2), np.nan)


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_nonfinite_jacobian_at_x0(method):
    """scipy: 'trf' raises ValueError, 'dogbox' LinAlgError (a ValueError), 'lm' runs
    MINPACK on NaNs and reports success at x0. We raise scipy's ValueError for all."""
    if method == "trf":
        assert scipy_raises(ValueError, fun_lin, [0.0, 0.0], jac=jac_nan) == NAN_MSG
    elif method == "dogbox":
        assert issubclass(np.linalg.LinAlgError, ValueError)
        scipy_raises(np.linalg.LinAlgError, fun_lin, [0.0, 0.0], jac=jac_nan, method=method)
    with pytest.raises(ValueError, match=NAN_MSG + ": the Jacobian is not finite"):
        least_squares(fun_lin, [0.0, 0.0], jac=jac_nan, method=method)


def test_nonfinite_jacobian_at_x0_finite_differences():
    """Finite residuals at x0, but the forward difference leaves the function's domain."""
    fun = lambda x: np.array([np.sqrt(1.0 - x[0]), x[0] - 2.0])  # noqa: E731
    assert scipy_raises(ValueError, fun, [1.0], method="trf") == NAN_MSG
    with pytest.raises(ValueError, match=NAN_MSG):
        quiet(least_squares, fun, [1.0])


@pytest.mark.parametrize("f_scale", [0.0, np.inf, np.nan])
@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_f_scale_not_usable(f_scale, method):
    """scipy: 0 and NaN raise ('trf' ValueError, 'dogbox' LinAlgError); inf returns a
    NaN cost with status 0. We raise scipy's ValueError, naming `f_scale`."""
    kw = dict(loss="soft_l1", f_scale=f_scale, method=method)
    if np.isinf(f_scale):
        ref = quiet(so.least_squares, fun_lin, [0.0, 0.0], **kw)
        assert np.isnan(ref.cost)
    elif method == "trf":
        assert scipy_raises(ValueError, fun_lin, [0.0, 0.0], **kw) == NAN_MSG
    else:
        scipy_raises(np.linalg.LinAlgError, fun_lin, [0.0, 0.0], **kw)
    with pytest.raises(ValueError, match=NAN_MSG + r": `f_scale` must be finite and nonzero"):
        least_squares(fun_lin, [0.0, 0.0], loss="soft_l1", f_scale=f_scale, method=method)


def test_f_scale_not_usable_callable_loss_and_batch():
    def rho(z):
        return np.stack([z, np.ones_like(z), np.zeros_like(z)])

    with pytest.raises(ValueError, match=r"nonzero for loss='callable'"):
        least_squares(fun_lin, [0.0, 0.0], loss=rho, f_scale=0.0)
    with pytest.raises(ValueError, match=r"`f_scale` must be finite and nonzero"):
        batch_least_squares(lambda x: x - 1.0, np.zeros((4, 2)), loss="huber", f_scale=0.0)


@pytest.mark.parametrize("method", ["trf", "lm"])
def test_f_scale_ignored_by_linear_loss_and_negative_allowed(method):
    """The linear loss ignores f_scale (scipy too); a negative one acts as its absolute value."""
    ref = so.least_squares(fun_lin, [0.0, 0.0], f_scale=0.0, method=method)
    res = least_squares(fun_lin, [0.0, 0.0], f_scale=0.0, method=method)
    np.testing.assert_allclose(res.x, ref.x, rtol=0, atol=1e-7)
    if method == "trf":
        neg = least_squares(fun_lin, [0.0, 0.0], loss="cauchy", f_scale=-0.5)
        ref = so.least_squares(fun_lin, [0.0, 0.0], loss="cauchy", f_scale=-0.5)
        np.testing.assert_allclose(neg.cost, ref.cost, rtol=1e-8)


def test_batch_nonfinite_jacobian_at_x0_fails_alone():
    B = 5
    y = np.arange(B, dtype=float)[:, None] + np.array([[0.0, 1.0, 2.0]])
    bad = np.zeros(B, dtype=bool)
    bad[2] = True

    def fun(x, y, bad):
        return np.concatenate([x, x], axis=1)[:, :3] - y

    def jac(x, y, bad):
        J = np.broadcast_to(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
                            (x.shape[0], 3, 2)).copy()
        J[bad] = np.nan
        return J

    res = batch_least_squares(fun, np.zeros((B, 2)), jac=jac, args=(y, bad))
    assert res.status[2] == codes.NONFINITE and not res.success[2] and res.nfev[2] == 1
    assert res.message[2] == codes.message(codes.NONFINITE)
    others = [0, 1, 3, 4]
    assert np.all(res.success[others])
    good = batch_least_squares(fun, np.zeros((B, 2)), jac=jac, args=(y, ~np.ones(B, bool)))
    np.testing.assert_array_equal(res.x[others], good.x[others])  # same path run twice
