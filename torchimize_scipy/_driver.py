"""Run the engine on a batch of validated problems and collect the results.

Frontends (``least_squares``, ``batch_least_squares``) validate and translate
options, build the batched callables and then call :func:`solve`, which builds
the engine's :class:`~torchimize_scipy._engine.problem.Problem`, its initial
state and result buffers, and runs the shared loop with the method's step rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._engine.loop import RESULT_KEYS, run
from ._engine.problem import BatchedFun, BatchedJac, Problem
from ._engine.steps import RULES


def result_buffers(B: int, n: int, m: int, dtype: torch.dtype, device: torch.device,
                   keys: tuple[str, ...] | list[str] = RESULT_KEYS) -> dict[str, Tensor]:
    """Uninitialised per-problem result tensors (the engine fills every row)."""
    shapes = {"x": (B, n), "cost": (B,), "f_true": (B, m), "J": (B, m, n), "g": (B, n),
              "optimality": (B,), "active_mask": (B, n), "nfev": (B,), "njev": (B,),
              "nit": (B,), "status": (B,)}
    integer = {"active_mask", "nfev", "njev", "nit", "status"}
    return {k: torch.empty(shapes[k], dtype=torch.long if k in integer else dtype,
                           device=device) for k in keys}


def _large(m: int, n: int) -> bool:
    """Tall, large problems factorise through ``J^T J`` (with the SVD fallback).

    For ``m >= 10 n`` and ``m n >= 2**20`` the Gram matrix costs a fraction of
    an SVD of ``J``, and the route falls back to the SVD wherever
    ``cond(J)**2`` is too large for it.
    """
    return m >= 10 * n and m * n >= 2**20


def default_max_nfev(method: str, n: int) -> int:
    """scipy's default budget (``100 n``); ``'gd'`` gets ``1000 n``."""
    return (1000 if method == "gd" else 100) * n


def solve(
    *,
    method: str,
    fun: BatchedFun,
    jac: BatchedJac,
    x0: Tensor,
    f0: Tensor,
    J0: Tensor,
    lb: Tensor,
    ub: Tensor,
    x_scale: Tensor | str,
    loss: object | None,
    ftol: float,
    xtol: float,
    gtol: float,
    max_nfev: int | None,
    verbose: int = 0,
    callback: Callable[[dict], bool] | None = None,
    initial_status: Tensor | None = None,
    on_finish: Callable[[int], None] | None = None,
    on_iteration: Callable[[dict], None] | None = None,
    batched: bool = False,
    step_length: float | None = None,
    out: dict[str, Tensor] | None = None,
    bounded: bool | None = None,
    refill: Callable[[int], dict[str, Tensor] | None] | None = None,
    capacity: int | None = None,
) -> dict[str, Tensor]:
    """Solve ``B`` problems; return batch-first result tensors.

    Parameters are engine tensors: ``x0, lb, ub (B, n)``, ``f0 (B, m)``,
    ``J0 (B, m, n)`` (raw, before any loss scaling); ``x_scale`` is ``'jac'``
    or ``(B, n)``. ``initial_status`` may pre-set a status for problems that
    must not run (e.g. non-finite residuals at ``x0``).

    ``out`` may hold result tensors indexed by problem id (e.g. for more
    problems than ``B``), which are filled in place and returned; a key it
    lacks is not kept. Without ``out``, every result is allocated.

    ``bounded`` overrides the bound check of ``lb``/``ub`` (a stream of
    problems takes the whole batch's); ``refill`` and ``capacity`` stream
    further problems into the loop (see :func:`~torchimize_scipy._engine.loop.run`),
    their initial rows made by :func:`initial_state`.

    Returns
    -------
    dict
        ``x, cost, f_true, J, g, optimality, active_mask, nfev, njev, nit, status``.
    """
    B, n = x0.shape
    m = f0.shape[-1]
    dev, dtype = x0.device, x0.dtype
    if bounded is None:
        bounded = bool(torch.isfinite(lb).any() or torch.isfinite(ub).any())
    jac_scale = isinstance(x_scale, str)
    problem = Problem(
        fun=fun, jac=jac, m=m, n=n, loss=loss, ftol=ftol, xtol=xtol, gtol=gtol,
        max_nfev=max_nfev if max_nfev is not None else default_max_nfev(method, n),
        jac_scale=jac_scale, bounded=bounded, callback=callback, verbose=verbose,
        use_gram=batched or _large(m, n), step_length=step_length)
    state = initial_state(torch.arange(B, device=dev), x0, f0, J0, lb, ub, x_scale,
                          initial_status)
    if out is None:
        out = result_buffers(B, n, m, dtype, dev)
    run(problem, RULES[method](), state, out, on_finish, on_iteration, refill, capacity)
    return out


def initial_state(ids: Tensor, x0: Tensor, f0: Tensor, J0: Tensor, lb: Tensor, ub: Tensor,
                  x_scale: Tensor | str, status: Tensor | None = None) -> dict[str, Tensor]:
    """The engine's initial rows of problems ``ids`` (see :func:`solve` for the arguments)."""
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
