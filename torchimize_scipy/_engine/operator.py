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

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .csr import BlockCSR


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
        cols = [self.matvec(P[..., k]) for k in range(P.shape[-1])]
        if P.device.type == "cpu" and not any(c.requires_grad for c in cols):
            # numpy's copy on this thread: no torch parallel region over the (B, m, k) result
            return torch.from_numpy(np.stack([c.numpy() for c in cols], axis=-1))
        return torch.stack(cols, dim=-1)

    def host_csr(self) -> BlockCSR | None:
        """The host CSR form of an unscaled sparse Jacobian whose products run on the host.

        Its ``matvec_into``, ``rmatvec_into`` and ``start_fused`` work on
        numpy arrays without allocating (:class:`~torchimize_scipy._engine.csr.BlockCSR`).
        None for other kinds, devices, or with a scaling (:meth:`folded`
        moves the scalings into the values).
        """
        if (self.kind == "sparse" and self.row_scale is None and self.col_scale is None
                and self._csr.on_host):
            return self._csr
        return None

    @property
    def sparse_on_host(self) -> bool:
        """Whether this is a sparse Jacobian whose products run on the host (any scaling)."""
        return self.kind == "sparse" and self._csr.on_host

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
        elif self.kind == "sparse" and self._csr.on_host and self.dtype == torch.float64:
            # numpy's bincount on this thread: the same sums in the same (entry) order as
            # index_add, without two of torch's parallel regions over every entry
            B, _, n = self.shape
            csr = self._csr
            vals = csr.values.detach().numpy()
            if self.row_scale is not None:
                vals = vals * self.row_scale.detach().reshape(-1).numpy()[csr.rows().numpy()]
            sq = torch.from_numpy(np.bincount(csr.col.numpy(), weights=vals * vals,
                                              minlength=B * n).reshape(B, n))
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
