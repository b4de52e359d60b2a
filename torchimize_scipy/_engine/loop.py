"""The one batched iteration loop shared by every method.

Each problem of the batch runs the classic two-level trust-region scheme of
scipy's solvers (Moré 1978; Branch, Coleman & Li 1999; Voglis & Lagaris 2004):

* an *outer* iteration starts at a point with a fresh Jacobian: the step rule
  measures first-order optimality (``gtol`` test) and factorises the model;
* *trials* follow: the rule proposes a step, the residuals are evaluated there
  (one ``nfev``), and the rule judges the trial, updating its radius/damping and
  applying the ``ftol``/``xtol`` tests. An accepted trial moves the point, the
  Jacobian is evaluated (one ``njev``) and a new outer iteration begins.

Here the two levels are flattened into one loop over trials so that problems at
different stages advance together. Per-problem state is a ``dict`` of
batch-first tensors; the loop's own codes, counters and masks are computed as values
of :class:`~.host_scalars.Scalars` (numpy on the host for CPU tensors, tensors
elsewhere; one code body) and stored back as tensors, except for one float64
problem on the host, whose per-problem values the state keeps as numpy scalars
(:meth:`~.host_scalars.Scalars.keep`: no ``(1,)`` tensor made or read back per
value); they become tensors only where tensors are needed (:func:`_write_out`,
:func:`compact`, :func:`concat`, :func:`put` into a larger batch, and
:func:`tensor_state` for ``on_iteration`` and ``callback``). A problem whose
``status`` is set is *finished*: its results are written out and its rows are
dropped from the working state (compaction), so it costs no further
evaluations (the keys that the rule's trial does not read and that an accepted
trial replaces, such as 'lm''s ``J`` on the Gram route, are compacted only if
some row rejects its trial: :data:`DEFERRABLE_KEYS`). The write-out selects the
rows of a value only for a result the caller keeps (no rows of ``J`` without
``return_jac``), and rows are selected
by :func:`gather_rows` (``index_select``, keeping a tensor's layout:
:func:`row_layout`; numpy's ``take`` for a large CPU tensor laid out in no
order of its dimensions), into
the caller's result buffers; one problem's output (``least_squares``,
:func:`one_problem_slots`) takes the result tensors themselves instead (the
state's own, which the engine never writes, or tensors of its host values:
no buffers allocated and copied into, no reads back). The
residual and Jacobian callables only ever see the rows of running problems,
together with their problem indices. A stream of problems can be fed in
(``refill``): whenever at most half of ``capacity`` rows are running, the next
problems are admitted (:func:`admit`) and appended (:func:`concat`), so slow
problems run beside new ones instead of holding back a whole block.

A step rule (:class:`~.steps.base.StepRule`, one per method in ``steps/``)
supplies the stages: ``init_state``, ``measure_optimality``, ``build_model``,
``propose_step``, ``assess_trial``, ``after_jacobian`` and ``result_fields``.
Every stop test and the order in which they apply are in :mod:`.termination`.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._blas_threads import is_small, serial_blas
from . import termination as term
from .counts import (
    count_true,
    forget_evaluated,
    known_unit,
    mark_finite,
    mark_unit,
    remember_evaluated,
)
from .host_scalars import (
    _HOST_ROWS,
    ALL_REDUCE,
    Scalars,
    as_tensor,
    for_rows,
    host_rows,
    host_value,
    is_host_value,
    remember_rows,
    scalars,
    where_rows,
)
from .problem import Problem
from .steps.base import LOOP_KEYS, StepRule

State = dict[str, Tensor]

#: MINPACK's error (scipy's wording) for residuals whose length changed between calls
#: (rules with ``fixed_residual_count``)
RESIDUALS_CHANGED_SIZE = "The array returned by a function changed size between calls"

#: Keys written to the output for every problem.
RESULT_KEYS = ("x", "cost", "f_true", "J", "g", "optimality", "active_mask", "nfev", "njev",
               "nit", "status")

#: A batch's tail runs single-threaded in the calling thread (MKL's thread-local count
#: and the thread's OpenMP count at 1, :func:`~torchimize_scipy._blas_threads.serial_blas`)
#: once no problem is left to admit, each problem's Jacobian holds at most torch's grain
#: size of entries and the running rows' Jacobians at most this many in all (8 x the grain
#: size: 218 rows of 100 x 12; one larger problem keeps its threads). Below it every operation
#: of an iteration but the SVDs is too small for a parallel region to pay for its wake-up: on
#: 2 cores (one busy) the products ``J^T J``, ``J^T f`` and an ``index_copy`` of 100 rows
#: 100 x 12 took 0.51 ms single-threaded against 7.8 ms (median) with the team, of 50 rows
#: 0.26 ms both ways but 4-6x the CPU time with the team. The factorisations are
#: single-threaded at every size anyway (``linalg.serial_lapack``), and a round's SVDs are
#: shared with the helper threads (``linalg.thin_svd``), which no OpenMP worker spinning
#: after a region competes with: with 4 x the grain size the tail of ``bench_tail.py``
#: (B = 20,000, 'trf') spent 949 rounds at 100-200 rows on both cores' OpenMP team, 23-25 s
#: wall and 43-45 s CPU in all; with 8 x and the shared SVDs, 20 s and 29 s (16 x and more
#: gained nothing further; 'lm' unchanged within the noise). The results are unchanged by the
#: switch (the same kernels, one thread; costs identical on that batch, 'trf' and 'lm').
TAIL_ENTRIES = 8 * 32768


#: Entries from which :func:`gather_rows` copies the rows of a CPU tensor that is not
#: contiguous with numpy (torch's grain size, as :data:`IN_PLACE_MIN`).
NUMPY_ROWS_MIN = 32768

#: dtypes whose tensors numpy can view (``Tensor.numpy``)
_NUMPY_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.int64,
                           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                           torch.complex64, torch.complex128})


def row_layout(t: Any) -> tuple[int, ...] | None:
    """The order of ``t``'s dimensions (the batch's first) in which a strided tensor that
    is not contiguous is laid out contiguously, or None (contiguous, not a strided
    tensor, or no such order): e.g. ``(0, 2, 1)`` for a ``(B, m, n)`` Jacobian of
    finite differences, whose rows are stored transposed.

    The loop's moves of rows (:func:`gather_rows`, :func:`put`, :func:`concat`) keep that
    layout. torch's ``index_select``, ``index_copy`` and ``cat`` would return row-major
    tensors, and a row's products (``bmm``, numpy's ``matmul``) sum in an order that
    depends on the layout: a problem whose rows were moved (its neighbours finished,
    or joined) would round differently from one whose rows were not, and a batch cut
    into other chunks would give other bits.
    """
    if not isinstance(t, Tensor) or t.ndim < 3 or t.layout != torch.strided \
            or t.is_contiguous():
        return None
    order = (0, *sorted(range(1, t.ndim), key=t.stride, reverse=True))
    return order if t.stride(0) >= max(t.stride()) and t.permute(order).is_contiguous() \
        else None


def _empty_in_layout(like: Tensor, rows: int, order: tuple[int, ...]) -> Tensor:
    """An empty tensor of ``rows`` rows shaped as ``like``'s, laid out contiguously in the
    order ``order`` of its dimensions (:func:`row_layout`), and no view: ``put`` may
    then write it in place (:func:`_private`), as any tensor the loop makes."""
    shape = (rows, *like.shape[1:])
    strides = [0] * len(shape)
    step = 1
    for d in reversed(order):
        strides[d] = step
        step *= shape[d]
    return torch.empty_strided(shape, strides, dtype=like.dtype, device=like.device)


def gather_rows(t: Tensor, rows: Tensor) -> Tensor:
    """``t.index_select(0, rows)``: the same values, in a new tensor of ``t``'s layout
    (:func:`row_layout`; contiguous where ``t`` is laid out in no order).

    A tensor laid out in an order of its dimensions (a ``(B, n, n)`` batch of
    inverses in LAPACK's column-major layout, 'lm''s and 'trf''s ``fac_Hinv``
    on the Gram route; a Jacobian of finite differences) has the rows of its
    contiguous permutation selected by ``index_select`` (as fast as numpy
    there: a 'lm' Jacobian of 64 x 4, 4.0-6.2 ms both ways at 5,500-8,200
    rows). The rows of a large CPU tensor laid out in no such order are
    copied by numpy's ``take`` into a contiguous tensor of torch's:
    ``index_select`` walks their strides element by element (at 8,192 rows
    of 4 x 4, 0.5 ms against 1.0 ms). A copy: the same bits either way. A
    sparse or operator Jacobian (``tr_solver='lsmr'``) selects its own rows.
    """
    order = row_layout(t)
    if order is not None:  # (the rows of the contiguous permutation, in t's layout)
        out = _empty_in_layout(t, rows.shape[0], order)
        torch.index_select(t.permute(order), 0, rows, out=out.permute(order))
        return out
    if (not isinstance(t, Tensor) or t.numel() < NUMPY_ROWS_MIN or t.is_contiguous()
            or t.device.type != "cpu"
            or rows.device.type != "cpu" or t.layout != torch.strided
            or t.dtype not in _NUMPY_DTYPES or t.requires_grad or t.is_conj() or t.is_neg()):
        return t.index_select(0, rows)
    out = torch.empty((rows.shape[0], *t.shape[1:]), dtype=t.dtype)
    # (mode 'clip' on valid indices: the same rows, written straight into ``out``; numpy
    # buffers an ``out`` under the default mode 'raise')
    np.take(t.numpy(), rows.numpy(), axis=0, out=out.numpy(), mode="clip")
    return out


class RowView(dict):
    """Rows of the state, selected lazily; remembers which keys were written.

    Reading a key selects its rows on first access; :func:`put` writes back
    only the keys that were assigned, so untouched tensors are never copied.
    """

    def __init__(self, state: State, rows: Tensor | None) -> None:
        super().__init__()
        self.state = state
        self.rows = rows
        self.written: set[str] = set()

    def __missing__(self, key: str) -> Tensor:
        value = self.state[key]
        if self.rows is not None:
            value = _keep_unit(value, gather_rows(value, self.rows))
        dict.__setitem__(self, key, value)
        return value

    def __setitem__(self, key: str, value: Tensor) -> None:
        self.written.add(key)
        dict.__setitem__(self, key, value)

    def __contains__(self, key: object) -> bool:
        return key in self.state or dict.__contains__(self, key)

    def get(self, key: str, default=None):
        return self[key] if key in self else default


def take(state: State, rows: Tensor | None) -> RowView:
    """A lazy view of rows ``rows`` of ``state`` (all rows when None)."""
    return RowView(state, rows)


def put(state: State, rows: Tensor | None, sub: RowView) -> None:
    """Write the keys assigned in ``sub`` back into ``state`` at ``rows``.

    Keys assigned the same tensor get the same merged tensor (one scatter).
    The rows are written in place into a tensor of at least
    :data:`IN_PLACE_MIN` entries that nothing but ``state`` can observe
    (:func:`_private`): a large batch's ``(B, m, n)`` Jacobian is then not
    copied whole for every accepted subset. Any other tensor (one
    also held elsewhere, a view, memory shared with numpy or the caller, a
    tensor of an autograd graph) is merged out of place, so no caller's
    array and no reference kept by a step rule ever changes.
    """
    done: dict[tuple[int, int], Tensor] = {}
    for k in sub.written:
        v = dict.__getitem__(sub, k)
        if rows is not None:
            # (one row's host value, Scalars.keep: the rows of a larger batch are tensors)
            v = as_tensor(v)
        if rows is None:
            state[k] = v
        elif k in state:
            key = (id(v), id(state[k]))
            merged = done.get(key)
            if merged is None:
                old = state[k]
                # (an operator Jacobian, tr_solver='lsmr', merges its rows out of place)
                if isinstance(old, Tensor) and old.numel() >= IN_PLACE_MIN \
                        and _private(state, sub, k, v, old):
                    merged = done[key] = old.index_copy_(0, rows, v)
                elif (order := row_layout(old)) is not None:  # (old's layout kept)
                    merged = _empty_in_layout(old, old.shape[0], order)
                    merged.copy_(old)
                    merged.permute(order).index_copy_(0, rows, v.permute(order))
                    done[key] = merged = _owned(merged)
                else:
                    merged = done[key] = _owned(old.index_copy(0, rows, v))
                del old
            state[k] = merged
        else:
            raise KeyError(f"new state key {k!r} must be created in init_state()")


#: Entries below which :func:`put` merges out of place: copying a smaller tensor costs
#: about what :func:`_private`'s checks cost (torch's grain size, as host_scalars.GRAIN).
IN_PLACE_MIN = 32768


def _private(state: State, sub: RowView, key: str, value: Tensor, old: Tensor) -> bool:
    """Whether ``put`` may write ``value`` into ``old = state[key]`` in place.

    True only when no one but ``state`` can see the change:

    * ``old`` is referenced by ``state`` alone (its Python reference count)
      and every key of ``state`` holding it is assigned ``value`` by ``sub``
      (``f`` and ``f_true`` share one tensor for the linear loss);
    * it carries no remembered value (the attributes by which
      :mod:`.counts` and :mod:`.host_scalars` keep a tensor's count of true
      entries, finiteness or host copy on the tensor, valid only as long as
      the tensor is not written to), except a host view of its own memory
      that nothing else references (:func:`_own_host_view`: the rows of a
      batch's ``J`` and ``J^T J`` that 'trf' reads on the host; writing the
      tensor writes the view, which stays its host value);
    * its memory belongs to torch's allocator: a resizable storage (not a
      numpy array's, nor a DLPack import), or one that an earlier ``put``
      or :func:`compact` made (marked :data:`_OWNED`; exporting it to numpy
      made it non-resizable), and no other tensor views it (the storage's use count,
      where torch reports it; the host view's alias counts as one);
    * neither tensor takes part in autograd, and ``old`` is no inference
      tensor.
    """
    if old.requires_grad or value.requires_grad or old.is_inference() or old.is_sparse:
        return False
    views = 0
    marks = old.__dict__
    if marks:
        if not set(marks) <= {_OWNED, _HOST_ROWS}:
            return False
        if _HOST_ROWS in marks:
            if not _own_host_view(old):
                return False
            views = 1
    holders = [k for k, t in state.items() if t is old]
    if any(k not in sub.written or dict.__getitem__(sub, k) is not value for k in holders):
        return False
    # references: the dict entries, ``old`` in put and here, and getrefcount's argument
    if sys.getrefcount(old) != len(holders) + 3:
        return False
    storage = old.untyped_storage()
    if not (storage.resizable() or _OWNED in marks):
        return False
    # one tensor on the storage (+ ``storage`` itself, + a host view's alias); unknown:
    # not private
    return (_STORAGE_USE_COUNT is not None
            and _STORAGE_USE_COUNT(storage._cdata) == 2 + views)


#: attribute of a tensor that :func:`put` merged out of place or :func:`compact` gathered:
#: its memory is torch's own (a later ``put`` may write it in place, see :func:`_private`)
_OWNED = "_tsc_put_owned"


def _owned(new: Tensor) -> Tensor:
    """``new``, a tensor just made by a torch operation, marked :data:`_OWNED` when
    large enough for :func:`put` to write in place (an operator Jacobian, as
    ``tr_solver='lsmr'`` compacts, is left as it is)."""
    if (isinstance(new, Tensor) and new.layout == torch.strided and not new.requires_grad
            and new.numel() >= IN_PLACE_MIN):
        setattr(new, _OWNED, True)
    return new


def _own_host_view(old: Tensor) -> bool:
    """Whether ``old``'s host rows (:meth:`~.host_scalars.Scalars.rows` of a batch) are a
    numpy view of its own memory (``Tensor.numpy()``, not a copy) that no one else
    holds, through an alias tensor that only that view holds."""
    a = old.__dict__[_HOST_ROWS]
    base = getattr(a, "base", None)
    # references of the view: the attribute, ``a`` here and getrefcount's argument; of
    # its base: the view, ``base`` here and getrefcount's argument
    return (isinstance(a, np.ndarray) and isinstance(base, Tensor)
            and a.shape == tuple(old.shape)
            and a.__array_interface__["data"][0] == old.data_ptr()
            and a.strides == tuple(s * old.element_size() for s in old.stride())
            and base.data_ptr() == old.data_ptr()
            and sys.getrefcount(a) == 3 and sys.getrefcount(base) == 3)


#: torch's count of the references to a storage (tensors and Storage objects), if exposed.
_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def on_rows(state: State, mask: Tensor | None, fn: Callable[[RowView], None],
            count: int | None = None, others_free: bool = False) -> None:
    """Run ``fn`` on the rows of ``state`` selected by ``mask`` and keep what it assigns.

    When most rows are selected, ``fn`` runs on all of them and only the
    selected rows of each assigned tensor are kept (``torch.where``; numpy's where
    on the host values both tensors remember, :func:`~.host_scalars.where_rows`),
    which avoids gathering and scattering the large per-problem tensors; otherwise
    the selected rows are gathered, processed and scattered back. ``count``
    is :func:`count_true` of ``mask`` when the caller knows it; ``mask=None``
    selects every row. ``others_free``: the caller lets the rows outside
    ``mask`` take what ``fn`` assigns them (no one reads those values, see
    :attr:`~.steps.base.StepRule.model_on_stopped_rows`): when most rows are
    selected, ``fn`` then runs on ``state`` itself, without the ``torch.where``.
    """
    if mask is None:
        fn(state)
        return
    if not isinstance(mask, Tensor):  # one problem's host value (Scalars.keep)
        total = 1
        if count is None:
            count = int(bool(mask))
        if not count:
            return
    else:
        total = mask.shape[0]
        if count is None:
            count = count_true(mask)
    if count == total or (others_free and count * 2 >= total):
        fn(state)  # (every row, or every row allowed: what ``fn`` assigns is kept as it is)
        return
    if count * 2 >= total:
        view = RowView(state, None)
        fn(view)
        keeps: dict[int, Tensor] = {}  # the mask shaped for each rank, made once
        # (on the host, keys whose old and new values both remember their host values
        # merge in numpy: the same selection, host_scalars.where_rows)
        on_host = host_value(mask)
        if type(on_host) is not np.ndarray:
            on_host = None
        for k in view.written:
            new = dict.__getitem__(view, k)
            old = state[k]
            if new is old:  # (the same tensor: every row is kept either way)
                continue
            merged = None if on_host is None else where_rows(on_host, new, old)
            if merged is None:
                keep = keeps.get(new.ndim)
                if keep is None:
                    keep = keeps[new.ndim] = mask.view(-1, *([1] * (new.ndim - 1)))
                merged = torch.where(keep, new, old)
            state[k] = merged
        return
    rows = _indices(mask)
    view = RowView(state, rows)
    fn(view)
    put(state, rows, view)


def compact(state: State, keep: Tensor, defer: Collection[str] = ()) -> Deferred | None:
    """Drop the rows of finished problems from every tensor of ``state``.

    Keys holding the same tensor (``f`` and ``f_true`` for the linear loss)
    stay shared: each tensor is gathered once. The keys in ``defer`` keep
    their old rows for now: the returned :data:`Deferred` (None if ``defer``
    names no key) gathers them later (:func:`gather_deferred`), unless the
    round's trial replaces them whole first (see :data:`DEFERRABLE_KEYS`).
    """
    done: dict[int, Tensor] = {}
    later = tuple(k for k in state if k in defer)  # (in the state's order)
    for k, v in state.items():
        if k in later:
            continue
        new = done.get(id(v))
        if new is None:
            # (one problem's host value, Scalars.keep: a (1,) tensor first)
            new = done[id(v)] = _keep_unit(v, _owned(gather_rows(as_tensor(v), keep)))
        state[k] = new
    return (keep, later) if later else None


#: Rows still to gather (the ``keep`` of :func:`compact`) and the keys that keep their
#: old rows until then.
Deferred = tuple[Tensor, tuple[str, ...]]

#: Keys whose compaction the loop may put off until the trial that follows it (given a
#: rule whose trial does not read them, :meth:`~.steps.base.StepRule.trial_unread`): an
#: accepted trial on every row, the usual round of a large batch, replaces each of them
#: whole before anything reads them, so their kept rows need never be copied ('lm' at
#: B = 20,000: the ``J`` of 64 x 4 per row is most of what a compaction copies).
DEFERRABLE_KEYS = frozenset({"f_true", "f", "J", "g", "G"})


def gather_deferred(state: State, deferred: Deferred | None) -> None:
    """Compact the keys that :func:`compact` put off (the same rows, the same values)."""
    if deferred is None:
        return
    keep, keys = deferred
    done: dict[int, Tensor] = {}
    for k in keys:
        v = state[k]
        new = done.get(id(v))
        if new is None:
            new = done[id(v)] = _keep_unit(v, _owned(gather_rows(as_tensor(v), keep)))
        state[k] = new


def _keep_unit(old: Tensor, new: Tensor) -> Tensor:
    """``new`` (rows of ``old``) marked as a scaling of ones where ``old`` is one.

    An ``x_scale`` of ones is marked once (:func:`admit`,
    :func:`~.counts.mark_unit`) so that the step rules skip their products by
    it; rows gathered or appended by :func:`compact` and :func:`concat` are
    ones too, and would otherwise lose the mark for the rest of the run
    (products by 1 are exact: the values are the same either way; issue 14,
    the tail of a batch runs through many compactions).
    """
    return mark_unit(new) if known_unit(old) else new


def tensor_state(state: State) -> State:
    """``state`` with one problem's host values (:meth:`~.host_scalars.Scalars.keep`) as
    ``(1,)`` tensors: what callers outside the engine (``on_iteration``, ``callback``)
    see. The state itself when it holds tensors only."""
    if not any(is_host_value(v) for v in state.values()):
        return state
    return {k: as_tensor(v) for k, v in state.items()}


def finite_rows(a: Tensor) -> tuple[Tensor, bool]:
    """``(B,)`` mask: every entry of each row of ``a`` is finite; and whether all rows are.

    One sum decides in the usual case: it is finite only when every entry
    is (an infinite or NaN entry makes it infinite or NaN). Otherwise, or
    when the sum overflows, the entries are checked one by one.
    """
    if math.isfinite(float(a.sum())):
        return torch.ones(a.shape[0], dtype=torch.bool, device=a.device), True
    ok = torch.isfinite(a).flatten(1).all(-1)
    return ok, bool(ok.all())


def all_finite(a: Tensor) -> Tensor:
    """``(B,)`` mask: every entry of each row of ``a`` is finite (see :func:`finite_rows`)."""
    return finite_rows(a)[0]


def _finite_rows(hs: Scalars, f: Tensor):
    """:func:`finite_per_row` of ``f (B, m)`` as values of ``hs`` (one reduction)."""
    if f.shape[-1] == 0:
        return hs.view(finite_per_row(f))[0]
    if hs.floats:  # one problem: its residuals' host values (the rule reads them next)
        return ALL_REDUCE(np.isfinite(hs.view(f)[0]), axis=None)
    return hs.xp.isfinite(hs.view(torch.linalg.vector_norm(f, ord=math.inf, dim=-1))[0])


def _trial_cost(problem: Problem, hs: Scalars, f: Tensor,
                with_cost: bool = True) -> tuple[Tensor, Tensor | None, object]:
    """The trial's residuals ``f (B, m)``, zero in rows that are not finite (remembering
    the evaluated ones: :func:`~.counts.evaluated`); their cost (None without
    ``with_cost``: see :func:`_late_cost`); and which rows are finite, as values of
    ``hs``.

    On the host, when the cost proves the residuals finite
    (:attr:`Problem.cost_proves_finite`), a finite cost in every row settles
    it with no further pass over ``f`` (and no ``torch.where``, whose result
    would equal ``f``); otherwise, or where a cost is not finite (overflow
    or a non-finite residual), the rows are checked one by one as the tensor
    code always does (it decides without reading the device).
    """
    cost = None
    if with_cost and hs.host and problem.cost_proves_finite:
        cost = problem.cost(f)
        fin = hs.xp.isfinite(hs.view(cost)[0])
        if hs.count(fin) == hs.B:
            return f, cost, fin
    fin = _finite_rows(hs, f)
    if hs.host and hs.count(fin) == hs.B:  # (some cost overflowed, or none was taken)
        if with_cost and cost is None:
            cost = problem.cost(f)
        return f, cost, fin
    # (the evaluated values kept for a rule that reads them: counts.evaluated)
    f = remember_evaluated(torch.where(hs.tensors(fin)[0].unsqueeze(-1), f, 0.0), f)
    return f, problem.cost(f) if with_cost else None, fin


def _late_cost(problem: Problem, rule: StepRule, B: int, on_iteration, refill) -> bool:
    """Whether the run takes its cost only where it writes a result (:func:`_write_out`).

    One problem (no refill: it stays one) whose rule reads no cost during the
    iteration (:meth:`~.steps.base.StepRule.reads_cost`; 'lm' without the Gram
    route), whose state nobody else sees (no ``on_iteration``, callback or
    iteration table): the cost of each trial would only be carried to the
    point it stops at. It is taken there instead, by the same
    :meth:`Problem.cost` of the same residuals ``f_true (1, m)`` (the same
    value), once instead of at every trial: 'lm' on scipy's ``curve_fit``
    example, 11 costs of 50 residuals (three torch operations and a read
    each) to one (issue 14).
    """
    return (B == 1 and refill is None and on_iteration is None and problem.callback is None
            and problem.verbose < 2 and not rule.reads_cost(problem))


def finite_per_row(a: Tensor) -> Tensor:
    """``(B,)`` mask: every entry of each row of ``a`` is finite, without a host read.

    The max-norm of a row is finite exactly when every entry is (a NaN
    propagates, an infinity stays infinite, and a maximum cannot overflow);
    it takes one pass over ``a``, as a sum does.
    """
    rows = a if a.ndim == 2 else a.flatten(1)
    if rows.shape[-1] == 0:
        return torch.ones(rows.shape[0], dtype=torch.bool, device=a.device)
    return torch.isfinite(torch.linalg.vector_norm(rows, ord=math.inf, dim=-1))


def jacobian_nonfinite_rows(J: Tensor, G: Tensor) -> Tensor | None:
    """``(B,)`` mask of the problems whose ``J`` has a non-finite entry, or None if none has.

    Decided from ``G = J^T J`` as :func:`jacobian_finite` does (one read of
    its sum, much smaller than ``J``; on the CPU a host value, see
    :class:`~.host_scalars.Scalars`).
    """
    hs = scalars(G)
    if hs.floats and G.layout == torch.strided:
        # one problem: G's entries on the host (read once: the rule reads them next)
        if ALL_REDUCE(np.isfinite(hs.view(G)[0]), axis=None):
            return None
    elif math.isfinite(hs.view(G.sum())[0]):
        return None
    return ~jacobian_finite(J, G)


def jacobian_finite(J: Tensor, G: Tensor) -> Tensor:
    """``(B,)`` mask: every entry of each ``J`` is finite, decided from ``G = J^T J``.

    A non-finite entry of ``J`` makes a diagonal entry of ``G`` infinite or
    NaN, so a finite ``G`` (much smaller) proves a finite ``J``; otherwise, or
    when ``G`` overflowed, ``J`` itself is checked.
    """
    if math.isfinite(float(G.sum())):
        return torch.ones(J.shape[0], dtype=torch.bool, device=J.device)
    if not isinstance(J, Tensor):  # an operator (tr_solver='lsmr'): G holds column norms
        return torch.isfinite(G).flatten(1).all(-1)
    return all_finite(J)


def _original(view: RowView, key: str) -> Tensor:
    """The value of ``key`` in the rows of ``view`` before ``view`` assigned it."""
    value = view.state[key]
    return value if view.rows is None else gather_rows(value, view.rows)


def _indices(mask: Tensor) -> Tensor:
    """Indices where the ``(B,)`` tensor ``mask`` is true (from its host value on the CPU)."""
    hs = Scalars(mask)
    return hs.indices(hs.view(mask)[0])


def _rows(hs: Scalars, mask, count: int) -> Tensor | None:
    """Indices where ``mask`` (values of ``hs``) holds, or None meaning "all rows"."""
    if count == hs.B:
        return None
    return hs.indices(mask)


def _print_row(state: State, header: bool) -> None:
    if header:
        print("{:^15}{:^15}{:^15}{:^15}{:^15}{:^15}".format(
            "Iteration", "Total nfev", "Cost", "Cost reduction", "Step norm", "Optimality"))
    state = tensor_state(state)
    red = float(state["last_reduction"][0])
    stp = float(state["last_step_norm"][0])
    red_s = " " * 15 if red != red else f"{red:^15.2e}"
    stp_s = " " * 15 if stp != stp else f"{stp:^15.2e}"
    print(f"{int(state['nit'][0]):^15}{int(state['nfev'][0]):^15}"
          f"{float(state['cost'][0]):^15.4e}{red_s}{stp_s}{float(state['optimality'][0]):^15.2e}")


def admit(problem: Problem, rule: StepRule, state: State,
          late_cost: bool = False) -> tuple[int, int]:
    """Turn the initial rows of new problems into engine state, in place.

    ``state`` holds ``ids, x, f_true, J_true, lb, ub, scale, scale_inv, nfev,
    njev`` (``J_true`` is the raw Jacobian at ``x``) and optionally a preset
    ``status``; the loop's and the step rule's per-problem keys are added.
    ``late_cost`` (:func:`_late_cost`: nothing reads a cost before the write-out,
    which takes its own): the start's cost is not taken, NaN stands for it.

    Returns the number of rows that start an outer iteration (``fresh``) and
    the number of rows already stopped that do not (non-finite start, or a
    preset ``CALLBACK_STOP``), from one host read.
    """
    B = state["x"].shape[0]
    dev = state["x"].device
    dtype = state["x"].dtype
    hs = for_rows(state["x"])
    J_true = state.pop("J_true")
    f, J, g, G = problem.linearize(state["f_true"], J_true)
    bad_J = jacobian_nonfinite_rows(J, G)  # (None: J^T J is finite)
    if bad_J is None:
        J = _marked_finite(J)
    if hs.floats:  # one problem: its codes and counters as host values (Scalars.keep)
        status = hs.view(state["status"])[0] if "status" in state else term.RUNNING
        bad = (not np.isfinite(hs.view(state["f_true"])[0]).all()
               or (bad_J is not None and bool(hs.view(bad_J)[0])))
        status, = hs.keep(term.stop_running(status, np.bool_(bad), term.NONFINITE, hs.xp))
        nit, optimality, nan = np.int64(0), np.float64(0.0), np.float64("nan")
        last = (nan, nan)
    else:
        status = state.get("status",
                           torch.full((B,), term.RUNNING, dtype=torch.long, device=dev))
        bad = ~all_finite(state["f_true"])
        if bad_J is not None:
            bad = bad | bad_J
        status = term.stop_running(status, bad, term.NONFINITE)
        nit = torch.zeros(B, dtype=torch.long, device=dev)
        optimality = torch.zeros(B, dtype=dtype, device=dev)
        nan = torch.full((B,), float("nan"), dtype=dtype, device=dev)
        last = (nan, nan.clone())
    # a row starts its first outer iteration unless it stopped for good already
    fresh = (status != term.CALLBACK_STOP) & (status != term.NONFINITE)
    state.update(
        f=f, J=J, g=g, G=G, cost=nan if late_cost else problem.cost(state["f_true"]),
        nit=nit, status=status,
        fresh=fresh, optimality=optimality, last_reduction=last[0], last_step_norm=last[1],
    )
    rule.init_state(problem, state)
    undeclared = set(state) - LOOP_KEYS - rule.state_keys
    if undeclared:
        raise KeyError(f"{type(rule).__name__} created undeclared state keys "
                       f"{sorted(undeclared)}")
    n_fresh = hs.count(hs.view(fresh)[0])
    scale = state["scale"]
    if not problem.jac_scale and not known_unit(scale) and (
            bool((hs.rows(scale) == 1).all()) if hs.host else
            not problem.bounded and count_true(scale != 1) == 0):
        # x_scale of ones: no products by it (counts.times; off the host one read here
        # saves the unbounded factorisations' finiteness reads); the mark goes on an
        # alias, never on a tensor the caller may hold
        state["scale"] = mark_unit(scale.view_as(scale))
        scale_inv = state["scale_inv"]  # (1 / 1 = 1 exactly)
        state["scale_inv"] = mark_unit(scale_inv.view_as(scale_inv))
    return n_fresh, B - n_fresh


def _marked_finite(J):
    """``J``, whose ``J^T J`` was proven finite, as an alias marked finite
    (:func:`~.counts.mark_finite`): its factorisation then tests no entry, nor the
    singular values it finds (``linalg.svd_factors``). The mark goes on an alias, never
    on a tensor the caller's ``jac`` may hold; an operator or sparse ``J`` is left as
    it is."""
    if not isinstance(J, Tensor) or J.layout != torch.strided:
        return J
    alias = mark_finite(J.view_as(J))
    known = host_rows(J)
    # (the host's values of J, valid for the alias as long as they are for J: the same
    # memory, which the engine never writes)
    return alias if known is None else remember_rows(alias, known)


def concat(state: State, new: State) -> None:
    """Append the rows of ``new`` (same keys) to ``state``, keeping shared tensors shared."""
    if set(new) != set(state):
        raise KeyError(f"state keys differ: {sorted(set(new) ^ set(state))}")
    done: dict[tuple[int, int], Tensor] = {}
    for k, v in state.items():
        v, new[k] = as_tensor(v), as_tensor(new[k])  # (one problem's host values)
        key = (id(v), id(new[k]))
        merged = done.get(key)
        if merged is None:
            # (a sparse or operator Jacobian, tr_solver='lsmr', concatenates itself)
            if not isinstance(v, Tensor):
                merged = v.cat_rows(new[k])
            elif (order := row_layout(v)) is not None and row_layout(new[k]) == order:
                # (the rows' common layout kept: see row_layout)
                merged = _empty_in_layout(v, v.shape[0] + new[k].shape[0], order)
                torch.cat([v.permute(order), new[k].permute(order)], out=merged.permute(order))
            else:
                merged = torch.cat([v, new[k]])
            done[key] = merged
            if known_unit(new[k]):  # (ones and ones: still ones)
                merged = _keep_unit(v, merged)
        state[k] = merged


@torch.no_grad()
def run(problem: Problem, rule: StepRule, state: State, out: State,
        on_finish: Callable[[int], None] | None = None,
        on_iteration: Callable[[State], None] | None = None,
        refill: Callable[[int], State | None] | None = None,
        capacity: int | None = None) -> None:
    """Run ``rule`` on every problem in ``state`` until all are finished.

    Parameters
    ----------
    problem : Problem
    rule : StepRule
    state : dict
        Initial rows, as :func:`admit` takes them. Rows may already carry a
        ``status`` (e.g. non-finite start).
    out : dict
        Result tensors indexed by problem id (keys :data:`RESULT_KEYS`; a
        missing key is not written), filled in place as problems finish.
    on_finish : callable, optional
        Called with the number of problems that just finished (progress bars).
    on_iteration : callable, optional
        Called with the (read-only) state of the running problems after each
        round of trials; ``state["ids"]`` names the problem of each row.
    refill : callable, optional
        ``refill(room)`` returns the initial rows (as for ``state``) of up to
        ``room`` further problems, or None when there are none left. It is
        called whenever at most half of ``capacity`` rows are running, so a
        stream of problems is solved with about ``capacity`` rows at a time
        and the slow problems of one block run beside the next block instead
        of stretching each block's tail.
    capacity : int, optional
        Rows held at once when ``refill`` is given (default: the initial rows).

    Notes
    -----
    The loop's per-problem codes, counters and masks (``status``, ``nfev``,
    ``njev``, ``nit``, ``fresh``, the accepted and stopping rows) are values
    of :class:`~.host_scalars.Scalars`: numpy on the host when the tensors
    are on the CPU (kept on their state tensors, so the counts that decide
    "no row", "some rows", "every row" cost no read), tensors elsewhere.
    There the host learns the counts it needs (rows that start an outer
    iteration, that go on to build a model, that stopped, that accepted
    their trial) from two reads per round: one after the ``gtol``/budget
    tests at the top of an outer iteration, one after the trial; a third, of
    the sum of the new ``J^T J``, proves the new Jacobians finite (scanning
    ``J`` itself for that would cost a pass over the largest tensor of the
    run). The rest (status updates, the finiteness of the trial residuals)
    is applied without reading the device. A row whose new
    Jacobian is not finite is stopped (``NONFINITE``) at once; it still
    counts among the next round's top rows (the count of those was read
    before), whose optimality measure it does not take.
    """
    # the tail: once no problem is left to admit and the running rows' Jacobians hold
    # at most TAIL_ENTRIES entries in all (each within torch's grain size), MKL and torch's
    # own kernels run single-threaded in this thread (as the driver does for small runs;
    # see _blas_threads)
    with contextlib.ExitStack() as blas:
        _run(problem, rule, state, out, on_finish, on_iteration, refill, capacity, blas)


def _run(problem: Problem, rule: StepRule, state: State, out: State,
         on_finish: Callable[[int], None] | None,
         on_iteration: Callable[[State], None] | None,
         refill: Callable[[int], State | None] | None, capacity: int | None,
         blas: contextlib.ExitStack) -> None:
    """The body of :func:`run`; ``blas`` holds the tail's single-threaded MKL setting."""
    B = state["x"].shape[0]
    capacity = B if capacity is None else capacity
    late_cost = _late_cost(problem, rule, B, on_iteration, refill)
    n_fresh, n_stopped = admit(problem, rule, state, late_cost=late_cost)
    serial_tail = False
    # verbose=2: scipy's iteration table (one problem); whether its header is still due
    table = {"header": True} if problem.verbose == 2 and rule.prints_table else None

    while True:
        rows = state["x"].shape[0]
        if refill is not None and rows * 2 <= capacity:
            more = refill(capacity - rows)
            if more is None:
                refill = None
            else:
                new_fresh, new_stopped = admit(problem, rule, more)
                n_fresh += new_fresh
                n_stopped += new_stopped
                if rows == 0:
                    state.clear()
                    state.update(more)
                else:
                    concat(state, more)
        rows = state["x"].shape[0]
        if rows == 0:
            return
        if (refill is None and not serial_tail and is_small(problem.m, problem.n)
                and is_small(rows * problem.m, problem.n, TAIL_ENTRIES)):
            serial_tail = blas.enter_context(serial_blas(state["x"].device, rows * problem.m,
                                                         problem.n, TAIL_ENTRIES))
        # ---- top of an outer iteration: optimality, gtol, budget -------------
        n_top, n_fresh = n_fresh, 0
        deferred: Deferred | None = None
        # ``n_finished``: rows stopped now (those of the top that do not go on, and
        # ``n_stopped`` others); None: the factorisations stopped some, recount
        n_finished: int | None = n_stopped
        if n_top:
            def outer_top(sub: RowView, partial: bool = n_top < rows,
                          n_stopped: int = n_stopped) -> None:
                nonlocal n_finished
                n_finished = _top_stage(problem, rule, sub, partial, n_stopped,
                                        table if B == 1 else None)

            on_rows(state, state["fresh"], outer_top, n_top)
        # (``fresh`` is next read after this round's trial has set it)
        if n_finished is None or n_finished:
            hs = for_rows(state["x"])
            finished = hs.view(state["status"])[0] != term.RUNNING
            if n_finished is None:
                n_finished = hs.count(finished)
        if n_finished:
            n_stopped = 0
            _write_out(problem, rule, state, hs, finished, n_finished, out, late_cost)
            if on_finish is not None:
                on_finish(n_finished)
            if n_finished == rows and refill is None:
                return
            if n_finished == rows:
                compact(state, hs.indices(finished == False))  # noqa: E712 (numpy scalars too)
                continue  # every row finished: admit the next problems
            # (keys the trial neither reads nor, when it accepts every row, keeps: gathered
            # only if some row rejects its trial, see DEFERRABLE_KEYS)
            deferred = compact(state, hs.indices(finished == False),  # noqa: E712
                               DEFERRABLE_KEYS.intersection(rule.trial_unread(problem, state)))

        # ---- one trial per running problem -----------------------------------
        # (the per-problem counters, codes and masks are values of ``hs``: on the host
        # when on the CPU, see host_scalars; the state keeps them as tensors)
        hs = for_rows(state["x"])
        xp = hs.xp
        trial = rule.propose_step(problem, state)
        x_new = trial.x_new
        f_new = problem.fun(x_new, state["ids"])
        if rule.fixed_residual_count and f_new.shape[-1] != problem.m:
            raise ValueError(RESIDUALS_CHANGED_SIZE)
        nfev = hs.view(state["nfev"])[0] + 1
        f_new, cost_new, fin = _trial_cost(problem, hs, f_new, not late_cost)
        state["nfev"], = hs.keep(nfev)
        finite, = hs.tensors(fin)
        verdict = rule.assess_trial(problem, state, trial, f_new, cost_new, finite)
        forget_evaluated(f_new)  # (the zeroed rows' values: no longer needed, not kept alive)
        x_acc = verdict.x_accepted
        accept, code, status, nit = hs.view(verdict.accept, verdict.status, state["status"],
                                            state["nit"])
        status = xp.where(code != term.RUNNING, code, status)
        boundary = accept | (status != term.RUNNING) | term.budget_spent(nfev, problem.max_nfev)
        state["status"], state["nit"], state["fresh"] = hs.keep(status, nit + boundary, boundary)
        if problem.verbose == 2:
            red = state["cost"] - cost_new
            accept_t, boundary_t = hs.tensors(verdict.accept, state["fresh"])
            state["last_reduction"] = torch.where(
                boundary_t, torch.where(accept_t, red, 0.0), as_tensor(state["last_reduction"]))
            state["last_step_norm"] = torch.where(
                boundary_t, torch.where(accept_t, as_tensor(trial.step_norm), 0.0),
                as_tensor(state["last_step_norm"]))
        if problem.final_jacobian:
            n_accept, n_fresh = hs.count_many(accept, boundary)
        else:  # rows that stop on their accepted trial move there without a Jacobian
            stops = accept & (status != term.RUNNING)
            accept = accept & (status == term.RUNNING)
            n_accept, n_fresh, n_stops = hs.count_many(accept, boundary, stops)
            if n_stops:
                gather_deferred(state, deferred)
                deferred = None
                _move_without_jacobian(state, hs, stops, n_stops, x_acc, f_new, cost_new)
        if n_accept != hs.B:  # (every row accepted: the deferred keys are replaced below)
            gather_deferred(state, deferred)
        if n_accept:
            arows = _rows(hs, accept, n_accept)
            sub = state if arows is None else take(state, arows)  # (every row: in place)
            sub["x"] = x_acc if arows is None else gather_rows(x_acc, arows)
            sub["f_true"] = f_new if arows is None else gather_rows(f_new, arows)
            if cost_new is not None:  # (None: taken at write-out, _late_cost)
                sub["cost"] = cost_new if arows is None else gather_rows(cost_new, arows)
            if arows is None:
                # (every row accepted: the old point's Jacobian and products, replaced
                # below, are let go first, so that the new Jacobian may take their memory
                # instead of fresh pages: 'lm' at B = 20,000, the user's Jacobian took 9,000
                # page faults per call instead of 21,000)
                state["J"] = state["f"] = state["g"] = state["G"] = None
            J_true = problem.jac(sub["x"], sub["f_true"], sub["ids"])
            hs_sub = hs if arows is None else for_rows(sub["x"])
            sub["njev"], = hs_sub.keep(hs_sub.view(sub["njev"])[0] + 1)
            sub["f"], sub["J"], sub["g"], sub["G"] = problem.linearize(sub["f_true"], J_true)
            del J_true  # (held by the state alone, so the next round can let it go)
            bad = jacobian_nonfinite_rows(sub["J"], sub["G"])
            if bad is None:
                sub["J"] = _marked_finite(sub["J"])
            else:
                status, bad = hs_sub.view(sub["status"], bad)
                sub["status"], = hs_sub.keep(term.stop_running(status, bad, term.NONFINITE,
                                                               hs_sub.xp))
            rule.after_jacobian(problem, sub)
            if arows is not None:
                put(state, arows, sub)
        if on_iteration is not None:
            on_iteration(tensor_state(state))
        if problem.callback is not None and B == 1 and n_fresh:
            if problem.callback(tensor_state(state)):
                state["status"] = torch.full_like(as_tensor(state["status"]), term.CALLBACK_STOP)
                state["fresh"] = torch.zeros_like(as_tensor(state["fresh"]))
                n_fresh, n_stopped = 0, state["x"].shape[0]


def _move_without_jacobian(state: State, hs: Scalars, rows_mask, count: int, x_acc: Tensor,
                           f_new: Tensor, cost_new: Tensor | None) -> None:
    """Move the rows ``rows_mask`` to their accepted trial point, keeping their Jacobian.

    For ``Problem.final_jacobian=False``: these rows stopped on this trial,
    so only what their results report of the new point is written; ``njev``
    counts the Jacobian that the default would evaluate here (see
    :class:`~.problem.Problem`). ``rows_mask`` is a mask of ``hs``'s values.
    """
    rows = _rows(hs, rows_mask, count)
    sub = take(state, rows)
    sub["x"] = x_acc if rows is None else gather_rows(x_acc, rows)
    sub["f_true"] = f_new if rows is None else gather_rows(f_new, rows)
    if cost_new is not None:  # (None: taken at write-out, _late_cost)
        sub["cost"] = cost_new if rows is None else gather_rows(cost_new, rows)
    hs_sub = hs if rows is None else for_rows(sub["x"])
    sub["njev"], = hs_sub.keep(hs_sub.view(sub["njev"])[0] + 1)
    put(state, rows, sub)


def _top_stage(problem: Problem, rule: StepRule, sub: RowView, partial: bool, n_stopped: int,
               table: dict | None) -> int | None:
    """The top of an outer iteration on ``sub``; the number of rows stopped now.

    ``sub`` holds the top rows (the state itself when they are every row), or
    every row (``partial``: only the top rows are kept, see :func:`on_rows`);
    ``n_stopped`` rows outside the top had stopped already. Returns None when
    a factorisation stopped rows (the caller counts them). ``table``: the
    iteration table's state (verbose=2, one problem).
    """
    # (the measure before this round's: ``sub`` is the state itself when every row is a
    # top row; a RowView selects it lazily, see _original)
    before = None if isinstance(sub, RowView) else sub["optimality"]
    gtol_hit = rule.measure_optimality(problem, sub)
    # (per-problem codes and masks as values of ``hs``: on the host when on the CPU)
    hs = for_rows(sub["x"])
    xp = hs.xp
    hit, status, nfev = hs.view(gtol_hit, sub["status"], sub["nfev"])
    status = term.gtol_status(status, hit, xp)
    if rule.budget_at_top:
        status = term.budget_status(status, nfev, problem.max_nfev, xp)
    go = status == term.RUNNING
    nonfinite = status == term.NONFINITE
    status_t, = hs.keep(status)
    sub["status"] = status_t
    if table is not None and int(as_tensor(status_t)[0]) != term.NONFINITE:
        _print_row(sub, header=table["header"])
        table["header"] = False
    if partial and sub.rows is None:  # every row computed: count the top rows
        fresh, = hs.view(sub["fresh"])
        n_go, n_nonfinite, n_top_stopped = hs.count_many(go, nonfinite,
                                                         fresh & (status != term.RUNNING))
        n_finished: int | None = n_top_stopped + n_stopped
    else:  # the top rows only
        n_go, n_nonfinite = hs.count_many(go, nonfinite)
        n_finished = hs.B - n_go + n_stopped
    if n_nonfinite:  # a row whose last Jacobian was not finite keeps its measure
        old = _original(sub, "optimality") if before is None else before
        new = sub["optimality"]
        if isinstance(new, Tensor):
            nonfinite_t, = hs.tensors(nonfinite)
            sub["optimality"] = torch.where(nonfinite_t, as_tensor(old), new)
        else:  # (one problem's host value, Scalars.keep)
            sub["optimality"] = old
    if n_go:
        go_t = None if n_go == hs.B else hs.tensors(go)[0]
        # (the rows that do not go on stopped here: a rule may leave its model on them)
        on_rows(sub, go_t, lambda part: rule.build_model(problem, part), n_go,
                rule.model_on_stopped_rows)
        if sub["status"] is not status_t:  # a factorisation failed somewhere
            n_finished = None
    return n_finished


#: the value of a result key of one problem's output (``least_squares``) that the
#: write-out fills with the result itself (:func:`_write_out`), instead of a buffer
ONE_SLOT = object()
#: result keys of integer values
_INTEGER_KEYS = frozenset({"active_mask", "nfev", "njev", "nit", "status"})


def one_problem_slots(keys: tuple[str, ...] | list[str]) -> State:
    """The output of a run of one problem: a :data:`ONE_SLOT` per result key, which
    :func:`_write_out` replaces by that result (no buffers to allocate and copy into)."""
    return dict.fromkeys(keys, ONE_SLOT)


def _write_out(problem: Problem, rule: StepRule, state: State, hs: Scalars, mask, count: int,
               out: State, late_cost: bool = False) -> None:
    """Write the results of the rows where ``mask`` (values of ``hs``) holds into ``out``
    (``late_cost``: their cost taken now, of their residuals; see :func:`_late_cost`).

    A :data:`ONE_SLOT` of one problem's output becomes the value itself, as a ``(1, ...)``
    tensor of the buffer's dtype (integers ``long``, others ``x``'s): the state's own
    tensor, which the engine never writes, or the tensor of a host value."""
    sub = take(state, _rows(hs, mask, count))
    own = rule.result_fields(problem, sub)
    ids = sub["ids"]
    # (each value read, so its rows gathered, only for a result kept: without
    # ``return_jac`` no rows of ``J`` are selected)
    values = {
        "x": lambda: sub["x"],
        "cost": lambda: problem.cost(sub["f_true"]) if late_cost else sub["cost"],
        "f_true": lambda: sub["f_true"], "J": lambda: sub["J"],
        "g": lambda: sub["g"] if own.grad is None else own.grad,
        "optimality": lambda: sub["optimality"], "active_mask": lambda: own.active_mask,
        "nfev": lambda: sub["nfev"], "njev": lambda: sub["njev"] if own.njev is None else own.njev,
        "nit": lambda: sub["nit"], "status": lambda: sub["status"],
    }
    if not isinstance(state["J"], Tensor):
        # a sparse or operator Jacobian (tr_solver='lsmr', one problem) is handed out as is
        out["J"] = values.pop("J")()
    for k, value in values.items():
        dest = out.get(k)
        if dest is None:
            continue
        v = value()
        if dest is ONE_SLOT:  # one problem's output: the value itself
            t = as_tensor(v)
            kind = torch.long if k in _INTEGER_KEYS else state["x"].dtype
            out[k] = t if t.dtype == kind else t.to(kind)
            continue
        if dest.shape[0] == 1:  # one problem's buffers (its id is 0): written whole
            if is_host_value(v):  # (one problem's host value, Scalars.keep: no tensor made)
                dest.fill_(v.item() if isinstance(v, np.generic) else v)
            else:
                dest.copy_(v)  # (the conversion of ``to``; one operation instead of two)
            continue
        v = as_tensor(v)  # (one problem's host values, Scalars.keep)
        where = ids if ids.device == dest.device else ids.to(dest.device)
        dest.index_copy_(0, where, v.to(dest.device, dest.dtype))
