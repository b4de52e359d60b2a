"""What a user switching one import line may write, on one problem (curve_fit, least_squares).

Each test pins a case that once gave a wrong answer or an answer of the wrong
kind, against what scipy (1.17) does with the same call:

* a model whose output does not broadcast to the shape of ``ydata`` one to one
  (a column ``(M, 1)`` against ``ydata (M,)``, or ``(M,)`` against ``ydata (M, 1)``)
  made ``f - ydata`` an ``(M, M)`` array of every difference and fitted it; scipy
  refuses it (MINPACK: "not a proper array of floats"; ``least_squares``: more
  than one dimension), and so do we, with a ValueError naming the shapes;
* a model returning one value (broadcast against ``ydata`` by the subtraction,
  as scipy allows): MINPACK's forward differences stacked the shifted points'
  0-d outputs into one row;
* 'lm' from a point where the residuals are not finite returns ``p0`` as
  float64 (scipy's ``leastsq`` returns a float array), not in ``p0``'s integer dtype;
* a one-parameter model whose ``jac`` returns a 1-D ``(M,)`` (or ``(1, M)``) array:
  scipy's ``leastsq`` takes it as the one column; we refused it for 'lm';
* read-only residuals (``np.broadcast_to``, a frozen array) reached ``torch.from_numpy``,
  whose UserWarning about non-writable memory scipy never gives;
* a NaN in ``sigma`` was reported as "``sigma`` contains zeros";
* float16 residuals (``least_squares``) took float64-sized difference steps: a zero
  Jacobian and a stop at ``x0`` reported as converged (scipy sizes the step by the
  residuals' epsilon, as we did for float32);
* a 2-D ``p0`` with 'lm': scipy's ``leastsq`` flattens it; we refused it;
* numpy data fitted in ``dtype=torch.float32`` with 'lm': ``pcov`` came back float64;
* 'lm' with MINPACK's differences dropped ``jac_sparsity`` and ``workers`` silently (scipy's
  ``leastsq`` refuses both with a TypeError);
* 'lm' given both ``epsfcn`` and ``diff_step`` used ``epsfcn`` and dropped ``diff_step``;
* a sparse Jacobian (``jac_sparsity``, a sparse or operator ``jac``) failed in ``pcov``'s
  SVD, as in scipy ("object arrays are not supported"); it is taken as dense there;
* ``res.fun`` of float16 residuals came back float64 ('trf', 'dogbox': scipy keeps fun's
  dtype) and of float32 ones float32 with 'lm' (scipy's MINPACK: float64);
* ``jac='cs'`` on a function that drops the imaginary part: scipy reads a zero
  Jacobian and returns ``x0`` as converged; we raised torch's "imag is not implemented",
  and now a ValueError that names the cause;
* 'lm' went on when ``fun`` returned fewer residuals than at ``x0`` (scipy's MINPACK
  wrapper raises "The array returned by a function changed size between calls");
* ``cost`` and ``optimality`` came back as Python floats (scipy's: ``np.float64``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize as so
import torch
from _parity import assert_x_close

from torchimize_scipy import curve_fit, least_squares

XD = np.linspace(0, 4, 30)
YD = 2.5 * np.exp(-1.3 * XD) + 0.5 + 0.02 * np.random.default_rng(0).standard_normal(30)


def _decay(x, a, b, c):
    return a * np.exp(-b * x) + c


@pytest.mark.parametrize("method", ["lm", "trf", "dogbox"])
def test_column_model_against_flat_ydata_is_refused(method):
    def column(x, a, b, c):
        return _decay(x, a, b, c)[:, None]

    with pytest.raises(ValueError, match=r"shape \(30, 1\).*\(30,\).*\(30, 30\)"):
        curve_fit(column, XD, YD, p0=[1, 1, 1], method=method)


@pytest.mark.parametrize("method", ["lm", "trf", "dogbox"])
def test_flat_model_against_column_ydata_is_refused(method):
    with pytest.raises(ValueError, match=r"shape \(30,\).*\(30, 1\)"):
        curve_fit(_decay, XD, YD[:, None], p0=[1, 1, 1], method=method)


def test_matching_column_shapes_still_fit():
    def column(x, a, b, c):
        return _decay(x, a, b, c)[:, None]

    popt, _ = curve_fit(column, XD, YD[:, None], p0=[1, 1, 1])
    ref, _ = so.curve_fit(_decay, XD, YD, p0=[1, 1, 1])
    assert_x_close(popt, ref)


def test_scalar_model_lm_broadcasts_as_scipy():
    def constant(x, a, b, c):
        return a + b + c  # one value for every point (rank-deficient on purpose)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        popt, _ = curve_fit(constant, XD, YD, p0=[1, 1, 1])
        ref, _ = so.curve_fit(constant, XD, YD, p0=[1, 1, 1])
    assert_x_close(popt, ref)
    assert abs(popt.sum() - YD.mean()) < 1e-8


@pytest.mark.parametrize("p0", [[1, 1, 1], np.array([1, 1, 1])])
def test_lm_nonfinite_start_returns_float_popt(p0):
    y = np.r_[YD[:-1], np.nan]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        popt, pcov = curve_fit(_decay, XD, y, p0=p0, check_finite=False)
    assert popt.dtype == np.float64
    np.testing.assert_array_equal(popt, [1.0, 1.0, 1.0])
    assert np.isinf(pcov).all()


def _read_only(a):
    a = np.array(a, dtype=float)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("method", ["trf", "lm"])
def test_read_only_residuals_raise_no_torch_warning(method):
    # scipy takes read-only arrays from ``fun`` silently; torch would warn of them
    # (once per process: this test fails only where it runs first)
    t = np.linspace(0, 3, 20)
    y = 3 * np.exp(-0.7 * t)

    def fun(p):
        return _read_only(p[0] * np.exp(-p[1] * t) - y)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = least_squares(fun, [1.0, 1.0], method=method)
    ref = so.least_squares(fun, [1.0, 1.0], method=method)
    assert_x_close(res.x, ref.x)


@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_nan_sigma_is_named_as_nan(method):
    sigma = np.r_[np.nan, np.ones(29)]
    with pytest.raises(ValueError, match=r"not finite in the initial point: `sigma` contains NaN"):
        curve_fit(_decay, XD, YD, p0=[1, 1, 1], sigma=sigma, method=method)
    with pytest.raises(ValueError, match="`sigma` contains zeros"):
        curve_fit(_decay, XD, YD, p0=[1, 1, 1], sigma=np.r_[0.0, np.ones(29)], method=method)


@pytest.mark.parametrize("col_deriv", [False, True])
@pytest.mark.parametrize("shape", [(-1,), (1, -1), (-1, 1)])
def test_lm_one_parameter_jac_may_be_one_dimensional(col_deriv, shape):
    # scipy's leastsq takes a 1-D Jacobian (M,) (or (1, M)) of a one-parameter model as
    # its column; least_squares ('trf', 'dogbox') refuses it, and so does curve_fit there
    def model(x, b):
        return 2.5 * np.exp(-b * x)

    def jac(x, b):
        return (-2.5 * x * np.exp(-b * x)).reshape(shape)

    popt, pcov, info, _, _ = curve_fit(model, XD, YD, p0=[1.0], jac=jac, col_deriv=col_deriv,
                                       full_output=True)
    ref = so.curve_fit(model, XD, YD, p0=[1.0], jac=jac, col_deriv=col_deriv,
                       full_output=True)
    assert_x_close(popt, ref[0])
    np.testing.assert_allclose(pcov, ref[1], rtol=1e-6)
    assert info["njev"] == ref[2]["njev"]
    if shape != (-1, 1):
        with pytest.raises(ValueError, match="wrong shape"):
            curve_fit(model, XD, YD, p0=[1.0], jac=jac, method="trf")


T20 = np.linspace(0, 3, 20)
Y20 = 3 * np.exp(-0.7 * T20) + 0.1 * np.sin(5 * T20)


@pytest.mark.parametrize("method", ["trf", "lm"])
def test_float16_residuals_take_float16_sized_steps(method):
    # scipy sizes the default difference step by the residuals' epsilon; a float64-sized
    # step left float16 residuals unchanged: a zero Jacobian, a stop at x0 (status 1)
    def fun(p):
        return (p[0] * np.exp(-p[1] * T20) - Y20).astype(np.float16)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = least_squares(fun, [1.0, 1.0], method=method)
        ref = so.least_squares(fun, [1.0, 1.0], method=method)
    assert res.nfev > 5
    np.testing.assert_allclose(res.x, ref.x, rtol=2e-3)


@pytest.mark.parametrize("sparsity", [None, np.ones((20, 2))])
def test_complex_step_of_a_real_function_is_refused(sparsity):
    # scipy reads a zero Jacobian from such a function and returns x0 as converged
    def fun(p):
        return np.real(p[0] * np.exp(-p[1] * T20) - Y20)

    with pytest.raises(ValueError, match="jac='cs': `fun` returned real values"):
        least_squares(fun, [1.0, 1.0], jac="cs", jac_sparsity=sparsity)


def test_lm_flattens_a_two_dimensional_p0():
    popt, _ = curve_fit(_decay, XD, YD, p0=[[1.0, 1.0, 1.0]])
    ref, _ = so.curve_fit(_decay, XD, YD, p0=[[1.0, 1.0, 1.0]])
    assert popt.shape == ref.shape == (3,)
    assert_x_close(popt, ref)
    with pytest.raises(ValueError, match="`x0` must have at most 1 dimension"):
        curve_fit(_decay, XD, YD, p0=[[1.0, 1.0, 1.0]], method="trf")


@pytest.mark.parametrize("method", ["lm", "trf"])
def test_numpy_data_in_float32_gives_float32_pcov(method):
    # (pcov of 'lm' was float64 beside a float32 popt; 'trf' gave both float32)
    popt, pcov = curve_fit(_decay, XD, YD, p0=[1, 1, 1], method=method, dtype=torch.float32)
    assert popt.dtype == pcov.dtype == np.float32
    ref, ref_cov = so.curve_fit(_decay, XD, YD, p0=[1, 1, 1], method=method)
    np.testing.assert_allclose(popt, ref, rtol=1e-3)
    np.testing.assert_allclose(pcov, ref_cov, rtol=1e-2, atol=1e-9)


def test_lm_refuses_jac_sparsity_with_minpack_differences():
    # (it was dropped silently: MINPACK's differences use no pattern)
    with pytest.raises(TypeError, match="unexpected keyword argument 'jac_sparsity'"):
        curve_fit(_decay, XD, YD, p0=[1, 1, 1], jac_sparsity=np.ones((30, 3)))


def test_lm_refuses_workers_with_minpack_differences():
    # (the map was never called: MINPACK's shifted points go to f in one call)
    with pytest.raises(TypeError, match="unexpected keyword argument 'workers'"):
        curve_fit(_decay, XD, YD, p0=[1, 1, 1], workers=map)
    calls = []

    def counting_map(fn, items):
        calls.append(1)
        return map(fn, items)

    popt, _ = curve_fit(_decay, XD, YD, p0=[1, 1, 1], method="trf", workers=counting_map)
    assert calls
    assert_x_close(popt, so.curve_fit(_decay, XD, YD, p0=[1, 1, 1], method="trf")[0])


@pytest.mark.parametrize("jac", [None, "3-point"])
def test_lm_refuses_epsfcn_with_diff_step(jac):
    # (epsfcn won and diff_step was dropped silently)
    with pytest.raises(ValueError, match="Give only one of `epsfcn` and `diff_step`"):
        curve_fit(_decay, XD, YD, p0=[1, 1, 1], jac=jac, epsfcn=1e-8, diff_step=1e-3)


def _decay_jac(x, a, b, c):
    e = np.exp(-b * x)
    return np.stack([e, -a * x * e, np.ones_like(x)], 1)


@pytest.mark.parametrize("form", ["jac_sparsity", "sparse", "operator"])
def test_sparse_jacobian_gives_the_dense_pcov(form):
    # scipy's SVD of a sparse matrix or an operator fails ("object arrays are not
    # supported"); ours failed the same way: the covariance now takes them as dense
    import scipy.sparse as sp
    from scipy.sparse.linalg import aslinearoperator

    kw = {"jac_sparsity": np.ones((30, 3))} if form == "jac_sparsity" else {
        "jac": (lambda *a: sp.csr_matrix(_decay_jac(*a))) if form == "sparse"
        else (lambda *a: aslinearoperator(_decay_jac(*a))), "tr_solver": "lsmr"}
    popt, pcov = curve_fit(_decay, XD, YD, p0=[1, 1, 1], method="trf", **kw)
    ref, ref_cov = so.curve_fit(_decay, XD, YD, p0=[1, 1, 1], method="trf", jac=_decay_jac)
    assert_x_close(popt, ref, xtol=1e-6)
    np.testing.assert_allclose(pcov, ref_cov, rtol=1e-5)


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_result_fun_dtype_is_scipys(method, dtype):
    # scipy's 'trf'/'dogbox' return fun in the dtype fun returned; MINPACK's 'lm' float64
    def fun(p):
        return (p[0] * np.exp(-p[1] * T20) - Y20).astype(dtype)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = least_squares(fun, [1.0, 1.0], method=method)
    assert res.fun.dtype == (np.float64 if method == "lm" else dtype)
    np.testing.assert_array_equal(res.fun, fun(res.x).astype(res.fun.dtype))


def _shrinking(calls_before: int):
    """Residuals of length 3 for the first calls, then of length 2."""
    seen = [0]

    def fun(p):
        seen[0] += 1
        if seen[0] < calls_before:
            return np.array([p[0] - 1.0, p[1] - 2.0, p[0] * p[1]])
        return np.array([p[0] - 1.0, p[1] - 2.0])

    return fun


def _jac3(p):
    return np.array([[1.0, 0.0], [0.0, 1.0], [p[1], p[0]]])


@pytest.mark.parametrize("jac", ["2-point", "analytic"])
def test_lm_refuses_residuals_that_change_length(jac):
    """The residuals shrink after the first Jacobian: scipy's 'lm' raises, and so do we
    (we went on with the shorter residuals)."""
    j = _jac3 if jac == "analytic" else jac
    with pytest.raises(ValueError, match="changed size between calls"):
        so.least_squares(_shrinking(4), [0.0, 0.0], jac=j, method="lm")
    with pytest.raises(ValueError, match="changed size between calls"):
        least_squares(_shrinking(4), [0.0, 0.0], jac=j, method="lm")


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_cost_and_optimality_are_numpy_scalars(method):
    ref = so.least_squares(lambda p: p - 1.0, [0.0, 0.0], method=method)
    res = least_squares(lambda p: p - 1.0, [0.0, 0.0], method=method)
    assert type(res.cost) is type(ref.cost) is np.float64
    assert type(res.optimality) is type(ref.optimality) is np.float64
