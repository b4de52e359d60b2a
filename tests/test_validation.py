"""Input validation of ``least_squares``: one test per branch, with SciPy's message.

Where SciPy rejects the same call, our ``ValueError`` must carry SciPy's exact
message (checked by :func:`same_error`); where we extend SciPy (methods 'gn'/'gd',
``jac='autograd'``) or do not support something yet, the message is ours and is
pinned here. Hypothesis then throws random bad inputs at the frontend: they must
all end in a clean ``ValueError``, never another exception and never a result.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import scipy.optimize as so
import torch
from _parity import assert_counts_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.sparse import csr_array
from scipy.sparse.linalg import aslinearoperator

from torchimize_scipy import least_squares

EPS = np.finfo(float).eps
HYP = settings(max_examples=40, deadline=None,
               suppress_health_check=[HealthCheck.too_slow])


def fun_trivial(x, a=0.0):
    return (x - a) ** 2 + 5.0


def jac_trivial(x, a=0.0):
    return 2 * (x - a)


def fun_rosenbrock(x):
    return np.array([10 * (x[1] - x[0] ** 2), (1 - x[0])])


def jac_rosenbrock(x):
    return np.array([[-20 * x[0], 10], [-1, 0]])


def fun_rosenbrock_cropped(x):
    return fun_rosenbrock(x)[0]


def scipy_error(*args, **kwargs) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError) as info:
            so.least_squares(*args, **kwargs)
    return str(info.value)


def same_error(*args, **kwargs) -> str:
    """Both raise ValueError with the same message; returns it."""
    msg = scipy_error(*args, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=re.escape(msg)) as info:
            least_squares(*args, **kwargs)
    assert str(info.value) == msg
    return msg


def our_error(*args, match: str, **kwargs) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=match) as info:
            least_squares(*args, **kwargs)
    return str(info.value)


# ============================================================================ options
@pytest.mark.parametrize("method", ["newton", "TRF", "", "lm ", None])
def test_method(method):
    ref = scipy_error(fun_trivial, 2.0, method=method)
    assert ref == "`method` must be 'trf', 'dogbox' or 'lm'."
    our_error(fun_trivial, 2.0, method=method,
              match=re.escape("`method` must be 'trf', 'dogbox', 'lm', 'gn' or 'gd'."))


@pytest.mark.parametrize("jac", ["oops", "4-point", "Autograd", None])
def test_jac(jac):
    ref = scipy_error(fun_trivial, 2.0, jac=jac)
    assert ref == "`jac` must be '2-point', '3-point', 'cs' or callable."
    our_error(fun_trivial, 2.0, jac=jac,
              match=re.escape("`jac` must be '2-point', '3-point', 'cs', 'autograd' or "
                              "callable."))


def test_autograd_rejected_by_scipy():
    """'autograd' is ours only: scipy rejects it, we accept it."""
    scipy_error(lambda x: x - 1, np.array([0.0]), jac="autograd")
    res = least_squares(lambda x: x - 1, torch.tensor([0.0], dtype=torch.float64),
                        jac="autograd")
    assert res.success


@pytest.mark.parametrize("tr_solver", ["cholesky", "EXACT", 1])
def test_tr_solver(tr_solver):
    same_error(fun_trivial, 2.0, tr_solver=tr_solver)


@pytest.mark.parametrize("loss", ["hinge", "L2", "Huber"])
def test_loss(loss):
    msg = same_error(fun_trivial, 2.0, loss=loss)
    assert msg.startswith("`loss` must be one of dict_keys(")


@pytest.mark.parametrize("loss", ["huber", "soft_l1", "cauchy", "arctan", lambda z: z])
def test_lm_loss(loss):
    assert same_error(fun_trivial, 2.0, method="lm", loss=loss) == (
        "method='lm' supports only 'linear' loss function.")


@pytest.mark.parametrize("verbose", [3, -1, 0.5, "2", True + 2])
def test_verbose(verbose):
    assert same_error(fun_trivial, 2.0, verbose=verbose) == "`verbose` must be in [0, 1, 2]."


@pytest.mark.parametrize("max_nfev", [0, -1, -100, 0.0])
@pytest.mark.parametrize("method", ["trf", "lm"])
def test_max_nfev(max_nfev, method):
    assert same_error(fun_trivial, 2.0, max_nfev=max_nfev, method=method) == (
        "`max_nfev` must be None or positive integer.")


# ============================================================================ x0
@pytest.mark.parametrize("x0", [2.0 + 0.0j, [1.0, 2.0 + 0.0j], np.array([1j, 2])])
def test_x0_complex(x0):
    assert same_error(fun_trivial, x0) == "`x0` must be real."


def test_x0_complex_tensor():
    with pytest.raises(ValueError, match=re.escape("`x0` must be real.")):
        least_squares(fun_trivial, torch.tensor([1.0 + 1j]))


@pytest.mark.parametrize("x0", [np.ones((2, 2)), np.ones((1, 3)), [[1.0], [2.0]]])
def test_x0_2d(x0):
    assert same_error(fun_trivial, x0) == "`x0` must have at most 1 dimension."


def test_x0_2d_tensor():
    with pytest.raises(ValueError, match="`x0` must have at most 1 dimension."):
        least_squares(fun_trivial, torch.ones(2, 2, dtype=torch.float64))


# ============================================================================ bounds
@pytest.mark.parametrize("bounds", [(1.0, 2, 3), (1.0,), ([0.0, 0.0],), ()])
def test_bounds_length(bounds):
    assert same_error(fun_trivial, 1.5, bounds=bounds) == "`bounds` must contain 2 elements."


@pytest.mark.parametrize("bounds", [(-3.0, 3.0), (-np.inf, 3.0), (0.0, np.inf),
                                    so.Bounds(-1.0, 5.0)])
def test_lm_bounds(bounds):
    assert same_error(fun_trivial, 2.0, bounds=bounds, method="lm") == (
        "Method 'lm' doesn't support bounds.")


def test_lm_infinite_bounds_accepted():
    res = least_squares(fun_trivial, 2.0, bounds=(-np.inf, np.inf), method="lm")
    assert res.success


@pytest.mark.parametrize("x0,bounds", [
    (2.0, (1.0, [2.0, 3.0])),
    ([1.0, 2.0], ([0.0], [3.0, 4.0])),
    ([1.0, 2.0], ([0.0, 0.0, 0.0], 5.0)),
    ([1.0, 2.0], (np.zeros((2, 2)), 5.0)),
    ([1.0, 2.0], so.Bounds([0.0, 0.0, 0.0], 5.0)),
])
def test_bounds_shape(x0, bounds):
    fun = fun_trivial if np.ndim(x0) == 0 else fun_rosenbrock
    assert same_error(fun, x0, bounds=bounds) == "Inconsistent shapes between bounds and `x0`."


@pytest.mark.parametrize("bounds", [(10.0, 0.0), (1.0, 1.0), ([0.0, 3.0], [1.0, 3.0])])
def test_lb_not_below_ub(bounds):
    assert same_error(fun_rosenbrock, [0.5, 2.0], bounds=bounds) == (
        "Each lower bound must be strictly less than each upper bound.")


@pytest.mark.parametrize("method", ["trf", "dogbox", "gn", "gd"])
@pytest.mark.parametrize("x0,bounds", [(2.0, (3.0, 4.0)), (5.0, (3.0, 4.0)),
                                       (np.nan, (3.0, 4.0)), (np.nan, (-np.inf, np.inf))])
def test_infeasible_x0(method, x0, bounds):
    msg = "Initial guess is outside of provided bounds"
    if method in ("trf", "dogbox"):
        assert same_error(fun_trivial, x0, bounds=bounds, method=method) == msg
    else:
        our_error(fun_trivial, x0, bounds=bounds, method=method, match=re.escape(msg))


# ============================================================================ x_scale
@pytest.mark.parametrize("x_scale", ["auto", "JAC", -1.0, 0.0, np.nan, np.inf, 1.0 + 2.0j,
                                     [1.0, -1.0], [1.0, 0.0], "", [[1.0, "a"]]])
@pytest.mark.parametrize("method", ["trf", "lm"])
def test_x_scale_invalid(x_scale, method):
    assert same_error(fun_rosenbrock, [1.0, 2.0], x_scale=x_scale, method=method) == (
        "`x_scale` must be 'jac' or array_like with positive numbers.")


@pytest.mark.parametrize("x_scale", [[1.0], [1.0, 2.0, 3.0], np.ones((2, 2)), np.ones((1, 2))])
def test_x_scale_shape(x_scale):
    assert same_error(fun_rosenbrock, [1.0, 2.0], x_scale=x_scale) == (
        "Inconsistent shapes between `x_scale` and `x0`.")


# ============================================================================ tolerances
@pytest.mark.parametrize("method", ["trf", "dogbox", "gn", "gd"])
@pytest.mark.parametrize("tols", [(None, None, None), (0.0, 0.0, 0.0), (1e-20, None, 0.0),
                                  (EPS / 2, EPS / 2, EPS / 2)])
def test_all_tolerances_below_eps(method, tols):
    ftol, xtol, gtol = tols
    msg = f"At least one of the tolerances must be higher than machine epsilon ({EPS:.2e})."
    kw = dict(ftol=ftol, xtol=xtol, gtol=gtol, method=method)
    if method in ("trf", "dogbox"):
        assert same_error(fun_trivial, 2.0, **kw) == msg
    else:
        our_error(fun_trivial, 2.0, match=re.escape(msg), **kw)


@pytest.mark.parametrize("tols", [(None, 1e-13, 1e-13), (1e-13, None, 1e-13),
                                  (1e-13, 1e-13, None), (1e-17, 1e-8, 1e-8)])
def test_lm_tolerance_below_eps(tols):
    ftol, xtol, gtol = tols
    assert same_error(fun_trivial, 2.0, ftol=ftol, xtol=xtol, gtol=gtol, method="lm") == (
        f"All tolerances must be higher than machine epsilon ({EPS:.2e}) for method 'lm'.")


@pytest.mark.parametrize("name", ["ftol", "xtol", "gtol"])
def test_tolerance_below_eps_warns(name):
    msg = (f"Setting `{name}` below the machine epsilon ({EPS:.2e}) effectively disables "
           "the corresponding termination condition.")
    kw = {name: 1e-20}
    with pytest.warns(UserWarning, match=re.escape(msg)):
        ref = so.least_squares(fun_trivial, 2.0, **kw)
    with pytest.warns(UserWarning, match=re.escape(msg)) as rec:
        res = least_squares(fun_trivial, 2.0, **kw)
    assert res.status == ref.status
    # stacklevel: the warning points at the caller (this file), as scipy's does
    assert any(w.filename == __file__ for w in rec)


def test_callback_with_lm_warns():
    msg = "Callback function specified, but not supported with `lm` method."
    calls = []
    with pytest.warns(UserWarning, match=re.escape(msg)):
        so.least_squares(fun_trivial, [0.0], method="lm", callback=calls.append)
    with pytest.warns(UserWarning, match=re.escape(msg)) as rec:
        res = least_squares(fun_trivial, [0.0], method="lm", callback=calls.append)
    assert calls == [] and res.success
    assert any(w.filename == __file__ for w in rec)


# ============================================================================ fun / jac / loss
def fun_2d(x):
    return np.array([x, x**2, x**3])


def fun_nonfinite(x):
    return np.array([np.log(x[0]), 1.0])


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_fun_returns_2d(method):
    msg = same_error(fun_2d, 2.0, jac=lambda x: np.ones((3, 1)), method=method)
    assert msg == "`fun` must return at most 1-d array_like. f0.shape: (3, 1)"


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_fun_returns_2d_finite_differences(method):
    """With a finite-difference jac scipy 1.17 fails earlier, inside ``approx_derivative``
    ("`f0` passed has more than 1 dimension."), and so do we (with a callable ``jac``
    both give the frontend's message: ``tests/test_scipy_messages_probe.py``)."""
    assert scipy_error(fun_2d, 2.0, method=method) == "`f0` passed has more than 1 dimension."
    our_error(fun_2d, 2.0, method=method,
              match=re.escape("`f0` passed has more than 1 dimension."))


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
@pytest.mark.parametrize("fun", [lambda x: np.array([np.nan, 1.0]),
                                 lambda x: np.array([1.0, np.inf]),
                                 lambda x: -np.inf * x])
def test_residuals_not_finite_at_x0(fun, method):
    assert same_error(fun, [1.0, 2.0], method=method) == (
        "Residuals are not finite in the initial point.")


def test_residuals_not_finite_at_x0_torch():
    fun = lambda x: torch.stack([torch.log(x[0] - 2), x[1]])  # noqa: E731
    with pytest.raises(ValueError, match="Residuals are not finite in the initial point."):
        least_squares(fun, torch.tensor([1.0, 2.0], dtype=torch.float64), jac="autograd")


@pytest.mark.parametrize("jac", ["2-point", jac_rosenbrock])
def test_lm_fewer_residuals_than_variables(jac):
    assert same_error(fun_rosenbrock_cropped, [-2.0, 1.0], jac=jac, method="lm") == (
        "Method 'lm' doesn't work when the number of residuals is less than the number "
        "of variables.")


def jac_rosenbrock_bad_dim(x):
    return np.array([[-20 * x[0], 10], [-1, 0], [0.0, 0.0]])


def jac_wrong_dimensions(x, a=0.0):
    return np.atleast_3d(jac_trivial(x, a=a))


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
@pytest.mark.parametrize("fun,x0,jac", [
    (fun_rosenbrock, [1.0, 2.0], jac_rosenbrock_bad_dim),
    (fun_rosenbrock, [1.0, 2.0], lambda x: jac_rosenbrock(x).T[:1]),
    (fun_trivial, 2.0, jac_wrong_dimensions),
])
def test_jac_wrong_shape(fun, x0, jac, method):
    msg = same_error(fun, x0, jac=jac, method=method)
    assert msg.startswith("The return value of `jac` has wrong shape: expected")


LOSS_SHAPE_MSG = "The return value of `loss` callable has wrong shape."


@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_callable_loss_wrong_shape(method):
    assert same_error(fun_rosenbrock, [1.0, 2.0], loss=lambda z: np.ones((3, z.size + 1)),
                      method=method) == LOSS_SHAPE_MSG


@pytest.mark.parametrize("method", ["trf", "dogbox"])
@pytest.mark.parametrize("loss", [lambda z: np.vstack([z, z]), lambda z: z],
                         ids=["2xm", "m"])
def test_callable_loss_too_few_rows(loss, method):
    """scipy scales ``rho[2]`` before its shape check and dies with an IndexError; we
    raise the ValueError scipy meant to raise."""
    with pytest.raises(IndexError):
        so.least_squares(fun_rosenbrock, [1.0, 2.0], loss=loss, method=method)
    our_error(fun_rosenbrock, [1.0, 2.0], loss=loss, method=method,
              match=re.escape(LOSS_SHAPE_MSG))


# ============================================================================ unsupported
def test_lm_jac_sparsity():
    assert same_error(fun_trivial, 2.0, jac_sparsity=[1], method="lm") == (
        "method='lm' does not support `jac_sparsity`.")


def test_lm_jac_sparsity_with_callable_jac_is_ignored():
    """As scipy: with a callable jac, 'lm' does not look at jac_sparsity."""
    ref = so.least_squares(fun_trivial, 2.0, jac_trivial, jac_sparsity=[1], method="lm")
    res = least_squares(fun_trivial, 2.0, jac_trivial, jac_sparsity=[1], method="lm")
    np.testing.assert_allclose(res.x, ref.x, atol=1e-8)


@pytest.mark.parametrize("method", ["gn", "gd"])
def test_lsmr_not_for_line_search_methods(method):
    our_error(fun_rosenbrock, [2.0, 2.0], tr_solver="lsmr", method=method,
              match=rf"method='{method}' works only with dense Jacobians and tr_solver='exact'")


def test_lsmr_with_lm_is_ignored():
    ref = so.least_squares(fun_trivial, 2.0, tr_solver="lsmr", method="lm")
    res = least_squares(fun_trivial, 2.0, tr_solver="lsmr", method="lm")
    np.testing.assert_allclose(res.x, ref.x, atol=1e-8)


@pytest.mark.parametrize("method", ["gn", "gd"])
@pytest.mark.parametrize("sparsity", [[1], np.ones((1, 1)), csr_array(np.ones((1, 1)))])
def test_jac_sparsity_not_for_line_search_methods(method, sparsity):
    our_error(fun_trivial, 2.0, jac_sparsity=sparsity, method=method,
              match=rf"method='{method}' works only with dense Jacobians")


@pytest.mark.parametrize("method", ["trf", "dogbox", "gn", "gd"])
@pytest.mark.parametrize("tr_options", [{"regularize": False}, {"atol": 1e-10}])
def test_tr_options_ignored_with_exact_solver_and_named(method, tr_options):
    """scipy ignores `tr_options` with the dense solver; so do we, with a warning naming them."""
    ref = least_squares(fun_trivial, 2.0, method=method)
    with pytest.warns(UserWarning, match=r"`tr_options` .* are ignored with tr_solver='exact'"):
        res = least_squares(fun_trivial, 2.0, tr_options=tr_options, method=method)
    np.testing.assert_array_equal(res.x, ref.x)  # the same path twice
    assert res.nfev == ref.nfev


@pytest.mark.parametrize("tr_options", [None, {}])
def test_empty_tr_options_accepted(tr_options):
    assert least_squares(fun_trivial, 2.0, tr_options=tr_options).success


@pytest.mark.parametrize("method", ["trf", "dogbox"])
@pytest.mark.parametrize("tr_options", [[("atol", 1e-10)], [], (), "atol"])
def test_tr_options_not_a_mapping_with_lsmr(method, tr_options):
    """scipy's lsmr solvers fail on such ``tr_options`` (TypeError or AttributeError); ours
    is one clear TypeError before any work."""
    with pytest.raises((TypeError, AttributeError)):
        so.least_squares(fun_trivial, 2.0, method=method, tr_solver="lsmr", tr_options=tr_options)
    with pytest.raises(TypeError, match=r"`tr_options` must be a dict of keyword arguments "
                                        r"for tr_solver='lsmr', not (list|tuple|str)"):
        least_squares(fun_trivial, 2.0, method=method, tr_solver="lsmr", tr_options=tr_options)


def test_tr_options_with_lm_ignored():
    ref = so.least_squares(fun_trivial, 2.0, tr_options={"regularize": False}, method="lm")
    with pytest.warns(UserWarning, match=r"\['regularize'\] are ignored with method='lm'"):
        res = least_squares(fun_trivial, 2.0, tr_options={"regularize": False}, method="lm")
    np.testing.assert_allclose(res.x, ref.x, atol=1e-8)


def jac_sparse(x):
    return csr_array(np.diag(2 * x))


def jac_operator(x):
    return aslinearoperator(np.diag(2 * x))


@pytest.mark.parametrize("jac", [jac_sparse, jac_operator])
@pytest.mark.parametrize("method", ["trf", "dogbox", "gn", "gd"])
def test_sparse_jac(jac, method):
    """trf/dogbox solve with LSMR as scipy does; the line-search methods refuse by name."""
    if method in ("trf", "dogbox"):
        ref = so.least_squares(fun_trivial, [2.0, 1.0], jac, method=method)
        res = least_squares(fun_trivial, [2.0, 1.0], jac, method=method)
        np.testing.assert_allclose(res.x, ref.x, atol=1e-6)
        return
    our_error(fun_trivial, [2.0, 1.0], jac=jac, method=method,
              match=rf"method='{method}' works only with dense Jacobians")


@pytest.mark.parametrize("jac", [jac_sparse, jac_operator])
def test_sparse_jac_lm(jac):
    assert same_error(fun_trivial, [2.0, 1.0], jac, method="lm") == (
        "method='lm' works only with dense Jacobian matrices.")


@pytest.mark.parametrize("jac", [jac_sparse, jac_operator])
def test_sparse_jac_exact_tr_solver(jac):
    assert same_error(fun_trivial, [2.0, 1.0], jac, tr_solver="exact") == (
        "tr_solver='exact' works only with dense Jacobian matrices.")


# ============================================================================ order of checks
def test_checks_in_scipy_order():
    """A call with several problems reports the first one scipy would."""
    kwargs = [
        dict(method="bad", jac="bad", loss="bad"),
        dict(jac="bad", loss="bad", verbose=7),
        dict(loss="bad", verbose=7, max_nfev=0),
        dict(verbose=7, max_nfev=0, x_scale=-1),
        dict(bounds=(3.0, 4.0), x_scale=-1, ftol=None, xtol=None, gtol=None),
        dict(x_scale=-1, ftol=None, xtol=None, gtol=None),
        dict(method="lm", bounds=(0, 5), x_scale=[1, 2, 3]),
    ]
    for kw in kwargs:
        ref = scipy_error(fun_trivial, 2.0, **kw)
        ours = our_error(fun_trivial, 2.0, match="", **kw)
        assert ours.split(" ")[:3] == ref.split(" ")[:3], (kw, ours, ref)


# ============================================================================ hypothesis
def fun_identity(x):
    return x - 1.0


finite = st.floats(-1e3, 1e3, allow_nan=False)
non_finite = st.sampled_from([np.nan, np.inf, -np.inf])


@HYP
@given(data=st.data(), n=st.integers(1, 4), method=st.sampled_from(["trf", "dogbox", "lm",
                                                                   "gn", "gd"]),
       as_tensor=st.booleans())
def test_hypothesis_nonfinite_x0(data, n, method, as_tensor):
    x0 = np.array(data.draw(st.lists(finite, min_size=n, max_size=n)))
    k = data.draw(st.integers(0, n - 1))
    x0[k] = data.draw(non_finite)
    bounded = method != "lm" and data.draw(st.booleans())
    bounds = (-1e4, 1e4) if bounded else (-np.inf, np.inf)
    with pytest.raises(ValueError) as ours:
        least_squares(fun_identity, torch.from_numpy(x0.copy()) if as_tensor else x0,
                      bounds=bounds, method=method)
    if method in ("trf", "dogbox", "lm"):
        assert str(ours.value) == scipy_error(fun_identity, x0, bounds=bounds, method=method)
    assert str(ours.value) in ("Initial guess is outside of provided bounds",
                               "Residuals are not finite in the initial point.")


@st.composite
def bad_bounds(draw):
    """``(n, (lb, ub))`` where at least one bound is neither a scalar nor of shape (n,)."""
    n = draw(st.integers(1, 4))
    bad_shape = st.one_of(st.tuples(st.integers(0, 5).filter(lambda k: k != n)),
                          st.tuples(st.integers(1, 3), st.integers(1, 3)),
                          st.tuples(st.just(1), st.just(n)))
    any_shape = st.one_of(st.just(()), st.just((n,)), bad_shape)
    shapes = [draw(bad_shape), draw(any_shape)]
    if draw(st.booleans()):
        shapes.reverse()
    return n, (np.full(shapes[0], -10.0), np.full(shapes[1], 10.0))


@HYP
@given(case=bad_bounds(), method=st.sampled_from(["trf", "dogbox", "gn", "gd"]),
       as_tensor=st.booleans())
def test_hypothesis_bad_bounds_shape(case, method, as_tensor):
    n, (lb, ub) = case
    x0 = np.zeros(n)
    msg = "Inconsistent shapes between bounds and `x0`."
    if method in ("trf", "dogbox"):
        assert scipy_error(fun_identity, x0, bounds=(lb, ub), method=method) == msg
    if as_tensor:
        lb, ub = torch.as_tensor(lb), torch.as_tensor(ub)
    with pytest.raises(ValueError, match=re.escape(msg)):
        least_squares(fun_identity, x0, bounds=(lb, ub), method=method)


@HYP
@given(bounds=st.one_of(st.lists(st.floats(-5, 5), max_size=5).filter(lambda b: len(b) != 2),
                        st.tuples(st.floats(-5, 5), st.floats(-5, 5), st.floats(-5, 5))))
def test_hypothesis_bounds_wrong_length(bounds):
    msg = "`bounds` must contain 2 elements."
    assert scipy_error(fun_identity, np.zeros(1), bounds=bounds) == msg
    with pytest.raises(ValueError, match=re.escape(msg)):
        least_squares(fun_identity, np.zeros(1), bounds=bounds)


def _positive_number(s: str) -> bool:
    try:
        v = np.asarray(s, dtype=float)  # the conversion scipy's check applies
    except (ValueError, TypeError):
        return False
    return bool(np.isfinite(v) and v > 0)


bad_scale_values = st.one_of(
    st.floats(max_value=0.0),
    st.sampled_from([np.nan, np.inf, -np.inf]),
    # strings that numpy reads as a positive finite number ('1', ' 2') are valid, as in scipy
    st.text(max_size=5).filter(lambda s: s != "jac" and not _positive_number(s)),
    st.complex_numbers(min_magnitude=1e-3, allow_nan=False, allow_infinity=False).filter(
        lambda z: z.imag != 0),
)


@HYP
@given(data=st.data(), method=st.sampled_from(["trf", "dogbox", "lm", "gn", "gd"]))
def test_hypothesis_bad_x_scale(data, method):
    n = data.draw(st.integers(1, 3))
    kind = data.draw(st.sampled_from(["scalar", "array", "shape"]))
    if kind == "scalar":
        x_scale = data.draw(bad_scale_values)
    elif kind == "array":
        vals = data.draw(st.lists(st.floats(0.1, 10), min_size=n, max_size=n))
        vals[data.draw(st.integers(0, n - 1))] = data.draw(
            st.one_of(st.floats(max_value=0.0), st.sampled_from([np.nan, np.inf])))
        x_scale = np.array(vals)
    else:
        m = data.draw(st.integers(0, 5).filter(lambda k: k != n))
        x_scale = np.ones(m) if data.draw(st.booleans()) else np.ones((n, 2))
    x0 = np.zeros(n)
    with pytest.raises(ValueError) as ours:
        least_squares(fun_identity, x0, x_scale=x_scale, method=method)
    assert str(ours.value) in ("`x_scale` must be 'jac' or array_like with positive numbers.",
                               "Inconsistent shapes between `x_scale` and `x0`.")
    if method in ("trf", "dogbox", "lm"):
        assert str(ours.value) == scipy_error(fun_identity, x0, x_scale=x_scale, method=method)


@HYP
@given(method=st.text(max_size=8).filter(lambda s: s not in ("trf", "dogbox", "lm", "gn",
                                                                 "gd")))
def test_hypothesis_bad_method(method):
    assert scipy_error(fun_identity, np.zeros(2), method=method) == (
        "`method` must be 'trf', 'dogbox' or 'lm'.")
    with pytest.raises(ValueError, match=re.escape("`method` must be 'trf', 'dogbox', 'lm', "
                                                   "'gn' or 'gd'.")):
        least_squares(fun_identity, np.zeros(2), method=method)


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_default_bounds_fast_path_refuses_nan_x0_as_check_bounds(method):
    """``prepare`` skips the bound checks for the default ``(-inf, inf)`` (every variable
    free) but keeps their one test that can fail: a NaN in ``x0`` is outside every bound,
    with scipy's message, as it is for the same infinite bounds given as arrays."""
    msg = "Initial guess is outside of provided bounds"
    x0 = np.array([1.0, np.nan])
    for bounds in [(-np.inf, np.inf), (np.full(2, -np.inf), np.full(2, np.inf))]:
        with pytest.raises(ValueError, match=msg):
            least_squares(fun_identity, x0, bounds=bounds, method=method)
    assert scipy_error(fun_identity, x0, method=method) == msg
    # infinite x0 entries are inside: the fast path lets them through as check_bounds does
    from torchimize_scipy._validation import check_bounds, unbounded_default

    assert unbounded_default((-np.inf, np.inf)) and not unbounded_default((-np.inf, 1e300))
    check_bounds(np.full(2, -np.inf), np.full(2, np.inf), np.array([np.inf, 0.0]), method)


def test_default_bounds_fast_path_same_result_as_infinite_arrays():
    """The default bounds and the same bounds as arrays give the same unbounded solve."""
    x0 = np.array([-1.2, 1.0])

    def rosen(x):
        return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])

    for method in ("trf", "lm"):
        a = least_squares(rosen, x0, method=method)
        b = least_squares(rosen, x0, method=method, bounds=(np.full(2, -np.inf), [np.inf] * 2))
        assert a.nfev == b.nfev and a.status == b.status
        np.testing.assert_allclose(a.x, b.x, rtol=1e-12, atol=0)
        assert isinstance(a.x, np.ndarray) and a.x.dtype == np.float64


def _three(x):
    return np.array([x[0] - 1, x[1] - 2, x[2] * x[0], x[1] + x[2]])


@pytest.mark.parametrize(("method", "jac"), [("trf", "2-point"), ("trf", "3-point"),
                                             ("dogbox", "2-point"), ("dogbox", "3-point"),
                                             ("lm", "2-point")])
def test_diff_step_of_length_one_broadcasts_as_scipy(method, jac):
    x0 = np.array([0.5, 0.5, 0.5])
    ref = so.least_squares(_three, x0, jac=jac, method=method, diff_step=[1e-4])
    res = least_squares(_three, x0, jac=jac, method=method, diff_step=[1e-4])
    same = least_squares(_three, x0, jac=jac, method=method, diff_step=1e-4)
    np.testing.assert_array_equal(res.x, same.x)  # the same path: a scalar step
    np.testing.assert_allclose(res.x, ref.x, rtol=1e-6, atol=1e-9)
    assert_counts_close(res.status, ref.status, res.nfev, ref.nfev)


@pytest.mark.parametrize("diff_step", [np.full((3, 3), 1e-3), np.array([[1e-3] * 3]),
                                       [1e-3, 1e-3]])
def test_diff_step_of_another_shape_refused(diff_step):
    """scipy fails with numpy's errors (ValueError, IndexError); ours names the option."""
    with pytest.raises((ValueError, IndexError)):
        so.least_squares(_three, np.full(3, 0.5), diff_step=diff_step)
    our_error(_three, np.full(3, 0.5), diff_step=diff_step,
              match=r"`diff_step` must be a scalar or have the shape of `x0`")


@pytest.mark.parametrize("method", ["lm", "dogbox"])
def test_tr_options_not_a_mapping_ignored_where_scipy_ignores_it(method):
    ref = so.least_squares(fun_trivial, 2.0, method=method, tr_options=3)
    with pytest.warns(UserWarning, match=r"`tr_options` 3 are ignored"):
        res = least_squares(fun_trivial, 2.0, method=method, tr_options=3)
    np.testing.assert_allclose(res.x, ref.x, atol=1e-6)


@pytest.mark.parametrize(("method", "loss"), [("trf", "linear"), ("trf", "soft_l1"),
                                              ("dogbox", "linear"), ("dogbox", "soft_l1"),
                                              ("lm", "linear")])
def test_cost_dtype_of_float32_residuals_as_scipy(method, loss):
    """scipy's 'trf'/'dogbox' keep float32 residuals' dtype in ``fun`` and, for the linear
    loss, in ``cost`` (``0.5 f.f``); 'lm' and robust losses give float64."""

    def f32(x):
        return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]], dtype=np.float32)

    ref = so.least_squares(f32, [2.0, 2.0], method=method, loss=loss)
    res = least_squares(f32, [2.0, 2.0], method=method, loss=loss)
    assert type(res.cost) is type(ref.cost)
    assert res.fun.dtype == ref.fun.dtype
