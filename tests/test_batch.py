"""Tests of ``batch_least_squares`` and ``BatchOptimizeResult``.

The reference for every batch is the same set of problems solved one by one,
with ``torchimize_scipy.least_squares`` and with ``scipy.optimize.least_squares``,
which must agree to the solver's accuracy (batches take the step's SVD data from
the Gram matrix, single problems from the Jacobian, so not to the last bit) by
the parity policy of ``docs/parity.md`` (``tests/_parity.py``): statuses equal
or both converged, counts within an iteration. Within batches results are bit
for bit independent of the other problems (the same path): of chunking, and of a
neighbour that fails. Further tests check
compaction (finished problems are never evaluated again), isolation of failing
problems (non-finite residuals or Jacobians, singular Jacobians), progress,
dtype/device, the result container and input validation.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize as so
import torch
from _parity import (
    assert_bitwise_equal,
    assert_cost_close,
    assert_counts_close,
    assert_message_matches,
    assert_status_equivalent,
    assert_x_close,
)

from torchimize_scipy import BatchOptimizeResult, batch_least_squares, least_squares
from torchimize_scipy._engine import status as codes

T = np.linspace(0.0, 2.0, 12)
M = T.size
N = 2
FIELDS = ("x", "cost", "fun", "jac", "grad", "optimality", "active_mask", "nfev", "njev",
          "status", "success")


# ============================================================================ problems
def make_data(B, seed=0, outliers=False):
    """Noisy exponential decays ``a exp(-k t)``; row ``i`` of ``y`` is problem ``i``."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 2.0, B)
    k = rng.uniform(0.3, 2.0, B)
    y = a[:, None] * np.exp(-k[:, None] * T) + 0.01 * rng.standard_normal((B, M))
    if outliers:
        y[:, 3] += 2.0
        y[:, 8] -= 1.0
    x0 = np.column_stack([rng.uniform(0.8, 1.2, B), rng.uniform(0.8, 1.2, B)])
    return x0, y


# vectorised numpy: x (b, 2), y (b, m)
def fun_v(x, y, t=T):
    return x[:, :1] * np.exp(-x[:, 1:2] * t) - y


def jac_v(x, y, t=T):
    e = np.exp(-x[:, 1:2] * t)
    return np.stack([e, -x[:, :1] * t * e], axis=-1)


# one problem numpy: x (2,), y (m,)
def fun_1(x, y, t=T):
    return x[0] * np.exp(-x[1] * t) - y


def jac_1(x, y, t=T):
    e = np.exp(-x[1] * t)
    return np.column_stack([e, -x[0] * t * e])


# torch versions
TT = torch.as_tensor(T)


def fun_vt(x, y, t=TT):
    return x[:, :1] * torch.exp(-x[:, 1:2] * t.to(x.dtype)) - y.to(x.dtype)


def fun_1t(x, y, t=TT):
    return x[0] * torch.exp(-x[1] * t.to(x.dtype)) - y.to(x.dtype)


# ============================================================================ helpers
def _np(a):
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def assert_same(res, refs, x_rtol=1e-7, cost_rtol=1e-10, slack=2):
    """Batch ``res`` agrees with the single-problem results ``refs`` (same engine).

    Not to the last bit: for batches of several problems the engine takes the
    SVD data from the small Gram matrix (a single problem uses the SVD of the
    Jacobian itself), and finite-difference Jacobians amplify the rounding
    differences; so values are compared to the accuracy of the solution, the
    statuses by the parity policy (equal, or both converged) and the counts
    within ``slack`` evaluations (``tests/_parity.py``).
    """
    assert len(res) == len(refs)
    for i, ref in enumerate(refs):
        got = res[i]
        x_ref = _np(ref.x)
        np.testing.assert_allclose(_np(got.x), x_ref, rtol=x_rtol,
                                   atol=x_rtol * np.abs(x_ref).max(), err_msg=f"problem {i}, x")
        np.testing.assert_allclose(float(got.cost), float(ref.cost), rtol=cost_rtol,
                                   atol=1e-15, err_msg=f"problem {i}, cost")
        for name in ("fun", "grad", "optimality"):
            np.testing.assert_allclose(_np(got[name]), _np(ref[name]), rtol=1e-5, atol=1e-6,
                                       err_msg=f"problem {i}, {name}")
        if got.jac is not None:
            np.testing.assert_allclose(_np(got.jac), _np(ref.jac), rtol=1e-6, atol=1e-6,
                                       err_msg=f"problem {i}, jac")
        np.testing.assert_array_equal(_np(got.active_mask).astype(int),
                                      _np(ref.active_mask).astype(int))
        assert_status_equivalent(got.status, ref.status)
        assert got.success == ref.success, (i, got.success, ref.success)
        assert_message_matches(got.status, ref.status, got.message, ref.message,
                               codes.TERMINATION_MESSAGES)
        assert_counts_close(got.status, ref.status, (got.nfev, got.njev), (ref.nfev, ref.njev),
                            slack=slack)


def assert_batches_identical(res, ref, rows=None):
    """Two batch results are bit for bit the same on ``rows``."""
    rows = np.arange(len(ref)) if rows is None else np.asarray(rows)
    for f in FIELDS:
        if ref[f] is None:
            assert res[f] is None, f
        else:
            np.testing.assert_array_equal(_np(res[f])[rows], _np(ref[f])[rows], err_msg=f)
    assert [res.message[i] for i in rows] == [ref.message[i] for i in rows]


class _Sub:
    """Some problems of a batch result, indexable like a list of results."""

    def __init__(self, res, rows):
        self.res, self.rows = res, list(rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.res[int(self.rows[i])]


def assert_like_scipy(res, refs, x_rtol=1e-7, cost_rtol=1e-10, status=True):
    for i, ref in enumerate(refs):
        got = res[i]
        np.testing.assert_allclose(_np(got.x), ref.x, rtol=x_rtol,
                                   atol=x_rtol * np.abs(ref.x).max(), err_msg=f"problem {i}")
        np.testing.assert_allclose(float(got.cost), ref.cost, rtol=cost_rtol, atol=1e-15,
                                   err_msg=f"problem {i}")
        if status:
            assert_status_equivalent(got.status, ref.status)
            assert bool(got.success) == bool(ref.success)
        np.testing.assert_array_equal(_np(got.active_mask).astype(int),
                                      np.asarray(ref.active_mask).astype(int))


def row_bounds(bounds, i, B):
    """Bounds of problem ``i`` from a batch ``bounds`` argument."""
    if isinstance(bounds, so.Bounds):
        lb, ub = bounds.lb, bounds.ub
    else:
        lb, ub = bounds
    out = []
    for b in (lb, ub):
        b = np.asarray(b, dtype=float)
        if b.ndim == 2:
            b = b[i]
        out.append(b)
    return tuple(out)


def solve_each(fun, x0, args=(), kwargs=None, bounds=(-np.inf, np.inf), x_scale=None,
               scipy=False, **kw):
    """Solve each problem alone (``args`` arrays are sliced per problem)."""
    B = x0.shape[0]
    kwargs = {} if kwargs is None else kwargs
    solver = so.least_squares if scipy else least_squares
    out = []
    for i in range(B):
        args_i = tuple(a[i] for a in args)
        xs = x_scale
        if xs is None:
            xs = "jac" if kw.get("method") == "lm" else 1.0
        elif not isinstance(xs, str) and np.ndim(xs) == 2:
            xs = np.asarray(xs)[i]
        out.append(solver(fun, x0[i], args=args_i, kwargs=kwargs,
                          bounds=row_bounds(bounds, i, B), x_scale=xs, **kw))
    return out


# ============================================================================ parity
@pytest.mark.parametrize("method", ["trf", "dogbox", "lm", "gn"])
def test_methods_match_loop_and_scipy(method):
    x0, y = make_data(12, seed=1)
    res = batch_least_squares(fun_v, x0, method=method, args=(y,))
    assert_same(res, solve_each(fun_1, x0, args=(y,), method=method))
    ref = solve_each(fun_1, x0, args=(y,), method=method if method != "gn" else "trf",
                     scipy=True)
    assert_like_scipy(res, ref, status=method != "gn")
    if method in ("trf", "dogbox", "lm"):
        for i, r in enumerate(ref):  # 'lm' counts its n = 2 finite-difference calls
            assert_counts_close(res.status[i], r.status, res.nfev[i], r.nfev,
                                slack=4 if method == "lm" else 2)
    if method == "lm":
        assert res.njev is None
        assert all(res[i].njev is None for i in range(len(res)))
    else:
        assert res.njev.dtype.kind == "i"
    assert res.x.dtype == np.float64 and isinstance(res.x, np.ndarray)


def fun_easy_v(x, c):
    """Well conditioned: residuals ``x - c`` plus a mild coupling term."""
    return np.concatenate([x - c, 0.3 * (x[:, :1] * x[:, 1:2] - c[:, :1] * c[:, 1:2])], -1)


def fun_easy_1(x, c):
    return np.concatenate([x - c, 0.3 * (x[:1] * x[1:2] - c[:1] * c[1:2])])


def test_gd_easy_problems():
    rng = np.random.default_rng(5)
    c = rng.uniform(-1, 1, (8, 2))
    x0 = c + rng.uniform(-0.5, 0.5, (8, 2))
    res = batch_least_squares(fun_easy_v, x0, method="gd", args=(c,))
    assert_same(res, solve_each(fun_easy_1, x0, args=(c,), method="gd"))
    assert np.all(res.success)
    # the same (zero-residual) minimum as scipy, to steepest descent's accuracy
    ref = solve_each(fun_easy_1, x0, args=(c,), scipy=True)
    np.testing.assert_allclose(res.x, [r.x for r in ref], rtol=0, atol=1e-4)
    np.testing.assert_allclose(res.x, c, atol=1e-4)
    assert np.all(res.cost < 1e-8)


@pytest.mark.parametrize("method", ["trf", "dogbox"])
@pytest.mark.parametrize("loss", ["linear", "soft_l1", "huber", "cauchy", "arctan"])
def test_losses(method, loss):
    x0, y = make_data(8, seed=2, outliers=True)
    kw = dict(method=method, loss=loss, f_scale=0.1)
    res = batch_least_squares(fun_v, x0, args=(y,), **kw)
    assert_same(res, solve_each(fun_1, x0, args=(y,), **kw))
    assert_like_scipy(res, solve_each(fun_1, x0, args=(y,), scipy=True, **kw))


def _bounds_cases(B):
    rng = np.random.default_rng(3)
    lb_rows = np.column_stack([rng.uniform(0.2, 0.9, B), rng.uniform(0.0, 0.6, B)])
    ub_rows = np.column_stack([rng.uniform(1.1, 1.6, B), rng.uniform(1.3, 3.0, B)])
    return {
        "scalar": (0.7, 1.5),
        "vector": (np.array([0.6, 0.0]), np.array([1.4, 1.2])),
        "mixed": (0.0, np.array([1.3, np.inf])),
        "per-problem": (lb_rows, ub_rows),
        "Bounds": so.Bounds(lb_rows, np.full((B, N), 1.4)),
    }


@pytest.mark.parametrize("method", ["trf", "dogbox"])
@pytest.mark.parametrize("kind", ["scalar", "vector", "mixed", "per-problem", "Bounds"])
def test_bounds(method, kind):
    B = 10
    x0, y, bounds, lb, ub = _bounded_problem(B, kind)
    res = batch_least_squares(fun_v, x0, bounds=bounds, method=method, args=(y,))
    assert_same(res, solve_each(fun_1, x0, args=(y,), bounds=bounds, method=method))
    assert_like_scipy(res, solve_each(fun_1, x0, args=(y,), bounds=bounds, method=method,
                                      scipy=True))
    assert np.any(res.active_mask != 0)  # the bounds matter
    assert np.all((res.x >= lb) & (res.x <= ub))


def _bounded_problem(B, kind):
    x0, y = make_data(B, seed=3)
    bounds = _bounds_cases(B)[kind]
    lb, ub = (bounds.lb, bounds.ub) if isinstance(bounds, so.Bounds) else bounds
    lb, ub = np.broadcast_to(lb, x0.shape), np.broadcast_to(ub, x0.shape)
    x0 = np.clip(x0, lb + 1e-3, ub - 1e-3)
    return x0, y, bounds, lb, ub


@pytest.mark.parametrize("kind", ["scalar", "vector", "mixed", "per-problem", "Bounds"])
def test_bounds_gn_matches_loop(kind):
    B = 10
    x0, y, bounds, lb, ub = _bounded_problem(B, kind)
    res = batch_least_squares(fun_v, x0, bounds=bounds, method="gn", args=(y,))
    # (where 'gn' stalls, see below, the cost is first order in x)
    assert_same(res, solve_each(fun_1, x0, args=(y,), bounds=bounds, method="gn"),
                cost_rtol=1e-8)
    assert np.all((res.x >= lb) & (res.x <= ub))


@pytest.mark.parametrize("kind", ["scalar", "vector", "mixed", "per-problem", "Bounds"])
def test_bounds_gn_reaches_constrained_minimum(kind):
    """Projected Gauss-Newton finds scipy's constrained minima.

    (Exactly on the bound where scipy's 'trf', strictly feasible, stays a hair inside.)
    """
    B = 10
    x0, y, bounds, lb, ub = _bounded_problem(B, kind)
    res = batch_least_squares(fun_v, x0, bounds=bounds, method="gn", args=(y,))
    ref = solve_each(fun_1, x0, args=(y,), bounds=bounds, scipy=True)
    assert np.all(res.success)
    # (the line search stops on ftol with optimality ~1e-5: x to ~1e-6)
    np.testing.assert_allclose(res.x, [r.x for r in ref], rtol=1e-5)
    cost_ref = np.array([r.cost for r in ref])
    np.testing.assert_allclose(res.cost, cost_ref, rtol=1e-6)
    assert np.all(res.cost <= cost_ref * (1 + 1e-9))


def test_torch_bounds_are_accepted():
    B = 6
    x0, y = make_data(B, seed=3)
    lb = torch.zeros(B, N, dtype=torch.float64)
    ub = torch.full((N,), 1.3, dtype=torch.float64)
    res = batch_least_squares(fun_v, x0, bounds=(lb, ub), args=(y,))
    ref = batch_least_squares(fun_v, x0, bounds=(0.0, 1.3), args=(y,))
    np.testing.assert_array_equal(res.x, ref.x)


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
@pytest.mark.parametrize("jac", ["2-point", "3-point", "cs", "analytic"])
def test_jacobians(method, jac):
    x0, y = make_data(8, seed=4)
    jb, j1 = (jac_v, jac_1) if jac == "analytic" else (jac, jac)
    res = batch_least_squares(fun_v, x0, jac=jb, method=method, args=(y,))
    assert_same(res, solve_each(fun_1, x0, args=(y,), jac=j1, method=method))
    assert_like_scipy(res, solve_each(fun_1, x0, args=(y,), jac=j1, method=method,
                                      scipy=True))
    if method == "lm" and jac != "analytic":
        assert res.njev is None
    else:
        assert np.all(res.njev >= 1)


def test_jacobian_bounded_fd():
    """Finite differences respect per-problem bounds (x0 on a bound)."""
    B = 6
    x0, y = make_data(B, seed=4)
    lb = np.column_stack([x0[:, 0], np.full(B, -np.inf)])  # x0 on the lower bound
    ub = np.column_stack([np.full(B, np.inf), x0[:, 1] + 1e-9])  # and just under the upper
    for jac in ("2-point", "3-point"):
        res = batch_least_squares(fun_v, x0, jac=jac, bounds=(lb, ub), method="dogbox",
                                  args=(y,))
        assert_same(res, solve_each(fun_1, x0, args=(y,), jac=jac, bounds=(lb, ub),
                                    method="dogbox"))
        assert_like_scipy(res, solve_each(fun_1, x0, args=(y,), jac=jac, bounds=(lb, ub),
                                          method="dogbox", scipy=True))


@pytest.mark.parametrize("method", ["trf", "lm", "gn"])
def test_autograd_torch(method):
    x0, y = make_data(8, seed=6)
    x0t, yt = torch.tensor(x0), torch.tensor(y)
    res = batch_least_squares(fun_vt, x0t, jac="autograd", method=method, args=(yt,))
    assert isinstance(res.x, torch.Tensor) and res.x.dtype == torch.float64
    assert isinstance(res.status, torch.Tensor)
    refs = [least_squares(fun_1t, x0t[i], jac="autograd", method=method, args=(yt[i],))
            for i in range(8)]
    assert_same(res, refs)
    sp = solve_each(fun_1, x0, args=(y,), jac=jac_1,
                    method=method if method != "gn" else "trf", scipy=True)
    assert_like_scipy(res, sp, status=method != "gn")
    # the exact Jacobian equals the analytic one (torch.exp vs np.exp: a few ulps)
    np.testing.assert_allclose(_np(res.jac), jac_v(_np(res.x), y), rtol=1e-10, atol=1e-14)


def test_autograd_with_numpy_x0():
    """jac='autograd' hands tensors to ``fun`` even for numpy ``x0``; results are numpy."""
    x0, y = make_data(6, seed=6)
    yt = torch.tensor(y)
    res = batch_least_squares(fun_vt, x0, jac="autograd", args=(yt,))
    assert isinstance(res.x, np.ndarray)
    ref = batch_least_squares(fun_v, x0, jac=jac_v, args=(y,))
    assert_same(res, _Sub(ref, range(len(ref))))  # torch model vs numpy model


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
@pytest.mark.parametrize("kind", ["scalar", "vector", "per-problem", "jac"])
def test_x_scale(method, kind):
    B = 8
    x0, y = make_data(B, seed=7)
    rng = np.random.default_rng(7)
    x_scale = {"scalar": 2.0, "vector": np.array([0.5, 3.0]),
               "per-problem": rng.uniform(0.3, 3.0, (B, N)), "jac": "jac"}[kind]
    res = batch_least_squares(fun_v, x0, x_scale=x_scale, method=method, args=(y,))
    assert_same(res, solve_each(fun_1, x0, args=(y,), x_scale=x_scale, method=method))
    assert_like_scipy(res, solve_each(fun_1, x0, args=(y,), x_scale=x_scale, method=method,
                                      scipy=True))


def test_x_scale_differs_per_problem():
    """A (B, n) x_scale really is applied row by row (lm uses it as diag)."""
    B = 4
    x0, y = make_data(B, seed=8)
    xs = np.array([[1.0, 1.0], [10.0, 0.1], [1.0, 1.0], [0.1, 10.0]])
    res = batch_least_squares(fun_v, x0, x_scale=xs, method="lm", args=(y,))
    one = batch_least_squares(fun_v, x0, x_scale=1.0, method="lm", args=(y,))
    assert_batches_identical(res, one, [0, 2])
    for i in (1, 3):
        assert not np.array_equal(res.x[i], one.x[i])


def test_args_and_kwargs():
    """Per-problem arrays (leading dim B) are sliced; other args and kwargs are shared."""
    B = 9
    x0, y = make_data(B, seed=9)
    w = np.random.default_rng(9).uniform(0.5, 2.0, (B, 1))  # per-problem weight
    t2 = np.linspace(0.0, 2.0, M)  # shared array whose length is not B
    offset = 0.01  # shared scalar

    def fun(x, y, t_shared, off, w, *, power=1.0):
        assert x.shape[0] == y.shape[0] == w.shape[0]
        assert t_shared.shape == (M,) and off == offset
        return w * (x[:, :1] * np.exp(-x[:, 1:2] * t_shared) ** power - y + off)

    def fun1(x, y, t_shared, off, w, *, power=1.0):
        return w * (x[0] * np.exp(-x[1] * t_shared) ** power - y + off)

    kwargs = {"power": 1.5}
    res = batch_least_squares(fun, x0, args=(y, t2, offset, w), kwargs=kwargs)
    refs = [least_squares(fun1, x0[i], args=(y[i], t2, offset, w[i]), kwargs=kwargs)
            for i in range(B)]
    assert_same(res, refs)
    sp = [so.least_squares(fun1, x0[i], args=(y[i], t2, offset, w[i]), kwargs=kwargs)
          for i in range(B)]
    assert_like_scipy(res, sp)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_per_problem_args_selection(kind):
    """Ascending runs of rows are passed as views; other selections gather the rows."""
    from torchimize_scipy._arrays import detect_namespace
    from torchimize_scipy._user_functions import PerProblemArgs

    y = np.arange(24.0).reshape(6, 4)
    y = torch.as_tensor(y) if kind == "torch" else y
    args = PerProblemArgs((y, 7.0), 6, detect_namespace(y))
    run = torch.arange(2, 5)
    (sel, scalar) = args.select(run)
    np.testing.assert_array_equal(_np(sel), _np(y)[2:5])
    assert scalar == 7.0
    if kind == "torch":
        assert sel.data_ptr() == y[2].data_ptr()
    else:
        assert np.shares_memory(sel, y)
    assert args.select(run)[0] is sel  # the same idx again: the same selection
    picked = torch.tensor([0, 3, 5])
    np.testing.assert_array_equal(_np(args.select(picked)[0]), _np(y)[[0, 3, 5]])
    repeated = torch.tensor([1, 1, 2, 2])
    np.testing.assert_array_equal(_np(args.select(repeated)[0]), _np(y)[[1, 1, 2, 2]])
    empty = torch.tensor([], dtype=torch.long)
    assert _np(args.select(empty)[0]).shape == (0, 4)


def test_per_problem_args_two_selections_alternate():
    """The engine alternates ``fun`` on its running rows and ``jac`` on the accepted
    ones: both selections are remembered, by the identity of their index tensor."""
    from torchimize_scipy._arrays import detect_namespace
    from torchimize_scipy._user_functions import PerProblemArgs

    y = np.arange(24.0).reshape(6, 4)
    args = PerProblemArgs((y,), 6, detect_namespace(y))
    running, accepted = torch.tensor([0, 2, 3, 5]), torch.tensor([2, 5])
    sel_running = args.select(running)[0]
    sel_accepted = args.select(accepted)[0]
    assert args.select(running)[0] is sel_running
    assert args.select(accepted)[0] is sel_accepted
    np.testing.assert_array_equal(sel_running, y[[0, 2, 3, 5]])
    np.testing.assert_array_equal(sel_accepted, y[[2, 5]])
    # equal values in another tensor: selected anew, and a third one drops the oldest
    again = args.select(torch.tensor([2, 5]))[0]
    assert again is not sel_accepted
    np.testing.assert_array_equal(again, y[[2, 5]])
    assert args.select(running)[0] is not sel_running


def test_kwargs_never_sliced():
    """Arrays in ``kwargs`` are shared even when their leading dimension equals B."""
    B = M  # the shared time grid has B entries
    x0, y = make_data(B, seed=9)
    seen = []

    def fun(x, y, t):
        seen.append(t.shape)
        return fun_v(x, y, t)

    res = batch_least_squares(fun, x0, args=(y,), kwargs={"t": T}, chunk_size=5)
    assert set(seen) == {(M,)}
    assert_same(res, solve_each(fun_1, x0, args=(y,), kwargs={"t": T}))


def test_torch_args_sliced():
    B = 7
    x0, y = make_data(B, seed=10)
    x0t, yt = torch.tensor(x0), torch.tensor(y)
    seen = []

    def fun(x, y, t=TT):
        assert isinstance(y, torch.Tensor)
        seen.append(y.shape[0] == x.shape[0])
        return fun_vt(x, y, t)

    res = batch_least_squares(fun, x0t, args=(yt,), kwargs={"t": TT})
    assert all(seen)
    ref = batch_least_squares(fun_v, x0, args=(y,))
    # a torch model against a numpy one: np.exp and torch.exp differ by an ulp on some
    # inputs (AMD EPYC: ~4.5 %), which moves x by ~1e-10, so x by the parity policy
    assert_x_close(res.x, ref.x)
    assert_cost_close(res.cost, ref.cost)


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_not_vectorized_numpy(method):
    B = 6
    x0, y = make_data(B, seed=11)
    res = batch_least_squares(fun_1, x0, method=method, args=(y,), vectorized=False)
    assert_same(res, solve_each(fun_1, x0, args=(y,), method=method))
    vec = batch_least_squares(fun_v, x0, method=method, args=(y,))
    # a vectorised model is another path (other SIMD kernels for exp): the policy
    assert_same(res, _Sub(vec, range(B)))
    # with an analytic per-problem Jacobian as well
    res_j = batch_least_squares(fun_1, x0, jac=jac_1, method=method, args=(y,),
                                kwargs={"t": T}, vectorized=False)
    assert_same(res_j, solve_each(fun_1, x0, args=(y,), jac=jac_1, method=method))


@pytest.mark.parametrize("jac", ["2-point", "autograd"])
def test_not_vectorized_torch(jac):
    B = 6
    x0, y = make_data(B, seed=12)
    x0t, yt = torch.tensor(x0), torch.tensor(y)
    shapes = set()

    def f(x, y):
        shapes.add(tuple(x.shape))
        return fun_1t(x, y)

    res = batch_least_squares(f, x0t, jac=jac, args=(yt,), vectorized=False)
    assert shapes == {(N,)}
    assert isinstance(res.x, torch.Tensor)
    refs = [least_squares(fun_1t, x0t[i], jac=jac, args=(yt[i],)) for i in range(B)]
    assert_same(res, refs)


def test_not_vectorized_torch_vmaps_per_problem_args():
    """A torch function of one problem runs once per evaluation (vmap), its data mapped along."""
    B = 40
    x0, y = make_data(B, seed=13)
    x0t, yt = torch.tensor(x0), torch.tensor(y)
    calls = []

    def f(x, y):
        calls.append(1)
        return fun_1t(x, y)

    res = batch_least_squares(f, x0t, jac="autograd", args=(yt,), vectorized=False)
    ref = batch_least_squares(lambda x, y: x[:, :1] * torch.exp(-x[:, 1:] * TT) - y, x0t,
                              jac="autograd", args=(yt,))
    # a loop would call f B times per evaluation: at least 40 * (max nfev) times
    assert len(calls) < 4 * int(res.nfev.max())
    assert_same(res, _Sub(ref, range(B)))  # vmapped vs vectorised: the policy


@pytest.mark.parametrize("kind", ["control-flow", "numpy-args"])
def test_not_vectorized_torch_falls_back_to_a_loop(kind):
    """Functions vmap cannot map (or numpy per-problem data) are evaluated row by row."""
    B = 6
    x0, y = make_data(B, seed=14)
    x0t = torch.tensor(x0)
    data = y if kind == "numpy-args" else torch.tensor(y)

    def f(x, y):
        if kind == "control-flow" and float(x[0]) < -1e9:  # data-dependent branch
            return x * 0
        return fun_1t(x, torch.as_tensor(y))

    res = batch_least_squares(f, x0t, args=(data,), vectorized=False)
    refs = [least_squares(fun_1t, x0t[i], args=(torch.tensor(y[i]),)) for i in range(B)]
    assert_same(res, refs)


# ============================================================================ compaction
class Recorder:
    """Vectorised residuals (and Jacobian) that record the problem ids of every call."""

    def __init__(self):
        self.fun_calls = []
        self.jac_calls = []

    def fun(self, x, y, ids):
        self.fun_calls.append(np.asarray(ids).copy())
        return fun_v(x, y)

    def jac(self, x, y, ids):
        self.jac_calls.append(np.asarray(ids).copy())
        return jac_v(x, y)


def _per_problem_counts(calls, B):
    counts = np.zeros(B, dtype=int)
    for ids in calls:
        np.add.at(counts, ids, 1)
    return counts


@pytest.mark.parametrize("method", ["trf", "dogbox", "gn"])
def test_compaction_analytic_jac(method):
    B = 12
    x0, y = make_data(B, seed=13)
    ids = np.arange(B)
    rec = Recorder()
    res = batch_least_squares(rec.fun, x0, jac=rec.jac, method=method, args=(y, ids))
    # no extra probe: the first call evaluates every problem at x0 once
    calls = rec.fun_calls
    np.testing.assert_array_equal(calls[0], np.arange(B))
    # every call sees each running problem once, and the running set only shrinks
    prev = set(range(B))
    for c in calls:
        assert len(set(c.tolist())) == len(c)
        assert set(c.tolist()) <= prev
        prev = set(c.tolist())
    sizes = [len(c) for c in calls]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] == B and sizes[-1] < B  # the batch does shrink
    # after its last evaluation a problem never comes back
    last = {i: max(k for k, c in enumerate(calls) if i in c) for i in range(B)}
    for i in range(B):
        assert all(i not in c for c in calls[last[i] + 1:])
    # exactly nfev residual and njev Jacobian evaluations per problem
    np.testing.assert_array_equal(_per_problem_counts(calls, B), res.nfev)
    np.testing.assert_array_equal(_per_problem_counts(rec.jac_calls, B), res.njev)
    for c in rec.jac_calls:
        assert set(c.tolist()) <= set(range(B))
        assert len(set(c.tolist())) == len(c)


@pytest.mark.parametrize("jac,per_jac", [("2-point", N), ("3-point", 2 * N), ("cs", N)])
def test_compaction_finite_differences(jac, per_jac):
    B = 10
    x0, y = make_data(B, seed=14)
    ids = np.arange(B)
    calls = []

    def fun(x, y, ids):
        calls.append(np.asarray(ids).copy())
        return x[:, :1] * np.exp(-x[:, 1:2] * T) - y

    res = batch_least_squares(fun, x0, jac=jac, args=(y, ids), max_nfev=7)
    np.testing.assert_array_equal(calls[0], np.arange(B))  # x0, evaluated once
    trials = [c for c in calls if len(set(c.tolist())) == len(c)]
    fd = [c for c in calls if len(set(c.tolist())) != len(c)]
    # FD calls only contain problems of the preceding trial call, each per_jac times
    running = set(range(B))
    for c in calls:
        u, cnt = np.unique(c, return_counts=True)
        if len(u) == len(c):
            assert set(u.tolist()) <= running
            running = set(u.tolist())
        else:
            assert set(u.tolist()) <= running
            assert np.all(cnt == per_jac)
    assert len(trials) > 0 and len(fd) > 0
    counts = _per_problem_counts(calls, B)
    np.testing.assert_array_equal(counts, res.nfev + per_jac * res.njev)
    assert np.any(res.status == 0)  # some problems hit max_nfev, others converged
    assert np.all(res.nfev <= 7)


def test_compaction_with_chunks():
    """At most chunk_size problems at once; each evaluated exactly as often as it reports."""
    B = 7
    x0, y = make_data(B, seed=15)
    rec = Recorder()
    res = batch_least_squares(rec.fun, x0, jac=rec.jac, args=(y, np.arange(B)), chunk_size=3)
    for c in rec.fun_calls + rec.jac_calls:
        assert len(c) <= 3
    np.testing.assert_array_equal(_per_problem_counts(rec.fun_calls, B), res.nfev)
    np.testing.assert_array_equal(_per_problem_counts(rec.jac_calls, B), res.njev)
    assert_batches_identical(res, batch_least_squares(fun_v, x0, jac=jac_v, args=(y,)))


def test_slow_problem_runs_beside_the_next_problems():
    """A slow problem does not hold back the rest: later problems join it (refill)."""
    B = 8
    x0, y = make_data(B, seed=16)
    x0[0] = [1e3, 50.0]  # far from its solution: many more iterations than the others
    rec = Recorder()
    res = batch_least_squares(rec.fun, x0, jac=rec.jac, args=(y, np.arange(B)), chunk_size=2)
    assert res.nfev[0] > 2 * res.nfev[1:].max()
    assert all(len(c) <= 2 for c in rec.fun_calls)
    # problem 0 shares calls with problems admitted after the first block
    assert any(0 in c and c.max() >= 2 for c in rec.fun_calls)
    assert_batches_identical(res, batch_least_squares(fun_v, x0, jac=jac_v, args=(y,)))


def test_lm_minpack_bookkeeping_evaluates_minpacks_jacobians_only():
    # batch_curve_fit's 'lm' (MINPACK's bookkeeping) reads no result at the final
    # Jacobian; there the engine skips the one scipy evaluates after MINPACK stops
    from torchimize_scipy._batch import minpack_bookkeeping

    B = 24
    x0, y = make_data(B, seed=5)
    ids = np.arange(B)
    default, skipping = Recorder(), Recorder()
    ref = batch_least_squares(default.fun, x0, jac=default.jac, method="lm", args=(y, ids))
    with minpack_bookkeeping():
        res = batch_least_squares(skipping.fun, x0, jac=skipping.jac, method="lm",
                                  args=(y, ids))
    for name in ("x", "cost", "fun", "status", "nfev", "njev"):  # the same arithmetic per row
        assert_bitwise_equal(res[name], ref[name], err_msg=name)
    assert ref.success.all()
    made = _per_problem_counts(skipping.jac_calls, B)
    np.testing.assert_array_equal(made, res.njev)  # exactly MINPACK's Jacobians
    extra = _per_problem_counts(default.jac_calls, B) - made
    assert set(extra.tolist()) <= {0, 1} and extra.sum() > 0  # the default's final ones
    np.testing.assert_array_equal(_per_problem_counts(skipping.fun_calls, B), res.nfev)
    # outside the block the default is back
    again = Recorder()
    batch_least_squares(again.fun, x0, jac=again.jac, method="lm", args=(y, ids))
    np.testing.assert_array_equal(_per_problem_counts(again.jac_calls, B),
                                  _per_problem_counts(default.jac_calls, B))


# ============================================================================ failures
def _nan_fun(x, y, floor):
    """Residuals; NaN for rows whose ``x[1]`` is below ``floor`` (per problem)."""
    f = fun_v(x, y)
    return np.where((x[:, 1:2] < floor[:, None]), np.nan, f)


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm", "gn"])
@pytest.mark.parametrize("bad_row", [0, 4])
def test_nan_at_x0_isolated(method, bad_row):
    B = 8
    x0, y = make_data(B, seed=16)
    y_bad = y.copy()
    y_bad[bad_row, 5] = np.nan
    res = batch_least_squares(fun_v, x0, method=method, args=(y_bad,))
    assert res.status[bad_row] == codes.NONFINITE == 5
    assert not res.success[bad_row]
    assert res.message[bad_row] == codes.message(codes.NONFINITE)
    assert res[bad_row].status == 5 and res[bad_row].success is False
    np.testing.assert_array_equal(res.x[bad_row], x0[bad_row])
    assert res.nfev[bad_row] == 1
    others = np.flatnonzero(np.arange(B) != bad_row)
    # the others are as in the batch without the NaN ...
    good = batch_least_squares(fun_v, x0, method=method, args=(y,))
    assert_batches_identical(res, good, others)
    # ... and as in the batch without that problem at all
    alone = batch_least_squares(fun_v, x0[others], method=method, args=(y[others],))
    for f in FIELDS:
        if alone[f] is not None:
            np.testing.assert_array_equal(res[f][others], alone[f], err_msg=f)


def test_nan_at_x0_torch_and_inf():
    B = 5
    x0, y = make_data(B, seed=17)
    y[2, 0] = np.inf
    y[3, 1] = np.nan
    res = batch_least_squares(fun_vt, torch.tensor(x0), args=(torch.tensor(y),))
    np.testing.assert_array_equal(_np(res.status)[[2, 3]], [5, 5])
    assert bool(res.success[[0, 1, 4]].all())


def _fun_ignoring(x, y, bad):
    return fun_v(x, y)


def _nan_jac(x, y, bad):
    J = jac_v(x, y)
    J[bad & (np.abs(x[:, 0] - 1.0) > 0.05)] = np.nan  # once the row has moved
    return J


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm", "gn"])
def test_nonfinite_jacobian_mid_run(method):
    B = 8
    x0, y = make_data(B, seed=18)
    x0[:, 0] = 1.0
    bad = np.zeros(B, dtype=bool)
    bad[3] = True
    res = batch_least_squares(_fun_ignoring, x0, jac=_nan_jac, method=method, args=(y, bad))
    good = batch_least_squares(_fun_ignoring, x0, jac=_nan_jac, method=method,
                               args=(y, np.zeros(B, dtype=bool)))
    assert np.all(good.success)
    assert res.status[3] == codes.NONFINITE
    assert not res.success[3]
    assert res.message[3] == codes.message(codes.NONFINITE)
    assert res.nfev[3] > 1  # it did run for a while
    assert np.all(np.isfinite(res.x[3])) and np.all(np.isfinite(res.fun[3]))
    assert_batches_identical(res, good, [i for i in range(B) if i != 3])


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_nan_residuals_mid_run_follow_scipy(method):
    """A trial with non-finite residuals is rejected and the radius shrinks, as in scipy.

    Row 2's residuals are NaN for ``x[1] < floor`` while its minimum lies below,
    so the row ends on the edge of the region; the other rows are unaffected.
    """
    B = 6
    x0, y = make_data(B, seed=19)
    floor = np.full(B, -np.inf)
    x_free = batch_least_squares(fun_v, x0, method=method, args=(y,)).x
    floor[2] = 0.5 * (x0[2, 1] + x_free[2, 1])
    assert x0[2, 1] > floor[2] > x_free[2, 1]
    res = batch_least_squares(_nan_fun, x0, method=method, args=(y, floor))
    good = batch_least_squares(_nan_fun, x0, method=method, args=(y, np.full(B, -np.inf)))
    assert_batches_identical(res, good, [i for i in range(B) if i != 2])
    assert np.all(np.isfinite(res.fun[2]))
    assert floor[2] <= res.x[2, 1] < x0[2, 1]

    def one(x, y, r):
        return _nan_fun(x[None], y[None], np.array([r]))[0]

    # stopped on the edge, not at a minimum: the cost is first order in x
    alone = least_squares(one, x0[2], method=method, args=(y[2], floor[2]))
    assert_same(_Sub(res, [2]), [alone], cost_rtol=1e-8)
    if method != "lm":  # MINPACK has no rule for NaN residuals
        sp = so.least_squares(one, x0[2], method=method, args=(y[2], floor[2]))
        np.testing.assert_allclose(res.x[2], sp.x, rtol=1e-7)
        assert_status_equivalent(res.status[2], sp.status)
        assert_counts_close(res.status[2], sp.status, res.nfev[2], sp.nfev)


def fun_singular_v(x, y, uses_c):
    """``a exp(-k t) + c`` where ``c`` is absent from problems with ``uses_c == 0``."""
    return fun_v(x[:, :2], y) + uses_c[:, None] * x[:, 2:3]


def fun_singular_1(x, y, uses_c):
    return fun_1(x[:2], y) + uses_c * x[2]


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm", "gn"])
def test_singular_jacobian_isolated(method):
    B = 8
    x0, y = make_data(B, seed=20)
    x0 = np.column_stack([x0, np.full(B, 0.1)])
    uses_c = np.ones(B)
    uses_c[5] = 0.0
    res = batch_least_squares(fun_singular_v, x0, method=method, args=(y, uses_c))
    assert np.all(res.success), res.message
    assert np.all(np.isfinite(res.x))
    assert res.x[5, 2] == pytest.approx(0.1)  # the free parameter does not move
    np.testing.assert_array_equal(res.jac[5][:, 2], 0.0)
    assert_same(res, solve_each(fun_singular_1, x0, args=(y, uses_c), method=method))
    if method != "gn":
        sp = solve_each(fun_singular_1, x0, args=(y, uses_c), method=method, scipy=True)
        assert_like_scipy(res, sp)
    # the others are as in a batch where every problem is regular
    full = batch_least_squares(fun_singular_v, x0, method=method, args=(y, np.ones(B)))
    assert_batches_identical(res, full, [i for i in range(B) if i != 5])


def fun_scaled_v(x, y, scale):
    """The exponential decay with its rate measured in units of ``scale`` (per problem)."""
    return x[:, :1] * np.exp(-(x[:, 1:2] * scale[:, None]) * T) - y


def fun_scaled_1(x, y, scale):
    return x[0] * np.exp(-(x[1] * scale) * T) - y


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_ill_conditioned_member_takes_the_svd_route(method):
    """A badly scaled problem (cond(J)**2 >> 1e10) beside regular ones: all match scipy.

    For 'trf' and 'dogbox' with ``x_scale=1`` its Gram matrix is far beyond
    the Gram route's limit, so its steps come from the SVD of J, the others'
    from J^T J ('lm' scales the columns by their norms, which repairs the
    conditioning); each problem equals a single call and scipy.
    """
    B = 6
    x0, y = make_data(B, seed=23)
    scale = np.ones(B)
    scale[2] = 1e-6
    x0[2, 1] = x0[2, 1] / 1e-6
    x_scale = 1.0 if method != "lm" else None
    res = batch_least_squares(fun_scaled_v, x0, method=method, args=(y, scale),
                              x_scale=x_scale)
    J = res.jac[2]
    assert np.linalg.cond(J) ** 2 > 1e10
    kw = dict(method=method, args=(y, scale), x_scale=x_scale)
    assert_same(res, solve_each(fun_scaled_1, x0, **kw), x_rtol=1e-6)
    assert_like_scipy(res, solve_each(fun_scaled_1, x0, scipy=True, **kw), x_rtol=1e-6)


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm", "gn", "gd"])
def test_chunk_size_invariance(method):
    """A problem's arithmetic does not depend on which problems run beside it."""
    B = 10
    x0, y = make_data(B, seed=21)
    base = batch_least_squares(fun_v, x0, method=method, args=(y,))
    for cs in (1, 3, B, 100):
        res = batch_least_squares(fun_v, x0, method=method, args=(y,), chunk_size=cs)
        assert_batches_identical(res, base)


def test_chunk_size_invariance_bounded_robust():
    B = 7
    x0, y = make_data(B, seed=21, outliers=True)
    kw = dict(bounds=(0.2, 1.6), loss="soft_l1", f_scale=0.1, jac="3-point",
              x_scale="jac", args=(y,))
    base = batch_least_squares(fun_v, x0, **kw)
    assert_batches_identical(batch_least_squares(fun_v, x0, chunk_size=2, **kw), base)


@pytest.mark.parametrize("loss", ["soft_l1", "huber", "cauchy", "arctan"])
@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_chunk_size_invariance_robust_losses(method, loss):
    """Robust losses too: a row's loss values and its scaled Jacobian's layout do not
    depend on its neighbours (before, 'trf' rows differed at 1e-13 for 1-3 of 8 seeds)."""
    for seed in range(4):
        x0, y = make_data(7, seed=seed, outliers=True)
        kw = dict(method=method, loss=loss, f_scale=0.1, args=(y,))
        base = batch_least_squares(fun_v, x0, **kw)
        for cs in (1, 3):
            assert_batches_identical(batch_least_squares(fun_v, x0, chunk_size=cs, **kw), base)


def test_progress_bar(capsys):
    B = 9
    x0, y = make_data(B, seed=22)
    res = batch_least_squares(fun_v, x0, args=(y,), progress=True, chunk_size=4)
    err = capsys.readouterr().err
    assert f"{B}/{B}" in err
    assert "batch_least_squares[trf]" in err
    assert_batches_identical(res, batch_least_squares(fun_v, x0, args=(y,)))


def test_stream_past_blocks_that_fail_at_once():
    """Blocks whose problems all fail at x0 leave no rows: the next block still starts."""
    x0, y = make_data(7, seed=3)
    y[:4] = np.nan
    res = batch_least_squares(fun_v, x0, args=(y,), chunk_size=2)
    ref = batch_least_squares(fun_v, x0, args=(y,))
    assert not res.success[:4].any() and res.success[4:].all()
    assert_batches_identical(res, ref)


def test_progress_counts_nonfinite_start(capsys):
    B = 4
    x0, y = make_data(B, seed=22)
    y[1, 0] = np.nan
    batch_least_squares(fun_v, x0, args=(y,), progress=True)
    assert f"{B}/{B}" in capsys.readouterr().err


def test_verbose(capsys):
    x0, y = make_data(5, seed=23)
    batch_least_squares(fun_v, x0, args=(y,), verbose=2, chunk_size=2)
    out = capsys.readouterr().out
    assert "problems 0:2 started" in out and "problems 4:5 started" in out
    assert "BatchOptimizeResult(problems=5" in out


def test_return_jac_false():
    x0, y = make_data(5, seed=24)
    res = batch_least_squares(fun_v, x0, args=(y,), return_jac=False)
    ref = batch_least_squares(fun_v, x0, args=(y,))
    assert res.jac is None and res["jac"] is None and res[0].jac is None
    np.testing.assert_array_equal(res.x, ref.x)
    np.testing.assert_array_equal(res.grad, ref.grad)
    res_t = batch_least_squares(fun_vt, torch.tensor(x0), args=(torch.tensor(y),),
                                return_jac=False, chunk_size=2)
    assert res_t.jac is None


# ============================================================================ dtype, device
def test_float32_torch():
    B = 16
    x0, y = make_data(B, seed=25)
    x0t = torch.tensor(x0, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.float32)
    ref = batch_least_squares(fun_v, x0, args=(y,))
    for jac in ("2-point", "autograd"):
        res = batch_least_squares(fun_vt, x0t, jac=jac, args=(yt,))
        assert res.x.dtype == torch.float32 and res.cost.dtype == torch.float32
        assert res.jac.dtype == torch.float32 and res.fun.dtype == torch.float32
        assert bool(res.success.all()), res.message
        np.testing.assert_allclose(_np(res.x), ref.x, rtol=2e-3)
        np.testing.assert_allclose(_np(res.cost), ref.cost, rtol=1e-2)


def test_half_precision_rejected():
    x0, y = make_data(3)
    with pytest.raises(ValueError, match=r"`dtype` is torch\.float16"):
        batch_least_squares(fun_v, x0, args=(y,), dtype="float16")


def test_dtype_keyword():
    x0, y = make_data(6, seed=26)
    res = batch_least_squares(fun_vt, torch.tensor(x0), args=(torch.tensor(y),),
                              dtype=torch.float32)
    assert res.x.dtype == torch.float32
    # numpy input with dtype='float32': fun still gets numpy, results are numpy
    res_np = batch_least_squares(fun_v, x0, args=(y,), dtype="float32")
    assert isinstance(res_np.x, np.ndarray) and res_np.x.dtype == np.float32
    assert np.all(res_np.success)


def test_device_cpu_keyword():
    x0, y = make_data(6, seed=27)
    res = batch_least_squares(fun_vt, torch.tensor(x0), args=(torch.tensor(y),), device="cpu")
    assert res.x.device.type == "cpu"
    ref = batch_least_squares(fun_vt, torch.tensor(x0), args=(torch.tensor(y),))
    assert_bitwise_equal(res.x, ref.x)  # the same path twice
    res_np = batch_least_squares(fun_v, x0, args=(y,), device=torch.device("cpu"))
    assert isinstance(res_np.x, np.ndarray)
    # numpy model vs torch model: not bit for bit (np.exp vs torch.exp), the policy
    assert_same(res_np, _Sub(ref, range(len(ref))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda():
    B = 32
    x0, y = make_data(B, seed=28)
    x0c = torch.tensor(x0, device="cuda")
    yc = torch.tensor(y, device="cuda")
    seen = set()

    def fun(x, y):
        seen.add(x.device.type)
        assert y.device.type == "cuda"
        return fun_vt(x, y, TT.to(x.device))

    res = batch_least_squares(fun, x0c, args=(yc,))
    assert res.x.device.type == "cuda" and seen == {"cuda"}
    assert res.status.device.type == "cuda"
    ref = batch_least_squares(fun_v, x0, args=(y,))
    np.testing.assert_allclose(_np(res.x), ref.x, rtol=1e-7)
    # numpy data, computed on the GPU, comes back as numpy
    res_np = batch_least_squares(fun_v, x0, args=(y,), device="cuda")
    assert isinstance(res_np.x, np.ndarray)
    np.testing.assert_allclose(res_np.x, ref.x, rtol=1e-7)
    # a CPU tensor argument travels to the device; the model's own constant must follow x
    res_ag = batch_least_squares(lambda x, y: fun_vt(x, y, TT.to(x.device)), x0,
                                 jac="autograd", args=(torch.tensor(y),), device="cuda")
    assert isinstance(res_ag.x, np.ndarray)
    np.testing.assert_allclose(res_ag.x, ref.x, rtol=1e-7)


# ============================================================================ result object
@pytest.fixture(scope="module")
def small_result():
    x0, y = make_data(6, seed=29)
    return batch_least_squares(fun_v, x0, args=(y,), max_nfev=4)


def test_result_len_and_index(small_result):
    res = small_result
    assert isinstance(res, BatchOptimizeResult)
    assert len(res) == 6
    last = res[-1]
    np.testing.assert_array_equal(last.x, res.x[5])
    np.testing.assert_array_equal(res[-6].x, res.x[0])
    assert res[np.int64(2)].cost == res.cost[2]
    for bad in (6, -7, 100):
        with pytest.raises(IndexError):
            res[bad]
    assert res["x"] is res.x


def test_result_iteration(small_result):
    res = small_result
    items = list(res)
    assert len(items) == 6
    for i, r in enumerate(items):
        assert isinstance(r, so.OptimizeResult)
        np.testing.assert_array_equal(r.x, res.x[i])
        assert r.status == res.status[i]
    assert [r.message for r in res] == res.message


def test_result_item_types(small_result):
    r = small_result[1]
    assert isinstance(r.x, np.ndarray) and r.x.shape == (N,)
    assert isinstance(r.fun, np.ndarray) and r.fun.shape == (M,)
    assert isinstance(r.jac, np.ndarray) and r.jac.shape == (M, N)
    assert isinstance(r.grad, np.ndarray) and r.grad.shape == (N,)
    assert isinstance(r.active_mask, np.ndarray) and r.active_mask.shape == (N,)
    # (least_squares' and scipy's numpy scalars)
    assert type(r.cost) is np.float64 and type(r.optimality) is np.float64
    for name in ("nfev", "njev", "status"):
        assert type(r[name]) is int
    assert type(r.success) is bool and isinstance(r.message, str)
    for r in small_result:
        assert r.message == codes.TERMINATION_MESSAGES[r.status]
        assert r.success == (r.status > 0)


def test_result_shapes(small_result):
    res = small_result
    B = 6
    assert res.x.shape == (B, N) and res.cost.shape == (B,) and res.fun.shape == (B, M)
    assert res.jac.shape == (B, M, N) and res.grad.shape == (B, N)
    assert res.optimality.shape == (B,) and res.active_mask.shape == (B, N)
    for f in ("nfev", "njev", "status", "success"):
        assert res[f].shape == (B,)
    assert res.success.dtype == bool
    assert isinstance(res.message, list) and len(res.message) == B


def test_result_repr(small_result):
    res = small_result
    text = repr(res)
    ok = int(res.success.sum())
    assert text.startswith(f"BatchOptimizeResult(problems=6, success={ok}, status counts {{")
    for s_, c in zip(*np.unique(res.status, return_counts=True), strict=True):
        assert f"{s_}: {c}" in text
    assert f"{res.cost.min():.3e}/{np.median(res.cost):.3e}/{res.cost.max():.3e}" in text
    assert str(res) == text
    assert len(text.splitlines()) == 1 and len(text) < 300


def test_result_repr_counts_failures():
    x0, y = make_data(6, seed=29)
    y[4, 0] = np.nan
    res = batch_least_squares(fun_v, x0, args=(y,))
    assert "problems=6, success=5" in repr(res) and "5: 1" in repr(res)
    bad = res[4]
    assert bad.status == 5 and bad.success is False
    assert bad.message == codes.TERMINATION_MESSAGES[5]


def test_result_torch_items():
    x0, y = make_data(3, seed=30)
    res = batch_least_squares(fun_vt, torch.tensor(x0), args=(torch.tensor(y),))
    r = res[0]
    assert isinstance(r.x, torch.Tensor) and r.x.shape == (N,)
    assert isinstance(r.cost, torch.Tensor) and r.cost.ndim == 0
    assert type(r.nfev) is int and type(r.status) is int and type(r.success) is bool
    assert "problems=3" in repr(res)


# ============================================================================ validation
def test_x0_must_be_2d():
    x0, y = make_data(3)
    with pytest.raises(ValueError, match=r"shape \(B, n\)"):
        batch_least_squares(fun_v, x0[0], args=(y,))
    with pytest.raises(ValueError, match=r"shape \(B, n\)"):
        batch_least_squares(fun_v, x0[None], args=(y,))
    with pytest.raises(ValueError, match="real"):
        batch_least_squares(fun_v, x0 + 0j, args=(y,))


@pytest.mark.parametrize("bounds", [
    (np.zeros(3), np.inf),
    (np.zeros((2, N)), np.inf),
    (0.0, np.ones((3, N + 1))),
    so.Bounds(np.zeros(N + 1), np.inf),
])
def test_bounds_shape_mismatch(bounds):
    x0, y = make_data(3)
    with pytest.raises(ValueError, match="Inconsistent shapes between bounds and `x0`"):
        batch_least_squares(fun_v, x0, bounds=bounds, args=(y,))


def test_bounds_other_errors():
    x0, y = make_data(3)
    with pytest.raises(ValueError, match="must contain 2 elements"):
        batch_least_squares(fun_v, x0, bounds=(0.0, 1.0, 2.0), args=(y,))
    lb = np.zeros((3, N))
    ub = np.full((3, N), 2.0)
    ub[1, 0] = 0.0
    with pytest.raises(ValueError, match="strictly less"):
        batch_least_squares(fun_v, x0, bounds=(lb, ub), args=(y,))


def test_infeasible_x0_in_one_row():
    x0, y = make_data(4)
    lb = np.zeros((4, N))
    ub = np.full((4, N), 5.0)
    ub[2, 1] = 0.5  # x0[2, 1] is about 1
    with pytest.raises(ValueError, match="Initial guess is outside of provided bounds"):
        batch_least_squares(fun_v, x0, bounds=(lb, ub), args=(y,))


def test_lm_with_bounds():
    x0, y = make_data(3)
    with pytest.raises(ValueError, match="Method 'lm' doesn't support bounds."):
        batch_least_squares(fun_v, x0, bounds=(0.0, 10.0), method="lm", args=(y,))
    lb = np.full((3, N), -np.inf)
    lb[1, 0] = 0.0
    with pytest.raises(ValueError, match="Method 'lm' doesn't support bounds."):
        batch_least_squares(fun_v, x0, bounds=(lb, np.inf), method="lm", args=(y,))


def test_lm_m_less_than_n():
    x0 = np.ones((3, 3))
    with pytest.raises(ValueError, match="number of residuals is less"):
        batch_least_squares(lambda x: x[:, :2] ** 2, x0, method="lm")


@pytest.mark.parametrize("chunk_size", [0, -2, 1.5, 2.0000001])
def test_bad_chunk_size(chunk_size):
    x0, y = make_data(3)
    with pytest.raises(ValueError, match="chunk_size"):
        batch_least_squares(fun_v, x0, args=(y,), chunk_size=chunk_size)


def test_integral_float_chunk_size():
    x0, y = make_data(5)
    res = batch_least_squares(fun_v, x0, args=(y,), chunk_size=2.0)
    assert_batches_identical(res, batch_least_squares(fun_v, x0, args=(y,), chunk_size=2))


def test_fun_wrong_shape():
    x0, y = make_data(4)
    with pytest.raises(ValueError, match=r"shape \(b, m\)"):
        batch_least_squares(lambda x, y: fun_v(x, y).ravel(), x0, args=(y,))
    with pytest.raises(ValueError, match=r"shape \(b, m\)"):
        batch_least_squares(lambda x, y: fun_v(x, y)[..., None], x0, args=(y,))
    # right rank, wrong number of rows
    with pytest.raises(ValueError, match=r"got \(1, 12\) for b = 4"):
        batch_least_squares(lambda x, y: fun_v(x, y)[:1], x0, args=(y,))


def test_fun_wrong_rows_not_vectorized():
    x0, y = make_data(4)
    n_calls = []

    def fun(x, y):
        n_calls.append(1)
        return fun_1(x, y)[: 12 - len(n_calls) % 2]  # m changes from call to call

    with pytest.raises(ValueError):
        batch_least_squares(fun, x0, args=(y,), vectorized=False)


def test_fun_2d_not_vectorized():
    x0, y = make_data(4)
    with pytest.raises(ValueError, match="at most 1-d"):
        batch_least_squares(lambda x, y: np.ones((2, 6)) * x[0], x0, args=(y,),
                            vectorized=False)


@pytest.mark.parametrize("bad", [
    pytest.param(lambda J: J[:, :, :1], id="too-few-columns"),
    pytest.param(lambda J: J[:, :-1], id="too-few-rows"),
    pytest.param(lambda J: J[:1], id="too-few-problems"),
    pytest.param(lambda J: J.reshape(len(J), -1), id="flat"),
    pytest.param(lambda J: np.swapaxes(J, 1, 2), id="transposed"),
])
def test_jac_wrong_shape(bad):
    x0, y = make_data(4)
    with pytest.raises(ValueError, match="The return value of `jac` has wrong shape"):
        batch_least_squares(fun_v, x0, jac=lambda x, y: bad(jac_v(x, y)), args=(y,))


@pytest.mark.parametrize("method", ["trf", "lm"])
def test_jac_wrong_shape_not_vectorized(method):
    x0, y = make_data(4)
    with pytest.raises(ValueError):
        batch_least_squares(fun_1, x0, jac=lambda x, y: jac_1(x, y)[:, :1], args=(y,),
                            method=method, vectorized=False)


@pytest.mark.parametrize("kw,match", [
    (dict(method="foo"), "`method` must be"),
    (dict(jac="4-point"), "`jac` must be"),
    (dict(loss="l2"), "`loss` must be"),
    (dict(method="lm", loss="huber"), "only 'linear' loss"),
    (dict(max_nfev=0), "max_nfev"),
    (dict(verbose=3), "verbose"),
    (dict(x_scale=-1.0), "x_scale"),
    (dict(x_scale=np.ones(3)), "Inconsistent shapes between `x_scale`"),
    (dict(x_scale=np.ones((2, N))), "Inconsistent shapes between `x_scale`"),
    (dict(ftol=None, xtol=None, gtol=None), "At least one of the tolerances"),
])
def test_option_errors(kw, match):
    x0, y = make_data(3)
    with pytest.raises(ValueError, match=match):
        batch_least_squares(fun_v, x0, args=(y,), **kw)


def test_empty_batch_raises():
    with pytest.raises(ValueError, match="at least one problem"):
        batch_least_squares(lambda x: x - 1, np.zeros((0, 2)))


def test_result_index_must_be_integer():
    x0, y = make_data(3)
    res = batch_least_squares(fun_v, x0, args=(y,))
    with pytest.raises(TypeError):
        res[1.5]
    assert res[np.int64(1)].cost == res.cost[1]


@pytest.mark.parametrize("method", ["trf", "dogbox"])
@pytest.mark.parametrize("jac", ["2-point", "3-point"])
def test_blocks_of_one_problem_equal_the_batch(method, jac):
    """Blocks of one problem take the host paths of one float64 problem (its SVD, its
    differences, its start); each problem's results are still those of the batch, bit for
    bit (the same IEEE operations)."""
    B = 6
    x0, y = make_data(B, seed=5, outliers=True)
    kw = dict(method=method, jac=jac, bounds=(0.2, 1.6), args=(y,))
    base = batch_least_squares(fun_v, x0, **kw)
    assert_batches_identical(batch_least_squares(fun_v, x0, chunk_size=1, **kw), base)


@pytest.mark.parametrize("seed", [1, 3, 5, 13])
def test_lm_problem_running_alone_keeps_the_batchs_bits(seed):
    """A block of one 'lm' problem (``chunk_size=1``), or the last problem still running,
    keeps the batch's arithmetic (``host_scalars.batch_rows``): one float64 problem of
    ``least_squares`` takes numpy's norms, a batch torch's. These seeds differed at
    1e-11..1e-7 before."""
    x0, y = make_data(8, seed=seed, outliers=True)
    base = batch_least_squares(fun_v, x0, method="lm", args=(y,))
    assert_batches_identical(batch_least_squares(fun_v, x0, method="lm", args=(y,),
                                                 chunk_size=1), base)
