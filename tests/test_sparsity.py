"""``jac_sparsity``: scipy's column groups and grouped finite differences.

The grouping in scipy's order is compared with scipy's ``group_columns`` (same
groups, exactly: both are integer results of the same greedy rule); the
largest-first grouping that ``jac_sparsity`` uses is checked valid, no larger
than scipy's on the benchmark structures, and giving the same Jacobian bit for
bit (any valid grouping evaluates the same numbers); the grouped differences
with scipy's ``approx_derivative(sparsity=...)`` on the same points, to one
evaluation of the same formula (``ONE_EVAL_RTOL``), with and without bounds;
a batch with a loop of single problems; the number of calls of the residual
function (one for a vectorised function, one per group for a function of one
point, as scipy).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from _parity import ONE_EVAL_RTOL, assert_close_scaled
from scipy.optimize._numdiff import approx_derivative
from scipy.optimize._numdiff import group_columns as scipy_group_columns

from torchimize_scipy import _sparsity
from torchimize_scipy._arrays import Namespace
from torchimize_scipy._sparsity import (
    SparsityPattern,
    _first_fit,
    _structure_csr,
    check_jac_sparsity,
    fewest_groups,
    group_columns,
    grouped_difference,
)
from torchimize_scipy._user_functions import RowwiseFunction


def tridiagonal(n: int) -> sp.csr_array:
    return sp.diags_array([np.ones(n - 1), np.ones(n), np.ones(n - 1)], offsets=[-1, 0, 1],
                          format="csr")


def broyden(x: np.ndarray) -> np.ndarray:
    f = (3 - x) * x + 1
    f[1:] -= x[:-1]
    f[:-1] -= 2 * x[1:]
    return f


def broyden_torch(x: torch.Tensor) -> torch.Tensor:
    """Vectorised over the rows of ``x (k, n)``."""
    f = (3 - x) * x + 1
    f = torch.cat([f[:, :1], f[:, 1:] - x[:, :-1]], dim=1)
    return torch.cat([f[:, :-1] - 2 * x[:, 1:], f[:, -1:]], dim=1)


@pytest.mark.parametrize("seed", range(30))
def test_groups_equal_scipys_on_random_structures(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m, n = rng.integers(1, 80, 2)
    A = rng.random((m, n)) < rng.random() * 0.4
    assert np.array_equal(group_columns(A), scipy_group_columns(A))
    assert np.array_equal(group_columns(sp.csr_array(A)), scipy_group_columns(A))
    # the numpy first fit (used where scipy's compiled grouping is missing): same groups
    order = np.random.RandomState(0).permutation(n)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    assert np.array_equal(_first_fit(_structure_csr(A, stored=True), position),
                          scipy_group_columns(A))


def test_groups_equal_scipys_with_an_explicit_order_and_a_banded_structure() -> None:
    S = tridiagonal(500)
    assert np.array_equal(group_columns(S), scipy_group_columns(S))
    order = np.arange(500)[::-1]
    assert np.array_equal(group_columns(S, order), scipy_group_columns(S, order))
    # the natural order colours a tridiagonal structure with 3 groups
    assert group_columns(S, np.arange(500)).max() == 2


def test_groups_are_valid_and_stored_zeros_group_as_scipy_but_hold_no_entry() -> None:
    rng = np.random.default_rng(5)
    A = sp.random_array((200, 150), density=0.03, rng=rng, format="csr")
    A.data[::3] = 0.0  # stored zeros: grouped as entries (scipy), but not differenced
    groups = group_columns(A)
    stored = A.copy()
    stored.data[:] = 1.0
    dense = stored.toarray() != 0
    for g in range(groups.max() + 1):
        assert (dense[:, groups == g].sum(axis=1) <= 1).all()
    assert np.array_equal(groups, scipy_group_columns(A))
    assert SparsityPattern.from_structure(A).rows.size == np.count_nonzero(A.data)


def test_group_columns_order_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="`order` has incorrect shape"):
        group_columns(np.eye(3), order=[0, 1])


def test_check_jac_sparsity_shape_message() -> None:
    with pytest.raises(ValueError, match="`jac_sparsity` has wrong shape."):
        check_jac_sparsity(tridiagonal(5)[:-1], 5, 5)
    with pytest.raises(ValueError, match="`jac_sparsity` has wrong shape."):
        check_jac_sparsity(np.ones((4, 5)), 5, 5)
    assert check_jac_sparsity(None, 5, 5) is None
    pattern = check_jac_sparsity(np.eye(5), 5, 5)
    assert pattern.n_groups == 1 and pattern.rows.size == 5


def _numpy_rows(fun):
    calls = []

    def batched(X: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        calls.append(X.shape[0])
        return torch.as_tensor(np.stack([fun(r.copy()) for r in X.numpy()]))

    return batched, calls


@pytest.mark.parametrize("method", ["2-point", "3-point", "cs"])
@pytest.mark.parametrize("bounded", [False, True])
def test_grouped_difference_matches_scipy(method: str, bounded: bool) -> None:
    n = 60
    rng = np.random.default_rng(1)
    x0 = -1 + 0.1 * rng.standard_normal(n)
    lb, ub = (x0 - 1e-9 * rng.random(n), x0 + 0.5) if bounded else (-np.inf, np.inf)
    S = tridiagonal(n)
    ref = approx_derivative(broyden, x0, method=method, sparsity=S, bounds=(lb, ub))
    fun, _ = _numpy_rows(broyden)
    x = torch.tensor(x0)[None]
    f0 = fun(x, None)
    lbt = torch.tensor(np.broadcast_to(lb, (n,)).copy())[None] if bounded else None
    ubt = torch.tensor(np.broadcast_to(ub, (n,)).copy())[None] if bounded else None
    J = grouped_difference(fun, x, f0, torch.zeros(1, dtype=torch.long),
                           SparsityPattern.from_structure(S), method, None, lbt, ubt)
    assert J.layout == torch.sparse_coo and J.is_coalesced() and J.shape == (1, n, n)
    assert J._nnz() == ref.nnz
    assert_close_scaled(J.to_dense()[0].numpy(), ref.toarray(), ONE_EVAL_RTOL)


def test_grouped_difference_calls_a_function_of_one_point_once_per_group() -> None:
    S = tridiagonal(40)
    pattern = SparsityPattern.from_structure(S)
    fun, calls = _numpy_rows(broyden)
    x = torch.full((1, 40), -1.0, dtype=torch.float64)
    grouped_difference(fun, x, fun(x, None), torch.zeros(1, dtype=torch.long), pattern,
                       "3-point")
    assert calls[-1] == 2 * pattern.n_groups  # rows handed over in one call: 2 G points


def test_grouped_difference_of_a_batch_is_one_call_and_matches_single_problems() -> None:
    n, B = 30, 4
    pattern = SparsityPattern.from_structure(tridiagonal(n))
    calls = []

    def fun(X: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        calls.append(X.shape[0])
        return broyden_torch(X)

    gen = torch.Generator().manual_seed(0)
    x = -1 + 0.1 * torch.randn(B, n, generator=gen, dtype=torch.float64)
    idx = torch.arange(B)
    J = grouped_difference(fun, x, fun(x, idx), idx, pattern, "2-point")
    assert calls[-1] == B * pattern.n_groups and J.shape == (B, n, n)
    for b in range(B):
        Jb = grouped_difference(fun, x[b:b + 1], fun(x[b:b + 1], idx[:1]), idx[:1], pattern,
                                "2-point")
        assert torch.equal(J.to_dense()[b], Jb.to_dense()[0])  # the same points, the same path


def test_grouped_difference_host_gather_is_the_torch_formula_bit_for_bit() -> None:
    """On the CPU the '2-point' values are gathered in numpy; they must be the torch
    formula's (the path of other devices), bit for bit: the same operations."""
    n, B = 40, 3
    pattern = SparsityPattern.from_structure(tridiagonal(n))
    gen = torch.Generator().manual_seed(1)
    x = -1 + 0.1 * torch.randn(B, n, generator=gen, dtype=torch.float64)
    idx = torch.arange(B)
    f0 = broyden_torch(x)
    J = grouped_difference(lambda X, i: broyden_torch(X), x, f0, idx, pattern, "2-point")
    rows, cols, groups, onehot = pattern.on(x.device)
    from torchimize_scipy._jacobian import _absolute_step, default_rel_step

    h = _absolute_step(x, default_rel_step(x.dtype, f0.dtype, "2-point"), None)
    x1 = x + h
    pts = torch.where(onehot.unsqueeze(0), x1.unsqueeze(1), x.unsqueeze(1))
    F = broyden_torch(pts.reshape(-1, n)).reshape(B, -1, n)
    ref = (F[:, groups[cols], rows] - f0[:, rows]) / (x1 - x)[:, cols]
    assert torch.equal(J.coalesce().values(), ref.reshape(-1))


def test_grouped_difference_keeps_float32() -> None:
    n = 20
    pattern = SparsityPattern.from_structure(tridiagonal(n))
    x = torch.full((1, n), -1.0, dtype=torch.float32)
    J = grouped_difference(lambda X, i: broyden_torch(X), x, broyden_torch(x),
                           torch.zeros(1, dtype=torch.long), pattern, "2-point")
    exact = torch.diag(3 - 2 * x[0]) - torch.diag(torch.ones(n - 1), -1) \
        - 2 * torch.diag(torch.ones(n - 1), 1)
    assert J.dtype == torch.float32
    # float32 forward differences: error about sqrt(eps32) times the curvature
    assert torch.allclose(J.to_dense()[0], exact, atol=5e-3)


def _bundle_structure(n_cameras: int = 8, n_points: int = 300, per_point: int = 4,
                      seed: int = 0) -> sp.csr_array:
    """Bundle adjustment's pattern: a row pair per observation, 9 camera + 3 point columns."""
    rng = np.random.default_rng(seed)
    cam = np.concatenate([rng.choice(n_cameras, per_point, replace=False)
                          for _ in range(n_points)])
    pt = np.repeat(np.arange(n_points), per_point)
    obs = np.arange(cam.size)
    rows = np.concatenate([np.repeat(2 * obs + r, 12) for r in (0, 1)])
    cols_one = np.concatenate([cam[:, None] * 9 + np.arange(9),
                               n_cameras * 9 + pt[:, None] * 3 + np.arange(3)], 1).ravel()
    cols = np.concatenate([cols_one, cols_one])
    shape = (2 * cam.size, 9 * n_cameras + 3 * n_points)
    return sp.csr_array((np.ones(rows.size), (rows, cols)), shape=shape)


def _assert_valid(structure, groups: np.ndarray) -> None:
    """No two columns of a group share a row."""
    S = sp.csr_array(structure).astype(bool).astype(np.int64)
    G = sp.csr_array((np.ones(groups.size, dtype=np.int64), (np.arange(groups.size), groups)))
    assert (S @ G).max() <= 1


@pytest.mark.parametrize("seed", range(10))
def test_fewest_groups_are_valid_on_random_structures(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    m, n = rng.integers(1, 120, 2)
    A = rng.random((m, n)) < rng.random() * 0.3
    groups = fewest_groups(A)
    _assert_valid(A, groups)
    assert groups.min(initial=0) >= 0 and np.array_equal(np.unique(groups),
                                                         np.arange(groups.max() + 1))


def test_fewest_groups_beat_or_tie_scipy_on_the_benchmark_structures() -> None:
    ba = _bundle_structure()
    groups = fewest_groups(ba)
    _assert_valid(ba, groups)
    # a camera's 9 columns and a point's 3 share rows: 12 groups are the least possible
    assert groups.max() + 1 == 12 < scipy_group_columns(ba).max() + 1
    tri = tridiagonal(2000)
    groups = fewest_groups(tri)
    _assert_valid(tri, groups)
    assert groups.max() + 1 <= scipy_group_columns(tri).max() + 1


@pytest.mark.parametrize("n", [10, 30, 2000])
@pytest.mark.parametrize("b", [1, 2, 4])
def test_banded_structures_get_the_least_groups(n: int, b: int) -> None:
    """``b`` diagonals on each side: ``2 b + 1`` groups (every column meets its ``2 b``
    neighbours in some row, so no fewer are possible); scipy's random order takes more at
    some sizes (tridiagonal, n = 30: 4)."""
    S = sp.diags_array([np.ones(n - abs(k)) for k in range(-b, b + 1)],
                       offsets=list(range(-b, b + 1))).tocsr()
    groups = fewest_groups(S)
    _assert_valid(S, groups)
    assert groups.max() + 1 == 2 * b + 1 <= scipy_group_columns(S).max() + 1


@pytest.mark.parametrize("seed", range(5))
def test_numpy_first_fit_gives_the_compiled_groups(monkeypatch, seed: int) -> None:
    """Where scipy's compiled grouping is missing, the numpy first fit stands in: same groups."""
    rng = np.random.default_rng(40 + seed)
    m, n = rng.integers(20, 300, 2)
    A = sp.random_array((m, n), density=rng.uniform(0.01, 0.1), rng=rng, format="csr")
    compiled = fewest_groups(A), group_columns(A, 3)
    monkeypatch.setattr(_sparsity, "_compiled_grouping", None)
    assert np.array_equal(fewest_groups(A), compiled[0])
    assert np.array_equal(group_columns(A, 3), compiled[1])


def test_groups_beyond_64_use_more_mask_words_and_stay_scipys() -> None:
    # a full row forces every column into its own group: 150 groups, three 64-bit words
    A = np.vstack([np.ones((1, 150)), np.eye(150), np.eye(150, k=1)])
    assert np.array_equal(group_columns(A), scipy_group_columns(A))
    groups = fewest_groups(A)
    assert groups.max() + 1 == 150 and np.array_equal(np.sort(groups), np.arange(150))


def _bundle_like_fun(structure: sp.csr_array):
    """Residuals whose row i depends on its structural columns only (products and sines)."""
    S = sp.csr_array(structure)
    rows = np.repeat(np.arange(S.shape[0]), np.diff(S.indptr))
    w = 1 + np.arange(S.nnz) % 5

    def fun(x: np.ndarray) -> np.ndarray:
        terms = np.sin(w * x[S.indices]) * x[S.indices] ** 2
        return np.bincount(rows, weights=terms, minlength=S.shape[0])

    return fun


@pytest.mark.parametrize("method", ["2-point", "3-point"])
def test_other_groupings_give_the_same_jacobian_to_the_last_bit(method: str) -> None:
    """Row i of a perturbed evaluation sees only its own column of the group: any valid
    grouping evaluates the same numbers (the same path per entry, hence bit for bit)."""
    S = _bundle_structure(n_cameras=5, n_points=80)
    n = S.shape[1]
    rng = np.random.default_rng(3)
    x = torch.as_tensor(rng.uniform(-1, 1, n))[None]
    fun, _ = _numpy_rows(_bundle_like_fun(S))
    f0 = fun(x, None)
    ours = SparsityPattern.from_structure(S)
    scipys = SparsityPattern(shape=ours.shape, rows=ours.rows, cols=ours.cols,
                             groups=scipy_group_columns(S),
                             n_groups=int(scipy_group_columns(S).max()) + 1)
    assert not np.array_equal(ours.groups, scipys.groups)  # other evaluation points
    idx = torch.zeros(1, dtype=torch.long)
    J1 = grouped_difference(fun, x, f0, idx, ours, method)
    J2 = grouped_difference(fun, x, f0, idx, scipys, method)
    assert torch.equal(J1.values(), J2.values()) and torch.equal(J1.indices(), J2.indices())


def test_grouped_difference_of_a_large_torch_point_calls_fun_per_group(monkeypatch) -> None:
    """With one torch thread a torch ``fun`` of many parameters (n >= ``_VMAP_MAX_N``) is
    evaluated one call per column group, not in one vmapped call (slower there,
    ``_user_functions``); below the rule, or with several threads, the vmapped call
    stays. Same Jacobian as scipy's grouped differences."""
    from torchimize_scipy import _user_functions

    calls: list[int] = []

    def broyden_t(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        f = (3 - x) * x + 1
        return f - torch.nn.functional.pad(x[:-1], (1, 0)) - 2 * torch.nn.functional.pad(
            x[1:], (0, 1))

    def broyden_np(x: np.ndarray) -> np.ndarray:
        f = (3 - x) * x + 1
        f[1:] -= x[:-1]
        f[:-1] -= 2 * x[1:]
        return f

    n = _user_functions._VMAP_MAX_N
    ref = approx_derivative(broyden_np, -np.ones(n), method="2-point", sparsity=tridiagonal(n))
    pattern = SparsityPattern.from_structure(tridiagonal(n))
    fun = RowwiseFunction(broyden_t, (), {}, Namespace("torch", torch.device("cpu"),
                                                       torch.float64))
    x0 = -torch.ones(1, n, dtype=torch.float64)
    f0 = broyden_t(x0[0]).reshape(1, n)
    zero = torch.zeros(1, dtype=torch.long)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        calls.clear()
        grouped_difference(fun, x0, f0, zero, pattern, "2-point")
        assert len(calls) == 1  # several threads: vmapped
        torch.set_num_threads(1)
        calls.clear()
        J = grouped_difference(fun, x0, f0, zero, pattern, "2-point")
        assert pattern.n_groups > 1 and len(calls) == pattern.n_groups
    finally:
        torch.set_num_threads(old)
    assert_close_scaled(J.to_dense()[0].numpy(), ref.toarray(), ONE_EVAL_RTOL)
    monkeypatch.setattr(_user_functions, "_VMAP_MAX_N", n + 1)  # below the rule: vmapped
    torch.set_num_threads(1)
    try:
        calls.clear()
        J_vmap = grouped_difference(fun, x0, f0, zero, pattern, "2-point")
        assert len(calls) == 1
    finally:
        torch.set_num_threads(old)
    assert_close_scaled(J_vmap.to_dense()[0].numpy(), ref.toarray(), ONE_EVAL_RTOL)


def test_pipelined_differences_are_the_one_call_values_bit_for_bit() -> None:
    """A numpy function of one point with torch threads > 1: the groups are evaluated one
    call each, in the groups' order, and each group's values gathered on a helper thread;
    the values are those of the all-groups path (one thread), bit for bit (the same
    operations per entry), and the residuals see the same points in the same order.
    A batch keeps the one call (its rows problem by problem)."""
    from torchimize_scipy import _sparsity as mod

    n = 60
    pattern = SparsityPattern.from_structure(tridiagonal(n))
    seen: list[np.ndarray] = []

    def rec(x: np.ndarray) -> np.ndarray:
        seen.append(x.copy())
        return broyden(x)

    fun = RowwiseFunction(rec, (), {}, Namespace("numpy", torch.device("cpu"), torch.float64))
    gen = torch.Generator().manual_seed(3)
    x = -1 + 0.1 * torch.randn(1, n, generator=gen, dtype=torch.float64)
    idx = torch.zeros(1, dtype=torch.long)
    f0 = fun(x, idx)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert mod._pipelined(fun, x, f0, x)
        assert not mod._pipelined(fun, x.expand(3, n), f0.expand(3, n), x.expand(3, n))
        seen.clear()
        J2 = grouped_difference(fun, x, f0, idx, pattern, "2-point")
        pts2 = list(seen)
        torch.set_num_threads(1)
        assert not mod._pipelined(fun, x, f0, x)
        seen.clear()
        J1 = grouped_difference(fun, x, f0, idx, pattern, "2-point")
    finally:
        torch.set_num_threads(old)
    assert len(pts2) == len(seen) == pattern.n_groups
    for a, c in zip(pts2, seen, strict=True):
        assert np.array_equal(a, c)
    assert torch.equal(J2.coalesce().indices(), J1.coalesce().indices())
    assert torch.equal(J2.coalesce().values(), J1.coalesce().values())
    ref = approx_derivative(broyden, x[0].numpy(), method="2-point", sparsity=tridiagonal(n))
    assert_close_scaled(J2.to_dense()[0].numpy(), ref.toarray(), ONE_EVAL_RTOL)


def test_pipelined_differences_check_the_shape_and_pass_errors() -> None:
    from torchimize_scipy import _sparsity as mod

    n = 30
    pattern = SparsityPattern.from_structure(tridiagonal(n))
    ns = Namespace("numpy", torch.device("cpu"), torch.float64)
    x = torch.full((1, n), -1.0, dtype=torch.float64)
    idx = torch.zeros(1, dtype=torch.long)
    f0 = torch.as_tensor(broyden(x[0].numpy())).reshape(1, n)
    calls = []

    def short(v: np.ndarray) -> np.ndarray:
        calls.append(1)
        return broyden(v) if len(calls) == 1 else broyden(v)[:-1]

    def failing(v: np.ndarray) -> np.ndarray:
        calls.append(1)
        if len(calls) > 2:
            raise FloatingPointError("fun failed")
        return broyden(v)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bad = RowwiseFunction(short, (), {}, ns)
        assert mod._pipelined(bad, x, f0, x)
        with pytest.raises(ValueError, match="`fun` returned shape"):
            grouped_difference(bad, x, f0, idx, pattern, "2-point")
        calls.clear()
        with pytest.raises(FloatingPointError, match="fun failed"):
            grouped_difference(RowwiseFunction(failing, (), {}, ns), x, f0, idx, pattern,
                               "2-point")
    finally:
        torch.set_num_threads(old)
