"""The lean large-scale path (issue 13): host CSR plans, lazy transposes, grouped
differences' gathers, and scipy's ``workers`` with ``jac_sparsity``."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize as so
import scipy.sparse as sp
import torch
from _parity import (
    ONE_EVAL_RTOL,
    assert_bitwise_equal,
    assert_close_scaled,
    assert_cost_close,
    assert_x_close,
)
from _torch_calls import recorded_torch_calls

from torchimize_scipy import least_squares
from torchimize_scipy._engine import csr as op
from torchimize_scipy._sparsity import SparsityPattern, grouped_difference


def _batch(rng, B=3, m=70, n=30, density=0.12):
    """A coalesced sparse COO ``(B, m, n)`` batch with a full diagonal."""
    idx, val = [], []
    for k in range(B):
        A = (sp.random(m, n, density=density, random_state=rng, format="csr")
             + 2.0 * sp.eye(m, n, format="csr")).tocoo()
        idx.append(np.stack([np.full(A.nnz, k), A.row, A.col]))
        val.append(A.data)
    return torch.sparse_coo_tensor(np.concatenate(idx, 1), np.concatenate(val), (B, m, n),
                                   check_invariants=True).coalesce()


def test_host_csr_plan_matches_the_device_construction() -> None:
    """The CPU plan is built in numpy; its arrays are those of the torch construction
    (the path of other devices), which the other tests check against their definition."""
    J = _batch(np.random.default_rng(1))
    idx, shape = J.indices(), tuple(J.shape)
    host = op.csr_plan(idx, shape)
    assert host._t is None  # A^T's arrays: made on first use only
    B, m, n = shape
    row = idx[0] * m + idx[1]
    col = idx[0] * n + idx[2]
    perm = torch.sort(col, stable=True).indices
    assert torch.equal(host.row, row) and torch.equal(host.col, col)
    assert torch.equal(host.crow[1:], torch.cumsum(torch.bincount(row, minlength=B * m), 0))
    assert torch.equal(host.perm_t, perm)
    assert torch.equal(host.col_t, row[perm])
    assert np.array_equal(host.host[0], host.crow.numpy())


def test_block_csr_rmatvec_without_the_transpose() -> None:
    """An unscaled Jacobian's one ``J^T u`` (the gradient) scatters along J's rows and
    builds no transposed copy; so do LSMR's products when J is one row block."""
    rng = np.random.default_rng(2)
    J = _batch(rng)
    u = torch.as_tensor(rng.standard_normal(J.shape[:2]))
    ref = torch.einsum("bmn,bm->bn", J.to_dense(), u)
    csr = op.BlockCSR(J)
    assert len(csr._a) == 1  # a small matrix: one row block
    assert_close_scaled(csr.rmatvec(u), ref, ONE_EVAL_RTOL)
    out = np.zeros((J.shape[0], J.shape[2]))
    csr.rmatvec_into(np.ascontiguousarray(u.numpy()), out)
    assert csr._plan._t is None  # no transposed arrays for either
    assert_close_scaled(out, ref, ONE_EVAL_RTOL)
    assert_bitwise_equal(torch.from_numpy(out), csr.rmatvec(u))


def test_transposed_blocks_cut_large_problems_only(monkeypatch) -> None:
    """The host's ``J^T u`` blocks: small problems whole (consecutive ones merged at
    problem boundaries), a large one cut into blocks of equal entry counts summed into
    partials, added in block order over that problem's columns only."""
    rng = np.random.default_rng(6)
    J = _batch(rng, B=4, m=200, n=90)
    B, m, n = J.shape
    counts = [int((J.indices()[0] == b).sum()) for b in range(B)]
    monkeypatch.setattr(op, "_BLOCK_NNZ", 10**9)
    monkeypatch.setattr(op, "SPLIT_NNZ", sorted(counts)[2])  # the two largest are cut
    monkeypatch.setattr(op, "_SPLIT_BLOCK_NNZ", 1)  # into _SPLIT_MAX blocks ...
    monkeypatch.setattr(op, "_SPLIT_MAX", 3)  # ... of three
    plan = op.csr_plan(J.indices(), (B, m, n)).transposed_blocks()
    cut = [c >= op.SPLIT_NNZ for c in counts]
    assert op.split_counts(counts, n).tolist() == [3 if c else 1 for c in cut]
    assert op.split_counts(counts, max(counts)).tolist() == [1] * B  # too few per column
    spans = {(b0, b1) for *_, b0, b1 in plan.blocks}
    for b in range(B):
        mine = [blk for blk in plan.blocks if blk[7] <= b < blk[8]]
        if cut[b]:  # three blocks of its own rows, parts 0, 1, 2, covering them in order
            assert [blk[6] for blk in mine] == [0, 1, 2] and (b, b + 1) in spans
            assert mine[0][4] == b * m and mine[-1][5] == (b + 1) * m
            assert all(x[5] == y[4] for x, y in zip(mine, mine[1:], strict=False))
            sizes = [blk[3] - blk[2] for blk in mine]
            assert max(sizes) - min(sizes) <= 2 * n  # equal entry counts, to a row
        else:  # one block, summed into w itself
            assert len(mine) == 1 and mine[0][6] == 0
    assert plan.parts == 2
    assert {(p, c0, c1) for p, c0, c1 in plan.adds} == {
        (p, b * n, (b + 1) * n) for p in (1, 2) for b in range(B) if cut[b]} or any(
        c1 - c0 > n for _, c0, c1 in plan.adds)  # (neighbours' spans merged)
    u = rng.standard_normal((B, m))
    ref = torch.einsum("bmn,bm->bn", J.to_dense(), torch.as_tensor(u))
    csr = op.BlockCSR(J)
    out = np.zeros((B, n))
    csr.rmatvec_into(u, out)
    assert_close_scaled(out, ref, ONE_EVAL_RTOL)


@pytest.mark.parametrize("threads", [1, 2])
def test_transposed_products_of_a_problem_do_not_depend_on_its_batch(monkeypatch,
                                                                     threads) -> None:
    """A problem's ``J^T u`` (cut or not) is the same bits alone, in a batch of
    problems of other sizes, and on one or two threads: its blocks are its own."""
    rng = np.random.default_rng(7)
    parts = [_batch(rng, B=1, m=m, n=40, density=0.2) for m in (60, 300, 90)]
    monkeypatch.setattr(op, "_BLOCK_NNZ", 200)  # the small ones merged per ~200 entries
    monkeypatch.setattr(op, "SPLIT_NNZ", 1000)  # the middle one cut
    monkeypatch.setattr(op, "_SPLIT_BLOCK_NNZ", 700)
    us = [rng.standard_normal((1, p.shape[1])) for p in parts]
    alone = [op.BlockCSR(p).rmatvec(torch.as_tensor(u)) for p, u in zip(parts, us, strict=True)]
    m = max(p.shape[1] for p in parts)
    idx, val, u_pad = [], [], np.zeros((3, m))
    for b, (p, u) in enumerate(zip(parts, us, strict=True)):  # padded to m rows of zeros
        i = p.indices().clone()
        i[0] = b
        idx.append(i)
        val.append(p.values())
        u_pad[b, :p.shape[1]] = u[0]
    batch = torch.sparse_coo_tensor(torch.cat(idx, 1), torch.cat(val), (3, m, 40),
                                    check_invariants=True).coalesce()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        csr = op.BlockCSR(batch)
        assert op.split_counts([p._nnz() for p in parts], 40).tolist()[1] > 1
        got = csr.rmatvec(torch.as_tensor(u_pad))
    finally:
        torch.set_num_threads(old)
    for b in range(3):
        assert_bitwise_equal(got[b], alone[b][0])


def test_block_csr_scaled_values_and_products() -> None:
    rng = np.random.default_rng(3)
    J = _batch(rng)
    B, m, n = J.shape
    d = torch.as_tensor(rng.uniform(0.5, 2.0, (B, n)))
    w = torch.as_tensor(rng.uniform(0.5, 2.0, (B, m)))
    scaled = op.BlockCSR(J).scaled(w, d)
    dense = w.unsqueeze(-1) * J.to_dense() * d.unsqueeze(-2)
    p = torch.as_tensor(rng.standard_normal((B, n)))
    u = torch.as_tensor(rng.standard_normal((B, m)))
    assert_close_scaled(scaled.matvec(p), torch.einsum("bmn,bn->bm", dense, p), ONE_EVAL_RTOL)
    assert_close_scaled(scaled.rmatvec(u), torch.einsum("bmn,bm->bn", dense, u), ONE_EVAL_RTOL)


def _broyden(x):
    f = (3 - x) * x + 1
    f[1:] -= x[:-1]
    f[:-1] -= 2 * x[1:]
    return f


def _tridiagonal(n):
    return sp.diags_array([np.ones(n - 1), np.ones(n), np.ones(n - 1)], offsets=[-1, 0, 1],
                          format="csr")


def test_grouped_difference_of_a_batch_gathers_each_problem() -> None:
    """The host's flat-index gather with several problems: each problem's differences
    are those of its own evaluation (a batch alone and one by one agree)."""
    n, B = 30, 3
    pattern = SparsityPattern.from_structure(_tridiagonal(n))
    x = torch.as_tensor(np.random.default_rng(4).uniform(-1.5, -0.5, (B, n)))

    def fun(X, idx):
        return torch.stack([torch.as_tensor(_broyden(r.numpy().copy())) for r in X])

    idx = torch.arange(B)
    J = grouped_difference(fun, x, fun(x, idx), idx, pattern, "2-point").to_dense()
    for b in range(B):
        Jb = grouped_difference(fun, x[b:b + 1], fun(x[b:b + 1], idx[:1]), idx[:1], pattern,
                                "2-point").to_dense()[0]
        assert_bitwise_equal(J[b], Jb)  # the same points and operations: the same path
        exact = (np.diag(3 - 2 * x[b].numpy()) - np.eye(n, k=-1) - 2 * np.eye(n, k=1))
        assert np.max(np.abs(Jb.numpy() - exact)) < 1e-6


def test_workers_evaluate_the_column_groups() -> None:
    """scipy's map-like ``workers`` receives the perturbed points of the column groups
    (one map call per Jacobian, as scipy's sparse differences do), and the result is
    the serial one's."""
    n = 200
    x0 = -np.ones(n)
    S = _tridiagonal(n)
    maps: list[int] = []

    def workers(f, items):
        items = list(items)
        maps.append(len(items))
        return [f(i) for i in items]

    serial = least_squares(_broyden, x0, jac_sparsity=S, method="trf")
    got = least_squares(_broyden, x0, jac_sparsity=S, method="trf", workers=workers)
    ref = so.least_squares(_broyden, x0, jac_sparsity=S, method="trf", workers=workers)
    groups = SparsityPattern.from_structure(S).n_groups
    assert groups in maps  # the groups of one Jacobian in one map call
    assert got.nfev == serial.nfev and got.njev == serial.njev
    assert_x_close(got.x, serial.x)  # the same evaluations, whoever runs them
    assert_cost_close(got.cost, ref.cost, scale=1.0)
    with pytest.raises(ValueError, match="workers"):
        least_squares(_broyden, x0, jac_sparsity=S, workers=0)


def test_jac_sparsity_with_stored_zeros_is_not_modified() -> None:
    """Regression: the pattern of a sparse ``jac_sparsity`` storing zeros was made by
    eliminating them in place in index arrays shared with the caller's matrix."""
    rng = np.random.default_rng(5)
    A = sp.random_array((20, 15), density=0.3, random_state=rng, format="csr")
    A.data[::3] = 0
    indptr, indices, data = A.indptr.copy(), A.indices.copy(), A.data.copy()
    pattern = SparsityPattern.from_structure(A)
    assert np.array_equal(A.indptr, indptr) and np.array_equal(A.indices, indices)
    assert np.array_equal(A.data, data)
    assert pattern.rows.size == np.count_nonzero(data)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_host_column_norms_run_in_numpy_for_float64(dtype) -> None:
    """x_scale='jac' on the host (float64): the squared column norms of a sparse
    Jacobian by numpy's bincount, with no torch operation over the entries (each would
    open a parallel region); float32 keeps torch's sums in float32."""
    from torchimize_scipy._engine.operator import JacobianOperator

    rng = np.random.default_rng(8)
    J = _batch(rng, m=200, n=90).to(dtype)
    w = torch.as_tensor(rng.uniform(0.5, 2.0, J.shape[:2]), dtype=dtype)
    d = torch.as_tensor(rng.uniform(0.5, 2.0, (J.shape[0], J.shape[2])), dtype=dtype)
    op_ = JacobianOperator(J).scale_rows(w).scale_columns(d)
    with recorded_torch_calls() as names:
        sq = op_.column_sq_norms()
    ref = ((w.unsqueeze(-1) * J.to_dense() * d.unsqueeze(-2)) ** 2).sum(-2)
    assert sq.dtype == dtype
    assert_close_scaled(sq, ref, ONE_EVAL_RTOL if dtype == torch.float64 else 1e-5)
    assert ("index_add" in names) is (dtype == torch.float32)


def test_host_groups_are_each_groups_nonzeros_in_order() -> None:
    """Per group: its columns in increasing order, the positions of its nonzeros in
    increasing order and their rows and columns (views of one gather each)."""
    rng = np.random.default_rng(9)
    A = sp.random_array((80, 50), density=0.1, random_state=rng, format="csr")
    A = (A + sp.eye_array(80, 50, format="csr")).tocsr()
    pattern = SparsityPattern.from_structure(A)
    parts = pattern.host_groups()
    assert len(parts) == pattern.n_groups
    seen = []
    for k, (columns, pos, rows, cols) in enumerate(parts):
        assert np.array_equal(columns, np.flatnonzero(pattern.groups == k))
        expected = np.flatnonzero(pattern.groups[pattern.cols] == k)
        assert np.array_equal(pos, expected)
        assert np.array_equal(rows, pattern.rows[expected])
        assert np.array_equal(cols, pattern.cols[expected])
        assert pos.dtype == rows.dtype == cols.dtype == columns.dtype == np.intp
        seen.append(pos)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(pattern.rows.size))


def test_pipelined_differences_hand_fun_a_fresh_point_each_call() -> None:
    """The pipelined '2-point' differences reuse one buffer for the groups' points; a
    numpy ``fun`` still gets a fresh array per call: one that keeps its inputs and
    writes into them sees every group's own point (x with that group's columns
    stepped), and the Jacobian stays scipy's."""
    from torchimize_scipy import _sparsity as mod
    from torchimize_scipy._arrays import Namespace
    from torchimize_scipy._user_functions import RowwiseFunction

    n = 40
    pattern = SparsityPattern.from_structure(_tridiagonal(n))
    kept: list[tuple[np.ndarray, np.ndarray]] = []

    def greedy(x: np.ndarray) -> np.ndarray:
        f = _broyden(x)
        kept.append((x, x.copy()))  # the array kept ...
        x[:] = 1e300  # ... and written to
        return f

    fun = RowwiseFunction(greedy, (), {}, Namespace("numpy", torch.device("cpu"), torch.float64))
    x = torch.linspace(-1.2, -0.8, n, dtype=torch.float64).reshape(1, n)
    idx = torch.zeros(1, dtype=torch.long)
    f0 = fun(x, idx)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert mod._pipelined(fun, x, f0, x)
        kept.clear()
        J = grouped_difference(fun, x, f0, idx, pattern, "2-point")
    finally:
        torch.set_num_threads(old)
    assert len(kept) == pattern.n_groups
    assert len({id(a) for a, _ in kept}) == pattern.n_groups
    x0 = x[0].numpy()
    for (_, point), (columns, *_) in zip(kept, pattern.host_groups(), strict=True):
        assert np.array_equal(np.flatnonzero(point != x0), columns)
    ref = so._numdiff.approx_derivative(_broyden, x0, method="2-point", sparsity=_tridiagonal(n))
    assert_close_scaled(J.to_dense()[0].numpy(), ref.toarray(), ONE_EVAL_RTOL)


def _broyden_at_start(n: int) -> tuple:
    """Broyden's tridiagonal problem of size ``n`` as the pipelined differences see it:
    a fresh pattern, the numpy ``fun`` as the engine calls it, ``x0 (1, n)``, the
    problem index and the residuals at ``x0``."""
    from torchimize_scipy._arrays import Namespace
    from torchimize_scipy._user_functions import RowwiseFunction

    pattern = SparsityPattern.from_structure(_tridiagonal(n))
    fun = RowwiseFunction(_broyden, (), {}, Namespace("numpy", torch.device("cpu"),
                                                      torch.float64))
    x = torch.linspace(-1.2, -0.8, n, dtype=torch.float64).reshape(1, n)
    idx = torch.zeros(1, dtype=torch.long)
    return pattern, fun, x, idx, fun(x, idx)


@pytest.mark.parametrize("block_nnz", [40, 10**9])
def test_pipelined_differences_build_the_indices_on_a_helper(monkeypatch, block_nnz) -> None:
    """The first pipelined Jacobian of a pattern gets its groups' nonzeros, COO indices
    and CSR plan from a helper thread (made while ``fun`` runs): the same integers as
    the caller makes (``host_groups`` and ``sparse`` of a fresh pattern), the plan
    registered for the engine, with its transposed blocks made ahead (and no
    transposed CSR arrays: the host does not use them)."""
    from torchimize_scipy import _sparsity as mod

    monkeypatch.setattr(op, "_BLOCK_NNZ", block_nnz)
    n = 60
    pattern, fun, x, idx, f0 = _broyden_at_start(n)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert mod._pipelined(fun, x, f0, x)
        assert ("coo", "cpu", 1) not in pattern._on
        J = grouped_difference(fun, x, f0, idx, pattern, "2-point")
        indices, plan = pattern._on[("coo", "cpu", 1)]
        assert mod._HostGroups(pattern, 1)._job is None  # known now: nothing started
    finally:
        torch.set_num_threads(old)
    assert J.indices().data_ptr() == indices.data_ptr()
    assert op._find_plan(indices, (1, n, n)) is plan
    assert plan._tb is not None and plan._t is None  # the host's blocks, no transposed CSR
    fresh = SparsityPattern.from_structure(_tridiagonal(n))
    ref = fresh.sparse(torch.zeros(1, fresh.rows.size, dtype=torch.float64))
    assert torch.equal(indices, ref.indices())
    ref_plan = op._find_plan(ref.indices(), (1, n, n))
    for name in ("row", "col", "crow"):
        assert torch.equal(getattr(plan, name), getattr(ref_plan, name))
    assert all(np.array_equal(a, b) for a, b in zip(plan.host, ref_plan.host, strict=True))
    for part, ref_part in zip(pattern.host_groups(), fresh.host_groups(), strict=True):
        assert all(np.array_equal(a, b) and a.dtype == b.dtype
                   for a, b in zip(part, ref_part, strict=True))
    ours, theirs = plan.transposed_blocks(), ref_plan.transposed_blocks()
    assert ours.adds == theirs.adds and ours.parts == theirs.parts
    assert len(ours.blocks) == len(theirs.blocks) == 1  # one problem, not cut
    for a, b in zip(ours.blocks, theirs.blocks, strict=True):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2:] == b[2:]


def test_pipelined_differences_finish_on_the_caller_when_the_helper_is_busy() -> None:
    """A helper that gets no core leaves the groups' nonzeros, the indices and every
    gather to the caller: the first Jacobian is still complete, the same values as a
    second one made with the helper free (both from the same calls of ``fun``)."""
    import threading

    n = 50
    pattern, fun, x, idx, f0 = _broyden_at_start(n)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    release, busy, returned = threading.Event(), threading.Event(), threading.Event()
    blocker = op._helpers(1)[0]

    def block() -> None:  # a helper without a core: busy until released
        busy.set()
        release.wait(10)
        returned.set()
    try:
        blocker.queue.put(block)
        assert busy.wait(30)
        try:
            J1 = grouped_difference(fun, x, f0, idx, pattern, "2-point")
            assert not returned.is_set()  # done without the helper
        finally:
            release.set()
        assert returned.wait(30)
        assert ("host groups",) in pattern._on and ("coo", "cpu", 1) in pattern._on
        J2 = grouped_difference(fun, x, f0, idx, pattern, "2-point")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(J1.indices(), J2.indices())
    assert_bitwise_equal(J1.values(), J2.values())  # (same path, same calls of fun)
    ref = so._numdiff.approx_derivative(_broyden, x[0].numpy(), method="2-point",
                                        sparsity=_tridiagonal(n))
    assert_close_scaled(J1.to_dense()[0].numpy(), ref.toarray(), ONE_EVAL_RTOL)
