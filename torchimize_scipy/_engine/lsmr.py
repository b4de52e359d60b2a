r"""LSMR for a batch of least-squares problems, in torch.

D. C.-L. Fong and M. A. Saunders, "LSMR: An iterative algorithm for sparse
least-squares problems", SIAM J. Sci. Comput. 33(5), 2950-2971 (2011).

For every problem ``k`` of the batch, LSMR minimises

.. math:: \lVert A_k x - b_k \rVert^2 + \lambda_k^2 \lVert x \rVert^2

using only the products :math:`A_k v` and :math:`A_k^\top u`. It runs the
Golub-Kahan bidiagonalisation of :math:`A_k` started at :math:`b_k` and chooses
the iterate that makes :math:`\lVert A_k^\top r_k \rVert` minimal over the
Krylov subspace (MINRES on the normal equations), so that
:math:`\lVert A^\top r\rVert` decreases monotonically. Two QR factorisations by
Givens rotations are updated per step: one of the lower bidiagonal matrix
(with the damping folded in) and one of the resulting upper bidiagonal matrix;
the norms used by the stopping rules (:math:`\lVert r\rVert`,
:math:`\lVert A^\top r\rVert`, :math:`\lVert A\rVert_F`, :math:`\mathrm{cond}(A)`)
are estimated from them at no extra product (section 5 of the paper).

Stopping rules (the paper's section 6, with the codes of its reference
implementation, which scipy's ``lsmr`` returns as ``istop``):

== ==========================================================================
0  ``x = 0`` (or ``x0``) is the exact solution: ``b = 0`` or ``A^T b = 0``
1  :math:`\lVert r\rVert \le \mathrm{btol}\,\lVert b\rVert +
   \mathrm{atol}\,\lVert A\rVert\,\lVert x\rVert` (compatible system)
2  :math:`\lVert A^\top r\rVert \le \mathrm{atol}\,\lVert A\rVert\,\lVert r\rVert`
   (least-squares solution)
3  the estimate of :math:`\mathrm{cond}(A)` exceeds ``conlim``
4, 5, 6  as 1, 2, 3 with the tolerances at the machine precision
7  ``maxiter`` iterations
== ==========================================================================

Batching: every scalar of the recurrences is one entry per problem, and the
~20 scalars are packed into one ``(K, B)`` array updated by a few vectorised
operations. With the vectors on the CPU the scalars live on the host as numpy
arrays (:class:`_Scalars`): the norms of the vectors are read without a copy,
a numpy operation on a handful of values costs a fraction of a torch
operation's dispatch, and the stopping tests are decided every iteration at
no cost; a single float64 problem (``least_squares``) keeps them as
``numpy.float64`` scalars (:class:`_FloatScalars`), cheaper still. On a
GPU they stay on the device as tensors and the loop asks the device whether
any problem is still running only every ``check_every`` iterations (one host
synchronisation each). The same code, written against ``xp`` (``numpy``,
``torch`` or :class:`_Floats`), runs in all cases. The vector work per
iteration is the two products, three norms, two scalings and five updates
``y - c x`` (a multiplication and a subtraction each: a fused ``addcmul``
rounds differently with the batch size, and a problem's result must not
depend on its neighbours).

The vectors are written against ``vx`` likewise: on the host they are numpy
arrays (:class:`_HostVectors`; the caller's tensors are read through views,
the solution handed back as a tensor over our array), elsewhere tensors
(:class:`_DeviceVectors`). On the host no torch operation runs per
iteration, so neither torch's OpenMP threads nor a threaded BLAS ``dot`` is
woken for the long vectors: each would leave threads spinning beside the
products' row blocks, which on 2 cores cost more than the arithmetic (the
norms use numpy's own loop for that reason, :func:`_sq_norms`). A sparse
Jacobian on the host sums its products into buffers of ours in scipy's
kernel (:meth:`~torchimize_scipy._engine.csr.BlockCSR.matvec_into`), and
when its rows are cut into several blocks the next iteration's ``A v`` is
started in the thread pool as soon as ``v`` is known, while this thread
updates the scalars, ``x`` and the search directions (the values are those
of the product made later, bit for bit; a problem that stops has that
product's rows discarded as it is frozen anyway).

A problem that has stopped is frozen: its vectors and scalars are kept by
``where`` while the others go on (skipped while every problem runs), so its
result does not depend on its neighbours or on ``check_every``. A problem
whose residual estimate or iterate norm becomes non-finite (a breakdown, e.g.
from a non-finite product) stops alone with ``istop = -1`` and keeps its last
finite iterate.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm

from .operator import JacobianOperator, as_operator

#: ``istop`` of a problem whose iteration produced non-finite values (ours)
BREAKDOWN = -1


class LSMRResult(NamedTuple):
    """What :func:`lsmr` returns, per problem (scipy's tuple, batched).

    Attributes
    ----------
    x : Tensor, shape (B, n)
    istop : Tensor, shape (B,), int64
        Stopping reason (module notes).
    itn : Tensor, shape (B,), int64
        Iterations taken.
    normr, normar, norma, conda, normx : Tensor, shape (B,)
        Estimates of :math:`\\lVert b - Ax\\rVert`, :math:`\\lVert A^\\top(b - Ax)\\rVert`,
        :math:`\\lVert A\\rVert_F`, :math:`\\mathrm{cond}(A)` and
        :math:`\\lVert x\\rVert` (with the damping included in ``A``).
    """

    x: Tensor
    istop: Tensor
    itn: Tensor
    normr: Tensor
    normar: Tensor
    norma: Tensor
    conda: Tensor
    normx: Tensor


def sym_ortho(a: Any, b: Any) -> tuple[Any, Any, Any]:
    """Givens rotation ``(c, s, r)`` with ``[c s; -s c] [a; b] = [r; 0]``, batched.

    ``r = hypot(a, b) >= 0`` (computed without overflow), ``c = a / r``,
    ``s = b / r``; ``a = b = 0`` gives ``c = s = r = 0``. ``b = 0`` gives
    ``(sign a, 0, |a|)`` and ``a = 0`` gives ``(0, sign b, |b|)``, as the
    stable rotation of S.-C. Choi ("Iterative methods for singular linear
    equations and least-squares problems", PhD thesis, Stanford 2006,
    SymOrtho), with which it agrees to rounding. ``a`` and ``b`` are torch
    tensors or numpy arrays (the host's scalars of :func:`lsmr`).
    """
    if isinstance(a, float):  # one problem's float64 scalars (numpy.float64 included)
        r = np.float64(math.hypot(a, b))
        safe = r if r != 0 else np.float64(1.0)
        return a / safe, b / safe, r
    xp = torch if isinstance(a, Tensor) else np
    r = xp.hypot(a, b)
    safe = xp.where(r == 0, 1.0, r)
    return a / safe, b / safe, r


def _sq_norms(w: np.ndarray) -> np.ndarray:
    """Squared Euclidean norms of the rows of ``w (B, k)`` on the calling thread.

    numpy's own sum-of-products loop, not BLAS: a threaded BLAS ``dot`` of a
    long vector wakes BLAS's threads, which then spin beside the products'
    row blocks (on 2 cores, ~2.6 ms of CPU time for one 62,000-entry norm
    measured under load, against 12-40 us for the arithmetic).
    """
    return np.einsum("ij,ij->i", w, w)


class _Vector:
    """A batch of vectors of :func:`lsmr` and a spare buffer of the same shape.

    The next value is written into ``spare`` (``out=``); :meth:`take` makes it
    current and the old current the spare, so a long solve allocates nothing
    per iteration. A value made elsewhere (a ``where`` for frozen problems)
    becomes current and leaves the spare as it is. ``cur`` is never written
    in place: a caller's array (``b``) may start as a current value only if
    it is replaced before any write, which :func:`lsmr` ensures.
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


class _HostVectors:
    """The vector work of :func:`lsmr` on the host: numpy arrays, no torch operation.

    numpy's elementwise loops run on the calling thread (no thread pool to
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

    def start_forward(self, w: np.ndarray) -> Any:
        """Start ``A w`` in the products' thread pool, or None (then it is done when needed).

        The pending product is handed to the next :meth:`product_sub`; ``w``
        must stay unchanged until then.
        """
        if self.csr is None:
            return None
        if self.raw is None:
            self.raw = self.zeros(w.shape[0], self.A.shape[1])
        return self.csr.start_matvec(w, self.raw)

    def product_sub(self, forward: bool, w: np.ndarray, c: Any, y: np.ndarray, out: np.ndarray,
                    tmp: np.ndarray, pending: Any = None) -> np.ndarray:
        """``A w - c y`` (``forward``) or ``A^T w - c y``, written into ``out``.

        ``pending`` is ``A w`` started by :meth:`start_forward`, if any.
        """
        if pending is not None:
            pending.wait()
            prod = self.raw
        elif self.csr is not None:  # the product summed into zeros, as ``A @ w``: same rounding
            out.fill(0)
            (self.csr.matvec_into if forward else self.csr.rmatvec_into)(w, out)
            prod = out
        else:
            prod = self.product(forward, w)
        return np.subtract(prod, np.multiply(y, c, out=tmp), out=out)


class _DeviceVectors:
    """The vector work of :func:`lsmr` in torch (vectors off the host, or host scalars off)."""

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
    def start_forward(w: Tensor) -> None:
        return None  # (a device runs its products asynchronously anyway)

    def product_sub(self, forward: bool, w: Tensor, c: Any, y: Tensor, out: Tensor,
                    tmp: Tensor, pending: Any = None) -> Tensor:
        return torch.sub(self.product(forward, w), torch.mul(y, c, out=tmp), out=out)


class _Floats:
    """The few elementwise functions of the recurrence for one problem's float scalars.

    Results stay ``numpy.float64`` (a ``float`` whose division by zero gives
    ``inf`` or ``nan``, under ``numpy.errstate``, instead of raising), and
    ``maximum``/``minimum`` propagate NaN as numpy's do.
    """

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return a if cond else b

    @staticmethod
    def sqrt(a: Any) -> np.float64:
        return np.float64(math.sqrt(a)) if a >= 0 else np.float64("nan")

    @staticmethod
    def abs(a: Any) -> Any:
        return abs(a)

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        return a if (a >= b or a != a) else b

    @staticmethod
    def minimum(a: Any, b: Any) -> Any:
        return a if (a <= b or a != a) else b

    @staticmethod
    def isfinite(a: Any) -> bool:
        return math.isfinite(a)

    @staticmethod
    def logical_not(a: Any) -> bool:
        return not a

    @staticmethod
    def stack(values: list) -> list:
        return list(values)


class _FloatScalars:
    """:class:`_Scalars` for one float64 problem on the CPU: ``numpy.float64`` scalars.

    An operation on a numpy scalar costs about a tenth of one on an array of
    one entry; the coefficients reach the vectors as Python numbers.
    """

    xp = _Floats
    host = True

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def per_problem(self, value: Any) -> np.float64:
        if isinstance(value, Tensor):
            value = value.detach().reshape(-1)[0].item()
        return np.float64(np.asarray(value).reshape(-1)[0])

    def full(self, value: float) -> np.float64:
        return np.float64(value)

    def zeros_int(self) -> int:
        return 0

    def norm(self, w: np.ndarray) -> np.float64:
        return np.float64(math.sqrt(_sq_norms(w)[0]))

    def inverse(self, a: Any) -> np.float64:
        return 1.0 / a if a > 0 else np.float64(1.0)

    def coef(self, a: Any) -> float:
        return float(a)

    def coefs(self, *cols: Any) -> tuple[float, ...]:
        return tuple(float(c) for c in cols)

    def mask(self, m: Any) -> np.ndarray:
        return np.array([[bool(m)]])

    def all(self, m: Any) -> bool:
        return bool(m)

    def any(self, m: Any) -> bool:
        return bool(m)

    def tensor(self, a: Any) -> Tensor:
        if isinstance(a, (bool, int, np.integer)):
            return torch.tensor([int(a)], dtype=torch.long)
        return torch.tensor([float(a)], dtype=self.dtype)


#: rows of the packed scalar state of :func:`lsmr`, ``(K, B)``
_KEYS = ("alpha", "beta", "zetabar", "alphabar", "rho", "rhobar", "cbar", "sbar", "betadd",
         "betad", "rhodold", "tautildeold", "thetatilde", "zeta", "d", "normA2", "maxrbar",
         "minrbar", "normA", "condA", "normx", "normr", "normar")
_NORMA, _CONDA, _NORMX, _NORMR, _NORMAR = (_KEYS.index(k) for k in
                                           ("normA", "condA", "normx", "normr", "normar"))


class _Scalars:
    """Where :func:`lsmr` keeps its per-problem scalars, and the conversions to the vectors.

    With the vectors on the CPU the scalars are numpy arrays ``(B,)`` on the
    host: an elementwise numpy operation on a few values costs a fraction of
    a torch operation's dispatch, the norms of the vectors are read without
    a copy, and every stopping test is decided on the host for free. On
    other devices they are ``(B,)`` tensors on the device (no host
    synchronisation but the periodic "all stopped?" check). The recurrence
    itself is written once, against ``xp`` (``numpy`` or ``torch``, whose
    elementwise functions used here share their names and semantics).
    """

    def __init__(self, host: bool, B: int, dtype: torch.dtype, device: torch.device) -> None:
        self.host, self.B, self.dtype, self.device = host, B, dtype, device
        self.xp: Any = np if host else torch
        self.np_dtype = torch.empty((), dtype=dtype).numpy().dtype if host else None

    def per_problem(self, value: Any) -> Any:
        """A float or a ``(B,)`` tensor as a ``(B,)`` array of the scalars' kind."""
        if self.host:
            if isinstance(value, Tensor):
                value = value.detach().cpu().numpy()
            return np.array(np.broadcast_to(np.asarray(value, dtype=self.np_dtype), (self.B,)))
        t = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        return t.expand(self.B) if t.ndim == 0 else t

    def full(self, value: float) -> Any:
        if self.host:
            return np.full(self.B, value, dtype=self.np_dtype)
        return torch.full((self.B,), value, dtype=self.dtype, device=self.device)

    def zeros_int(self) -> Any:
        if self.host:
            return np.zeros(self.B, dtype=np.int64)
        return torch.zeros(self.B, dtype=torch.long, device=self.device)

    def norm(self, w: Any) -> Any:
        """Euclidean norms of the rows of ``w (B, k)`` (numpy on the host, else a tensor)."""
        if self.host:
            return np.sqrt(_sq_norms(w))
        return vnorm(w, dim=-1)

    def inverse(self, a: Any) -> Any:
        """``1 / a`` where ``a > 0``, else 1 (normalising a vector only when it is nonzero)."""
        xp = self.xp
        pos = a > 0
        return xp.where(pos, 1.0 / xp.where(pos, a, 1.0), 1.0)

    def coef(self, a: Any) -> Any:
        """``(B, 1)`` array multiplying the rows of a batch of vectors (of the vectors' kind)."""
        return a[:, None] if self.host else a.unsqueeze(-1)

    def coefs(self, *cols: Any) -> tuple[Any, ...]:
        """``(B, 1)`` arrays of several coefficients."""
        if self.host:
            return tuple(c[:, None] for c in cols)
        return tuple(c.unsqueeze(-1) for c in cols)

    def mask(self, m: Any) -> Any:
        """``(B, 1)`` boolean array selecting rows of a batch of vectors."""
        return m[:, None] if self.host else m.unsqueeze(-1)

    def all(self, m: Any) -> bool:
        """Whether ``m`` holds everywhere, known without a device synchronisation.

        False on a device (unknown there): the caller then takes the general path.
        """
        return self.host and bool(m.all())

    def any(self, m: Any) -> bool:
        return bool(m.any())

    def tensor(self, a: Any) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)) if self.host else a


@torch.no_grad()
def lsmr(A: Any, b: Tensor, damp: float | Tensor = 0.0, atol: float = 1e-6, btol: float = 1e-6,
         conlim: float = 1e8, maxiter: int | None = None, x0: Tensor | None = None,
         check_every: int | None = None, host_scalars: bool | None = None,
         _floats: bool | None = None) -> LSMRResult:
    """Solve ``min |A x - b|^2 + damp^2 |x|^2`` for each problem of a batch.

    Parameters
    ----------
    A : Tensor or linear operator
        ``(B, m, n)``: a dense or sparse COO tensor, a
        :class:`~torchimize_scipy._engine.operator.JacobianOperator`, or any
        object with ``shape``, ``matvec(p (B, n))`` and ``rmatvec(u (B, m))``.
    b : Tensor
        Right-hand sides, ``(B, m)``.
    damp : float or Tensor
        Damping :math:`\\lambda`, one for all problems or ``(B,)``.
    atol, btol : float or Tensor
        Stopping tolerances (module notes); scalars or ``(B,)``.
    conlim : float
        Stop when the condition estimate exceeds it; 0 disables the test.
    maxiter : int, optional
        Iteration limit, ``min(m, n)`` by default.
    x0 : Tensor, optional
        Starting iterate ``(B, n)``; zeros by default.
    check_every : int, optional
        Iterations between the host's checks of "all stopped" when the
        vectors are not on the CPU (default 8; on the CPU the scalars live on
        the host and every iteration is checked for free). Stopped problems
        are frozen in between, so the results do not depend on it.
    host_scalars : bool, optional
        Keep the scalars on the host as numpy arrays (default: when ``b`` is
        on the CPU) or as tensors beside the vectors (default elsewhere). Both
        run the same recurrence; the choice exists for the tests. One float64
        problem on the host keeps them as ``numpy.float64`` scalars
        (``_floats=False``, for the tests, keeps arrays of one entry).

    Returns
    -------
    LSMRResult
    """
    if isinstance(A, Tensor):
        A = as_operator(A)
    if isinstance(A, JacobianOperator):
        A = A.folded()  # a sparse matrix's scalings into its values: none per product
    B, m, n = A.shape
    dtype, dev = b.dtype, b.device
    if maxiter is None:
        maxiter = min(m, n)
    host = dev.type == "cpu" if host_scalars is None else bool(host_scalars)
    if host and dev.type != "cpu":
        raise ValueError("host scalars need the vectors on the CPU")
    if check_every is None or host:
        check_every = 1 if host else 8
    if host and B == 1 and dtype == torch.float64 and _floats is not False:
        sc: Any = _FloatScalars(dtype)  # one problem: plain float64 scalars, cheapest of all
    else:
        sc = _Scalars(host, B, dtype, dev)
    xp = sc.xp
    damp = sc.per_problem(damp)
    atol = sc.per_problem(atol)
    btol = sc.per_problem(btol)
    ctol = 1.0 / conlim if conlim > 0 else 0.0

    vx: Any = _HostVectors(A, dtype) if host else _DeviceVectors(A, dtype, dev)
    b = vx.from_tensor(b)
    normb = sc.norm(b)
    if x0 is None:
        x = vx.zeros(B, n)
        u = b
    else:
        x = vx.copy(x0.to(dtype))
        u = b - vx.product(True, x)
    beta = sc.norm(u)
    u = u * sc.coef(sc.inverse(beta))
    v = vx.product(False, u)
    if not sc.all(beta > 0):
        v = vx.where(sc.mask(beta > 0), v, 0.0)
    alpha = sc.norm(v)
    v = v * sc.coef(sc.inverse(alpha))

    zero = sc.full(0.0)
    one = sc.full(1.0)
    # the scalars of the recurrences, one row of (K, B) each (order: _KEYS)
    s = xp.stack([alpha, beta, alpha * beta, alpha, one, one, one, zero, beta, zero, one, zero,
                  zero, zero, zero, alpha * alpha, zero,
                  sc.full(min(1e100, float(torch.finfo(dtype).max))), xp.sqrt(alpha * alpha),
                  one, zero, beta, alpha * beta])
    h = vx.copy(v)  # h and v must not share memory: both are updated through buffers
    hbar = vx.zeros(B, n)
    istop = sc.zeros_int()
    itn = sc.zeros_int()
    # b = 0: x = 0 is exact (also with x0); A^T b = 0: the start is exact
    if not sc.all(normb != 0):
        x = vx.where(sc.mask(normb != 0), x, 0.0)
    active = (s[_NORMAR] != 0) & (normb != 0)
    safe_normb = xp.where(normb > 0, normb, 1.0)
    inf = sc.full(float("inf"))

    # the vectors, each with a spare buffer the next value is written into
    x, u, v, h, hbar = (_Vector(t, vx) for t in (x, u, v, h, hbar))
    tm = vx.empty(B, m)  # c * u
    tn = vx.empty(B, n)  # c * (v, hbar, h)
    sub, mul, add = vx.sub, vx.mul, vx.add
    # numpy's warnings for the branches where() discards (the torch path has none)
    quiet = np.errstate(all="ignore") if host else contextlib.nullcontext()
    pending = None  # J v of the next iteration, started while the scalars are updated
    with quiet:
        k = 0
        while k < maxiter:
            if k % check_every == 0 and not sc.any(active):
                break
            k += 1
            (alpha_o, _, zetabar_o, alphabar_o, rho_o, rhobar_o, cbar_o, sbar_o, betadd_o, betad_o,
             rhodold_o, tautildeold_o, thetatilde_o, zeta_o, d_o, normA2_o, maxrbar_o, minrbar_o,
             *_) = s if host else s.unbind(0)
            # ---- Golub-Kahan bidiagonalisation step ---------------------------------
            # (every vector update writes into a spare buffer of ours: no allocation and
            # no page faults for long vectors, never into a caller's array)
            u_new = vx.product_sub(True, v.cur, sc.coef(alpha_o), u.cur, u.spare, tm, pending)
            pending = None
            beta = sc.norm(u_new)
            go = beta > 0
            vx.scale_(u_new, sc.coef(sc.inverse(beta)))
            v_new = vx.product_sub(False, u_new, sc.coef(beta), v.cur, v.spare, tn)
            alpha_new = sc.norm(v_new)
            vx.scale_(v_new, sc.coef(sc.inverse(alpha_new)))
            if not sc.all(go):  # beta = 0: v and alpha stay (the reference implementation)
                v_new = vx.where(sc.mask(go), v_new, v.cur)
            alpha = xp.where(go, alpha_new, alpha_o)
            if k < maxiter:
                # the next iteration's A v, in the pool while this thread updates the
                # scalars and x: v_new becomes v of every problem that goes on (the rows
                # of the others are discarded by the freezing below, as usual)
                pending = vx.start_forward(v_new)
            # ---- rotation eliminating the damping, then the subdiagonal beta ---------
            chat, shat, alphahat = sym_ortho(alphabar_o, damp)
            c, sn, rho = sym_ortho(alphahat, beta)
            thetanew = sn * alpha
            alphabar = c * alpha
            # ---- rotation of the second QR factorisation ------------------------------
            thetabar = sbar_o * rho
            rhotemp = cbar_o * rho
            cbar, sbar, rhobar = sym_ortho(rhotemp, thetanew)
            zeta = cbar * zetabar_o
            zetabar = -sbar * zetabar_o
            # ---- update of h, hbar and x ------------------------------------------------
            c_hbar, c_x, c_h = sc.coefs(thetabar * rho / (rho_o * rhobar_o),
                                        zeta / (rho * rhobar), thetanew / rho)
            hbar_new = sub(h.cur, mul(hbar.cur, c_hbar, out=tn), out=hbar.spare)
            x_new = add(x.cur, mul(hbar_new, c_x, out=tn), out=x.spare)
            h_new = sub(v_new, mul(h.cur, c_h, out=tn), out=h.spare)
            normx = sc.norm(x_new)
            # ---- estimate of |r| (section 5.2 of the paper) -----------------------------
            betaacute = chat * betadd_o
            betacheck = -shat * betadd_o
            betahat = c * betaacute
            betadd = -sn * betaacute
            ctildeold, stildeold, rhotildeold = sym_ortho(rhodold_o, thetabar)
            thetatilde = stildeold * rhobar
            rhodold = ctildeold * rhobar
            betad = -stildeold * betad_o + ctildeold * betahat
            tautildeold = (zeta_o - thetatilde_o * tautildeold_o) / rhotildeold
            taud = (zeta - thetatilde * tautildeold) / rhodold
            d = d_o + betacheck * betacheck
            normr = xp.sqrt(d + (betad - taud) ** 2 + betadd * betadd)
            # ---- estimates of |A| and cond(A) ---------------------------------------------
            normA2 = normA2_o + beta * beta
            normA = xp.sqrt(normA2)
            normA2 = normA2 + alpha * alpha
            maxrbar = xp.maximum(maxrbar_o, rhobar_o)
            minrbar = minrbar_o if k == 1 else xp.minimum(minrbar_o, rhobar_o)
            condA = xp.maximum(maxrbar, rhotemp) / xp.minimum(minrbar, rhotemp)
            normar = xp.abs(zetabar)

            # ---- stopping rules -------------------------------------------------------------
            test1 = normr / safe_normb
            an_r = normA * normr
            test2 = xp.where(an_r != 0, normar / xp.where(an_r != 0, an_r, 1.0), inf)
            test3 = 1.0 / condA
            ax = normA * normx / safe_normb
            t1 = test1 / (1 + ax)
            rtol = btol + atol * ax
            stop = sc.zeros_int()
            # later rules win, as in the reference implementation
            for code, hit in ((7, itn + 1 >= maxiter), (6, 1 + test3 <= 1), (5, 1 + test2 <= 1),
                              (4, 1 + t1 <= 1), (3, test3 <= ctol), (2, test2 <= atol),
                              (1, test1 <= rtol)):
                stop = xp.where(hit, code, stop)

            finite = xp.isfinite(normr) & xp.isfinite(normx)
            commit = active & finite
            new = xp.stack([alpha, beta, zetabar, alphabar, rho, rhobar, cbar, sbar, betadd, betad,
                            rhodold, tautildeold, thetatilde, zeta, d, normA2, maxrbar, minrbar,
                            normA, condA, normx, normr, normar])
            if sc.all(commit):
                s = new
                for vec, value in ((x, x_new), (u, u_new), (v, v_new), (h, h_new),
                                   (hbar, hbar_new)):
                    vec.take(value)
            else:
                s = xp.where(commit, new, s)
                c2 = sc.mask(commit)
                for vec, value in ((x, x_new), (u, u_new), (v, v_new), (h, h_new),
                                   (hbar, hbar_new)):
                    vec.take(vx.where(c2, value, vec.cur))
            istop = xp.where(commit, stop,
                             xp.where(active & xp.logical_not(finite), BREAKDOWN, istop))
            itn = itn + active
            active = commit & (stop == 0)
    if pending is not None:  # the solve stopped: the product started ahead is not needed
        pending.wait()
    return LSMRResult(vx.to_tensor(x.cur), sc.tensor(istop), sc.tensor(itn), sc.tensor(s[_NORMR]),
                      sc.tensor(s[_NORMAR]), sc.tensor(s[_NORMA]), sc.tensor(s[_CONDA]),
                      sc.tensor(s[_NORMX]))
