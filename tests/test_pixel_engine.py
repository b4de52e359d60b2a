"""Forward differences of large batches: the grouped, in-place paths give the same values.

The model here uses only products and sums (no library ``exp``), so every
residual has the same IEEE value whichever group or call computes it; the
grouped paths then perform the same operations on the same values as one
whole call, and whole solves agree bit for bit (the same path run twice,
with a different grouping).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _parity import ONE_EVAL_RTOL, assert_close_scaled, assert_x_close

from torchimize_scipy import _jacobian as jacobian_module
from torchimize_scipy import batch_curve_fit
from torchimize_scipy._curve_fit import _model

X = np.linspace(-1.0, 2.0, 16)


def cubic(x, a, b, c):
    return a + x * (b + x * c * x)


def cubic_t(x, a, b, c):
    return a + x * (b + x * c * x)


def _data(B: int, kind: str):
    rng = np.random.default_rng(11)
    P = rng.uniform(0.5, 2.0, (B, 3))
    y = cubic(X, P[:, :1], P[:, 1:2], P[:, 2:]) + 0.01 * rng.standard_normal((B, X.size))
    p0 = np.ones((B, 3))
    if kind == "torch":
        return torch.as_tensor(X), torch.as_tensor(y), torch.as_tensor(p0)
    return X, y, p0


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_lm_grouped_differences_equal_one_call(monkeypatch, kind):
    """MINPACK's differences of a batch split into groups of problems (formed in place
    on each group's residuals, then written transposed into J) equal those of one call."""
    x, y, p0 = _data(120, kind)
    f = cubic_t if kind == "torch" else cubic
    whole = batch_curve_fit(f, x, y, p0, method="lm", full_output=True)
    calls: list[int] = []

    def counted(x, a, b, c):
        calls.append(a.shape[0])
        return f(x, a, b, c)

    monkeypatch.setattr(_model, "CHUNK_ELEMENTS", 30 * X.size)  # 10 problems x 3 shifts
    grouped = batch_curve_fit(counted, x, y, p0, method="lm", full_output=True)
    assert 30 in calls  # the grouped path ran (groups of 10 problems' shifted points)
    for a, b in [(grouped[0], whole[0]), (grouped[1], whole[1]), (grouped[4], whole[4]),
                 (grouped[2]["nfev"], whole[2]["nfev"]), (grouped[2]["fvec"], whole[2]["fvec"])]:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("jac", ["2-point", "3-point"])
def test_trf_columnwise_differences_equal_one_call(monkeypatch, jac):
    """Column-by-column differences (formed in one scratch buffer, divided into each
    column of J) equal the one-call differences: same fits, bit for bit."""
    x, y, p0 = _data(60, "numpy")
    bounds = (np.array([0.0, -5.0, -5.0]), np.array([5.0, 5.0, 5.0]))
    monkeypatch.setattr(jacobian_module, "COLUMNWISE_ENTRIES", 2**62)
    whole = batch_curve_fit(cubic, x, y, p0, method="trf", jac=jac, bounds=bounds,
                            full_output=True)
    calls: list[int] = []

    def counted(x, a, b, c):
        calls.append(a.shape[0])
        return cubic(x, a, b, c)

    monkeypatch.setattr(jacobian_module, "COLUMNWISE_ENTRIES", 0)
    cols = batch_curve_fit(counted, x, y, p0, method="trf", jac=jac, bounds=bounds,
                           full_output=True)
    assert max(calls) == 60 and len(calls) > 3 * len(whole[2]["nfev"]) // 60  # per column
    for a, b in [(cols[0], whole[0]), (cols[1], whole[1]), (cols[4], whole[4]),
                 (cols[2]["nfev"], whole[2]["nfev"])]:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_columnwise_scratch_is_not_the_jacobian():
    """The scratch buffer of the column-by-column differences is reused across columns,
    never handed out: every column of J keeps its own values."""
    B, n, m = 64, 3, 2000  # B * n * m above COLUMNWISE_ENTRIES: column by column
    assert B * n * m > jacobian_module.COLUMNWISE_ENTRIES
    t = torch.linspace(0, 1, m, dtype=torch.float64)

    def fun(x, idx):
        return x[:, :1] * t + x[:, 1:2] * t * t + x[:, 2:] * t * t * t

    x = torch.ones(B, n, dtype=torch.float64)
    J = jacobian_module.finite_difference_jacobian(fun, x, fun(x, None), method="2-point")
    expected = torch.stack([t, t * t, t * t * t], -1).expand(B, m, n)
    torch.testing.assert_close(J, expected, rtol=1e-6, atol=1e-6)  # 2-point accuracy
    assert not torch.equal(J[..., 0], J[..., 1])


def _model_of(B: int, chunk: bool, monkeypatch, **data_kw):
    """A vectorised WhitenedModel of the cubic on ``B`` numpy problems (and its data)."""
    from torchimize_scipy._curve_fit._data import FitData, sigma_transform
    from torchimize_scipy._curve_fit._leastsq import LeastsqBook, minpack_step

    x, y, p0 = _data(B, "numpy")
    if data_kw.get("nan"):
        y = y.copy()
        y[3, 5] = np.nan
    data = FitData.batch(x, y)
    keep = data.apply_nan_policy("omit" if data_kw.get("nan") else None, drop=False)
    data.set_transform(sigma_transform(data_kw.get("sigma"), B, X.size, keep))
    model = _model.WhitenedModel(cubic, None, data, 3, False, rowwise=False)
    model.book = LeastsqBook(np.inf, minpack_step(0.0, None, 3, torch.float64), B, "cpu",
                             keep_jacobians=False)
    if chunk:
        monkeypatch.setattr(_model, "CHUNK_ELEMENTS", 7 * X.size)  # 7 rows per call of f
    P = p0 + np.random.default_rng(3).uniform(-0.2, 0.2, p0.shape)
    return model, P, y


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("case", [{}, {"nan": True}, {"sigma": np.linspace(0.5, 2.0, 16)}])
def test_grouped_residuals_equal_one_call(monkeypatch, case, kind):
    """Residuals of a batch evaluated group by group (the later groups written straight
    into the result; masked or whitened ones copied there) equal one call's."""
    def points(P):
        return torch.as_tensor(P) if kind == "torch" else P

    model, P, y = _model_of(40, False, monkeypatch, **case)
    ids = np.arange(40)
    whole = model.evaluate(points(P), ids)
    model, P, y = _model_of(40, True, monkeypatch, **case)
    calls: list[int] = []

    def counted(x, a, b, c):
        calls.append(a.shape[0])
        return cubic(x, a, b, c)

    model.f = counted
    with torch.no_grad():  # (as in the engine: torch calls that record gradients are whole)
        grouped = model.evaluate(points(P), ids)
    assert max(calls) == 7 and len(calls) == 6  # groups of 7 rows
    assert type(grouped) is type(whole) and tuple(grouped.shape) == (40, X.size)
    assert grouped.is_contiguous() if kind == "torch" else grouped.flags.c_contiguous
    np.testing.assert_array_equal(np.asarray(grouped), np.asarray(whole))
    if not case:  # plain residuals: f - y, row by row
        np.testing.assert_allclose(np.asarray(grouped),
                                   cubic(X, P[:, :1], P[:, 1:2], P[:, 2:]) - y,
                                   rtol=0, atol=1e-14)


@pytest.mark.parametrize("B", [5, 40])
def test_numpy_batch_differences_are_a_contiguous_jacobian(monkeypatch, B):
    """A numpy batch's forward differences come as one C-contiguous (b, M, N) array, in
    one call of ``f`` or in groups (the engine copies no transposed view), with the
    derivatives of the model."""
    model, P, _ = _model_of(B, B > 10, monkeypatch)
    ids = np.arange(B)
    model.residuals(P, ids)
    J = model.fd_jacobian(P, ids)
    assert isinstance(J, np.ndarray) and J.shape == (B, X.size, 3) and J.flags.c_contiguous
    exact = np.stack(np.broadcast_arrays(np.ones_like(X), X, X**3), axis=-1)
    np.testing.assert_allclose(J, np.broadcast_to(exact, J.shape), rtol=1e-6, atol=1e-6)


def test_numpy_rows_of_numpy_data():
    """FitData._rows with numpy indices: a view for one ascending run, else the rows (each
    ``repeat`` times), as numpy arrays."""
    from torchimize_scipy._curve_fit._data import FitData

    a = np.arange(30.0).reshape(10, 3)
    run = FitData._rows(a, np.arange(2, 6))
    assert np.shares_memory(run, a)
    np.testing.assert_array_equal(run, a[2:6])
    ids = np.array([1, 4, 5, 9])
    np.testing.assert_array_equal(FitData._rows(a, ids), a[ids])
    np.testing.assert_array_equal(FitData._rows(a, ids, 3), a[np.repeat(ids, 3)])
    np.testing.assert_array_equal(FitData._rows(a, np.arange(3), 2), a[[0, 0, 1, 1, 2, 2]])
    assert not np.shares_memory(FitData._rows(a, ids), a)


@pytest.mark.parametrize("partial_rows", [0, 2, 30])
def test_mask_residuals_rows(partial_rows):
    """Residual masking of a numpy batch: the omitted entries are zero and every other
    entry is the residual itself, whether the few partial rows are masked in place or
    all rows in one pass."""
    rng = np.random.default_rng(7)
    r = rng.standard_normal((40, 3, 16))
    keep = np.ones((40, 16), dtype=bool)
    rows = rng.choice(40, partial_rows, replace=False)
    keep[rows, rng.integers(0, 16, partial_rows)] = False
    before = r.copy()
    out = _model._mask_residuals(r, keep)
    full = np.broadcast_to(keep[:, None, :], r.shape)
    assert out.shape == r.shape and np.all(out[~full] == 0.0)
    np.testing.assert_array_equal(out[full], before[full])
    if partial_rows <= 10:  # few rows: masked in place, the others untouched
        assert out is r


def test_differences_take_the_engines_residuals(monkeypatch):
    """batch_curve_fit's MINPACK differences ('lm', float64) use the residuals the engine
    hands with each Jacobian call: no look-up in the book (which keeps no points) and no
    second evaluation at the point; the fit is the book's (scipy's) fit."""
    from torchimize_scipy._curve_fit._leastsq import LeastsqBook

    x, y, p0 = _data(60, "numpy")
    ref = batch_curve_fit(cubic, x, y, p0, method="lm", full_output=True)
    looked_up: list[int] = []
    fallback = _model.WhitenedModel._value_at
    monkeypatch.setattr(_model.WhitenedModel, "_value_at",
                        lambda self, P, ids: looked_up.append(len(ids)) or fallback(self, P, ids))
    books: list[LeastsqBook] = []
    init = LeastsqBook.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        books.append(self)

    monkeypatch.setattr(LeastsqBook, "__init__", spy)
    rows: list[int] = []

    def counted(x, a, b, c):
        rows.append(a.shape[0])
        return cubic(x, a, b, c)

    got = batch_curve_fit(counted, x, y, p0, method="lm", full_output=True)
    assert looked_up == []
    assert len(books) == 1 and not books[0].keep_points and "last_x" not in books[0].rows
    # every row of f is a residual evaluation or a shifted point, as counted in nfev
    assert sum(rows) == int(np.asarray(got[2]["nfev"]).sum())
    assert_x_close(got[0], ref[0], rtol=ONE_EVAL_RTOL)
    np.testing.assert_array_equal(np.asarray(got[2]["nfev"]), np.asarray(ref[2]["nfev"]))


def test_differences_refuse_residuals_of_another_dtype(monkeypatch):
    """Residuals converted to another dtype than the model's (a float32 engine's copy of
    float64 residuals) are not used: the differences take the model's own values."""
    B = 6
    model, P, _ = _model_of(B, False, monkeypatch)
    ids = np.arange(B)
    f = model.residuals(P, ids)
    assert model.residual_dtype == np.float64
    exact = model.fd_jacobian(P, ids, residuals=f)
    rounded = f.astype(np.float32)
    got = model.fd_jacobian(P, ids, residuals=rounded)
    assert_close_scaled(got, exact, ONE_EVAL_RTOL)
    # the rounded residuals would have moved J by far more than that
    h = model.book.rel_step * np.abs(P)
    moved = (f - rounded.astype(np.float64))[:, :, None] / h[:, None, :]
    assert np.abs(moved).max() > 1e-3


def test_book_without_points_answers_nothing():
    """A batch book with ``keep_points=False`` still counts every evaluation but keeps no
    point or residuals, so ``value_at`` has no answer; with points it has."""
    from torchimize_scipy._curve_fit._leastsq import LeastsqBook

    ids, x, r = torch.arange(3), torch.ones(3, 2), torch.full((3, 4), 2.0)
    for keep in (True, False):
        book = LeastsqBook(5, 1e-8, 3, "cpu", keep_jacobians=False, keep_points=keep)
        book.record_call(ids, x, r)
        book.record_jac(ids, torch.zeros(3, 4, 2), lambda: r)
        book.record_call(ids[1:], x[1:], r[1:])
        np.testing.assert_array_equal(book.rows["trials"], [0, 1, 1])
        f = book.value_at(ids[1:], x[1:])
        if keep:
            np.testing.assert_array_equal(f.numpy(), r[1:].numpy())
        else:
            assert f is None and "last_f" not in book.rows


def test_vectorized_jac_gets_residuals_only_when_it_asks():
    """batch_least_squares hands the residuals at x to a WithResiduals ``jac`` (numpy, in
    the caller's kind) and never to a plain callable ``jac``."""
    from torchimize_scipy import batch_least_squares
    from torchimize_scipy._user_functions import WithResiduals

    t = np.linspace(0.0, 1.0, 8)
    y = np.stack([np.exp(-t), 2.0 * np.exp(-3.0 * t)])

    def fun(p, yb):  # yb: the rows of y of these problems (per-problem args)
        return p[:, :1] * np.exp(-p[:, 1:] * t) - yb

    def jac(p, yb):
        e = np.exp(-p[:, 1:] * t)
        return np.stack([e, -p[:, :1] * t * e], axis=-1)

    seen: list[np.ndarray] = []

    def jac_r(p, yb, residuals):
        assert isinstance(residuals, np.ndarray)
        np.testing.assert_allclose(residuals, fun(p, yb), rtol=0, atol=1e-15)
        seen.append(residuals)
        return jac(p, yb)

    plain = batch_least_squares(fun, np.ones((2, 2)), jac=jac, method="lm", args=(y,))
    given = batch_least_squares(fun, np.ones((2, 2)), jac=WithResiduals(jac_r), method="lm",
                                args=(y,))
    assert seen  # every Jacobian call got them
    assert_x_close(given.x, plain.x, rtol=ONE_EVAL_RTOL)
    assert_x_close(plain.x, [[1.0, 1.0], [2.0, 3.0]], rtol=1e-6)
    with pytest.raises(TypeError):  # a plain jac is never given them
        batch_least_squares(fun, np.ones((2, 2)), jac=lambda p, yb, residuals: jac(p, yb),
                            method="lm", args=(y,))
