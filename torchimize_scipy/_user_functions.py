"""Adapters from the caller's ``fun``/``jac`` to the engine's batched callables.

The engine calls ``fun(x (k, n), idx (k,)) -> (k, m)`` with torch tensors, where
``idx`` says which problem each row belongs to. The caller wrote either

* a scipy-style function of one point, ``fun(x (n,), *args, **kwargs)``, which
  receives numpy float64 arrays (or tensors, or the caller's array library);
  rows are evaluated one by one, through ``workers`` when given, or all at once
  with :func:`torch.vmap` when the function is torch code that allows it; or
* a vectorised function of a batch, ``fun(x (b, n), *args, **kwargs) -> (b, m)``,
  where every array in ``args`` has a leading batch dimension and is sliced
  with ``idx`` (``batch_least_squares``).

A callable robust loss is adapted the same way (:func:`user_loss`): a function
of one problem's ``z (m,)`` returning ``(3, m)``, or of a batch's ``z (b, m)``
returning ``(3, b, m)``. Internal callers may wrap a vectorised ``jac`` in
:class:`WithResiduals` to be handed the residuals the engine holds at its
points (finite differences need them and would otherwise evaluate them again);
a function of one point may carry ``engine_rows``, its own function of the
engine's rows of one problem (``curve_fit``'s whitened model, which passes the
parameters to ``f`` as scalars and returns arrays of its own), which
:class:`RowwiseFunction` then calls instead of copying a numpy row out and
the float64 value back in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse
import torch
from torch import Tensor

from ._arrays import Namespace, as_numpy, host_view, is_torch
from ._blas_threads import user_threads
from ._engine.csr import product_threads
from ._engine.host_scalars import host_rows, remember_rows, tensor_of_host

#: Largest ``n`` for which one point crosses to numpy through ``Tensor.tolist``
#: (cheaper than ``Tensor.numpy`` for a few values; slower for many).
_LIST_MAX = 32

#: With one torch thread, points of at least this many parameters are evaluated one
#: call each rather than in one vmapped call: each call's own work then outweighs its
#: dispatch, and the vmapped temporaries (k times one call's) leave the caches.
#: Measured for 12 points (the column groups of ``benchmarks/bench_sparse.py``'s bundle
#: adjustment at several sizes, one torch thread): n = 1,545 vmap 8.0 ms, loop 11.6 ms;
#: n = 6,180 36.6 / 24.2; n = 23,769 90 / 85; Broyden n = 100,000 15.7 / 9.9. With
#: several threads vmap stays: the loop is faster on an idle machine (bundle
#: adjustment, two threads: 125 / 82 ms) but it opens twelve times as many parallel
#: regions, and on a loaded one each waits for a descheduled thread (232 / 1,220 ms
#: under a load of 4 on 2 cores; whole solve 6.1 s against 16.6 s).
_VMAP_MAX_N = 4096

#: Selections of per-problem ``args`` that :meth:`PerProblemArgs.select` remembers.
_KEEP_SELECTIONS = 2


def _is_array(a: Any) -> bool:
    """numpy, torch or any other array-API array (not lists, scalars or classes)."""
    if is_torch(a) or isinstance(a, np.ndarray):
        return True
    if isinstance(a, type):  # a class such as np.float32 has its instances' attributes
        return False
    try:
        import array_api_compat

        return bool(array_api_compat.is_array_api_obj(a))
    except ImportError:  # pragma: no cover
        return False


def _per_problem(a: Any, B: int, position: int) -> bool:
    """Whether argument ``args[position]`` of a batch call holds one row per problem.

    The rule: an array whose leading dimension is B is per-problem (sliced with
    ``x``); a 1-D array of another length, a 0-d array, a scalar or any other
    object is shared (passed whole); an array of 2 or more dimensions must
    have B rows, or one row, which is broadcast to every problem (numpy's
    rule). Anything else is refused, naming the argument and the sizes.
    """
    if not _is_array(a) or a.ndim == 0:
        return False
    rows = a.shape[0]
    if rows == B:
        return True
    if a.ndim == 1:
        return False
    if rows == 1:
        return True
    raise ValueError(
        f"`args[{position}]` has shape {tuple(a.shape)}, but the batch has B = {B} problems: "
        "an array of 2 or more dimensions in `args` is per-problem data and needs one row "
        "per problem (leading dimension B) or a single row shared by all. Pass an array "
        "that every problem uses whole through `kwargs` (never sliced).")


def _broadcast_rows(a: Any, B: int) -> Any:
    """A single-row array as a ``(B, ...)`` view (numpy, torch or another array library)."""
    shape = (B, *tuple(a.shape[1:]))
    if is_torch(a):
        return a.expand(*shape)
    if isinstance(a, np.ndarray):
        return np.broadcast_to(a, shape)
    import array_api_compat

    return array_api_compat.array_namespace(a).broadcast_to(a, shape)


def _ascending_run(idx: Tensor | np.ndarray) -> tuple[int, int] | None:
    """``(start, stop)`` if ``idx`` is ``start, start+1, ..., stop-1``, else None.

    ``idx`` is a tensor, or the host view of a CPU one (read without a torch
    operation per test).
    """
    b = idx.shape[0]
    if b == 0:
        return None
    first, last = int(idx[0]), int(idx[-1])
    if last - first != b - 1:
        return None
    if b > 1 and not bool((idx[1:] - idx[:-1] == 1).all()):
        return None
    return first, last + 1


def _host_indices(idx: Tensor) -> np.ndarray | None:
    """The host view of a CPU tensor of indices (read once, without a torch operation
    per test), or None: another device, or a tensor with no memory of its own (a
    functorch transform's wrapper, as ``jac='autograd'`` passes through vmap)."""
    if idx.device.type != "cpu":
        return None
    try:
        return idx.numpy()
    except RuntimeError:
        return None


class PerProblemArgs:
    """``args`` of a batch call: per-problem arrays are sliced per row.

    Which arguments are per-problem is decided once, by :func:`_per_problem`;
    a single-row array is replaced by a ``(B, ...)`` broadcast view of it, so
    that every problem (vectorised or not) receives that row.
    """

    def __init__(self, args: Sequence[Any], B: int, ns: Namespace) -> None:
        self.args = tuple(args)
        self.B = B
        self.ns = ns
        self.sliced = tuple(_per_problem(a, B, k) for k, a in enumerate(self.args))
        # the last selections, by the identity of their index tensor (held here, so that
        # its id is not reused while it is remembered; the engine never writes into one)
        self._last: list[tuple[Tensor, tuple]] = []
        if ns.kind == "torch":
            self.args = tuple(a.to(ns.device) if (s and is_torch(a)) else a
                              for a, s in zip(self.args, self.sliced, strict=True))
        # after the move: a single row is broadcast on the device, never copied B times
        self.args = tuple(_broadcast_rows(a, B) if (s and a.shape[0] != B) else a
                          for a, s in zip(self.args, self.sliced, strict=True))

    def select(self, idx: Tensor | None) -> tuple:
        """The arguments for rows ``idx`` (all rows when None).

        Rows that form one ascending run ``k, k+1, ..., k+b-1`` (a whole
        chunk, or a chunk before any problem finished) are passed as slices of
        the caller's arrays, without copying; the last two selections are
        reused when the same ``idx`` comes again (finite differences call
        ``fun`` several times on the same rows; the engine calls ``fun`` on
        its running rows, whose index tensor changes only when problems finish
        or join, and ``jac`` on the accepted ones in between).
        """
        if idx is None:
            return self.args
        if not any(self.sliced):
            return self.args
        for known, selected in self._last:
            if known is idx:
                return selected
        host = _host_indices(idx)
        run = _ascending_run(idx if host is None else host)
        out = []
        for a, s in zip(self.args, self.sliced, strict=False):
            if not s:
                out.append(a)
            elif run is not None:
                out.append(a[run[0]:run[1], ...])
            elif is_torch(a):
                out.append(a.index_select(0, idx.to(a.device)))
            elif isinstance(a, np.ndarray):
                out.append(a[idx.cpu().numpy() if host is None else host])
            else:  # another array-API library
                import array_api_compat

                ax = array_api_compat.array_namespace(a)
                out.append(ax.take(a, ax.asarray(idx.cpu().numpy()), axis=0))
        selected = tuple(out)
        # the newest first; the engine's ``fun`` (all running rows) and ``jac`` (the
        # accepted ones) alternate between two index tensors
        self._last = [(idx, selected), *self._last[:_KEEP_SELECTIONS - 1]]
        return selected

    def row(self, i: int) -> tuple:
        """The arguments of problem ``i``."""
        return tuple(a[i] if s else a for a, s in zip(self.args, self.sliced, strict=False))


_NO_CHANGE = contextlib.nullcontext()
_SET_GRAD = getattr(torch._C, "_set_grad_enabled", None)


class _GradOn:
    """``torch.enable_grad()`` where grad mode is known to be off, at a third of its cost
    (about 0.5 us against 1.6 per call of the caller's code; the mode goes back to off)."""

    __slots__ = ()

    def __enter__(self) -> None:
        _SET_GRAD(True)

    def __exit__(self, *exc: Any) -> None:
        _SET_GRAD(False)


_GRAD_ON = _GradOn() if _SET_GRAD is not None else None


def caller_grad(enabled: bool) -> Any:
    """The caller's grad mode for a call of its code inside the engine's loop.

    The loop runs under ``torch.no_grad()`` (it records no graph of its
    iterations); scipy calls ``fun``, ``jac``, ``loss`` and ``callback`` in
    the caller's own mode, and code that uses autograd inside them (a residual
    that is the gradient of an energy, a ``jac`` built with
    ``torch.autograd.grad``) needs it. ``enabled``: the mode when the solve
    began. What these calls return is detached at the boundary
    (:meth:`~torchimize_scipy._arrays.Namespace.from_user`).
    """
    if not enabled or torch.is_grad_enabled():
        return _NO_CHANGE
    return _GRAD_ON if _GRAD_ON is not None else torch.enable_grad()


def _caller_grad_of(fn: Callable) -> bool:
    """The grad mode to call ``fn`` in: the caller's, unless ``fn`` is a wrapper of ours
    that calls the caller's code in it itself (``CALLER_GRAD_INSIDE``: ``curve_fit``'s
    model, whose own work, e.g. its cache-sized groups of calls, reads the engine's
    mode)."""
    target = fn.fn if isinstance(fn, WithResiduals) else fn
    owner = getattr(target, "__self__", target)
    return torch.is_grad_enabled() and not getattr(owner, "CALLER_GRAD_INSIDE", False)


def own_value(v: Any) -> Any:
    """A value ``fn`` returned for one of several rows, kept before ``fn`` is called for
    the next: a copy of an array, tensor or ``scipy.sparse`` matrix, which ``fn`` may
    refill at every call (as a loop of single problems allows: each of its values is
    used before the next call)."""
    if isinstance(v, np.ndarray):  # (subclasses too: a masked array, np.matrix; the
        return v.copy(order="K")  # layout kept: a transposed view stays transposed)
    if isinstance(v, Tensor):
        return v.clone()
    if scipy.sparse.issparse(v):
        return v.copy()
    return v


def _same(v: Any) -> Any:
    """The value of a single row, which is converted or stacked before the next call."""
    return v


class RowwiseFunction:
    """Evaluate a function of one point on every row of a batch.

    Parameters
    ----------
    fn : callable
        ``fn(x (n,), *args, **kwargs)``; returns an array_like.
    args, kwargs
        Extra arguments; ``args`` may be a :class:`PerProblemArgs`.
    ns : Namespace
        The caller's array kind.
    workers : None, int or map-like callable
        As scipy's ``workers``: rows are evaluated with ``workers(func, iterable)``.
    try_vmap : bool
        For torch functions, first try :func:`torch.vmap` over the rows.
    kind : {'fun', 'jac'}
        What ``fn`` returns for one point: residuals (at most 1-D, stacked to
        ``(k, m)``) or a Jacobian (at most 2-D, stacked to ``(k, m, n)``).
    """

    #: a function of one point never receives the engine's residuals (``EngineJacobian``
    #: asks; the vectorised adapter may)
    takes_residuals = False

    def __init__(self, fn: Callable, args: Any, kwargs: dict, ns: Namespace,
                 workers: Any = None, try_vmap: bool = True, kind: str = "fun") -> None:
        self.kind = kind
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.ns = ns
        self.map = _make_map(workers)
        self._grad = _caller_grad_of(fn)  # (the caller's: see caller_grad)
        self._vmap_ok = try_vmap and ns.kind == "torch"
        # decided once, not per evaluation
        self._ndim = 1 if kind == "fun" else 2
        self._per_problem = isinstance(args, PerProblemArgs)
        self._host = ns.device.type == "cpu"
        self._numpy_dtype = {torch.float64: np.float64, torch.float32: np.float32}.get(ns.dtype)
        # a function of ours that takes the engine's rows of one problem itself
        # (``engine_rows``: curve_fit's whitened model, which passes the parameters to the
        # user's ``f`` as scalars and returns arrays of its own): called with them directly,
        # without a copy of the row and of its float64 result (numpy, host, no extra arguments)
        rows = getattr(fn, "engine_rows", None)
        self._engine_rows = rows if (
            rows is not None and ns.kind == "numpy" and self._host and not args
            and not kwargs and self.map is None and self._numpy_dtype is np.float64) else None

    def _args_for(self, i: int) -> tuple:
        if self._per_problem:
            return self.args.row(i)
        return self.args

    def _vmapped(self, x: Tensor, idx: Tensor) -> Tensor:
        """All rows in one call of ``torch.vmap(fn)``; per-problem ``args`` mapped with them.

        Raises when ``fn`` cannot be vmapped (data-dependent control flow,
        conversions to Python numbers or numpy, ...), or when a per-problem
        argument is not a tensor.
        """
        fn, kwargs = self.fn, self.kwargs
        if not isinstance(self.args, PerProblemArgs):
            return torch.vmap(lambda r: torch.as_tensor(fn(r, *self.args, **kwargs)))(x)
        args = self.args.select(idx)
        sliced = self.args.sliced
        if not all(is_torch(a) for a, s in zip(args, sliced, strict=True) if s):
            raise TypeError("per-problem arguments that are not tensors cannot be vmapped")
        dims = (0, *(0 if s else None for s in sliced))
        return torch.vmap(lambda r, *a: torch.as_tensor(fn(r, *a, **kwargs)), in_dims=dims)(
            x, *args)

    def raw(self, x: Tensor, idx: Tensor) -> Tensor:
        """Differentiable evaluation for torch functions (no detach), ``(k, m)``."""
        with user_threads(), caller_grad(self._grad):
            return self._raw(x, idx)

    def _raw(self, x: Tensor, idx: Tensor) -> Tensor:
        if self._vmap_ok and x.shape[0] > 1:
            try:
                out = self._vmapped(x, idx)
            except Exception:  # noqa: BLE001 - any failure means "not vmappable"
                self._vmap_ok = False
            else:
                return out.reshape(x.shape[0], -1)
        ids = idx.tolist()
        # each row a copy: ``fn`` may write to its argument, as with the other paths; each
        # value kept as it returns (own_value): ``fn`` may refill one array at every call
        own = own_value if x.shape[0] > 1 else _same
        return torch.stack([own(torch.as_tensor(self.fn(x[r].clone(), *self._args_for(ids[r]),
                                                        **self.kwargs))).reshape(-1)
                            for r in range(x.shape[0])])

    def call_one(self, x: Tensor, i: int = 0) -> Any:
        """Raw call for one point (the caller's return value, unconverted)."""
        row = self.ns.row_to_fun(x)
        with caller_grad(self._grad):
            if self.ns.kind != "torch":
                return self.fn(row, *self._args_for(i), **self.kwargs)
            with user_threads():
                return self.fn(row, *self._args_for(i), **self.kwargs)

    def __call__(self, x: Tensor, idx: Tensor, complex_ok: bool = False) -> Tensor:
        """``(k, m)`` (or ``(k, m, n)`` for a Jacobian) at the rows ``x (k, n)``.

        A torch function runs with the caller's own thread counts, also inside
        a solve that holds this thread's at 1 (:func:`~torchimize_scipy.
        _blas_threads.user_threads`); numpy and other array kinds do not use
        torch's threads.
        """
        if not self._grad:  # (a wrapper of ours, or a caller without grad mode)
            return self._call(x, idx, complex_ok)
        with caller_grad(True):
            return self._call(x, idx, complex_ok)

    def _call(self, x: Tensor, idx: Tensor, complex_ok: bool) -> Tensor:
        k = x.shape[0]
        # (the caller's own torch count, also inside a solve that holds this thread's at 1)
        if self._vmap_ok and k > 1 and (x.shape[-1] < _VMAP_MAX_N or product_threads() > 1):
            try:
                with user_threads():
                    out = self._vmapped(x, idx)
            except Exception:  # noqa: BLE001 - any failure means "not vmappable"
                self._vmap_ok = False
            else:
                out = self._shaped(out.reshape(k, *_atleast(out.shape[1:], self._ndim)))
                return self.ns.from_user(out, complex_ok=complex_ok or x.is_complex(),
                                         what=self.kind)
        if self._engine_rows is not None and k == 1:
            out = self._engine_rows(x, idx)  # (1, ...): this call's own array
            if type(out) is np.ndarray and out.dtype == np.float64 \
                    and out.ndim == self._ndim + 1 and out.flags.c_contiguous:
                return remember_rows(torch.from_numpy(out), out)  # (nobody writes it)
            vals = [out[0]]  # (another dtype or layout: converted and checked as any value)
            fast = self._stack_numpy(vals)
            if fast is not None:
                return fast
        elif self.map is None and self.ns.kind == "numpy":
            vals = self._call_numpy(x, idx.tolist() if self._per_problem else None)
            fast = self._stack_numpy(vals)
            if fast is not None:
                return fast
        elif k == 1 and self.map is None and self.ns.kind == "torch":
            # one problem (least_squares): no per-row lists; the row is a fresh copy
            row = x[0].clone()
            with user_threads():
                v = self.fn(row, *self._args_for(int(idx[0]) if self._per_problem else 0),
                            **self.kwargs)
            if (isinstance(v, torch.Tensor) and v.ndim == self._ndim and not v.requires_grad
                    and v.dtype == self.ns.dtype and v.device == self.ns.device):
                return torch.stack([v])  # (1, ...), a copy: ``fun`` may reuse its output
            vals = [v]
        else:
            ids = idx.tolist()
            rows = [x[r] for r in range(k)]
            if self.map is None:
                own = own_value if k > 1 else _same
                vals = [own(self.call_one(rows[r], ids[r])) for r in range(k)]
            else:
                items = [(self.ns.row_to_fun(rows[r]), self._args_for(ids[r]))
                         for r in range(k)]
                vals = list(self.map(_RowCall(self.fn, self.kwargs), items))
        cplx = complex_ok or x.is_complex()
        parts = [self.ns.from_user(v, complex_ok=cplx, what=self.kind) for v in vals]
        parts = [p.reshape(_atleast(tuple(p.shape), self._ndim)) for p in parts]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"`{self.kind}` returned arrays of different shapes at different "
                             f"points (problems, or difference steps): {sorted(shapes)}.")
        return self._shaped(torch.stack(parts))

    def _call_numpy(self, x: Tensor, ids: list | None) -> list:
        """Serial calls of a numpy function, each row passed as ``Namespace.row_to_fun`` does.

        The batch crosses to the host once instead of row by row; every row is
        a fresh float64 array (``fun`` may write to it). ``ids`` (the problem
        of each row) is needed only with per-problem ``args``.
        """
        fn, args, kwargs = self.fn, self.args, self.kwargs
        if ids is None and x.shape[0] == 1 and x.shape[1] <= _LIST_MAX and self._host \
                and x.is_floating_point() and not x.requires_grad:
            # one small point: from the host rows the engine made it from, or through a
            # list, without the four torch operations of Tensor.numpy() (the same float64
            # values; a fresh array)
            known = host_rows(x)
            row = (np.array(known[0], dtype=np.float64) if known is not None
                   else np.array(x.tolist()[0], dtype=np.float64))
            return [fn(row, *args, **kwargs)]
        # the engine's x never requires grad; .numpy() is then a view (no detach needed)
        xn = x.numpy() if self._host and not x.requires_grad else x.detach().cpu().numpy()
        if xn.dtype == np.float32:
            xn = xn.astype(np.float64)
        # several rows: each value kept as it returns (own_value), before the next call
        own = own_value if xn.shape[0] > 1 else _same
        if ids is not None:
            return [own(fn(xn[r].copy(), *args.row(ids[r]), **kwargs)) for r in range(len(ids))]
        return [own(fn(xn[r].copy(), *args, **kwargs)) for r in range(xn.shape[0])]

    def _stack_numpy(self, vals: list) -> Tensor | None:
        """Convert numpy results in one go when they are real arrays of one dtype and shape.

        Gives the values the per-row ``Namespace.from_user`` gives; None when
        the generic per-row conversion (and its checks) is needed. The result
        never shares memory with an array ``fun`` returned (it may reuse it).
        """
        if not vals:
            return None
        ndim = self._ndim
        if len(vals) == 1:  # one problem: no stacking, one copy into the engine's dtype
            a = vals[0]
            if not isinstance(a, np.ndarray):
                if isinstance(a, torch.Tensor):
                    return None
                a = np.asarray(a)
            if a.dtype.kind not in "fiub":
                return None
            shape = (1, *_atleast(a.shape, ndim))
            if self._host and self._numpy_dtype is not None:
                # np.array copies (C order, as np.stack); the tensor shares that private
                # copy, whose values the engine's host code then reads without a conversion
                copy = np.array(a, dtype=self._numpy_dtype, order="C").reshape(shape)
                t = remember_rows(torch.from_numpy(copy), copy)
            else:
                t = torch.from_numpy(np.array(a, order="C").reshape(shape)).to(
                    device=self.ns.device, dtype=self.ns.dtype)
            return self._shaped(t)
        if any(isinstance(v, torch.Tensor) for v in vals):
            return None
        arrs = [np.asarray(v) for v in vals]
        dt0 = arrs[0].dtype
        shape0 = _atleast(arrs[0].shape, ndim)
        if dt0.kind not in "fiub" or any(a.dtype != dt0 or _atleast(a.shape, ndim) != shape0
                                         for a in arrs):
            return None
        stacked = np.stack([a.reshape(shape0) for a in arrs])
        return self._shaped(torch.from_numpy(stacked).to(device=self.ns.device,
                                                         dtype=self.ns.dtype))

    def _shaped(self, out: Tensor) -> Tensor:
        """Check the stacked result is ``(k, m)`` (fun) or ``(k, m, n)`` (jac)."""
        if out.ndim != self._ndim + 1:
            if self.kind == "fun":
                raise ValueError("`fun` must return at most 1-d array_like. "
                                 f"f0.shape: {tuple(out.shape[1:])}")
            raise ValueError("`jac` must return at most 2-d array_like; got shape "
                             f"{tuple(out.shape[1:])}.")
        return out


class _RowCall:
    """Picklable ``(point, args) -> fn(point, *args, **kwargs)`` for process pools."""

    def __init__(self, fn: Callable, kwargs: dict) -> None:
        self.fn = fn
        self.kwargs = kwargs

    def __call__(self, item: tuple) -> Any:
        x, args = item
        return self.fn(x, *args, **self.kwargs)


def _atleast(shape: tuple, ndim: int) -> tuple:
    """``numpy.atleast_1d``/``atleast_2d`` applied to a shape."""
    shape = tuple(shape)
    if len(shape) >= ndim:
        return shape
    return (1,) * (ndim - len(shape)) + shape


def _make_map(workers: Any) -> Callable | None:
    """scipy's ``workers``: None/1 serial, int -> process pool, callable -> map-like."""
    if workers is None or workers == 1:
        return None
    if callable(workers):
        return workers
    if isinstance(workers, (int, np.integer)) and (workers == -1 or workers > 1):
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(None if workers == -1 else int(workers))
        return _PoolMap(pool)
    raise ValueError("`workers` must be None, a positive integer, -1 or a map-like callable.")


class _PoolMap:
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def __call__(self, func: Callable, iterable: Any) -> list:
        return self.pool.map(func, iterable)

    def __del__(self) -> None:  # pragma: no cover - cleanup
        try:
            self.pool.terminate()
        except Exception:  # noqa: BLE001
            pass


class WithResiduals:
    """A batch ``jac`` that is also handed the residuals at its points (internal callers).

    Wraps ``fn(x (b, n), *args_b, residuals=f (b, m), **kwargs) -> (b, m, n)``.
    The engine asks for a Jacobian only at points whose residuals it has just
    evaluated (the starts, the accepted trials) and passes them with the call
    (``jac(x, f, idx)``, :mod:`torchimize_scipy._engine.problem`); forward
    differences need exactly those (``batch_curve_fit``'s MINPACK differences,
    :meth:`~torchimize_scipy._curve_fit._model.WhitenedModel.fd_jacobian`), so
    a wrapped ``fn`` neither looks them up nor evaluates them again. ``f`` is
    the engine's copy (converted to the engine's dtype), in the caller's kind
    as ``x`` is, shared with the engine: read it, never write to it.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class VectorizedFunction:
    """Evaluate a function of a batch, ``fn(x (b, n), *args_b, **kwargs) -> (b, ...)``."""

    def __init__(self, fn: Callable, args: PerProblemArgs, kwargs: dict, ns: Namespace,
                 kind: str = "fun") -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.ns = ns
        self.kind = kind
        self._grad = _caller_grad_of(fn)  # (the caller's: see caller_grad)
        #: ``fn`` also takes the residuals at its points (a :class:`WithResiduals` ``jac``)
        self.takes_residuals = isinstance(fn, WithResiduals)
        #: numpy dtype of the engine's tensors when they live on the host and the caller
        #: works in numpy (a result of that dtype crosses without a conversion), else None
        self._host_dtype = ({torch.float64: np.dtype(np.float64),
                             torch.float32: np.dtype(np.float32)}.get(ns.dtype)
                            if ns.kind == "numpy" and ns.device.type == "cpu" else None)

    def raw(self, x: Tensor, idx: Tensor) -> Tensor:
        """Differentiable evaluation for torch functions (no detach), ``(b, m)``."""
        with user_threads(), caller_grad(self._grad):
            return torch.as_tensor(self.fn(x, *self.args.select(idx), **self.kwargs))

    def __call__(self, x: Tensor, idx: Tensor, complex_ok: bool = False,
                 residuals: Tensor | None = None) -> Tensor:
        """``fn`` at the rows ``x (b, n)``; a torch ``fn`` with the caller's thread counts.

        ``residuals (b, m)``: the engine's residuals at ``x``, handed on (in the
        caller's kind, not copied) when ``fn`` takes them (:attr:`takes_residuals`).
        """
        if not self._grad:  # (a wrapper of ours, or a caller without grad mode)
            return self._call(x, idx, complex_ok, residuals)
        with caller_grad(True):
            return self._call(x, idx, complex_ok, residuals)

    def _call(self, x: Tensor, idx: Tensor, complex_ok: bool,
              residuals: Tensor | None) -> Tensor:
        kwargs = self.kwargs
        if residuals is not None and self.takes_residuals:
            kwargs = dict(kwargs, residuals=self._user_view(residuals))
        if self.ns.kind == "torch":
            xu = x.clone()
            with user_threads():
                out = self.fn(xu, *self.args.select(idx), **kwargs)
            return self.ns.from_user(out, complex_ok=complex_ok or x.is_complex(),
                                     what=self.kind)
        xu = self._host_copy(x)
        if self.ns.kind == "xp":
            xu = self.ns.xp.asarray(xu)
        out = self.fn(xu, *self.args.select(idx), **kwargs)
        if self._host_dtype is not None and type(out) is np.ndarray \
                and out.dtype == self._host_dtype:
            # already the engine's dtype on its device: the tensor of that memory, as
            # from_user makes it (its checks pass for a real float array), remembered as
            # its host rows (the engine's host reads of it convert nothing)
            return tensor_of_host(out)
        return self.ns.from_user(out, complex_ok=complex_ok or x.is_complex(), what=self.kind)

    @staticmethod
    def _host_copy(x: Tensor) -> np.ndarray:
        """A fresh host array of the points ``x (b, n)`` for the caller (``fn`` may write
        to it): a copy of their remembered host rows, or of the view ``Tensor.numpy()``
        gives of a CPU tensor (four torch dispatches instead of the six of
        ``detach().cpu().numpy()``; the engine's points never require grad)."""
        known = host_rows(x)
        return (known if known is not None else host_view(x)).copy()

    def _user_view(self, t: Tensor) -> Any:
        """The engine's tensor ``t`` in the caller's kind, without a copy where it can be."""
        if self.ns.kind == "torch":
            return t.detach()
        host = host_view(t)
        return self.ns.xp.asarray(host) if self.ns.kind == "xp" else host


def user_loss(loss: Callable, ns: Namespace, m: int, rowwise: bool) -> Callable[[Tensor], Tensor]:
    """The engine's ``rho(z (b, m)) -> (3, b, m)`` from a caller's loss callable.

    ``rowwise`` (``least_squares``): ``loss(z (m,))`` is called once per
    problem with a fresh array of the caller's kind (numpy float64 unless the
    caller works in torch) and must return ``(3, m)`` (else scipy's
    ``ValueError``). Otherwise (``batch_least_squares``) ``loss(z (b, m))``
    returns ``(3, b, m)``. Called in the caller's grad mode (:func:`caller_grad`).
    """
    grad = torch.is_grad_enabled()
    if rowwise:
        def rho_rows(z: Tensor) -> Tensor:
            rows = []
            for i in range(z.shape[0]):
                if ns.kind == "torch":
                    with user_threads(), caller_grad(grad):
                        r = loss(z[i])
                else:
                    with caller_grad(grad):
                        r = loss(ns.row_to_fun(z[i]))
                    r = np.asarray(as_numpy(r), dtype=float)
                r = ns.from_user(r, what="loss")
                if tuple(r.shape) != (3, m):
                    raise ValueError("The return value of `loss` callable has wrong shape.")
                rows.append(r)
            return torch.stack(rows, dim=1)

        return rho_rows

    def rho_batch(z: Tensor) -> Tensor:  # its shape is checked by the LossFunction
        if ns.kind == "torch":
            with user_threads(), caller_grad(grad):
                out = loss(z)
            return ns.from_user(out, what="loss")
        with caller_grad(grad):
            out = loss(z.detach().cpu().numpy())
        return ns.from_user(out, what="loss")

    return rho_batch
