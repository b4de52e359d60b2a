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
``sqrt``, comparisons, ``where``, ``minimum``/``maximum`` and ``amax``);
reductions that could round differently (norms) stay torch operations.

This is the same idea as the packed scalars of :mod:`.lsmr`
(``_Scalars``), and as the trust-region module's host scalars; a later
session may merge the three helpers.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: whether the scalars of CPU tensors live on the host (the tests turn it off to run the
#: same rule in torch on the CPU)
HOST_ON_CPU = True
#: attribute of a tensor made from a numpy array by :meth:`Scalars.tensor`: that array
_ARRAY = "_tsc_host_array"
#: tensors of at most this many entries reach numpy through ``tolist``
_SMALL = 64
_NUMPY = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
          torch.bool: np.bool_, torch.int64: np.int64, torch.int32: np.int32}


class Scalars:
    """The namespace of the per-problem scalars of tensors living on ``device``.

    Parameters
    ----------
    device : torch.device
        Device of the engine's tensors: the CPU puts the scalars on the host
        (numpy), any other device keeps them as tensors.

    Attributes
    ----------
    host : bool
        The scalars are numpy arrays.
    xp : module
        ``numpy`` or ``torch``.
    """

    __slots__ = ("host", "xp")

    def __init__(self, device: torch.device) -> None:
        self.host = HOST_ON_CPU and device.type == "cpu"
        self.xp: Any = np if self.host else torch

    def view(self, *tensors: Tensor) -> tuple[Any, ...]:
        """The tensors as values of ``xp`` (on the CPU: arrays never written to).

        On the CPU, a tensor made by :meth:`tensor` carries its array (the
        same memory) and costs nothing; the others of one dtype and shape
        (``(B,)`` columns) are stacked and cross as one array: a stack of a
        few entries is copied through ``tolist`` (exact, and cheaper than the
        operations ``Tensor.numpy()`` dispatches), a larger one is viewed
        without a copy.
        """
        if not self.host:
            return tensors
        out: list[Any] = [getattr(t, _ARRAY, None) for t in tensors]
        groups: dict[tuple, list[int]] = {}
        for k, t in enumerate(tensors):
            if out[k] is None:
                groups.setdefault((t.dtype, t.shape), []).append(k)
        for (dtype, _), ks in groups.items():
            t = tensors[ks[0]] if len(ks) == 1 else torch.stack([tensors[k] for k in ks])
            a = (np.array(t.tolist(), dtype=_NUMPY[dtype]) if t.numel() <= _SMALL
                 else t.numpy())
            if len(ks) == 1:
                out[ks[0]] = a
            else:
                for row, k in zip(a, ks, strict=True):
                    out[k] = row
        return tuple(out)

    def tensor(self, *values: Any) -> tuple[Tensor, ...]:
        """Values of ``xp`` as tensors (on the CPU: the same memory, which the tensor
        remembers for :meth:`view`)."""
        if not self.host:
            return values
        out = []
        for v in values:
            t = torch.from_numpy(v)
            setattr(t, _ARRAY, v)
            out.append(t)
        return tuple(out)

    def quiet(self) -> contextlib.AbstractContextManager:
        """Silence numpy's floating-point warnings (torch has none): the rule guards its
        divisions itself, and infinities or NaNs of a failed problem are expected."""
        return np.errstate(all="ignore") if self.host else contextlib.nullcontext()

    def amax(self, a: Any) -> Any:
        """Maximum along the last axis (exact, whatever the order)."""
        return np.amax(a, axis=-1) if self.host else torch.amax(a, dim=-1)
