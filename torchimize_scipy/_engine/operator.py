r"""One interface to the three kinds of batched Jacobian the engine accepts.

The engine's Jacobian of a batch of ``B`` problems with ``m`` residuals and
``n`` variables is one of

* a dense tensor of shape ``(B, m, n)``;
* a torch sparse COO tensor of shape ``(B, m, n)`` (same dtype and device as
  ``x``);
* a *torch linear operator*: any object with ``shape == (B, m, n)``, ``dtype``,
  ``device`` and the batched products ``matvec(p (B, n)) -> (B, m)`` and
  ``rmatvec(u (B, m)) -> (B, n)``, optionally ``column_norms() -> (B, n)``.

:class:`JacobianOperator` wraps any of them, together with a row scaling
:math:`w` (robust losses scale the rows of :math:`J`) and a column scaling
:math:`d` (``x_scale`` and the Coleman-Li scaling), so that it represents
:math:`\operatorname{diag}(w)\, J \operatorname{diag}(d)` and offers
``matvec``, ``rmatvec``, ``column_sq_norms`` and ``scale_columns`` /
``scale_rows`` whatever the kind. The scalings are applied to the vectors,
never to the stored matrix, so a sparse or operator Jacobian is never made
dense. Step rules that work by products only (the ``tr_solver='lsmr'``
variants) therefore never branch on the kind.

A sparse Jacobian is turned once into a block-diagonal CSR matrix of shape
``(B m, B n)`` and its transpose (CSR products are the fast sparse kernel of
torch on the CPU and on CUDA); the products of the whole batch are then one
sparse matrix-vector product each.
"""

from __future__ import annotations

import os
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor


def is_operator(J: Any) -> bool:
    """Whether ``J`` is a torch linear operator rather than a tensor."""
    return not isinstance(J, Tensor) and hasattr(J, "matvec") and hasattr(J, "rmatvec")


def jacobian_kind(J: Any) -> str:
    """``'dense'``, ``'sparse'`` or ``'operator'`` for an engine Jacobian."""
    if isinstance(J, JacobianOperator):
        return J.kind
    if isinstance(J, Tensor):
        return "sparse" if J.layout != torch.strided else "dense"
    if is_operator(J):
        return "operator"
    raise TypeError(f"an engine Jacobian must be a tensor or a linear operator, "
                    f"not {type(J).__name__}")


class BlockCSR:
    """The products of a sparse ``(B, m, n)`` Jacobian: block-diagonal CSR forms of J and J^T.

    ``A (B m, B n)`` holds problem ``b``'s block at rows ``b m ..`` and columns
    ``b n ..``; ``A^T (B n, B m)`` is stored as a second CSR matrix (its values
    a gather of ``A``'s), so that both products read their matrix row by row.
    On the CPU the products run in scipy's compiled CSR kernel on numpy views
    of the tensors (no copy; about twice as fast as torch's CPU sparse kernel
    on one thread, ``benchmarks/bench_sparse.py --case matvec``); a large
    matrix is cut into row blocks of equal entry counts, one per torch thread
    (``torch.get_num_threads()``), multiplied in parallel (scipy's kernel
    releases the GIL; each row's sum is the same whatever the cut, so the
    result does not depend on the thread count). On other devices the
    products run in torch's CSR kernel.

    The index arrays depend only on the structure. Those of a ``jac_sparsity``
    are computed once per solve (:func:`csr_plan`, kept by the pattern and
    found again from the indices' memory), so a new Jacobian costs one gather
    of its values, never a sort; other sparse Jacobians get theirs computed
    per Jacobian.

    Attributes
    ----------
    shape : tuple
        ``(B, m, n)``.
    values : Tensor
        ``(nnz,)``, in the row-major order of ``A``.
    col : Tensor
        Column of each value in ``A`` (``b n + j``), ``(nnz,)``.
    """

    def __init__(self, J: Tensor | None, *, plan: CSRPlan | None = None,
                 values: Tensor | None = None, shape: tuple | None = None) -> None:
        if J is not None:
            B, m, n = J.shape
            if J.layout != torch.sparse_coo:
                J = J.to_sparse_coo()
            if not J.is_coalesced():
                J = J.coalesce()
            idx = J.indices()
            plan = _find_plan(idx, (B, m, n)) or csr_plan(idx, (B, m, n))
            values = J.values()
        else:  # other values on a known structure (:meth:`scaled`)
            B, m, n = shape
        self.shape = (B, m, n)
        self.values = values
        self.col = plan.col
        self.values_t = self.values.index_select(0, plan.perm_t)
        self._plan = plan
        self._host = self.values.device.type == "cpu"
        if self._host:
            vals = self.values.detach().contiguous().numpy()
            vals_t = self.values_t.detach().numpy()
            self._a = _row_blocks(vals, plan.host, (B * m, B * n))
            self._at = _row_blocks(vals_t, plan.host_t, (B * n, B * m))
        else:
            with warnings.catch_warnings():  # "sparse CSR tensor support is in beta"
                warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support",
                                        category=UserWarning)
                self._a = torch.sparse_csr_tensor(plan.crow, plan.col, self.values,
                                                  (B * m, B * n), check_invariants=False)
                self._at = torch.sparse_csr_tensor(plan.crow_t, plan.col_t, self.values_t,
                                                   (B * n, B * m), check_invariants=False)

    def _apply(self, M: Any, vec: Tensor, rows: int) -> Tensor:
        B = self.shape[0]
        if self._host:  # numpy views both ways (no torch operation but the product's)
            if vec.dtype != self.values.dtype or vec.requires_grad:
                vec = vec.detach().to(self.values.dtype)
            w = vec.numpy().reshape(-1)
            return torch.from_numpy(_host_product(M, w).reshape(B, rows))
        return (M @ vec.to(self.values.dtype).reshape(-1, 1)).reshape(B, rows)

    def matvec(self, p: Tensor) -> Tensor:
        """``J p`` for ``p (B, n)``: ``(B, m)``."""
        return self._apply(self._a, p, self.shape[1])

    def rmatvec(self, u: Tensor) -> Tensor:
        """``J^T u`` for ``u (B, m)``: ``(B, n)``."""
        return self._apply(self._at, u, self.shape[2])

    def rows(self) -> Tensor:
        """Row of ``A`` (``b m + i``) of each value, ``(nnz,)``."""
        return self._plan.row

    def scaled(self, row_scale: Tensor | None, col_scale: Tensor | None) -> BlockCSR:
        """``diag(w) J diag(d)`` with the scalings in the values (same structure, no sort)."""
        vals = self.values
        if row_scale is not None:
            vals = vals * row_scale.reshape(-1).index_select(0, self._plan.row)
        if col_scale is not None:
            vals = vals * col_scale.reshape(-1).index_select(0, self.col)
        return BlockCSR(None, plan=self._plan, values=vals, shape=self.shape)


class CSRPlan:
    """The CSR index arrays of a coalesced ``(B, m, n)`` structure (:func:`csr_plan`)."""

    __slots__ = ("indices", "row", "col", "crow", "perm_t", "crow_t", "col_t", "host", "host_t",
                 "__weakref__")

    def __init__(self, **arrays: Any) -> None:
        for k, v in arrays.items():
            setattr(self, k, v)


#: plans alive somewhere (a SparsityPattern holds them), by the address of their indices
_PLANS: weakref.WeakValueDictionary[tuple, CSRPlan] = weakref.WeakValueDictionary()
_PLANS_LOCK = threading.Lock()


def csr_plan(idx: Tensor, shape: tuple[int, int, int], register: bool = False) -> CSRPlan:
    """CSR index arrays for the coalesced COO indices ``idx (3, nnz)`` of a ``(B, m, n)`` tensor.

    With ``register`` the plan is found again by :class:`BlockCSR` for every
    sparse tensor built on the same index tensor, for as long as the caller
    keeps the plan (a weak registry: nothing outlives the caller's reference).
    """
    B, m, n = shape
    dev = idx.device
    row = idx[0] * m + idx[1]  # sorted: the indices are coalesced (row-major)
    col = idx[0] * n + idx[2]
    crow = torch.zeros(B * m + 1, dtype=torch.long, device=dev)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=B * m), 0)
    host = host_t = None
    if dev.type == "cpu":
        small = max(idx.shape[1], B * m, B * n) < 2**31 - 1
        it = np.int32 if small else np.int64
        host = (crow.numpy().astype(it), col.numpy().astype(it))
        # the order of the entries in A^T: scipy's CSR -> CSC conversion (a compiled
        # counting sort, rows kept sorted within a column) of the entries' numbers
        order = sp.csr_array((np.arange(idx.shape[1], dtype=np.int64), host[1], host[0]),
                             shape=(B * m, B * n), copy=False).tocsc()
        perm_t = torch.from_numpy(order.data)
        host_t = (order.indptr.astype(it), order.indices.astype(it))
        crow_t = torch.from_numpy(host_t[0].astype(np.int64))
        col_t = torch.from_numpy(host_t[1].astype(np.int64))
    else:
        perm_t = torch.sort(col, stable=True).indices  # rows stay sorted within a column
        crow_t = torch.zeros(B * n + 1, dtype=torch.long, device=dev)
        crow_t[1:] = torch.cumsum(torch.bincount(col, minlength=B * n), 0)
        col_t = row.index_select(0, perm_t)
    plan = CSRPlan(indices=idx, row=row, col=col, crow=crow, perm_t=perm_t, crow_t=crow_t,
                   col_t=col_t, host=host, host_t=host_t)
    if register:
        with _PLANS_LOCK:
            _PLANS[_address(idx, shape)] = plan
    return plan


def _address(idx: Tensor, shape: tuple) -> tuple:
    return (idx.data_ptr(), tuple(idx.shape), idx.stride(), str(idx.device), tuple(shape))


def _find_plan(idx: Tensor, shape: tuple) -> CSRPlan | None:
    """A registered plan made for these very indices (same memory, same layout), if any.

    The plan holds its indices, so their memory cannot have been reused by
    another tensor; indices of sparse tensors are never written in place here.
    """
    with _PLANS_LOCK:
        return _PLANS.get(_address(idx, shape))


#: entries per row block of a parallel CPU product (smaller matrices: one block)
_BLOCK_NNZ = 50_000
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1),
                                       thread_name_prefix="torchimize_scipy_csr")
        return _POOL


def _row_blocks(values: np.ndarray, index: tuple, shape: tuple[int, int]) -> list[sp.csr_array]:
    """A scipy CSR matrix over existing arrays (no copy), in row blocks of equal entry counts.

    One block per torch thread (at most ``nnz / _BLOCK_NNZ`` of them).
    """
    indptr, indices = index
    nnz = int(indptr[-1])
    k = int(max(1, min(torch.get_num_threads(), nnz // _BLOCK_NNZ, shape[0])))
    cuts = np.unique(np.r_[0, np.searchsorted(indptr, np.arange(1, k) * (nnz / k)), shape[0]])
    blocks = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        a, b = int(indptr[lo]), int(indptr[hi])
        A = sp.csr_array((values[a:b], indices[a:b], indptr[lo:hi + 1] - indptr[lo]),
                         shape=(int(hi - lo), shape[1]), copy=False)
        A.has_sorted_indices = True
        A.has_canonical_format = True
        blocks.append(A)
    return blocks


def _host_product(blocks: list[sp.csr_array], w: np.ndarray) -> np.ndarray:
    """``A w`` for the row blocks of ``A``, the blocks after the first in the thread pool."""
    if len(blocks) == 1:
        return blocks[0] @ w
    futures = [_pool().submit(A.__matmul__, w) for A in blocks[1:]]
    parts = [blocks[0] @ w] + [f.result() for f in futures]
    return np.concatenate(parts)


class JacobianOperator:
    r"""``diag(w) J diag(d)`` for a dense, sparse or operator Jacobian ``J (B, m, n)``.

    Parameters
    ----------
    J : Tensor or linear operator
        The Jacobian of a batch (see the module notes for the three kinds).
    row_scale : Tensor, optional
        ``w (B, m)``; None means ones.
    col_scale : Tensor, optional
        ``d (B, n)``; None means ones.

    Notes
    -----
    Objects are immutable: :meth:`scale_rows` and :meth:`scale_columns`
    return new wrappers sharing the stored matrix.
    """

    def __init__(self, J: Any, row_scale: Tensor | None = None,
                 col_scale: Tensor | None = None, _csr: tuple | None = None) -> None:
        if isinstance(J, JacobianOperator):
            row_scale = _combine(J.row_scale, row_scale)
            col_scale = _combine(J.col_scale, col_scale)
            _csr = J._csr
            J = J.base
        self.kind = jacobian_kind(J)
        self.base = J
        self.row_scale = row_scale
        self.col_scale = col_scale
        self.shape = tuple(J.shape)
        self.dtype = J.dtype
        self.device = J.device
        if self.kind == "sparse" and _csr is None:
            _csr = BlockCSR(J)
        self._csr = _csr

    # ---- products ------------------------------------------------------------
    def _raw_matvec(self, p: Tensor) -> Tensor:
        if self.kind == "dense":
            return torch.bmm(self.base, p.unsqueeze(-1)).squeeze(-1)
        if self.kind == "sparse":
            return self._csr.matvec(p)
        return self.base.matvec(p)

    def _raw_rmatvec(self, u: Tensor) -> Tensor:
        if self.kind == "dense":
            return torch.bmm(u.unsqueeze(-2), self.base).squeeze(-2)
        if self.kind == "sparse":
            return self._csr.rmatvec(u)
        return self.base.rmatvec(u)

    def matvec(self, p: Tensor) -> Tensor:
        """``diag(w) J diag(d) p`` for ``p (B, n)``; returns ``(B, m)``."""
        if self.col_scale is not None:
            p = p * self.col_scale
        out = self._raw_matvec(p)
        return out if self.row_scale is None else out * self.row_scale

    def rmatvec(self, u: Tensor) -> Tensor:
        """``diag(d) J^T diag(w) u`` for ``u (B, m)``; returns ``(B, n)``."""
        if self.row_scale is not None:
            u = u * self.row_scale
        out = self._raw_rmatvec(u)
        return out if self.col_scale is None else out * self.col_scale

    def matmat(self, P: Tensor) -> Tensor:
        """``diag(w) J diag(d) P`` for ``P (B, n, k)``; returns ``(B, m, k)``."""
        if self.kind == "dense":
            if self.col_scale is not None:
                P = P * self.col_scale.unsqueeze(-1)
            out = torch.bmm(self.base, P)
            return out if self.row_scale is None else out * self.row_scale.unsqueeze(-1)
        return torch.stack([self.matvec(P[..., k]) for k in range(P.shape[-1])], dim=-1)

    # ---- column norms ----------------------------------------------------------
    @property
    def has_column_norms(self) -> bool:
        """Whether :meth:`column_sq_norms` can be computed (not for bare operators)."""
        if self.kind != "operator":
            return True
        return self.row_scale is None and hasattr(self.base, "column_norms")

    def column_sq_norms(self) -> Tensor:
        """Squared Euclidean norms of the columns of ``diag(w) J diag(d)``, ``(B, n)``.

        Raises
        ------
        ValueError
            For an operator without ``column_norms``, or one with a row scaling
            (its column norms cannot be formed from products alone).
        """
        if self.kind == "dense":
            J = self.base
            if self.row_scale is not None:
                J = J * self.row_scale.unsqueeze(-1)
            sq = torch.linalg.vector_norm(J, dim=-2) ** 2  # no (B, m, n) temporary
        elif self.kind == "sparse":
            B, _, n = self.shape
            csr = self._csr
            vals = csr.values
            if self.row_scale is not None:
                vals = vals * self.row_scale.reshape(-1).index_select(0, csr.rows())
            sq = torch.zeros(B * n, dtype=self.dtype, device=self.device)
            sq = sq.index_add(0, csr.col, vals * vals).reshape(B, n)
        else:
            if not self.has_column_norms:
                raise ValueError("the column norms of this linear operator are not available "
                                 "(it has no `column_norms` method, or its rows are scaled)")
            norms = self.base.column_norms()
            sq = norms * norms
        if self.col_scale is not None:
            sq = sq * (self.col_scale * self.col_scale)
        return sq

    # ---- rows of the batch (the loop's compaction and scatter) ---------------------
    def index_select(self, dim: int, rows: Tensor) -> JacobianOperator:
        """The problems ``rows`` of the batch (``dim`` must be 0), as a new wrapper."""
        if dim != 0:
            raise ValueError("a batched Jacobian operator selects along the batch axis only")
        if self.kind == "operator":
            base = _OperatorRows(self.base, rows)
        else:
            base = self.base.index_select(0, rows)
            if self.kind == "sparse":
                base = base.coalesce()
        return JacobianOperator(base, _select(self.row_scale, rows), _select(self.col_scale, rows))

    def index_copy(self, dim: int, rows: Tensor, other: JacobianOperator) -> JacobianOperator:
        """A new wrapper whose problems ``rows`` are those of ``other`` (out of place)."""
        if dim != 0:
            raise ValueError("a batched Jacobian operator copies along the batch axis only")
        other = as_operator(other)
        B = self.shape[0]
        row_scale = _merge_scale(self.row_scale, other.row_scale, rows, B, self.shape[1])
        col_scale = _merge_scale(self.col_scale, other.col_scale, rows, B, self.shape[2])
        if self.kind == "dense" and other.kind == "dense":
            base = self.base.index_copy(0, rows, other.base)
        elif self.kind == "sparse" and other.kind == "sparse":
            keep = torch.ones(B, dtype=torch.bool, device=self.device)
            keep[rows] = False
            kept = keep.nonzero().squeeze(-1)
            order = torch.cat([kept, rows])  # batch position of each stacked problem
            stacked = torch.cat([self.base.index_select(0, kept), other.base]).coalesce()
            idx = stacked.indices().clone()
            idx[0] = order[idx[0]]
            base = torch.sparse_coo_tensor(idx, stacked.values(), self.shape,
                                           check_invariants=False).coalesce()
        elif self.kind == "operator" and other.kind == "operator":
            base = _OperatorMerge.merge(self.base, rows, other.base, B)
        else:
            raise ValueError(f"the Jacobian changed kind during the run ({self.kind} to "
                             f"{other.kind})")
        return JacobianOperator(base, row_scale, col_scale)

    def cat_rows(self, other: Any) -> JacobianOperator:
        """The problems of ``self`` followed by those of ``other`` (the loop's refill)."""
        other = as_operator(other)
        B1, B2 = self.shape[0], other.shape[0]
        rows = torch.arange(B1, B1 + B2, device=self.device)

        def scale(a, b, size):
            return _merge_scale(None if a is None else torch.cat([a, a.new_ones(B2, size)]),
                                b, rows, B1 + B2, size)

        row_scale = scale(self.row_scale, other.row_scale, self.shape[1])
        col_scale = scale(self.col_scale, other.col_scale, self.shape[2])
        if self.kind != other.kind:
            raise ValueError(f"the Jacobian changed kind during the run ({self.kind} to "
                             f"{other.kind})")
        if self.kind == "operator":
            head = self.base.pieces if isinstance(self.base, _OperatorMerge) else [
                (torch.arange(B1, device=self.device), self.base)]
            tail = other.base.pieces if isinstance(other.base, _OperatorMerge) else [
                (torch.arange(B2, device=self.device), other.base)]
            base = _OperatorMerge(head + [(where + B1, op) for where, op in tail],
                                  (B1 + B2, *self.shape[1:]))
        else:
            base = torch.cat([self.base, other.base])
            if self.kind == "sparse":
                base = base.coalesce()
        return JacobianOperator(base, row_scale, col_scale)

    # ---- scalings --------------------------------------------------------------
    def folded(self) -> JacobianOperator:
        """The same operator with a sparse matrix's scalings moved into its values.

        For a solver that applies the operator many times (LSMR): one pass over
        the entries instead of two vector scalings per product. Dense and
        operator kinds are returned as they are.
        """
        if self.kind != "sparse" or (self.row_scale is None and self.col_scale is None):
            return self
        return JacobianOperator(self.base, _csr=self._csr.scaled(self.row_scale,
                                                                 self.col_scale))

    def scale_columns(self, d: Tensor) -> JacobianOperator:
        """``self diag(d)``: a new wrapper, the matrix is not copied."""
        return JacobianOperator(self, col_scale=d)

    def scale_rows(self, w: Tensor) -> JacobianOperator:
        """``diag(w) self``: a new wrapper, the matrix is not copied."""
        return JacobianOperator(self, row_scale=w)

    def to_dense(self) -> Tensor:
        """The scaled matrix as a dense ``(B, m, n)`` tensor (tests and small problems).

        An operator is applied to the columns of the identity.
        """
        B, m, n = self.shape
        if self.kind == "dense":
            J = self.base
        elif self.kind == "sparse":
            J = self.base.to_dense()
        else:
            eye = torch.eye(n, dtype=self.dtype, device=self.device)
            J = torch.stack([self.base.matvec(eye[k].expand(B, n)) for k in range(n)], dim=-1)
        if self.row_scale is not None:
            J = J * self.row_scale.unsqueeze(-1)
        if self.col_scale is not None:
            J = J * self.col_scale.unsqueeze(-2)
        return J


def _select(scale: Tensor | None, rows: Tensor) -> Tensor | None:
    return None if scale is None else scale.index_select(0, rows)


def _merge_scale(old: Tensor | None, new: Tensor | None, rows: Tensor, B: int,
                 size: int) -> Tensor | None:
    """``old`` with the rows ``rows`` replaced by ``new`` (None: ones)."""
    if old is None and new is None:
        return None
    ref = old if old is not None else new
    if old is None:
        old = torch.ones(B, size, dtype=ref.dtype, device=ref.device)
    if new is None:
        new = torch.ones(rows.shape[0], size, dtype=ref.dtype, device=ref.device)
    return old.index_copy(0, rows, new)


class _OperatorRows:
    """Problems ``rows`` of a batched operator (products through the whole batch)."""

    def __init__(self, op: Any, rows: Tensor) -> None:
        self.op, self.rows = op, rows
        B, m, n = op.shape
        self.full = B
        self.shape = (rows.shape[0], m, n)
        self.dtype, self.device = op.dtype, op.device
        if hasattr(op, "column_norms"):
            self.column_norms = lambda: op.column_norms().index_select(0, rows)

    def matvec(self, p: Tensor) -> Tensor:
        full = p.new_zeros(self.full, p.shape[-1]).index_copy(0, self.rows, p)
        return self.op.matvec(full).index_select(0, self.rows)

    def rmatvec(self, u: Tensor) -> Tensor:
        full = u.new_zeros(self.full, u.shape[-1]).index_copy(0, self.rows, u)
        return self.op.rmatvec(full).index_select(0, self.rows)


class _OperatorMerge:
    """A batch whose problems come from several operators: disjoint ``(rows, op)`` pieces."""

    def __init__(self, pieces: list[tuple[Tensor, Any]], shape: tuple) -> None:
        self.pieces = pieces
        self.shape = shape
        op = pieces[0][1]
        self.dtype, self.device = op.dtype, op.device
        if all(hasattr(o, "column_norms") for _, o in pieces):
            self.column_norms = self._column_norms

    @classmethod
    def merge(cls, old: Any, rows: Tensor, new: Any, B: int) -> _OperatorMerge:
        """``old`` (``B`` problems) with problems ``rows`` taken from ``new``."""
        pieces = old.pieces if isinstance(old, _OperatorMerge) else [
            (torch.arange(B, device=rows.device), old)]
        taken = torch.zeros(B, dtype=torch.bool, device=rows.device)
        taken[rows] = True
        out = []
        for where, op in pieces:
            stay = ~taken[where]
            if bool(stay.all()):
                out.append((where, op))
            elif bool(stay.any()):
                local = stay.nonzero().squeeze(-1)
                out.append((where[local], _OperatorRows(op, local)))
        out.append((rows, new))
        return cls(out, old.shape)

    def _apply(self, vec: Tensor, width: int, forward: bool) -> Tensor:
        out = vec.new_zeros(self.shape[0], width)
        for where, op in self.pieces:
            part = vec.index_select(0, where)
            out = out.index_copy(0, where, op.matvec(part) if forward else op.rmatvec(part))
        return out

    def matvec(self, p: Tensor) -> Tensor:
        return self._apply(p, self.shape[1], True)

    def rmatvec(self, u: Tensor) -> Tensor:
        return self._apply(u, self.shape[2], False)

    def _column_norms(self) -> Tensor:
        out = torch.zeros(self.shape[0], self.shape[2], dtype=self.dtype, device=self.device)
        for where, op in self.pieces:
            out = out.index_copy(0, where, op.column_norms())
        return out


def _combine(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a * b


def as_operator(J: Any) -> JacobianOperator:
    """Wrap an engine Jacobian (a no-op for a :class:`JacobianOperator`)."""
    return J if isinstance(J, JacobianOperator) else JacobianOperator(J)


class StackedOperator:
    r"""The augmented operator :math:`[A;\ \operatorname{diag}(c)]` of shape ``(B, m + n, n)``.

    Used for the bounded 'trf' step with LSMR: the Coleman-Li diagonal term
    (plus the regularisation) enters as extra rows (Branch, Coleman & Li 1999).

    Parameters
    ----------
    A : JacobianOperator
        ``(B, m, n)``.
    c : Tensor
        ``(B, n)``, the diagonal of the extra block.
    """

    def __init__(self, A: JacobianOperator, c: Tensor) -> None:
        self.A = A.folded()
        self.c = c
        B, m, n = A.shape
        self.shape = (B, m + n, n)
        self.dtype = A.dtype
        self.device = A.device
        self._m = m

    def matvec(self, p: Tensor) -> Tensor:
        """``[A p; c p]``, ``(B, m + n)``."""
        return torch.cat([self.A.matvec(p), self.c * p], dim=-1)

    def rmatvec(self, u: Tensor) -> Tensor:
        """``A^T u[:m] + c u[m:]``, ``(B, n)``."""
        return self.A.rmatvec(u[:, :self._m]) + self.c * u[:, self._m:]


def linearize_products(f_true: Tensor, J_true: Any, loss: Any) -> tuple[Tensor, Any, Tensor,
                                                                        Tensor]:
    """The engine's linearisation for methods that use ``J`` through products only.

    The counterpart of :meth:`Problem.linearize` for ``tr_solver='lsmr'``:
    returns ``(f, J, g, col_sq)`` with the loss-scaled residuals ``f``, the
    loss-scaled Jacobian ``J`` (a dense tensor stays a dense tensor; a sparse
    or operator Jacobian becomes a :class:`JacobianOperator` whose rows carry
    the loss scaling), the gradient ``g = J^T f`` by one ``rmatvec``, and in
    place of the Gram matrix the squared column norms ``col_sq (B, n)`` of the
    scaled ``J`` (``x_scale='jac'`` and the finiteness test of the loop). An
    operator without ``column_norms`` has none: ``g * g`` stands in, which is
    finite whenever its products are (the frontend refuses ``x_scale='jac'``
    for such operators, as scipy does).
    """
    from .._loss import scale_for_robust_loss

    dense = isinstance(J_true, Tensor) and J_true.layout == torch.strided
    if loss is None:
        f = f_true
        J = J_true if dense else as_operator(J_true)
    elif dense:
        J, f = scale_for_robust_loss(J_true, f_true, loss.rho(f_true))
    else:
        rho = loss.rho(f_true)
        # the row weights of scale_for_robust_loss, applied lazily to the rows
        w = torch.clamp(rho[1] + 2 * rho[2] * f_true**2, min=torch.finfo(f_true.dtype).eps)
        w = torch.sqrt(w)
        f = f_true * (rho[1] / w)
        J = as_operator(J_true).scale_rows(w)
    op = as_operator(J) if dense else J
    g = op.rmatvec(f)
    col_sq = op.column_sq_norms() if op.has_column_norms else g * g
    return f, J, g, col_sq
