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
:func:`group_columns` enumerates the columns in the order of
``numpy.random.RandomState(0).permutation(n)`` and gives each the lowest group
whose columns it shares no row with (greedy first fit). This is the grouping
scipy computes (its ``group_columns`` builds one group at a time, taking every
column in that order that fits; both give every column the same group), so
the groups, and hence the evaluation points, are scipy's.

First fit in a fixed order is a greedy colouring of the column intersection
graph (columns adjacent when they share a row) with priorities given by the
order; it is computed here round by round in the manner of Jones & Plassmann
("A parallel graph coloring heuristic", SIAM J. Sci. Comput. 14(3), 1993): a
column is coloured once every adjacent column earlier in the order is, with
the smallest colour none of them has. Each round is a handful of vectorised
numpy operations, and for a random order the number of rounds stays small
(14 for a tridiagonal structure with n = 10**6).

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from ._arrays import to_host
from ._jacobian import _absolute_step, _adjust_one_sided, default_rel_step, three_point_points

__all__ = ["SparsityPattern", "check_jac_sparsity", "group_columns", "grouped_difference"]


def _structure_csc(A: Any, stored: bool = False) -> sp.csc_array:
    """The pattern of ``A`` (array_like or scipy sparse) as a boolean CSC array.

    The nonzeros, or with ``stored`` every stored entry of a sparse ``A``
    (explicit zeros included: scipy groups the columns of a sparse structure
    by its stored entries).
    """
    if sp.issparse(A):
        S = sp.csc_array(A)
        S.sum_duplicates()
        data = np.ones(S.data.shape, dtype=bool) if stored else S.data != 0
        S = sp.csc_array((data, S.indices, S.indptr), shape=S.shape)
    else:
        dense = np.atleast_2d(np.asarray(to_host(A)))
        if dense.ndim != 2:
            raise ValueError("`jac_sparsity` must be 2-dimensional.")
        S = sp.csc_array(dense != 0)
    S.eliminate_zeros()
    S.sort_indices()
    return S


def _segment_positions(ptr: np.ndarray, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the CSR segments ``ptr[s]:ptr[s+1]`` of each ``s`` in ``sel``; segment ids."""
    starts = ptr[sel]
    lens = ptr[sel + 1] - starts
    seg = np.repeat(np.arange(sel.size), lens)
    offsets = np.arange(seg.size) - np.repeat(np.cumsum(lens) - lens, lens)
    return np.repeat(starts, lens) + offsets, seg


def _dedupe_sorted(a: np.ndarray) -> np.ndarray:
    """Unique values of a sorted array (without numpy's hash-based ``unique``)."""
    if a.size == 0:
        return a
    return a[np.r_[True, a[1:] != a[:-1]]]


def group_columns(structure: Any, order: Any = 0) -> np.ndarray:
    """Groups of columns that share no nonzero row (Curtis-Powell-Reid), scipy's grouping.

    Parameters
    ----------
    structure : array_like or scipy sparse, shape (m, n)
        Pattern of the Jacobian: the nonzeros of an array, the stored entries
        of a sparse matrix (as scipy).
    order : int or array_like of shape (n,), optional
        Enumeration order of the columns: an int is the seed of
        ``numpy.random.RandomState(seed).permutation(n)`` (scipy's default 0),
        an array is the order itself.

    Returns
    -------
    numpy.ndarray of int64, shape (n,)
        Group of each column, numbered ``0 .. G - 1`` in order of appearance.

    Notes
    -----
    Greedy first fit in ``order`` (see the module notes), computed by rounds:
    each round colours every column whose earlier neighbours are all coloured.
    """
    S = _structure_csc(structure, stored=True)
    m, n = S.shape
    if np.isscalar(order) or order is None:
        order = np.random.RandomState(order).permutation(n)
    else:
        order = np.asarray(order)
        if order.shape != (n,):
            raise ValueError("`order` has incorrect shape.")
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)

    Si = S.astype(np.int32)
    C = (Si.T @ Si).tocoo()  # columns sharing a row
    u = C.row.astype(np.int64)
    v = C.col.astype(np.int64)
    earlier = position[v] < position[u]  # v comes before u: u must avoid v's group
    u, v = u[earlier], v[earlier]
    by_u = np.argsort(u, kind="stable")
    pred = v[by_u]
    pred_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(u, minlength=n), out=pred_ptr[1:])
    by_v = np.argsort(v, kind="stable")
    succ = u[by_v]
    succ_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(v, minlength=n), out=succ_ptr[1:])

    waiting = np.diff(pred_ptr)  # earlier neighbours not yet grouped
    groups = np.full(n, -1, dtype=np.int64)
    ready = np.flatnonzero(waiting == 0)
    while ready.size:
        # smallest group absent among the (grouped) earlier neighbours of each ready column
        flat, seg = _segment_positions(pred_ptr, ready)
        taken = groups[pred[flat]]
        width = int(taken.max()) + 2 if taken.size else 1
        keys = _dedupe_sorted(np.sort(seg * width + taken))
        key_seg, key_group = keys // width, keys % width
        count = np.bincount(key_seg, minlength=ready.size)
        first = np.cumsum(count) - count
        rank = np.arange(keys.size) - first[key_seg]
        gap = np.where(key_group != rank, rank, width)  # first rank whose group is missing
        lowest = count.copy()
        has = count > 0
        if keys.size:
            lowest[has] = np.minimum(np.minimum.reduceat(gap, first[has]), count[has])
        groups[ready] = lowest
        # columns after them lose one waiting neighbour each
        flat, _ = _segment_positions(succ_ptr, ready)
        later = np.sort(succ[flat])
        if later.size == 0:
            break
        starts = np.flatnonzero(np.r_[True, later[1:] != later[:-1]])
        touched = later[starts]
        waiting[touched] -= np.diff(np.r_[starts, later.size])
        ready = touched[waiting[touched] == 0]
    return groups


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
        self._on: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    @classmethod
    def from_structure(cls, structure: Any) -> SparsityPattern:
        """Pattern and groups of an array_like or scipy sparse structure."""
        groups = group_columns(structure)
        S = _structure_csc(structure)
        coo = sp.csr_array(S).tocoo()
        rows = coo.row.astype(np.int64)
        cols = coo.col.astype(np.int64)
        return cls(shape=S.shape, rows=rows, cols=cols, groups=groups,
                   n_groups=int(groups.max()) + 1 if groups.size else 0)

    def on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``rows, cols (nnz,)``, ``groups (n,)`` and group indicators ``(G, n)`` on ``device``."""
        key = (str(device),)
        if key not in self._on:
            rows = torch.as_tensor(self.rows, device=device)
            cols = torch.as_tensor(self.cols, device=device)
            groups = torch.as_tensor(self.groups, device=device)
            onehot = groups.unsqueeze(0) == torch.arange(self.n_groups, device=device)[:, None]
            self._on[key] = (rows, cols, groups, onehot)
        return self._on[key]

    def sparse(self, values: Tensor) -> Tensor:
        """Coalesced sparse COO ``(B, m, n)`` tensor of per-problem values ``(B, nnz)``."""
        B, nnz = values.shape
        rows, cols, _, _ = self.on(values.device)
        batch = torch.arange(B, device=values.device).repeat_interleave(nnz)
        indices = torch.stack([batch, rows.repeat(B), cols.repeat(B)])
        return torch.sparse_coo_tensor(indices, values.reshape(-1), (B, *self.shape),
                                       is_coalesced=True, check_invariants=False)


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
    group_of_col = torch.as_tensor(pattern.groups, device=x0.device)[cols]  # (nnz,)
    h = _absolute_step(x0, default_rel_step(x0.dtype, f0.dtype, method), rel_step)
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
        return F[:, group_of_col, rows]

    if method == "cs":
        xc = torch.complex(x0, torch.zeros_like(x0))
        F = evaluate(points(torch.complex(x0, h), xc).unsqueeze(0))[0]
        values = at_nonzeros(F).imag / h[:, cols]
        return pattern.sparse(values)

    bounded = lb is not None
    if method == "2-point":
        if bounded:
            h = _adjust_one_sided(x0, h, 1, lb, ub)
        x1 = x0 + h
        dx = x1 - x0
        F = evaluate(points(x1).unsqueeze(0))[0]
        values = (at_nonzeros(F) - f0[:, rows]) / dx[:, cols]
        return pattern.sparse(values)

    if method != "3-point":
        raise ValueError(f"Unknown finite-difference method {method!r}.")
    xa, xb, dx, one_sided = three_point_points(x0, h, lb if bounded else None, ub)
    F = evaluate(torch.stack([points(xa), points(xb)]))
    fa, fb = at_nonzeros(F[0]), at_nonzeros(F[1])
    df = torch.where(one_sided[:, cols], -3.0 * f0[:, rows] + 4.0 * fa - fb, fb - fa)
    return pattern.sparse(df / dx[:, cols])
