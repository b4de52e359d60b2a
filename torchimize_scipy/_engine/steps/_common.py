"""Pieces shared by several step rules."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..counts import known_finite
from ..host_scalars import Scalars, for_rows, host_value
from ..linalg import Factors, KnownFactors
from ..problem import Problem
from ..termination import RUNNING, SINGULAR, stop_running
from .base import ResultFields


def bound_activity(problem: Problem, state: dict) -> ResultFields:
    """``result_fields`` of the interior methods: bounds within ``xtol`` are active."""
    if problem.bounded:
        from ..bounds import find_active_constraints

        active = find_active_constraints(state["x"], state["lb"], state["ub"],
                                         rtol=problem.xtol)
    else:
        x = state["x"]
        hs = for_rows(x)
        # (one float64 problem: numpy's zeros, remembered as the tensor's host rows)
        active = (hs.tensor_rows(np.zeros(x.shape, dtype=np.int64)) if hs.floats
                  else torch.zeros_like(x, dtype=torch.long))
    return ResultFields(active)


def flag_singular(state: dict, ok: Tensor) -> None:
    """Stop problems whose step factorisation failed (``ok`` false) as SINGULAR."""
    state["status"] = stop_running(state["status"], ~ok, SINGULAR)


def flag_singular_factors(state: dict, sv: Tensor) -> None:
    """:func:`flag_singular` for problems whose singular values ``sv`` are not all finite.

    A finite sum of ``sv`` means every value is finite: nothing to flag (nor
    to read, when the factorisation made ``sv`` finite by construction). On
    the CPU the values are read on the host (:class:`~..host_scalars.Scalars`,
    which keeps them on the tensor for the subproblem's solver).
    """
    if known_finite(sv):
        return
    sc = Scalars(sv)
    if sc.host:  # the host's values (read once, kept for the subproblem's solver)
        ok = sc.all_rows(sc.xp.isfinite(sc.rows(sv)))
        if sc.count(ok) < sc.B:
            flag_singular(state, sc.tensor(ok))
    elif not math.isfinite(float(sv.sum())):
        flag_singular(state, torch.isfinite(sv).all(-1))


def column_norms(state: dict) -> Tensor:
    """Euclidean norms of the Jacobian's columns, from the Gram matrix ``J^T J``.

    With ``tr_solver='lsmr'`` ``state["G"]`` holds the squared norms ``(B, n)``
    themselves (see ``operator.linearize_products``).
    """
    G = state["G"]
    sq = G if G.ndim == 2 else torch.diagonal(G, dim1=-2, dim2=-1)
    return sq.clamp(min=0).sqrt()


def initial_scale(problem: Problem, state: dict) -> None:
    """Set ``scale``/``scale_inv`` from the first Jacobian when ``x_scale='jac'``."""
    if problem.jac_scale:
        scale_inv = column_norms(state)
        scale_inv = torch.where(scale_inv == 0, 1.0, scale_inv)
        state["scale"] = 1.0 / scale_inv
        state["scale_inv"] = scale_inv


def update_jac_scale(problem: Problem, state: dict) -> None:
    """Keep the running maximum of the Jacobian column norms (``x_scale='jac'``)."""
    if problem.jac_scale:
        scale_inv = torch.maximum(column_norms(state), state["scale_inv"])
        state["scale"] = 1.0 / scale_inv
        state["scale_inv"] = scale_inv


def svd_width(problem: Problem, augmented: bool) -> int:
    """Number of singular values kept by :func:`linalg.factorize`."""
    if augmented or problem.m >= problem.n:
        return problem.n
    return problem.m


#: State keys holding a :class:`linalg.Factors` between ``build_model`` and ``propose_step``.
FACTOR_KEYS = tuple(f"fac_{name}" for name in Factors._fields)


def known_factors(state: dict) -> KnownFactors | None:
    """The stored factors of the rows of ``state`` that are not fresh (``factorize``'s ``known``).

    The loop builds a round's models on the fresh rows (a new Jacobian, or
    stopped); where most rows of a batch are fresh it builds them on every row
    and keeps the fresh rows' results alone (``loop.on_rows``). A row that is
    not fresh and still running had its last trial rejected: its Jacobian,
    scaling and residuals are those its stored factors were made from, so they
    need not be made again (and whatever is built on them is not kept). A row
    that stopped is factorised as before (its factors, NaN for a non-finite
    start, may decide a batch-wide path). None where no row is known, or the
    per-problem values are not on the host.
    """
    if "fresh" not in state or FACTOR_KEYS[0] not in state:
        return None
    fresh = host_value(state["fresh"])
    if type(fresh) is not np.ndarray or fresh.shape != (state["x"].shape[0],) or fresh.all():
        return None
    status = host_value(state["status"])
    if type(status) is not np.ndarray or status.shape != fresh.shape:
        return None
    known = ~fresh & (status == RUNNING)
    if not known.any():
        return None
    return KnownFactors(known, state["fac_s"], state["fac_V"], state["fac_uf"])


def alloc_factors(problem: Problem, state: dict, augmented: bool) -> None:
    """Placeholders for the factorisation of each problem (see :func:`linalg.factorize`).

    One float64 problem on the host (:attr:`~..host_scalars.Scalars.floats`) makes its
    zeros in numpy (:func:`host_zeros`: no torch factory operation per run).
    """
    x = state["x"]
    B, n = x.shape
    k = svd_width(problem, augmented)
    gram = None
    if problem.use_gram and problem.m >= n:
        # (no row on the Gram route yet, and none rejected by its test)
        gram = (x.new_zeros(B, n, n), x.new_zeros(B, n, n), x.new_zeros(B, n),
                torch.zeros(B, dtype=torch.bool, device=x.device),
                torch.zeros(B, dtype=torch.bool, device=x.device))
    hs = for_rows(x)
    store_factors(state, Factors(host_zeros(hs, x, B, k), host_zeros(hs, x, B, n, k),
                                 host_zeros(hs, x, B, k), *(gram or ())))


def host_zeros(hs: Scalars, like: Tensor, *shape: int) -> Tensor:
    """``like.new_zeros(shape)``; for one float64 problem on the host
    (:attr:`~..host_scalars.Scalars.floats`) the tensor of a numpy array of zeros,
    remembering it as its host rows (the same values, without a torch operation)."""
    if hs.floats and len(shape) >= 2:
        return hs.tensor_rows(np.zeros(shape))
    return like.new_zeros(*shape)


def store_factors(state: dict, fac: Factors) -> None:
    """Keep ``fac`` in ``state``, one tensor per field (so that compaction applies).

    Fields that are None (no Gram route) are not stored.
    """
    for key, value in zip(FACTOR_KEYS, fac, strict=True):
        if value is not None:
            state[key] = value


def load_factors(state: dict) -> Factors:
    """The :class:`linalg.Factors` kept by :func:`store_factors`."""
    return Factors(*(state[key] if key in state else None for key in FACTOR_KEYS))


def inf_norm(v: Tensor) -> Tensor:
    """Max-norm over the last axis (0 for empty vectors)."""
    return v.abs().amax(-1) if v.shape[-1] else v.new_zeros(v.shape[:-1])
