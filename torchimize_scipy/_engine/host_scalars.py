r"""Per-problem scalars of the engine's iterations, kept on the host when on the CPU.

The trust-region methods do much of their per-iteration work on a handful of
numbers per problem: the radius, the Levenberg-Marquardt parameter and its
bracket in Moré's Newton iteration (J. J. Moré, "The Levenberg-Marquardt
algorithm: implementation and theory", Lecture Notes in Mathematics 630,
1978), the actual and predicted reductions, the ratio of the two, MINPACK's
acceptance test, radius and damping updates, and the termination tests. As
``(B,)`` tensors each of these steps is one torch operation, whose dispatch
(3.5-8.5 µs on the CPU) costs far more than the arithmetic; a numpy
operation on a few values costs a fraction of that, and one on a
``numpy.float64`` scalar a fraction again.

:class:`Scalars` decides where such values live and converts at the edges:

* tensors on the CPU: on the host, as numpy arrays (``tensor.numpy()`` is a
  view without a copy and ``torch.from_numpy`` a tensor without a copy), or as
  numpy scalars (``numpy.float64``, ``numpy.bool_``, ``numpy.int64``) for one
  float64 problem (``least_squares``, ``curve_fit``);
* other devices: as tensors beside the rest of the data (no host reads).

The arithmetic is written once, against the namespace :attr:`Scalars.xp`
(``numpy``, :class:`Floats` or ``torch``, whose functions used here share
names and semantics), so there is no second implementation of any method and
no path of its own for one problem. Module switch: :data:`HOST` (``False``
runs the device's tensor code on the CPU; the tests and
``benchmarks/bench_ops.py --device-path`` use it).

Two families of conversions serve the two kinds of callers:

* 'trf' and 'dogbox' (:mod:`.trust_region`, :mod:`.quadratic`,
  :mod:`.bounds`, :mod:`.steps.trf`, :mod:`.steps.dogbox`) use
  :meth:`Scalars.get`/:meth:`~Scalars.get_many`/:meth:`~Scalars.rows` and
  :meth:`~Scalars.tensor`/:meth:`~Scalars.tensor_rows`, plus row reductions
  (:meth:`~Scalars.norm`, :meth:`~Scalars.row_sum`) that run torch's own
  reduction on a view of the host data, since a norm or sum in numpy may
  round differently. Their square roots are numpy's (:meth:`Floats.sqrt`,
  ``numpy.sqrt``: correctly rounded), so their host path may differ from the
  all-torch path in the last bits: torch's vectorised float64 ``sqrt`` on
  this CPU is one unit in the last place off for about 1 % of inputs.
* 'lm' (:mod:`.steps.lm`, :mod:`.minpack_qr`, ``minpack_status`` of
  :mod:`.termination`) uses :meth:`Scalars.view` and :meth:`Scalars.tensors`
  on several tensors at once: a tensor of at most :data:`_SMALL` entries
  crosses to numpy through ``tolist`` (exact, and cheaper than
  ``Tensor.numpy()``, whose four dispatched operations cost more than the
  copy), a larger one is viewed without a copy. 'lm' takes a batch's square
  roots, norms and sums in torch, so that its host and tensor paths agree bit
  for bit; one float64 problem takes numpy's (``trust_region.host_norm``).

Both families remember a tensor's host value on the tensor (the engine never
writes into a tensor that carries one, as ``counts.py`` relies on too): a 0-d or ``(B,)``
tensor under ``_tsc_host_value`` (a ``(B,)`` array, or a numpy scalar for one
float64 problem), a tensor of two or more dimensions under
``_tsc_host_rows`` (an array of the tensor's shape). One tensor has one
representation whichever family reads it first. One float64 problem's loop
and 'lm' keep their per-problem values in the state as the numpy scalars
themselves (:meth:`Scalars.keep`; :meth:`Scalars.view` and :meth:`Scalars.get`
return them as they are, :func:`as_tensor` makes the ``(1,)`` tensor where one
is needed), so that an iteration makes no tensor per value; a ``(1,)`` tensor
of a flag or small integer that is made is shared (:func:`_scalar_tensor`).
:func:`remember_rows` lets the adapters of a numpy ``fun``/``jac`` hand over
their private copy as the host value of the tensor they return.

Powers are written as products (torch evaluates ``x**3`` as ``x * x * x``,
numpy's ``power`` calls ``pow``, which rounds differently). On the host,
division by zero and invalid operations give ``inf``/``nan`` without a
warning inside :meth:`Scalars.quiet`, as torch does.

``_engine/lsmr.py`` applies the same idea to LSMR's recurrences with its own
packed ``(K, B)`` scalars (``_Scalars``), a different design kept apart.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm

from .counts import count_many, count_true

#: Where per-problem scalars live when a caller does not say: None = on the host exactly
#: when the tensors are on the CPU; False runs the device's code on the CPU (the tests
#: use it to run, and count, what a GPU runs).
HOST: bool | None = None

#: torch's grain size (``at::internal::GRAIN_SIZE``): elementwise operations on tensors of
#: more entries run on torch's threads, numpy's always on one (:func:`for_rows`)
GRAIN = 32768


#: attribute of a 0-d or ``(B,)`` tensor: its host value (a ``(B,)`` array, or a numpy
#: scalar when :attr:`Scalars.floats`)
_HOST_VALUE = "_tsc_host_value"
#: attribute of a tensor of two or more dimensions: its host array (same shape)
_HOST_ROWS = "_tsc_host_rows"
#: attribute of a ``(B, k)`` tensor: the host's values of its rows' norms (:meth:`Scalars.norm`)
_NORM = "_tsc_host_norm"
#: tensors of at most this many entries reach numpy through ``tolist`` (:meth:`Scalars.view`):
#: one problem's rows of such a tensor are a C-ordered copy, whatever its strides
SMALL_ENTRIES = 64
_SMALL = SMALL_ENTRIES
_NUMPY = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
          torch.bool: np.bool_, torch.int64: np.int64, torch.int32: np.int32}


_ARRAY = np.ndarray
#: the reductions of ``ndarray.max``/``ndarray.all`` (called directly: the methods add a
#: Python layer of about half a microsecond)
_MAX_REDUCE = np.maximum.reduce
ALL_REDUCE = np.logical_and.reduce
#: :meth:`Scalars.amax` folds a batch's host rows column by column for at most this many
#: columns and at least :data:`_FOLD_ROWS` rows (one numpy call per column)
_FOLD_COLUMNS = 8
_FOLD_ROWS = 64

#: ``(1,)`` tensors of one problem's flags and of its small integers (codes, counters),
#: made once and shared by every run (the engine never writes into a tensor, as for
#: the host values it remembers): one problem's state changes them at every trial
_SHARED: dict[tuple[type, int], Tensor] = {}
_SHARED_INTS = (-128, 4096)


def _scalar_tensor(v: Any) -> Tensor:
    """A ``(1,)`` tensor of the scalar ``v`` remembering it (:data:`_HOST_VALUE`); shared
    for a boolean or a small integer."""
    kind = type(v)
    key = None
    if kind is np.bool_ or kind is bool:
        key = (bool, bool(v))
    elif (kind is np.int64 or kind is int) and _SHARED_INTS[0] <= v <= _SHARED_INTS[1]:
        key = (int, int(v))
    if key is not None:
        t = _SHARED.get(key)
        if t is not None:
            return t
    a = np.array([v])
    t = torch.from_numpy(a)
    # (a numpy scalar is remembered as it is: no new scalar from indexing the array)
    setattr(t, _HOST_VALUE, v if kind is np.float64 else a[0])
    if key is not None:
        _SHARED[key] = t
    return t


#: numpy scalar types one problem's state keeps as they are (:meth:`Scalars.keep`)
_NUMPY_SCALARS = frozenset({np.float64, np.bool_, np.int64})
#: types :meth:`Scalars.view` returns as they are
_HOST_TYPES = _NUMPY_SCALARS | {float, bool, int}


def as_tensor(v: Any) -> Any:
    """A host value (a numpy scalar kept by :meth:`Scalars.keep`, or a Python number) as
    a ``(1,)`` tensor remembering it; anything else (a tensor, a Jacobian operator) as
    it is."""
    return _scalar_tensor(v) if type(v) in _HOST_TYPES else v


def is_host_value(v: Any) -> bool:
    """Whether ``v`` is a host value kept as it is (:meth:`Scalars.keep`)."""
    return type(v) in _HOST_TYPES


def host_value(t: Tensor) -> Any:
    """The host value a 0-d or ``(B,)`` tensor remembers (:meth:`Scalars.tensor`,
    :meth:`Scalars.tensors`, :func:`as_tensor`: an array, or a numpy scalar of one
    float64 problem), or None."""
    return getattr(t, _HOST_VALUE, None)


def host_rows(t: Tensor) -> np.ndarray | None:
    """The host array a tensor of two or more dimensions remembers (:meth:`Scalars.rows`,
    :func:`remember_rows`), or None."""
    return getattr(t, _HOST_ROWS, None)


def host_array(t: Tensor) -> np.ndarray:
    """The host array of the CPU tensor ``t``: the one it remembers (:func:`host_rows`), or
    a view of its memory."""
    known = getattr(t, _HOST_ROWS, None)
    return t.detach().numpy() if known is None else known


def sum_of_squares(values: list[float]) -> float:
    """``sum(v**2)`` of one problem's few values (Python floats: IEEE double arithmetic,
    an overflow gives inf without a warning), the terms added in order from the first."""
    total = 0.0
    for v in values:
        total = total + v * v
    return total


def remember_rows(t: Tensor, a: np.ndarray) -> Tensor:
    """``t``, a CPU tensor of two or more dimensions made from (or equal to) the private
    array ``a`` of its shape and dtype, remembering ``a`` as its host value (so that
    :meth:`Scalars.view` and :meth:`Scalars.rows` convert nothing); the engine never
    writes into such a tensor."""
    setattr(t, _HOST_ROWS, a)
    return t


def tensor_of_host(a: np.ndarray) -> Tensor:
    """The CPU tensor of ``a``'s memory (made contiguous), as ``Namespace.from_user``
    makes it for an array already of the engine's dtype, remembering that memory as
    its host rows where it has two or more dimensions (:func:`remember_rows`)."""
    a = np.ascontiguousarray(a)
    t = torch.from_numpy(a)
    return remember_rows(t, a) if a.ndim >= 2 else t


def where_rows(mask: np.ndarray, new: Tensor, old: Tensor) -> Tensor | None:
    """``torch.where(mask, new, old)`` along the first axis (``mask`` a ``(B,)`` boolean
    array), taken by numpy from the host values ``new`` and ``old`` both remember
    (:func:`host_value`, :func:`host_rows`), as a tensor remembering its own; None where
    either remembers none, or they differ in dtype or shape, or hold more than
    :data:`GRAIN` entries (torch's threads, and a tensor ``loop.put`` may write in place).

    A selection: the same values as torch's, without a dispatched operation
    (about 6 µs for a tail's rows against under 2 µs; ``loop.on_rows`` merges
    about a dozen keys per round). The result is numpy's memory, which the
    engine never writes into (it remembers a host value).
    """
    if new.ndim != old.ndim or new.numel() > GRAIN:
        return None
    attr = _HOST_VALUE if new.ndim <= 1 else _HOST_ROWS
    a, b = getattr(new, attr, None), getattr(old, attr, None)
    if (type(a) is not _ARRAY or type(b) is not _ARRAY or a.dtype != b.dtype
            or a.shape != new.shape or b.shape != old.shape or a.shape != b.shape):
        return None
    out = np.where(mask.reshape(-1, *([1] * (a.ndim - 1))), a, b)
    t = torch.from_numpy(out)
    setattr(t, attr, out)
    return t


def _is_scalar(a: Any) -> bool:
    return type(a) is not _ARRAY


class Floats:
    """numpy's elementwise functions, taking a short cut for ``numpy.float64`` scalars.

    One float64 problem keeps its per-problem values as ``numpy.float64`` (or
    ``numpy.bool_``, ``numpy.int64``) scalars; they may meet rows of a ``(1, k)`` array (the
    singular values), for which numpy's functions are used. Results of scalar
    arguments are ``numpy.float64`` (division by zero gives ``inf``/``nan``
    under :func:`numpy.errstate`, not an exception), and ``maximum``/``minimum``
    propagate NaN as numpy's and torch's do.
    """

    inf = math.inf

    # (``type(v) is _ARRAY`` tests: about 280 calls per curve_fit, no tuple built per call)
    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        if type(cond) is _ARRAY or type(a) is _ARRAY or type(b) is _ARRAY:
            return np.where(cond, a, b)
        return a if cond else b

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        if type(a) is _ARRAY or type(b) is _ARRAY:
            return np.maximum(a, b)
        return a if (a >= b or a != a) else b

    @staticmethod
    def minimum(a: Any, b: Any) -> Any:
        if type(a) is _ARRAY or type(b) is _ARRAY:
            return np.minimum(a, b)
        return a if (a <= b or a != a) else b

    @staticmethod
    def sqrt(a: Any) -> Any:
        if _is_scalar(a):
            return np.float64(math.sqrt(a)) if a >= 0 else np.float64("nan")
        return np.sqrt(a)

    @staticmethod
    def copysign(a: Any, b: Any) -> Any:
        if _is_scalar(a) and _is_scalar(b):
            return np.float64(math.copysign(a, b))
        return np.copysign(a, b)

    # (functions only ever given the rows of arrays)
    sign = staticmethod(np.sign)
    zeros_like = staticmethod(np.zeros_like)
    nextafter = staticmethod(np.nextafter)

    @staticmethod
    def isfinite(a: Any) -> Any:
        if type(a) is not _ARRAY:
            return np.bool_(math.isfinite(a))
        return np.isfinite(a)


class Scalars:
    """Where the per-problem scalars of one batch live, and the conversions to tensors.

    Parameters
    ----------
    like : Tensor, shape (B, ...)
        A per-problem tensor of the batch: its batch size, dtype and device.
    host : bool, optional
        Keep the scalars on the host (default: :data:`HOST`, and when that is
        None, whenever ``like`` is on the CPU; never off the CPU). Both
        choices run the same code; ``host=False`` on the CPU exists for the
        tests.
    floats : bool, optional
        One float64 problem on the host keeps ``numpy.float64`` scalars
        (default, except inside :func:`batch_rows`: a batch's block or tail of
        one problem); False keeps arrays of one entry.

    Attributes
    ----------
    xp : module or class
        The elementwise namespace: ``numpy``, :class:`Floats` or ``torch``.
    host : bool
    floats : bool
        Per-problem values are scalars (one float64 problem on the host).

    Notes
    -----
    "Per-problem values" below are ``(B,)`` numpy arrays or tensors, or
    scalars when :attr:`floats`; "columns" are the same as ``(B, 1)`` (to
    broadcast against rows ``(B, k)``), scalars when :attr:`floats`. Rows of
    ``(B, k)`` values are arrays (``(1, k)`` when :attr:`floats`) or tensors.

    'trf' and 'dogbox' convert one tensor at a time (:meth:`get`,
    :meth:`tensor`, :meth:`rows`, :meth:`tensor_rows`); 'lm' converts several
    of any shape and dtype at once (:meth:`view`, :meth:`tensors`).
    """

    __slots__ = ("B", "dtype", "device", "host", "floats", "xp")

    def __init__(self, like: Tensor, host: bool | None = None,
                 floats: bool | None = None) -> None:
        self.B = like.shape[0]
        self.dtype = dtype = like.dtype
        self.device = like.device
        on_cpu = like.is_cpu
        if host is None:
            host = HOST
        self.host = on_cpu if host is None else bool(host) and on_cpu
        single = self.host and self.B == 1 and dtype == torch.float64
        if floats is None:  # (a batch's block or tail of one problem: its arrays, batch_rows)
            floats = not getattr(_BATCH, "rows", False)
        self.floats = bool(floats) and single
        self.xp: Any = Floats if self.floats else (np if self.host else torch)

    # ---------------------------------------------------------------- to the scalars
    def get(self, t: Tensor) -> Any:
        """Per-problem values of a ``(B,)`` tensor (or the ``(B, 1)`` of columns)."""
        if not self.host:
            return t
        if type(t) in _HOST_TYPES:  # (one problem's host value kept as it is, :meth:`keep`)
            return t
        known = getattr(t, _HOST_VALUE, None)
        if known is not None:  # made by :meth:`tensor` from these values
            return known
        if self.floats:
            v = t.item()
            return np.bool_(v) if isinstance(v, bool) else np.float64(v)
        return t.numpy()

    def get_many(self, *ts: Tensor) -> list[Any]:
        """:meth:`get` of several ``(B,)`` tensors of one dtype, with one conversion.

        Tensors made by :meth:`tensor` are not converted again.
        """
        if not self.host:
            return list(ts)
        # (one problem's host values kept as they are, :meth:`keep`)
        out: list[Any] = [t if type(t) in _HOST_TYPES else getattr(t, _HOST_VALUE, None)
                          for t in ts]
        todo = [k for k, v in enumerate(out) if v is None]
        if len(todo) < 2:
            return [self.get(t) if v is None else v for t, v in zip(ts, out, strict=True)]
        stacked = torch.stack([ts[k] for k in todo])
        if self.floats:
            kind = np.bool_ if stacked.dtype == torch.bool else np.float64
            values = [kind(v[0]) for v in stacked.tolist()]
        else:
            values = list(stacked.numpy())
        for k, v in zip(todo, values, strict=True):
            out[k] = v
        return out

    def scale_rows(self, t: Tensor, col: Any) -> Tensor:
        """``t (B, k)`` times columns ``col`` kept by this object."""
        if self.floats:  # (a float64 tensor times a Python float: the same products)
            return t * float(col) if self.dtype == torch.float64 else t * self.tensor_rows(col)
        return t * self.tensor_rows(col)

    def get_col(self, t: Tensor) -> Any:
        """Columns of a ``(B,)`` tensor."""
        if not self.host:
            return t.unsqueeze(-1)
        if self.floats:
            return self.get(t)
        return self.get(t)[:, None]

    def rows(self, t: Tensor) -> Any:
        """The ``(B, k)`` values of a tensor: a host view (a ``(1, k)`` copy if :attr:`floats`).

        The host's values are remembered on the tensor (the engine never
        modifies such a tensor in place), so a tensor that stays in the state is
        converted once.
        """
        if not self.host:
            return t
        known = getattr(t, _HOST_ROWS, None)
        if known is not None:
            return known
        # (one small problem: a copy, from two dispatches instead of four)
        if self.floats and 0 < t.numel() <= _SMALL:  # (tolist() of an empty one drops dims)
            a = np.array(t.tolist(), dtype=np.float64)
        else:
            a = t.numpy()
        setattr(t, _HOST_ROWS, a)
        return a

    def norm(self, t: Tensor, keepdim: bool = False) -> Any:
        """Euclidean norms of the rows of a ``(B, k)`` tensor (columns with ``keepdim``).

        On the host the norms (not columns; for :attr:`floats` the scalar, which
        is both) are remembered on the tensor: the current point's norm serves
        every trial from it, and a step's its trial. One float64 problem
        (:attr:`floats`) sums its squares on Python floats in order and takes
        ``math.sqrt`` (correctly rounded): no torch reduction dispatched and
        read back. Its last bits may differ from torch's, whose vectorised sum
        groups the terms otherwise; a batch keeps torch's, and a block of one
        problem in a batch is no :attr:`floats` problem (:func:`batch_rows`), so
        a batch's bits do not depend on its chunks.
        """
        if not self.host:
            return vnorm(t, dim=-1, keepdim=keepdim)
        memo = not keepdim or self.floats
        if memo:
            known = getattr(t, _NORM, None)
            if known is not None:
                return known
        if self.floats:
            rows = getattr(t, _HOST_ROWS, None)
            total = sum_of_squares(t.tolist()[0] if rows is None else rows[0].tolist())
            # (a sum of squares is not negative: inf and NaN pass through math.sqrt)
            value = np.float64(math.sqrt(total))
            setattr(t, _NORM, value)
            return value
        r = vnorm(t, dim=-1, keepdim=keepdim)
        value = r.numpy()
        if memo:
            setattr(t, _NORM, value)
        return value

    def row_norm(self, a: Any, keepdim: bool = False) -> Any:
        """:meth:`norm` of rows held as :meth:`rows` gives them.

        Batches use torch's reduction (whose rounding differs from numpy's); one
        problem sums its few squares in numpy (the same order as torch's for
        short rows).
        """
        if self.floats:
            return Floats.sqrt(np.add.reduce(a[0] * a[0]))
        return self.norm(torch.from_numpy(a) if self.host else a, keepdim)

    def row_sum(self, a: Any, keepdim: bool = False) -> Any:
        """Sums of rows held as :meth:`rows` gives them (as :meth:`row_norm`)."""
        if not self.host:
            return a.sum(-1, keepdim=keepdim)
        if self.floats:
            return np.add.reduce(a[0])
        return torch.from_numpy(a).sum(-1, keepdim=keepdim).numpy()

    def as_col(self, v: Any) -> Any:
        """Per-problem values as columns (to broadcast against rows)."""
        if self.floats:
            return v
        return v[:, None] if self.host else v.unsqueeze(-1)

    def min_rows(self, a: Any) -> Any:
        """Minimum of each row (exact: no rounding to differ)."""
        if self.floats:
            return a[0].min()
        return a.min(-1) if self.host else a.amin(-1)

    def max_rows(self, a: Any) -> Any:
        """Maximum of each row (exact: no rounding to differ); :meth:`amax`."""
        return self.amax(a)

    def all_rows(self, m: Any) -> Any:
        """Whether each row of a mask holds everywhere."""
        return m[0].all() if self.floats else m.all(-1)

    def any_rows(self, m: Any) -> Any:
        """Whether each row of a mask holds somewhere."""
        return m[0].any() if self.floats else m.any(-1)

    def as_long(self, a: Any) -> Any:
        """Rows as integers (``int64``)."""
        return a.astype(np.int64) if self.host else a.to(torch.long)

    def column(self, a: Any, j: int) -> Any:
        """Column ``j`` of rows ``(B, k)`` as columns."""
        return a[0, j] if self.floats else a[:, j, None]

    # ---------------------------------------------------------------- to tensors
    def tensor(self, a: Any) -> Tensor:
        """A ``(B,)`` tensor of per-problem values or of columns.

        On the host the tensor remembers the values it was made from, so that
        :meth:`get` of it costs nothing (the engine never modifies a tensor in
        place).
        """
        if not self.host:
            return a.reshape(self.B)
        if self.floats:
            return _scalar_tensor(a)
        a = np.ascontiguousarray(a).reshape(self.B)
        t = torch.from_numpy(a)
        setattr(t, _HOST_VALUE, a)
        return t

    def tensor_rows(self, a: Any) -> Tensor:
        """A ``(B, k)`` tensor of rows (``(B, 1)`` of columns), remembering them (:meth:`rows`)."""
        if not self.host:
            return a
        if self.floats and _is_scalar(a):
            a = np.array([[a]])
        a = np.ascontiguousarray(a)
        t = torch.from_numpy(a)
        setattr(t, _HOST_ROWS, a)
        return t

    # ---------------------------------------------------------------- decisions
    def count(self, mask: Any) -> int:
        """True entries of a per-problem mask (a host read only off the host)."""
        if not self.host:
            return count_true(mask)
        if self.floats:
            return int(bool(mask))
        return int(np.count_nonzero(mask))

    def count_many(self, *masks: Any) -> list[int]:
        """:meth:`count` of several per-problem masks (off the host: one read for all)."""
        if not self.host:
            return count_many(*masks)
        if self.floats:
            return [int(bool(m)) for m in masks]
        return [int(np.count_nonzero(m)) for m in masks]

    def indices(self, mask: Any) -> Tensor:
        """The row indices where a per-problem mask holds, as a ``long`` tensor."""
        if not self.host:
            return mask.nonzero().squeeze(-1)
        return torch.from_numpy(np.flatnonzero(mask))

    def full(self, value: float) -> Any:
        """Per-problem values all equal to ``value``."""
        if not self.host:
            return torch.full((self.B,), value, dtype=self.dtype, device=self.device)
        if self.floats:
            return np.float64(value)
        # (numpy's dtype from a table: no tensor made to learn it)
        kind = _NUMPY.get(self.dtype)
        if kind is None:
            kind = torch.empty((), dtype=self.dtype).numpy().dtype
        return np.full(self.B, value, dtype=kind)

    def quiet(self) -> contextlib.AbstractContextManager:
        """Silence numpy's floating-point warnings (torch has none): the callers guard
        their divisions themselves, and infinities or NaNs of a failed problem are
        expected."""
        return quiet() if self.host else contextlib.nullcontext()

    # ---------------------------------------------------------------- several at once ('lm')
    def view(self, *ts: Tensor) -> tuple[Any, ...]:
        """The tensors as values of :attr:`xp` (on the host: values never written to).

        A tensor made by :meth:`tensors` (or :meth:`tensor`, :meth:`tensor_rows`)
        or read before carries its host value and costs nothing; another one of
        at most :data:`_SMALL` entries is copied through ``tolist`` (exact), a
        larger one is viewed without a copy. When :attr:`floats`, a ``(1,)``
        tensor becomes a numpy scalar of its dtype; other shapes stay arrays.
        """
        if not self.host:
            return ts
        # (one pass: the tensors that remember their values, and one problem's host values
        # kept in the state as they are (:meth:`keep`), cost a lookup each)
        out = []
        for t in ts:
            if type(t) in _HOST_TYPES:
                out.append(t)
                continue
            attr = _HOST_VALUE if t.ndim <= 1 else _HOST_ROWS
            value = getattr(t, attr, None)
            if value is None:
                size = t.numel()
                if size > _SMALL or size == 0:  # (tolist() of an empty one drops dims)
                    value = t.numpy()
                elif self.floats and size == 1 and t.ndim == 1:  # a (1,) column
                    value = _NUMPY[t.dtype](t.tolist()[0])
                else:
                    value = np.array(t.tolist(), dtype=_NUMPY[t.dtype])
                setattr(t, attr, value)
            out.append(value)
        return tuple(out)

    def tensors(self, *values: Any) -> tuple[Tensor, ...]:
        """Values of :attr:`xp` as tensors, each remembering its value for :meth:`view`.

        On the host: the same memory for an array, a ``(1,)`` tensor for a
        scalar (numpy's, or a Python number chosen by ``where``); off the host
        the values are already tensors.
        """
        if not self.host:
            return values
        out = []
        for v in values:
            if isinstance(v, Tensor):  # (already a tensor: a value kept as one)
                t = v
            elif type(v) is not _ARRAY:  # a scalar: a (1,) tensor, remembered as it is
                t = _scalar_tensor(v)
            elif v.ndim:
                t = torch.from_numpy(v)
                setattr(t, _HOST_VALUE if v.ndim <= 1 else _HOST_ROWS, v)
            else:  # a 0-d array: as its numpy scalar
                t = _scalar_tensor(v[()])
            out.append(t)
        return tuple(out)

    def keep(self, *values: Any) -> tuple[Any, ...]:
        """Values of :attr:`xp` in the form the state keeps them.

        One float64 problem on the host (:attr:`floats`) keeps its per-problem
        values in the state as numpy scalars (``numpy.float64``, ``numpy.bool_``,
        ``numpy.int64``; a Python number chosen by ``where`` becomes one), so
        that its iteration makes no ``(1,)`` tensor per value and reads none
        back (:meth:`view` returns them as they are); :func:`as_tensor` turns
        them into tensors where a tensor is needed (results, compaction,
        another batch's rows, callbacks). Rows (arrays) and everything else
        are :meth:`tensors`.
        """
        if not self.floats:
            return self.tensors(*values)
        out = []
        for v in values:
            kind = type(v)
            if kind in _NUMPY_SCALARS:
                out.append(v)
            elif kind is float:
                out.append(np.float64(v))
            elif kind is bool:
                out.append(np.bool_(v))
            elif kind is int:
                out.append(np.int64(v))
            else:
                out.append(self.tensors(v)[0])
        return tuple(out)

    def renewed(self, old: Tensor, value: Any) -> Tensor:
        """:meth:`tensors` of one value, or ``old`` itself when ``value`` is the very
        object ``old`` remembers (on the host: a value that a ``where`` kept unchanged
        needs no new tensor)."""
        if self.host and (old is value or getattr(old, _HOST_VALUE, None) is value):
            return old
        return self.keep(value)[0]

    def amax(self, a: Any) -> Any:
        """Maximum along the last axis (exact, whatever the order): per-problem values.

        A batch's host rows ``(B, k)`` with a few columns are folded column by
        column: numpy's ``amax`` along a short last axis steps through each row on
        its own (8,192 rows of 4: 366 µs, against 18 µs for ``numpy.maximum`` of the
        columns in turn; issue 14). The same values: a maximum is exact, ``amax``
        folds each row from its first entry in the same way, and NaN propagates
        through both.
        """
        if not self.host:
            return torch.amax(a, dim=-1)
        if self.floats:  # one problem: the reduction ``a.max()`` runs, without its layer
            return _MAX_REDUCE(a, axis=None)
        if a.ndim != 2 or not 2 <= a.shape[-1] <= _FOLD_COLUMNS or a.shape[0] < _FOLD_ROWS:
            return np.amax(a, axis=-1)
        out = np.maximum(a[:, 0], a[:, 1])
        for k in range(2, a.shape[-1]):
            np.maximum(out, a[:, k], out=out)
        return out


try:  # numpy's floating-point error state (numpy >= 2: a context variable)
    from numpy._core._ufunc_config import _extobj_contextvar as _ERRSTATE
    from numpy._core._ufunc_config import _make_extobj
except ImportError:  # pragma: no cover - another numpy: numpy.errstate itself
    _ERRSTATE = None

#: the quiet error state derived from each error state entered from (at most a few:
#: the default and what callers set with ``numpy.errstate``/``seterr``), kept with it
_QUIET_OF: dict[Any, Any] = {}


class _Quiet:
    """``numpy.errstate(all="ignore")``, its error state made once per state it is
    entered from: numpy's ``errstate`` builds a new one at every entry (3-5 µs; one
    'lm' problem enters one per stage, about 40 per ``curve_fit``). The same state
    (every floating-point error ignored, the caller's ``errcall`` kept), set and
    reset on numpy's own context variable, so nesting and threads behave as there."""

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        current = _ERRSTATE.get()
        state = _QUIET_OF.get(current)
        if state is None:
            state = _make_extobj(all="ignore")  # (derived from ``current``, now set)
            if len(_QUIET_OF) < 16:  # (the key is kept alive with it: no reused id)
                _QUIET_OF[current] = state
        self._token = _ERRSTATE.set(state)

    def __exit__(self, *exc: Any) -> None:
        _ERRSTATE.reset(self._token)


def _quiet_works() -> bool:
    """Whether :class:`_Quiet` sets the state ``numpy.errstate(all="ignore")`` sets and
    restores the caller's (checked once at import: numpy's private names may change)."""
    if _ERRSTATE is None:
        return False
    try:
        before = np.geterr()
        with _Quiet():
            inside = np.geterr()
        return inside == {k: "ignore" for k in before} and np.geterr() == before
    except Exception:  # pragma: no cover - another numpy
        return False


if not _quiet_works():  # pragma: no cover - another numpy: numpy.errstate itself
    _ERRSTATE = None


def quiet() -> contextlib.AbstractContextManager:
    """A context in which numpy ignores every floating-point error (as
    ``numpy.errstate(all="ignore")``, at a fraction of its cost; :class:`_Quiet`)."""
    return _Quiet() if _ERRSTATE is not None else np.errstate(all="ignore")


def for_rows(x: Tensor) -> Scalars:
    """Where the per-problem values of the batch of rows ``x (B, n)`` live.

    On the host (CPU) as :class:`Scalars` decides, except for a batch
    (``B > 1``) whose rows hold more than :data:`GRAIN` entries: there torch
    spreads each ``(B, n)`` operation over its threads and the tensor code is
    the faster (a few per cent for 'trf' at ``B = 10,000``, ``n = 4``;
    benchmarks/RESULTS.md §21). One problem
    keeps the host whatever its size. Both choices run the same code and give
    the same values ('lm' bit for bit; 'trf'/'dogbox' up to the square roots,
    see the module docstring).
    """
    B = x.shape[0]
    return scalars(x, host=False if B > 1 and x.numel() > GRAIN else None, B=B)


def scalars(like: Tensor, host: bool | None = None, B: int | None = None) -> Scalars:
    """``Scalars(like, host)``: on the CPU one shared object per batch size, dtype,
    ``host`` and :data:`HOST` (the only things it depends on there; a
    :class:`Scalars` is never changed), made once. ``B``: ``like.shape[0]`` where the
    caller has it (one read of the shape fewer, :func:`for_rows`)."""
    if not like.is_cpu:
        return Scalars(like, host)
    if B is None:
        B = like.shape[0]
    batch = getattr(_BATCH, "rows", False)
    if B == 1 and not batch:  # one problem (over 150 calls per curve_fit): by dtype and host
        one = _ONE_ROW.get((like.dtype, host))
        if one is not None and one[0] is HOST:
            return one[1]
    key = (B, like.dtype, host, HOST, batch)
    sc = _FOR_ROWS.get(key)
    if sc is None:
        if len(_FOR_ROWS) >= 256:  # (streamed batches shrink through many sizes)
            _FOR_ROWS.clear()
        sc = _FOR_ROWS[key] = Scalars(like, host)
    if B == 1 and not batch:
        _ONE_ROW[(like.dtype, host)] = (HOST, sc)
    return sc


#: per thread: whether the engine's loop runs a batch's rows (:func:`batch_rows`)
_BATCH = threading.local()


@contextlib.contextmanager
def batch_rows(on: bool = True) -> Iterator[None]:
    """Within the block, this thread's engine runs problems of a batch
    (``batch_least_squares``; ``on`` False: one problem, as outside any block, also
    inside a batch's user function): a state of one row (a block of one problem, or the
    last problem still running) keeps the batch's arrays of one entry (:class:`Scalars`
    with ``floats`` False) instead of one problem's host scalars. One float64 problem
    (``least_squares``, ``curve_fit``) takes numpy's norms and sums where a batch takes
    torch's ('lm'); a batch's problem must give the same bits whichever problems run
    beside it (``docs/parity.md``), also when it runs alone."""
    previous = getattr(_BATCH, "rows", False)
    _BATCH.rows = on
    try:
        yield
    finally:
        _BATCH.rows = previous


#: :func:`scalars`' objects for CPU tensors
_FOR_ROWS: dict[tuple, Scalars] = {}
#: :func:`scalars`' object of one CPU problem by dtype and ``host``, with the :data:`HOST`
#: it was made under (a change of the switch makes a new one)
_ONE_ROW: dict[tuple, tuple[Any, Scalars]] = {}
