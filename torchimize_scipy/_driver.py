"""Run the engine on a batch of validated problems and collect the results.

The frontends (``least_squares``, ``batch_least_squares``, the torchimize API
in :mod:`torchimize_scipy.functions`) validate and translate options, build the
batched callables and the problems' starting rows (:func:`initial_state`), and
describe the run as one :class:`EngineRun`; :func:`solve` turns it into the
engine's :class:`~torchimize_scipy._engine.problem.Problem` and runs the shared
loop with the method's step rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._blas_threads import serial_blas, serial_torch
from ._engine.counts import mark_unit
from ._engine.host_scalars import batch_rows, remember_rows, scalars
from ._engine.loop import ONE_SLOT, RESULT_KEYS, run
from ._engine.problem import LM_FACTOR, BatchedFun, BatchedJac, Problem
from ._engine.steps import make_rule


def result_buffers(B: int, n: int, m: int, dtype: torch.dtype, device: torch.device,
                   keys: tuple[str, ...] | list[str] = RESULT_KEYS) -> dict[str, Tensor]:
    """Uninitialised per-problem result tensors (the engine fills every row)."""
    shapes = {"x": (B, n), "cost": (B,), "f_true": (B, m), "J": (B, m, n), "g": (B, n),
              "optimality": (B,), "active_mask": (B, n), "nfev": (B,), "njev": (B,),
              "nit": (B,), "status": (B,)}
    integer = {"active_mask", "nfev", "njev", "nit", "status"}
    return {k: torch.empty(shapes[k], dtype=torch.long if k in integer else dtype,
                           device=device) for k in keys}


def prefers_gram(m: int, n: int) -> bool:
    """Whether one problem of this shape should factorise through ``J^T J``.

    Batches always do (with the eigen/SVD fallback per problem). A single
    problem does when it is tall and large, ``m >= 10 n`` and ``m n >= 2**20``:
    there the Gram matrix costs a fraction of an SVD of ``J``, and the route
    falls back to the SVD wherever ``cond(J)**2`` is too large for it.
    """
    return m >= 10 * n and m * n >= 2**20


def default_max_nfev(method: str, n: int) -> int:
    """scipy's default budget (``100 n``); ``'gd'`` gets ``1000 n``."""
    return (1000 if method == "gd" else 100) * n


@dataclass
class EngineRun:
    """One run of the engine: the problems, their starting rows and the reporting hooks.

    Attributes
    ----------
    method : str
        The step rule, a key of :data:`~torchimize_scipy._engine.steps.RULES`.
    fun, jac
        Batched residuals and Jacobian (see
        :data:`~torchimize_scipy._engine.problem.BatchedFun` and ``BatchedJac``).
    start : dict
        The starting rows of the first problems, from :func:`initial_state`
        (``x (B, n)``, raw ``f_true (B, m)`` and ``J_true (B, m, n)``, bounds,
        scale, counters and optionally a preset ``status``).
    loss
        Robust loss object (:mod:`torchimize_scipy._loss`), None for linear.
    ftol, xtol, gtol : float
        Checked tolerances (0 disables a test).
    max_nfev : int or None
        Evaluation budget per problem; None is :func:`default_max_nfev`.
    bounded : bool
        Whether any problem of the whole call has a finite bound.
    jac_scale : bool
        ``x_scale='jac'``.
    use_gram : bool
        Factorise through ``J^T J`` (batches; see :func:`prefers_gram`).
    verbose, callback, step_length
        As :class:`~torchimize_scipy._engine.problem.Problem`.
    tr_solver, tr_options
        ``'exact'`` or ``'lsmr'`` ('trf'/'dogbox'), and LSMR's options for the
        latter (see :func:`~torchimize_scipy._engine.steps.make_rule`).
    out : dict, optional
        Result tensors indexed by problem id (e.g. for more problems than the
        first rows), filled in place; a key it lacks is not kept. Without it,
        every result is allocated for the rows of ``start``.
    refill, capacity
        Stream further problems into the loop (see
        :func:`~torchimize_scipy._engine.loop.run`); ``refill(room)`` returns
        their rows made by :func:`initial_state`, or None.
    on_finish, on_iteration
        Progress hooks: ``on_finish(k)`` when k problems stop,
        ``on_iteration(state)`` after every round.
    final_jacobian : bool
        As :class:`~torchimize_scipy._engine.problem.Problem`.
    evals_per_jacobian : int
        As :class:`~torchimize_scipy._engine.problem.Problem`.
    batch_rows : bool
        The rows are problems of a batch (``batch_least_squares``): a block or
        a tail of one problem keeps the batch's arithmetic
        (:func:`~torchimize_scipy._engine.host_scalars.batch_rows`), so that a
        problem's results do not depend on the problems beside it.
    """

    method: str
    fun: BatchedFun
    jac: BatchedJac
    start: dict[str, Tensor]
    loss: object | None
    ftol: float
    xtol: float
    gtol: float
    max_nfev: int | None
    bounded: bool
    jac_scale: bool
    use_gram: bool
    verbose: int = 0
    callback: Callable[[dict], bool] | None = None
    step_length: float | None = None
    out: dict[str, Tensor] | None = None
    refill: Callable[[int], dict[str, Tensor] | None] | None = None
    capacity: int | None = None
    on_finish: Callable[[int], None] | None = None
    on_iteration: Callable[[dict], None] | None = None
    tr_solver: str = "exact"
    tr_options: dict | None = None
    final_jacobian: bool = True
    evals_per_jacobian: int = 0
    batch_rows: bool = False
    lm_factor: float = LM_FACTOR


def solve(spec: EngineRun) -> dict[str, Tensor]:
    """Run the engine on ``spec``; return the batch-first result tensors.

    A batch whose Jacobians have at most 32,768 entries in all (torch's grain
    size; the rows of a batch count together) runs with MKL single-threaded
    in the calling thread (:func:`~torchimize_scipy._blas_threads.serial_blas`);
    the loop switches to it for the tail of a larger batch as well. A run
    whose Jacobian at ``x0`` is a torch sparse tensor on the CPU runs with the
    calling thread's torch count at 1 throughout
    (:func:`~torchimize_scipy._blas_threads.serial_torch`; its products keep
    their helper threads, the caller's functions their own count).

    Returns
    -------
    dict
        ``x, cost, f_true, J, g, optimality, active_mask, nfev, njev, nit,
        status`` (``spec.out`` when given, filled).
    """
    x0, f0 = spec.start["x"], spec.start["f_true"]
    B, n = x0.shape
    m = f0.shape[-1]
    max_nfev = spec.max_nfev if spec.max_nfev is not None else default_max_nfev(spec.method, n)
    problem = Problem(
        fun=spec.fun, jac=spec.jac, m=m, n=n, loss=spec.loss, ftol=spec.ftol, xtol=spec.xtol,
        gtol=spec.gtol, max_nfev=max_nfev, jac_scale=spec.jac_scale, bounded=spec.bounded,
        callback=spec.callback, verbose=spec.verbose, use_gram=spec.use_gram,
        step_length=spec.step_length, tr_solver=spec.tr_solver,
        final_jacobian=spec.final_jacobian, evals_per_jacobian=spec.evals_per_jacobian,
        lm_factor=spec.lm_factor)
    out = spec.out if spec.out is not None else result_buffers(B, n, m, x0.dtype, x0.device)
    rule = make_rule(spec.method, spec.tr_solver, spec.tr_options, spec.bounded)
    start, refill = spec.start, spec.refill
    scaling = None
    if spec.method == "lm" and spec.loss is None:
        # (the problems of the output: its buffers' rows, or one problem's slots)
        scaling = _LMScaling.of(start, B if out["x"] is ONE_SLOT else out["x"].shape[0])
        if scaling is not None:
            problem.fun, problem.jac = scaling.fun(spec.fun), scaling.jac(spec.jac)
            start = scaling.rows(start)
            if refill is not None:
                refill = scaling.refill(refill)
    # small work: MKL single-threaded in this thread only (see _blas_threads); the
    # rows of a batch count together (MKL's batched products do use the threads)
    rows = max(B, spec.capacity or 0)
    # a sparse Jacobian on the CPU: no torch parallel region in the whole run (its
    # products have their own helper threads; the caller's functions keep their
    # threads through _blas_threads.user_threads)
    J0 = start["J_true"]
    sparse = isinstance(J0, Tensor) and J0.layout in (torch.sparse_coo, torch.sparse_csr)
    with serial_blas(x0.device, rows * m, n), \
            serial_torch(x0.device) if sparse else nullcontext(), \
            batch_rows(spec.batch_rows):
        run(problem, rule, start, out, spec.on_finish, spec.on_iteration,
            refill, spec.capacity)
    if scaling is not None:
        scaling.restore(out)
    return out


#: 'lm' rows whose residuals or Jacobian at ``x0`` reach this magnitude run on scaled
#: residuals (:class:`_LMScaling`): beyond it sums of squares of a few such entries (and of
#: the scaled variables ``diag * x``) come near float64's overflow at 2**1024.
LM_SCALE_ABOVE = 2.0**400
#: ... and where the largest is below this (squares of such residuals underflow, and the
#: gradient test would pass at once: MINPACK's ratios do not)
LM_SCALE_BELOW = 2.0**-400


class _LMScaling:
    """'lm' on residuals scaled by a power of two per problem, for huge residuals.

    MINPACK's ``lmder`` takes every norm with ``enorm``, which scales its sums
    of squares, and compares norms only through their ratios (Moré, Garbow &
    Hillstrom, User Guide for MINPACK-1, ANL-80-74, 1980); our 'lm' sums the
    squares directly (its SVD-based subproblem too), which overflows once
    residuals near ``1e154``. The iteration is invariant under ``f -> c f``
    (hence ``J -> c J``): with ``x_scale='jac'`` the scaling ``diag``, the
    radius and the scaled step grow by ``c``, the damping is unchanged, and
    every test is a ratio; with a fixed ``x_scale`` the damping grows by
    ``c**2`` and the step is the same. With ``c`` a power of two every
    product is exact (barring underflow of entries far below ``eps`` times the
    largest), so the scaled run takes MINPACK's steps. Only MINPACK's
    absolute constants do not scale: the radius 100 of a start ``diag * x0 =
    0`` and the smallest positive damping. Rows whose largest ``|f0|`` or
    ``|J0|`` reaches :data:`LM_SCALE_ABOVE`, or whose largest entry of both
    is below :data:`LM_SCALE_BELOW` (but not zero: squares of such residuals
    underflow to 0, and the gradient test would pass at ``x0``), get the
    ``c = 2**-e`` that brings that largest entry into ``[1, 2)``; all others
    keep ``c = 1`` and run as before. ``f`` never grows on an accepted step, so a scale chosen at
    ``x0`` keeps the residuals in range (a Jacobian that grows by hundreds of
    orders of magnitude later is not covered). The results are divided back:
    ``fun``, ``jac``, ``grad`` and ``optimality`` are those of the problem,
    and ``cost`` is ``0.5 f.f`` of its residuals (``inf`` where that
    overflows, as scipy reports it).
    """

    def __init__(self, table: Tensor) -> None:
        self.table = table  # (total,): c of each problem id (1 for most)

    @staticmethod
    def factors(f0: Tensor, J0: Tensor) -> Tensor | None:
        """``c`` per row of ``f0 (b, m)``, ``J0 (b, m, n)``; None when every ``c`` is 1."""
        # (a batch: each row's largest entry, one pass over f0 and J0 in their own layouts
        # without a temporary |J0|, and one read; tiny rows need the rows' own values)
        if f0.numel() == 0 or J0.numel() == 0:
            return None
        hs = scalars(f0)
        if hs.floats:  # one problem: its entries on the host (read once: the engine reads them)
            f_h, J_h = hs.view(f0, J0)
            peak = np.maximum(np.abs(f_h).max(), np.abs(J_h).max())
            if LM_SCALE_BELOW <= peak < LM_SCALE_ABOVE:
                return None
        big = torch.maximum(torch.linalg.vector_norm(f0, ord=math.inf, dim=-1),
                            torch.linalg.vector_norm(J0, ord=math.inf, dim=(-2, -1)))
        # (non-finite rows stop at x0; a zero row has nothing to scale)
        huge = torch.isfinite(big) & ((big >= LM_SCALE_ABOVE) | (big < LM_SCALE_BELOW)) \
            & (big > 0)
        if not bool(huge.any()):
            return None
        # (largest entry scaled into [1, 2): 1 / c stays finite even for entries near 2**1024,
        # and c itself for subnormal ones)
        exponent = (torch.frexp(torch.where(huge, big, 1.0)).exponent - 1).clamp(min=-1000)
        return torch.where(huge, torch.ldexp(torch.ones_like(big), -exponent), 1.0)

    @classmethod
    def of(cls, start: dict[str, Tensor], total: int) -> _LMScaling | None:
        """The scaling of a run whose first rows are ``start`` and whose ids are below
        ``total``; None when no row of ``start`` needs one (nor can a refill then)."""
        J0 = start["J_true"]
        if not isinstance(J0, Tensor) or J0.layout != torch.strided:
            return None
        c = cls.factors(start["f_true"], J0)
        if c is None:
            return None
        table = torch.ones(total, dtype=c.dtype, device=c.device)
        return cls(table.index_copy(0, start["ids"], c))

    def rows(self, start: dict[str, Tensor]) -> dict[str, Tensor]:
        """``start`` with its rows' residuals and Jacobian scaled (a new dict)."""
        c = self.table.index_select(0, start["ids"])
        return {**start, "f_true": start["f_true"] * c[:, None],
                "J_true": start["J_true"] * c[:, None, None]}

    def refill(self, take: Callable[[int], dict | None]) -> Callable[[int], dict | None]:
        """``take`` whose rows are scaled (their factors enter the table)."""
        def scaled(room: int) -> dict | None:
            more = take(room)
            if more is None:
                return None
            c = self.factors(more["f_true"], more["J_true"])
            if c is not None:
                self.table = self.table.index_copy(0, more["ids"], c)
            return self.rows(more)
        return scaled

    def fun(self, fun: BatchedFun) -> BatchedFun:
        """``c * fun``."""
        def scaled(x: Tensor, ids: Tensor) -> Tensor:
            return fun(x, ids) * self.table.index_select(0, ids)[:, None]
        return scaled

    def jac(self, jac: BatchedJac) -> BatchedJac:
        """``c * jac``, given the unscaled residuals (finite differences use them)."""
        def scaled(x: Tensor, f: Tensor, ids: Tensor) -> Tensor:
            c = self.table.index_select(0, ids)
            return jac(x, f / c[:, None], ids) * c[:, None, None]
        return scaled

    def restore(self, out: dict[str, Tensor]) -> None:
        """Divide the scaled rows of the results back (new tensors: one problem's output
        holds the engine's own, :func:`~._engine.loop.one_problem_slots`)."""
        c = self.table.to(out["x"].device)
        inv = 1.0 / c  # (exact: powers of two, at most 2**1023)
        f = out["f_true"] = _times(out["f_true"], inv[:, None])
        if "J" in out:
            out["J"] = _times(out["J"], inv[:, None, None])
        # (twice by 1 / c, not once by its square, which may overflow where g = 0)
        if "g" in out:
            out["g"] = _times(_times(out["g"], inv[:, None]), inv[:, None])
        out["optimality"] = _times(_times(out["optimality"], inv), inv)
        cost = out["cost"]
        out["cost"] = torch.where(c != 1, 0.5 * (f * f).sum(-1), cost).to(cost.dtype)


def _times(t: Tensor, s: Tensor) -> Tensor:
    """``t * s`` in ``t``'s dtype: the values of ``t.mul_(s)``, in a new tensor."""
    return torch.mul(t, s).to(t.dtype)


def initial_state(ids: Tensor, x0: Tensor, f0: Tensor, J0: Tensor, lb: Tensor, ub: Tensor,
                  x_scale: Tensor | str, status: Tensor | None = None) -> dict[str, Tensor]:
    """The engine's initial rows of problems ``ids``.

    ``x0, lb, ub (b, n)``, ``f0 (b, m)``, ``J0 (b, m, n)`` (raw, before any
    loss scaling); ``x_scale`` is ``'jac'`` or ``(b, n)``; ``status`` may
    preset a status for problems that must not run (e.g. non-finite
    residuals at ``x0``).

    One float64 problem on the host (``host_scalars.Scalars.floats``) makes its
    unit scale in numpy and keeps its counts as host values (``Scalars.keep``): the
    same values, without a torch operation.
    """
    one = scalars(x0).floats
    if isinstance(x_scale, str):
        if one:  # (1 / 1 is 1 exactly: both of ones)
            scale, scale_inv = (remember_rows(torch.from_numpy(a), a)
                                for a in (np.ones(x0.shape), np.ones(x0.shape)))
        else:
            scale = torch.ones_like(x0)
            scale_inv = 1.0 / scale
    elif one and bool((x_scale.detach().cpu().numpy() == 1).all()):  # (1 / 1 = 1 exactly)
        # (private tensors of ones, marked so: the step rules multiply by neither)
        scale, scale_inv = (mark_unit(remember_rows(torch.from_numpy(a), a))
                            for a in (np.ones(x0.shape), np.ones(x0.shape)))
    else:
        scale = x_scale.to(device=x0.device, dtype=x0.dtype)
        scale_inv = 1.0 / scale
    if one:
        nfev, njev = np.int64(1), np.int64(1)
    else:
        ones = torch.ones(x0.shape[0], dtype=torch.long, device=x0.device)
        nfev, njev = ones.clone(), ones.clone()
    state = {
        "ids": ids, "x": x0, "f_true": f0, "J_true": J0,
        "lb": lb, "ub": ub, "scale": scale, "scale_inv": scale_inv,
        "nfev": nfev, "njev": njev,
    }
    if status is not None:
        state["status"] = status
    return state
