"""Detection of dask inputs, without importing dask.

``batch_least_squares`` and ``batch_curve_fit`` ask :func:`has_dask` whether
any of their inputs is a dask collection and, if so, hand the call to
:mod:`torchimize_scipy.dask`, which builds a lazy graph of block fits. A dask
array can only exist once dask has been imported, so the check costs nothing
for everyone else and dask stays an optional dependency.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["dispatch", "has_dask"]


def has_dask(*objs: Any) -> bool:
    """True if an object, or an entry of a tuple, list, dict or Bounds, is a dask collection."""
    if "dask" not in sys.modules:
        return False
    from dask import is_dask_collection

    stack = [(obj, 0) for obj in objs]
    while stack:
        obj, depth = stack.pop()
        if is_dask_collection(obj):
            return True
        if depth >= 3:  # containers of containers of arrays at most (xdata tuples, bounds)
            continue
        if isinstance(obj, (tuple, list)) and len(obj) <= 1024:  # not a list of numbers
            stack.extend((e, depth + 1) for e in obj)
        elif isinstance(obj, dict):
            stack.extend((e, depth + 1) for e in obj.values())
        elif hasattr(obj, "lb") and hasattr(obj, "ub"):  # scipy.optimize.Bounds
            stack.extend(((obj.lb, depth + 1), (obj.ub, depth + 1)))
    return False


def dispatch(name: str, params: dict[str, Any]) -> Any:
    """Call the lazy ``torchimize_scipy.dask.<name>`` with a function's parameters.

    ``params`` is the ``locals()`` of the in-memory function at its first line;
    ``batch_curve_fit``'s ``**kwargs`` arrive as the entry ``'kwargs'``.
    """
    from . import dask as lazy

    params = dict(params)
    if name == "batch_curve_fit":
        params.update(params.pop("kwargs"))
    return getattr(lazy, name)(**params)
