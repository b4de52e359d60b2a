"""Where 'lm' computes its per-problem scalars: on the host when the tensors are on the CPU.

MINPACK's acceptance test, radius and damping updates and stopping tests
(:mod:`.steps.lm`) are a few dozen elementwise operations on ``(B,)``
values per trial. As torch operations on tiny tensors each costs a
dispatch (several microseconds on a CPU); as numpy operations on the same
memory (``Tensor.numpy()`` is a view on the CPU, ``torch.from_numpy`` wraps
the result without a copy) each costs a fraction of that. On other devices
the values stay tensors and never reach the host. The rule is written once,
against ``xp`` (``numpy`` or ``torch``: the elementwise functions used share
their names and IEEE semantics, so both give the same bits for ``+ - * /``,
comparisons, ``where``, ``minimum``/``maximum`` and ``amax``); reductions
that could round differently (norms, sums) stay torch operations, and so do
square roots: torch's float64 ``sqrt`` on this CPU is not correctly rounded
(one unit in the last place off for about 1 % of random values, measured
against numpy's and ``math.sqrt``, which agree), so a square root taken in
numpy would change results at rounding level.

One float64 problem (``least_squares``, ``curve_fit``) goes further: its
``(B,) = (1,)`` values become ``numpy.float64`` scalars (``numpy.bool_``,
``numpy.int64``) and ``xp`` is :class:`Floats`, whose ``where``/``minimum``/
``maximum`` choose with a Python conditional: an operation on a numpy scalar
costs a tenth of one on an array of one entry. Division by zero, overflow
and NaN behave as in numpy (``inf``/``nan``, warnings silenced by
:meth:`Scalars.quiet`); ``(1, n)`` values stay numpy arrays.

This is the same idea as the packed scalars of :mod:`.lsmr`
(``_Scalars``), and as the trust-region module's host scalars; a later
session may merge the three helpers.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: whether the scalars of CPU tensors live on the host (the tests turn it off to run the
#: same rule in torch on the CPU)
HOST_ON_CPU = True
#: attribute of a tensor made by :meth:`Scalars.tensor`: the host value it was made from
_HOST = "_tsc_host_value"
#: tensors of at most this many entries reach numpy through ``tolist``
_SMALL = 64
_NUMPY = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
          torch.bool: np.bool_, torch.int64: np.int64, torch.int32: np.int32}


class Floats:
    """``xp`` of one float64 problem: its ``(B,)`` values are numpy scalars.

    The functions also take numpy arrays (the ``(1, n)`` values), for which
    they are numpy's; on scalars they choose with a conditional, and
    ``minimum``/``maximum`` propagate NaN as numpy's do.
    """

    inf = math.inf

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        if isinstance(cond, np.ndarray):
            return np.where(cond, a, b)
        return a if cond else b

    @staticmethod
    def minimum(a: Any, b: Any) -> Any:
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return np.minimum(a, b)
        return a if (a <= b or a != a) else b

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return np.maximum(a, b)
        return a if (a >= b or a != a) else b



class Scalars:
    """The namespace of the per-problem scalars of the engine's tensors like ``x``.

    Parameters
    ----------
    x : Tensor, shape (B, n)
        A tensor of the engine: on the CPU the scalars live on the host
        (numpy arrays; numpy scalars for one float64 problem), on any other
        device they stay tensors.

    Attributes
    ----------
    host : bool
        The scalars are numpy values.
    xp : module or class
        ``numpy``, :class:`Floats` or ``torch``.
    """

    __slots__ = ("host", "one", "xp")

    def __init__(self, x: Tensor) -> None:
        self.host = HOST_ON_CPU and x.device.type == "cpu"
        self.one = self.host and x.shape[0] == 1 and x.dtype == torch.float64
        self.xp: Any = Floats if self.one else np if self.host else torch

    def view(self, *tensors: Tensor) -> tuple[Any, ...]:
        """The tensors as values of ``xp`` (on the CPU: values never written to).

        On the CPU, a tensor made by :meth:`tensor` or read before carries
        its host value and costs nothing; another one of a few entries is
        copied through
        ``tolist`` (exact, and cheaper than ``Tensor.numpy()``, whose four
        dispatched operations also cost more than stacking saves), a larger
        one is viewed without a copy. For one problem, ``(1,)`` tensors
        become numpy scalars.
        """
        if not self.host:
            return tensors
        out = []
        for t in tensors:
            value = getattr(t, _HOST, None)
            if value is None:
                size = t.numel()
                if size > _SMALL:
                    value = t.numpy()
                elif self.one and size == 1 and t.ndim == 1:  # a (1,) column
                    value = _NUMPY[t.dtype](t.tolist()[0])
                else:
                    value = np.array(t.tolist(), dtype=_NUMPY[t.dtype])
                # the engine never writes into its tensors (as counts.py relies on too)
                setattr(t, _HOST, value)
            out.append(value)
        return tuple(out)

    def tensor(self, *values: Any) -> tuple[Tensor, ...]:
        """Values of ``xp`` as tensors (on the CPU: the same memory, or a ``(1,)``
        tensor of a scalar; the tensor remembers the value for :meth:`view`)."""
        if not self.host:
            return values
        out = []
        for v in values:
            if isinstance(v, np.ndarray) and v.ndim:
                t = torch.from_numpy(v)
            else:  # a scalar (numpy's, or a Python number chosen by ``where``) or 0-d
                a = np.asarray(v)
                t = torch.from_numpy(a.reshape(1))
                v = a.dtype.type(v) if a.ndim == 0 else v
            setattr(t, _HOST, v)
            out.append(t)
        return tuple(out)

    def quiet(self) -> contextlib.AbstractContextManager:
        """Silence numpy's floating-point warnings (torch has none): the rule guards its
        divisions itself, and infinities or NaNs of a failed problem are expected."""
        return np.errstate(all="ignore") if self.host else contextlib.nullcontext()

    def amax(self, a: Any) -> Any:
        """Maximum along the last axis (exact, whatever the order): ``(B,)`` values."""
        if not self.host:
            return torch.amax(a, dim=-1)
        return a.max() if self.one else np.amax(a, axis=-1)
