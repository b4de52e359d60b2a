"""``curve_fit``'s 'lm' bookkeeping for one problem on the host, kept in the model's kind.

A :class:`LeastsqBook` of one problem on the CPU (``curve_fit``'s) keeps numpy
copies of a numpy model's points, residuals and Jacobians (a tensor's clone
per evaluation cost more than the rest of the bookkeeping), tensors for a
torch model, and answers :meth:`value_at` in the kind of the point asked
about. These tests pin what that must preserve: private copies, the kinds,
the equality rule of ``torch.equal`` (``-0.0`` equals ``0.0``, NaN nothing),
the counts of the tensor book, that LAPACK's workspace, kept per shape,
gives the QR of a fresh query, and the host shortcuts of one fit (the default
bounds, one message, the covariance's shared count).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from torchimize_scipy import curve_fit
from torchimize_scipy._curve_fit import _leastsq
from torchimize_scipy._curve_fit._data import FitData, feasible_start
from torchimize_scipy._curve_fit._leastsq import LeastsqBook, minpack_qr_outputs
from torchimize_scipy._engine import status as codes

IDS = torch.zeros(1, dtype=torch.long)


def test_one_book_keeps_numpy_copies_of_numpy_values():
    book = LeastsqBook(100, 1e-8, 1, "cpu", keep_residuals=True)
    assert book.one
    x = np.array([[1.0, 2.0]])
    r = np.array([[3.0, 4.0, 5.0]])
    book.record_call(IDS, x, r)
    x += 1.0  # the caller reuses its buffers
    r += 1.0
    assert isinstance(book.rows["last_x"], np.ndarray)
    assert book.rows["last_x"].tolist() == [[1.0, 2.0]]
    assert book.value_at(IDS, x) is None  # moved: not the recorded point
    f = book.value_at(IDS, np.array([[1.0, 2.0]]))
    assert isinstance(f, np.ndarray) and f.tolist() == [[3.0, 4.0, 5.0]]
    # asked with a tensor, the answer is a tensor with the same values
    ft = book.value_at(IDS, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    assert isinstance(ft, torch.Tensor) and ft.tolist() == [[3.0, 4.0, 5.0]]
    J = np.ones((1, 3, 2))
    book.record_jac(IDS, J, lambda: f)
    J *= 7.0
    summary, kept_f, njev = book.at_last_minpack_jacobian(torch.tensor([codes.GTOL]))
    assert summary.tolist() == [[[1.0, 1.0]] * 3] and kept_f.tolist() == [[3.0, 4.0, 5.0]]
    assert njev.tolist() == [1]
    J1, f1, njev1 = book.last_minpack_jacobian_of_one(codes.GTOL)
    assert isinstance(J1, np.ndarray) and J1.tolist() == [[1.0, 1.0]] * 3
    assert isinstance(f1, np.ndarray) and njev1 == 1


def test_one_book_value_at_compares_as_torch_equal():
    """``-0.0`` is the recorded ``0.0``; a NaN point is never the recorded one."""
    book = LeastsqBook(100, 1e-8, 1, "cpu", keep_residuals=True)
    book.record_call(IDS, np.array([[0.0, 1.0]]), np.array([[2.0]]))
    assert book.value_at(IDS, np.array([[-0.0, 1.0]])).tolist() == [[2.0]]
    assert book.value_at(IDS, np.array([[0.0, 1.0, 2.0]])) is None  # another shape
    book.record_call(IDS, np.array([[np.nan, 1.0]]), np.array([[2.0]]))
    assert book.value_at(IDS, np.array([[np.nan, 1.0]])) is None
    # float32 points are compared in the recorded dtype (float64 here), as torch does
    book.record_call(IDS, np.array([[0.5, 1.0]]), np.array([[3.0]]))
    assert book.value_at(IDS, np.array([[0.5, 1.0]], dtype=np.float32)).tolist() == [[3.0]]


def test_one_book_keeps_the_first_dtype_and_tensors_for_tensors():
    book = LeastsqBook(100, 1e-8, 1, "cpu", keep_residuals=True)
    book.record_call(IDS, np.array([[1.0]]), np.array([[2.0]]))
    book.record_call(IDS, np.array([[1.5]], dtype=np.float32), np.array([[2.5]], np.float32))
    assert book.rows["last_x"].dtype == np.float64 and book.rows["last_f"].tolist() == [[2.5]]
    tbook = LeastsqBook(100, 1e-8, 1, "cpu", keep_residuals=True)
    x = torch.tensor([[1.0]], dtype=torch.float64)
    tbook.record_call(IDS, x, x + 1)
    assert isinstance(tbook.rows["last_x"], torch.Tensor)
    assert isinstance(tbook.value_at(IDS, x), torch.Tensor)
    assert tbook.value_at(IDS, x.numpy()).tolist() == [[2.0]]  # numpy asked: numpy


@pytest.mark.parametrize("maxfev", [3, 5, 9])
def test_one_book_scalar_counts_follow_the_tensor_book(maxfev):
    """The one-problem path (decided on numpy scalars) and the tensor code count the same
    trials, ``spent``, ``hit`` and Jacobians, for budgets hit at different points."""
    calls = ["f", "J", "f", "f", "J", "f", "J", "f", "f", "f"]

    def run(book):
        seen = []
        for k, what in enumerate(calls):
            x = torch.full((1, 2), float(k), dtype=torch.float64)
            if what == "f":
                book.record_call(IDS, x.numpy() if book.one else x, x[:, :1].numpy()
                                 if book.one else x[:, :1])
            else:
                book.add_fd_evals(IDS, 2)
                book.record_jac(IDS, torch.ones(1, 1, 2, dtype=torch.float64),
                                lambda x=x: x[:, :1])
            seen.append({name: np.asarray(book._tensor(name)).tolist()
                         for name in LeastsqBook.COUNTS})
        return seen

    host = run(LeastsqBook(maxfev, 1e-8, 1, "cpu", keep_residuals=True))
    tensor = run(LeastsqBook(maxfev, 1e-8, 1, "cpu", keep_residuals=True, host=False))
    assert host == tensor
    assert host[-1]["hit"] == [True]


def test_minpack_qr_outputs_with_kept_workspace_as_a_fresh_query():
    """The workspace kept per shape gives the factorisation of a fresh query, bit for bit,
    and ``R``/``ipvt`` are those of ``scipy.linalg.qr`` with pivoting."""
    rng = np.random.default_rng(3)
    J, f = rng.normal(size=(40, 4)), rng.normal(size=40)
    _leastsq._LWORK.clear()
    first = minpack_qr_outputs(J, f)
    assert _leastsq._LWORK  # the query's answer is kept
    again = minpack_qr_outputs(J.copy(), f)
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(a, b)
    _, R, perm = scipy.linalg.qr(J, pivoting=True, mode="economic")
    np.testing.assert_array_equal(first[1], perm)
    np.testing.assert_allclose(first[3], R, rtol=0, atol=1e-12 * np.abs(R).max())
    keys = set(_leastsq._LWORK)
    other = minpack_qr_outputs(J[:7].copy(), f[:7])  # another shape: its own query
    assert set(_leastsq._LWORK) > keys
    assert other[0].shape == (4, 7) and other[3].shape == (4, 4)


def test_feasible_start_unbounded_is_ones_and_bounded_unchanged():
    inf = np.inf
    np.testing.assert_array_equal(feasible_start(np.full(3, -inf), np.full(3, inf)), np.ones(3))
    got = feasible_start(np.array([0.0, -inf, 1.0, -inf]), np.array([2.0, 3.0, inf, inf]))
    np.testing.assert_array_equal(got, [1.0, 2.0, 2.0, 1.0])


def test_one_problem_select_is_the_data_as_given():
    x = np.linspace(0.0, 1.0, 5)
    data = FitData.single(x, True, 2.0 * x)
    xs, y, T, keep = data.select(IDS, np.ones((3, 2)), repeat=3)
    assert xs is data.arrays(np.ones(1))["x"] and y.shape == (1, 5)
    assert T is None and keep is None


def test_curve_fit_lm_numpy_model_results_in_numpy_and_repeatable():
    """The numpy path gives numpy results, the same bits twice (same path), and the
    nfev/njev of MINPACK's counting."""
    x = np.linspace(0, 4, 50)
    y = 2.5 * np.exp(-1.3 * x) + 0.5 + 0.2 * np.random.default_rng(0).normal(size=50)

    def f(xx, a, b, c):
        return a * np.exp(-b * xx) + c

    def jac(xx, a, b, c):
        e = np.exp(-b * xx)
        return np.stack([e, -a * xx * e, np.ones_like(xx)], axis=1)

    for j in (None, jac):
        runs = [curve_fit(f, x, y, jac=j, full_output=True) for _ in range(2)]
        (p1, c1, i1, _, ier1), (p2, c2, i2, _, ier2) = runs
        assert isinstance(p1, np.ndarray) and isinstance(c1, np.ndarray)
        assert np.array_equal(p1, p2) and np.array_equal(c1, c2) and ier1 == ier2
        assert i1["nfev"] == i2["nfev"]
        assert isinstance(i1["fjac"], np.ndarray) and i1["ipvt"].dtype == np.int32


def test_one_book_jacobian_shares_only_the_books_own_residuals():
    """A Jacobian's residuals that are the book's own last ones are kept without a copy
    (the book never writes in place); any other array is copied, and the previous
    Jacobian's values move to ``prev_``."""
    book = LeastsqBook(100, 1e-8, 1, "cpu", keep_residuals=True)
    x = np.array([[1.0, 2.0]])
    book.record_call(IDS, x, np.array([[3.0, 4.0]]))
    own = book.value_at(IDS, x)
    book.record_jac(IDS, np.ones((1, 2, 2)), lambda: own)
    assert book.rows["f"] is book.rows["last_f"]
    theirs = np.array([[5.0, 6.0]])
    book.record_jac(IDS, np.full((1, 2, 2), 2.0), lambda: theirs)
    theirs += 1.0  # the caller's array changes; the kept one does not
    assert book.rows["f"].tolist() == [[5.0, 6.0]]
    assert book.rows["prev_f"].tolist() == [[3.0, 4.0]]
    assert book.rows["prev_summary"].tolist() == [[[1.0, 1.0]] * 2]
    J, f, njev = book.last_minpack_jacobian_of_one(codes.GTOL)
    assert J.tolist() == [[2.0, 2.0]] * 2 and f.tolist() == [5.0, 6.0] and njev == 2


def test_minpack_qr_outputs_fjac_holds_r_and_scaled_reflectors():
    """``fjac.T``: ``R`` on and above the diagonal, LAPACK's reflectors times ``tau``
    below it (also with exact zeros, signed or not, in ``J``)."""
    rng = np.random.default_rng(5)
    J = rng.normal(size=(9, 3))
    J[:, 1] = 0.0
    J[0, :] = -0.0
    fjac, perm, qtf, R = minpack_qr_outputs(J, rng.normal(size=9))
    geqp3, = scipy.linalg.get_lapack_funcs(("geqp3",), (J,))
    raw, jpvt, tau, _, info = geqp3(J.copy())
    assert info == 0
    np.testing.assert_array_equal(perm, jpvt - 1)
    np.testing.assert_array_equal(R, np.triu(raw)[:3])
    np.testing.assert_array_equal(fjac.T, np.triu(raw) + np.tril(raw, -1) * tau[None, :])


def test_finish_covariance_host_shared_count():
    """One problem on the host with a Python ``int`` count: scaled by chi-square /
    (m - n), indeterminate (``inf``, counted) when m <= n unless ``absolute_sigma``."""
    from torchimize_scipy._curve_fit._covariance import finish_covariance

    cov = np.eye(2)[None] * 3.0
    ok, chisq = np.ones(1, dtype=bool), np.array([6.0])
    out, bad = finish_covariance(cov, ok, 2, 5, chisq, absolute_sigma=False)
    np.testing.assert_array_equal(out, 6.0 * np.eye(2)[None])  # 3 * 6 / (5 - 2)
    assert bad == 0 and isinstance(out, np.ndarray)
    out, bad = finish_covariance(cov, ok, 2, 2, chisq, absolute_sigma=False)
    assert np.isinf(out).all() and bad == 1
    out, bad = finish_covariance(cov, ok, 2, 2, chisq, absolute_sigma=True)
    np.testing.assert_array_equal(out, cov)
    assert bad == 0


def test_leastsq_message_formats_one_of_the_table():
    opts = {"ftol": 1e-3, "xtol": 2e-4, "gtol": 0.0, "maxfev": 800}
    table = _leastsq.leastsq_messages(opts)
    assert sorted(table) == [1, 2, 3, 4, 5, 6, 7, 8]
    for info, text in table.items():
        assert _leastsq.leastsq_message(opts, info) == text
    assert table[5] == "Number of calls to function has reached maxfev = 800."
    assert "at most 0.001000" in table[1] and "most 0.000200" in table[3]
    assert table[6].startswith("ftol=0.001000 is too small")
    assert table[8].startswith("gtol=0.000000 is too small")
    with pytest.raises(ValueError, match="info = 0"):
        _leastsq.leastsq_message(opts, 0)


def test_unbounded_default_only_for_two_python_infinities():
    from torchimize_scipy._curve_fit._data import unbounded_default

    inf = np.inf
    assert unbounded_default((-inf, inf))
    for other in ([-inf, inf], (-inf, 1.0), (inf, -inf), (np.float64(-inf), inf),
                  (np.full(3, -inf), np.full(3, inf)), (-inf, inf, 0.0)):
        assert not unbounded_default(other)


def test_curve_fit_default_and_spelled_out_unbounded_bounds_agree():
    """The default bounds (no broadcasting) and infinite bound arrays both mean 'lm', a
    start of ones and the same fit (compared within the parity tolerances)."""
    from _parity import assert_x_close

    x = np.linspace(0, 4, 50)
    y = 2.5 * np.exp(-1.3 * x) + 0.5 + 0.05 * np.random.default_rng(1).normal(size=50)

    def f(xx, a, b, c):
        return a * np.exp(-b * xx) + c

    p1, _, info1, _, ier1 = curve_fit(f, x, y, full_output=True)
    p2, _, info2, _, ier2 = curve_fit(f, x, y, full_output=True,
                                      bounds=(np.full(3, -np.inf), np.full(3, np.inf)))
    assert "ipvt" in info1 and "ipvt" in info2  # both 'lm'
    assert_x_close(p1, p2)
    with pytest.raises(ValueError, match="only works for unconstrained"):
        curve_fit(f, x, y, bounds=(0.0, np.inf), method="lm")


def test_rowwise_model_of_changing_length_is_refused():
    """Forward differences call ``f`` per shifted point; outputs of different lengths
    cannot be stacked and raise instead of being cut or padded."""
    x = np.linspace(0, 1, 10)

    def f(xx, a, b):
        out = a * xx + b
        return out if a == 1.0 else out[:-1]

    with pytest.raises(ValueError):
        curve_fit(f, x, 2.0 * x + 1.0, p0=[1.0, 1.0])
