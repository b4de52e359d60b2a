r"""Sparse finite-difference Jacobians: column grouping and grouped differences.

With ``jac_sparsity`` the caller states which entries of the ``(m, n)``
Jacobian may be nonzero. Columns that never share a nonzero row can be
perturbed together: one evaluation of the residuals then yields all of them
(Curtis, Powell & Reid, "On the estimation of sparse Jacobian matrices",
IMA J. Appl. Math. 13, 1974). A Jacobian of ``G`` groups costs ``G``
evaluations ('2-point', 'cs') or ``2 G`` ('3-point') instead of ``n`` or
``2 n``, and it is returned as a sparse tensor, never densified.

Grouping
--------
Any grouping in which no two columns of a group share a row gives the same
Jacobian (each entry is still one difference of the residual of its row), so
the grouping is free to aim at fewer groups, i.e. fewer evaluations.
Both groupings here are greedy first fit (each column, in a fixed order, takes
the lowest group none of whose columns it shares a row with), a greedy
colouring of the column intersection graph:

* :func:`group_columns` with an int ``order`` enumerates the columns in the
  order of ``numpy.random.RandomState(order).permutation(n)``: scipy's
  grouping, exactly (scipy builds one group at a time, taking every column in
  that order that fits; both give every column the same group).
* :func:`fewest_groups`, what ``jac_sparsity`` uses, enumerates the columns
  largest first (Welsh & Powell, "An upper bound for the chromatic number of a
  graph and its application to timetabling problems", Comput. J. 10, 1967):
  by decreasing :math:`\sum_{i: S_{ij} \ne 0} \mathrm{nnz}(S_{i,:})`, an
  upper bound of the column's degree, ties in scipy's random order. A bundle
  adjustment structure (a camera's 9 columns and a point's 3 share every row
  of an observation) gets 12 groups, the least possible, against scipy's 23.
  Where the first fit in the columns' own order gives fewer groups, that
  grouping is taken instead: a banded structure then gets ``2 b + 1``, the
  least possible (tridiagonal: 3, against 4-5 from scipy's order).

Both run in scipy's compiled greedy grouping (``group_columns`` of
``scipy.optimize._numdiff``, which takes any enumeration order: first fit in
that order, 0.01 s on the bundle adjustment of ``bench_sparse.py``). Where a
scipy lacks it, the same first fit runs in numpy (:func:`_first_fit`, ten
times slower on that structure, the same groups):
first fit in a fixed order is computed in rounds in the manner of Jones &
Plassmann ("A parallel graph coloring heuristic", SIAM J. Sci. Comput. 14(3),
1993): a column is grouped once it comes first, among the columns not yet
grouped, in every one of its rows (then every earlier column it shares a row
with is grouped), with the lowest group absent from those rows. The columns of
a row are grouped in the order, so each row only moves a pointer along its
columns sorted by position; the groups present in a row are a bit mask. A
round is a handful of vectorised numpy operations on the newly grouped
columns only, and the whole costs a few passes over the structure.

Grouped differences
-------------------
Steps, bounds and formulas are those of
:func:`torchimize_scipy._jacobian.finite_difference_jacobian` applied to all
columns of a group at once: for group ``k`` with indicator ``e_k``,
``J[i, j] = (f(x + h * e_k)[i] - f(x)[i]) / dx[j]`` for each structural
nonzero ``(i, j)`` with ``j`` in group ``k`` ('2-point'; '3-point' and 'cs'
likewise, a '3-point' column next to a bound taking the one-sided second-order
formula). The perturbed points of all groups of all problems of a batch go to
the residual function in ONE call of shape ``(B G, n)`` (``(2 B G, n)`` for
'3-point'): a vectorised (or vmappable) torch function evaluates them
together, a numpy function of one point is called once per group, as scipy
does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from ._arrays import to_host
from ._blas_threads import serial_torch
from ._engine.csr import CallsOnHelpers, csr_plan, helper_threads
from ._jacobian import (
    _absolute_step,
    _adjust_one_sided,
    complex_part,
    default_rel_step,
    three_point_points,
)
from ._user_functions import RowwiseFunction

try:  # scipy's compiled greedy grouping (any enumeration order); numpy's first fit otherwise
    from scipy.optimize._numdiff import group_columns as _compiled_grouping
except ImportError:  # pragma: no cover - a scipy that moved it
    _compiled_grouping = None

__all__ = ["SparsityPattern", "check_jac_sparsity", "fewest_groups", "group_columns",
           "grouped_difference"]


def _structure_csr(A: Any, stored: bool = False) -> sp.csr_array:
    """The pattern of ``A`` (array_like or scipy sparse) as a canonical boolean CSR array.

    The nonzeros, or with ``stored`` every stored entry of a sparse ``A``
    (explicit zeros included: scipy groups the columns of a sparse structure
    by its stored entries). Indices sorted within rows, no duplicates.
    """
    return _structures(A)[0 if stored else 1]


def _structures(A: Any) -> tuple[sp.csr_array, sp.csr_array]:
    """``(stored entries, nonzeros)`` of ``A`` as :func:`_structure_csr` gives them.

    One conversion for both; they are the same array unless a sparse ``A``
    stores zeros.
    """
    if sp.issparse(A):
        S = sp.csr_array(A)  # (may share the caller's arrays: nothing below writes to S)
        if not S.has_canonical_format:
            S = S.copy()
            S.sum_duplicates()
        nonzero = S.data != 0
        both = nonzero.all()
        out = []
        for data in ((nonzero,) if both else (np.ones(S.data.shape, dtype=bool), nonzero)):
            # index arrays of our own: eliminate_zeros and sort_indices work in place
            T = sp.csr_array((data, S.indices.copy(), S.indptr.copy()), shape=S.shape)
            T.eliminate_zeros()
            T.sort_indices()
            out.append(T)
        return (out[0], out[0]) if both else (out[0], out[1])
    dense = np.atleast_2d(np.asarray(to_host(A)))
    if dense.ndim != 2:
        raise ValueError("`jac_sparsity` must be 2-dimensional.")
    S = sp.csr_array(dense != 0)
    S.eliminate_zeros()
    S.sort_indices()
    return S, S


def _first_fit(S: sp.csr_array, position: np.ndarray) -> np.ndarray:
    """Greedy first fit of the columns of ``S`` in the order of ``position``, by rounds.

    ``position[j]`` is column ``j``'s place in the order. Returns the group
    of each column (module notes); inside, columns are named by position.
    """
    m, n = S.shape
    # each row's columns renamed by their position and sorted: a row's columns are
    # grouped in this order, so a pointer per row finds the next one
    P = sp.csr_array((np.ones(S.indices.size, dtype=np.int8), position[S.indices], S.indptr),
                     shape=(m, n))
    P.sum_duplicates()
    ridx = P.indices.astype(np.int64)
    head = P.indptr[:-1].astype(np.int64)
    rend = P.indptr[1:].astype(np.int64)
    C = P.tocsc()  # the rows of each column (compiled conversion)
    cptr = C.indptr.astype(np.int64)
    col_rows = C.indices.astype(np.int64)
    col_nnz = np.diff(cptr)
    leading = np.zeros(n, dtype=np.int64)  # rows in which each column comes first
    fresh = np.zeros(n, dtype=bool)
    groups = np.full(n, -1, dtype=np.int64)
    masks = np.zeros((m, 1), dtype=np.uint64)  # groups present in each row, 64 per word

    def advance(rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` move to their next column; the columns now first in all their rows."""
        rows = rows[head[rows] < rend[rows]]
        cols = ridx[head[rows]]
        if cols.size == 0:
            return cols
        leading[:] += np.bincount(cols, minlength=n)
        done = cols[leading[cols] == col_nnz[cols]]
        fresh[done] = True  # (a column may be reached through several rows at once)
        out = np.flatnonzero(fresh)
        fresh[out] = False
        return out

    ready = np.r_[np.flatnonzero(col_nnz == 0), advance(np.flatnonzero(head < rend))]
    while ready.size:
        k = ready.size
        lens = col_nnz[ready]
        seg = np.cumsum(lens) - lens
        rows = col_rows[np.arange(int(lens.sum())) - np.repeat(seg - cptr[ready], lens)]
        # groups present in the rows of each ready column, then the lowest absent one
        W = masks.shape[1]
        forbidden = np.zeros((k, W), dtype=np.uint64)
        has = lens > 0
        if rows.size:
            forbidden[has] = np.bitwise_or.reduceat(masks[rows], seg[has], axis=0)
        free = ~forbidden
        word = np.zeros(k, dtype=np.int64) if W == 1 else np.argmax(free != 0, axis=1)
        bits = free[np.arange(k), word]
        full = bits == 0
        if full.any():  # every group of the words so far present: a new word
            word = np.where(full, W, word)
            bits = np.where(full, ~np.uint64(0), bits)
            masks = np.concatenate([masks, np.zeros((m, 1), dtype=np.uint64)], axis=1)
        low = bits & (~bits + np.uint64(1))  # lowest set bit, a power of two
        groups[ready] = 64 * word + np.log2(low.astype(np.float64)).astype(np.int64)
        if rows.size == 0:
            break
        # one ready column per row (it comes first there): no index repeats
        masks[rows, np.repeat(word, lens)] |= np.repeat(low, lens)
        head[rows] += 1
        ready = advance(rows)
    return groups[position]  # the columns were named by their positions


def _greedy(S: sp.csr_array, order: np.ndarray) -> np.ndarray:
    """First fit of the columns of the structure ``S`` enumerated in ``order`` (a permutation)."""
    if _compiled_grouping is not None:
        return np.asarray(_compiled_grouping(S, order=order), dtype=np.int64)
    return _first_fit(S, _positions(order))  # the same groups, in numpy


def _positions(order: np.ndarray) -> np.ndarray:
    position = np.empty(order.size, dtype=np.int64)
    position[order] = np.arange(order.size)
    return position


def group_columns(structure: Any, order: Any = 0) -> np.ndarray:
    """Groups of columns that share no nonzero row, greedy in a given order (scipy's by default).

    Parameters
    ----------
    structure : array_like or scipy sparse, shape (m, n)
        Pattern of the Jacobian: the nonzeros of an array, the stored entries
        of a sparse matrix (as scipy).
    order : int or array_like of shape (n,), optional
        Enumeration order of the columns: an int is the seed of
        ``numpy.random.RandomState(seed).permutation(n)`` (scipy's default 0:
        then the groups are scipy's), an array is the order itself.

    Returns
    -------
    numpy.ndarray of int64, shape (n,)
        Group of each column.

    Notes
    -----
    Greedy first fit in ``order`` (see the module notes), computed by rounds.
    :func:`fewest_groups` chooses the order for fewer groups.
    """
    S = _structure_csr(structure, stored=True)
    n = S.shape[1]
    if np.isscalar(order) or order is None:
        order = np.random.RandomState(order).permutation(n)
    else:
        order = np.asarray(order)
        if order.shape != (n,):
            raise ValueError("`order` has incorrect shape.")
    return _greedy(S, order)


def fewest_groups(structure: Any) -> np.ndarray:
    """Groups of columns that share no nonzero row, largest first (what ``jac_sparsity`` uses).

    Greedy first fit with the columns in decreasing order of the total count
    of entries of their rows (an upper bound of their degree in the column
    intersection graph), ties in scipy's random order; or in the columns' own
    order where that gives fewer groups (a banded structure; module notes).

    Parameters
    ----------
    structure : array_like or scipy sparse, shape (m, n)
        As :func:`group_columns`.

    Returns
    -------
    numpy.ndarray of int64, shape (n,)
        Group of each column.
    """
    return _largest_first(_structure_csr(structure, stored=True))


def _largest_first(S: sp.csr_array) -> np.ndarray:
    """:func:`fewest_groups` of a canonical structure ``S`` (:func:`_structure_csr`): the
    largest-first grouping, or the first fit in the columns' own order where that has
    fewer groups (a banded structure: ``2 b + 1`` groups for ``b`` diagonals on each side,
    the least possible, where the largest-first and scipy's random order take more)."""
    n = S.shape[1]
    degree = S.T.astype(np.int64) @ np.diff(S.indptr).astype(np.int64)
    ties = _positions(np.random.RandomState(0).permutation(n))
    largest = _greedy(S, np.lexsort((ties, -degree)))
    natural = _greedy(S, np.arange(n))
    if n and natural.max() < largest.max():
        return natural
    return largest


@dataclass
class SparsityPattern:
    """A checked ``jac_sparsity``: its nonzeros and column groups, on the host and the device.

    Attributes
    ----------
    shape : tuple
        ``(m, n)``.
    rows, cols : numpy.ndarray
        Row and column of each structural nonzero, sorted row-major, ``(nnz,)``.
    groups : numpy.ndarray
        Column groups (:func:`group_columns`), ``(n,)``.
    n_groups : int
        Number of groups ``G``.
    """

    shape: tuple[int, int]
    rows: np.ndarray
    cols: np.ndarray
    groups: np.ndarray
    n_groups: int

    def __post_init__(self) -> None:
        self._on: dict[tuple, Any] = {}

    @classmethod
    def from_structure(cls, structure: Any) -> SparsityPattern:
        """Pattern and groups of an array_like or scipy sparse structure."""
        stored, nonzero = _structures(structure)
        groups = _largest_first(stored)
        coo = nonzero.tocoo()
        rows = coo.row.astype(np.int64)
        cols = coo.col.astype(np.int64)
        return cls(shape=coo.shape, rows=rows, cols=cols, groups=groups,
                   n_groups=int(groups.max()) + 1 if groups.size else 0)

    def on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``rows, cols (nnz,)``, ``groups (n,)`` and group indicators ``(G, n)`` on ``device``."""
        key = (str(device),)
        if key not in self._on:
            rows = torch.as_tensor(self.rows, device=device)
            cols = torch.as_tensor(self.cols, device=device)
            groups = torch.as_tensor(self.groups, device=device)
            if device.type == "cpu":  # numpy on this thread: no torch parallel region
                onehot = torch.from_numpy(self.groups[None, :]
                                          == np.arange(self.n_groups)[:, None])
            else:
                onehot = groups.unsqueeze(0) == torch.arange(self.n_groups, device=device)[:, None]
            self._on[key] = (rows, cols, groups, onehot)
        return self._on[key]

    def host_gather(self) -> tuple[np.ndarray, np.ndarray]:
        """Where the host's '2-point' differences read their operands, ``(nnz,)`` each.

        ``lin = group(j) m + i`` indexes the differences ``F - f0`` of one
        problem flattened ``(G m,)``; ``cols = j`` the steps ``(n,)``. Both are
        ``numpy.intp`` (what ``numpy.take`` indexes with, no conversion per call).
        """
        key = ("host",)
        if key not in self._on:
            m = self.shape[0]
            lin = self.groups[self.cols].astype(np.intp) * m + self.rows.astype(np.intp)
            self._on[key] = (lin, self.cols.astype(np.intp))
        return self._on[key]

    def host_groups(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Per group: its columns, and its nonzeros' positions, rows and columns (``numpy.intp``).

        What the pipelined '2-point' differences read and write per group
        (:func:`grouped_difference`): group ``k``'s values are
        ``(F_k[rows] - f0[rows]) / dx[cols]`` stored at ``positions``.
        """
        key = ("host groups",)
        if key not in self._on:
            columns = self.host_group_columns()
            self._on[key] = [(c, *part) for c, part in
                             zip(columns, self._group_nonzeros(), strict=True)]
        return self._on[key]

    def host_group_columns(self) -> list[np.ndarray]:
        """The columns of each group, ascending (``numpy.intp``): all the caller of the
        pipelined differences needs per group (:class:`_HostGroups`)."""
        key = ("host group columns",)
        if key not in self._on:
            # a stable sort of the group numbers, in 16 bits where they fit (numpy's radix
            # sort then; the same order)
            groups = self.groups.astype(self._group_dtype(), copy=False)
            columns = np.argsort(groups, kind="stable").astype(np.intp, copy=False)
            col_cuts = np.searchsorted(groups[columns], np.arange(self.n_groups + 1))
            self._on[key] = [columns[col_cuts[k]:col_cuts[k + 1]] for k in range(self.n_groups)]
        return self._on[key]

    def _group_dtype(self) -> Any:
        return np.uint16 if self.n_groups <= np.iinfo(np.uint16).max else self.groups.dtype

    def _group_nonzeros(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per group: its nonzeros' positions, rows and columns (row-major order kept).

        Reads only this pattern's arrays and writes nothing of it, so a helper
        thread may run it while the caller evaluates the residuals
        (:class:`_HostGroups`).
        """
        # a stable sort of the nonzeros' group numbers, in 16 bits where they fit: numpy's
        # radix sort then (the same order; a merge sort of int64 took 20-27 ms per call
        # for the 746,496 nonzeros of bench_sparse.py's bundle adjustment)
        of_nonzeros = self.groups.astype(self._group_dtype(), copy=False)[self.cols]
        order = np.argsort(of_nonzeros, kind="stable")
        cuts = np.searchsorted(of_nonzeros[order], np.arange(self.n_groups + 1))
        # one gather of the rows and columns in that order; each group's are views
        # (no copy per group: 4 per group of 62,000 entries took ~12 ms per solve)
        order = order.astype(np.intp, copy=False)
        rows = self.rows.astype(np.intp, copy=False)[order]
        cols = self.cols.astype(np.intp, copy=False)[order]
        return [(order[a:b], rows[a:b], cols[a:b])
                for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True)]

    def sparse(self, values: Tensor) -> Tensor:
        """Coalesced sparse COO ``(B, m, n)`` tensor of per-problem values ``(B, nnz)``.

        The indices of a batch size are built once and shared by every
        Jacobian of the pattern (the engine's CSR forms are then built from a
        cached plan, :class:`~torchimize_scipy._engine.csr.BlockCSR`).
        """
        B, nnz = values.shape
        key = ("coo", str(values.device), B)
        indices = self._on.get(key)
        if indices is None:
            self._keep_indices(key, self._coo_indices(B, values.device))
            indices = self._on[key][0]
        else:
            indices = indices[0]
        return torch.sparse_coo_tensor(indices, values.reshape(-1), (B, *self.shape),
                                       is_coalesced=True, check_invariants=False)

    def _coo_indices(self, B: int, device: torch.device) -> tuple[Tensor, Any]:
        """The COO indices ``(3, B nnz)`` of a batch of ``B`` and their registered CSR plan.

        Reads only this pattern's host arrays and writes nothing of it, so a
        helper thread may run it while the caller evaluates the residuals
        (:class:`_HostGroups`). On the CPU the plan's transposed blocks (the
        cut of the host's ``J^T u`` products) are made as well.
        """
        nnz = self.rows.size
        if device.type == "cpu":  # numpy on this thread (as in :meth:`on`)
            indices = torch.from_numpy(np.stack([np.repeat(np.arange(B), nnz),
                                                 np.tile(self.rows, B),
                                                 np.tile(self.cols, B)]))
        else:
            rows, cols, _, _ = self.on(device)
            batch = torch.arange(B, device=device).repeat_interleave(nnz)
            indices = torch.stack([batch, rows.repeat(B), cols.repeat(B)])
        # the engine's CSR index arrays, registered for as long as this pattern lives
        plan = csr_plan(indices, (B, *self.shape), register=True)
        if device.type == "cpu":
            plan.transposed_blocks()  # made now, where it is free (a helper's, when pipelined)
        return indices, plan

    def _keep_indices(self, key: tuple, made: tuple[Tensor, Any]) -> None:
        """Keep the indices and plan of one batch size (the caller's thread only)."""
        self._on = {k: v for k, v in self._on.items() if k[0] != "coo"}  # one size kept
        self._on[key] = made


class _HostGroups:
    """What the pipelined differences of ``B`` problems read per group, part of it made
    on a helper thread while the caller evaluates the residuals.

    The caller needs only each group's columns (:attr:`columns`); the gathers
    also need the group's nonzeros (:meth:`part`). On a pattern's first
    Jacobian those (:meth:`SparsityPattern._group_nonzeros`), and the COO
    indices and CSR plan that :meth:`SparsityPattern.sparse` then finds
    (with the plan's transposed blocks), are made
    by a helper meanwhile (:class:`~torchimize_scipy._engine.csr.CallsOnHelpers`),
    not by the caller before its first evaluation: 30-50 ms of the caller's
    time per solve of the bundle adjustment of ``bench_sparse.py``. The
    arrays are those the caller would have made. :meth:`finish` (the
    caller's thread) waits for them, running what no helper took, and keeps
    them in the pattern.
    """

    def __init__(self, pattern: SparsityPattern, B: int) -> None:
        self.pattern = pattern
        self.columns = pattern.host_group_columns()
        self._coo_key = ("coo", "cpu", B)
        self._parts: list | None = None
        self._made: dict[str, Any] = {}
        self._job: CallsOnHelpers | None = None
        known = ("host groups",) in pattern._on
        if known:
            self._parts = [part[1:] for part in pattern.host_groups()]
        calls = []
        if not known:
            self._ready = threading.Event()
            calls.append(self._make_parts)
        if self._coo_key not in pattern._on:
            calls.append(lambda: self._made.__setitem__(
                "coo", pattern._coo_indices(B, torch.device("cpu"))))
        if calls:
            self._job = CallsOnHelpers(calls)

    def _make_parts(self) -> None:
        try:
            self._made["parts"] = self.pattern._group_nonzeros()
        finally:
            self._ready.set()  # (a failure is raised by finish(); part() then finds none)

    def part(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Group ``k``'s nonzeros: positions, rows, columns (waits for the helper's)."""
        if self._parts is None:
            self._ready.wait()
            if "parts" not in self._made:
                raise RuntimeError("the groups' nonzeros were not made (see the helper's error)")
            self._parts = self._made["parts"]
        return self._parts[k]

    def finish(self) -> None:
        """Wait for the helper's work (running what no helper took) and keep its results."""
        if self._job is None:
            return
        job, self._job = self._job, None
        job.wait()
        pattern = self.pattern
        if "parts" in self._made and ("host groups",) not in pattern._on:
            pattern._on[("host groups",)] = [(c, *part) for c, part in
                                             zip(self.columns, self._made["parts"], strict=True)]
        if "coo" in self._made and self._coo_key not in pattern._on:
            pattern._keep_indices(self._coo_key, self._made["coo"])


def check_jac_sparsity(jac_sparsity: Any, m: int, n: int) -> SparsityPattern | None:
    """scipy's check of ``jac_sparsity`` against ``(m, n)`` and its grouping.

    Raises
    ------
    ValueError
        ``"`jac_sparsity` has wrong shape."`` (scipy's message) when its shape
        is not ``(m, n)``.
    """
    if jac_sparsity is None:
        return None
    if isinstance(jac_sparsity, SparsityPattern):
        pattern = jac_sparsity
    elif sp.issparse(jac_sparsity):
        if tuple(jac_sparsity.shape) != (m, n):
            raise ValueError("`jac_sparsity` has wrong shape.")
        pattern = SparsityPattern.from_structure(jac_sparsity)
    else:
        if isinstance(jac_sparsity, torch.Tensor) and jac_sparsity.layout != torch.strided:
            jac_sparsity = jac_sparsity.to_dense()
        dense = np.atleast_2d(np.asarray(to_host(jac_sparsity)))
        if dense.shape != (m, n):
            raise ValueError("`jac_sparsity` has wrong shape.")
        pattern = SparsityPattern.from_structure(dense)
    if pattern.shape != (m, n):
        raise ValueError("`jac_sparsity` has wrong shape.")
    return pattern


def grouped_difference(fun: Callable[[Tensor, Tensor], Tensor], x: Tensor, f0: Tensor,
                       idx: Tensor, pattern: SparsityPattern, method: str,
                       rel_step: Tensor | None = None, lb: Tensor | None = None,
                       ub: Tensor | None = None) -> Tensor:
    """Sparse finite-difference Jacobians of a batch, one perturbation per column group.

    Parameters
    ----------
    fun : callable
        The engine's residuals ``fun(x (k, n), idx (k,)) -> (k, m)``; called
        once, on the ``B G`` (``2 B G`` for '3-point') perturbed points.
    x : Tensor
        Points ``(B, n)``.
    f0 : Tensor
        Residuals at ``x``, ``(B, m)``.
    idx : Tensor
        Problem of each row of ``x``, ``(B,)``.
    pattern : SparsityPattern
        The checked ``jac_sparsity`` and its groups.
    method : {'2-point', '3-point', 'cs'}
        Difference scheme.
    rel_step : Tensor, optional
        Relative step ``(n,)`` (``diff_step``).
    lb, ub : Tensor, optional
        Bounds ``(B, n)``; evaluation points stay inside them (not for 'cs').

    Returns
    -------
    Tensor
        Coalesced sparse COO tensor ``(B, m, n)`` with one value per structural
        nonzero (computed zeros kept, as scipy keeps them).
    """
    x0 = x.detach()
    f0 = f0.detach()
    B, n = x0.shape
    m = f0.shape[1]
    rows, cols, _, onehot = pattern.on(x0.device)
    G = pattern.n_groups
    if G == 0 or rows.numel() == 0:
        empty = torch.zeros(B, 0, dtype=f0.real.dtype if f0.is_complex() else f0.dtype,
                            device=f0.device)
        return pattern.sparse(empty)
    # one numpy problem whose groups' gathers go to a helper thread (:func:`_pipelined`):
    # its steps without a torch parallel region over the n variables beside that helper
    # (no user code inside; docs/threads.md)
    pipelined = method == "2-point" and _pipelined(fun, x0, f0, x0)
    with serial_torch(x0.device) if pipelined else nullcontext():
        h = _absolute_step(x0, default_rel_step(x0.dtype, f0.dtype, method), rel_step)
        if method == "2-point":
            if lb is not None:
                h = _adjust_one_sided(x0, h, 1, lb, ub)
            x1 = x0 + h
            dx = x1 - x0
    sel = onehot.unsqueeze(0)  # (1, G, n)

    def points(xp: Tensor, base: Tensor = x0) -> Tensor:
        """``(B, G, n)``: ``base`` with the columns of each group replaced by ``xp``'s."""
        return torch.where(sel, xp.unsqueeze(1), base.unsqueeze(1))

    def evaluate(pts: Tensor) -> Tensor:
        """``fun`` on ``(S, B, G, n)`` points in one call; ``(S, B, G, m)``."""
        s = pts.shape[0]
        rows_idx = idx.view(1, B, 1).expand(s, B, G).reshape(-1)
        out = fun(pts.reshape(s * B * G, n), rows_idx)
        if out.shape != (s * B * G, m):
            raise ValueError(f"`fun` returned shape {tuple(out.shape)} for {s * B * G} points; "
                             f"expected {(s * B * G, m)}.")
        return out.reshape(s, B, G, m)

    def at_nonzeros(F: Tensor) -> Tensor:
        """``F[b, group(j), i]`` for every structural nonzero ``(i, j)``: ``(B, nnz)``."""
        group_of_col = torch.as_tensor(pattern.groups, device=x0.device)[cols]  # (nnz,)
        return F[:, group_of_col, rows]

    if method == "cs":
        xc = torch.complex(x0, torch.zeros_like(x0))
        F = evaluate(points(torch.complex(x0, h), xc).unsqueeze(0))[0]
        values = complex_part(at_nonzeros(F)) / h[:, cols]
        return pattern.sparse(values)

    bounded = lb is not None
    if method == "2-point":
        if pipelined:
            return pattern.sparse(_pipelined_difference(fun, x0, x1, f0, dx, idx, pattern))
        F = evaluate(points(x1).unsqueeze(0))[0]
        if F.device.type == "cpu" and F.dtype == f0.dtype == dx.dtype:
            # the same arithmetic in numpy, on this thread (over every nonzero, torch
            # would wake its OpenMP threads for each operation): the differences
            # F - f0 of all rows of all groups (contiguous), then one gather of a
            # flat index per operand (a two-index gather costs about twice as much)
            lin, c = pattern.host_gather()
            D = np.subtract(F.detach().numpy(), f0.numpy()[:, None, :]).reshape(B, -1)
            values = torch.from_numpy(np.take(D, lin, axis=1) / np.take(dx.numpy(), c, axis=1))
        else:
            values = (at_nonzeros(F) - f0[:, rows]) / dx[:, cols]
        return pattern.sparse(values)

    if method != "3-point":
        raise ValueError(f"Unknown finite-difference method {method!r}.")
    xa, xb, dx, one_sided = three_point_points(x0, h, lb if bounded else None, ub)
    F = evaluate(torch.stack([points(xa), points(xb)]))
    fa, fb = at_nonzeros(F[0]), at_nonzeros(F[1])
    df = torch.where(one_sided[:, cols], -3.0 * f0[:, rows] + 4.0 * fa - fb, fb - fa)
    return pattern.sparse(df / dx[:, cols])


def _pipelined(fun: Any, x0: Tensor, f0: Tensor, dx: Tensor) -> bool:
    """Whether the '2-point' differences go group by group, their gathers on a helper thread.

    For one problem whose ``fun`` evaluates the points one call each anyway
    (a numpy function of one point, not mapped by ``workers``), on the host,
    with torch allowed more than one thread: the values of group ``k`` are
    then gathered by a helper while the caller evaluates group ``k + 1``
    (:func:`_pipelined_difference`).
    """
    if not isinstance(fun, RowwiseFunction) or fun.map is not None or x0.shape[0] != 1:
        return False  # (a batch: its rows stay in one call, problem by problem)
    if fun.ns.kind == "torch":
        return False  # with several threads vmapped in one call, and its ops use them all
    return (helper_threads() > 0 and x0.device.type == "cpu" and not f0.is_complex()
            and f0.dtype == dx.dtype == x0.dtype and f0.dtype in (torch.float32, torch.float64))


def _pipelined_difference(fun: Any, x0: Tensor, x1: Tensor, f0: Tensor, dx: Tensor,
                          idx: Tensor, pattern: SparsityPattern) -> Tensor:
    """The '2-point' values ``(B, nnz)``, group by group, the gathers on a helper thread.

    The caller evaluates ``fun`` at the groups' points in the groups' order
    (one call per group: the same calls, in the same order, as one call of
    all points makes for such a function of one problem); each group's values
    ``(F_k[rows] - f0[rows]) / dx[cols]`` (the same arithmetic per entry as
    the all-groups formula) are written by a helper thread
    (:class:`~torchimize_scipy._engine.csr.CallsOnHelpers`) while the next
    group is evaluated, or by the caller if no helper came. On a pattern's
    first Jacobian a helper also makes the groups' nonzeros and the COO
    indices meanwhile (:class:`_HostGroups`).
    """
    x0n, x1n, f0n, dxn = (t.detach().numpy() for t in (x0, x1, f0, dx))
    B = x0n.shape[0]
    values = np.empty((B, pattern.rows.size), dtype=f0n.dtype)
    pending = []
    # a numpy ``fun`` gets a fresh copy of its point from the wrapper (``RowwiseFunction``),
    # so one buffer of ours serves every group: the previous group's columns are set
    # back to x0 (no copy of the whole point, no fresh pages, per group)
    reuse = fun.ns.kind == "numpy"
    pts = x0n.copy()
    previous = None
    # on a pattern's first Jacobian, the groups' nonzeros and the COO indices and CSR plan
    # are made by a helper meanwhile
    groups = _HostGroups(pattern, B)
    try:
        for k, columns in enumerate(groups.columns):
            if not reuse:
                pts = x0n.copy()
            elif previous is not None:
                pts[:, previous] = x0n[:, previous]
            pts[:, columns] = x1n[:, columns]
            previous = columns
            F = fun(torch.from_numpy(pts), idx)
            if tuple(F.shape) != tuple(f0n.shape):
                raise ValueError(f"`fun` returned shape {tuple(F.shape)} for {B} points; "
                                 f"expected {tuple(f0n.shape)}.")
            Fn = F.detach().numpy()
            if Fn.dtype != f0n.dtype:
                Fn = Fn.astype(f0n.dtype)

            def gather(Fn: np.ndarray = Fn, k: int = k) -> None:
                pos, rows, cols = groups.part(k)
                values[:, pos] = (np.take(Fn, rows, axis=1) - np.take(f0n, rows, axis=1)) \
                    / np.take(dxn, cols, axis=1)
            pending.append(CallsOnHelpers([gather]))
    finally:
        try:
            groups.finish()  # (before the caller runs a gather: it may need the groups' nonzeros)
        finally:
            for job in pending:
                job.wait()
    return torch.from_numpy(values)
