"""The per-call path of small problems (issue 14): cheaper, with the same results.

What the cheaper code must still guarantee: ``curve_fit`` reads the number of
parameters as :func:`inspect.signature` does; the 'lm' book keeps private
copies and per-problem rows when whole-batch and partial updates mix; the
numpy forward differences of ``curve_fit`` give the torch ones; and the
single-problem torch adapter hands the engine a copy of what ``fun`` returns.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest
import torch
from _parity import assert_x_close

from torchimize_scipy import curve_fit, least_squares
from torchimize_scipy._arrays import Namespace
from torchimize_scipy._curve_fit._data import FitData, count_parameters
from torchimize_scipy._curve_fit._leastsq import LeastsqBook
from torchimize_scipy._curve_fit._model import WhitenedModel
from torchimize_scipy._engine import status as codes
from torchimize_scipy._user_functions import RowwiseFunction


# ----------------------------------------------------------- count_parameters
def _plain(x, a, b, c=1.0):
    return a + b + c + x


def _posonly(x, a, /, b):
    return x + a + b


def _star(x, a, *rest, k=2.0):
    return x + a


def _signature_set(x, *p):
    return x


_signature_set.__signature__ = inspect.Signature(
    [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in "xabcd"])


@functools.wraps(_plain)
def _wrapped(*args):
    return _plain(*args)


class _Model:
    def __call__(self, x, a, b):
        return x * a + b

    def method(self, x, a, b, c):
        return x


def _inspect_count(f):
    params = inspect.signature(f).parameters.values()
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) - 1


@pytest.mark.parametrize("f", [
    _plain, _posonly, _star, _signature_set, _wrapped, _Model(), _Model().method,
    functools.partial(_plain, c=3.0), lambda x, a: x * a])
def test_count_parameters_as_inspect(f):
    """The code-object shortcut counts what ``inspect.signature`` counts."""
    assert count_parameters(f) == _inspect_count(f)


def test_count_parameters_refuses_one_argument():
    with pytest.raises(ValueError, match="Unable to determine number of fit parameters"):
        count_parameters(lambda x: x)


# ----------------------------------------------------------- the 'lm' book
def test_book_keeps_private_copies_of_points_and_residuals():
    """Whole-batch rows are replaced, not written: what the caller passed stays its own."""
    book = LeastsqBook(100, 1e-8, 1, "cpu", keep_residuals=True)
    ids = torch.tensor([0])
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    r = torch.tensor([[3.0]], dtype=torch.float64)
    book.record_call(ids, x, r)
    x.add_(1.0)  # the caller reuses its buffers
    r.add_(1.0)
    assert book.value_at(ids, x) is None  # x moved: not the recorded point
    f = book.value_at(ids, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    assert f is not None and f.tolist() == [[3.0]]
    J = torch.ones(1, 1, 2, dtype=torch.float64)
    book.record_jac(ids, J, lambda: f)
    J.mul_(5.0)
    summary, kept_f, njev = book.at_last_minpack_jacobian(torch.tensor([codes.GTOL]))
    assert summary.tolist() == [[[1.0, 1.0]]] and kept_f.tolist() == [[3.0]]
    assert njev.tolist() == [1]


def test_book_mixed_whole_and_partial_updates_keep_rows_apart():
    """A whole-batch Jacobian then one for problem 1 only: each problem's last two stay
    its own (the replaced tensors must not be shared with the ones written in place)."""
    book = LeastsqBook(100, 1e-8, 2, "cpu", keep_residuals=True)
    ids = torch.tensor([0, 1])
    x = torch.zeros(2, 1, dtype=torch.float64)
    f = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    book.record_call(ids, x, f)
    J1 = torch.full((2, 1, 1), 1.0, dtype=torch.float64)
    book.record_jac(ids, J1, lambda: book.value_at(ids, x))
    book.record_call(ids, x + 1, f + 10)
    J2 = torch.full((2, 1, 1), 2.0, dtype=torch.float64)
    book.record_jac(ids, J2, lambda: f + 10)
    one = torch.tensor([1])
    book.record_call(one, x[1:] + 2, f[1:] + 20)
    book.record_jac(one, torch.full((1, 1, 1), 3.0, dtype=torch.float64), lambda: f[1:] + 20)
    rows = book.rows
    assert rows["summary"].flatten().tolist() == [2.0, 3.0]
    assert rows["prev_summary"].flatten().tolist() == [1.0, 2.0]
    assert rows["f"].flatten().tolist() == [11.0, 22.0]
    assert rows["prev_f"].flatten().tolist() == [1.0, 12.0]
    assert rows["last_f"].flatten().tolist() == [11.0, 22.0]
    assert book.jac_calls.tolist() == [2, 3]


# ----------------------------------------------------------- forward differences
@pytest.mark.parametrize("rel", [1.5e-8, np.array([1e-6, 1e-7, 1e-5])])
def test_minpack_forward_differences_numpy_as_torch(rel):
    """curve_fit's numpy parameters take numpy arithmetic; it gives the torch values
    (same operations; numpy's and torch's ``exp`` may differ by an ulp, which the
    difference quotient magnifies by ``1/h``, so each column is compared to a few ulps
    of the residuals over its own step)."""
    x = np.linspace(0, 4, 30)
    y = 2.5 * np.exp(-1.3 * x) + 0.5

    def f(xx, a, b, c):
        return a * np.exp(-b * xx) + c

    def f_t(xx, a, b, c):
        return a * torch.exp(-b * xx) + c

    P = np.array([[2.0, 0.0, 0.4]])  # a zero parameter takes the step ``rel`` itself
    Js = []
    for fn, P_in in ((f, P), (f_t, torch.from_numpy(P.copy()))):
        model = WhitenedModel(fn, None, FitData.single(x, True, y), 3, False, rowwise=True)
        model.book = LeastsqBook(100, rel, 1, "cpu", keep_residuals=True)
        ids = torch.zeros(1, dtype=torch.long)
        model.residuals(P_in, ids)
        Js.append(np.asarray(model.fd_jacobian(P_in, ids)))
        assert model.book.rows["fd_evals"].tolist() == [3]
    # MINPACK's step: h = rel * |p|, or rel itself where p is zero
    h = np.broadcast_to(rel, (3,)) * np.where(P[0] == 0, 1.0, np.abs(P[0]))
    f_max = np.abs(f(x, *P[0]) - y).max() + np.abs(y).max()
    atol = 8 * np.finfo(float).eps * f_max / h
    assert np.all(np.abs(Js[0] - Js[1]) <= atol), np.abs(Js[0] - Js[1]).max(axis=(0, 1))


def test_curve_fit_lm_numpy_and_torch_agree():
    """The numpy and torch paths of ``curve_fit('lm')`` reach the same fit and nfev."""
    x = np.linspace(0, 4, 50)
    y = 2.5 * np.exp(-1.3 * x) + 0.5 + 0.2 * np.random.default_rng(0).normal(size=x.size)

    def f(xx, a, b, c):
        return a * np.exp(-b * xx) + c

    def f_t(xx, a, b, c):
        return a * torch.exp(-b * xx) + c

    p, cov, info, _, ier = curve_fit(f, x, y, full_output=True)
    pt, covt, infot, _, iert = curve_fit(f_t, torch.from_numpy(x), torch.from_numpy(y),
                                         full_output=True)
    assert 1 <= ier <= 4 and 1 <= iert <= 4
    assert_x_close(pt.numpy(), p, xtol=1.49012e-8)
    np.testing.assert_allclose(covt.numpy(), cov, rtol=1e-5)


# ----------------------------------------------------------- torch single-problem adapter
def test_torch_adapter_copies_what_fun_returns():
    """One problem, torch ``fun``: the engine gets ``(1, m)`` / ``(1, m, n)`` copies, not
    views of the tensor ``fun`` returned (which ``fun`` may fill again next time)."""
    ns = Namespace("torch", torch.device("cpu"), torch.float64)
    buf = torch.zeros(3, dtype=torch.float64)
    jbuf = torch.zeros(3, 2, dtype=torch.float64)

    def fun(x):
        buf.copy_(torch.stack([x[0], x[1], x[0] * x[1]]))
        return buf

    def jac(x):
        jbuf[:, 0] = torch.stack([torch.ones_like(x[0]), torch.zeros_like(x[0]), x[1]])
        jbuf[:, 1] = torch.stack([torch.zeros_like(x[0]), torch.ones_like(x[0]), x[0]])
        return jbuf

    x = torch.tensor([[2.0, 3.0]], dtype=torch.float64)
    idx = torch.zeros(1, dtype=torch.long)
    f = RowwiseFunction(fun, (), {}, ns)(x, idx)
    J = RowwiseFunction(jac, (), {}, ns, kind="jac")(x, idx)
    assert f.shape == (1, 3) and J.shape == (1, 3, 2)
    buf.fill_(-1.0)
    jbuf.fill_(-1.0)
    assert f.tolist() == [[2.0, 3.0, 6.0]]
    assert J.tolist() == [[[1.0, 0.0], [0.0, 1.0], [3.0, 2.0]]]


def test_torch_adapter_scalar_fun_is_one_residual():
    """A 0-d result leaves the fast path and becomes ``(1, 1)``, as before."""
    ns = Namespace("torch", torch.device("cpu"), torch.float64)
    f = RowwiseFunction(lambda x: (x * x).sum(), (), {}, ns)(
        torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.zeros(1, dtype=torch.long))
    assert f.shape == (1, 1) and f.item() == 5.0


def test_torch_fun_writing_to_its_argument():
    """``fun`` gets a fresh copy of the point; writing to it leaves the solver unharmed."""
    def rude(x):
        out = torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])
        x.fill_(np.nan)
        return out

    res = least_squares(rude, torch.tensor([-1.2, 1.0], dtype=torch.float64))
    assert res.success and torch.allclose(res.x, torch.ones(2, dtype=torch.float64))


def test_torch_fun_float32_output_is_converted():
    """A float32 ``fun`` under a float64 ``x0`` leaves the fast path; results stay float64."""
    def f32(x):
        return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]]).float()

    res = least_squares(f32, torch.tensor([-1.2, 1.0], dtype=torch.float64))
    assert res.fun.dtype == torch.float64
    assert res.cost < 1e-10


# ----------------------------------------------------------- numpy single-problem adapter
def test_numpy_fun_gets_a_fresh_float64_point():
    """One small point crosses through a list: still a fresh float64 array per call, also
    when the engine computes in float32, and writing to it leaves the solver unharmed."""
    seen = []

    def rude(x):
        seen.append((x.dtype, x.copy()))
        out = np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])
        x[:] = np.nan
        return out

    res = least_squares(rude, [-1.2, 1.0], jac=lambda x: np.array([[-20 * x[0], 10.0],
                                                                   [-1.0, 0.0]]))
    assert res.success and np.allclose(res.x, 1.0)
    assert all(dt == np.float64 for dt, _ in seen)
    assert np.array_equal(seen[0][1], [-1.2, 1.0])
    seen.clear()
    res32 = least_squares(rude, np.array([-1.2, 1.0]), dtype=np.float32)
    assert all(dt == np.float64 for dt, _ in seen)
    assert np.array_equal(seen[0][1], np.array([-1.2, 1.0], dtype=np.float32).astype(float))
    assert res32.success


def test_numpy_fun_complex_step_keeps_complex_points():
    """'cs' evaluates at complex points: those keep their imaginary part."""
    kinds = set()

    def f(x):
        kinds.add(np.iscomplexobj(x))
        return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])

    res = least_squares(f, [-1.2, 1.0], jac="cs")
    assert kinds == {False, True} and res.success


# ----------------------------------------------------------- results to numpy
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.int64, torch.int32,
                                   torch.bool])
@pytest.mark.parametrize("shape", [(), (1,), (3,), (1, 2), (2, 3, 4), (0,), (0, 3), (1, 0),
                                   (65,), (9, 8)])
def test_host_numpy_copies_small_tensors_exactly(dtype, shape):
    """Small CPU tensors reach numpy through ``tolist`` (issue 14: fewer dispatched
    operations per result field): the same dtype, shape and values as ``Tensor.numpy``,
    in an array of their own; large ones stay views."""
    from torchimize_scipy._arrays import _SMALL, _host_numpy

    g = torch.Generator().manual_seed(0)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * 1e3).to(dtype)
    if dtype.is_floating_point and t.numel() > 1:
        t = t.clone()
        t.view(-1)[0] = float("-0.0")
        t.view(-1)[1] = 1 / 3  # rounded to the dtype
    a = _host_numpy(t)
    ref = t.numpy()
    assert a.dtype == ref.dtype and a.shape == ref.shape
    np.testing.assert_array_equal(a, ref)
    if dtype.is_floating_point:
        assert np.array_equal(np.signbit(a), np.signbit(ref))
    if 0 < t.numel() <= _SMALL:
        assert not np.shares_memory(a, ref)  # the caller's own copy
    elif t.numel() > _SMALL:
        assert np.shares_memory(a, ref)  # a view, no copy


# ----------------------------------------------------------- 'lm' book, one problem
def _book_sequence(book, ids, calls):
    """Record ``calls`` (``'f'`` a residual evaluation, ``'J'`` a forward-difference
    Jacobian) on ``book``; return the counts and flags after each step."""
    x = torch.zeros(len(ids), 2, dtype=torch.float64)
    seen = []
    for k, what in enumerate(calls):
        if what == "f":
            book.record_call(ids, x + k, torch.full((len(ids), 3), float(k), dtype=torch.float64))
        else:
            book.add_fd_evals(ids, 2)
            book.record_jac(ids, torch.full((len(ids), 3, 2), float(k), dtype=torch.float64),
                            lambda k=k: book.value_at(ids, x + k - 1))
        seen.append({name: np.asarray(book._tensor(name)).tolist()
                     for name in LeastsqBook.COUNTS})
    return seen


def test_book_one_problem_counts_as_tensor_book():
    """The host path of a one-problem book (every evaluation: whole-batch updates on
    numpy) counts trials, ``spent`` and ``hit`` as the tensor code does, up to maxfev."""
    calls = ["f", "J", "f", "f", "J", "f", "J", "f", "f"]
    ids = torch.tensor([0])
    host = _book_sequence(LeastsqBook(9, 1e-8, 1, "cpu", keep_residuals=True), ids, calls)
    tensor = _book_sequence(LeastsqBook(9, 1e-8, 1, "cpu", keep_residuals=True, host=False),
                            ids, calls)
    assert host == tensor
    assert host[-1]["spent"] == [True] and host[-1]["hit"] == [True]
    assert host[-1]["trials"] == [5]


def test_book_one_problem_copies_and_keeps_dtype():
    """The one-problem path stores private copies, in the dtype of the first ones."""
    book = LeastsqBook(100, 1e-8, 1, "cpu", keep_residuals=True)
    ids = torch.tensor([0])
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    r = torch.tensor([[3.0]], dtype=torch.float64)
    book.record_call(ids, x, r)
    x.add_(1.0)
    r.add_(1.0)
    assert book.rows["last_x"].tolist() == [[1.0, 2.0]]
    assert book.rows["last_f"].tolist() == [[3.0]]
    book.record_call(ids, x.float(), r.float())
    assert book.rows["last_x"].dtype == torch.float64
    assert book.rows["last_x"].tolist() == [[2.0, 3.0]]


@pytest.mark.parametrize("status", [codes.FTOL, codes.GTOL])
@pytest.mark.parametrize("jac_last", [False, True])
def test_last_minpack_jacobian_of_one_as_batched(status, jac_last):
    """A one-problem book's last MINPACK Jacobian, residuals and njev are the batched
    method's row 0, whether our final Jacobian counts (gtol) or not."""
    book = LeastsqBook(100, 1e-8, 1, "cpu", keep_residuals=True)
    _book_sequence(book, torch.tensor([0]), ["f", "J", "f", "J", "f"] + (["J"] if jac_last
                                                                          else []))
    J, f, njev = book.at_last_minpack_jacobian(torch.tensor([status]))
    J1, f1, njev1 = book.last_minpack_jacobian_of_one(status)
    assert torch.equal(J1, J[0]) and torch.equal(f1, f[0])
    assert isinstance(njev1, int) and njev1 == int(njev[0])
    expected_J = 5.0 if jac_last and status == codes.GTOL else 3.0
    assert J1[0, 0].item() == expected_J


# ----------------------------------------------------------- MINPACK's QR outputs
@pytest.mark.parametrize("shape", [(50, 3), (4, 4), (7, 1), (120, 10)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_minpack_qr_outputs_as_scipy_qr(shape, dtype):
    """``fjac, ipvt, qtf, R`` from one pivoted QR are those of ``scipy.linalg.qr``'s
    'raw' and 'economic' modes (the route before: two factorisations), with MINPACK's
    signs: a column with nothing below its diagonal (``tau = 0``: the last of a square
    J), which LAPACK leaves alone, is reflected by MINPACK (its row of R and its entry
    of Q^T f negated; ``tests/test_curve_fit_fjac_signs.py`` against ``leastsq``)."""
    import scipy.linalg

    from torchimize_scipy._curve_fit._leastsq import minpack_qr_outputs

    rng = np.random.default_rng(3)
    J = rng.normal(size=shape).astype(dtype)
    f = rng.normal(size=shape[0]).astype(dtype)
    fjac, ipvt, qtf, R = minpack_qr_outputs(J, f)
    m, n = shape
    (raw, tau), _, perm = scipy.linalg.qr(J, pivoting=True, mode="raw")
    Q, _, _ = scipy.linalg.qr(J, pivoting=True, mode="economic")
    tol = 50 * np.finfo(dtype).eps * max(1.0, np.abs(J).max())
    k = min(m, n)
    sign = np.where((tau[:k] == 0) & (np.diag(raw)[:k] != 0), -1.0, 1.0).astype(dtype)
    assert (sign == -1).sum() == (1 if m == n else 0)  # (random J: only the square's last)
    sign_m = np.concatenate([sign, np.ones(m - k, dtype=dtype)])
    assert ipvt.dtype == np.int32 and ipvt.tolist() == perm.tolist()
    assert fjac.dtype == dtype and fjac.shape == (n, m) and fjac.flags.c_contiguous
    np.testing.assert_allclose(R, sign[:, None] * np.triu(raw[:n, :n]), rtol=0, atol=tol)
    np.testing.assert_allclose(
        fjac.T, sign_m[:, None] * np.triu(raw) + np.tril(raw, -1) * tau[np.newaxis, :n],
        rtol=0, atol=tol)
    np.testing.assert_allclose(qtf, sign * (Q.T @ f), rtol=0, atol=tol * np.abs(f).sum())
    np.testing.assert_allclose(J[:, ipvt], (Q * sign) @ R, rtol=0, atol=tol)


def test_minpack_qr_outputs_refuses_nonfinite():
    """As ``scipy.linalg.qr`` (its ``check_finite``): a NaN is a ValueError."""
    from torchimize_scipy._curve_fit._leastsq import minpack_qr_outputs

    with pytest.raises(ValueError, match="must not contain infs or NaNs"):
        minpack_qr_outputs(np.array([[np.nan, 1.0], [1.0, 2.0]]), np.ones(2))


# ----------------------------------------------------------- one problem's result
def _rosen(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def _rosen_jac(x):
    return np.array([[-20 * x[0], 10.0], [-1.0, 0.0]])


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize(("method", "jac", "bounds"), [
    ("lm", "2-point", None), ("lm", "callable", None), ("trf", "callable", None),
    ("trf", "2-point", ([-np.inf, 1.5], np.inf)), ("dogbox", "callable", None)])
def test_one_result_as_batch_result(kind, method, jac, bounds):
    """``build_one_result`` gives ``build_result(...)[0]``: keys in scipy's order, the
    same types (floats / 0-d tensors, ints, bool, arrays of the caller's kind), values."""
    from torchimize_scipy._driver import result_buffers
    from torchimize_scipy._results import build_one_result, build_result

    dt = torch.float64
    ns = Namespace(kind, torch.device("cpu"), dt)
    jac_arg = _rosen_jac if jac == "callable" else jac
    bounded = bounds is not None
    out = result_buffers(1, 2, 3, dt, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    for v in out.values():
        if v.is_floating_point():
            v.copy_(torch.randn(v.shape, generator=gen, dtype=dt))
        else:
            v.copy_(torch.randint(0, 3, v.shape, generator=gen))
    out["status"].fill_(2)
    one = build_one_result(out, ns, method, jac_arg, bounded)
    ref = build_result(out, ns, method, jac_arg, bounded)[0]
    assert list(one) == list(ref)
    for key in ref:
        a, b = one[key], ref[key]
        assert type(a) is type(b), key
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), key
        elif isinstance(b, np.ndarray):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), key
        else:
            assert a == b, key
    # no "J" kept (a sparse Jacobian): jac is None
    del out["J"]
    assert build_one_result(out, ns, method, jac_arg, bounded)["jac"] is None
