"""Where :func:`~torchimize_scipy._engine.lsmr.lsmr` keeps its per-problem scalars.

Every scalar of LSMR's recurrences is one entry per problem, and the ~20
scalars are packed into one ``(K, B)`` array updated by a few vectorised
operations. With the vectors on the CPU the scalars live on the host as
numpy arrays (:class:`Scalars`): the norms of the vectors are read without
a copy, a numpy operation on a handful of values costs a fraction of a torch
operation's dispatch, and the stopping tests are decided every iteration at
no cost; a single float64 problem (``least_squares``) keeps them as
``numpy.float64`` scalars (:class:`FloatScalars`), cheaper still. On a GPU
they stay on the device as tensors and the loop asks the device whether any
problem is still running only every ``check_every`` iterations (one host
synchronisation each). The recurrence is written against ``xp``
(``numpy``, ``torch`` or :class:`Floats`), whose elementwise functions used
there share their names and semantics; :func:`sym_ortho`, the Givens
rotation, takes any of the three.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm

from .lsmr_vectors import sq_norms


def sym_ortho(a: Any, b: Any) -> tuple[Any, Any, Any]:
    """Givens rotation ``(c, s, r)`` with ``[c s; -s c] [a; b] = [r; 0]``, batched.

    ``r = hypot(a, b) >= 0`` (computed without overflow), ``c = a / r``,
    ``s = b / r``; ``a = b = 0`` gives ``c = s = r = 0``. ``b = 0`` gives
    ``(sign a, 0, |a|)`` and ``a = 0`` gives ``(0, sign b, |b|)``, as the
    stable rotation of S.-C. Choi ("Iterative methods for singular linear
    equations and least-squares problems", PhD thesis, Stanford 2006,
    SymOrtho), with which it agrees to rounding. ``a`` and ``b`` are torch
    tensors or numpy arrays (the host's scalars of :func:`~torchimize_scipy._engine.lsmr.lsmr`).
    """
    if isinstance(a, float):  # one problem's float64 scalars (numpy.float64 included)
        r = np.float64(math.hypot(a, b))
        safe = r if r != 0 else np.float64(1.0)
        return a / safe, b / safe, r
    xp = torch if isinstance(a, Tensor) else np
    r = xp.hypot(a, b)
    safe = xp.where(r == 0, 1.0, r)
    return a / safe, b / safe, r


class Floats:
    """The few elementwise functions of the recurrence for one problem's float scalars.

    Results stay ``numpy.float64`` (a ``float`` whose division by zero gives
    ``inf`` or ``nan``, under ``numpy.errstate``, instead of raising), and
    ``maximum``/``minimum`` propagate NaN as numpy's do.
    """

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return a if cond else b

    @staticmethod
    def sqrt(a: Any) -> np.float64:
        return np.float64(math.sqrt(a)) if a >= 0 else np.float64("nan")

    @staticmethod
    def abs(a: Any) -> Any:
        return abs(a)

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        return a if (a >= b or a != a) else b

    @staticmethod
    def minimum(a: Any, b: Any) -> Any:
        return a if (a <= b or a != a) else b

    @staticmethod
    def isfinite(a: Any) -> bool:
        return math.isfinite(a)

    @staticmethod
    def logical_not(a: Any) -> bool:
        return not a

    @staticmethod
    def stack(values: list) -> list:
        return list(values)


class FloatScalars:
    """:class:`Scalars` for one float64 problem on the CPU: ``numpy.float64`` scalars.

    An operation on a numpy scalar costs about a tenth of one on an array of
    one entry; the coefficients reach the vectors as Python numbers.
    """

    xp = Floats
    host = True

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def per_problem(self, value: Any) -> np.float64:
        if isinstance(value, Tensor):
            value = value.detach().reshape(-1)[0].item()
        return np.float64(np.asarray(value).reshape(-1)[0])

    def full(self, value: float) -> np.float64:
        return np.float64(value)

    def zeros_int(self) -> int:
        return 0

    def norm(self, w: np.ndarray) -> np.float64:
        return np.float64(math.sqrt(sq_norms(w)[0]))

    def inverse(self, a: Any) -> np.float64:
        return 1.0 / a if a > 0 else np.float64(1.0)

    def coef(self, a: Any) -> float:
        return float(a)

    def coefs(self, *cols: Any) -> tuple[float, ...]:
        return tuple(float(c) for c in cols)

    def mask(self, m: Any) -> np.ndarray:
        return np.array([[bool(m)]])

    def all(self, m: Any) -> bool:
        return bool(m)

    def any(self, m: Any) -> bool:
        return bool(m)

    def tensor(self, a: Any) -> Tensor:
        if isinstance(a, (bool, int, np.integer)):
            return torch.tensor([int(a)], dtype=torch.long)
        return torch.tensor([float(a)], dtype=self.dtype)


class Scalars:
    """Where LSMR keeps its per-problem scalars, and the conversions to the vectors.

    With the vectors on the CPU the scalars are numpy arrays ``(B,)`` on the
    host: an elementwise numpy operation on a few values costs a fraction of
    a torch operation's dispatch, the norms of the vectors are read without
    a copy, and every stopping test is decided on the host for free. On
    other devices they are ``(B,)`` tensors on the device (no host
    synchronisation but the periodic "all stopped?" check). The recurrence
    itself is written once, against ``xp`` (``numpy`` or ``torch``, whose
    elementwise functions used here share their names and semantics).
    """

    def __init__(self, host: bool, B: int, dtype: torch.dtype, device: torch.device) -> None:
        self.host, self.B, self.dtype, self.device = host, B, dtype, device
        self.xp: Any = np if host else torch
        self.np_dtype = torch.empty((), dtype=dtype).numpy().dtype if host else None

    def per_problem(self, value: Any) -> Any:
        """A float or a ``(B,)`` tensor as a ``(B,)`` array of the scalars' kind."""
        if self.host:
            if isinstance(value, Tensor):
                value = value.detach().cpu().numpy()
            return np.array(np.broadcast_to(np.asarray(value, dtype=self.np_dtype), (self.B,)))
        t = torch.as_tensor(value, dtype=self.dtype, device=self.device)
        return t.expand(self.B) if t.ndim == 0 else t

    def full(self, value: float) -> Any:
        if self.host:
            return np.full(self.B, value, dtype=self.np_dtype)
        return torch.full((self.B,), value, dtype=self.dtype, device=self.device)

    def zeros_int(self) -> Any:
        if self.host:
            return np.zeros(self.B, dtype=np.int64)
        return torch.zeros(self.B, dtype=torch.long, device=self.device)

    def norm(self, w: Any) -> Any:
        """Euclidean norms of the rows of ``w (B, k)`` (numpy on the host, else a tensor)."""
        if self.host:
            return np.sqrt(sq_norms(w))
        return vnorm(w, dim=-1)

    def inverse(self, a: Any) -> Any:
        """``1 / a`` where ``a > 0``, else 1 (normalising a vector only when it is nonzero)."""
        xp = self.xp
        pos = a > 0
        return xp.where(pos, 1.0 / xp.where(pos, a, 1.0), 1.0)

    def coef(self, a: Any) -> Any:
        """``(B, 1)`` array multiplying the rows of a batch of vectors (of the vectors' kind)."""
        return a[:, None] if self.host else a.unsqueeze(-1)

    def coefs(self, *cols: Any) -> tuple[Any, ...]:
        """``(B, 1)`` arrays of several coefficients."""
        if self.host:
            return tuple(c[:, None] for c in cols)
        return tuple(c.unsqueeze(-1) for c in cols)

    def mask(self, m: Any) -> Any:
        """``(B, 1)`` boolean array selecting rows of a batch of vectors."""
        return m[:, None] if self.host else m.unsqueeze(-1)

    def all(self, m: Any) -> bool:
        """Whether ``m`` holds everywhere, known without a device synchronisation.

        False on a device (unknown there): the caller then takes the general path.
        """
        return self.host and bool(m.all())

    def any(self, m: Any) -> bool:
        return bool(m.any())

    def tensor(self, a: Any) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)) if self.host else a
