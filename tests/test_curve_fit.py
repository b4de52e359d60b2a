"""``torchimize_scipy.curve_fit`` against ``scipy.optimize.curve_fit``, call by call."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize as so
import torch
from _parity import (
    ONE_EVAL_RTOL,
    assert_counts_close,
    assert_message_matches,
    assert_status_equivalent,
)
from scipy.optimize import Bounds, OptimizeWarning

from torchimize_scipy._curve_fit import curve_fit

RTOL_P = 1e-6
RTOL_C = 1e-5
COV_MSG = "Covariance of the parameters could not be estimated"


def func(x, a, b, c):
    return a * np.exp(-b * x) + c


def func_t(x, a, b, c):
    return a * torch.exp(-b * x) + c


def func_jac(x, a, b, c):
    e = np.exp(-b * x)
    return np.stack([e, -a * x * e, np.ones_like(x)], axis=1)


def func_redundant(x, a, b, c, d):  # a and d only appear as a product
    return a * d * np.exp(-b * x) + c


def func_unused(x, a, b, c):  # c has no effect: a zero Jacobian column
    return a * np.exp(-b * x) + 0 * c


def plane(X, a, b, c):
    return a * X[0] ** 2 + b * X[1] + c


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1234)
    x = np.linspace(0, 4, 50)
    y = func(x, 2.5, 1.3, 0.5) + 0.2 * rng.normal(size=x.size)
    sig = 0.1 + rng.random(x.size)
    cov = np.diag(sig**2) + 0.01 * np.exp(-np.abs(x[:, None] - x[None, :]))
    return x, y, sig, cov


def assert_cov_close(ours, ref, rtol=RTOL_C):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


def both(*args, rtol_p=RTOL_P, rtol_c=RTOL_C, **kwargs):
    """Run scipy and ours with full_output; compare popt, pcov and the info.

    ``ier`` by the parity policy (``tests/_parity.py``): equal, or both in the
    converged class 1-4 (which test fires first at the solution is rounding);
    the message exactly where the ier is the same, ``nfev`` within an iteration.
    """
    ref = so.curve_fit(*args, full_output=True, **kwargs)
    got = curve_fit(*args, full_output=True, **kwargs)
    np.testing.assert_allclose(got[0], ref[0], rtol=rtol_p)
    assert_cov_close(got[1], ref[1], rtol_c)
    assert got[2].keys() == ref[2].keys()
    assert_status_equivalent(got[4], ref[4])
    assert_message_matches(got[4], ref[4], got[3], ref[3])
    # 'lm' counts its finite-difference calls: an iteration is len(popt) + 1 of them
    assert_counts_close(got[4], ref[4], got[2]["nfev"], ref[2]["nfev"],
                        slack=len(ref[0]) + 2)
    return ref, got


# ---------------------------------------------------------------------------
# scipy's documented examples
# ---------------------------------------------------------------------------
def test_docstring_example_unbounded(data):
    x, y, _, _ = data
    ref, got = both(func, x, y)
    assert isinstance(got[0], np.ndarray) and got[0].dtype == np.float64
    assert isinstance(got[1], np.ndarray) and got[1].shape == (3, 3)


@pytest.mark.parametrize("method", [None, "trf", "dogbox"])
def test_docstring_example_bounded(data, method):
    x, y, _, _ = data
    # the stops differ by rounding here (AMD EPYC: trf ier 1 vs scipy 2, dogbox 3 vs 1,
    # same nfev and solution): ``both`` accepts any converged ier, see tests/_parity.py
    both(func, x, y, bounds=(0, [3.0, 1.0, 0.5]), method=method)


@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_docstring_example_methods(data, method):
    x, y, _, _ = data
    both(func, x, y, method=method)


def test_docstring_example_bad_scale():
    x = np.linspace(0, 4, 50)
    y = func(x, 500000, 0.01, 15)
    msg = ("Optimal parameters not found: The maximum number of function "
           "evaluations is exceeded.")
    with pytest.raises(RuntimeError, match="^" + msg.replace(".", r"\.") + "$"):
        curve_fit(func, x, y, method="trf")
    popt, _ = curve_fit(func, x, y, method="trf", x_scale=[1000, 1, 1])
    ref, _ = so.curve_fit(func, x, y, method="trf", x_scale=[1000, 1, 1])
    np.testing.assert_allclose(popt, ref, rtol=1e-7)


def test_docstring_example_redundant_parameter(data):
    """Overparametrised model: scipy's condition-number check gives the same verdict."""
    x, y, _, _ = data
    _, pcov_ref = so.curve_fit(func_redundant, x, y)
    popt, pcov = curve_fit(func_redundant, x, y)
    assert np.linalg.cond(pcov) > 1e15 and np.linalg.cond(pcov_ref) > 1e15
    # the identifiable combinations agree
    ref, _ = so.curve_fit(func_redundant, x, y)
    np.testing.assert_allclose(popt[0] * popt[3], ref[0] * ref[3], rtol=1e-5)
    np.testing.assert_allclose(popt[1:3], ref[1:3], rtol=1e-5)


# ---------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", [None, "trf", "dogbox"])
@pytest.mark.parametrize("absolute_sigma", [False, True])
@pytest.mark.parametrize("kind", ["1d", "2d", "scalar", "len1"])
def test_sigma(data, method, absolute_sigma, kind):
    x, y, sig, cov = data
    sigma = {"1d": sig, "2d": cov, "scalar": 0.3, "len1": [0.3]}[kind]
    both(func, x, y, sigma=sigma, absolute_sigma=absolute_sigma, method=method)


def test_absolute_vs_relative_sigma(data):
    x, y, sig, _ = data
    p1, c_rel = curve_fit(func, x, y, sigma=sig)
    p2, c_abs = curve_fit(func, x, y, sigma=sig, absolute_sigma=True)
    r = (func(x, *p1) - y) / sig
    np.testing.assert_allclose(p1, p2)
    np.testing.assert_allclose(c_rel, c_abs * (r @ r) / (x.size - 3), rtol=1e-10)
    # relative sigma: scaling sigma changes nothing
    # (another path: the scaled residuals round differently, so the ftol stop lands
    # elsewhere within ftol; compare to the scale of the matrix, not entry by entry)
    _, c_rel10 = curve_fit(func, x, y, sigma=10 * sig)
    assert_cov_close(c_rel10, c_rel, rtol=1e-6)


def test_sigma_errors(data):
    x, y, sig, cov = data
    for cf in (so.curve_fit, curve_fit):
        with pytest.raises(ValueError, match="`sigma` has incorrect shape."):
            cf(func, x, y, sigma=np.ones(3))
        with pytest.raises(ValueError, match="`sigma` must be positive definite."):
            cf(func, x, y, sigma=-np.eye(x.size))


# ---------------------------------------------------------------------------
# Jacobians, methods, options
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", [None, "trf", "dogbox"])
@pytest.mark.parametrize("sigma", [None, "1d", "2d"])
def test_callable_jac(data, method, sigma):
    x, y, sig, cov = data
    s = {None: None, "1d": sig, "2d": cov}[sigma]
    ref, got = both(func, x, y, jac=func_jac, sigma=s, method=method)  # checks nfev
    if method is None:
        assert_counts_close(got[4], ref[4], got[2]["njev"], ref[2]["njev"])


def test_scalar_sigma_with_callable_jac(data):
    """scipy fails here (it solves a triangular system with a 0-d matrix); we scale."""
    x, y, _, _ = data
    with pytest.raises(ValueError):
        so.curve_fit(func, x, y, jac=func_jac, sigma=0.3)
    p, c = curve_fit(func, x, y, jac=func_jac, sigma=0.3)
    ref = so.curve_fit(func, x, y, jac=func_jac, sigma=np.full(x.size, 0.3))
    np.testing.assert_allclose(p, ref[0], rtol=RTOL_P)
    assert_cov_close(c, ref[1])


@pytest.mark.parametrize("method", ["trf", "dogbox"])
@pytest.mark.parametrize("jac", ["2-point", "3-point", "cs"])
def test_string_jac(data, method, jac):
    x, y, _, _ = data
    both(func, x, y, method=method, jac=jac)


def test_lm_extra_string_jacobians(data):
    """'3-point' and 'autograd' with 'lm' are ours (scipy's leastsq rejects strings)."""
    x, y, _, _ = data
    ref = so.curve_fit(func, x, y)
    for jac, f in (("3-point", func), ("autograd", func_t)):
        p, c = curve_fit(f, x, y, jac=jac)
        np.testing.assert_allclose(p, ref[0], rtol=1e-6)
        assert_cov_close(c, ref[1], rtol=1e-3)  # Jacobian at the solution, see module notes


@pytest.mark.parametrize("method", [None, "trf"])
def test_autograd_numpy_input(data, method):
    x, y, sig, _ = data
    ref = so.curve_fit(func, x, y, sigma=sig, method=method, jac=func_jac)
    p, c = curve_fit(func_t, x, y, sigma=sig, method=method, jac="autograd")
    assert isinstance(p, np.ndarray)
    np.testing.assert_allclose(p, ref[0], rtol=RTOL_P)
    assert_cov_close(c, ref[1], rtol=1e-3 if method is None else RTOL_C)


@pytest.mark.parametrize("method", ["gn", "gd"])
def test_our_methods(data, method):
    x, y, _, _ = data
    ref = so.curve_fit(func, x, y, method="trf", ftol=1e-12, xtol=1e-12, gtol=1e-12)
    p, c = curve_fit(func, x, y, method=method, ftol=1e-12, xtol=1e-12, gtol=1e-12,
                     max_nfev=20000)
    np.testing.assert_allclose(p, ref[0], rtol=1e-5)
    assert_cov_close(c, ref[1], rtol=1e-4)


def test_trf_options_pass_through(data):
    x, y, _, _ = data
    both(func, x, y, method="trf", loss="soft_l1", f_scale=0.3)
    both(func, x, y, method="dogbox", x_scale=[1.0, 2.0, 0.5], ftol=1e-10)


def test_leastsq_options(data):
    x, y, _, _ = data
    both(func, x, y, ftol=1e-10, xtol=1e-10)
    both(func, x, y, epsfcn=1e-10)
    both(func, x, y, diag=[1.0, 2.0, 3.0])
    both(func, x, y, gtol=1e-3)


@pytest.mark.parametrize("jac", [None, func_jac])
def test_lm_maxfev_boundary(data, jac):
    """leastsq counts finite-difference calls in ``nfev``/``maxfev``; so do we."""
    x, y, _, _ = data
    need = so.curve_fit(func, x, y, jac=jac, full_output=True)[2]["nfev"]
    failures = 0
    for maxfev in range(3, need + 1):
        outcome = []
        for cf in (so.curve_fit, curve_fit):
            try:
                cf(func, x, y, jac=jac, maxfev=maxfev)
                outcome.append("ok")
            except RuntimeError as e:
                outcome.append(str(e))
        assert outcome[0] == outcome[1], maxfev
        if outcome[1] != "ok":
            failures += 1
            assert outcome[1] == ("Optimal parameters not found: Number of calls to function "
                                  f"has reached maxfev = {maxfev}.")
    assert failures > 0


def test_trf_maxfev_is_max_nfev(data):
    x, y, _, _ = data
    for cf in (so.curve_fit, curve_fit):
        with pytest.raises(RuntimeError, match="maximum number of function evaluations"):
            cf(func, x, y, method="trf", maxfev=3)
        with pytest.raises(TypeError, match="unexpected keyword argument 'maxfev'"):
            cf(func, x, y, method="trf", maxfev=3, max_nfev=3)


def test_full_output_lm(data):
    x, y, _, _ = data
    ref, got = both(func, x, y)
    info_r, info_g = ref[2], got[2]
    assert list(info_g) == ["fvec", "nfev", "fjac", "ipvt", "qtf"]  # nfev: see ``both``
    np.testing.assert_allclose(info_g["fvec"], info_r["fvec"], rtol=1e-6, atol=1e-8)
    assert info_g["ipvt"].dtype == np.int32
    # a discrete output, exact: the column norms that order the pivots differ by far
    # more than rounding on this problem
    np.testing.assert_array_equal(info_g["ipvt"], info_r["ipvt"])
    assert info_g["fjac"].shape == info_r["fjac"].shape == (3, x.size)
    np.testing.assert_allclose(info_g["fjac"], info_r["fjac"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(info_g["qtf"], info_r["qtf"], rtol=1e-3, atol=1e-8)
    assert 1 <= got[4] <= 4
    # cov_x of leastsq, rebuilt from fjac and ipvt as its docstring says
    n = 3
    R = np.triu(info_g["fjac"].T[:n])
    Rinv = np.linalg.inv(R)
    W = np.empty_like(Rinv)
    W[info_g["ipvt"]] = Rinv
    s_sq = (info_g["fvec"] ** 2).sum() / (x.size - n)
    np.testing.assert_allclose(W @ W.T * s_sq, got[1], rtol=1e-10)


@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_full_output_trf(data, method):
    x, y, _, _ = data
    ref, got = both(func, x, y, method=method)
    assert list(got[2]) == ["nfev", "fvec"]  # nfev: see ``both``
    np.testing.assert_allclose(got[2]["fvec"], ref[2]["fvec"], rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------
# covariance corner cases
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", [None, "trf", "dogbox"])
def test_rank_deficient_zero_column(data, method):
    """'lm': singular R -> inf and a warning; 'trf'/'dogbox': pseudo-inverse."""
    x, y, _, _ = data
    with warnings.catch_warnings(record=True) as w_ref:
        warnings.simplefilter("always")
        ref = so.curve_fit(func_unused, x, y, method=method)
    with warnings.catch_warnings(record=True) as w_got:
        warnings.simplefilter("always")
        got = curve_fit(func_unused, x, y, method=method)
    assert [str(w.message) for w in w_got] == [str(w.message) for w in w_ref]
    np.testing.assert_allclose(got[0], ref[0], rtol=RTOL_P)
    if method is None:
        assert np.isinf(got[1]).all() and np.isinf(ref[1]).all()
        assert any(issubclass(w.category, OptimizeWarning) for w in w_got)
    else:
        assert_cov_close(got[1], ref[1])
        assert got[1][2, 2] == 0


def test_rank_deficient_redundant_dogbox(data):
    """a and d enter only as a * d: which point of that curve 'dogbox' ends on depends
    on rounding-level singular values kept by the step (scipy's too), so compare what
    the data determine: the sum of squares (to ftol) and the product a * d."""
    x, y, _, _ = data
    ref = so.curve_fit(func_redundant, x, y, method="dogbox", full_output=True)
    got = curve_fit(func_redundant, x, y, method="dogbox", full_output=True)
    ssr_ref, ssr_got = (float(np.sum(r[2]["fvec"] ** 2)) for r in (ref, got))
    assert ssr_got <= ssr_ref * (1 + 1e-8)
    np.testing.assert_allclose(got[0][0] * got[0][3], ref[0][0] * ref[0][3], rtol=1e-4)
    assert got[4] in (1, 2, 3, 4)


@pytest.mark.parametrize("method", [None, "trf"])
def test_no_degrees_of_freedom(method):
    """M == N: relative covariance is undefined (inf + warning), absolute is not."""
    x = np.array([0.0, 1.0, 2.5])
    y = func(x, 2.5, 1.3, 0.5) + np.array([0.01, -0.02, 0.01])
    for cf in (so.curve_fit, curve_fit):
        with pytest.warns(OptimizeWarning, match=COV_MSG):
            _, pcov = cf(func, x, y, method=method)
        assert np.isinf(pcov).all()
    ref = so.curve_fit(func, x, y, method=method, absolute_sigma=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizeWarning)
        got = curve_fit(func, x, y, method=method, absolute_sigma=True)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    assert_cov_close(got[1], ref[1], rtol=1e-4)


def test_fewer_points_than_parameters(data):
    x, y, _, _ = data
    for cf in (so.curve_fit, curve_fit):
        with pytest.raises(TypeError, match="The number of func parameters=3 must not exceed "
                                            "the number of data points=2"):
            cf(func, x[:2], y[:2])
    with pytest.warns(OptimizeWarning, match=COV_MSG):
        both(func, x[:2], y[:2], method="trf")


# ---------------------------------------------------------------------------
# NaN handling and input checks
# ---------------------------------------------------------------------------
def test_check_finite(data):
    x, y, _, _ = data
    yn, xn, yi = y.copy(), x.copy(), y.copy()
    yn[3], xn[5], yi[7] = np.nan, np.nan, np.inf
    for cf in (so.curve_fit, curve_fit):
        for xx, yy in ((x, yn), (xn, y), (x, yi)):
            with pytest.raises(ValueError, match="array must not contain infs or NaNs"):
                cf(func, xx, yy)
            with pytest.raises(ValueError, match="array must not contain infs or NaNs"):
                cf(func, xx, yy, nan_policy="omit", check_finite=True)


@pytest.mark.parametrize("method", [None, "trf"])
def test_nan_policy(data, method):
    x, y, sig, cov = data
    yn, xn = y.copy(), x.copy()
    yn[[3, 10]], xn[20] = np.nan, np.nan
    for cf in (so.curve_fit, curve_fit):
        for xx, yy in ((x, yn), (xn, y)):
            with pytest.raises(ValueError, match="The input contains nan values"):
                cf(func, xx, yy, nan_policy="raise", method=method)
        with pytest.raises(ValueError, match="`nan_policy='propagate'` is not supported"):
            cf(func, x, yn, nan_policy="propagate")
        with pytest.raises(ValueError, match=r"nan_policy must be one of \{None, 'raise', "
                                             r"'omit'\}"):
            cf(func, x, y, nan_policy="foo")
    both(func, x, y, nan_policy="raise", method=method)
    both(func, xn, yn, nan_policy="omit", method=method)
    both(func, xn, yn, nan_policy="omit", sigma=sig, method=method)
    both(func, xn, yn, nan_policy="omit", sigma=cov, method=method)


def test_nan_policy_omit_multidimensional():
    rng = np.random.default_rng(7)
    X = np.stack([np.linspace(0, 1, 30), np.linspace(1, 3, 30) ** 1.5])
    y = plane(X, 1.0, 2.0, 3.0) + 0.01 * rng.normal(size=30)
    X[1, 4] = np.nan
    y[9] = np.nan
    both(plane, X, y, nan_policy="omit")


def test_input_errors(data):
    x, y, _, _ = data

    def no_params(x):
        return x

    def var_params(x, *p):
        return p[0] * x

    for cf in (so.curve_fit, curve_fit):
        with pytest.raises(ValueError, match="`ydata` must not be empty!"):
            cf(func, x, [])
        for f in (no_params, var_params):
            with pytest.raises(ValueError, match="Unable to determine number of fit "
                                                 "parameters."):
                cf(f, x, y)
        with pytest.raises(ValueError, match="Method 'lm' only works for unconstrained "
                                             "problems. Use 'trf' or 'dogbox' instead."):
            cf(func, x, y, bounds=(0, 10), method="lm")
        for method in (None, "trf"):
            with pytest.raises(ValueError, match="'args' is not a supported keyword"):
                cf(func, x, y, args=(1,), method=method)
        with pytest.raises(RuntimeError, match="Improper input parameters."):
            cf(func, x, y, ftol=-1.0)
        with pytest.raises(TypeError, match="must not exceed func output vector length M=1"):
            cf(lambda x, a, b: a * x + b, 2.0, [1.0])
    np.testing.assert_allclose(curve_fit(var_params, x, y, p0=[1.0])[0],
                               so.curve_fit(var_params, x, y, p0=[1.0])[0], rtol=RTOL_P)


@pytest.mark.parametrize("bounds", [
    ([0, 0, 0], [3, 1, 0.5]),
    # float bounds: from integer ``Bounds`` scipy builds an integer default p0 and
    # truncates it ([1.5, 0.5, 0.25] -> [1, 0, 0]), so the two runs would not start
    # from the same point (same popt, nfev 11 vs 8)
    Bounds([0.0, 0.0, 0.0], [3.0, 1.0, 0.5]),
    ([0, -np.inf, -np.inf], [np.inf, 2.0, np.inf]),   # one-sided: p0 = lb + 1, ub - 1
])
def test_default_p0_with_bounds(data, bounds):
    x, y, _, _ = data
    both(func, x, y, bounds=bounds)


def test_list_inputs(data):
    x, y, _, _ = data
    both(func, list(x), list(y))
    both(func, x, y, p0=[2, 1, 1])


def test_xdata_passed_unchanged():
    """Non-array xdata reaches ``f`` as it is."""

    class Grid:
        def __init__(self, t):
            self.t = t

    seen = []
    t = np.linspace(0, 1, 20)
    y = 3.0 * t + 1.0

    def lin(g, a, b):
        seen.append(g)
        return a * g.t + b

    g = Grid(t)
    popt, _ = curve_fit(lin, g, y)
    np.testing.assert_allclose(popt, [3.0, 1.0], rtol=1e-8)
    assert all(s is g for s in seen)


# ---------------------------------------------------------------------------
# multi-dimensional xdata
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", [None, "trf", "dogbox"])
@pytest.mark.parametrize("as_tuple", [True, False])
def test_multidimensional_xdata(method, as_tuple):
    rng = np.random.default_rng(3)
    X = (np.linspace(0, 1, 30), np.linspace(1, 3, 30) ** 1.5)
    y = plane(X, 1.0, 2.0, 3.0) + 0.01 * rng.normal(size=30)
    xdata = X if as_tuple else np.stack(X)
    both(plane, xdata, y, method=method)


# ---------------------------------------------------------------------------
# torch in, torch out
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {}, {"method": "trf"}, {"method": "dogbox"}, {"sigma": "1d"}, {"sigma": "2d"},
    {"bounds": (0, [3.0, 1.0, 0.5])}, {"jac": "autograd", "method": "trf"},
])
def test_torch_inputs(data, kwargs):
    x, y, sig, cov = data
    kw = dict(kwargs)
    if "sigma" in kw:
        kw["sigma"] = {"1d": sig, "2d": cov}[kw["sigma"]]
    ref = so.curve_fit(func, x, y, full_output=True,
                       **{k: v for k, v in kw.items() if k != "jac"})
    seen = []

    def model(xx, a, b, c):
        seen.append((type(xx), type(a)))
        return func_t(xx, a, b, c)

    xt, yt = torch.tensor(x), torch.tensor(y)
    if "sigma" in kw:
        kw["sigma"] = torch.tensor(kw["sigma"])
    popt, pcov, info, mesg, ier = curve_fit(model, xt, yt, full_output=True, **kw)
    assert isinstance(popt, torch.Tensor) and isinstance(pcov, torch.Tensor)
    assert popt.dtype == pcov.dtype == torch.float64
    assert popt.device == yt.device and pcov.device == yt.device
    assert isinstance(info["fvec"], torch.Tensor)
    assert all(tx is torch.Tensor and ta is torch.Tensor for tx, ta in seen)
    np.testing.assert_allclose(popt.numpy(), ref[0], rtol=RTOL_P)
    assert_cov_close(pcov.numpy(), ref[1])
    assert_status_equivalent(ier, ref[4])
    assert_message_matches(ier, ref[4], mesg, ref[3])
    if "jac" not in kw:
        assert_counts_close(ier, ref[4], info["nfev"], ref[2]["nfev"], slack=5)


def test_torch_multidimensional_and_nan_omit():
    rng = np.random.default_rng(5)
    X = np.stack([np.linspace(0, 1, 30), np.linspace(1, 3, 30) ** 1.5])
    y = plane(X, 1.0, 2.0, 3.0) + 0.01 * rng.normal(size=30)
    X[0, 2] = np.nan
    ref = so.curve_fit(plane, X, y, nan_policy="omit")
    Xt = tuple(torch.tensor(r) for r in X)
    popt, pcov = curve_fit(plane, Xt, torch.tensor(y), nan_policy="omit")
    np.testing.assert_allclose(popt.numpy(), ref[0], rtol=RTOL_P)
    assert_cov_close(pcov.numpy(), ref[1])


def test_torch_dtype_follows_p0_then_ydata(data):
    x, y, _, _ = data
    xt = torch.tensor(x)
    popt, pcov = curve_fit(func_t, xt, y, p0=torch.ones(3, dtype=torch.float32))
    assert popt.dtype == pcov.dtype == torch.float32
    popt, pcov = curve_fit(func_t, xt.float(), torch.tensor(y, dtype=torch.float32),
                           method="trf")
    assert popt.dtype == torch.float32
    np.testing.assert_allclose(popt.numpy(), so.curve_fit(func, x, y)[0], rtol=1e-3)
    popt, _ = curve_fit(func_t, xt, torch.tensor(y), dtype=torch.float32)
    assert popt.dtype == torch.float32


def test_torch_check_finite(data):
    x, y, _, _ = data
    yt = torch.tensor(y)
    yt[4] = float("nan")
    with pytest.raises(ValueError, match="array must not contain infs or NaNs"):
        curve_fit(func_t, torch.tensor(x), yt)
    with pytest.raises(ValueError, match="The input contains nan values"):
        curve_fit(func_t, torch.tensor(x), yt, nan_policy="raise")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_cuda(data):  # pragma: no cover - device only
    x, y, sig, _ = data
    ref = so.curve_fit(func, x, y, sigma=sig)
    xt, yt = torch.tensor(x, device="cuda"), torch.tensor(y, device="cuda")
    popt, pcov = curve_fit(func_t, xt, yt, sigma=torch.tensor(sig, device="cuda"))
    assert popt.device.type == "cuda" and pcov.device.type == "cuda"
    np.testing.assert_allclose(popt.cpu().numpy(), ref[0], rtol=RTOL_P)
    assert_cov_close(pcov.cpu().numpy(), ref[1])
    popt, pcov = curve_fit(func, x, y, sigma=sig, method="trf", device="cuda")
    assert isinstance(popt, np.ndarray)
    np.testing.assert_allclose(popt, so.curve_fit(func, x, y, sigma=sig, method="trf")[0],
                               rtol=RTOL_P)


# ===========================================================================
# batch_curve_fit: equal to a loop of curve_fit
# ===========================================================================
from torchimize_scipy._curve_fit import batch_curve_fit  # noqa: E402

NB = 8


def func_b_jac(x, a, b, c):  # (b, M, 3) for (b, 1) columns; also (M, 3) for scalars
    e = np.exp(-b * x)
    return np.stack(np.broadcast_arrays(e, -a * x * e, np.ones_like(a * x)), axis=-1)


@pytest.fixture(scope="module")
def bdata():
    rng = np.random.default_rng(99)
    x = np.linspace(0, 4, 40)
    true = np.stack([2 + rng.random(NB), 1 + rng.random(NB), 0.5 + 0.5 * rng.random(NB)], 1)
    Y = func(x, true[:, :1], true[:, 1:2], true[:, 2:]) + 0.05 * rng.normal(size=(NB, x.size))
    P0 = np.ones((NB, 3)) + 0.1 * rng.random((NB, 3))
    sig = 0.1 + rng.random((NB, x.size))
    cov = np.stack([np.diag(s**2) + 0.01 * np.exp(-np.abs(x[:, None] - x[None, :]))
                    for s in sig])
    return x, Y, P0, sig, cov


def _np(a):
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def assert_batch_is_loop(batch, loop, *, nfev=True):
    """A batch equals its loop of ``curve_fit`` calls by the parity policy: values to
    the fit's accuracy, ``ier`` within the converged class, messages exactly where
    the ier is the same, counts within an iteration (``tests/_parity.py``)."""
    popt, pcov, info, mesg, ier = batch
    popt, pcov, ier = _np(popt), _np(pcov), _np(ier)
    assert popt.shape == (len(loop), loop[0][0].size)
    for i, ref in enumerate(loop):
        p_ref, c_ref = _np(ref[0]), _np(ref[1])
        np.testing.assert_allclose(popt[i], p_ref, rtol=RTOL_P,
                                   atol=RTOL_P * np.abs(p_ref).max())
        assert_cov_close(pcov[i], c_ref)
        np.testing.assert_allclose(_np(info["fvec"])[i], _np(ref[2]["fvec"]), rtol=1e-5,
                                   atol=1e-6)
        assert set(info) == set(ref[2]) - {"fjac", "ipvt", "qtf"}
        assert_status_equivalent(ier[i], ref[4])
        assert_message_matches(ier[i], ref[4], mesg[i], ref[3])
        if nfev:
            names = ["nfev"] + (["njev"] if "njev" in ref[2] else [])
            assert_counts_close(ier[i], ref[4], [int(_np(info[k])[i]) for k in names],
                                [ref[2][k] for k in names], slack=p_ref.size + 2)


def loop_fit(f, xs, Y, P0, **kw):
    return [curve_fit(f, xs(i), Y[i], P0[i], full_output=True,
                      **{k: (v(i) if callable(v) and k == "sigma" else v) for k, v in kw.items()})
            for i in range(len(Y))]


@pytest.mark.parametrize("method", [None, "trf", "dogbox"])
@pytest.mark.parametrize("jac", [None, func_b_jac])
def test_batch_matches_loop(bdata, method, jac):
    x, Y, P0, _, _ = bdata
    loop_jac = None if jac is None else func_jac
    batch = batch_curve_fit(func, x, Y, P0, method=method, jac=jac, full_output=True)
    assert_batch_is_loop(batch, loop_fit(func, lambda i: x, Y, P0, method=method,
                                         jac=loop_jac))


@pytest.mark.parametrize("method", [None, "trf"])
@pytest.mark.parametrize("kind", ["shared", "rows", "cov", "scalar"])
@pytest.mark.parametrize("absolute_sigma", [False, True])
def test_batch_sigma(bdata, method, kind, absolute_sigma):
    x, Y, P0, sig, cov = bdata
    sigma = {"shared": sig[0], "rows": sig, "cov": cov, "scalar": 0.2}[kind]
    per = {"shared": lambda i: sig[0], "rows": lambda i: sig[i], "cov": lambda i: cov[i],
           "scalar": lambda i: np.full(x.size, 0.2)}[kind]
    batch = batch_curve_fit(func, x, Y, P0, sigma=sigma, absolute_sigma=absolute_sigma,
                            method=method, full_output=True)
    assert_batch_is_loop(batch, loop_fit(func, lambda i: x, Y, P0, sigma=per, method=method,
                                         absolute_sigma=absolute_sigma))


def test_batch_bounds_per_problem(bdata):
    x, Y, P0, _, _ = bdata
    ub = np.tile([3.0, 1.2, 0.8], (NB, 1))
    ub[::2, 1] = 5.0
    batch = batch_curve_fit(func, x, Y, P0 * 0.5, bounds=(0, ub), full_output=True)
    loop = [curve_fit(func, x, Y[i], P0[i] * 0.5, bounds=(0, ub[i]), full_output=True)
            for i in range(NB)]
    assert_batch_is_loop(batch, loop)


def test_batch_xdata_layouts():
    rng = np.random.default_rng(11)
    true = np.stack([1 + rng.random(NB), 2 + rng.random(NB), 3 + rng.random(NB)], 1)
    cols = true[:, :1], true[:, 1:2], true[:, 2:]
    X2 = np.stack([np.linspace(0, 1, 30), np.linspace(1, 3, 30) ** 1.5])       # (k, M)
    X3 = np.stack([X2 * (1 + 0.1 * i) for i in range(NB)])                      # (B, k, M)
    P0 = np.ones((NB, 3))
    noise = 0.01 * rng.normal(size=(NB, 30))
    Y2 = plane(X2, *cols) + noise
    Y3 = plane(np.moveaxis(X3, 0, 1), *cols) + noise
    cases = [
        (X2, Y2, lambda i: X2),                                 # shared (k, M) array
        (tuple(X2), Y2, lambda i: tuple(X2)),                   # shared tuple
        (X3, Y3, lambda i: X3[i]),                              # per problem (B, k, M)
        ((X3[:, 0], X3[:, 1]), Y3, lambda i: X3[i]),            # tuple of (B, M)
        (torch.tensor(X3), Y3, lambda i: X3[i]),                # tensor -> torch mode
    ]
    for xb, Y, xs in cases:
        for method in (None, "trf"):
            batch = batch_curve_fit(plane, xb, Y, P0, method=method, full_output=True)
            assert_batch_is_loop(batch, loop_fit(plane, xs, Y, P0, method=method), nfev=False)
    # (B, M): one row of xdata per problem
    Xr = np.stack([np.linspace(0, 4 + 0.2 * i, 40) for i in range(NB)])
    Yr = func(Xr, *cols) + 0.01 * rng.normal(size=Xr.shape)
    batch = batch_curve_fit(func, Xr, Yr, P0, full_output=True)
    assert_batch_is_loop(batch, loop_fit(func, lambda i: Xr[i], Yr, P0))


@pytest.mark.parametrize("method", [None, "trf", "dogbox"])
@pytest.mark.parametrize("jac", [None, "autograd"])
def test_batch_torch(bdata, method, jac):
    x, Y, P0, sig, _ = bdata
    popt, pcov, info, mesg, ier = batch_curve_fit(
        func_t, torch.tensor(x), torch.tensor(Y), torch.tensor(P0), sigma=torch.tensor(sig),
        method=method, jac=jac, full_output=True)
    assert all(isinstance(a, torch.Tensor) for a in (popt, pcov, info["fvec"], ier))
    assert popt.dtype == pcov.dtype == torch.float64 and pcov.shape == (NB, 3, 3)
    loop = loop_fit(func, lambda i: x, Y, P0, sigma=lambda i: sig[i], method=method,
                    jac=None if jac is None else func_jac)
    if jac is None:
        assert_batch_is_loop((popt, pcov, info, mesg, ier), loop)
    else:  # exact Jacobian: 'lm' covariance at the solution (see curve_fit's notes)
        for i, ref in enumerate(loop):
            np.testing.assert_allclose(popt[i].numpy(), ref[0], rtol=RTOL_P)
            assert_cov_close(pcov[i].numpy(), ref[1], rtol=1e-3 if method is None else RTOL_C)


def test_batch_chunks_and_float32(bdata):
    x, Y, P0, _, _ = bdata
    a = batch_curve_fit(func, x, Y, P0)
    b = batch_curve_fit(func, x, Y, P0, chunk_size=3)
    np.testing.assert_allclose(b[0], a[0], rtol=1e-12)
    np.testing.assert_allclose(b[1], a[1], rtol=1e-10)
    p32, c32 = batch_curve_fit(func_t, torch.tensor(x, dtype=torch.float32),
                               torch.tensor(Y, dtype=torch.float32), P0, method="trf")
    assert p32.dtype == torch.float32
    np.testing.assert_allclose(p32.numpy(), a[0], rtol=1e-3)


def test_batch_failures_are_nan(bdata):
    """Where curve_fit raises, the batch reports NaN, ier and the same message."""
    x, Y, P0, _, _ = bdata
    P0 = P0.copy()
    P0[2] = [1.0, 8.0, 1.0]  # a slow start: runs out of maxfev
    Yn = Y.copy()
    Yn[5, 3] = np.nan        # curve_fit's check_finite rejects this one
    for method, maxfev in ((None, 30), ("trf", 6)):
        with pytest.warns(OptimizeWarning, match="Optimal parameters not found for"):
            popt, pcov, info, mesg, ier = batch_curve_fit(func, x, Yn, P0, method=method,
                                                          maxfev=maxfev, full_output=True)
        for i in range(NB):
            try:
                ref = curve_fit(func, x, Yn[i], P0[i], method=method, maxfev=maxfev,
                                full_output=True)
            except (RuntimeError, ValueError) as e:
                assert np.isnan(popt[i]).all() and np.isnan(pcov[i]).all()
                assert not 1 <= ier[i] <= 4
                assert str(e).endswith(mesg[i])
            else:
                np.testing.assert_allclose(popt[i], ref[0], rtol=RTOL_P)
                assert_status_equivalent(ier[i], ref[4])
                assert_counts_close(ier[i], ref[4], info["nfev"][i], ref[2]["nfev"],
                                    slack=P0.shape[1] + 2)


@pytest.mark.parametrize("method", [None, "trf"])
def test_batch_covariance_warnings(bdata, method):
    x, Y, P0, _, _ = bdata
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        popt, pcov = batch_curve_fit(func_unused, x, Y, P0, method=method)
    for i in range(NB):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            p_ref, c_ref = curve_fit(func_unused, x, Y[i], P0[i], method=method)
        np.testing.assert_allclose(popt[i], p_ref, rtol=RTOL_P)
        if method is None:
            assert np.isinf(pcov[i]).all() and np.isinf(c_ref).all()
        else:
            assert_cov_close(pcov[i], c_ref)
    expected = [f"{COV_MSG} for {NB} of {NB} problems"] if method is None else []
    assert [str(w.message) for w in rec] == expected
    # M == N: relative covariance undefined (inf, one warning), absolute is not
    xs = np.array([0.0, 1.0, 2.5])
    Ys = func(xs, P0[:, :1] * 2, P0[:, 1:2], P0[:, 2:] * 0.5)
    with pytest.warns(OptimizeWarning, match=f"{COV_MSG} for {NB} of {NB} problems"):
        _, pcov = batch_curve_fit(func, xs, Ys, P0, method=method)
    assert np.isinf(pcov).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", OptimizeWarning)
        _, pcov = batch_curve_fit(func, xs, Ys, P0, method=method, absolute_sigma=True)
    assert np.isfinite(pcov).all()


def test_batch_input_errors(bdata):
    x, Y, P0, sig, _ = bdata
    with pytest.raises(ValueError, match=r"`p0` must have shape \(B, P\)"):
        batch_curve_fit(func, x, Y, P0[0])
    with pytest.raises(ValueError, match="`ydata` must have shape"):
        batch_curve_fit(func, x, Y[0], P0)
    with pytest.raises(ValueError, match="`ydata` must not be empty!"):
        batch_curve_fit(func, x, np.zeros((NB, 0)), P0)
    with pytest.raises(ValueError, match="Method 'lm' only works for unconstrained"):
        batch_curve_fit(func, x, Y, P0, bounds=(0, 10), method="lm")
    with pytest.raises(ValueError, match="'args' is not a supported keyword argument."):
        batch_curve_fit(func, x, Y, P0, args=(1,))
    with pytest.raises(ValueError, match="`sigma` has incorrect shape."):
        batch_curve_fit(func, x, Y, P0, sigma=np.ones(3))
    with pytest.raises(ValueError, match="`sigma` must be positive definite."):
        batch_curve_fit(func, x, Y, P0, sigma=-np.tile(np.eye(x.size), (NB, 1, 1)))
    with pytest.raises(TypeError, match="must not exceed the number of data points=2"):
        batch_curve_fit(func, x[:2], Y[:, :2], P0)
    xn = x.copy()
    xn[0] = np.nan
    with pytest.raises(ValueError, match="array must not contain infs or NaNs"):
        batch_curve_fit(func, xn, Y, P0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batch_cuda(bdata):  # pragma: no cover - device only
    x, Y, P0, sig, _ = bdata
    dev = "cuda"
    for method in (None, "trf"):
        popt, pcov = batch_curve_fit(func_t, torch.tensor(x, device=dev),
                                     torch.tensor(Y, device=dev), torch.tensor(P0, device=dev),
                                     sigma=torch.tensor(sig, device=dev), method=method)
        assert popt.device.type == dev and pcov.device.type == dev
        loop = loop_fit(func, lambda i: x, Y, P0, sigma=lambda i: sig[i], method=method)
        for i, ref in enumerate(loop):
            np.testing.assert_allclose(popt[i].cpu().numpy(), ref[0], rtol=RTOL_P)
            assert_cov_close(pcov[i].cpu().numpy(), ref[1])
    popt, _ = batch_curve_fit(func, x, Y, P0, device=dev)
    assert isinstance(popt, np.ndarray)


@pytest.mark.parametrize("fallback", ["svd", "qr"])
def test_batch_normal_inverse_routes(fallback):
    """Well-conditioned problems: Gram inverse equal to the factorisation; others: the latter."""
    from torchimize_scipy._curve_fit._covariance import normal_inverse, qr_inverse, svd_pinv

    rng = np.random.default_rng(5)
    J = rng.normal(size=(6, 20, 3))
    J[1, :, 2] = 0.0                                  # rank-deficient
    J[2, :, 1] = J[2, :, 0] * (1 + 1e-7)              # cond(J^T J) ~ 1e15
    J[3, 4, 0] = np.nan                               # non-finite
    factorised = {"svd": svd_pinv, "qr": qr_inverse}[fallback]
    seen = []

    def spy(Jb):
        seen.append(Jb.shape[0])
        return factorised(Jb)

    Jt = torch.as_tensor(J)
    cov = normal_inverse(Jt, spy).numpy()
    assert seen == [2]                                # rows 1 and 2 only, in one call
    ref = factorised(Jt[[0, 4, 5]]).numpy()
    for k, i in enumerate((0, 4, 5)):
        # Gram inverse vs factorisation: two kernels, one evaluation each
        np.testing.assert_allclose(cov[i], ref[k], rtol=ONE_EVAL_RTOL, atol=0)
        np.testing.assert_array_equal(cov[i], cov[i].T)
    for i in (1, 2):  # the same values as the factorisation gives these rows alone
        np.testing.assert_array_equal(cov[i], factorised(Jt[[1, 2]]).numpy()[i - 1])
    assert np.isnan(cov[3]).any()


@pytest.mark.parametrize("method", [None, "trf", "dogbox"])
def test_batch_nonfinite_member_does_not_spoil_others(method):
    """A problem whose residuals are NaN at p0 fails alone; the others equal scipy's fits."""
    x = np.linspace(0, 4, 30)

    def f(x, a, b):
        with np.errstate(invalid="ignore"):
            return a * np.exp(-np.sqrt(b) * x)

    rng = np.random.default_rng(0)
    Y = np.stack([f(x, 2, 1.5), f(x, 1, 2.0), f(x, 3, 1.0)]) + 0.01 * rng.normal(size=(3, 30))
    P0 = np.array([[1.0, 1.0], [1.0, -1.0], [1.0, 1.2]])  # sqrt(-1): NaN residuals
    with pytest.warns(OptimizeWarning, match="Optimal parameters not found for 1 of 3"):
        popt, pcov, info, mesg, ier = batch_curve_fit(f, x, Y, P0, method=method,
                                                      full_output=True)
    assert np.isnan(popt[1]).all() and np.isnan(pcov[1]).all()
    for i in (0, 2):
        ref = so.curve_fit(f, x, Y[i], P0[i], method=method)
        np.testing.assert_allclose(popt[i], ref[0], rtol=RTOL_P)
        assert_cov_close(pcov[i], ref[1])
