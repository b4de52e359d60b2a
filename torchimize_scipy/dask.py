"""Batches of fits on Dask: lazy results, one engine call per block of problems.

:func:`torchimize_scipy.batch_least_squares` and
:func:`torchimize_scipy.batch_curve_fit` hand a call whose inputs include a
dask array to the functions of this module (they can also be called
directly). The batch axis of every per-problem input is cut into the blocks
of the first dask input (``x0``/``p0`` first), the other axes are made one
chunk, per-problem numpy or torch inputs are cut the same way, and each block
becomes one task that runs the in-memory function on that block, on the
worker that holds it. Nothing runs before ``compute``.

Problems are independent, so a block's results are those that the in-memory
call gives for the same problems, bit for bit when the in-memory call is made
on that block. Two things can make the whole-batch in-memory call differ:
the 'trf' method runs its bounded variant for every problem of a call in
which any bound is finite (a block whose problems have only infinite bounds
runs the unbounded variant, as :func:`least_squares` does for each of them),
and batched floating-point kernels may round differently for another number
of rows (observed: not on the CPU).

:func:`configure_workers` sets, on a running ``distributed`` cluster, the
workers' memory allocator and torch threads for batched fits (dask's nanny
default doubles a fit's CPU; see docs/cluster.md).

Requires the ``dask`` extra: ``pip install torchimize-scipy[dask]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.optimize import Bounds, OptimizeResult

try:
    import dask
    import dask.array  # noqa: F401  (the extra; the blocks module builds the graphs)
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("torchimize_scipy.dask needs dask: pip install "
                      "'torchimize-scipy[dask]'") from exc

from . import BatchOptimizeResult
from . import batch_curve_fit as _batch_curve_fit
from . import batch_least_squares as _batch_least_squares
from ._dask_blocks import (
    BlockError,
    _batch_shape,
    _build,
    _cast,
    _fill,
    _float_dtype,
    _host,
    _is_dask,
    _Leaf,
    _Leaves,
    _ndim,
    _no_progress,
    _on_device,
    _rows,
    default_dtype,
)
from ._dask_workers import configure_workers
from ._validation import check_options

__all__ = ["BlockError", "DaskBatchResult", "batch_curve_fit", "batch_least_squares",
           "configure_workers"]

#: ``method`` values of ``batch_curve_fit`` (None: 'lm', or 'trf' with bounds).
_CURVE_FIT_METHODS = (None, "lm", "trf", "dogbox", "gn", "gd")


class DaskBatchResult(OptimizeResult):
    """Lazy results of a batch of least-squares problems.

    The fields of :class:`torchimize_scipy.BatchOptimizeResult` as dask
    arrays with the batch axis first (``message`` is an object array of
    strings; ``fun`` and ``jac`` have an unknown length ``m`` until
    computed). Compute them together with :meth:`compute` so that every
    block is solved once.
    """

    def __len__(self) -> int:
        return int(self["x"].shape[0])

    def compute(self, **kwargs: Any) -> BatchOptimizeResult:
        """Solve every block and return the in-memory :class:`BatchOptimizeResult`.

        Parameters
        ----------
        **kwargs
            Passed to :func:`dask.compute` (``scheduler=...``, ...).

        Returns
        -------
        BatchOptimizeResult
            The fields as numpy arrays; ``message`` a list of strings.
        """
        names = [k for k, v in self.items() if v is not None]
        tasks = self.__dict__.get("_tasks")
        if tasks is not None:  # the block results themselves: no task per field and block
            blocks = dask.compute(*tasks, **kwargs)
            values = [np.concatenate([b[k] for b in blocks]) for k in names]
        else:
            values = dask.compute(*[self[k] for k in names], **kwargs)
        out = dict.fromkeys(self.keys())
        for name, value in zip(names, values, strict=True):
            out[name] = list(value) if name == "message" else value
        return BatchOptimizeResult(**out)

    def persist(self, **kwargs: Any) -> DaskBatchResult:
        """Start solving now (on a distributed cluster) and keep the results there.

        Parameters
        ----------
        **kwargs
            Passed to :func:`dask.persist`.

        Returns
        -------
        DaskBatchResult
            The same fields, backed by results held in memory.
        """
        names = [k for k, v in self.items() if v is not None]
        values = dask.persist(*[self[k] for k in names], **kwargs)
        out = dict.fromkeys(self.keys())
        out.update(zip(names, values, strict=True))
        return DaskBatchResult(**out)

    def __repr__(self) -> str:
        x = self["x"]
        return (f"DaskBatchResult(problems={x.shape[0]}, blocks={x.numblocks[0]}, "
                "lazy: .compute() solves)")

    __str__ = __repr__


# ---------------------------------------------------------------------------
# batch_least_squares
# ---------------------------------------------------------------------------
def batch_least_squares(
    fun: Callable,
    x0: Any,
    jac: str | Callable = "2-point",
    bounds: Any = (-np.inf, np.inf),
    method: str = "trf",
    ftol: float | None = 1e-8,
    xtol: float | None = 1e-8,
    gtol: float | None = 1e-8,
    x_scale: Any = None,
    loss: str | Callable = "linear",
    f_scale: float = 1.0,
    diff_step: Any = None,
    max_nfev: int | None = None,
    verbose: int = 0,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    vectorized: bool = True,
    device: Any = None,
    dtype: Any = None,
    chunk_size: int | None = None,
    progress: bool | str = False,
    return_jac: bool = True,
    jac_sparsity: Any = None,
) -> DaskBatchResult:
    """:func:`torchimize_scipy.batch_least_squares` for dask inputs, lazily, block by block.

    ``x0`` and any per-problem input (an ``args`` entry with ``B`` rows, a
    ``(B, n)`` bound or ``x_scale``) may be dask arrays; the blocks of the
    batch are those of the first dask input among them, ``x0`` first. Shared
    dask inputs (``kwargs``, ``args`` entries without ``B`` rows) reach every
    block whole, as numpy arrays.

    Parameters
    ----------
    fun : callable
        ``fun(x, *args, **kwargs)`` for a block's problems, as in
        :func:`torchimize_scipy.batch_least_squares`; shipped to the workers
        by cloudpickle with what it captures.
    x0 : dask array, array_like or torch.Tensor, shape (B, n)
        Starting points, one row per problem; a dask array's chunks along
        the batch axis are the blocks (they must be known).
    jac : {'2-point', '3-point', 'cs', 'autograd'} or callable, optional
        As in :func:`torchimize_scipy.batch_least_squares`.
    bounds : 2-tuple or `scipy.optimize.Bounds`, optional
        Shared bounds, or ``(B, n)`` per-problem bounds (dask arrays too).
    method : {'trf', 'dogbox', 'lm', 'gn', 'gd'}, optional
        As in :func:`torchimize_scipy.batch_least_squares`.
    ftol, xtol, gtol : float or None, optional
        Tolerances of the termination tests, as in
        :func:`torchimize_scipy.batch_least_squares`.
    x_scale : array_like or 'jac', optional
        Shared, or ``(B, n)`` per problem (a dask array too).
    loss : str or callable, optional
        As in :func:`torchimize_scipy.batch_least_squares`.
    f_scale : float, optional
        As in :func:`torchimize_scipy.batch_least_squares`.
    diff_step : array_like, optional
        As in :func:`torchimize_scipy.batch_least_squares`.
    max_nfev : int, optional
        As in :func:`torchimize_scipy.batch_least_squares`.
    verbose : {0, 1, 2}, optional
        As in :func:`torchimize_scipy.batch_least_squares`; printed by the
        worker that runs the block.
    args : tuple, optional
        Entries with ``B`` rows (dask arrays too) are cut with the problems;
        the others reach every block whole.
    kwargs : dict, optional
        Shared keyword arguments of ``fun``, reaching every block whole.
    vectorized : bool, optional
        As in :func:`torchimize_scipy.batch_least_squares`.
    device : str or torch.device, optional
        Applied on each worker: the blocks (and the shared numpy arrays of
        ``args`` and ``kwargs``) reach the engine, and ``fun``, as torch
        tensors on that device; without it, as numpy arrays.
    dtype : torch.dtype or str, optional
        As in :func:`torchimize_scipy.batch_least_squares`.
    chunk_size : int, optional
        Most problems held at once within a block.
    progress : bool or str, optional
        Must be False (use dask's progress bar or dashboard).
    return_jac : bool, optional
        As in :func:`torchimize_scipy.batch_least_squares`.
    jac_sparsity : array_like or sparse, shape (m, n), optional
        One sparsity structure for all problems, shipped to every block
        whole; as in :func:`torchimize_scipy.batch_least_squares`.

    Returns
    -------
    DaskBatchResult
        Dask arrays of the result fields; ``.compute()`` gives the
        :class:`torchimize_scipy.BatchOptimizeResult`.

    Raises
    ------
    ValueError
        For options that the in-memory call rejects before solving (method,
        jac, loss, verbose, max_nfev), for ``progress`` (use dask's progress
        bar or dashboard), or for ``x0`` that is not ``(B, n)`` with known
        chunk sizes. Errors found while solving a block are raised at
        compute time, with the range of problem indices of that block.
    """
    check_options(method, jac, None, None, loss, verbose, max_nfev, jac_sparsity)
    _no_progress(progress)
    B, n = _batch_shape(x0, "x0")
    leaves = _Leaves(B)
    x0_leaf = leaves.take(x0)
    if isinstance(bounds, Bounds):
        bounds = (bounds.lb, bounds.ub)
    if len(bounds) != 2:
        raise ValueError("`bounds` must contain 2 elements.")
    bounds_tree = tuple(leaves.take(b) if _ndim(b) == 2 and _rows(b) == B else b
                        for b in bounds)
    if _ndim(x_scale) == 2 and _rows(x_scale) == B:
        x_scale = leaves.take(x_scale)
    args_tree = tuple(leaves.take(a) if _ndim(a) >= 1 and _rows(a) == B else a
                      for a in tuple(args))
    dtype = default_dtype(dtype, x0)
    static = {"fun": fun, "jac": jac, "x0": x0_leaf, "bounds": bounds_tree, "args": args_tree,
              "x_scale": x_scale, "kwargs": kwargs or {},
              "options": {"method": method, "ftol": ftol, "xtol": xtol, "gtol": gtol,
                          "loss": loss, "f_scale": f_scale, "diff_step": diff_step,
                          "max_nfev": max_nfev, "verbose": verbose, "vectorized": vectorized,
                          "device": device, "dtype": dtype, "chunk_size": chunk_size,
                          "return_jac": return_jac, "jac_sparsity": jac_sparsity}}
    fdt = _float_dtype(dtype)
    bounded = any(not _is_dask(b) and np.any(np.isfinite(np.asarray(_host(b), dtype=float)))
                  for b in bounds) or any(_is_dask(b) for b in bounds)
    active_dtype = fdt if method in ("trf", "gn", "gd") and not bounded else np.dtype(np.int64)
    nan = float("nan")
    fields: dict[str, tuple | None] = {
        "x": ((n,), fdt), "cost": ((), fdt), "fun": ((nan,), fdt),
        "jac": ((nan, n), fdt) if return_jac and jac_sparsity is None else None,
        "grad": ((n,), fdt),
        "optimality": ((), fdt), "active_mask": ((n,), active_dtype),
        "nfev": ((), np.dtype(np.int64)),
        "njev": None if (method == "lm" and not callable(jac)) else ((), np.dtype(np.int64)),
        "status": ((), np.dtype(np.int64)), "message": ((), np.dtype(object)),
        "success": ((), np.dtype(bool))}
    out, tasks = _build(_solve_least_squares_block, static, leaves, fields)
    res = DaskBatchResult(**out)
    object.__setattr__(res, "_tasks", tasks)  # an attribute, not a field (see compute)
    return res


def _solve_least_squares_block(static: dict, blocks: list[np.ndarray],
                               fields: dict) -> dict[str, np.ndarray]:
    """Run the in-memory ``batch_least_squares`` on one block."""
    opts = static["options"]
    blocks, args_tree, kwargs = _on_device(opts, blocks, static["args"], static["kwargs"])
    per_problem = tuple(_fill(a, blocks) for a in args_tree if isinstance(a, _Leaf))
    fun, jac = static["fun"], static["jac"]
    if len(per_problem) != len(args_tree):  # shared args travel in a closure, see _SharedArgs
        fun = _SharedArgs(fun, args_tree)
        jac = _SharedArgs(jac, args_tree) if callable(jac) else jac
    res = _batch_least_squares(
        fun, _fill(static["x0"], blocks), jac=jac,
        bounds=tuple(_fill(b, blocks) for b in static["bounds"]),
        x_scale=_fill(static["x_scale"], blocks), args=per_problem, kwargs=kwargs, **opts)
    return _cast({k: res[k] for k in fields}, fields)


class _SharedArgs:
    """``fun`` (or ``jac``) with the shared ``args`` entries put back in their places.

    Only the per-problem entries are passed to the in-memory call, so that a
    shared array whose length happens to equal a block's size is not taken
    for a per-problem one.
    """

    def __init__(self, fun: Callable, template: tuple) -> None:
        self.fun, self.template = fun, template

    def __call__(self, x: Any, *per_problem: Any, **kwargs: Any) -> Any:
        it = iter(per_problem)
        full = [next(it) if isinstance(a, _Leaf) else a for a in self.template]
        return self.fun(x, *full, **kwargs)


# ---------------------------------------------------------------------------
# batch_curve_fit
# ---------------------------------------------------------------------------
def batch_curve_fit(
    f: Callable,
    xdata: Any,
    ydata: Any,
    p0: Any,
    sigma: Any = None,
    absolute_sigma: bool = False,
    bounds: Any = (-np.inf, np.inf),
    method: str | None = None,
    jac: Callable | str | None = None,
    *,
    full_output: bool = False,
    device: Any = None,
    dtype: Any = None,
    chunk_size: int | None = None,
    progress: bool | str = False,
    nan_policy: str | None = None,
    **kwargs: Any,
) -> tuple:
    """:func:`torchimize_scipy.batch_curve_fit` for dask inputs, lazily, block by block.

    ``p0``, ``ydata`` and the per-problem ``xdata``, ``sigma``, bounds and
    ``x_scale`` may be dask arrays; the blocks of the batch are those of the
    first dask input among ``p0``, ``ydata``, ``xdata``, ``sigma``,
    ``bounds``. Shared dask inputs reach every block whole, as numpy arrays.

    Parameters
    ----------
    f : callable
        The model ``f(xdata, *params)`` for a block's problems, as in
        :func:`torchimize_scipy.batch_curve_fit`; shipped to the workers by
        cloudpickle with what it captures.
    xdata : array_like, torch.Tensor, tuple, dask array or object
        As in :func:`torchimize_scipy.batch_curve_fit`: shared predictors
        reach every block whole, per-problem ones (``(B, M)``, ``(B, k, M)``,
        or tuple entries with ``B`` rows) are cut with the problems.
    ydata : dask array or array_like, shape (B, M)
        The data, one row per problem.
    p0 : dask array, array_like or torch.Tensor, shape (B, P)
        Initial guesses, one row per problem.
    sigma : None, scalar, array_like or dask array, optional
        Shared ``(M,)``, or per problem ``(B, M)`` or ``(B, M, M)`` (cut with
        the problems), as in :func:`torchimize_scipy.batch_curve_fit`.
    absolute_sigma : bool, optional
        As in :func:`torchimize_scipy.batch_curve_fit`.
    bounds : 2-tuple or `scipy.optimize.Bounds`, optional
        Shared bounds, or ``(B, P)`` per-problem bounds (dask arrays too).
    method : {None, 'lm', 'trf', 'dogbox', 'gn', 'gd'}, optional
        Decided once for the whole batch (None: 'trf' if any bound is
        finite, else 'lm'); must be given when the bounds are dask arrays,
        whose finiteness is not known before computing.
    jac : callable or {'2-point', '3-point', 'cs', 'autograd'}, optional
        As in :func:`torchimize_scipy.batch_curve_fit`.
    full_output : bool, optional
        Also return ``infodict``, ``mesg`` and ``ier`` (lazily).
    device : str or torch.device, optional
        Applied on each worker: the blocks (and a shared ``xdata``) reach the
        engine, and ``f``, as torch tensors on that device; without it, as
        numpy arrays.
    dtype : torch.dtype or str, optional
        As in :func:`torchimize_scipy.batch_curve_fit`.
    chunk_size : int, optional
        Most problems held at once within a block.
    progress : bool or str, optional
        Must be False (use dask's progress bar or dashboard).
    nan_policy : {None, 'raise', 'omit'}, optional
        As in :func:`torchimize_scipy.batch_curve_fit`; applied to each
        block, so 'raise' raises at compute time.
    **kwargs
        Options of :func:`torchimize_scipy.batch_curve_fit`; a ``(B, P)``
        ``x_scale`` is cut with the problems.

    Returns
    -------
    popt, pcov : dask.array.Array
        ``(B, P)`` and ``(B, P, P)``; compute them together
        (``dask.compute(popt, pcov)``) so that each block is fitted once.
    infodict, mesg, ier
        Only with ``full_output``: ``infodict`` a dict of dask arrays,
        ``mesg`` an object dask array of strings, ``ier`` a dask array.

    Raises
    ------
    ValueError
        For ``p0``/``ydata`` shapes, ``method``, ``nan_policy``, ``args``,
        ``return_jac`` and ``progress`` before anything runs; errors found
        while fitting a block are raised at compute time, with the range of
        problem indices of that block (``nan_policy='raise'`` among them).

    Examples
    --------
    >>> import dask
    >>> import dask.array as da
    >>> import numpy as np
    >>> from torchimize_scipy import batch_curve_fit
    >>> t = np.linspace(0, 1, 20)
    >>> y = da.from_array(2.0 * np.exp(-np.outer([1.0, 2.0, 3.0, 4.0], t)), chunks=2)
    >>> popt, pcov = batch_curve_fit(lambda x, a, k: a * np.exp(-k * x), t, y,
    ...                              np.ones((4, 2)))
    >>> popt.chunks  # lazy: two blocks of two problems, nothing has run yet
    ((2, 2), (2,))
    >>> popt, pcov = dask.compute(popt, pcov, scheduler="sync")
    >>> np.round(popt[:, 1], 6)
    array([1., 2., 3., 4.])
    """
    _no_progress(progress)
    if method not in _CURVE_FIT_METHODS:
        raise ValueError("`method` must be None, 'lm', 'trf', 'dogbox', 'gn' or 'gd'.")
    if nan_policy not in (None, "raise", "omit"):
        raise ValueError("nan_policy must be one of {None, 'raise', 'omit'}")
    if "args" in kwargs:
        raise ValueError("'args' is not a supported keyword argument.")
    if "return_jac" in kwargs:
        raise ValueError("`return_jac` cannot be set: batch_curve_fit needs the Jacobians "
                         "to compute pcov.")
    B, P = _batch_shape(p0, "p0")
    if _ndim(ydata) != 2 or _rows(ydata) != B:
        raise ValueError(f"`ydata` must have shape (B, M) = ({B}, M) to match `p0` {(B, P)}.")
    M = int((ydata.shape if hasattr(ydata, "shape") else np.shape(ydata))[1])
    if isinstance(bounds, Bounds):
        bounds = (bounds.lb, bounds.ub)
    if len(bounds) != 2:
        raise ValueError("`bounds` must contain 2 elements.")
    if method is None:
        if any(_is_dask(b) for b in bounds):
            raise ValueError("`method` must be given when `bounds` are dask arrays: the "
                             "default ('lm', or 'trf' if any bound is finite) would need "
                             "them computed.")
        finite = any(np.any(np.isfinite(np.asarray(_host(b), dtype=float))) for b in bounds)
        method = "trf" if finite else "lm"  # decided for the whole batch, not per block

    leaves = _Leaves(B)
    p0_leaf = leaves.take(p0)
    y_leaf = leaves.take(ydata)
    if isinstance(xdata, (tuple, list)):
        x_tree: Any = tuple(leaves.take(x) if _ndim(x) == 2 and _rows(x) == B else x
                            for x in xdata)
    elif _ndim(xdata) in (2, 3) and _rows(xdata) == B:
        x_tree = leaves.take(xdata)
    else:
        x_tree = xdata
    sigma_tree = leaves.take(sigma) if _ndim(sigma) >= 2 and _rows(sigma) == B else sigma
    bounds_tree = tuple(leaves.take(b) if _ndim(b) == 2 and _rows(b) == B else b
                        for b in bounds)
    if _ndim(kwargs.get("x_scale")) == 2 and _rows(kwargs["x_scale"]) == B:
        kwargs["x_scale"] = leaves.take(kwargs["x_scale"])
    leaves.lead_order([p0_leaf, y_leaf])
    dtype = default_dtype(dtype, p0, ydata, *(xdata if isinstance(xdata, (tuple, list))
                                               else (xdata,)))
    static = {"f": f, "xdata": x_tree, "ydata": y_leaf, "p0": p0_leaf, "sigma": sigma_tree,
              "bounds": bounds_tree, "kwargs": kwargs,
              "options": {"absolute_sigma": absolute_sigma, "method": method, "jac": jac,
                          "device": device, "dtype": dtype, "chunk_size": chunk_size,
                          "nan_policy": nan_policy}}
    fdt = _float_dtype(dtype)
    i64 = np.dtype(np.int64)
    fields: dict[str, tuple | None] = {
        "popt": ((P,), fdt), "pcov": ((P, P), fdt), "nfev": ((), i64), "fvec": ((M,), fdt),
        "njev": ((), i64) if method == "lm" and callable(jac) else None,
        "mesg": ((), np.dtype(object)), "ier": ((), i64)}
    out, _ = _build(_solve_curve_fit_block, static, leaves, fields)
    if not full_output:
        return out["popt"], out["pcov"]
    infodict = {"nfev": out["nfev"], "fvec": out["fvec"]}
    if out["njev"] is not None:
        infodict["njev"] = out["njev"]
    return out["popt"], out["pcov"], infodict, out["mesg"], out["ier"]


def _solve_curve_fit_block(static: dict, blocks: list[np.ndarray],
                           fields: dict) -> dict[str, np.ndarray]:
    """Run the in-memory ``batch_curve_fit`` on one block."""
    opts = static["options"]
    blocks, xdata, _ = _on_device(opts, blocks, static["xdata"], {})
    if isinstance(xdata, tuple):
        xdata = tuple(_fill(x, blocks) for x in xdata)
    elif isinstance(xdata, _Leaf):
        xdata = _fill(xdata, blocks)
    elif _ndim(xdata) == 2:  # shared predictors: a tuple, whatever the block's size
        xdata = tuple(xdata)
    kwargs = {k: _fill(v, blocks) for k, v in static["kwargs"].items()}
    popt, pcov, info, mesg, ier = _batch_curve_fit(
        static["f"], xdata, _fill(static["ydata"], blocks), _fill(static["p0"], blocks),
        sigma=_fill(static["sigma"], blocks),
        bounds=tuple(_fill(b, blocks) for b in static["bounds"]), full_output=True,
        **opts, **kwargs)
    out = {"popt": popt, "pcov": pcov, "nfev": info["nfev"], "fvec": info["fvec"],
           "njev": info.get("njev"), "mesg": mesg, "ier": ier}
    return _cast(out, fields)
