"""The one result builder: engine tensors to scipy's ``OptimizeResult``.

:func:`build_result` turns the engine's batch-first result tensors into a
:class:`BatchOptimizeResult` in the caller's array kind; ``least_squares``
returns the same fields for its one problem (``res[0]``, a plain
:class:`scipy.optimize.OptimizeResult`), built by :func:`build_one_result` without
the batch result, from the host values and rows its result tensors remember
(one float64 problem on the CPU: no torch operation per field).
``message`` and ``success`` come only from the status table of
:mod:`torchimize_scipy._engine.status`.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeResult

from ._arrays import Namespace, as_numpy
from ._engine import status as codes
from ._engine.host_scalars import host_rows, host_value

#: Result fields with a leading batch dimension, in the order of scipy's result.
ARRAY_FIELDS = ("x", "cost", "fun", "jac", "grad", "optimality", "active_mask", "nfev", "njev",
                "status", "success")


class BatchOptimizeResult(OptimizeResult):
    """Results of a batch of least-squares problems.

    scipy's field names with a leading batch dimension: ``x (B, n)``,
    ``cost (B,)``, ``fun (B, m)``, ``jac (B, m, n)``, ``grad (B, n)``,
    ``optimality (B,)``, ``active_mask (B, n)``, ``nfev (B,)``, ``njev (B,)``,
    ``status (B,)``, ``success (B,)`` and ``message`` (a list of B strings).
    ``len(res)`` is B and ``res[i]`` is the :class:`scipy.optimize.OptimizeResult`
    of problem ``i``.
    """

    def __len__(self) -> int:
        return len(self["message"])

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return super().__getitem__(key)
        i = operator.index(key)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"problem index {key} out of range for a batch of {len(self)}")
        res = OptimizeResult()
        for name in ARRAY_FIELDS:
            if name == "success":  # scipy's order: ..., status, message, success
                res["message"] = self["message"][i]
            value = super().__getitem__(name)
            if value is None:
                res[name] = None
                continue
            item = value[i, ...]  # also for array-API arrays, which need every axis named
            if name in ("cost", "optimality"):
                # (scipy's numpy scalar for numpy results; a 0-d tensor for torch ones)
                item = item.clone() if isinstance(item, torch.Tensor) else (
                    item[()] if isinstance(item, np.ndarray) else float(item))
            elif name in ("nfev", "njev", "status"):
                item = int(item)
            elif name == "success":
                item = bool(item)
            res[name] = item
        return res

    def __iter__(self) -> Iterator[OptimizeResult]:  # iterate over problems, not keys
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        status = np.asarray(as_numpy(self["status"]))
        cost = np.asarray(as_numpy(self["cost"]), dtype=float)
        counts = ", ".join(f"{int(s)}: {int((status == s).sum())}" for s in np.unique(status))
        q = np.quantile(cost, [0.0, 0.5, 1.0]) if cost.size else [np.nan] * 3
        ok = int(np.asarray(as_numpy(self["success"])).sum())
        return (f"BatchOptimizeResult(problems={len(self)}, success={ok}, "
                f"status counts {{{counts}}}, cost min/median/max = "
                f"{q[0]:.3e}/{q[1]:.3e}/{q[2]:.3e})")

    __str__ = __repr__


def build_result(out: dict[str, torch.Tensor], ns: Namespace, method: str, jac: Any,
                 bounded: bool) -> BatchOptimizeResult:
    """scipy's fields for every problem of the engine's output ``out``.

    As scipy: unbounded 'trf' (and our 'gn', 'gd', which share its
    conventions) reports ``active_mask`` as float zeros, and 'lm' reports
    ``njev = None`` unless ``jac`` is a callable. A missing ``J`` (not kept)
    gives ``jac = None``.
    """
    status = out["status"]
    active = out["active_mask"]
    if method in ("trf", "gn", "gd") and not bounded:
        active = active.to(out["x"].dtype)
    njev = None if (method == "lm" and not callable(jac)) else ns.to_user(out["njev"])
    return BatchOptimizeResult(
        x=ns.to_user(out["x"]), cost=ns.to_user(out["cost"]), fun=ns.to_user(out["f_true"]),
        jac=ns.to_user(out["J"]) if "J" in out else None, grad=ns.to_user(out["g"]),
        optimality=ns.to_user(out["optimality"]), active_mask=ns.to_user(active),
        nfev=ns.to_user(out["nfev"]), njev=njev, status=ns.to_user(status),
        success=ns.to_user(codes.success(status)), message=codes.messages(status.tolist()),
    )


#: the numpy scalar type of a numpy caller's ``cost`` and ``optimality`` per engine dtype
_NUMPY_SCALARS = {torch.float64: np.float64, torch.float32: np.float32,
                  torch.float16: np.float16}


def build_one_result(out: dict[str, torch.Tensor], ns: Namespace, method: str, jac: Any,
                     bounded: bool) -> OptimizeResult:
    """``build_result(out, ...)[0]`` for the output of one problem (``least_squares``).

    The same fields, values and types, read from the engine's ``(1, ...)``
    tensors directly (no batch result to index, no per-field
    batch-dimension conversions): arrays in the caller's kind, ``cost`` and
    ``optimality`` numpy scalars of the engine's dtype for a numpy caller (scipy's
    ``np.float64``), 0-d tensors for a torch caller, floats otherwise, counts ints;
    ``jac`` and ``grad`` are None where ``out`` holds no ``J`` or ``g``.
    """
    status = int(_item(out["status"]))
    x = _row(ns, out["x"])
    active = out["active_mask"]
    as_float = method in ("trf", "gn", "gd") and not bounded  # (scipy's zeros like x)
    if as_float and ns.kind != "numpy":
        active = active.to(out["x"].dtype)
    active = _row(ns, active)
    if as_float and ns.kind == "numpy":  # (numpy's cast of the host row: no torch operation)
        active = active.astype(x.dtype)
    if ns.kind == "torch":
        cost, optimality = out["cost"][0].clone(), out["optimality"][0].clone()
    elif ns.kind == "numpy":  # numpy scalars of the engine's dtype, as scipy's np.float64
        scalar = _NUMPY_SCALARS.get(out["cost"].dtype, np.float64)
        cost, optimality = scalar(_item(out["cost"])), scalar(_item(out["optimality"]))
    else:
        cost, optimality = float(_item(out["cost"])), float(_item(out["optimality"]))
    njev = None if (method == "lm" and not callable(jac)) else int(_item(out["njev"]))
    return OptimizeResult(
        x=x, cost=cost, fun=_row(ns, out["f_true"]),
        jac=_row(ns, out["J"]) if "J" in out else None,
        grad=_row(ns, out["g"]) if "g" in out else None,
        optimality=optimality, active_mask=active, nfev=int(_item(out["nfev"])),
        njev=njev, status=status, message=codes.message(status),
        success=bool(codes.success(status)))


def _item(t: torch.Tensor) -> Any:
    """``t.item()`` of a ``(1,)`` result: the host value the tensor remembers where it
    carries one (one problem's counts and codes, :func:`~._engine.loop.one_problem_slots`;
    the same number, no torch operation)."""
    v = host_value(t)
    if v is None:
        return t.item()
    return v.item() if isinstance(v, np.generic) else np.asarray(v).reshape(-1)[0].item()


def _row(ns: Namespace, t: torch.Tensor) -> Any:
    """``ns.to_user(t[0])`` of a ``(1, ...)`` result; for a numpy caller a copy of the host
    rows the tensor remembers where it carries them (the same values, a private array)."""
    if ns.kind == "numpy":
        rows = host_rows(t)
        if rows is not None:
            return rows[0].copy()
    return ns.to_user(t[0])
