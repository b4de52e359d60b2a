"""Sparse ``(B, m, n)`` Jacobians as block-diagonal CSR matrices, and their products.

A batch of sparse Jacobians is one block-diagonal matrix of ``B m`` rows and
``B n`` columns. :class:`BlockCSR` keeps its CSR form; on other devices also
one of its transpose (the transpose's entry order found once per sparsity
structure, :func:`csr_plan`), so that both ``J v`` and ``J^T u`` run in
torch's CSR kernel.

On the CPU the products run in scipy's compiled kernels over the tensors'
memory, shared between the calling thread and helper threads of the process
(:class:`SharedJobs`: every thread claims the next job from one counter, so
a helper that gets no core never stalls a product):

* ``J v`` in row blocks of equal entry counts (two per torch thread when
  torch has several: :func:`product_threads`, which keeps the caller's
  count while a step rule holds its torch count at 1). Each row is one loop
  whoever runs it, so the result does not depend on the split.
* ``J^T u`` scattered along ``J``'s own rows (scipy's CSC kernel over the
  CSR arrays, what scipy's ``J.T @ u`` runs), in *transposed blocks* fixed
  by each problem's structure (:func:`_transposed_plan`): a problem of fewer
  than :data:`SPLIT_NNZ` entries is one block, summed over its rows in
  increasing order (scipy's order; consecutive such problems share a job,
  their columns being disjoint); a larger one is cut into a few blocks of
  equal entry counts, each summed into a partial vector of its own, and the
  partials are added in block order. The cut depends on the problem alone,
  not on the thread count nor on its neighbours, so neither does the
  result. No transposed copy of the values is made.
* LSMR's pair ``t = J v - c y`` and ``J^T t`` in one pass over ``J``
  (:meth:`BlockCSR.start_fused`): each transposed block forms its rows of
  ``t`` and scatters them at once, while they are in cache. ``J`` is
  streamed once per LSMR iteration instead of twice (and no ``J^T`` beside
  it), which is what bounds a large problem's products on a few cores
  (RESULTS §38). A row's ``t`` is the same operations as the separate
  product's (zeroed sums, then ``y c`` subtracted).

A block is its rows' offsets (from 0) and views of the index and value
arrays, handed to the kernels as they are (a scipy matrix per block would
copy views under half of their array in its format check). Used by
:mod:`.operator` and, on numpy arrays without allocation, by
:mod:`.lsmr_vectors`.
"""

from __future__ import annotations

import atexit
import itertools
import os
import queue
import threading
import warnings
import weakref
from typing import Any, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

try:  # scipy's compiled CSR kernel: y += A x into a given y (what ``A @ x`` calls on zeros)
    from scipy.sparse._sparsetools import csr_matvec as _csr_matvec
except ImportError:  # pragma: no cover - a scipy that moved it: the public product instead
    _csr_matvec = None
try:  # its CSC kernel: y += A x scattered along the columns (what ``A.T @ u`` runs)
    from scipy.sparse._sparsetools import csc_matvec as _csc_matvec
except ImportError:  # pragma: no cover - a scipy that moved it: the public product instead
    _csc_matvec = None


class BlockCSR:
    """The products of a sparse ``(B, m, n)`` Jacobian over its block-diagonal CSR form.

    ``A (B m, B n)`` holds problem ``b``'s block at rows ``b m ..`` and columns
    ``b n ..``. On the CPU the products run in scipy's compiled kernels on
    numpy views of the tensors (no copy; about twice as fast as torch's CPU
    sparse kernel on one thread, ``benchmarks/bench_sparse.py --case
    matvec``), shared with the helper threads (module notes): ``J v`` in
    row blocks, ``J^T u`` in the structure's transposed blocks, and LSMR's
    pair ``J v - c y``, ``J^T (J v - c y)`` in one pass
    (:meth:`start_fused`). :meth:`matvec_into`, :meth:`rmatvec_into` and
    :meth:`start_fused` work on numpy arrays of the caller's (LSMR's
    buffers). On other devices the products run in torch's CSR kernel, on
    ``A`` and on a CSR copy of ``A^T`` (its values a gather of ``A``'s).

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
        self._plan = plan
        self._host = values.device.type == "cpu"
        if self._host:  # numpy's gather on this thread: no OpenMP region to wake (module notes)
            vals = values.detach().contiguous().numpy()
            self._vals = vals
            self._a = _row_blocks(vals, plan.host, (B * m, B * n))
            self._t_jobs: list[_TJob] | None = None  # the transposed blocks, made on first need
            self._parts: np.ndarray | None = None  # their partial vectors
            self.np_dtype = vals.dtype
        else:
            self.values_t = values.index_select(0, plan.perm_t)
            with warnings.catch_warnings():  # "sparse CSR tensor support is in beta"
                warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support",
                                        category=UserWarning)
                self._a = torch.sparse_csr_tensor(plan.crow, plan.col, self.values,
                                                  (B * m, B * n), check_invariants=False)
                self._at = torch.sparse_csr_tensor(plan.crow_t, plan.col_t, self.values_t,
                                                   (B * n, B * m), check_invariants=False)

    def _transposed_jobs(self) -> tuple[list[_TJob], np.ndarray | None, _TPlan]:
        """The transposed blocks over this Jacobian's values, and their partial vectors."""
        tp = self._plan.transposed_blocks()
        if self._t_jobs is None:
            vals = self._vals
            n_col = self.shape[0] * self.shape[2]
            self._t_jobs = [_TJob(_Block(ptr, ix, vals[a:b], n_col, lo, hi), part, b0, b1)
                            for ptr, ix, a, b, lo, hi, part, b0, b1 in tp.blocks]
            if tp.parts:
                self._parts = np.empty((tp.parts, self.shape[0] * self.shape[2]),
                                       dtype=self.np_dtype)
        return self._t_jobs, self._parts, tp

    @property
    def shared(self) -> bool:
        """Whether the host's transposed products are cut into several blocks (shared with
        the helper threads; one block runs on the calling thread)."""
        return self._host and len(self._transposed_jobs()[0]) > 1

    def _apply(self, M: Any, vec: Tensor, rows: int) -> Tensor:
        return (M @ vec.to(self.values.dtype).reshape(-1, 1)).reshape(self.shape[0], rows)

    def _host_vector(self, vec: Tensor) -> np.ndarray:
        if vec.dtype != self.values.dtype or vec.requires_grad:
            vec = vec.detach().to(self.values.dtype)
        return np.ascontiguousarray(vec.numpy()).reshape(-1)

    @property
    def on_host(self) -> bool:
        """Whether the products run in scipy's kernels on the host (:meth:`matvec_into`)."""
        return self._host

    def matvec_into(self, p: np.ndarray, out: np.ndarray) -> None:
        """``out += J p`` on the host: ``p (B, n)``, ``out (B, m)``, C-contiguous numpy arrays.

        The kernel adds each row's products to the value already in ``out``
        (in the row's column order), in place: no allocation. Only for a
        BlockCSR on the host (:attr:`on_host`), arrays of the values' dtype.
        """
        _accumulate(self._a, self._checked(p), self._checked(out))

    def rmatvec_into(self, u: np.ndarray, out: np.ndarray) -> None:
        """``out += J^T u`` on the host: ``u (B, m)``, ``out (B, n)`` (as :meth:`matvec_into`).

        Scattered along ``J``'s rows in the transposed blocks (module
        notes): no transposed copy is made, and a problem's sums depend on
        its own structure only.
        """
        self.start_fused(None, None, None, self._checked(u), None, self._checked(out),
                         zero=False).wait()

    def start_fused(self, v: np.ndarray | None, y: np.ndarray | None, c: Any,
                    t: np.ndarray, tmp: np.ndarray | None, w: np.ndarray,
                    zero: bool = True) -> _Transposed:
        """Start ``t = J v - c y`` and ``w = J^T t`` in one pass (host); ``wait()`` finishes.

        ``v (B, n)``, ``y``, ``t``, ``tmp (B, m)``, ``w (B, n)``, C-contiguous
        arrays of the values' dtype; ``c`` a scalar or one coefficient per
        problem (``(B, 1)``). Each transposed block zeroes its rows of
        ``t``, sums ``J v`` into them, subtracts ``y c`` (formed in ``tmp``),
        and scatters them into ``w`` (zeroed by the block first) or into its
        partial vector; ``wait()`` adds the partials to ``w`` in block order.
        The caller may work meanwhile, and must not touch the arrays until
        ``wait()`` returns. With ``v`` None, ``t`` is an input (``w += J^T
        t`` with ``zero`` False: :meth:`rmatvec_into`).
        """
        jobs, parts, tp = self._transposed_jobs()
        B = self.shape[0]
        fwd = None
        if v is not None:
            c = np.asarray(c, dtype=self.np_dtype)
            c = c.reshape(()) if c.size == 1 and (B == 1 or c.ndim == 0) else c.reshape(B, 1)
            fwd = (self._checked(v), self._checked(y), c, self._checked(tmp))
        return _Transposed(jobs, self._checked(t), self._checked(w), parts, tp.adds,
                           self.shape, fwd, zero)

    def _checked(self, a: np.ndarray) -> np.ndarray:
        """``a`` flattened as a view (the kernel writes into it: a copy would lose the sums)."""
        if not (a.flags.c_contiguous and a.dtype == self.np_dtype):
            raise ValueError("the host products need C-contiguous arrays of the values' dtype")
        return a.reshape(-1)

    def matvec(self, p: Tensor) -> Tensor:
        """``J p`` for ``p (B, n)``: ``(B, m)``."""
        if self._host:  # numpy views both ways (no torch operation but the product's)
            B, m, _ = self.shape
            out = np.zeros(B * m, dtype=self.np_dtype)
            _accumulate(self._a, self._host_vector(p), out)
            return torch.from_numpy(out.reshape(B, m))
        return self._apply(self._a, p, self.shape[1])

    def rmatvec(self, u: Tensor) -> Tensor:
        """``J^T u`` for ``u (B, m)``: ``(B, n)`` (on the host in the transposed blocks)."""
        if self._host:
            B, _, n = self.shape
            out = np.zeros(B * n, dtype=self.np_dtype)
            self.rmatvec_into(self._host_vector(u), out)
            return torch.from_numpy(out.reshape(B, n))
        return self._apply(self._at, u, self.shape[2])

    def rows(self) -> Tensor:
        """Row of ``A`` (``b m + i``) of each value, ``(nnz,)``."""
        return self._plan.row

    def scaled(self, row_scale: Tensor | None, col_scale: Tensor | None) -> BlockCSR:
        """``diag(w) J diag(d)`` with the scalings in the values (same structure, no sort)."""
        vals = self.values
        if self._host:  # the same products in numpy, on this thread
            v = vals.detach().numpy()
            if row_scale is not None:
                v = v * row_scale.detach().reshape(-1).numpy()[self._plan.row.numpy()]
            if col_scale is not None:
                v = v * col_scale.detach().reshape(-1).numpy()[self.col.numpy()]
            return BlockCSR(None, plan=self._plan, values=torch.from_numpy(v), shape=self.shape)
        if row_scale is not None:
            vals = vals * row_scale.reshape(-1).index_select(0, self._plan.row)
        if col_scale is not None:
            vals = vals * col_scale.reshape(-1).index_select(0, self.col)
        return BlockCSR(None, plan=self._plan, values=vals, shape=self.shape)


class CSRPlan:
    """The CSR index arrays of a coalesced ``(B, m, n)`` structure (:func:`csr_plan`).

    Those of ``A``: ``row``, ``col``, ``crow`` (and ``host``, their int32/int64
    numpy forms on the CPU). Those of ``A^T`` (``perm_t``, the entry order of
    ``A^T``; ``crow_t``, ``col_t``) are computed on first use: the products of
    other devices need them (the host's ``J^T u`` scatters along ``A``'s rows
    in :meth:`transposed_blocks` instead).
    """

    __slots__ = ("indices", "shape", "row", "col", "crow", "host", "_t", "_tb", "__weakref__")

    def __init__(self, **arrays: Any) -> None:
        self._t: tuple | None = None
        self._tb: _TPlan | None = None
        for k, v in arrays.items():
            setattr(self, k, v)

    def transposed_blocks(self) -> _TPlan:
        """The host's transposed blocks of this structure (:func:`_transposed_plan`), made once."""
        if self._tb is None:
            self._tb = _transposed_plan(self.host, self.shape)
        return self._tb

    @property
    def perm_t(self) -> Tensor:
        return self._transpose()[0]

    @property
    def crow_t(self) -> Tensor:
        return self._transpose()[1]

    @property
    def col_t(self) -> Tensor:
        return self._transpose()[2]

    def _transpose(self) -> tuple:
        """``(perm_t, crow_t, col_t)``, computed once: the entries sorted by column, stably
        (rows stay sorted within a column, the order of a CSR -> CSC conversion)."""
        if self._t is None:
            B, m, n = self.shape
            col = self.col
            perm_t = torch.sort(col, stable=True).indices
            crow_t = torch.zeros(B * n + 1, dtype=torch.long, device=col.device)
            crow_t[1:] = torch.cumsum(torch.bincount(col, minlength=B * n), 0)
            self._t = (perm_t, crow_t, self.row.index_select(0, perm_t))
        return self._t


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
    host = None
    if dev.type == "cpu":  # numpy on this thread (no OpenMP region per pass over the entries)
        ix = idx.numpy()
        row_np = ix[0] * m + ix[1]  # sorted: the indices are coalesced (row-major)
        col_np = ix[0] * n + ix[2]
        small = max(idx.shape[1], B * m, B * n) < 2**31 - 1
        it = np.int32 if small else np.int64
        crow_np = np.zeros(B * m + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_np, minlength=B * m), out=crow_np[1:])
        host = (crow_np.astype(it), col_np.astype(it))
        row, col, crow = (torch.from_numpy(a) for a in (row_np, col_np, crow_np))
    else:
        row = idx[0] * m + idx[1]  # sorted: the indices are coalesced (row-major)
        col = idx[0] * n + idx[2]
        crow = torch.zeros(B * m + 1, dtype=torch.long, device=dev)
        crow[1:] = torch.cumsum(torch.bincount(row, minlength=B * m), 0)
    plan = CSRPlan(indices=idx, shape=(B, m, n), row=row, col=col, crow=crow, host=host)
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


class _Helper:
    """A daemon thread that runs the row blocks of products handed to it (:class:`_Product`).

    It waits on its own queue (no Python work while idle) and, per product,
    claims blocks from the product's shared counter until none is left. A
    queue item is any callable (the tests hand it one that blocks, to play a
    helper that gets no core).
    """

    __slots__ = ("queue", "thread")

    def __init__(self, index: int) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"torchimize_scipy_csr_{index}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        get = self.queue.get
        while True:
            item = get()
            if item is None:  # (at exit: :func:`_stop_helpers`)
                return
            item()


_HELPERS: list[_Helper] = []
_HELPERS_LOCK = threading.Lock()


def _helpers(count: int) -> list[_Helper]:
    """The first ``count`` helper threads of the process, started on first need."""
    with _HELPERS_LOCK:
        while len(_HELPERS) < count:
            _HELPERS.append(_Helper(len(_HELPERS)))
        return _HELPERS[:count]


def _reset_helpers() -> None:  # pragma: no cover - runs in a forked child
    """A forked child has none of the parent's threads: its helpers start anew."""
    global _HELPERS_LOCK
    _HELPERS_LOCK = threading.Lock()
    _HELPERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_helpers)


def _stop_helpers(timeout: float = 5.0) -> None:
    """End the helper threads (at interpreter exit): each finishes what it runs and
    returns, so that none is left inside a torch, LAPACK or OpenMP call while the
    interpreter and those runtimes are torn down (a daemon thread that wakes up
    during finalisation is stopped wherever it is). A later product starts new ones."""
    with _HELPERS_LOCK:
        helpers = list(_HELPERS)
        _HELPERS.clear()
    for helper in helpers:
        helper.queue.put(None)
    for helper in helpers:
        helper.thread.join(timeout)


atexit.register(_stop_helpers)


def _row_blocks(values: np.ndarray, index: tuple, shape: tuple[int, int]) -> list[_Block]:
    """Row blocks of equal entry counts of a CSR matrix over existing arrays (no copy).

    One block for one torch thread, else two per thread (at most ``nnz /
    _BLOCK_NNZ`` of them), each its rows' offsets (from 0) and views of the
    column indices and values: more blocks than threads let the calling
    thread take over the blocks that a busy helper has not claimed
    (:class:`_Product`). No scipy matrix is built per block: its format
    check copies index and value views that are less than half of their
    arrays (``scipy._lib._util._prune_array``), which cost the bundle
    adjustment of ``bench_sparse.py`` 104 copies per solve.
    """
    indptr, indices = index
    nnz = int(indptr[-1])
    k = _block_count(nnz, shape[0])
    cuts = np.unique(np.r_[0, np.searchsorted(indptr, np.arange(1, k) * (nnz / k)), shape[0]])
    blocks = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        a, b = int(indptr[lo]), int(indptr[hi])
        ptr = indptr[lo:hi + 1]
        if a != 0:
            ptr = ptr - indptr[lo]  # (the same integer type: scipy's kernel needs one type)
        blocks.append(_Block(ptr, indices[a:b], values[a:b], int(shape[1]), int(lo), int(hi)))
    return blocks


def _block_count(nnz: int, rows: int) -> int:
    """How many row blocks :func:`_row_blocks` cuts a host matrix into (before merging cuts)."""
    threads = product_threads()
    return int(max(1, min(threads if threads == 1 else 2 * threads, nnz // _BLOCK_NNZ, rows)))


#: a problem of at least this many entries, and at least :data:`SPLIT_PER_COLUMN` per
#: column, gets several transposed blocks, each summed into a partial vector of its own
#: (:func:`_transposed_plan`; others: one block, scipy's order). A partial costs a pass
#: over the problem's ``n`` columns to zero and one to add, which pays only where the
#: blocks' entries outnumber them: the bundle adjustment of ``bench_sparse.py`` (746,496
#: entries, 31 a column) runs fastest in two blocks on 2 cores, Broyden's tridiagonal
#: Jacobian (3 a column) uncut, on one core or two (RESULTS §38)
SPLIT_NNZ = 2 * _BLOCK_NNZ
SPLIT_PER_COLUMN = 8
#: entries per transposed block beyond the first two, and the most blocks of a problem
_SPLIT_BLOCK_NNZ = 1_000_000
_SPLIT_MAX = 8


def split_counts(nnz: Any, n: int) -> np.ndarray:
    """How many transposed blocks problems of ``nnz`` entries and ``n`` columns are cut
    into (1: not cut).

    A function of each problem's own size only, so that its ``J^T u`` sums
    depend neither on the thread count nor on its neighbours.
    """
    nnz = np.asarray(nnz, dtype=np.int64)
    small = (nnz < SPLIT_NNZ) | (nnz < SPLIT_PER_COLUMN * n)
    return np.where(small, 1, np.clip(nnz // _SPLIT_BLOCK_NNZ, 2, _SPLIT_MAX))


class _TPlan(NamedTuple):
    """The transposed blocks of a host CSR structure (:func:`_transposed_plan`).

    ``blocks``: per block ``(indptr from 0, column indices view, a, b, lo, hi,
    part, b0, b1)``: rows ``lo:hi`` (entries ``a:b``) of problems ``b0:b1``
    (one problem when it is cut), summed into ``w`` (``part`` 0) or into
    partial vector ``part - 1``; ``adds``: ``(part, c0, c1)``, the column
    ranges where a partial is added to ``w``, in order; ``parts``: how many
    partial vectors.
    """

    blocks: list[tuple]
    adds: list[tuple[int, int, int]]
    parts: int


class _TJob(NamedTuple):
    """One transposed block over a Jacobian's values (:class:`_TPlan`'s ``blocks``): its
    rows as a :class:`_Block` of ``J``, its partial vector and its problems ``b0:b1``."""

    block: _Block
    part: int
    b0: int
    b1: int


def _transposed_plan(index: tuple, shape: tuple) -> _TPlan:
    """Cut a host CSR structure ``(B, m, n)`` into transposed blocks (module notes).

    Problem ``b`` (rows ``b m ..``) of ``nnz_b`` entries is cut into
    :func:`split_counts` blocks of equal entry counts; consecutive uncut
    problems share blocks of about ``_BLOCK_NNZ`` entries (their columns are
    disjoint, so the sums are those of each alone), cut at problem
    boundaries only. The loop runs over blocks, not problems.
    """
    indptr, indices = index
    B, m, n = shape
    starts = indptr[np.arange(B + 1) * m].astype(np.int64)
    counts = np.diff(starts)
    k = split_counts(counts, n)
    cut = k > 1
    # a block of uncut problems starts at a cut problem's end, or where the entries
    # pass another multiple of _BLOCK_NNZ
    bucket = starts[:-1] // _BLOCK_NNZ
    first = np.ones(B, dtype=bool)
    first[1:] = cut[1:] | cut[:-1] | (bucket[1:] != bucket[:-1])
    heads = np.flatnonzero(first)
    ends = np.r_[heads[1:], B]
    blocks: list[tuple] = []
    adds: dict[int, list[list[int]]] = {}
    parts = 0

    def block(lo: int, hi: int, part: int, b0: int, b1: int) -> None:
        a, b = int(indptr[lo]), int(indptr[hi])
        ptr = indptr[lo:hi + 1]
        if a != 0:
            ptr = ptr - indptr[lo]  # (the same integer type: scipy's kernels need one type)
        blocks.append((ptr, indices[a:b], a, b, lo, hi, part, b0, b1))

    for b0, b1 in zip(heads.tolist(), ends.tolist(), strict=True):
        if not cut[b0]:
            block(b0 * m, b1 * m, 0, b0, b1)
            continue
        kb = int(k[b0])
        rows = indptr[b0 * m:(b0 + 1) * m + 1]
        edges = np.unique(np.r_[0, np.searchsorted(rows, starts[b0] + np.arange(1, kb)
                                                   * (counts[b0] / kb)), m])
        for part, (lo, hi) in enumerate(zip(edges[:-1].tolist(), edges[1:].tolist(),
                                            strict=True)):
            block(b0 * m + lo, b0 * m + hi, part, b0, b0 + 1)
            if part:
                spans = adds.setdefault(part, [])
                if spans and spans[-1][1] == b0 * n:
                    spans[-1][1] = (b0 + 1) * n  # contiguous with the previous problem's
                else:
                    spans.append([b0 * n, (b0 + 1) * n])
        parts = max(parts, len(edges) - 2)
    order = [(part, c0, c1) for part in sorted(adds) for c0, c1 in adds[part]]
    return _TPlan(blocks, order, parts)


class _Block(NamedTuple):
    """Rows ``lo:hi`` of a host CSR matrix of ``n_col`` columns: ``indptr`` from 0, and
    views of ``indices`` and ``data``."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    n_col: int
    lo: int
    hi: int

    @property
    def nnz(self) -> int:
        return self.data.size


def _accumulate_block(block: _Block, w: np.ndarray, out: np.ndarray, zero: bool) -> None:
    """``out[lo:hi] += A w`` for one row block, in place (after zeroing it with ``zero``)."""
    indptr, indices, data, n_col, lo, hi = block
    part = out[lo:hi]
    if zero:
        part.fill(0)
    if _csr_matvec is not None:
        _csr_matvec(hi - lo, n_col, indptr, indices, data, w, part)
    else:  # pragma: no cover - scipy without its kernel module: the public product
        part += sp.csr_array((data, indices, indptr), shape=(hi - lo, n_col)) @ w


class SharedJobs:
    """Jobs ``0 .. count - 1`` run once each, by the caller and helper threads.

    The jobs are handed to ``helpers`` helper threads (:func:`_helpers`) when
    they are created. Every thread that works on them, the caller in
    :meth:`wait` included, claims the next job from one shared counter until
    none is left, so a job runs exactly once, on whichever thread got to it
    first: a helper that gets no core (a loaded machine) leaves its jobs to
    the caller instead of stalling it, and one that comes late finds nothing
    to do. The caller then waits only for the helpers that entered before
    the last job was claimed. Compared with a thread pool's futures this
    costs one queue put per helper and one lock per helper that takes part,
    not a future per job.

    ``next`` on :func:`itertools.count` and ``list.append`` are atomic under
    the GIL; a helper appends its lock before it claims a job, and the
    caller reads the list after its own claim failed, so it sees every
    helper that ran a job. Subclasses set their fields before calling
    ``__init__`` (a helper may start at once) and define :meth:`_run`.
    """

    __slots__ = ("count", "claims", "entered", "error")

    def __init__(self, count: int, helpers: int) -> None:
        self.count = count
        self.claims = itertools.count()
        self.entered: list[Any] = []  # the locks of the helpers taking part
        self.error: BaseException | None = None
        for helper in _helpers(min(helpers, count)):
            helper.queue.put(self._help)

    def _run(self, i: int) -> None:  # pragma: no cover - defined by the subclasses
        raise NotImplementedError

    def _work(self) -> None:
        k, run = self.count, self._run
        for i in self.claims:
            if i >= k:
                return
            run(i)

    def _help(self) -> None:
        """A helper's part (on the helper's thread)."""
        lock = threading.Lock()
        lock.acquire()
        self.entered.append(lock)
        try:
            self._work()
        except BaseException as e:  # noqa: BLE001 - handed to the caller in wait()
            self.error = e
        finally:
            lock.release()

    def wait(self) -> None:
        """Run the jobs no helper has claimed, then wait for the helpers' jobs."""
        self._work()
        for lock in list(self.entered):
            lock.acquire()
        if self.error is not None:
            raise self.error


#: per calling thread: the thread count the products use while the caller's own
#: torch count is held at 1 (:func:`~torchimize_scipy._blas_threads.serial_torch`)
_LOCAL = threading.local()


def product_threads() -> int:
    """The threads the calling thread's products may use: torch's intra-op count, or
    the count it had before :func:`~torchimize_scipy._blas_threads.serial_torch` set
    this thread's to 1."""
    held = getattr(_LOCAL, "threads", None)
    return torch.get_num_threads() if held is None else held


#: the machine's CPU count, read once: ``os.cpu_count()`` cost 45-75 us a call here
#: (once per product: 50-80 ms of the calling thread per bundle adjustment solve)
_CPUS = os.cpu_count() or 1


def helper_threads() -> int:
    """How many helper threads work beside the caller: the products' threads
    (:func:`product_threads`, at most the CPU count) less the caller's."""
    return max(0, min(product_threads(), _CPUS) - 1)


def lapack_helpers() -> int:
    """How many helper threads may share a batch of small factorisations with the caller
    (:func:`~torchimize_scipy._engine.linalg.thin_svd`): as :func:`helper_threads`, from
    the count the caller had before :func:`~torchimize_scipy._blas_threads.serial_blas`
    held its own at 1 (a batch's tail runs single-threaded, and its SVDs still use
    the other cores, one matrix per thread at a time)."""
    outer = getattr(_LOCAL, "outer", None)
    threads = product_threads() if outer is None else outer
    return max(0, min(threads, _CPUS) - 1)


class CallsOnHelpers(SharedJobs):
    """Calls without arguments run once each, shared with the helpers (:class:`SharedJobs`).

    For work a caller can hand off while it does something else (the grouped
    differences' gathers while the next group's residuals are evaluated);
    ``wait()`` runs what no helper has started, and re-raises a helper's error.
    """

    __slots__ = ("calls",)

    def __init__(self, calls: list[Any], helpers: int | None = None) -> None:
        self.calls = calls
        super().__init__(len(calls), helper_threads() if helpers is None else helpers)

    def _run(self, i: int) -> None:
        self.calls[i]()


class _Product(SharedJobs):
    """``out (+)= A w`` over the row blocks of ``A``, shared by the caller and the helpers.

    One job per block (:class:`SharedJobs`), handed to up to ``blocks - 1``
    helpers. Each block writes only its own rows, and a row's sum is the
    same loop whoever runs it.
    """

    __slots__ = ("blocks", "w", "out", "zero")

    def __init__(self, blocks: list[_Block], w: np.ndarray, out: np.ndarray,
                 zero: bool) -> None:
        self.blocks, self.w, self.out, self.zero = blocks, w, out, zero
        super().__init__(len(blocks), helper_threads())

    def _run(self, i: int) -> None:
        _accumulate_block(self.blocks[i], self.w, self.out, self.zero)


class _Transposed(SharedJobs):
    """The transposed blocks of one product, shared by the caller and the helpers.

    Per block (:class:`_TJob`): with ``fwd = (v, y, c, tmp)`` its rows of
    ``t`` are first formed as ``J v - y c`` (zeroed, summed, ``tmp = y c``
    subtracted: the operations of a separate product); then they are
    scattered into ``w`` (part 0, zeroed over the block's problems first with
    ``zero``) or into the block's partial vector (zeroed over its problem
    first). :meth:`wait` adds the partials to ``w`` in block order.
    """

    __slots__ = ("jobs", "t", "w", "parts", "adds", "m", "n", "fwd", "zero")

    def __init__(self, jobs: list[_TJob], t: np.ndarray, w: np.ndarray,
                 parts: np.ndarray | None, adds: list, shape: tuple, fwd: tuple | None,
                 zero: bool) -> None:
        self.jobs, self.t, self.w, self.parts, self.adds = jobs, t, w, parts, adds
        _, self.m, self.n = shape
        self.fwd, self.zero = fwd, zero
        # (one block runs on the calling thread alone: no helper is woken for it)
        super().__init__(len(jobs), helper_threads() if len(jobs) > 1 else 0)

    def _run(self, i: int) -> None:
        block, part, b0, b1 = self.jobs[i]
        lo, hi = block.lo, block.hi
        m, n = self.m, self.n
        rows = self.t[lo:hi]
        if self.fwd is not None:
            v, y, c, tmp = self.fwd
            _accumulate_block(block, v, self.t, True)  # (the rows zeroed, then J v summed)
            if c.ndim == 0:
                yc = np.multiply(y[lo:hi], c, out=tmp[lo:hi])
            elif lo == b0 * m and hi == b1 * m:  # whole problems: one coefficient each
                k = b1 - b0
                yc = np.multiply(y[lo:hi].reshape(k, m), c[b0:b1],
                                 out=tmp[lo:hi].reshape(k, m)).reshape(-1)
            else:  # rows of one problem
                yc = np.multiply(y[lo:hi], c[b0], out=tmp[lo:hi])
            np.subtract(rows, yc, out=rows)
        if part:
            dest = self.parts[part - 1]
            dest[b0 * n:b1 * n].fill(0)
        else:
            dest = self.w
            if self.zero:
                dest[b0 * n:b1 * n].fill(0)
        _scatter(block, rows, dest)

    def wait(self) -> None:
        super().wait()
        for part, c0, c1 in self.adds:
            seg = self.w[c0:c1]
            np.add(seg, self.parts[part - 1][c0:c1], out=seg)


def _scatter(block: _Block, rows: np.ndarray, out: np.ndarray) -> None:
    """``out += A_block^T rows`` in scipy's CSC kernel over the block's CSR arrays."""
    indptr, indices, data, n_col = block.indptr, block.indices, block.data, block.n_col
    if _csc_matvec is not None:
        _csc_matvec(n_col, rows.size, indptr, indices, data, rows, out)
    else:  # pragma: no cover - scipy without its kernel module: the public product
        out += sp.csr_array((data, indices, indptr), shape=(rows.size, n_col)).T @ rows


def _accumulate(blocks: list[_Block], w: np.ndarray, out: np.ndarray, zero: bool = False) -> None:
    """``out += A w`` (``out = A w`` with ``zero``) for the row blocks of ``A``.

    ``w`` and ``out`` are 1-D, C-contiguous, of the values' dtype. One block
    runs here; several are shared with the helpers (:class:`_Product`); scipy's
    kernel releases the GIL, so they run at the same time.
    """
    if len(blocks) == 1:
        _accumulate_block(blocks[0], w, out, zero)
        return
    _Product(blocks, w, out, zero).wait()
