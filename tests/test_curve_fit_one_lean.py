"""What one ``curve_fit`` problem ('lm') no longer computes, and what it keeps without copies.

* No Jacobian at the point MINPACK's stopping trial accepts (MINPACK never
  evaluates it; the book holds MINPACK's last one): every call of ``f`` is one
  that ``nfev`` counts.
* Without ``full_output`` only ``R`` and the pivots of the final QR
  (``minpack_qr_outputs(..., factors_only=True)``), and no residuals in the book.
* The covariance of one small float64 ``R`` summed as Python floats, its
  pivots undone as the rows are made (against the batch path's formula).
* The first residuals and Jacobian of a float64 CPU problem remember their host
  rows (``_frontend.first_value``); the book keeps its own evaluations'
  arrays (``owned``) without copies and copies anything else.
* The model takes the engine's rows directly (``_EngineCall.engine_rows``), its
  other dtypes converted and checked as any value; one problem's results are the
  engine's own tensors (``loop.one_problem_slots``), its result arrays copies.
* A model that refills one array at every call fits as in scipy: each shifted
  point's value is copied before the next call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _parity import ONE_EVAL_RTOL, assert_close_scaled, assert_x_close

from torchimize_scipy import curve_fit
from torchimize_scipy._arrays import Namespace
from torchimize_scipy._curve_fit._covariance import pivoted_inverse
from torchimize_scipy._curve_fit._leastsq import LeastsqBook, minpack_qr_outputs
from torchimize_scipy._engine.host_scalars import host_rows
from torchimize_scipy._frontend import first_value

IDS = torch.zeros(1, dtype=torch.long)


def _decay(x, a, b, c):
    return a * np.exp(-b * x) + c


def _data():
    x = np.linspace(0, 4, 50)
    y = _decay(x, 2.5, 1.3, 0.5) + 0.2 * np.random.default_rng(0).normal(size=x.size)
    return x, y


@pytest.mark.parametrize("jac", [None, "analytic"])
def test_every_call_of_f_is_counted_in_nfev(jac):
    x, y = _data()
    calls = []

    def f(xx, a, b, c):
        calls.append(1)
        return _decay(xx, a, b, c)

    def fjac(xx, a, b, c):
        e = np.exp(-b * xx)
        return np.stack([e, -a * xx * e, np.ones_like(xx)], axis=1)

    *_, info, _, ier = curve_fit(f, x, y, jac=fjac if jac else None, full_output=True)
    assert ier in (1, 2, 3, 4)
    # (the engine evaluated one more Jacobian, three calls of f, after the stopping trial)
    assert len(calls) == info["nfev"]
    calls.clear()
    curve_fit(f, x, y, jac=fjac if jac else None)
    assert len(calls) == info["nfev"]


def test_pcov_without_full_output_is_the_full_outputs():
    x, y = _data()
    popt, pcov = curve_fit(_decay, x, y)
    popt_f, pcov_f, *_ = curve_fit(_decay, x, y, full_output=True)
    assert_close_scaled(popt, popt_f, ONE_EVAL_RTOL)
    assert_close_scaled(pcov, pcov_f, ONE_EVAL_RTOL)
    assert np.all(np.linalg.eigvalsh(pcov) > 0)


def test_factors_only_gives_r_and_pivots_alone():
    rng = np.random.default_rng(3)
    J = rng.normal(size=(20, 4)) * np.array([1.0, 1e3, 1e-2, 10.0])
    fjac, ipvt, qtf, R = minpack_qr_outputs(J, rng.normal(size=20))
    none1, ipvt1, none2, R1 = minpack_qr_outputs(J, None, factors_only=True)
    assert none1 is None and none2 is None
    assert ipvt1.dtype == np.int32 and ipvt1.tolist() == ipvt.tolist()
    assert np.all(np.tril(R1, -1) == 0)
    assert_close_scaled(R1, R, ONE_EVAL_RTOL)
    # J P = Q R: R^T R is (J P)^T (J P)
    JP = J[:, ipvt1]
    assert_close_scaled(R1.T @ R1, JP.T @ JP, 1e-12)
    with pytest.raises(ValueError):
        minpack_qr_outputs(np.array([[np.nan, 1.0], [1.0, 2.0]]), None, factors_only=True)


@pytest.mark.parametrize("n", [1, 3, 7, 8])
def test_one_problem_covariance_matches_the_batch_formula(n):
    rng = np.random.default_rng(n)
    J = rng.normal(size=(3 * n + 2, n))
    _, perm, _, R = minpack_qr_outputs(J, None, factors_only=True)
    cov = pivoted_inverse(R[None], perm[None])
    assert cov.shape == (1, n, n) and isinstance(cov, np.ndarray)
    # the batch path (tensors) and the inverse of the Gram matrix
    ref = pivoted_inverse(torch.from_numpy(np.stack([R, R])),
                          torch.from_numpy(np.stack([perm, perm]).astype(np.int64)))
    assert_close_scaled(cov[0], ref[1].numpy(), ONE_EVAL_RTOL)
    assert_close_scaled(cov[0], np.linalg.inv(J.T @ J), 1e-8)
    assert np.array_equal(cov[0], cov[0].T)


def test_one_problem_covariance_of_a_singular_r_is_nan():
    R = np.array([[[2.0, 1.0], [0.0, 0.0]]])
    assert np.isnan(pivoted_inverse(R, np.array([[1, 0]], dtype=np.int32))).all()


def test_first_value_remembers_float64_host_rows_only():
    ns = Namespace("numpy", torch.device("cpu"), torch.float64)
    a = np.arange(6.0).reshape(3, 2).T  # (2, 3), not contiguous: a contiguous copy
    t = first_value(ns, a, (1, 2, 3), "jac")
    assert t.shape == (1, 2, 3) and t.dtype == torch.float64
    known = host_rows(t)
    assert known is not None and known.tolist() == t.tolist() == [a.tolist()]
    t32 = first_value(ns, a.astype(np.float32), (1, 2, 3), "jac")
    assert t32.dtype == torch.float64 and host_rows(t32) is None
    assert t32.tolist() == [a.tolist()]


def test_book_keeps_owned_arrays_and_copies_the_others():
    book = LeastsqBook(100, 1e-8, 1, "cpu", keep_residuals=False)
    x, r = np.array([[1.0, 2.0]]), np.array([[3.0, 4.0, 5.0]])
    book.record_call(IDS, x, r, owned=True)
    assert book.rows["last_x"] is x and book.rows["last_f"] is r
    x2, r2 = np.array([[1.5, 2.0]]), np.array([[3.0, 4.0, 6.0]])
    book.record_call(IDS, x2, r2)  # not owned: private copies
    assert book.rows["last_x"] is not x2 and book.rows["last_x"].tolist() == x2.tolist()
    x2 += 1.0
    assert book.value_at(IDS, np.array([[1.5, 2.0]])).tolist() == r2.tolist()
    J = np.ones((1, 3, 2))
    book.record_jac(IDS, J, lambda: r2, owned=True)
    assert book.rows["summary"] is J and "f" not in book.rows
    J2 = np.zeros((1, 3, 2))
    book.record_jac(IDS, J2, lambda: r2)
    assert book.rows["summary"] is not J2 and book.rows["prev_summary"] is J


def test_least_squares_minpack_bookkeeping_writes_no_jac_or_grad():
    # curve_fit's 'lm' with MINPACK's bookkeeping reads neither: the one problem's engine
    # writes no J, g (nor nit) buffer, and the result holds None for them
    from torchimize_scipy import least_squares
    from torchimize_scipy._batch import minpack_bookkeeping
    from torchimize_scipy._least_squares import _one_result_keys

    x, y = _data()

    def fun(p):
        return _decay(x, *p) - y

    ref = least_squares(fun, np.ones(3), method="lm")
    with minpack_bookkeeping():
        res = least_squares(fun, np.ones(3), method="lm")
    assert res.jac is None and res.grad is None
    assert ref.jac.shape == (50, 3) and ref.grad.shape == (3,)
    assert_close_scaled(res.x, ref.x, ONE_EVAL_RTOL)
    assert_close_scaled(res.fun, ref.fun, ONE_EVAL_RTOL)
    assert res.status == ref.status and res.nfev == ref.nfev
    np.testing.assert_array_equal(res.active_mask, np.zeros(3))
    assert _one_result_keys(True, True) == ("x", "cost", "f_true", "J", "g", "optimality",
                                            "active_mask", "nfev", "njev", "status")
    assert "J" not in _one_result_keys(False, True)
    assert not {"J", "g", "nit"} & set(_one_result_keys(True, False))


def test_a_solve_inside_the_users_model_keeps_its_final_jacobian():
    """The flag of ``minpack_bookkeeping`` is consumed by curve_fit's own solve: a
    ``least_squares`` or ``batch_least_squares`` that the user's model runs is a plain one."""
    from scipy.optimize import least_squares as scipy_least_squares

    from torchimize_scipy import batch_least_squares, least_squares

    seen = []

    def inner(z):
        return np.array([z[0] - 2.0, 3.0 * (z[0] - 2.0)])

    def model(x, a, b, c):
        one = least_squares(inner, np.array([0.5]), method="lm")
        many = batch_least_squares(lambda z: np.concatenate([z - 2.0, 3.0 * (z - 2.0)], axis=1),
                                   np.array([[0.5], [1.0]]), method="lm")
        seen.append((one, many))
        return _decay(x, a, b, c)

    x, y = _data()
    curve_fit(model, x, y, p0=[1.0, 1.0, 1.0])
    ref = scipy_least_squares(inner, np.array([0.5]), method="lm")
    assert seen
    for one, many in seen:
        assert one.jac is not None and one.grad is not None
        assert_close_scaled(one.jac, ref.jac, rtol=ONE_EVAL_RTOL)
        assert one.nfev == ref.nfev
        assert many.jac is not None and np.all(np.isfinite(many.jac))
        assert_close_scaled(many.jac[0], ref.jac, rtol=ONE_EVAL_RTOL)


def test_engine_rows_reach_the_model_without_the_point_path(monkeypatch):
    """A numpy model's residuals and differences are called with the engine's rows
    (``_EngineCall.engine_rows``): the point functions run only for the frontend's first
    residuals and Jacobian at ``x0`` (its checks); ``f`` still gets scalar parameters,
    and the fit is scipy's."""
    from scipy.optimize import curve_fit as scipy_curve_fit

    from torchimize_scipy._curve_fit import _single

    points = {"residuals": 0, "fd_jacobian": 0}
    for name in points:
        real = getattr(_single._OneProblem, name)

        def counting(self, p, _real=real, _name=name):
            points[_name] += 1
            return _real(self, p)

        monkeypatch.setattr(_single._OneProblem, name, counting)
    kinds = set()

    def f(x, a, b, c):
        kinds.add(type(a))
        return _decay(x, a, b, c)

    x, y = _data()
    popt, pcov, info, _, _ = curve_fit(f, x, y, full_output=True)
    assert points == {"residuals": 1, "fd_jacobian": 1}
    assert kinds == {np.float64}
    ref, ref_cov, ref_info, _, _ = scipy_curve_fit(_decay, x, y, full_output=True)
    assert info["nfev"] == ref_info["nfev"]
    assert_x_close(popt, ref)


def test_engine_rows_other_dtypes_are_converted_and_checked():
    """What ``engine_rows`` returns in another dtype goes through the adapter's usual
    conversion and checks: float32 residuals are widened, complex ones refused."""
    from torchimize_scipy._user_functions import RowwiseFunction

    class Rows:
        def __init__(self, out):
            self.out = out

        def __call__(self, p):  # (the point path: not taken for the engine's rows)
            raise AssertionError

        def engine_rows(self, x, idx):
            return self.out

    ns = Namespace("numpy", torch.device("cpu"), torch.float64)
    x = torch.ones(1, 2, dtype=torch.float64)
    wide = RowwiseFunction(Rows(np.array([[1.5, 2.5, 3.5]], dtype=np.float32)), (), {}, ns)(x, IDS)
    assert wide.dtype == torch.float64 and wide.tolist() == [[1.5, 2.5, 3.5]]
    own = np.array([[1.0, 2.0]])
    same = RowwiseFunction(Rows(own), (), {}, ns)(x, IDS)
    assert host_rows(same) is own  # (its own float64 array: no copy)
    with pytest.raises(ValueError):
        RowwiseFunction(Rows(np.array([[1.0 + 1.0j]])), (), {}, ns)(x, IDS)
    # extra arguments: the adapter calls the function of one point, as for any function
    assert RowwiseFunction(Rows(own), (1.0,), {}, ns)._engine_rows is None


def test_one_problem_result_arrays_are_private():
    """``least_squares`` of one problem hands over the engine's own result tensors
    (``loop.one_problem_slots``): the arrays of its result are copies, so writing one
    changes no other field and no later solve."""
    from torchimize_scipy import least_squares

    t = np.linspace(0, 4, 80)  # (more than 64 residuals: rows beyond the tolist copies)
    y = _decay(t, 2.5, 1.3, 0.5)

    def fun(p):
        return _decay(t, *p) - y

    res = least_squares(fun, np.ones(3), method="lm")
    again = least_squares(fun, np.ones(3), method="lm")
    x, f = res.x.copy(), res.fun.copy()
    res.fun[:] = 7.0
    res.x[:] = -1.0
    np.testing.assert_array_equal(again.x, x)
    np.testing.assert_array_equal(again.fun, f)
    assert res.jac is not None and res.jac.flags.writeable
    assert isinstance(res.nfev, int) and isinstance(res.cost, float) and res.status in (1, 2, 3, 4)
    assert res.active_mask.dtype == np.int64 and res.active_mask.tolist() == [0, 0, 0]


def _refilled_model():
    """A model that returns the same array at every call, refilled (and one analytic
    Jacobian that does the same): scipy's ``curve_fit`` takes ``f(x) - ydata`` at
    once, so such a model gives scipy's fit."""
    buf: dict = {}

    def f(xx, a, b, c):
        out = buf.setdefault("f", np.empty(xx.shape))
        out[...] = _decay(xx, a, b, c)
        return out

    def fjac(xx, a, b, c):
        out = buf.setdefault("J", np.empty((xx.size, 3)))
        e = np.exp(-b * xx)
        out[:, 0], out[:, 1], out[:, 2] = e, -a * xx * e, 1.0
        return out

    return f, fjac


@pytest.mark.parametrize("method", ["lm", "trf"])
@pytest.mark.parametrize("jac", [None, "analytic"])
@pytest.mark.parametrize("sigma", [None, "diag"])
def test_a_model_that_refills_one_array_fits_as_in_scipy(method, jac, sigma):
    """The finite differences' shifted points are evaluated one after another: each
    value is copied before the next call (before, all of them were the last one: a
    wrong fit for 'lm' without ``jac``). An unweighted analytic Jacobian, the user's
    own array, is copied before the engine keeps it (no case here reads a stale one)."""
    from scipy.optimize import curve_fit as scipy_curve_fit

    x, y = _data()
    f, fjac = _refilled_model()
    kw = {"p0": [1.0, 1.0, 1.0], "method": method,
          "jac": fjac if jac else None,
          "sigma": None if sigma is None else np.full(x.size, 0.2)}
    ref_p, ref_c = scipy_curve_fit(_decay, x, y, **kw)
    p, c = curve_fit(f, x, y, **kw)
    assert_x_close(p, ref_p, rtol=1e-6)
    assert_close_scaled(c, ref_c, 1e-4, scale=np.sqrt(np.outer(np.diag(ref_c), np.diag(ref_c))))


def test_a_torch_model_that_refills_one_tensor_fits_as_scipy():
    from scipy.optimize import curve_fit as scipy_curve_fit

    x, y = _data()
    out = torch.empty(x.size, dtype=torch.float64)

    def f(xx, a, b, c):
        out.copy_(a * torch.exp(-b * xx) + c)
        return out

    ref_p, _ = scipy_curve_fit(_decay, x, y, p0=[1.0, 1.0, 1.0])
    p, _ = curve_fit(f, torch.as_tensor(x), torch.as_tensor(y), p0=[1.0, 1.0, 1.0])
    assert isinstance(p, torch.Tensor)
    assert_x_close(p, ref_p, rtol=1e-6)
