"""Batched LSMR (``_engine/lsmr.py``) and the Jacobian wrapper (``_engine/operator.py``).

Every system is also solved by ``scipy.sparse.linalg.lsmr`` one problem at a
time: the stopping reason must agree and the iteration count be within one,
and the solutions agree to the accuracy LSMR was asked for (``atol``, ``btol``
relative to the solution's size): the two implementations round differently,
and a Krylov method amplifies that in proportion to the conditioning.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from _parity import ONE_EVAL_RTOL, assert_bitwise_equal
from scipy.sparse.linalg import lsmr as scipy_lsmr

from torchimize_scipy._engine.lsmr import BREAKDOWN, lsmr, sym_ortho
from torchimize_scipy._engine.operator import (
    JacobianOperator,
    StackedOperator,
    as_operator,
    jacobian_kind,
)

M, N = 60, 25


def _matrix(rng, cond, m=M, n=N):
    """Singular values clustered in [1, 2] but for three spread down to ``1/cond``.

    LSMR then converges well before ``n`` iterations (Krylov methods resolve a
    cluster and a few outliers quickly), so that its stopping tests, not the
    iteration limit, decide.
    """
    U, _ = np.linalg.qr(rng.standard_normal((m, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = rng.uniform(1.0, 2.0, n)
    s[:3] = np.geomspace(1.0, 1.0 / cond, 3)
    return U @ np.diag(s) @ V.T


def _sparse_batch(rng, B, m=M, n=N, density=0.15):
    """B sparse matrices with a full diagonal (full column rank)."""
    mats = []
    for _ in range(B):
        A = sp.random(m, n, density=density, random_state=rng, format="csr")
        A = A + sp.eye(m, n, format="csr") * 2.0
        mats.append(A.tocsr())
    return mats


def _to_coo(mats):
    """A batch of scipy matrices as one torch sparse COO tensor ``(B, m, n)``."""
    idx, val = [], []
    for k, A in enumerate(mats):
        C = A.tocoo()
        idx.append(np.stack([np.full(C.nnz, k), C.row, C.col]))
        val.append(C.data)
    B = len(mats)
    m, n = mats[0].shape
    return torch.sparse_coo_tensor(np.concatenate(idx, 1), np.concatenate(val),
                                   (B, m, n), check_invariants=True).coalesce()


class _Operator:
    """A torch linear operator over dense matrices (the engine's operator contract)."""

    def __init__(self, A):
        self.A = A
        self.shape = tuple(A.shape)
        self.dtype = A.dtype
        self.device = A.device
        self.calls = 0

    def matvec(self, p):
        self.calls += 1
        return torch.bmm(self.A, p.unsqueeze(-1)).squeeze(-1)

    def rmatvec(self, u):
        self.calls += 1
        return torch.bmm(u.unsqueeze(-2), self.A).squeeze(-2)


def _check_against_scipy(res, mats, b, damp=0.0, atol=1e-6, btol=1e-6, **kw):
    """Compare each problem of ``res`` with scipy's lsmr on the same system."""
    damps = np.broadcast_to(np.asarray(damp, dtype=float), (len(mats),))
    for k, A in enumerate(mats):
        ref = scipy_lsmr(A, b[k], damp=damps[k], atol=atol, btol=btol, **kw)
        x = res.x[k].numpy()
        assert int(res.istop[k]) == ref[1], (k, int(res.istop[k]), ref[1])
        assert abs(int(res.itn[k]) - ref[2]) <= 1, (k, int(res.itn[k]), ref[2])
        # the solution is known to about atol/btol relative to its size
        tol = 10 * max(atol, btol, 1e-12) * (np.linalg.norm(ref[0]) + 1)
        np.testing.assert_allclose(x, ref[0], rtol=0, atol=tol)
        np.testing.assert_allclose(float(res.normr[k]), ref[3], rtol=1e-6, atol=tol)


def test_sym_ortho_cases():
    a = torch.tensor([3.0, 0.0, 0.0, -4.0, 1.0, -2.0, 0.0], dtype=torch.float64)
    b = torch.tensor([4.0, 5.0, 0.0, 0.0, -7.0, 1e-3, -2.0], dtype=torch.float64)
    c, s, r = sym_ortho(a, b)
    # [c s; -s c] [a; b] = [r; 0], r = |(a, b)| (r = 0 only for a = b = 0)
    np.testing.assert_allclose(c * a + s * b, r, rtol=1e-15, atol=1e-300)
    np.testing.assert_allclose(-s * a + c * b, 0.0, atol=1e-15)
    np.testing.assert_allclose(r, torch.hypot(a, b), rtol=1e-15)
    assert r.ge(0).all()
    assert (c[2], s[2], r[2]) == (0.0, 0.0, 0.0)
    assert (c[1], s[1]) == (0.0, 1.0) and (c[3], s[3]) == (-1.0, 0.0)
    assert (c[6], s[6]) == (0.0, -1.0)


@pytest.mark.parametrize("damp", [0.0, 0.3])
def test_dense_batch_matches_scipy(damp):
    rng = np.random.default_rng(1)
    mats = [_matrix(rng, c) for c in (2.0, 10.0, 200.0, 1e3)]
    b = rng.standard_normal((4, M))
    res = lsmr(torch.as_tensor(np.stack(mats)), torch.as_tensor(b), damp=damp)
    _check_against_scipy(res, mats, b, damp=damp)
    # the conditioning sets different iteration counts within one batch
    assert len(set(res.itn.tolist())) > 1


def test_compatible_system_stops_by_btol():
    """Consistent systems stop with istop 1 (|r| small), inconsistent ones with 2."""
    rng = np.random.default_rng(2)
    mats = [_matrix(rng, 10.0) for _ in range(3)]
    xs = rng.standard_normal((3, N))
    b = np.stack([mats[k] @ xs[k] for k in range(3)])
    b[2] += rng.standard_normal(M)  # inconsistent
    res = lsmr(torch.as_tensor(np.stack(mats)), torch.as_tensor(b), atol=1e-8, btol=1e-8)
    assert res.istop.tolist()[:2] == [1, 1] and int(res.istop[2]) == 2
    _check_against_scipy(res, mats, b, atol=1e-8, btol=1e-8)
    np.testing.assert_allclose(res.x[:2].numpy(), xs[:2], atol=1e-6)


def test_per_problem_damp_matches_scipy():
    rng = np.random.default_rng(3)
    mats = [_matrix(rng, 1e3) for _ in range(3)]
    b = rng.standard_normal((3, M))
    damp = np.array([0.0, 1e-2, 1.0])
    res = lsmr(torch.as_tensor(np.stack(mats)), torch.as_tensor(b), damp=torch.as_tensor(damp))
    _check_against_scipy(res, mats, b, damp=damp)


def test_sparse_batch_matches_scipy():
    rng = np.random.default_rng(4)
    mats = _sparse_batch(rng, 3)
    b = rng.standard_normal((3, M))
    J = _to_coo(mats)
    res = lsmr(J, torch.as_tensor(b), damp=0.1)
    _check_against_scipy(res, mats, b, damp=0.1)
    # the same systems given densely: the same answer to LSMR's accuracy
    dense = lsmr(J.to_dense(), torch.as_tensor(b), damp=0.1)
    np.testing.assert_allclose(res.x.numpy(), dense.x.numpy(), atol=1e-6)


def test_operator_matches_scipy_and_limits_products():
    rng = np.random.default_rng(5)
    mats = [_matrix(rng, 1e3) for _ in range(2)]
    b = rng.standard_normal((2, M))
    op = _Operator(torch.as_tensor(np.stack(mats)))
    res = lsmr(op, torch.as_tensor(b), maxiter=7)
    _check_against_scipy(res, mats, b, maxiter=7)
    assert res.istop.tolist() == [7, 7] and res.itn.tolist() == [7, 7]
    # one rmatvec to start, then one matvec and one rmatvec per iteration
    assert op.calls == 1 + 2 * 7


@pytest.mark.parametrize("conlim", [10.0, 1e3])
def test_conlim_stop_matches_scipy(conlim):
    rng = np.random.default_rng(6)
    mats = [_matrix(rng, c) for c in (1e4, 1e6)]
    b = rng.standard_normal((2, M))
    res = lsmr(torch.as_tensor(np.stack(mats)), torch.as_tensor(b), conlim=conlim, atol=1e-10,
               btol=1e-10)
    assert res.istop.tolist() == [3, 3]
    _check_against_scipy(res, mats, b, conlim=conlim, atol=1e-10, btol=1e-10)


def test_start_point_and_exact_starts():
    rng = np.random.default_rng(7)
    mats = [_matrix(rng, 10.0) for _ in range(3)]
    b = rng.standard_normal((3, M))
    b[1] = 0.0  # b = 0: x = 0 exactly, istop 0, no iteration
    x0 = rng.standard_normal((3, N))
    x_ls = np.linalg.lstsq(mats[2], b[2], rcond=None)[0]
    x0[2] = x_ls  # A^T (b - A x0) = 0 up to rounding
    res = lsmr(torch.as_tensor(np.stack(mats)), torch.as_tensor(b), x0=torch.as_tensor(x0))
    ref0 = scipy_lsmr(mats[0], b[0], x0=x0[0])
    np.testing.assert_allclose(res.x[0].numpy(), ref0[0], atol=1e-5)
    assert int(res.istop[0]) == ref0[1] and abs(int(res.itn[0]) - ref0[2]) <= 1
    assert int(res.istop[1]) == 0 and int(res.itn[1]) == 0
    assert res.x[1].abs().max() == 0
    np.testing.assert_allclose(res.x[2].numpy(), x_ls, atol=1e-10)
    assert int(res.itn[2]) <= 1


def test_maxiter_zero_is_scipys():
    rng = np.random.default_rng(8)
    A = _matrix(rng, 10.0)
    b = rng.standard_normal(M)
    res = lsmr(torch.as_tensor(A[None]), torch.as_tensor(b[None]), maxiter=0)
    ref = scipy_lsmr(A, b, maxiter=0)
    assert (int(res.istop[0]), int(res.itn[0])) == (ref[1], ref[2]) == (0, 0)
    assert res.x.abs().max() == 0


def test_breakdown_fails_alone_and_neighbours_unchanged():
    rng = np.random.default_rng(9)
    A = np.stack([_matrix(rng, 100.0) for _ in range(3)])
    b = rng.standard_normal((3, M))
    clean = lsmr(torch.as_tensor(A), torch.as_tensor(b))
    A_bad = A.copy()
    A_bad[1, 4, 7] = np.nan
    res = lsmr(torch.as_tensor(A_bad), torch.as_tensor(b))
    assert int(res.istop[1]) == BREAKDOWN
    assert torch.isfinite(res.x[1]).all()
    for k in (0, 2):  # same path for the neighbours: identical to the last bit
        assert_bitwise_equal(res.x[k], clean.x[k])
        assert int(res.istop[k]) == int(clean.istop[k])
        assert int(res.itn[k]) == int(clean.itn[k])


def test_check_every_does_not_change_results():
    # the scalars beside the vectors (the GPU's path, here on the CPU): the "all
    # stopped?" check every check_every iterations; stopped problems are frozen between
    rng = np.random.default_rng(10)
    A = torch.as_tensor(np.stack([_matrix(rng, c) for c in (2.0, 1e4)]))
    b = torch.as_tensor(rng.standard_normal((2, M)))
    one = lsmr(A, b, check_every=1, host_scalars=False)
    many = lsmr(A, b, check_every=7, host_scalars=False)
    assert_bitwise_equal(one.x, many.x)
    assert one.itn.tolist() == many.itn.tolist()
    assert len(set(one.itn.tolist())) == 2  # one problem was frozen while the other ran


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_host_and_device_scalars_both_match_scipy(kind):
    """numpy scalars on the host (CPU default) and torch scalars (GPU default): one recurrence."""
    rng = np.random.default_rng(14)
    if kind == "dense":
        mats = [_matrix(rng, c) for c in (2.0, 50.0, 1e3)]
        A = torch.as_tensor(np.stack(mats))
    else:
        mats = _sparse_batch(rng, 3)
        A = _to_coo(mats)
    b = rng.standard_normal((3, M))
    damp = np.array([0.0, 0.1, 1.0])
    results = [lsmr(A, torch.as_tensor(b), damp=torch.as_tensor(damp), host_scalars=host)
               for host in (True, False)]
    for res in results:
        _check_against_scipy(res, mats, b, damp=damp)
    # the two differ only by rounding (numpy's and torch's hypot), far below LSMR's accuracy
    np.testing.assert_allclose(results[0].x.numpy(), results[1].x.numpy(), rtol=0, atol=1e-9)


def test_host_scalars_need_the_vectors_on_the_cpu():
    A = torch.eye(3, dtype=torch.float64)[None]
    b = torch.ones(1, 3, dtype=torch.float64)
    assert lsmr(A, b, host_scalars=True).istop.tolist() == [1]
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="host scalars need the vectors on the CPU"):
            lsmr(A.cuda(), b.cuda(), host_scalars=True)


def test_sym_ortho_on_numpy_arrays_is_the_torch_rotation():
    a = np.array([3.0, 0.0, 0.0, -4.0, 1e-300, 1e300])
    b = np.array([4.0, 5.0, 0.0, 0.0, 1e-300, -1e300])
    c, s, r = sym_ortho(a, b)
    ct, st, rt = sym_ortho(torch.as_tensor(a), torch.as_tensor(b))
    np.testing.assert_allclose(r, rt.numpy(), rtol=1e-15)
    np.testing.assert_allclose(c, ct.numpy(), rtol=1e-15)
    np.testing.assert_allclose(s, st.numpy(), rtol=1e-15)
    assert np.isfinite(r).all() and np.isfinite(c).all()  # no overflow, no underflow to 0/0


def test_float32():
    rng = np.random.default_rng(11)
    mats = [_matrix(rng, 10.0) for _ in range(2)]
    b = rng.standard_normal((2, M))
    res = lsmr(torch.as_tensor(np.stack(mats), dtype=torch.float32),
               torch.as_tensor(b, dtype=torch.float32), atol=1e-5, btol=1e-5)
    assert res.x.dtype == torch.float32
    x_ls = np.stack([np.linalg.lstsq(mats[k], b[k], rcond=None)[0] for k in range(2)])
    np.testing.assert_allclose(res.x.numpy(), x_ls, atol=1e-3)
    assert set(res.istop.tolist()) <= {1, 2, 4, 5}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(12)
    A = torch.as_tensor(np.stack([_matrix(rng, c) for c in (2.0, 1e3)]))
    b = torch.as_tensor(rng.standard_normal((2, M)))
    cpu = lsmr(A, b)
    gpu = lsmr(A.cuda(), b.cuda())
    np.testing.assert_allclose(gpu.x.cpu().numpy(), cpu.x.numpy(), atol=1e-6)
    assert (gpu.itn.cpu() - cpu.itn).abs().max() <= 1


# ---- the Jacobian wrapper ---------------------------------------------------------------

def _three_kinds(rng):
    mats = _sparse_batch(rng, 2, m=9, n=5, density=0.4)
    coo = _to_coo(mats)
    dense = coo.to_dense()
    return dense, {"dense": dense, "sparse": coo, "operator": _Operator(dense)}


@pytest.mark.parametrize("kind", ["dense", "sparse", "operator"])
def test_operator_products_and_scalings(kind):
    rng = np.random.default_rng(13)
    dense, kinds = _three_kinds(rng)
    w = torch.as_tensor(rng.uniform(0.5, 2.0, (2, 9)))
    d = torch.as_tensor(rng.uniform(0.5, 2.0, (2, 5)))
    op = JacobianOperator(kinds[kind]).scale_rows(w).scale_columns(d)
    assert op.kind == kind == jacobian_kind(kinds[kind])
    ref = w.unsqueeze(-1) * dense * d.unsqueeze(-2)
    p = torch.as_tensor(rng.standard_normal((2, 5)))
    u = torch.as_tensor(rng.standard_normal((2, 9)))
    rtol = ONE_EVAL_RTOL
    np.testing.assert_allclose(op.matvec(p), torch.bmm(ref, p.unsqueeze(-1)).squeeze(-1),
                               rtol=rtol)
    np.testing.assert_allclose(op.rmatvec(u), torch.bmm(u.unsqueeze(-2), ref).squeeze(-2),
                               rtol=rtol)
    np.testing.assert_allclose(op.to_dense(), ref, rtol=rtol)
    P = torch.as_tensor(rng.standard_normal((2, 5, 3)))
    np.testing.assert_allclose(op.matmat(P), torch.bmm(ref, P), rtol=rtol)
    if kind == "operator":
        assert not op.has_column_norms
        with pytest.raises(ValueError, match="column norms"):
            op.column_sq_norms()
    else:
        np.testing.assert_allclose(op.column_sq_norms(), (ref * ref).sum(-2), rtol=rtol)


def test_operator_column_norms_from_the_operator():
    rng = np.random.default_rng(14)
    dense, kinds = _three_kinds(rng)
    base = kinds["operator"]
    base.column_norms = lambda: torch.linalg.vector_norm(dense, dim=-2)
    d = torch.as_tensor(rng.uniform(0.5, 2.0, (2, 5)))
    op = as_operator(base).scale_columns(d)
    assert op.has_column_norms
    np.testing.assert_allclose(op.column_sq_norms(), ((dense * d.unsqueeze(-2)) ** 2).sum(-2),
                               rtol=ONE_EVAL_RTOL)
    # rows scaled (a robust loss): the norms of the scaled columns are unknown
    with pytest.raises(ValueError, match="column norms"):
        op.scale_rows(torch.ones(2, 9, dtype=dense.dtype)).column_sq_norms()


def test_stacked_operator():
    rng = np.random.default_rng(15)
    dense, kinds = _three_kinds(rng)
    c = torch.as_tensor(rng.uniform(0.1, 1.0, (2, 5)))
    op = StackedOperator(as_operator(kinds["sparse"]), c)
    full = torch.cat([dense, torch.diag_embed(c)], dim=1)
    assert op.shape == (2, 14, 5)
    p = torch.as_tensor(rng.standard_normal((2, 5)))
    u = torch.as_tensor(rng.standard_normal((2, 14)))
    np.testing.assert_allclose(op.matvec(p), torch.bmm(full, p.unsqueeze(-1)).squeeze(-1),
                               rtol=ONE_EVAL_RTOL)
    np.testing.assert_allclose(op.rmatvec(u), torch.bmm(u.unsqueeze(-2), full).squeeze(-2),
                               rtol=ONE_EVAL_RTOL)


def test_jacobian_kind_refuses_other_objects():
    with pytest.raises(TypeError, match="engine Jacobian"):
        jacobian_kind(np.ones((1, 2, 2)))


@pytest.mark.parametrize("kind", ["dense", "sparse", "operator"])
def test_operator_rows_select_merge_and_concatenate(kind):
    """What the loop does to a batch's Jacobian: compaction, scatter of new rows, refill."""
    rng = np.random.default_rng(16)
    c1 = _to_coo(_sparse_batch(rng, 3, 9, 5, 0.4))
    c2 = _to_coo(_sparse_batch(rng, 2, 9, 5, 0.4))

    def make(c):
        return {"dense": c.to_dense(), "sparse": c, "operator": _Operator(c.to_dense())}[kind]

    w = torch.as_tensor(rng.uniform(0.5, 2.0, (3, 9)))
    A = JacobianOperator(make(c1)).scale_rows(w)
    ref = w.unsqueeze(-1) * c1.to_dense()
    both = A.cat_rows(JacobianOperator(make(c2)))
    ref = torch.cat([ref, c2.to_dense()])
    assert both.shape == (5, 9, 5) and both.kind == kind
    np.testing.assert_allclose(both.to_dense(), ref, rtol=ONE_EVAL_RTOL)
    rows = torch.tensor([4, 0])
    merged = both.index_copy(0, rows, JacobianOperator(make(c1)).index_select(0, torch.tensor(
        [1, 2])))
    ref = ref.index_copy(0, rows, c1.to_dense()[[1, 2]])
    np.testing.assert_allclose(merged.to_dense(), ref, rtol=ONE_EVAL_RTOL)
    keep = torch.tensor([0, 3, 4])
    np.testing.assert_allclose(merged.index_select(0, keep).to_dense(), ref[keep],
                               rtol=ONE_EVAL_RTOL)
    with pytest.raises(ValueError, match="changed kind"):
        other = "sparse" if kind != "sparse" else "dense"
        merged.index_copy(0, rows, JacobianOperator(
            {"dense": c1.to_dense(), "sparse": c1}[other]).index_select(0, torch.tensor([0, 1])))


def test_block_csr_plan_is_found_again_and_released():
    import gc

    from torchimize_scipy._engine import csr as op

    rng = np.random.default_rng(15)
    mats = _sparse_batch(rng, 2, m=30, n=12)
    J = _to_coo(mats)
    idx = J.indices()
    plan = op.csr_plan(idx, tuple(J.shape), register=True)
    # a Jacobian built on the same index tensor finds the plan (no sort)
    J2 = torch.sparse_coo_tensor(idx, 2 * J.values(), J.shape, is_coalesced=True,
                                 check_invariants=False)
    assert op.BlockCSR(J2)._plan is plan
    # equal indices in other memory: a plan of their own, with the same arrays
    other = op.BlockCSR(_to_coo(mats))
    assert other._plan is not plan and torch.equal(other._plan.perm_t, plan.perm_t)
    key = op._address(idx, tuple(J.shape))
    assert key in op._PLANS
    del plan, J2
    gc.collect()
    assert key not in op._PLANS  # the registry holds nothing its owner let go


@pytest.mark.parametrize("threads", [1, 2])
def test_block_csr_products_in_row_blocks(monkeypatch, threads):
    """Products cut into row blocks (one per thread): each row's sum is the same loop."""
    from torchimize_scipy._engine import csr as op

    rng = np.random.default_rng(16)
    mats = _sparse_batch(rng, 3, m=200, n=90)
    J = _to_coo(mats)
    dense = J.to_dense()
    p = torch.as_tensor(rng.standard_normal((3, 90)))
    u = torch.as_tensor(rng.standard_normal((3, 200)))
    whole = op.BlockCSR(J)
    assert len(whole._a) == 1
    monkeypatch.setattr(op, "_BLOCK_NNZ", 100)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cut = op.BlockCSR(J)
        assert len(cut._a) == (1 if threads == 1 else 2 * threads)
        assert_bitwise_equal(cut.matvec(p), whole.matvec(p))
        assert_bitwise_equal(cut.rmatvec(u), whole.rmatvec(u))
    finally:
        torch.set_num_threads(old)
    ref_mv = torch.bmm(dense, p.unsqueeze(-1)).squeeze(-1)
    ref_rmv = torch.bmm(u.unsqueeze(-2), dense).squeeze(-2)
    np.testing.assert_allclose(whole.matvec(p).numpy(), ref_mv.numpy(), rtol=ONE_EVAL_RTOL,
                               atol=ONE_EVAL_RTOL * float(ref_mv.abs().max()))
    np.testing.assert_allclose(whole.rmatvec(u).numpy(), ref_rmv.numpy(), rtol=ONE_EVAL_RTOL,
                               atol=ONE_EVAL_RTOL * float(ref_rmv.abs().max()))


def test_products_finish_on_the_calling_thread_when_the_helpers_are_busy(monkeypatch):
    """A helper thread that gets no core must not stall a product: the caller claims
    the blocks no helper has (regression: the caller used to wait for the pool)."""
    import threading

    from torchimize_scipy._engine import csr as op

    rng = np.random.default_rng(21)
    J = _to_coo(_sparse_batch(rng, 2, m=300, n=80))
    whole = op.BlockCSR(J)
    assert len(whole._a) == 1
    monkeypatch.setattr(op, "_BLOCK_NNZ", 50)
    monkeypatch.setattr(op, "SPLIT_NNZ", 100)  # each problem in two transposed blocks
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cut = op.BlockCSR(J)
        assert len(cut._a) == 4 and cut.shared
        p = torch.as_tensor(rng.standard_normal((2, 80)))
        u = torch.as_tensor(rng.standard_normal((2, 300)))
        release, busy, returned = threading.Event(), threading.Event(), threading.Event()
        blocker = op._helpers(1)[0]

        def block() -> None:  # a helper without a core: busy until released
            busy.set()
            release.wait(10)
            returned.set()
        blocker.queue.put(block)
        assert busy.wait(30)
        try:  # the helper busy: the products run here, in full
            assert_bitwise_equal(cut.matvec(p), whole.matvec(p))
            assert_bitwise_equal(cut.rmatvec(u), whole.rmatvec(u))
            t, w = np.full((2, 300), np.nan), np.full((2, 80), np.nan)
            cut.start_fused(p.numpy(), np.zeros((2, 300)), 0.0, t, np.empty((2, 300)), w).wait()
            assert_bitwise_equal(torch.from_numpy(t), whole.matvec(p))
            assert_bitwise_equal(torch.from_numpy(w), cut.rmatvec(torch.from_numpy(t)))
            assert not returned.is_set()  # done without the helper
        finally:
            release.set()
    finally:
        torch.set_num_threads(old)
    # once free, the helper finds the products' blocks all claimed and leaves them alone
    done = threading.Event()
    blocker.queue.put(done.set)
    assert done.wait(30)


def test_products_with_helpers_sum_each_row_once(monkeypatch):
    """Products shared with the helper threads: every block run once, whatever the
    interleaving (many products in a row, started ahead and finished at once)."""
    from torchimize_scipy._engine import csr as op

    rng = np.random.default_rng(23)
    J = _to_coo(_sparse_batch(rng, 3, m=400, n=120))
    whole = op.BlockCSR(J)
    monkeypatch.setattr(op, "_BLOCK_NNZ", 30)
    monkeypatch.setattr(op, "SPLIT_NNZ", 300)  # each problem in two transposed blocks
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cut = op.BlockCSR(J)
        assert len(cut._a) == 4 and cut.shared
        p = rng.standard_normal((3, 120))
        u = rng.standard_normal((3, 400))
        ref = whole.matvec(torch.as_tensor(p)).numpy()
        ref_t = cut.rmatvec(torch.as_tensor(u)).numpy()
        ref_w = cut.rmatvec(torch.as_tensor(ref)).numpy()
        for _ in range(200):
            out, w = np.zeros((3, 400)), np.full((3, 120), np.nan)
            cut.start_fused(p, u, 0.0, out, np.empty_like(u), w).wait()
            assert np.array_equal(out, ref) and np.array_equal(w, ref_w)
            acc, acc_ref = np.ones((3, 400)), np.ones((3, 400))
            cut.matvec_into(p, acc)  # sums onto what is there, as one block does
            whole.matvec_into(p, acc_ref)
            assert np.array_equal(acc, acc_ref)
            out_t = np.zeros((3, 120))
            cut.rmatvec_into(u, out_t)
            assert np.array_equal(out_t, ref_t)
    finally:
        torch.set_num_threads(old)


def test_products_raise_a_helpers_error(monkeypatch):
    """An error in a block run by a helper reaches the caller (not lost on the helper)."""
    import threading

    from torchimize_scipy._engine import csr as op

    rng = np.random.default_rng(24)
    J = _to_coo(_sparse_batch(rng, 2, m=300, n=80))
    monkeypatch.setattr(op, "_BLOCK_NNZ", 50)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cut = op.BlockCSR(J)
    finally:
        torch.set_num_threads(old)
    original = op._accumulate_block
    main = threading.get_ident()

    def fails_off_main(block, w, out, zero):
        if threading.get_ident() != main:
            raise RuntimeError("kernel failed on a helper")
        original(block, w, out, zero)
    monkeypatch.setattr(op, "_accumulate_block", fails_off_main)
    product = op._Product(cut._a, np.ones(160), np.zeros(600), True)
    entered = threading.Event()
    op._helpers(1)[0].queue.put(entered.set)  # after the product's part: it has run
    assert entered.wait(30)
    if product.entered:  # the helper claimed a block before this thread did
        with pytest.raises(RuntimeError, match="kernel failed on a helper"):
            product.wait()
    else:  # pragma: no cover - the helper came after every claim
        product.wait()


@pytest.mark.parametrize("B", [1, 3])
def test_products_started_ahead_leave_lsmr_unchanged(monkeypatch, B):
    """With its products shared with a helper, LSMR (one problem) starts the next pass
    over A before updating its scalars; the iterates, stopping reasons and counts are
    those of one thread, bit for bit (problems of a batch stop at different iterations:
    the frozen ones' rows are discarded)."""
    from torchimize_scipy._engine import csr as op

    rng = np.random.default_rng(22)
    mats = _sparse_batch(rng, B, m=120, n=50)
    J = _to_coo(mats)
    b = torch.as_tensor(rng.standard_normal((B, 120)))
    kw = {"atol": 1e-9, "btol": 1e-9} if B > 1 else {}
    if B > 1:  # problems stop at different iterations
        b[1] *= 1e-3
    monkeypatch.setattr(op, "SPLIT_NNZ", 400)  # each problem in transposed blocks
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = lsmr(J, b, damp=torch.linspace(0.0, 0.5, B, dtype=torch.float64), **kw)
    finally:
        torch.set_num_threads(old)
    monkeypatch.setattr(op, "_BLOCK_NNZ", 40)
    torch.set_num_threads(2)
    try:
        A = as_operator(J)
        assert len(A._csr._a) == 4 and A._csr.shared
        ahead = lsmr(A, b, damp=torch.linspace(0.0, 0.5, B, dtype=torch.float64), **kw)
    finally:
        torch.set_num_threads(old)
    if B > 1:
        assert len(set(one.itn.tolist())) > 1
    for a, c in zip(one, ahead, strict=True):
        assert_bitwise_equal(a, c)
    _check_against_scipy(one, mats, b.numpy(), damp=np.linspace(0.0, 0.5, B), **kw)


def test_sparse_products_make_no_user_warning():
    import warnings

    rng = np.random.default_rng(17)
    J = _to_coo(_sparse_batch(rng, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = as_operator(J)
        op.matvec(torch.ones(2, N, dtype=torch.float64))
        op.rmatvec(torch.ones(2, M, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(1, 50, 30), (3, 40, 25)])
def test_csr_plan_transpose_is_scipys_csc_conversion(shape):
    """The plan's A^T (the device products' CSR of it) is scipy's CSR -> CSC conversion of
    the structure: the entries' order, the column pointers and the row indices."""
    import scipy.sparse as sp

    from torchimize_scipy._engine import csr as op

    rng = np.random.default_rng(18)
    B, m, n = shape
    J = torch.as_tensor(rng.standard_normal(shape) * (rng.random(shape) < 0.3)).to_sparse()
    plan = op.csr_plan(J.coalesce().indices(), shape)
    nnz = plan.col.numel()
    csc = sp.csr_array((np.arange(nnz), plan.col.numpy(), plan.crow.numpy()),
                       shape=(B * m, B * n)).tocsc()
    assert np.array_equal(plan.perm_t.numpy(), csc.data)
    assert np.array_equal(plan.crow_t.numpy(), csc.indptr)
    assert np.array_equal(plan.col_t.numpy(), csc.indices)


@pytest.mark.parametrize("case", ["dense", "sparse", "damp", "conlim", "x0", "maxiter"])
def test_one_problem_float_scalars_match_scipy_and_the_array_path(case):
    """One float64 problem on the CPU keeps its scalars as numpy.float64 (the cheapest
    path); it must stop as scipy does, like the array path (_floats=False)."""
    rng = np.random.default_rng(19)
    kw: dict = {}
    if case == "sparse":
        mats = _sparse_batch(rng, 1)
        A = _to_coo(mats)
    else:
        mats = [_matrix(rng, 1e6 if case == "conlim" else 200.0)]
        A = torch.as_tensor(np.stack(mats))
    b = rng.standard_normal((1, M))
    ref_kw: dict = {}
    if case == "damp":
        kw = ref_kw = {"damp": 0.3}
    elif case == "conlim":
        kw = ref_kw = {"conlim": 1e3, "atol": 1e-10, "btol": 1e-10}
    elif case == "maxiter":
        kw = ref_kw = {"maxiter": 5}
    elif case == "x0":
        x0 = rng.standard_normal((1, N))
        kw, ref_kw = {"x0": torch.as_tensor(x0)}, {"x0": x0[0]}
    floats = lsmr(A, torch.as_tensor(b), **kw)
    arrays = lsmr(A, torch.as_tensor(b), _floats=False, **kw)
    ref = scipy_lsmr(mats[0], b[0], **ref_kw)
    tol = 10 * max(ref_kw.get("atol", 1e-6), 1e-12) * (np.linalg.norm(ref[0]) + 1)
    for res in (floats, arrays):
        assert res.istop.dtype == torch.long and res.x.dtype == torch.float64
        assert int(res.istop[0]) == ref[1] and abs(int(res.itn[0]) - ref[2]) <= 1
        np.testing.assert_allclose(res.x[0].numpy(), ref[0], rtol=0, atol=tol)
    assert floats.istop.tolist() == arrays.istop.tolist()


def test_one_problem_float_scalars_exact_start_and_breakdown():
    rng = np.random.default_rng(20)
    A = torch.as_tensor(_matrix(rng, 10.0)[None])
    zero = lsmr(A, torch.zeros(1, M, dtype=torch.float64))
    assert (int(zero.istop[0]), int(zero.itn[0])) == (0, 0) and zero.x.abs().max() == 0
    bad = A.clone()
    bad[0, 3, 4] = float("nan")
    res = lsmr(bad, torch.as_tensor(rng.standard_normal((1, M))))
    assert int(res.istop[0]) == BREAKDOWN and torch.isfinite(res.x).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_pass_is_the_separate_products_bit_for_bit(monkeypatch, dtype):
    """The fused pass forms ``t = J w - c y`` with the operations of the zeroed product
    followed by ``t - y c`` (one coefficient, or one per problem), and ``J^T t`` with
    those of the transposed product, bit for bit, for problems cut into transposed
    blocks or not. LSMR so cut (two threads) gives one thread's result bit for bit."""
    from torchimize_scipy._engine import csr as op

    rng = np.random.default_rng(31)
    monkeypatch.setattr(op, "SPLIT_NNZ", 6000)  # 400 x 150 at 15 %: about 9,000 entries
    monkeypatch.setattr(op, "_BLOCK_NNZ", 40)
    for B in (1, 3):
        J = _to_coo(_sparse_batch(rng, B, m=400, n=150)).to(dtype)
        for split in (True, False):
            if not split:
                monkeypatch.setattr(op, "SPLIT_NNZ", 10**9)
            csr = op.BlockCSR(J)
            npt = csr.np_dtype
            w = rng.standard_normal((B, 150)).astype(npt)
            y = rng.standard_normal((B, 400)).astype(npt)
            coefs = [np.linspace(-1.3, 0.7, B, dtype=npt).reshape(B, 1)]
            if B == 1:
                coefs += [npt.type(0.75)]
            for c in coefs:
                prod = np.zeros_like(y)
                csr.matvec_into(w, prod)
                ref_t = np.subtract(prod, np.multiply(y, c, out=np.empty_like(y)))
                ref_w = np.zeros_like(w)
                csr.rmatvec_into(ref_t, ref_w)
                t, at = np.full_like(y, np.nan), np.full_like(w, np.nan)
                csr.start_fused(w, y, c, t, np.empty_like(y), at).wait()
                assert np.array_equal(t, ref_t) and np.array_equal(at, ref_w)
        monkeypatch.setattr(op, "SPLIT_NNZ", 6000)
    J = _to_coo(_sparse_batch(rng, 1, m=400, n=150)).to(dtype)
    b = torch.as_tensor(rng.standard_normal((1, 400)), dtype=dtype)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert op.BlockCSR(J).shared
        cut_res = lsmr(J, b, atol=1e-10, btol=1e-10)
    finally:
        torch.set_num_threads(old)
    torch.set_num_threads(1)
    try:
        one = lsmr(J, b, atol=1e-10, btol=1e-10)
    finally:
        torch.set_num_threads(old)
    assert int(cut_res.itn[0]) == int(one.itn[0]) > 10
    assert_bitwise_equal(cut_res.x, one.x)


def test_product_started_ahead_lands_in_the_next_buffer_without_a_copy(monkeypatch):
    """One problem cut into row blocks: LSMR's next ``A v - c u``, started ahead, is
    formed straight in the buffer the next iteration writes u into (no copy of a
    product buffer per iteration); the values are those of the copying path, a stopped
    solve finishes the product it started, and the result is one thread's bit for bit."""
    from torchimize_scipy._engine import csr as op
    from torchimize_scipy._engine import lsmr_vectors as lv

    rng = np.random.default_rng(41)
    J = _to_coo(_sparse_batch(rng, 1, m=400, n=150))
    b = torch.as_tensor(rng.standard_normal((1, 400)))
    monkeypatch.setattr(op, "SPLIT_NNZ", 6000)  # two transposed blocks
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = lsmr(J, b, atol=1e-10, btol=1e-10)
    finally:
        torch.set_num_threads(old)
    monkeypatch.setattr(op, "_BLOCK_NNZ", 40)
    torch.set_num_threads(2)
    try:
        A = as_operator(J)
        assert len(A._csr._a) == 4 and A._csr.shared
        vx = lv.HostVectors(A, torch.float64)
        w, y = rng.standard_normal((1, 150)), rng.standard_normal((1, 400))
        dest, out = np.full((1, 400), np.nan), np.full((1, 400), np.nan)
        pending = vx.start_forward(w, y, 0.5, dest)
        assert pending.out is dest
        assert vx.product_sub(True, w, 0.5, y, dest, np.empty_like(y), pending) is dest
        at = vx.At_t.copy()
        pending = vx.start_forward(w, y, 0.5)  # no destination: a buffer, then a copy
        assert pending.out is not dest
        got = vx.product_sub(True, w, 0.5, y, out, np.empty_like(y), pending)
        assert got is out and np.array_equal(out, dest) and np.array_equal(vx.At_t, at)
        # the transposed product that follows: (A^T t) scale - c v, from the same pass
        v = rng.standard_normal((1, 150))
        nxt = vx.product_sub(False, out * 0.25, 2.0, v, np.empty((1, 150)),
                             np.empty((1, 150)), scale=0.25)
        assert np.array_equal(nxt, at * 0.25 - v * 2.0)
        copies = []
        real_copyto = np.copyto
        monkeypatch.setattr(lv.np, "copyto", lambda *a, **k: (copies.append(1),
                                                              real_copyto(*a, **k)))
        cut = lsmr(A, b, atol=1e-10, btol=1e-10)
        monkeypatch.setattr(lv.np, "copyto", real_copyto)
        assert copies == []
    finally:
        torch.set_num_threads(old)
    assert int(cut.itn[0]) == int(one.itn[0]) > 10
    for a, c in zip(one, cut, strict=True):
        assert_bitwise_equal(a, c)
