"""The vector work of :func:`~torchimize_scipy._engine.lsmr.lsmr`: numpy on the host, else torch.

LSMR's recurrence is written against ``vx``, one of the two classes here.
On the host the vectors are numpy arrays (:class:`HostVectors`; the
caller's tensors are read through views, the solution handed back as a
tensor over our array), elsewhere tensors (:class:`DeviceVectors`). On the
host no torch operation runs per iteration, so neither torch's OpenMP
threads nor a threaded BLAS ``dot`` is woken for the long vectors: each
would leave threads spinning beside the products' row blocks, which on 2
cores cost more than the arithmetic (the norms use numpy's own loop for that
reason, :func:`sq_norms`). A sparse Jacobian on the host sums its products
into buffers of ours in scipy's kernel
(:meth:`~torchimize_scipy._engine.csr.BlockCSR.matvec_into`), and when its
rows are cut into several blocks a product can be started on the lean
helper threads of :mod:`.csr` (:meth:`HostVectors.start_forward`) and
finished later. Every vector has a spare buffer (:class:`Vector`), so a long
solve allocates nothing per iteration.
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
    wake, none left spinning beside the products' row blocks) at a fraction
    of a torch operation's dispatch cost. A sparse Jacobian on the host
    (:meth:`~torchimize_scipy._engine.operator.JacobianOperator.host_accumulators`)
    sums its products into a zeroed buffer of ours (no allocation, so no page
    faults; the same sums as ``A @ w``); any other operator is applied to
    tensors over the arrays' memory. ``A w - c y`` is then formed as
    scipy's lsmr forms it (``c y`` subtracted from the product), rather than
    by starting the sums at ``-c y``: that would save a pass but round
    differently (on the bundle adjustment of ``bench_sparse.py`` it cost an
    LSMR iteration more than scipy's).
    """

    sub, mul, add = staticmethod(np.subtract), staticmethod(np.multiply), staticmethod(np.add)

    def __init__(self, A: Any, dtype: torch.dtype) -> None:
        self.A = A
        self.dtype = torch.empty((), dtype=dtype).numpy().dtype
        csr = A.host_csr() if isinstance(A, JacobianOperator) else None
        self.csr = csr if csr is not None and A.dtype == dtype else None
        self.raw: np.ndarray | None = None  # where a product started ahead is summed
        self.raw_tmp: np.ndarray | None = None  # its ``c y``, when its blocks subtract it

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

    def start_forward(self, w: np.ndarray, y: np.ndarray | None = None, c: Any = None,
                      dest: np.ndarray | None = None) -> Any:
        """Start ``A w`` on the products' helper threads, or None (then it is done when needed).

        The pending product is handed to the next :meth:`product_sub`; ``w``
        (and ``y``) must stay unchanged until then. With ``y`` and ``c``
        (the ``y`` and ``c`` that next :meth:`product_sub` will get) the
        row blocks also form ``A w - c y`` where they can
        (:meth:`~torchimize_scipy._engine.csr.BlockCSR.sub_into`: one
        problem), written straight into ``dest`` when given (the ``out`` that
        next :meth:`product_sub` will get; no copy then), else into a buffer
        of ours that :meth:`product_sub` copies. ``dest`` must not be read
        or written until then (:attr:`_Pending.out` names the array written).
        """
        if self.csr is None:
            return None
        if self.raw is None:
            self.raw = self.zeros(w.shape[0], self.A.shape[1])
        sub = None
        out = self.raw
        if y is not None and w.shape[0] == 1 and np.size(c) == 1:
            if self.raw_tmp is None:
                self.raw_tmp = self.empty_like(self.raw)
            sub = (y, c, self.raw_tmp)
            if dest is not None and dest.shape == out.shape and dest.dtype == out.dtype \
                    and dest.flags.c_contiguous:
                out = dest
        product = self.csr.start_matvec(w, out, sub)
        if product is None:
            return None
        return _Pending(product, sub is not None, out)

    def product_sub(self, forward: bool, w: np.ndarray, c: Any, y: np.ndarray, out: np.ndarray,
                    tmp: np.ndarray, pending: Any = None) -> np.ndarray:
        """``A w - c y`` (``forward``) or ``A^T w - c y``, written into ``out``.

        ``pending`` is ``A w`` started by :meth:`start_forward`, if any (with
        ``c y`` already subtracted when it says so). A sparse Jacobian cut
        into row blocks subtracts ``c y`` in its blocks
        (:meth:`~torchimize_scipy._engine.csr.BlockCSR.sub_into`); the values
        are those of the product summed into zeros and then
        ``out = A w - (y c)``, as scipy's lsmr forms them.
        """
        if pending is not None:
            pending.wait()
            if pending.subtracted:
                if pending.out is not out:
                    np.copyto(out, pending.out)
                return out
            prod = self.raw
        elif self.csr is not None:  # the product summed into zeros, as ``A @ w``: same rounding
            if self.csr.sub_into(forward, w, c, y, out, tmp):
                return out
            out.fill(0)
            (self.csr.matvec_into if forward else self.csr.rmatvec_into)(w, out)
            prod = out
        else:
            prod = self.product(forward, w)
        return np.subtract(prod, np.multiply(y, c, out=tmp), out=out)


class _Pending(NamedTuple):
    """A product started ahead (:meth:`HostVectors.start_forward`) and whether it
    subtracts ``c y`` itself."""

    product: Any
    subtracted: bool
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
                    tmp: Tensor, pending: Any = None) -> Tensor:
        return torch.sub(self.product(forward, w), torch.mul(y, c, out=tmp), out=out)
