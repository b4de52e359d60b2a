"""Batch APIs against a loop of single problems on inputs a user may write (session 13
probes): each test holds a case where ``batch_least_squares`` / ``batch_curve_fit`` once
returned a result that differed from the loop without an error."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize as so
import torch

from tests._parity import (
    assert_bitwise_equal,
    assert_close_scaled,
    assert_counts_close,
    assert_x_close,
)
from torchimize_scipy import batch_curve_fit, batch_least_squares, least_squares

_T = np.linspace(0.0, 3.0, 20)
_Y = np.array([[2.0, 0.7], [1.2, 1.5], [2.7, 0.4]])[:, :1] * np.exp(
    -np.array([[0.7], [1.5], [0.4]]) * _T) + 0.01 * np.sin(7 * _T)


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("narrow", ["float32", "float16"])
def test_narrow_residuals_take_narrow_steps(method, kind, narrow):
    """A fun that returns float32 (or float16) residuals for float64 points: each
    problem's ``least_squares`` (as scipy's, gh-12991) takes finite-difference steps
    sized by that dtype's epsilon; the batch took float64-sized ones, whose differences
    are rounding noise (float32: a Jacobian wrong in its first digit, x off by 1e-5;
    float16: a zero Jacobian, every problem "converged" at x0)."""
    def one(x, y):
        if kind == "torch":
            return (x[0] * torch.exp(-x[1] * torch.as_tensor(_T)) - y).to(getattr(torch, narrow))
        return (x[0] * np.exp(-x[1] * _T) - y).astype(narrow)

    def rows(x, y):
        if kind == "torch":
            return (x[:, :1] * torch.exp(-x[:, 1:] * torch.as_tensor(_T)) - y).to(
                getattr(torch, narrow))
        return (x[:, :1] * np.exp(-x[:, 1:] * _T) - y).astype(narrow)

    conv = torch.as_tensor if kind == "torch" else np.asarray
    x0, Y = conv(np.ones((3, 2))), conv(_Y)
    res = batch_least_squares(rows, x0, args=(Y,), method=method)
    for i in range(3):
        ref = least_squares(one, x0[i], args=(Y[i],), method=method)
        # float16 residuals round at 1e-3: another summation order in the batch may
        # flip one of their roundings, so batch and loop agree to sqrt(eps16) only
        tol = 1e-9 if narrow == "float32" else float(np.sqrt(np.finfo(np.float16).eps))
        assert_x_close(res.x[i], ref.x, rtol=tol)
        assert_close_scaled(res.jac[i], ref.jac, max(tol, 1e-6), err_msg="jac")
        if kind == "numpy":  # fun's own dtype for 'trf'/'dogbox', as scipy's; 'lm' float64
            assert res.fun.dtype == ref.fun.dtype
    assert np.all(np.asarray(res.nfev) > 2)  # not stopped at x0 by a zero Jacobian


def _decay(x, a, k, c):
    return a * np.exp(-k * x) + c


_XC = np.linspace(0.0, 4.0, 25)
_PC = np.array([[2.9, 0.95, 0.4], [2.0, 1.7, 0.0], [3.0, 0.6, -0.1], [1.1, 1.7, 0.3]])
_YC = _decay(_XC, _PC[:, :1], _PC[:, 1:2], _PC[:, 2:]) + 0.02 * np.cos(5 * _XC)


@pytest.mark.parametrize("key, method", [("diag", "lm"), ("x_scale", "trf")])
def test_per_problem_scale_with_a_failed_problem(key, method):
    """``diag`` (B, P) of 'lm' with a NaN in one data set: the other problems are solved
    with their own rows (the batch raised "Inconsistent shapes" for all: ``diag``
    became ``x_scale`` after the rows of the failed problems were dropped)."""
    scale = np.array([[0.5, 2.0, 4.0], [1.0, 1.0, 1.0], [3.0, 0.2, 1.5], [0.7, 0.7, 9.0]])
    Y = _YC.copy()
    Y[1, 3] = np.nan
    p0 = np.tile([1.0, 1.0, 0.0], (4, 1))
    with pytest.warns(Warning):
        popt, pcov = batch_curve_fit(_decay, _XC, Y, p0, method=method, **{key: scale})
    keep = [0, 2, 3]
    ref, ref_cov = batch_curve_fit(_decay, _XC, Y[keep], p0[keep], method=method,
                                   **{key: scale[keep]})
    assert np.isnan(popt[1]).all()
    assert_bitwise_equal(popt[keep], ref)
    assert_bitwise_equal(pcov[keep], ref_cov)


@pytest.mark.parametrize("rows", [1, 3, 5])
def test_per_problem_x_scale_of_another_batch_raises(rows):
    """A 2-D ``x_scale`` must have one row per problem: 5 rows for 4 problems were
    silently cut to the first 4, fewer raised an IndexError."""
    with pytest.raises(ValueError, match="Inconsistent shapes between `x_scale`"):
        batch_curve_fit(_decay, _XC, _YC, np.ones((4, 3)), method="trf",
                        x_scale=np.ones((rows, 3)))


@pytest.mark.parametrize("method", ["trf", "lm"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_rowwise_fun_and_jac_that_refill_one_array(method, kind):
    """``vectorized=False`` with a ``fun`` and ``jac`` that refill one array at every
    call (which a loop of single problems allows, scipy's included, with an analytic
    Jacobian): every problem got the values of the last problem evaluated (the batch's
    rows were stacked after all calls), a fit 2 units off."""
    if kind == "torch":
        T = torch.as_tensor(_T)
        fbuf, jbuf = torch.empty(20, dtype=torch.float64), torch.empty(20, 2, dtype=torch.float64)

        def fun(p, y):
            fbuf.copy_(p[0] * torch.exp(-p[1] * T) - y)
            return fbuf

        def jac(p, y):
            e = torch.exp(-p[1] * T)
            jbuf[:, 0] = e
            jbuf[:, 1] = -p[0] * T * e
            return jbuf
    else:
        fbuf, jbuf = np.empty(20), np.empty((20, 2))

        def fun(p, y):
            fbuf[:] = p[0] * np.exp(-p[1] * _T) - y
            return fbuf

        def jac(p, y):
            e = np.exp(-p[1] * _T)
            jbuf[:, 0] = e
            jbuf[:, 1] = -p[0] * _T * e
            return jbuf

    conv = torch.as_tensor if kind == "torch" else np.asarray
    x0, Y = conv(np.ones((3, 2))), conv(_Y)
    res = batch_least_squares(fun, x0, jac=jac, args=(Y,), method=method, vectorized=False)
    for i in range(3):
        ref = least_squares(fun, x0[i], jac=jac, args=(Y[i],), method=method)
        assert_x_close(res.x[i], ref.x)
        assert_close_scaled(res.cost[i], ref.cost, 1e-8, err_msg="cost")


@pytest.mark.parametrize("method, chunk_size", [("lm", None), ("dogbox", 2), ("trf", None)])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_batch_curve_fit_jac_that_returns_views_of_one_buffer(method, chunk_size, kind):
    """An unweighted analytic ``jac`` returning ``buf[:b]`` of one preallocated array
    (works in scipy's ``curve_fit``, where each Jacobian is used before the next call):
    the engine kept that array, which later calls refilled (pcov off 95-fold for 'lm',
    popt off 2e-7 for 'dogbox' in chunks of 2)."""
    from torchimize_scipy import curve_fit

    xp = torch if kind == "torch" else np
    buf = torch.empty(64, 25, 3, dtype=torch.float64) if kind == "torch" else np.empty(
        (64, 25, 3))

    def model(x, a, k, c):
        return a * xp.exp(-k * x) + c

    def jac_buf(x, a, k, c):
        out = buf[:a.shape[0]]
        e = xp.exp(-k * x)
        out[..., 0] = e
        out[..., 1] = -a * x * e
        out[..., 2] = 1.0
        return out

    def jac_fresh(x, a, k, c):
        e = xp.exp(-k * x)
        return xp.stack([e, -a * x * e, xp.ones_like(e)], -1)

    conv = torch.as_tensor if kind == "torch" else np.asarray
    rng = np.random.default_rng(7)
    true = np.c_[rng.uniform(1, 3, 9), rng.uniform(0.3, 2, 9), rng.uniform(-.5, .5, 9)]
    Y = _decay(_XC, true[:, :1], true[:, 1:2], true[:, 2:]) + 0.02 * rng.standard_normal(
        (9, 25))
    p0 = np.tile([1.0, 1.0, 0.0], (9, 1))
    p0[3], p0[6] = [5.0, 0.1, 2.0], [0.1, 4.0, -1.0]  # slower problems beside fast ones
    keep = [0, 1, 2, 4, 5, 7, 8]  # (3 and 6 need more than maxfev for 'lm')
    x, Y, P0 = conv(_XC), conv(Y[keep]), conv(p0[keep])
    popt, pcov = batch_curve_fit(model, x, Y, P0, method=method, jac=jac_buf,
                                 chunk_size=chunk_size)
    for i in range(len(keep)):
        ref, ref_cov = curve_fit(model, x, Y[i], P0[i], method=method, jac=jac_fresh)
        assert_x_close(popt[i], ref)
        assert_close_scaled(pcov[i], ref_cov, 1e-6, scale=np.abs(np.asarray(ref_cov)).max(),
                            err_msg="pcov")


def test_batch_least_squares_per_problem_diff_step_raises():
    """A ``(B, n)`` ``diff_step`` (the error said "the shape of `x0`", which is (B, n)
    in a batch) failed deep in the differences with a torch size error; (1, n) with an
    IndexError."""
    def rows(x, y):
        return x[:, :1] * np.exp(-x[:, 1:] * _T) - y

    with pytest.raises(ValueError, match="`diff_step` must be a scalar or of shape"):
        batch_least_squares(rows, np.ones((3, 2)), args=(_Y,), diff_step=np.full((3, 2), 1e-3))


def test_batch_curve_fit_per_problem_diff_step_raises():
    with pytest.raises(ValueError, match="`diff_step` must be a scalar or of shape"):
        batch_curve_fit(_decay, _XC, _YC, np.ones((4, 3)), diff_step=np.full((4, 3), 1e-3))


@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_rowwise_sparse_jac_refilled_in_place(method):
    """``vectorized=False`` with a ``jac`` that refills the ``data`` of one CSR matrix
    (a common way to avoid rebuilding its structure): every problem's step used the
    last problem's Jacobian (15 evaluations instead of 5, a wrong gradient at the end)."""
    import scipy.sparse as sp

    n = 8
    y = np.random.default_rng(28).uniform(0.5, 2, (5, n))
    J = sp.diags([0.1 * np.ones(n - 1), 2 * np.ones(n), 0.1 * np.ones(n - 1)], [-1, 0, 1],
                 shape=(n, n), format="csr")
    on_diagonal = np.array([J.indptr[i] + (i > 0) for i in range(n)])

    def fun(x, yi):
        r = x**2 - yi
        r[1:] += 0.1 * x[:-1]
        r[:-1] += 0.1 * x[1:]
        return r

    def jac(x, yi):
        J.data[on_diagonal] = 2 * x
        return J

    x0 = np.ones((5, n))
    x0[2] *= 3
    res = batch_least_squares(fun, x0, jac=jac, args=(y,), method=method, vectorized=False)
    for i in range(5):
        ref = least_squares(fun, x0[i], jac=jac, args=(y[i],), method=method)
        assert_x_close(res.x[i], ref.x)
        assert_counts_close(res.status[i], ref.status, res.nfev[i], ref.nfev)
        assert_close_scaled(res.grad[i], ref.grad, 1e-10, err_msg="grad")


def test_a_class_in_args_is_shared():
    """A class passed in ``args`` (here numpy's float32, a dtype for ``astype``) is
    passed whole to every problem; its class attributes (``ndim``, ``shape``) made it
    look like an array and the batch raised a TypeError."""
    def rows(x, y, dt):
        return (x[:, :1] * np.exp(-x[:, 1:] * _T) - y).astype(dt)

    def one(x, y, dt):
        return (x[0] * np.exp(-x[1] * _T) - y).astype(dt)

    x0 = np.ones((3, 2))
    res = batch_least_squares(rows, x0, args=(_Y, np.float64))
    for i in range(3):
        ref = least_squares(one, x0[i], args=(_Y[i], np.float64))
        assert_x_close(res.x[i], ref.x, rtol=1e-9)


@pytest.mark.parametrize("maxfev", [5, 10, 20])
def test_batch_curve_fit_lm_differences_count_against_maxfev(maxfev):
    """MINPACK's ``lmdif`` counts its forward differences in ``nfev`` and stops at
    ``maxfev`` by that count (scipy's ``leastsq``): the batch counted only the trials,
    so a problem ran on past ``maxfev`` (model calls and ``nfev`` 17 for ``maxfev=5``)
    while reporting ``ier = 5``."""
    calls = [0]

    def model(x, a, k, c):
        calls[0] += np.size(a)
        return _decay(x, a, k, c)

    p0 = np.ones((4, 3))
    _, _, info, _, ier = batch_curve_fit(model, _XC, _YC, p0=p0, maxfev=maxfev,
                                         full_output=True)
    for i in range(4):
        _, _, ref, _, ref_ier = so.leastsq(lambda p, i=i: _decay(_XC, *p) - _YC[i], p0[i],
                                           maxfev=maxfev, full_output=True)
        assert ier[i] == ref_ier
        assert info["nfev"][i] == ref["nfev"]
    assert calls[0] == int(np.sum(info["nfev"]))  # no evaluation past MINPACK's stop
