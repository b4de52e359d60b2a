"""Sparse and operator Jacobians from the caller, in the engine's forms and back.

A callable ``jac`` may return, besides a dense array,

* a ``scipy.sparse`` matrix or array, or a torch sparse tensor (any layout),
* a :class:`scipy.sparse.linalg.LinearOperator`, or a *torch operator*: an
  object with ``shape == (m, n)`` and methods ``matvec(v (n,)) -> (m,)`` and
  ``rmatvec(u (m,)) -> (n,)`` on tensors (``dtype`` and ``device`` optional).

The engine takes a batch's Jacobian as a dense ``(B, m, n)`` tensor, a
coalesced torch sparse COO tensor of shape ``(B, m, n)`` or a batched operator
(``shape == (B, m, n)``, ``dtype``, ``device``, ``matvec(p (B, n)) -> (B, m)``,
``rmatvec(u (B, m)) -> (B, n)``). :func:`engine_jacobian` converts the values
of one evaluation (one per problem) to these forms;
:func:`result_jacobian` turns the engine's final Jacobian into what scipy
returns as ``res.jac``: a ``scipy.sparse.csr_array`` for sparse input (a
torch sparse COO ``(m, n)`` tensor for torch callers), a ``LinearOperator``
for operator input (the torch operator's products for torch callers).

A scipy ``LinearOperator`` receives float64 numpy vectors, as scipy gives them,
whatever the engine's dtype and device; a torch operator receives tensors of
the engine's dtype on its device.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

__all__ = ["BatchOperator", "batch_jacobian_form", "engine_jacobian", "jacobian_form",
           "result_jacobian"]


def _is_torch_operator(J: Any) -> bool:
    return (not isinstance(J, (Tensor, np.ndarray)) and not sp.issparse(J)
            and hasattr(J, "matvec") and hasattr(J, "rmatvec") and hasattr(J, "shape"))


def jacobian_form(J: Any) -> str:
    """``'dense'``, ``'sparse'`` or ``'operator'``: what the caller's ``jac`` returned."""
    if sp.issparse(J):
        return "sparse"
    if isinstance(J, Tensor):
        return "dense" if J.layout == torch.strided else "sparse"
    if isinstance(J, LinearOperator) or _is_torch_operator(J):
        return "operator"
    return "dense"


def _sparse_rows(J: Any, m: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(rows, cols, values)`` of a scipy or torch sparse ``(m, n)`` matrix, duplicates summed."""
    if sp.issparse(J):
        coo = sp.coo_array(J)
        coo.sum_duplicates()
        return (torch.from_numpy(coo.row.astype(np.int64)),
                torch.from_numpy(coo.col.astype(np.int64)),
                torch.from_numpy(np.ascontiguousarray(coo.data)))
    coo = J.detach()
    if coo.layout != torch.sparse_coo:
        coo = coo.to_sparse_coo()
    coo = coo.coalesce()
    idx = coo.indices()
    return idx[0], idx[1], coo.values()


def _check_shape(J: Any, m: int, n: int) -> None:
    shape = tuple(J.shape)
    if shape != (m, n):
        raise ValueError(f"The return value of `jac` has wrong shape: expected {(m, n)}, "
                         f"actual {shape}.")


def engine_jacobian(values: list[Any], m: int, n: int, dtype: torch.dtype,
                    device: torch.device) -> Tensor | BatchOperator:
    """The engine's Jacobian of a batch from the ``jac`` values of its problems.

    Parameters
    ----------
    values : list
        One value per problem, each sparse (scipy or torch) or an operator
        (scipy ``LinearOperator`` or a torch operator), shape ``(m, n)``.
    m, n : int
        Expected shape.
    dtype, device
        The engine's.

    Returns
    -------
    Tensor or BatchOperator
        A coalesced sparse COO tensor ``(B, m, n)`` when every value is sparse,
        else a :class:`BatchOperator` (sparse values among operators act as
        their products).

    Raises
    ------
    ValueError
        scipy's message when a value's shape is not ``(m, n)``, or when one is
        complex.
    """
    for J in values:
        _check_shape(J, m, n)
    forms = {jacobian_form(J) for J in values}
    if forms == {"sparse"} or forms == {"sparse", "dense"}:
        parts = []
        for b, J in enumerate(values):
            if jacobian_form(J) == "dense":
                J = torch.as_tensor(np.asarray(J)) if not isinstance(J, Tensor) else J
                J = J.to_sparse_coo()
            r, c, v = _sparse_rows(J, m, n)
            if v.is_complex():
                raise ValueError("`jac` returned complex values; least-squares Jacobians "
                                 "must be real.")
            parts.append((torch.full_like(r, b), r, c, v))
        idx = torch.stack([torch.cat([p[k] for p in parts]) for k in range(3)]).to(device)
        vals = torch.cat([p[3] for p in parts]).to(device=device, dtype=dtype)
        # rows of each problem are sorted and problems follow each other: coalesced
        return torch.sparse_coo_tensor(idx, vals, (len(values), m, n), is_coalesced=True,
                                       check_invariants=False)
    return BatchOperator(values, m, n, dtype, device)


def batch_jacobian_form(p: Any, method: str, m: int, n: int, refusal: Exception) -> str:
    """What the callable ``jac`` of a ``batch_least_squares`` call returns, with scipy's checks.

    Asked only after the engine's conversion refused a value as not dense
    (``refusal``, the error it raised; any other error answers 'dense' and is
    the caller's to raise): a call that returns dense arrays is never made
    twice. One raw call at the first problem's start (a row-wise ``jac``; a
    vectorised one on that row alone). For a sparse value (scipy or torch) or
    an operator, the checks of :func:`torchimize_scipy.least_squares` are
    made (shape, 'lm', an operator without column norms under
    ``x_scale='jac'``) and ``p.jac`` is told to convert every later value
    (:meth:`EngineJacobian.user_sparse
    <torchimize_scipy._frontend.EngineJacobian.user_sparse>`). Problems may
    have different sparsity structures: the batch's Jacobian is one
    block-diagonal matrix either way.

    Parameters
    ----------
    p : Prepared
        The validated call (:func:`torchimize_scipy._frontend.prepare`).
    method : str
    m, n : int
    refusal : Exception
        What the conversion of the first values raised.

    Returns
    -------
    str
        ``'dense'``, ``'sparse'`` or ``'operator'``.

    Raises
    ------
    ValueError
        scipy's messages: a value of the wrong shape; a sparse or operator
        value with 'lm'; an operator with ``x_scale='jac'``.
    """
    from ._arrays import _SPARSE_HERE
    from ._user_functions import VectorizedFunction

    if str(refusal) != _SPARSE_HERE.format(what="jac"):
        return "dense"
    user = p.jac_user
    if isinstance(user, VectorizedFunction):
        from ._frontend import _vectorized_raw

        J = _vectorized_raw(user, p.x0[:1], torch.zeros(1, dtype=torch.long,
                                                        device=p.x0.device))
        if not (isinstance(J, Tensor) and J.layout != torch.strided):
            return "dense"  # (dense values are checked as they come)
        form, shape = "sparse", tuple(J.shape)
        expected = (1, m, n)
    else:
        J = user.call_one(p.x0[0], 0)
        form = jacobian_form(J)
        if form == "dense":
            return form
        shape, expected = tuple(J.shape), (m, n)
    if shape != expected:
        raise ValueError(f"The return value of `jac` has wrong shape: expected {expected}, "
                         f"actual {shape}.")
    if method == "lm":
        raise ValueError("method='lm' works only with dense Jacobian matrices.")
    if method in ("gn", "gd"):
        raise ValueError(f"method={method!r} works only with dense Jacobians; use method='trf' "
                         "or 'dogbox' for sparse or operator Jacobians.")
    if form == "operator" and isinstance(p.x_scale, str) and not hasattr(
            engine_jacobian([J], m, n, p.ns.dtype, p.ns.device), "column_norms"):
        raise ValueError("x_scale='jac' can't be used when `jac` returns LinearOperator.")
    p.jac.form = form
    return form


class BatchOperator:
    """The engine's operator for a batch of per-problem operators (or sparse matrices).

    ``matvec(p (B, n)) -> (B, m)`` and ``rmatvec(u (B, m)) -> (B, n)`` apply
    problem ``b``'s operator to row ``b``. A scipy ``LinearOperator`` (or a
    scipy sparse matrix) sees float64 numpy vectors; a torch operator sees
    tensors of the engine's dtype and device. ``column_norms() -> (B, n)`` is
    offered when every problem's operator is a torch operator with a
    ``column_norms()`` method; a scipy ``LinearOperator`` has none (scipy
    refuses ``x_scale='jac'`` then, and so does the frontend).

    Attributes
    ----------
    shape : tuple
        ``(B, m, n)``.
    dtype, device
        The engine's.
    ops : list
        The callers' operators, one per problem.
    """

    def __init__(self, ops: list[Any], m: int, n: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.ops = list(ops)
        self.shape = (len(self.ops), m, n)
        self.dtype = dtype
        self.device = device
        if all(_is_torch_operator(op) and hasattr(op, "column_norms") for op in self.ops):
            self.column_norms = self._column_norms

    def _column_norms(self) -> Tensor:
        """Euclidean column norms ``(B, n)`` from the torch operators' ``column_norms()``."""
        return torch.stack([torch.as_tensor(op.column_norms()).reshape(-1) for op in self.ops]
                           ).to(device=self.device, dtype=self.dtype)

    def _apply(self, vecs: Tensor, forward: bool) -> Tensor:
        out = []
        for op, v in zip(self.ops, vecs, strict=True):
            if isinstance(op, LinearOperator) or sp.issparse(op) or isinstance(op, np.ndarray):
                vn = v.detach().cpu().numpy().astype(np.float64)
                if isinstance(op, LinearOperator):
                    r = op.matvec(vn) if forward else op.rmatvec(vn)
                else:
                    r = op @ vn if forward else op.T @ vn
                r = torch.from_numpy(np.ascontiguousarray(np.asarray(r, dtype=np.float64)))
            elif isinstance(op, Tensor):
                A = op if forward else op.transpose(0, 1)
                r = (A @ v.to(A.dtype).unsqueeze(-1)).squeeze(-1)
            else:
                r = op.matvec(v) if forward else op.rmatvec(v)
                r = torch.as_tensor(r)
            out.append(r.reshape(-1).to(device=self.device, dtype=self.dtype))
        return torch.stack(out)

    def matvec(self, p: Tensor) -> Tensor:
        """``J_b p_b`` for every problem ``b``: ``(B, m)``."""
        return self._apply(p, True)

    def rmatvec(self, u: Tensor) -> Tensor:
        """``J_b^T u_b`` for every problem ``b``: ``(B, n)``."""
        return self._apply(u, False)


def result_jacobian(J: Any, numpy_caller: bool) -> Any:
    """``res.jac`` of one problem as scipy returns it, from the engine's final Jacobian.

    ``J`` is the engine's ``(1, m, n)`` Jacobian (loss scaling included): a
    dense tensor is returned unchanged (the result builder converts it); a
    sparse one becomes a ``scipy.sparse.csr_array`` (numpy callers) or a
    torch sparse COO ``(m, n)`` tensor; an operator becomes a scipy
    ``LinearOperator`` (numpy callers) or an object with ``shape``, ``dtype``,
    ``matvec`` and ``rmatvec`` on 1-D tensors.
    """
    if isinstance(J, Tensor) and J.layout == torch.strided:
        return J
    base, row_scale, col_scale = _unwrap(J)
    if isinstance(base, Tensor):  # sparse
        if base.layout != torch.sparse_coo:
            base = base.to_sparse_coo()
        if not base.is_coalesced():
            base = base.coalesce()
        # problem 0 of a coalesced (B, m, n) tensor: its first entries, already row-major
        idx, vals = base.indices(), base.values()
        if base.shape[0] > 1:
            first = idx[0] == 0
            idx, vals = idx[:, first], vals[first]
        rows, cols = idx[1], idx[2]
        if row_scale is not None:
            vals = vals * row_scale[0][rows]
        if col_scale is not None:
            vals = vals * col_scale[0][cols]
        m, n = base.shape[1:]
        if numpy_caller:
            indptr = np.zeros(m + 1, dtype=np.int64)
            np.cumsum(np.bincount(rows.cpu().numpy(), minlength=m), out=indptr[1:])
            return sp.csr_array((vals.detach().cpu().numpy(), cols.cpu().numpy(), indptr),
                                shape=(m, n))
        return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (m, n),
                                       is_coalesced=True, check_invariants=False)
    op = _SingleOperator(J)
    if numpy_caller:
        return LinearOperator(op.shape, matvec=op.matvec_numpy, rmatvec=op.rmatvec_numpy,
                              dtype=np.float64)
    return op


def _unwrap(J: Any) -> tuple[Any, Tensor | None, Tensor | None]:
    """The stored Jacobian and its row and column scalings (the engine's wrapper, if any)."""
    if hasattr(J, "base") and hasattr(J, "row_scale") and hasattr(J, "col_scale"):
        return J.base, J.row_scale, J.col_scale
    return J, None, None


class _SingleOperator:
    """Problem 0 of an engine operator as an operator on 1-D tensors."""

    def __init__(self, J: Any) -> None:
        self.J = J
        self.shape = tuple(J.shape[1:])
        self.dtype = J.dtype
        self.device = J.device

    def matvec(self, v: Tensor) -> Tensor:
        return self.J.matvec(torch.as_tensor(v, dtype=self.dtype, device=self.device)[None])[0]

    def rmatvec(self, u: Tensor) -> Tensor:
        return self.J.rmatvec(torch.as_tensor(u, dtype=self.dtype, device=self.device)[None])[0]

    def matvec_numpy(self, v: np.ndarray) -> np.ndarray:
        return self.matvec(torch.from_numpy(np.asarray(v, dtype=np.float64).reshape(-1))
                           ).detach().cpu().numpy().astype(np.float64)

    def rmatvec_numpy(self, u: np.ndarray) -> np.ndarray:
        return self.rmatvec(torch.from_numpy(np.asarray(u, dtype=np.float64).reshape(-1))
                            ).detach().cpu().numpy().astype(np.float64)
