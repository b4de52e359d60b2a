"""The vector work of :func:`~torchimize_scipy._engine.lsmr.lsmr`: numpy on the host, else torch.

LSMR's recurrence is written against ``vx``, one of the two classes here.
On the host the vectors are numpy arrays (:class:`HostVectors`; the
caller's tensors are read through views, the solution handed back as a
tensor over our array), elsewhere tensors (:class:`DeviceVectors`). On the
host no torch operation runs per iteration, so neither torch's OpenMP
threads nor a threaded BLAS ``dot`` is woken for the long vectors: each
would leave threads spinning beside the products' row blocks, which on 2
cores cost more than the arithmetic (the norms use numpy's own loop for that
reason, :func:`sq_norms`). A sparse Jacobian on the host forms each
iteration's two products in one pass over its values, in scipy's kernels,
into buffers of ours (:meth:`~torchimize_scipy._engine.csr.BlockCSR.start_fused`);
for one problem that pass is started on the lean helper threads of
:mod:`.csr` (:meth:`HostVectors.start_forward`) while this thread updates
the solution, and finished later. Every vector has a spare buffer
(:class:`Vector`), so a long solve allocates nothing per iteration.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .operator import JacobianOperator


def sq_norms(w: np.ndarray) -> np.ndarray:
    """Squared Euclidean norms of the rows of ``w (B, k)`` on the calling thread.

    numpy's own sum-of-products loop, not BLAS: a threaded BLAS ``dot`` of a
    long vector wakes BLAS's threads, which then spin beside the products'
    row blocks (on 2 cores, ~2.6 ms of CPU time for one 62,000-entry norm
    measured under load, against 12-40 us for the arithmetic).
    """
    return np.einsum("ij,ij->i", w, w)


class Vector:
    """A batch of vectors of LSMR and a spare buffer of the same shape.

    The next value is written into ``spare`` (``out=``); :meth:`take` makes it
    current and the old current the spare, so a long solve allocates nothing
    per iteration. A value made elsewhere (a ``where`` for frozen problems)
    becomes current and leaves the spare as it is. ``cur`` is never written
    in place: a caller's array (``b``) may start as a current value only if
    it is replaced before any write, which :func:`~torchimize_scipy._engine.lsmr.lsmr` ensures.
    """

    __slots__ = ("cur", "spare")

    def __init__(self, t: Any, vx: Any) -> None:
        self.cur = t
        self.spare = vx.empty_like(t)

    def take(self, value: Any) -> None:
        if value is self.spare:
            self.cur, self.spare = value, self.cur
        else:
            self.cur = value


class HostVectors:
    """The vector work of LSMR on the host: numpy arrays, no torch operation.

    numpy's elementwise loops run on the calling thread (no OpenMP team to
    wake, none left spinning beside the products' blocks) at a fraction of a
    torch operation's dispatch cost. A sparse Jacobian on the host
    (:meth:`~torchimize_scipy._engine.operator.JacobianOperator.host_csr`)
    forms each iteration's ``t = A v - c u`` and ``A^T t`` in one pass over
    ``A`` (:meth:`~torchimize_scipy._engine.csr.BlockCSR.start_fused`, into
    buffers of ours: no allocation, so no page faults), and the next ``v`` is
    ``(A^T t) / beta - beta v``: the transposed product of the unscaled
    ``t``, scaled after (:meth:`product_sub`'s ``scale``), where scipy's lsmr
    multiplies ``A^T`` with ``t / beta``; the two differ by rounding only.
    ``t`` itself is formed as scipy's lsmr forms it (``c u`` subtracted from
    the product summed into zeros), rather than by starting the sums at
    ``-c u``: that would save a pass but round differently (on the bundle
    adjustment of ``bench_sparse.py`` it cost an LSMR iteration more than
    scipy's). Any other operator is applied to tensors over the arrays'
    memory.
    """

    sub, mul, add = staticmethod(np.subtract), staticmethod(np.multiply), staticmethod(np.add)

    def __init__(self, A: Any, dtype: torch.dtype) -> None:
        self.A = A
        self.dtype = torch.empty((), dtype=dtype).numpy().dtype
        csr = A.host_csr() if isinstance(A, JacobianOperator) else None
        self.csr = csr if csr is not None and A.dtype == dtype else None
        self.At_t: np.ndarray | None = None  # A^T t of the last t formed (sparse on the host)
        self._fresh = False  # whether At_t belongs to the t product_sub returned last
        self._tmp: np.ndarray | None = None  # the ``c y`` of a product started ahead

    def from_tensor(self, t: Tensor) -> np.ndarray:
        return t.detach().numpy()

    def to_tensor(self, a: np.ndarray) -> Tensor:
        return torch.from_numpy(a)

    def copy(self, a: Any) -> np.ndarray:
        if isinstance(a, Tensor):
            a = a.detach().numpy()
        return np.array(a, dtype=self.dtype, order="C")

    def zeros(self, *shape: int) -> np.ndarray:
        return np.zeros(shape, dtype=self.dtype)

    def empty(self, *shape: int) -> np.ndarray:
        return np.empty(shape, dtype=self.dtype)

    @staticmethod
    def empty_like(a: np.ndarray) -> np.ndarray:
        return np.empty_like(a, order="C")

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> np.ndarray:
        return np.where(cond, a, b)

    @staticmethod
    def scale_(w: np.ndarray, c: Any) -> None:
        np.multiply(w, c, out=w)

    def product(self, forward: bool, w: np.ndarray) -> np.ndarray:
        """``A w`` (``forward``) or ``A^T w``, a new array."""
        if self.csr is not None:
            out = self.zeros(w.shape[0], self.A.shape[1 if forward else 2])
            (self.csr.matvec_into if forward else self.csr.rmatvec_into)(w, out)
            return out
        t = torch.from_numpy(np.ascontiguousarray(w))
        r = self.A.matvec(t) if forward else self.A.rmatvec(t)
        return np.ascontiguousarray(r.detach().numpy(), dtype=self.dtype)

    def _start_pair(self, w: np.ndarray, y: np.ndarray, c: Any, out: np.ndarray,
                    tmp: np.ndarray) -> Any:
        """Start ``out = A w - c y`` and ``At_t = A^T out`` (a sparse Jacobian on the host)."""
        if self.At_t is None:
            self.At_t = self.empty(w.shape[0], self.A.shape[2])
        self._fresh = False
        return self.csr.start_fused(w, y, c, out, tmp, self.At_t)

    def start_forward(self, w: np.ndarray, y: np.ndarray | None = None, c: Any = None,
                      dest: np.ndarray | None = None) -> Any:
        """Start the next :meth:`product_sub` ``A w - c y`` on the helper threads, or None.

        One problem with a sparse Jacobian on the host whose products are
        shared with the helper threads: the pass that forms
        ``A w - c y`` and its transposed product
        (:meth:`~torchimize_scipy._engine.csr.BlockCSR.start_fused`), written
        into ``dest`` (the ``out`` that next :meth:`product_sub` will get; no
        copy then) when it can take it, else into a buffer of ours that
        :meth:`product_sub` copies. ``w``, ``y`` and ``dest`` must stay
        untouched until then (:attr:`_Pending.out` names the array written).
        """
        if self.csr is None or y is None or w.shape[0] != 1 or np.size(c) != 1 \
                or not self.csr.shared:  # (one block: nothing would run beside this thread)
            return None
        if self._tmp is None:
            self._tmp = self.empty_like(y)
        if dest is None or dest.shape != y.shape or dest.dtype != y.dtype \
                or not dest.flags.c_contiguous:
            dest = self.empty_like(y)
        return _Pending(self._start_pair(w, y, c, dest, self._tmp), dest)

    def product_sub(self, forward: bool, w: np.ndarray, c: Any, y: np.ndarray, out: np.ndarray,
                    tmp: np.ndarray, pending: Any = None, scale: Any = None) -> np.ndarray:
        """``A w - c y`` (``forward``) or ``A^T w - c y``, written into ``out``.

        ``pending`` is the ``A w - c y`` started by :meth:`start_forward`, if
        any. With a sparse Jacobian on the host the forward product also
        forms ``A^T`` of its result (:meth:`_start_pair`), and the
        transposed one that follows, for ``w`` that result times ``scale``
        (``1 / beta``), is ``(A^T t) scale - c y`` (class notes).
        """
        if forward and pending is not None:
            pending.wait()
            if pending.out is not out:
                np.copyto(out, pending.out)
            self._fresh = True
            return out
        if self.csr is not None:
            if forward:
                self._start_pair(w, y, c, out, tmp).wait()
                self._fresh = True
                return out
            if self._fresh and scale is not None:
                self._fresh = False
                prod = np.multiply(self.At_t, scale, out=out)
                return np.subtract(prod, np.multiply(y, c, out=tmp), out=out)
            out.fill(0)
            self.csr.rmatvec_into(w, out)
            prod = out
        else:
            prod = self.product(forward, w)
        return np.subtract(prod, np.multiply(y, c, out=tmp), out=out)


class _Pending(NamedTuple):
    """A pass started ahead (:meth:`HostVectors.start_forward`) and the array it writes
    ``A w - c y`` into."""

    product: Any
    out: np.ndarray

    def wait(self) -> None:
        """Finish the product (when the solve stops before it is needed)."""
        self.product.wait()


class DeviceVectors:
    """The vector work of LSMR in torch (vectors off the host, or host scalars off)."""

    sub, mul, add = staticmethod(torch.sub), staticmethod(torch.mul), staticmethod(torch.add)

    def __init__(self, A: Any, dtype: torch.dtype, device: torch.device) -> None:
        self.A, self._dtype, self._dev = A, dtype, device

    @staticmethod
    def from_tensor(t: Tensor) -> Tensor:
        return t

    @staticmethod
    def to_tensor(a: Tensor) -> Tensor:
        return a

    def copy(self, a: Tensor) -> Tensor:
        return a.clone()

    def zeros(self, *shape: int) -> Tensor:
        return torch.zeros(shape, dtype=self._dtype, device=self._dev)

    def empty(self, *shape: int) -> Tensor:
        return torch.empty(shape, dtype=self._dtype, device=self._dev)

    @staticmethod
    def empty_like(a: Tensor) -> Tensor:
        return torch.empty_like(a)

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Tensor:
        return torch.where(cond, a, b)

    @staticmethod
    def scale_(w: Tensor, c: Any) -> None:
        w.mul_(c)

    def product(self, forward: bool, w: Tensor) -> Tensor:
        return self.A.matvec(w) if forward else self.A.rmatvec(w)

    @staticmethod
    def start_forward(w: Tensor, y: Tensor | None = None, c: Any = None,
                      dest: Tensor | None = None) -> None:
        return None  # (a device runs its products asynchronously anyway)

    def product_sub(self, forward: bool, w: Tensor, c: Any, y: Tensor, out: Tensor,
                    tmp: Tensor, pending: Any = None, scale: Any = None) -> Tensor:
        return torch.sub(self.product(forward, w), torch.mul(y, c, out=tmp), out=out)
