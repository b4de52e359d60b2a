"""Run the engine on a batch of validated problems and collect the results.

The frontends (``least_squares``, ``batch_least_squares``, the torchimize API
in :mod:`torchimize_scipy.functions`) validate and translate options, build the
batched callables and the problems' starting rows (:func:`initial_state`), and
describe the run as one :class:`EngineRun`; :func:`solve` turns it into the
engine's :class:`~torchimize_scipy._engine.problem.Problem` and runs the shared
loop with the method's step rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._blas_threads import serial_blas
from ._engine.loop import RESULT_KEYS, run
from ._engine.problem import BatchedFun, BatchedJac, Problem
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


def solve(spec: EngineRun) -> dict[str, Tensor]:
    """Run the engine on ``spec``; return the batch-first result tensors.

    A batch whose Jacobians have at most 32,768 entries in all (torch's grain
    size; the rows of a batch count together) runs with MKL single-threaded
    in the calling thread (:func:`~torchimize_scipy._blas_threads.serial_blas`);
    the loop switches to it for the tail of a larger batch as well.

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
        final_jacobian=spec.final_jacobian)
    out = spec.out if spec.out is not None else result_buffers(B, n, m, x0.dtype, x0.device)
    rule = make_rule(spec.method, spec.tr_solver, spec.tr_options, spec.bounded)
    # small work: MKL single-threaded in this thread only (see _blas_threads); the
    # rows of a batch count together (MKL's batched products do use the threads)
    rows = max(B, spec.capacity or 0)
    with serial_blas(x0.device, rows * m, n):
        run(problem, rule, spec.start, out, spec.on_finish, spec.on_iteration,
            spec.refill, spec.capacity)
    return out


def initial_state(ids: Tensor, x0: Tensor, f0: Tensor, J0: Tensor, lb: Tensor, ub: Tensor,
                  x_scale: Tensor | str, status: Tensor | None = None) -> dict[str, Tensor]:
    """The engine's initial rows of problems ``ids``.

    ``x0, lb, ub (b, n)``, ``f0 (b, m)``, ``J0 (b, m, n)`` (raw, before any
    loss scaling); ``x_scale`` is ``'jac'`` or ``(b, n)``; ``status`` may
    preset a status for problems that must not run (e.g. non-finite
    residuals at ``x0``).
    """
    if isinstance(x_scale, str):
        scale = torch.ones_like(x0)
    else:
        scale = x_scale.to(device=x0.device, dtype=x0.dtype)
    ones = torch.ones(x0.shape[0], dtype=torch.long, device=x0.device)
    state = {
        "ids": ids, "x": x0, "f_true": f0, "J_true": J0,
        "lb": lb, "ub": ub, "scale": scale, "scale_inv": 1.0 / scale,
        "nfev": ones.clone(), "njev": ones.clone(),
    }
    if status is not None:
        state["status"] = status
    return state
