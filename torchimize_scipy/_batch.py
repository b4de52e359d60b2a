"""``batch_least_squares``: many independent problems in one call.

Every problem ``i`` of the batch is the ``least_squares`` problem with residuals
``fun(x0[i], *args_i, **kwargs)``; the engine advances them together, freezes
each one as soon as it terminates and stops evaluating it (compaction), and
holds at most ``chunk_size`` problems at once so that memory stays bounded:
problems stream through those rows, the next ones joining whenever half are
done (:class:`_BlockSource`, ``refill`` of the engine's loop). The results are
those of calling ``least_squares`` on each problem (same method, options and
termination tests), gathered in a :class:`BatchOptimizeResult`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch

from . import _implicit as implicit
from ._arrays import to_host
from ._blas_threads import serial_torch
from ._dask import dispatch, has_dask
from ._driver import EngineRun, initial_state, result_buffers, solve
from ._engine import status as codes
from ._engine.loop import RESULT_KEYS, all_finite
from ._frontend import EngineJacobian, check_residuals_and_loss, prepare, use_sparsity
from ._jac_forms import batch_jacobian_form
from ._results import ARRAY_FIELDS, BatchOptimizeResult, build_result
from ._validation import check_options

__all__ = ["ARRAY_FIELDS", "BatchOptimizeResult", "batch_least_squares", "default_chunk_size",
           "minpack_bookkeeping"]

class EngineMode(NamedTuple):
    """How an internal caller's solve runs (:func:`minpack_bookkeeping`).

    Attributes
    ----------
    final_jacobian : bool
        Evaluate the Jacobian at the point accepted by a problem's stopping
        trial (``Problem.final_jacobian``).
    evals_per_jacobian : int
        Residual evaluations each Jacobian counts against ``max_nfev``
        (``Problem.evals_per_jacobian``).
    """

    final_jacobian: bool = True
    evals_per_jacobian: int = 0


_DEFAULT_MODE = EngineMode()

#: How calls of :func:`batch_least_squares` (and of ``least_squares``) in this context run
#: (see minpack_bookkeeping).
_MODE: contextvars.ContextVar[EngineMode] = contextvars.ContextVar(
    "torchimize_scipy_engine_mode", default=_DEFAULT_MODE)


@contextlib.contextmanager
def minpack_bookkeeping(evals_per_jacobian: int = 0) -> Iterator[None]:
    """Within the block, :func:`batch_least_squares` and ``least_squares`` keep MINPACK's
    books: no final Jacobians, and each Jacobian costs ``evals_per_jacobian`` evaluations.

    For internal callers that read neither ``jac``, ``grad``, ``optimality``
    nor ``njev`` of the result at the final point (``batch_curve_fit``'s and
    ``curve_fit``'s 'lm' with MINPACK's bookkeeping, whose covariance is that of
    MINPACK's last Jacobian, which precedes the stopping trial): the Jacobian
    that scipy evaluates after MINPACK returns is then not evaluated
    (``Problem.final_jacobian``). ``evals_per_jacobian = n`` where the
    Jacobians are MINPACK's forward differences, which ``lmdif`` counts in
    ``nfev`` and against ``maxfev`` (``Problem.evals_per_jacobian``). Scoped
    to the calling thread and context.
    """
    token = _MODE.set(EngineMode(False, int(evals_per_jacobian)))
    try:
        yield
    finally:
        _MODE.reset(token)


@contextlib.contextmanager
def engine_mode_of_this_call() -> Iterator[EngineMode]:
    """How the calling solve runs, consumed by it.

    Not the default only within :func:`minpack_bookkeeping`. Inside the block,
    which runs the user's functions, the mode is back to its default: a
    ``least_squares`` or :func:`batch_least_squares` that those functions
    start themselves is a plain one (final Jacobian evaluated, ``jac`` and
    ``grad`` filled); only the solve that reads the mode takes it.
    """
    mode = _MODE.get()
    if mode == _DEFAULT_MODE:
        yield mode
        return
    token = _MODE.set(_DEFAULT_MODE)
    try:
        yield mode
    finally:
        _MODE.reset(token)


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
) -> BatchOptimizeResult:
    """Solve B independent nonlinear least-squares problems at once.

    Problem ``i`` minimises ``0.5 * sum(rho(f_i(x)**2))`` subject to
    ``lb_i <= x <= ub_i`` from ``x0[i]``, exactly as
    :func:`torchimize_scipy.least_squares` would; all options mean what they
    mean there.

    Parameters
    ----------
    fun : callable
        With ``vectorized=True``: ``fun(x, *args, **kwargs)`` takes ``x`` of
        shape ``(b, n)`` (the rows of the problems still running) and returns
        ``(b, m)``; per-problem arrays in ``args`` (see ``args``) are sliced
        together with ``x``; ``kwargs`` are shared. With
        ``vectorized=False``: ``fun(x (n,), *args_i, **kwargs)``
        for one problem, mapped over the batch: with :func:`torch.vmap` for
        torch code that allows it (per-problem ``args`` mapped along when they
        are tensors), a loop otherwise. Vectorised, the returned arrays are
        used without a copy, so ``fun`` and ``jac`` must not return a buffer
        they overwrite in later calls (scipy's finite differences have the
        same rule); not vectorised, each problem's value is copied as it
        returns, so one array refilled at every call works as in a loop of
        ``least_squares`` calls. Float32 residuals of a float64 batch take
        float32-sized finite-difference steps, as in ``least_squares``.
    x0 : array_like or Tensor, shape (B, n)
        Starting points. A row holding a NaN does not stop the batch (a
        single ``least_squares`` raises "Initial guess is outside of provided
        bounds"): that problem alone ends with status 5 and ``nfev = 1``, as
        one whose residuals are not finite at its start.
    jac : {'2-point', '3-point', 'cs', 'autograd'} or callable, optional
        A callable follows ``fun``'s convention and returns ``(b, m, n)``
        (``(m, n)`` per problem when not vectorized). Per problem it may also
        return ``scipy.sparse`` matrices or ``LinearOperator`` objects (a
        vectorised one: a torch sparse ``(b, m, n)`` tensor), as
        :func:`torchimize_scipy.least_squares` takes them, with structures
        that may differ between problems: the steps then use LSMR, all
        problems are held at once and ``jac`` is None, as with
        ``jac_sparsity``. Its value at the first problem's start decides.
    bounds : 2-tuple or `scipy.optimize.Bounds`, optional
        Each bound a scalar, shape ``(n,)`` or ``(B, n)``.
    method : {'trf', 'dogbox', 'lm', 'gn', 'gd'}, optional
        As in :func:`torchimize_scipy.least_squares`.
    ftol, xtol, gtol : float or None, optional
        As in :func:`torchimize_scipy.least_squares`.
    x_scale : array_like or 'jac', optional
        As in :func:`torchimize_scipy.least_squares`; may also be ``(B, n)``.
    loss : str or callable, optional
        As in :func:`torchimize_scipy.least_squares`; a callable maps ``z``
        of shape ``(b, m)`` to ``(3, b, m)``.
    f_scale : float, optional
        Soft margin of the robust loss (finite and nonzero, else a
        ``ValueError`` for the whole batch: it is one option for all).
    diff_step : array_like, optional
        Relative finite-difference step, a scalar or ``(n,)``: one for all
        problems (a 2-D array raises ``ValueError``).
    max_nfev : int, optional
        Evaluation budget per problem.
    verbose : {0, 1, 2}, optional
        1 prints a summary at the end, 2 also one line per block of problems
        started.
    args : tuple, optional
        Extra positional arguments of ``fun`` and ``jac``. An array whose
        leading dimension is B holds one row per problem and is sliced with
        ``x``. A 1-D array of another length, a 0-d array, a scalar or any
        other object is shared: passed whole to every call. An array of 2 or
        more dimensions must have B rows, or a single row, which is broadcast
        to every problem (each problem sees that row); any other number of
        rows raises a ``ValueError`` naming ``args[k]``, its shape and B.
    kwargs : dict, optional
        Extra keyword arguments of ``fun`` and ``jac``, never sliced: the
        place for arrays that every problem uses whole.
    vectorized : bool, optional
        Calling convention of ``fun``/``jac`` (see above).
    device, dtype : optional
        Where and in which dtype to compute: float32 or float64 (default:
        those of ``x0``; numpy input computes in float64 on the CPU). In
        float32, tolerances below float32's epsilon (1.19e-7), the defaults
        among them, are raised to it (see
        :func:`torchimize_scipy.least_squares`).
    chunk_size : int, optional
        Most problems held at once; the default bounds their Jacobians to
        2**21 entries on the CPU (16 MiB in float64) and 2**26 on a GPU.
        Problems stream through: whenever half of them are left, the next
        ones join, so that slow problems run beside new ones instead of
        holding a whole chunk back.
    progress : bool or str, optional
        Show a tqdm progress bar; a string is its label (default
        ``'batch_least_squares[<method>]'``). The bar counts residual
        evaluations, which advance at a steady rate from the first iteration
        (problems finish in bursts, so a count of finished problems would give
        a meaningless rate and remaining time). Its total, and so the
        remaining time, is unknown until a problem has finished; then it is
        an estimate, updated as problems finish: the evaluations made so far
        plus, for each problem not finished, the mean evaluations of the
        finished ones (at least one more). The postfix ``fits k/B`` counts
        finished problems.
    return_jac : bool, optional
        Keep the ``(B, m, n)`` Jacobians in the result (set False to save
        memory on very large batches; ``jac`` is then None).
    jac_sparsity : array_like or sparse, shape (m, n), optional
        One sparsity structure for every problem, as in
        :func:`torchimize_scipy.least_squares`: the finite differences
        perturb groups of columns (all groups of all running problems in one
        call of ``fun``), the Jacobians stay sparse and the steps use LSMR
        (``tr_solver='lsmr'``, methods 'trf' and 'dogbox'). All problems are
        then held at once (``chunk_size`` is not used) and ``jac`` is None.

    Returns
    -------
    BatchOptimizeResult
        Per-problem fields with a leading batch dimension; numpy arrays for
        numpy input, tensors for torch input.

    Notes
    -----
    Each step of a well-conditioned problem (``cond(J)**2 <= 1e10`` after
    scaling; about 8e4 in float32) is solved through the small ``n x n``
    matrix ``J^T J`` and its inverse, which for a batch costs far less than a
    factorisation of each ``m x n`` Jacobian; the other problems of the batch
    use the eigen-decomposition of ``J^T J`` or, when even that is not
    trusted, the SVD of ``J`` as a single call does. Results therefore agree
    with a loop of :func:`torchimize_scipy.least_squares` calls to rounding
    (about 1e-8 relative in ``x`` with finite-difference Jacobians), and they
    do not depend on ``chunk_size`` or on the other problems of the batch: a
    problem whose Gram matrix was rejected once keeps the SVD for the rest of
    its run. On the CPU that holds bit for bit where each problem's matrices
    have an even number of entries; MKL rounds a matrix that does not start on
    a 16-byte boundary differently, so for odd sizes (9 x 9, say) set
    ``MKL_CBWR=AUTO,STRICT`` before Python starts if you need the same bits in
    every chunking (``docs/parity.md``).

    A call runs until its slowest problem stops, and each iteration has a
    fixed cost of a few hundred tensor operations (about 0.5-3 ms on a CPU)
    however few problems are left. Streaming hides slow problems while others
    remain to be started, but the last ones still need their hundreds of
    iterations (up to ``max_nfev``, 100 n evaluations by default for 'trf')
    alone at the end; ``progress=True`` shows such a tail, and a smaller
    ``max_nfev`` bounds it (the problems it stops report ``status = 0``, as
    scipy's do).

    Examples
    --------
    >>> import numpy as np
    >>> from torchimize_scipy import batch_least_squares
    >>> t = np.linspace(0, 1, 20)
    >>> rates = np.array([0.5, 1.0, 2.0])
    >>> y = np.exp(-rates[:, None] * t)
    >>> def model(x, y):          # x (b, 1), y (b, 20)
    ...     return np.exp(-x[:, :1] * t) - y
    >>> res = batch_least_squares(model, np.ones((3, 1)), args=(y,))
    >>> np.round(res.x[:, 0], 6)
    array([0.5, 1. , 2. ])
    """
    if has_dask(x0, args, bounds, x_scale):  # lazy, block by block: torchimize_scipy.dask
        return dispatch("batch_least_squares", locals())
    check_options(method, jac, None, None, loss, verbose, max_nfev, None)
    check_shared_diff_step(diff_step)
    p = prepare(fun, x0, jac, bounds, method, ftol, xtol, gtol, x_scale, diff_step, args, kwargs,
                device=device, dtype=dtype, batch=True, vectorized=vectorized)
    # a Jacobian kept sparse on the CPU (jac_sparsity): the whole call, the evaluations and
    # checks at x0 included, holds this thread's torch count at 1, as least_squares does;
    # the caller's fun, jac and loss keep their counts (_blas_threads.user_threads)
    with engine_mode_of_this_call() as mode, \
            serial_torch(p.x0.device) if jac_sparsity is not None else nullcontext():
        return _solve(p, fun, jac, method, loss, f_scale, args, kwargs, max_nfev, verbose,
                      chunk_size, jac_sparsity, return_jac, progress, mode)


def _solve(p: Any, fun: Callable, jac: Any, method: str, loss: Any, f_scale: float,
           args: tuple, kwargs: dict, max_nfev: int | None, verbose: int,
           chunk_size: int | None, jac_sparsity: Any, return_jac: bool,
           progress: bool | str, mode: EngineMode = _DEFAULT_MODE) -> BatchOptimizeResult:
    """:func:`batch_least_squares` after its options are checked and translated (``p``)."""
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size <= 0):
        raise ValueError("`chunk_size` must be None or a positive integer.")
    ns = p.ns
    B, n = p.x0.shape
    dev = ns.device
    # m is not known yet: the first residuals are evaluated on a provisional size
    first = min(B, 4096 if chunk_size is None else int(chunk_size))
    # the first residuals also tell whether the solution must carry gradients
    probe = implicit.GradProbe(p.fun.fn) if ns.kind == "torch" and torch.is_grad_enabled() \
        else None
    # and the dtype of fun's own values (float32 residuals: see fd_dtype below)
    user_fn = p.fun.fn
    p.fun.fn = seen = _OutputDtype(probe if probe is not None else user_fn)
    try:
        f0_first = p.fun(p.x0[:first], torch.arange(first, device=dev))
    except RuntimeError as exc:
        implicit.check_numpy_error(exc)
        raise
    finally:
        p.fun.fn = user_fn
    track = implicit.requested(ns, fun, args, kwargs, f_scale, loss, probe=probe)
    if f0_first.ndim != 2 or f0_first.shape[0] != first:
        raise ValueError("`fun` must return an array of shape (b, m) for x of shape (b, n); "
                         f"got {tuple(f0_first.shape)} for b = {first}.")
    m = f0_first.shape[1]
    loss_obj = check_residuals_and_loss(method, n, f0_first, loss, f_scale, ns, rowwise=False)
    narrow = seen.narrow
    if narrow is not None and narrow.itemsize < ns.dtype.itemsize \
            and isinstance(p.jac, EngineJacobian):
        # float32 (or float16) residuals take default steps sized by their own epsilon
        # (scipy gh-12991), as each problem's least_squares would; they were of that
        # dtype, so the cast back is exact
        p.jac.fd_dtype = narrow
    sparse = jac_sparsity is not None and not callable(jac)
    if sparse:
        use_sparsity(p, method, jac, jac_sparsity, None, m, n)
        chunk_size, return_jac = B, False  # sparse Jacobians: all problems in one block
    chunk_size = default_chunk_size(B, m, n, dev) if chunk_size is None else int(chunk_size)

    bar = None
    if progress:
        label = progress if isinstance(progress, str) else f"batch_least_squares[{method}]"
        bar = _Progress(B, label)
    blocks = _BlockSource(f0_first=f0_first, fun=p.fun, jac=p.jac, x0=p.x0, lb=p.lb, ub=p.ub,
                          scale=p.x_scale, m=m, verbose=verbose, progress=bar)
    try:
        start = blocks.take(chunk_size)
    except ValueError as exc:  # `jac` returned sparse matrices or operators: as jac_sparsity
        if not (callable(jac) and batch_jacobian_form(p, method, m, n, exc) != "dense"):
            if bar is not None:
                bar.close(False)
            raise
        sparse, chunk_size, return_jac = True, B, False
        blocks = _BlockSource(f0_first=f0_first, fun=p.fun, jac=p.jac, x0=p.x0, lb=p.lb,
                              ub=p.ub, scale=p.x_scale, m=m, verbose=verbose, progress=bar)
        start = blocks.take(chunk_size)
    # no refill when the first block holds every problem: the engine then knows at once
    # that none is left to admit (its single-threaded tail may start from the first round)
    refill = blocks.take if blocks.next < blocks.B else None
    # full-size results, filled as problems finish; on the engine's device for
    # torch input, on the host for numpy input (whatever the engine's device)
    home = dev if ns.kind == "torch" else torch.device("cpu")
    keys = [k for k in RESULT_KEYS if return_jac or k != "J"]
    merged = result_buffers(B, n, m, ns.dtype, home, keys=keys)
    complete = False
    try:
        solve(EngineRun(
            method=method, fun=p.fun, jac=p.jac, start=start, loss=loss_obj,
            ftol=p.ftol, xtol=p.xtol, gtol=p.gtol, max_nfev=max_nfev, bounded=p.bounded,
            jac_scale=isinstance(p.x_scale, str), use_gram=True, out=merged,
            refill=refill, capacity=chunk_size,
            on_finish=bar.finished if bar is not None else None,
            on_iteration=bar.iteration if bar is not None else None,
            final_jacobian=mode.final_jacobian, evals_per_jacobian=mode.evals_per_jacobian,
            batch_rows=True, lm_factor=p.lm_factor,
            **({"tr_solver": "lsmr"} if sparse else {})))
        complete = True
    finally:
        if bar is not None:
            bar.close(complete)
    if track:
        every = torch.arange(B, device=dev)
        implicit.attach(merged, lambda x: p.fun.raw(x, every), loss_obj)
    if sparse:
        merged.pop("J", None)  # the engine hands out the sparse Jacobians of the last rows
    res = build_result(merged, ns, method, jac, p.bounded)
    if narrow is not None and ns.kind == "numpy" and method != "lm" \
            and narrow.itemsize < ns.dtype.itemsize:
        # each problem's least_squares returns fun's own dtype, as scipy's 'trf' and
        # 'dogbox' (MINPACK's 'lm': float64)
        res.fun = res.fun.astype(_NUMPY_OF[narrow])
    if verbose >= 1:
        print(repr(res))
    return res


def check_shared_diff_step(diff_step: Any) -> None:
    """``diff_step`` is one relative step for all problems: a scalar or ``(n,)``."""
    if diff_step is not None and np.ndim(to_host(diff_step)) > 1:
        raise ValueError("`diff_step` must be a scalar or of shape (n,), one relative step "
                         f"for all problems; got shape {np.shape(to_host(diff_step))}.")


#: Jacobian entries of the problems held at once, by default: on the CPU 2**21
#: (16 MiB in float64), where smaller working sets cause fewer page faults and
#: stay in cache (bench_batch.py part 3: 5-15 % faster than 2**22 once problems
#: stream through), on accelerators 2**26.
CPU_CHUNK_ENTRIES = 2**21
GPU_CHUNK_ENTRIES = 2**26


def default_chunk_size(B: int, m: int, n: int, device: torch.device) -> int:
    """Problems held at once when ``chunk_size`` is None."""
    budget = CPU_CHUNK_ENTRIES if torch.device(device).type == "cpu" else GPU_CHUNK_ENTRIES
    return max(1, min(B, budget // max(1, m * n)))


class _OutputDtype:
    """Wraps ``fun`` for its first call and records the narrow float dtype (float32 or
    float16, numpy's or torch's) of what it returned, as a torch dtype, or None (a
    vmapped tensor shows its dtype too)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.narrow: torch.dtype | None = None
        # the user's name in Python's own errors of the call (a ``kwargs`` that is not a
        # mapping: "<module>.<name>() argument after ** must be a mapping")
        for name in ("__module__", "__qualname__"):
            value = getattr(fn, name, None)
            if isinstance(value, str):
                setattr(self, name, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.fn(*args, **kwargs)
        dt = getattr(out, "dtype", None)
        # (numpy's and torch's dtypes; no comparison with another library's dtype object,
        # which array_api_strict warns of)
        if dt is torch.float32 or dt is torch.float16:
            self.narrow = dt
        elif isinstance(dt, np.dtype):
            self.narrow = _NARROW_NUMPY.get(dt)
        return out


#: numpy's narrow float dtypes and the torch dtype of their difference steps
_NARROW_NUMPY = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}
_NUMPY_OF = {t: d for d, t in _NARROW_NUMPY.items()}


class _BlockSource:
    """The initial rows of the problems of a batch, block by block, in order.

    ``take(room)`` evaluates the residuals and Jacobians of the next ``room``
    problems at their starting points (the first residuals, evaluated while
    learning ``m``, are reused) and returns their rows for the engine, or
    None when every problem has been handed out. Problem ids are global, so
    per-problem data and results are indexed directly.
    """

    def __init__(self, *, f0_first: torch.Tensor, fun: Callable, jac: EngineJacobian,
                 x0: torch.Tensor, lb: torch.Tensor, ub: torch.Tensor,
                 scale: torch.Tensor | str, m: int, verbose: int,
                 progress: _Progress | None = None) -> None:
        self.f0_first, self.fun, self.jac = f0_first, fun, jac
        self.x0, self.lb, self.ub, self.scale = x0, lb, ub, scale
        self.m, self.n, self.verbose, self.progress = m, x0.shape[1], verbose, progress
        self.B = x0.shape[0]
        self.next = 0

    def take(self, room: int) -> dict | None:
        start = self.next
        if start >= self.B:
            return None
        stop = min(self.B, start + room)
        self.next = stop
        dev = self.x0.device
        sl = slice(start, stop)
        x0c = self.x0[sl]
        b, m = x0c.shape[0], self.m
        idx = torch.arange(start, stop, device=dev)
        # residuals at x0 already evaluated (while learning m) are not evaluated again
        known = max(0, min(stop, self.f0_first.shape[0]) - start)
        if known == b:
            f0 = self.f0_first[sl]
        elif known == 0:
            f0 = self.fun(x0c, idx)
        else:
            f0 = torch.cat([self.f0_first[start:], self.fun(x0c[known:], idx[known:])])
        if tuple(f0.shape) != (b, m):
            raise ValueError(f"`fun` returned shape {tuple(f0.shape)}, expected {(b, m)}.")
        # non-finite residuals (or a NaN in x0) at the start: that problem fails alone
        status0 = torch.where(all_finite(f0) & ~torch.isnan(x0c).any(-1), codes.RUNNING,
                              codes.NONFINITE)
        J0 = self.jac(x0c, f0, idx)  # its shape checked by EngineJacobian
        if self.verbose == 2:
            print(f"problems {start}:{stop} started")
        if self.progress is not None:
            self.progress.started(b)
        return initial_state(idx, x0c, f0, J0, self.lb[sl], self.ub[sl],
                             self.scale if isinstance(self.scale, str) else self.scale[sl],
                             status0)


class _Progress:
    """A tqdm bar over residual evaluations, with an estimated total (see ``progress``).

    Every problem is evaluated once when it starts (:meth:`started`) and
    once per round of trials while it runs (:meth:`iteration` sees the
    rows of the running problems), so the count of evaluations is exact
    and needs no synchronisation; the total and the postfix are refreshed
    at most every ``interval`` seconds.
    """

    def __init__(self, B: int, label: str, interval: float = 0.2) -> None:
        from tqdm.auto import tqdm

        self.B, self.interval = B, interval
        self.evals = 0  # residual evaluations so far, all problems
        self.admitted = 0  # problems started
        self.done = 0  # problems finished
        self.last = -math.inf
        self.bar = tqdm(total=None, desc=label, unit="eval", unit_scale=True)
        self._postfix()

    def started(self, b: int) -> None:
        self.evals += b
        self.admitted += b

    def finished(self, k: int) -> None:
        self.done += k

    def iteration(self, state: dict) -> None:
        self.evals += state["x"].shape[0]
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._refresh(state["nfev"])

    def _refresh(self, nfev_running: torch.Tensor | None) -> None:
        """Re-estimate the total from the finished problems and move the bar."""
        running = 0 if nfev_running is None else nfev_running.shape[0]
        used_running = 0 if running == 0 else int(nfev_running.sum())
        used_finished = self.evals - used_running
        if self.done > 0:  # before any problem has finished, the total is unknown
            per_problem = used_finished / self.done
            ahead = (self.B - self.admitted) * per_problem
            if running:
                ahead += float(torch.clamp(per_problem - nfev_running, min=1.0).sum())
            self._set_total(self.evals + ahead)
        self._postfix()
        self.bar.update(self.evals - self.bar.n)

    def _set_total(self, total: float) -> None:
        total = max(int(math.ceil(total)), self.evals, 1)
        self.bar.total = total
        container = getattr(self.bar, "container", None)  # the notebook widget
        if container is not None:
            container.children[1].max = total

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"fits {self.done}/{self.B}", refresh=False)

    def close(self, complete: bool) -> None:
        """Close the bar; a complete run shows its exact total."""
        if complete:
            self._set_total(self.evals)
        self._postfix()
        self.bar.update(self.evals - self.bar.n)
        self.bar.close()
