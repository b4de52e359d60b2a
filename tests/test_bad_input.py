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
@pytest.mark.parametrize("method,loss", [("trf", "linear"), ("trf", "soft_l1"),
                                         ("dogbox", "linear"), ("dogbox", "soft_l1"),
                                         ("lm", "linear")])
def test_no_variables_like_scipy(method, jac, loss):
    """``x0 = []``: scipy runs ('trf'/'dogbox' stop on gtol, 'lm' reports improper input)."""
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


# ============================================================ 4. per-problem args, NaN rows of x0
T4 = np.linspace(0.0, 1.0, 6)


def decay_v(x, y):
    return np.exp(-x[:, :1] * T4) - y


def decay_1(x, y):
    return np.exp(-x[0] * T4) - y


def decay_data(B):
    return np.exp(-np.arange(1.0, B + 1.0)[:, None] * T4)


@pytest.mark.parametrize("rows", [4, 6, 2])
def test_args_rows_mismatch_refused(rows):
    """A 2-D argument with neither B rows nor one row: a ValueError naming it and the sizes
    (before: numpy's broadcast error inside the user's function)."""
    B = 5
    y = np.resize(decay_data(B), (rows, T4.size))
    msg = (rf"`args\[1\]` has shape \({rows}, 6\), but the batch has B = 5 problems: "
           r"an array of 2 or more dimensions in `args` is per-problem data")
    with pytest.raises(ValueError, match=msg):
        batch_least_squares(lambda x, off, y: decay_v(x, y) + off, np.ones((B, 1)),
                            args=(0.0, y))


def test_args_rows_mismatch_refused_not_vectorized_and_torch():
    B = 5
    y = torch.as_tensor(decay_data(B + 1))
    with pytest.raises(ValueError, match=r"`args\[0\]` has shape \(6, 6\)"):
        batch_least_squares(lambda x, y: torch.exp(-x[0] * torch.as_tensor(T4)) - y,
                            torch.ones(B, 1, dtype=torch.float64), args=(y,),
                            vectorized=False)


@pytest.mark.parametrize("vectorized", [True, False])
def test_args_single_row_broadcast(vectorized):
    """One row is every problem's data (multistart on one data set): vectorised
    functions see it broadcast to the running rows, row-wise ones see that row."""
    B = 4
    y1 = decay_data(3)[2:3]  # rate 3.0, shape (1, 6)
    seen = []

    def fun_v(x, y):
        seen.append(y.shape[0] == x.shape[0])
        return decay_v(x, y)

    def fun_1(x, y):
        seen.append(y.shape == T4.shape)
        return decay_1(x, y)

    x0 = np.linspace(0.5, 5.0, B)[:, None]
    res = batch_least_squares(fun_v if vectorized else fun_1, x0, args=(y1,),
                              vectorized=vectorized)
    assert seen and all(seen)
    np.testing.assert_allclose(res.x[:, 0], 3.0, rtol=1e-6)
    ref = [so.least_squares(decay_1, x0[i], args=(y1[0],)).x[0] for i in range(B)]
    np.testing.assert_allclose(res.x[:, 0], ref, rtol=1e-6)


def test_args_one_dimensional_and_scalars_shared():
    """1-D arrays of another length than B, scalars and other objects are passed whole."""
    B = 3
    y = decay_data(B)

    def fun(x, y, t, scale, tag):
        assert t.shape == (6,) and scale == 1.0 and tag == "ok"
        return np.exp(-x[:, :1] * t) - y

    res = batch_least_squares(fun, np.ones((B, 1)), args=(y, T4, 1.0, "ok"))
    np.testing.assert_allclose(res.x[:, 0], [1.0, 2.0, 3.0], rtol=1e-6)


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_nan_row_of_x0_fails_alone(method):
    """scipy refuses a NaN x0 ('Initial guess is outside of provided bounds'); in a batch
    that problem fails alone with status 5, as one with a NaN in its data does."""
    B = 5
    y = decay_data(B)
    msg = "Initial guess is outside of provided bounds"
    assert scipy_raises(ValueError, decay_1, [np.nan], args=(y[0],), method=method) == msg
    x0 = np.ones((B, 1))
    x0[2] = np.nan
    res = batch_least_squares(decay_v, x0, args=(y,), method=method)
    assert res.status[2] == codes.NONFINITE and not res.success[2] and res.nfev[2] == 1
    assert res.message[2] == codes.message(codes.NONFINITE)
    others = [0, 1, 3, 4]
    assert np.all(res.success[others])
    alone = batch_least_squares(decay_v, x0[others], args=(y[others],), method=method)
    np.testing.assert_array_equal(res.x[others], alone.x)  # the same path, run twice
    y_nan = y.copy()
    y_nan[2, 0] = np.nan
    data = batch_least_squares(decay_v, np.ones((B, 1)), args=(y_nan,), method=method)
    assert data.status[2] == res.status[2]


def test_nan_row_of_x0_with_bounds_and_torch():
    B = 4
    y = torch.as_tensor(decay_data(B))
    x0 = torch.ones(B, 1, dtype=torch.float64)
    x0[1] = float("nan")
    res = batch_least_squares(lambda x, y: torch.exp(-x[:, :1] * torch.as_tensor(T4)) - y,
                              x0, args=(y,), bounds=(0.0, 10.0))
    assert res.status.tolist()[1] == codes.NONFINITE
    assert bool(res.success[[0, 2, 3]].all())
    assert torch.isnan(x0[1]).all()  # the caller's x0 is untouched
    # an x0 outside finite bounds is still refused for the whole batch, as by scipy
    x0[1] = 20.0
    with pytest.raises(ValueError, match="Initial guess is outside of provided bounds"):
        batch_least_squares(lambda x, y: x - 1.0, x0, args=(y,), bounds=(0.0, 10.0))


# ============================================================ 5. float32 tolerances
def test_float32_tolerances_raised_to_float32_eps():
    from torchimize_scipy._validation import EPS32, check_tolerance

    assert EPS32 == float(torch.finfo(torch.float32).eps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults raise no warning
        assert check_tolerance(1e-8, 1e-8, 1e-8, "trf", dtype=torch.float32) == (EPS32,) * 3
        assert check_tolerance(1e-8, 1e-8, 1e-8, "trf", dtype=torch.float64) == (1e-8,) * 3
        assert check_tolerance(None, 1e-3, 1e-8, "trf", dtype=torch.float32) == (
            0.0, 1e-3, EPS32)
    # below float64's eps: scipy's warning, and the test stays effectively disabled
    with pytest.warns(UserWarning, match="Setting `gtol` below the machine epsilon"):
        tols = check_tolerance(1e-8, 1e-8, 1e-20, "trf", dtype=torch.float32)
    assert tols == (EPS32, EPS32, 1e-20)


def gauss_t(p, y, t):
    a, mu, s = p.unbind(-1)
    return a[:, None] * torch.exp(-0.5 * ((t - mu[:, None]) / s[:, None]) ** 2) - y


def test_float32_batch_stops_like_float64():
    """The 1e-8 defaults act as float32's eps in float32 (the same evaluations as passing
    eps32), and the float32 batch reaches the float64 costs to float32 rounding."""
    rng = np.random.default_rng(5)
    B = 64
    t64 = torch.linspace(-3.0, 3.0, 40, dtype=torch.float64)
    truth = torch.tensor(np.column_stack([rng.uniform(0.5, 2.0, B), rng.uniform(-1, 1, B),
                                          rng.uniform(0.6, 1.4, B)]))
    y64 = gauss_t(truth, torch.zeros(B, 40, dtype=torch.float64), t64)
    y64 = y64 + 0.02 * torch.as_tensor(rng.standard_normal((B, 40)))
    p0 = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64).repeat(B, 1)
    ref = batch_least_squares(gauss_t, p0, jac="autograd", args=(y64,), kwargs={"t": t64})
    kw = dict(jac="autograd", args=(y64.float(),), kwargs={"t": t64.float()})
    res = batch_least_squares(gauss_t, p0.float(), **kw)
    assert bool(res.success.all())
    # float32 costs: relative rounding of a sum of 40 squares, ~ 40 * eps32
    np.testing.assert_allclose(res.cost.double(), ref.cost, rtol=40 * 1.2e-7)
    eps32 = float(torch.finfo(torch.float32).eps)
    same = batch_least_squares(gauss_t, p0.float(), ftol=eps32, xtol=eps32, gtol=eps32, **kw)
    np.testing.assert_array_equal(res.nfev, same.nfev)  # the defaults became eps32


# ============================================================ 6. progress bar
def test_progress_counts_evaluations(capsys):
    B = 9
    y = decay_data(B)
    res = batch_least_squares(decay_v, np.ones((B, 1)), args=(y,), progress=True)
    err = capsys.readouterr().err
    total = int(res.nfev.sum())
    assert total < 1000  # printed without a unit prefix (k, M)
    done, shown_total = re.findall(r"([\d.]+)/([\d.]+) \[", err)[-1]
    assert float(done) == float(shown_total) == total  # every residual evaluation, exactly
    assert f"fits {B}/{B}" in err
    assert "batch_least_squares[trf]" in err


def test_progress_label(capsys):
    B = 3
    batch_least_squares(decay_v, np.ones((B, 1)), args=(decay_data(B),), method="lm",
                        progress="my fits")
    err = capsys.readouterr().err
    assert "my fits" in err and "batch_least_squares" not in err


def test_batch_curve_fit_progress_label(capsys):
    from torchimize_scipy import batch_curve_fit

    y = decay_data(3)
    batch_curve_fit(lambda t, k: np.exp(-k * t), T4, y, p0=np.ones((3, 1)), progress=True)
    err = capsys.readouterr().err
    assert "batch_curve_fit[" in err and "batch_least_squares" not in err


def test_progress_estimate():
    """No total until a problem finishes; then evaluations done plus, per unfinished
    problem, the finished problems' mean (at least one more)."""
    from torchimize_scipy._batch import _Progress

    bar = _Progress(6, "t", interval=0.0)
    bar.bar.disable = True
    bar.started(4)  # 4 problems admitted: one evaluation each
    bar.iteration({"x": torch.zeros(4, 1), "nfev": torch.tensor([2, 2, 2, 2])})
    assert bar.evals == 8 and bar.bar.total is None
    bar.finished(2)  # two finished with 2 evaluations each
    bar.iteration({"x": torch.zeros(2, 1), "nfev": torch.tensor([3, 3])})
    # 10 done; running: max(2 - 3, 1) each = 2; not started: 2 problems * 2 = 4
    assert bar.evals == 10 and bar.bar.total == 16
    bar.close(True)
    assert bar.bar.total == 10


def _sq_minus_one(x):
    return x**2 - 1


@pytest.mark.parametrize("solve", ["scipy", "least_squares", "batch_least_squares"])
def test_kwargs_not_a_mapping_names_the_users_function(solve):
    """Python's own TypeError for ``fun(*args, **kwargs)`` names ``fun``, not a wrapper of ours."""
    x0 = np.full(2, 2.0)
    call = {"scipy": lambda: so.least_squares(_sq_minus_one, x0, kwargs=[1]),
            "least_squares": lambda: least_squares(_sq_minus_one, x0, kwargs=[1]),
            "batch_least_squares":
                lambda: batch_least_squares(_sq_minus_one, x0[None], kwargs=[1])}
    with pytest.raises(TypeError, match=r"_sq_minus_one\(\) argument after \*\* must be a "
                                        r"mapping, not list"):
        call[solve]()


def _three_residuals(x):
    return np.array([x[0] - 1, x[1] - 2, x[0] + x[1]])


def test_jac_changing_shape_mid_run_names_one_points_shapes():
    """A ``jac`` of one point that changes its shape after ``x0``: the message shows the
    shapes of one point's Jacobian (scipy fails inside numpy with a shape error too)."""

    def jac(x):
        return np.array([[1.0, 0], [0, 1], [1, 1]]) if x[0] == 0.5 else np.ones((2, 2))

    with pytest.raises(ValueError):
        so.least_squares(_three_residuals, np.full(2, 0.5), jac=jac)
    with pytest.raises(ValueError, match=re.escape("expected (3, 2), actual (2, 2)")):
        least_squares(_three_residuals, np.full(2, 0.5), jac=jac)


def test_fun_changing_length_mid_run_says_so():
    def fun(x):
        return _three_residuals(x) if x[0] == 0.5 else _three_residuals(x)[:2]

    with pytest.raises(ValueError):
        so.least_squares(fun, np.full(2, 0.5))
    with pytest.raises(ValueError, match=r"`fun` returned arrays of different shapes at "
                                         r"different points .*\[\(2,\), \(3,\)\]"):
        least_squares(fun, np.full(2, 0.5))
