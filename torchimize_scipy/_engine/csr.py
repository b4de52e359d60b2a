"""Sparse ``(B, m, n)`` Jacobians as block-diagonal CSR matrices, and their products.

A batch of sparse Jacobians is one block-diagonal matrix of ``B m`` rows and
``B n`` columns. :class:`BlockCSR` keeps a CSR form of it and one of its
transpose (the transpose's entry order found once per sparsity structure,
:func:`csr_plan`), so that both ``J v`` and ``J^T u`` are row-wise sparse dot
products. On the CPU they run in scipy's compiled CSR kernel over the
tensors' memory, in row blocks of equal entry counts (two per torch thread
when torch has several: :func:`product_threads`, which keeps the caller's
count while a step rule holds its torch count at 1) shared between the calling thread and helper
threads of the process (:class:`_Product`: every thread claims the next
block from one counter, so a helper that gets no core never stalls a
product; each row is one loop whoever runs it, so the result does not depend
on the split); on other devices in torch's CSR kernel. On the host the
transposed CSR is made only when it pays: for ``J^T u`` in parallel row
blocks. With one block (one torch thread, or a small matrix), and for the
one-off ``J^T u`` of a Jacobian (the gradient), the product scatters along
``J``'s rows in scipy's CSC kernel instead (what scipy's ``J.T @ u`` runs),
summing each entry over the rows in the same increasing order: no transposed
copy per Jacobian, and one matrix streamed per LSMR iteration instead of two.
For LSMR's ``A w - c y`` of one problem the row blocks also form ``y c`` and
the difference over their own rows (:meth:`BlockCSR.sub_into`): the same
elementwise operations, shared by the threads. A row block is its offsets and
views of the index and value arrays, handed to the kernel as they are (a
scipy matrix per block would copy views under half of their array in its
format check). Used by :mod:`.operator` and, on numpy arrays without
allocation, by :mod:`.lsmr`.
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
except ImportError:  # pragma: no cover - a scipy that moved it: the transposed CSR instead
    _csc_matvec = None


class BlockCSR:
    """The products of a sparse ``(B, m, n)`` Jacobian: block-diagonal CSR forms of J and J^T.

    ``A (B m, B n)`` holds problem ``b``'s block at rows ``b m ..`` and columns
    ``b n ..``; ``A^T (B n, B m)`` is stored as a second CSR matrix (its values
    a gather of ``A``'s), so that both products read their matrix row by row;
    on the host that copy is made on first need (module notes).
    On the CPU the products run in scipy's compiled CSR kernel on numpy views
    of the tensors (no copy; about twice as fast as torch's CPU sparse kernel
    on one thread, ``benchmarks/bench_sparse.py --case matvec``); a large
    matrix is cut into row blocks of equal entry counts, two per torch thread
    (``torch.get_num_threads()``; one block for one thread), multiplied in
    parallel by the calling thread and the helpers (scipy's kernel releases the
    GIL; each row's sum is the same whatever the cut, so the result does not
    depend on the thread count). :meth:`matvec_into`, :meth:`rmatvec_into`
    and :meth:`start_matvec` work on numpy arrays of the caller's (LSMR's
    buffers). On other devices the products run in torch's CSR kernel.

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
            self._at_blocks: list[_Block] | None = None  # J^T's CSR, made on first need
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

    @property
    def _at(self) -> Any:
        """The CSR form of ``A^T``: on the host its row blocks, made on first use.

        On the host a Jacobian whose transposed products are few (the
        unscaled one of an outer iteration: ``g = J^T f`` once) never needs
        it (:meth:`rmatvec` scatters along ``A``'s rows instead); the one LSMR
        multiplies with hundreds of times gets it once, one gather of the values.
        """
        if self._at_blocks is None:
            B, m, n = self.shape
            vals_t = np.take(self._vals, self._plan.perm_t.numpy())
            self._at_blocks = _row_blocks(vals_t, self._plan.host_t, (B * n, B * m))
        return self._at_blocks

    @_at.setter
    def _at(self, value: Any) -> None:
        self._at_blocks = value

    def _apply(self, M: Any, vec: Tensor, rows: int) -> Tensor:
        B = self.shape[0]
        if self._host:  # numpy views both ways (no torch operation but the product's)
            w = self._host_vector(vec)
            out = np.zeros(B * rows, dtype=self.np_dtype)
            _accumulate(M, w, out)
            return torch.from_numpy(out.reshape(B, rows))
        return (M @ vec.to(self.values.dtype).reshape(-1, 1)).reshape(B, rows)

    def _host_vector(self, vec: Tensor) -> np.ndarray:
        if vec.dtype != self.values.dtype or vec.requires_grad:
            vec = vec.detach().to(self.values.dtype)
        return np.ascontiguousarray(vec.numpy()).reshape(-1)

    @property
    def on_host(self) -> bool:
        """Whether the products run in scipy's kernel on the host (:meth:`matvec_into`)."""
        return self._host

    def matvec_into(self, p: np.ndarray, out: np.ndarray) -> None:
        """``out += J p`` on the host: ``p (B, n)``, ``out (B, m)``, C-contiguous numpy arrays.

        The kernel adds each row's products to the value already in ``out``
        (in the row's column order), in place: no allocation, and a caller
        that starts ``out`` at ``-c u`` gets ``J p - c u`` in the same pass.
        Only for a BlockCSR on the host (:attr:`on_host`), arrays of the
        values' dtype.
        """
        _accumulate(self._a, self._checked(p), self._checked(out))

    def rmatvec_into(self, u: np.ndarray, out: np.ndarray) -> None:
        """``out += J^T u`` on the host: ``u (B, m)``, ``out (B, n)`` (as :meth:`matvec_into`).

        With ``A`` in one row block (one torch thread, or a small matrix) the
        product scatters along ``A``'s rows (:meth:`_scatter_into`, as scipy's
        ``J.T @ u``): no transposed copy is made, and the solver streams one
        matrix instead of two. With several blocks it runs on the row blocks
        of ``A^T``'s CSR, in parallel. Both sum each entry over the rows in
        increasing order.
        """
        if len(self._a) == 1 and self._at_blocks is None and _csc_matvec is not None:
            self._scatter_into(self._checked(u), self._checked(out))
        else:
            _accumulate(self._at, self._checked(u), self._checked(out))

    def _scatter_into(self, u: np.ndarray, out: np.ndarray) -> None:
        """``out += A^T u`` (flat host arrays) in scipy's CSC kernel over ``A``'s CSR arrays."""
        B, m, n = self.shape
        indptr, indices = self._plan.host
        _csc_matvec(B * n, B * m, indptr, indices, self._vals, u, out)

    def start_matvec(self, p: np.ndarray, out: np.ndarray,
                     sub: tuple | None = None) -> _Product | None:
        """Start ``out = J p`` on the helper threads (host, several row blocks); None otherwise.

        The caller may work meanwhile, must not touch ``p``, ``out`` or the
        arrays of ``sub``, and finishes the product with ``wait()``. With
        ``sub = (y, c, tmp)`` each row block then subtracts ``c y`` from its
        rows (:meth:`sub_into`).
        """
        if not self._host or len(self._a) == 1:
            return None
        return _Product(self._a, self._checked(p), self._checked(out), True,
                        self._checked_sub(sub))

    def sub_into(self, forward: bool, w: np.ndarray, c: Any, y: np.ndarray, out: np.ndarray,
                 tmp: np.ndarray) -> bool:
        """``out = J w - c y`` (``forward``) or ``J^T w - c y`` in parallel row blocks, if cut.

        Each block zeroes its rows of ``out``, sums its products into them,
        then writes ``tmp = y c`` and ``out - tmp`` over the same rows: the
        operations, and so the values, of a zeroed product followed by
        ``np.subtract(out, np.multiply(y, c, out=tmp), out=out)``, with those
        two passes shared between the threads while the rows are in cache.
        For one problem (``c`` a scalar or a single entry) on the host, with
        the matrix cut into several blocks; returns False (nothing done)
        otherwise.
        """
        if not self._host or len(self._a) == 1 or self.shape[0] != 1 or np.size(c) != 1:
            return False
        blocks = self._a if forward else self._at
        sub = self._checked_sub((y, c, tmp))
        _Product(blocks, self._checked(w), self._checked(out), True, sub).wait()
        return True

    def _checked_sub(self, sub: tuple | None) -> tuple | None:
        if sub is None:
            return None
        y, c, tmp = sub
        if isinstance(c, np.ndarray):
            c = c.reshape(())  # (one problem: the same multiplications as by its (1, 1) form)
        return self._checked(y), c, self._checked(tmp)

    def _checked(self, a: np.ndarray) -> np.ndarray:
        """``a`` flattened as a view (the kernel writes into it: a copy would lose the sums)."""
        if not (a.flags.c_contiguous and a.dtype == self.np_dtype):
            raise ValueError("the host products need C-contiguous arrays of the values' dtype")
        return a.reshape(-1)

    def matvec(self, p: Tensor) -> Tensor:
        """``J p`` for ``p (B, n)``: ``(B, m)``."""
        return self._apply(self._a, p, self.shape[1])

    def rmatvec(self, u: Tensor) -> Tensor:
        """``J^T u`` for ``u (B, m)``: ``(B, n)``.

        On the host, before ``A^T``'s CSR is made, the product scatters along
        ``A``'s rows in scipy's CSC kernel (``A``'s CSR read as the CSC form
        of ``A^T``: what ``J.T @ u`` runs in scipy), one pass on this thread,
        with no transposed copy of the values. Each output entry is summed
        over the rows in increasing order, as the CSR form of ``A^T`` sums it.
        """
        if self._host and self._at_blocks is None and _csc_matvec is not None:
            B, _, n = self.shape
            out = np.zeros(B * n, dtype=self.np_dtype)
            self._scatter_into(self._host_vector(u), out)
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
    ``A^T``; ``crow_t``, ``col_t``; ``host_t``) are computed on first use: on
    the host only parallel ``J^T u`` products need them (:class:`BlockCSR`).
    """

    __slots__ = ("indices", "shape", "row", "col", "crow", "host", "_t", "__weakref__")

    def __init__(self, **arrays: Any) -> None:
        self._t: tuple | None = None
        for k, v in arrays.items():
            setattr(self, k, v)

    @property
    def perm_t(self) -> Tensor:
        return self._transpose()[0]

    @property
    def crow_t(self) -> Tensor:
        return self._transpose()[1]

    @property
    def col_t(self) -> Tensor:
        return self._transpose()[2]

    @property
    def host_t(self) -> tuple | None:
        return self._transpose()[3]

    def _transpose(self) -> tuple:
        """``(perm_t, crow_t, col_t, host_t)``, computed once."""
        if self._t is None:
            B, m, n = self.shape
            if self.host is not None:
                crow, col = self.host
                # the order of the entries in A^T: scipy's CSR -> CSC conversion (a compiled
                # counting sort, rows kept sorted within a column) of the entries' numbers
                order = sp.csr_array((np.arange(col.size, dtype=np.int64), col, crow),
                                     shape=(B * m, B * n), copy=False).tocsc()
                it = col.dtype
                host_t = (order.indptr.astype(it, copy=False),
                          order.indices.astype(it, copy=False))
                self._t = (torch.from_numpy(order.data),
                           torch.from_numpy(host_t[0].astype(np.int64)),
                           torch.from_numpy(host_t[1].astype(np.int64)), host_t)
            else:
                col = self.col
                perm_t = torch.sort(col, stable=True).indices  # rows stay sorted in a column
                crow_t = torch.zeros(B * n + 1, dtype=torch.long, device=col.device)
                crow_t[1:] = torch.cumsum(torch.bincount(col, minlength=B * n), 0)
                self._t = (perm_t, crow_t, self.row.index_select(0, perm_t), None)
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


def cuts_rows(nnz: int, rows: int) -> bool:
    """Whether a host Jacobian of ``nnz`` entries and ``rows`` rows gets several row blocks.

    Then its ``J^T u`` products run on the CSR form of ``J^T`` (:class:`BlockCSR`),
    whose index arrays (:attr:`CSRPlan.perm_t`) are worth making ahead.
    """
    return _block_count(nnz, rows) > 1


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
    same loop whoever runs it. With ``sub = (y, c, tmp)`` a block then
    writes ``tmp = y c`` and ``out - tmp`` over its rows (1-D arrays, ``c`` a
    scalar: :meth:`BlockCSR.sub_into`).
    """

    __slots__ = ("blocks", "w", "out", "zero", "sub")

    def __init__(self, blocks: list[_Block], w: np.ndarray, out: np.ndarray, zero: bool,
                 sub: tuple | None = None) -> None:
        self.blocks, self.w, self.out, self.zero, self.sub = blocks, w, out, zero, sub
        super().__init__(len(blocks), helper_threads())

    def _run(self, i: int) -> None:
        block = self.blocks[i]
        _accumulate_block(block, self.w, self.out, self.zero)
        if self.sub is not None:
            y, c, tmp = self.sub
            lo, hi = block.lo, block.hi
            part = self.out[lo:hi]
            np.subtract(part, np.multiply(y[lo:hi], c, out=tmp[lo:hi]), out=part)


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
