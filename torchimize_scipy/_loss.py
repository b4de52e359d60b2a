r"""Robust loss functions for batched nonlinear least squares.

A robust least-squares problem minimises, for every problem of the batch,

.. math::

    F(x) = \frac{1}{2} \sum_{i=0}^{m-1} C^2 \rho\!\left(\left(f_i(x) / C\right)^2\right),

where :math:`f(x)` are the residuals, :math:`C > 0` is the soft margin
``f_scale`` and :math:`\rho(z)` is a scalar function of :math:`z = (f/C)^2`
with :math:`\rho(z) = z + O(z^2)` near zero, so that small residuals are
treated like ordinary least squares while large ones are down-weighted.

The built-in choices, with their first and second derivatives in :math:`z`,
are

* ``linear``:  :math:`\rho(z) = z` (standard least squares),
* ``soft_l1``: :math:`\rho(z) = 2(\sqrt{1 + z} - 1)`,
* ``huber``:   :math:`\rho(z) = z` for :math:`z \le 1`, else :math:`2\sqrt{z} - 1`,
* ``cauchy``:  :math:`\rho(z) = \log(1 + z)`,
* ``arctan``:  :math:`\rho(z) = \arctan(z)`.

These are the losses offered by :func:`scipy.optimize.least_squares`; the
formulas above are evaluated in the same algebraic form so that the results
agree with SciPy to rounding.

Scaling
-------
With :math:`\tilde\rho(f) = C^2 \rho((f/C)^2)` the derivatives with respect
to :math:`z` transform as :math:`\tilde\rho_0 = C^2 \rho_0`,
:math:`\tilde\rho_1 = \rho_1` and :math:`\tilde\rho_2 = \rho_2 / C^2`.

Gauss-Newton steps for a robust loss are obtained by solving an ordinary
least-squares subproblem with rescaled Jacobian and residuals (Triggs et al.,
"Bundle Adjustment - A Modern Synthesis", 1999, section 4.3; the same
rescaling is used by SciPy and Ceres Solver).  Writing
:math:`s = \tilde\rho_1 + 2\tilde\rho_2 f^2` (clipped below at the machine
epsilon so that the square root is real and nonzero),

.. math::

    \hat J = \sqrt{s}\, J, \qquad \hat f = \frac{\tilde\rho_1}{\sqrt{s}}\, f,

so that :math:`\hat J^T \hat f = J^T (\tilde\rho_1 f)` is the true gradient
of :math:`F` and :math:`\hat J^T \hat J` approximates its Hessian.

All public functions here are pure PyTorch, work on any device and floating
dtype, and never modify their inputs.

One problem on its floats
-------------------------
For one float64 problem with few residuals the engine evaluates a built-in
loss on its Python floats (:meth:`LossFunction.host_cost`,
:meth:`LossFunction.host_scaled_system`, called by ``_engine/problem.py``):
a torch operation on a row of a few entries costs its dispatch (several
microseconds), a Python float operation a few tens of nanoseconds. Each
loss's value and derivatives are written once against an operations
namespace: :class:`_TensorOps` (tensors) or :class:`_FloatOps` (lists of
floats), whose ``map`` applies an elementwise formula of ``+ - * /`` and
comparisons, written for either, in one pass. These operations are exact in
IEEE arithmetic; the square root, ``log1p``, ``arctan`` and the cost's sum
are torch's own kernels on the row (torch's float64 ``sqrt`` is not always
correctly rounded on this CPU, and its sum groups the terms its own way), so
both give the same values. The only powers are ``t**2`` (``t * t``) and
``t**-0.5``; ``t**-1.5`` is ``t**-0.5 / t``: torch's float64 ``pow`` by -1.5
on the CPU rounds differently in its vector lanes and in a tensor's scalar
tail, which would make a row's value depend on its place in a batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "LOSSES",
    "LossFunction",
    "arctan",
    "cauchy",
    "huber",
    "linear",
    "make_loss",
    "scale_for_robust_loss",
    "soft_l1",
]

#: A loss: ``z`` (the squared scaled residuals, any shape) to the ``(3, *z.shape)``
#: tensor of ``rho(z)``, ``rho'(z)`` and ``rho''(z)``.
RhoFn = Callable[[Tensor], Tensor]

#: The attribute of a ``z`` tensor that remembers ``1 + z`` (:func:`_one_plus`).
_ONE_PLUS_ATTR = "_torchimize_one_plus"
_MISSING = object()
#: Residual tensors of at most this many entries remember their ``z`` (torch's grain size).
_REMEMBER_UP_TO = 32768


def linear(z: Tensor) -> Tensor:
    """Linear loss ``rho(z) = z`` (ordinary least squares).

    ``z`` (squared scaled residuals, any shape) to ``(3, *z.shape)``: see :data:`RhoFn`.
    """
    return torch.stack([z, torch.ones_like(z), torch.zeros_like(z)])


def _one_plus(z: Tensor) -> Tensor:
    """``1 + z``; remembered on a ``z`` that :meth:`LossFunction._z` made (a loss's
    value and its derivatives at the same residuals share it)."""
    t = getattr(z, _ONE_PLUS_ATTR, _MISSING)
    if t is _MISSING:  # (a z of the caller's: nothing is remembered on it)
        return 1 + z
    if t is None:
        t = 1 + z
        setattr(z, _ONE_PLUS_ATTR, t)
    return t


class _TensorOps:
    """The losses' operations on tensors: torch's own (the reference values).

    ``map(fn, *rows)`` applies an elementwise formula of ``+ - * /`` and
    comparisons, written once for tensors and Python floats, to whole tensors.
    """

    sqrt = staticmethod(torch.sqrt)
    log1p = staticmethod(torch.log1p)
    arctan = staticmethod(torch.arctan)
    where = staticmethod(torch.where)
    ones_like = staticmethod(torch.ones_like)
    zeros_like = staticmethod(torch.zeros_like)
    one_plus = staticmethod(_one_plus)

    @staticmethod
    def map(fn: Callable[..., Tensor], *rows: Tensor) -> Tensor:
        return fn(*rows)

    @staticmethod
    def power(t: Tensor, p: float) -> Tensor:
        return t**p

    @staticmethod
    def at_least_eps(s: Tensor) -> Tensor:
        return torch.clamp(s, min=torch.finfo(s.dtype).eps)

    @staticmethod
    def scale_rows(J: Tensor, s: Tensor) -> Tensor:
        return J * s[..., None]


_TENSORS = _TensorOps()
_EPS64 = float(torch.finfo(torch.float64).eps)


def _kernel(fn: Callable[..., Tensor], row: list[float], *args: float) -> list[float]:
    """torch's ``fn`` on a float64 tensor of ``row``'s values (its own kernel: its
    values; a ``(m,)`` tensor runs the same loop as the tensor code's contiguous
    ``(1, m)`` row)."""
    return fn(torch.from_numpy(np.array(row, dtype=np.float64)), *args).tolist()


def _row_sum(t: Tensor) -> Tensor:
    return t.sum(dim=-1)


def _rsqrt(v: float) -> float:
    """torch's ``v**-0.5`` of one float: ``1 / sqrt(v)``, both correctly rounded."""
    if v > 0:
        return 1 / math.sqrt(v)
    if v == 0:
        return math.copysign(math.inf, v)
    return math.nan  # (negative or NaN)


class _FloatOps:
    """The losses' operations on one float64 problem's residuals as a list of Python
    floats, the same values as :class:`_TensorOps`' (see :meth:`LossFunction.host_cost`).

    A Python float is an IEEE double: ``+ - * /`` and comparisons give torch's
    values, and :meth:`map` evaluates a whole formula of them per entry in one
    pass (where a tensor takes one dispatched operation per step). torch
    evaluates ``t**2`` as ``t * t`` and ``t**-0.5`` as the reciprocal of the
    correctly rounded square root (``rsqrt``), as :func:`_rsqrt` does. The
    square root itself (MKL's on this CPU, not always correctly rounded),
    ``log1p``, ``arctan`` and other powers are torch's kernels on the row
    (:func:`_kernel`). One object per ``z``: it remembers ``1 + z``
    (:meth:`one_plus`). No division here has a zero divisor (``1 + z >= 1``,
    the scaling's root ``>= sqrt(eps)``), which would raise for floats.
    """

    __slots__ = ("_z", "_one_plus")

    def __init__(self) -> None:
        self._z: list[float] | None = None
        self._one_plus: list[float] = []

    @staticmethod
    def map(fn: Callable[..., float], *rows: list[float]) -> list[float]:
        return list(map(fn, *rows))

    @staticmethod
    def where(cond: list[bool], a: list[float], b: list[float]) -> list[float]:
        return [x if c else y for c, x, y in zip(cond, a, b, strict=True)]

    @staticmethod
    def ones_like(z: list[float]) -> list[float]:
        return [1.0] * len(z)

    @staticmethod
    def zeros_like(z: list[float]) -> list[float]:
        return [0.0] * len(z)

    def one_plus(self, z: list[float]) -> list[float]:
        if self._z is not z:
            self._z, self._one_plus = z, [1 + v for v in z]
        return self._one_plus

    @staticmethod
    def sqrt(row: list[float]) -> list[float]:
        return _kernel(torch.sqrt, row)

    @staticmethod
    def log1p(row: list[float]) -> list[float]:
        return _kernel(torch.log1p, row)

    @staticmethod
    def arctan(row: list[float]) -> list[float]:
        return _kernel(torch.arctan, row)

    @staticmethod
    def power(row: list[float], p: float) -> list[float]:
        if p == 2:
            return [v * v for v in row]
        if p == -0.5:
            sqrt = math.sqrt
            return [1 / sqrt(v) if v > 0 else _rsqrt(v) for v in row]
        return _kernel(torch.pow, row, p)

    @staticmethod
    def at_least_eps(row: list[float]) -> list[float]:
        return [_EPS64 if v < _EPS64 else v for v in row]  # (NaN kept, as by torch.clamp)

    @staticmethod
    def scale_rows(J: np.ndarray, s: list[float]) -> np.ndarray:
        # (J's rows as the array (1, m, n): one product, exact, as numpy's)
        return J * np.array(s, dtype=np.float64).reshape(1, -1, 1)


# the elementwise formulas of the losses (tensors or floats, see _TensorOps.map)
def _twice_less_one(s: Tensor) -> Tensor:
    return 2 * (s - 1)


def _twice_minus_one(s: Tensor) -> Tensor:
    return 2 * s - 1


def _at_most_one(z: Tensor) -> Tensor:
    return z <= 1


def _minus_half_over(r: Tensor, t: Tensor) -> Tensor:
    """``-0.5 t**-1.5`` from ``r = t**-0.5``: ``-0.5 * (r / t)``. Not ``t**-1.5``: torch's
    float64 ``pow`` on the CPU rounds differently in its vector lanes and in a tensor's
    scalar tail, so a row's value would depend on its place in a ``(B, m)`` tensor."""
    return -0.5 * (r / t)


def _reciprocal(t: Tensor) -> Tensor:
    return 1 / t


def _minus_reciprocal(t: Tensor) -> Tensor:
    return -1 / t


def _one_plus_value(v: Tensor) -> Tensor:
    return 1 + v


def _arctan_second(z: Tensor, t2: Tensor) -> Tensor:
    return -2 * z / t2


def _soft_l1_value(z: Tensor, ops: Any = _TENSORS) -> Tensor:
    root = ops.sqrt(ops.one_plus(z))
    if ops is _TENSORS and z.dtype != torch.float64:
        # float32: 2 (sqrt(1 + z) - 1) cancels where z is small against 1 (a relative
        # error of eps / z: a cost off by half at f_scale = 100); 2 z / (sqrt(1 + z) + 1)
        # is the same value without the cancellation (float64 keeps scipy's formula)
        return 2 * z / (root + 1)
    return ops.map(_twice_less_one, root)


def _soft_l1_derivatives(z: Tensor, ops: Any = _TENSORS) -> tuple[Tensor, Tensor]:
    t = ops.one_plus(z)
    r = ops.power(t, -0.5)
    return r, ops.map(_minus_half_over, r, t)


def _soft_l1_parts(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return (_soft_l1_value(z), *_soft_l1_derivatives(z))


def soft_l1(z: Tensor) -> Tensor:
    """Smooth approximation of the l1 loss, ``rho(z) = 2 (sqrt(1 + z) - 1)``.

    ``z`` (squared scaled residuals, any shape) to ``(3, *z.shape)``: see :data:`RhoFn`.
    """
    return torch.stack(_soft_l1_parts(z))


def _huber_value(z: Tensor, ops: Any = _TENSORS) -> Tensor:
    inner = ops.map(_at_most_one, z)
    # the outer branch on a safe argument, so that neither the values nor autograd
    # through ``torch.where`` produce inf/nan on the inner side
    outer = ops.map(_twice_minus_one, ops.sqrt(ops.where(inner, ops.ones_like(z), z)))
    return ops.where(inner, z, outer)


def _huber_derivatives(z: Tensor, ops: Any = _TENSORS) -> tuple[Tensor, Tensor]:
    inner = ops.map(_at_most_one, z)
    zo = ops.where(inner, ops.ones_like(z), z)  # (see _huber_value)
    r = ops.power(zo, -0.5)
    return (ops.where(inner, ops.ones_like(z), r),
            ops.where(inner, ops.zeros_like(z), ops.map(_minus_half_over, r, zo)))


def _huber_parts(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return (_huber_value(z), *_huber_derivatives(z))


def huber(z: Tensor) -> Tensor:
    """Huber loss, ``rho(z) = z`` if ``z <= 1`` else ``2 sqrt(z) - 1``.

    ``z`` (squared scaled residuals, any shape) to ``(3, *z.shape)``: see :data:`RhoFn`.
    """
    return torch.stack(_huber_parts(z))


def _cauchy_value(z: Tensor, ops: Any = _TENSORS) -> Tensor:
    return ops.log1p(z)


def _cauchy_derivatives(z: Tensor, ops: Any = _TENSORS) -> tuple[Tensor, Tensor]:
    t = ops.one_plus(z)
    return ops.map(_reciprocal, t), ops.map(_minus_reciprocal, ops.power(t, 2))


def _cauchy_parts(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return (_cauchy_value(z), *_cauchy_derivatives(z))


def cauchy(z: Tensor) -> Tensor:
    """Cauchy loss, ``rho(z) = log(1 + z)``.

    ``z`` (squared scaled residuals, any shape) to ``(3, *z.shape)``: see :data:`RhoFn`.
    """
    return torch.stack(_cauchy_parts(z))


def _arctan_value(z: Tensor, ops: Any = _TENSORS) -> Tensor:
    return ops.arctan(z)


def _arctan_derivatives(z: Tensor, ops: Any = _TENSORS) -> tuple[Tensor, Tensor]:
    t = ops.map(_one_plus_value, ops.power(z, 2))
    return ops.map(_reciprocal, t), ops.map(_arctan_second, z, ops.power(t, 2))


def _arctan_parts(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return (_arctan_value(z), *_arctan_derivatives(z))


def arctan(z: Tensor) -> Tensor:
    """Arctangent loss, ``rho(z) = arctan(z)``.

    ``z`` (squared scaled residuals, any shape) to ``(3, *z.shape)``: see :data:`RhoFn`.
    """
    return torch.stack(_arctan_parts(z))


LOSSES: dict[str, RhoFn] = {
    "linear": linear,
    "soft_l1": soft_l1,
    "huber": huber,
    "cauchy": cauchy,
    "arctan": arctan,
}

#: The built-in losses' value ``rho(z)`` alone and their three parts, as the same
#: operations as the public functions (so the same values, bit for bit), without
#: the stacking and the derivatives a cost does not need.
_VALUE: dict[RhoFn, Callable[..., Tensor]] = {
    soft_l1: _soft_l1_value, huber: _huber_value, cauchy: _cauchy_value, arctan: _arctan_value,
}
_PARTS: dict[RhoFn, Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]] = {
    soft_l1: _soft_l1_parts, huber: _huber_parts, cauchy: _cauchy_parts,
    arctan: _arctan_parts,
}
#: The built-in losses' two derivatives alone (the second and third of their parts: the
#: parts call these functions): what the scaling of ``J`` and ``f`` needs.
_DERIVATIVES: dict[RhoFn, Callable[..., tuple[Tensor, Tensor]]] = {
    soft_l1: _soft_l1_derivatives, huber: _huber_derivatives, cauchy: _cauchy_derivatives,
    arctan: _arctan_derivatives,
}
#: The attribute of a residual tensor that remembers its ``z`` (:meth:`LossFunction._z`).
_Z_ATTR = "_torchimize_loss_z"
#: ... and its host array of ``z`` for one problem (:meth:`LossFunction._host_z`).
_Z_HOST_ATTR = "_torchimize_loss_host_z"

#: Built-in losses whose ``rho`` is non-negative and infinite or NaN at a non-finite
#: ``z``: a finite cost proves every residual finite (not ``arctan``, bounded).
_COST_PROVES_FINITE = frozenset({soft_l1, huber, cauchy})


def _as_rho(out: Tensor | tuple | list, z: Tensor) -> Tensor:
    """Normalise the output of a (user) loss callable to a ``(3, *z.shape)`` tensor."""
    if not isinstance(out, Tensor):
        out = torch.stack([torch.as_tensor(r, dtype=z.dtype, device=z.device) for r in out])
    if out.shape != (3, *z.shape):
        raise ValueError(
            f"The loss callable must return an array of shape (3, *z.shape) = "
            f"{(3, *z.shape)}, got {tuple(out.shape)}."
        )
    return out


class LossFunction:
    """A robust loss ``rho`` with soft margin ``f_scale`` applied to residuals.

    Parameters
    ----------
    rho_fn : callable
        Maps ``z`` of shape ``(B, m)`` to a tensor of shape ``(3, B, m)`` holding
        ``rho(z)``, ``rho'(z)`` and ``rho''(z)``.  A tuple/list of three tensors
        is accepted too.
    f_scale : float or Tensor
        Soft margin between inlier and outlier residuals.  Either a scalar
        or a tensor of shape ``(B,)`` (one margin per problem).

    Notes
    -----
    With ``z = (f / f_scale)**2`` the cost is
    ``0.5 * f_scale**2 * sum(rho(z))`` and the derivative array returned by
    :meth:`rho` is rescaled to derivatives of ``f_scale**2 * rho(z)`` with
    respect to ``f**2``.
    """

    def __init__(self, rho_fn: RhoFn, f_scale: float | Tensor = 1.0) -> None:
        self.rho_fn = rho_fn
        self.f_scale = f_scale

    @property
    def cost_proves_finite(self) -> bool:
        """Whether a finite :meth:`cost` of a problem proves each of its residuals finite.

        True for the built-in losses whose ``rho`` grows without bound
        (``soft_l1``, ``huber``, ``cauchy``): a non-finite residual makes the
        cost infinite or NaN. ``arctan`` is bounded, and nothing is known of a
        callable.
        """
        return self.rho_fn in _COST_PROVES_FINITE

    def _scale(self, f: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """Return ``f_scale`` shaped for element-wise use and for per-problem use."""
        c = self.f_scale
        if isinstance(c, Tensor):
            c = c.to(device=f.device)
            if c.ndim == 1:
                return c[:, None], c
        return c, c

    def _z(self, f: Tensor) -> tuple[Tensor, Tensor | float, Tensor | float]:
        """``z = (f / f_scale)**2`` and the two shapes of ``f_scale`` (:meth:`_scale`).

        ``z`` is remembered on ``f`` (the engine never modifies a residual tensor
        in place), unless ``f`` requires grad or holds more than
        :data:`_REMEMBER_UP_TO` entries (where an operation costs more than
        its call, and two more copies of ``f`` would cost memory): the cost of a trial and the
        scaling of ``J`` and ``f`` at the point it is accepted share one ``z``
        (and ``1 + z``, :func:`_one_plus`). The square is a product
        (``torch.pow(x, 2)`` computes ``x * x``: the same values, one cheaper call).
        """
        c_elem, c_prob = self._scale(f)
        # (autograd's graphs are never shared; large batches keep no extra copies)
        remember = f.numel() <= _REMEMBER_UP_TO and not f.requires_grad
        if remember:
            known = getattr(f, _Z_ATTR, None)
            if known is not None and known[0] is self:
                return known[1], c_elem, c_prob
        q = f if isinstance(c_elem, float) and c_elem == 1.0 else f / c_elem  # (f / 1 is f)
        z = q * q
        if remember:
            setattr(f, _Z_ATTR, (self, z))
            setattr(z, _ONE_PLUS_ATTR, None)  # (marks z as this class's: see _one_plus)
        return z, c_elem, c_prob

    def _rho_unscaled(self, f: Tensor) -> tuple[Tensor, Tensor | float, Tensor | float]:
        z, c_elem, c_prob = self._z(f)
        return _as_rho(self.rho_fn(z), z), c_elem, c_prob

    def cost(self, f: Tensor) -> Tensor:
        """Robust cost of each problem: residuals ``f (B, m)`` to
        ``0.5 * f_scale**2 * sum(rho(z), axis=-1)``, shape ``(B,)``."""
        value = _VALUE.get(self.rho_fn)
        if value is None:
            rho0 = self._rho_unscaled(f)[0][0]
            c_prob = self._scale(f)[1]
        else:  # (a built-in loss: its value alone, the same operations)
            z, _, c_prob = self._z(f)
            rho0 = value(z)
        return 0.5 * c_prob**2 * rho0.sum(dim=-1)

    def rho(self, f: Tensor) -> Tensor:
        """Scaled loss values and derivatives: residuals ``f (B, m)`` to the
        ``(3, B, m)`` tensor of ``f_scale**2 * rho(z)``, ``rho'(z)`` and
        ``rho''(z) / f_scale**2``."""
        parts = _PARTS.get(self.rho_fn)
        if parts is None:
            rho, c_elem, _ = self._rho_unscaled(f)
            rho0, rho1, rho2 = rho.unbind(0)
        else:  # (a built-in loss: its three parts, stacked once below)
            z, c_elem, _ = self._z(f)
            rho0, rho1, rho2 = parts(z)
        c2 = c_elem**2
        if isinstance(c2, float) and c2 == 1.0:  # (x * 1 and x / 1 are x exactly)
            return torch.stack([rho0, rho1, rho2])
        return torch.stack([rho0 * c2, rho1, rho2 / c2])

    def derivatives(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """The second and third of :meth:`rho`'s parts, ``rho'(z)`` and
        ``rho''(z) / f_scale**2``, without the loss's value (the same values)."""
        derivatives = _DERIVATIVES.get(self.rho_fn)
        if derivatives is None:
            _, rho1, rho2 = self.rho(f).unbind(0)
            return rho1, rho2
        z, c_elem, _ = self._z(f)
        rho1, rho2 = derivatives(z)
        c2 = c_elem**2
        if isinstance(c2, float) and c2 == 1.0:  # (x / 1 is x exactly)
            return rho1, rho2
        return rho1, rho2 / c2

    def scaled_system(self, J: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`scale_for_robust_loss` of ``J`` and ``f`` with this loss (from
        :meth:`derivatives`: the loss's value is not evaluated)."""
        return _scale_system(J, f, *self.derivatives(f))

    # ------------------------------------------------------------ one problem on the host
    @property
    def host_capable(self) -> bool:
        """Whether :meth:`host_cost` and :meth:`host_scaled_system` serve this loss: a
        built-in ``rho`` and a scalar ``f_scale`` (a callable's ``rho`` takes tensors)."""
        return self.rho_fn in _DERIVATIVES and not isinstance(self.f_scale, Tensor)

    def _host_z(self, f: Tensor, f_row: list[float]) -> tuple[list[float], _FloatOps]:
        """:meth:`_z` of one problem's residuals ``f`` from their values ``f_row``,
        with the :class:`_FloatOps` that remembers ``1 + z``; both remembered on
        ``f``."""
        known = getattr(f, _Z_HOST_ATTR, None)
        if known is not None and known[0] is self:
            return known[1], known[2]
        c = self.f_scale
        q = f_row if c == 1.0 else [v / c for v in f_row]  # (f / 1 is f)
        z = [v * v for v in q]
        ops = _FloatOps()
        setattr(f, _Z_HOST_ATTR, (self, z, ops))
        return z, ops

    def host_cost(self, f: Tensor, f_row: list[float]) -> float:
        """:meth:`cost` of one float64 problem (``B = 1``, :attr:`host_capable`, no
        autograd) from the values ``f_row`` of its residuals ``f``, as a float:
        the same operations on Python floats, torch's kernels where those would
        round differently (:class:`_FloatOps`) and torch's sum (its own grouping
        of the terms), so the same value."""
        z, ops = self._host_z(f, f_row)
        rho0 = _VALUE[self.rho_fn](z, ops)
        total = _kernel(_row_sum, rho0)
        return 0.5 * self.f_scale**2 * total

    def host_scaled_system(self, f: Tensor, f_row: list[float],
                           J_h: np.ndarray) -> tuple[np.ndarray, list[float]]:
        """:meth:`scaled_system` of one float64 problem (as :meth:`host_cost`) from
        the values ``f_row`` of its residuals ``f`` and the host array ``J_h
        (1, m, n)`` of its Jacobian: the scaled Jacobian's array and residuals."""
        z, ops = self._host_z(f, f_row)
        rho1, rho2 = _DERIVATIVES[self.rho_fn](z, ops)
        c2 = self.f_scale**2
        if c2 != 1.0:  # (x / 1 is x exactly)
            rho2 = [v / c2 for v in rho2]
        return _scale_system(J_h, f_row, rho1, rho2, ops)

    def __call__(self, f: Tensor, cost_only: bool = False) -> Tensor:
        """Return :meth:`cost` if ``cost_only`` else :meth:`rho`."""
        return self.cost(f) if cost_only else self.rho(f)

    def __repr__(self) -> str:
        name = getattr(self.rho_fn, "__name__", repr(self.rho_fn))
        return f"LossFunction({name}, f_scale={self.f_scale!r})"


def make_loss(loss: str | RhoFn, f_scale: float | Tensor = 1.0) -> LossFunction | None:
    """Build the loss object used by the solvers.

    Parameters
    ----------
    loss : str or callable
        One of ``'linear'``, ``'soft_l1'``, ``'huber'``, ``'cauchy'``,
        ``'arctan'``, or a torch callable mapping ``z`` (shape ``(B, m)``) to
        an array of shape ``(3, B, m)`` with ``rho(z)`` and its first two
        derivatives.
    f_scale : float or Tensor
        Soft margin (scalar, or shape ``(B,)``).

    Returns
    -------
    LossFunction or None
        ``None`` for the ``'linear'`` loss, meaning the plain cost
        ``0.5 * sum(f**2)`` should be used without rescaling.
    """
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {sorted(LOSSES)} or a callable.")
        if loss == "linear":
            return None
        return LossFunction(LOSSES[loss], f_scale)
    if callable(loss):
        return LossFunction(loss, f_scale)
    raise ValueError(f"`loss` must be one of {sorted(LOSSES)} or a callable.")


def scale_for_robust_loss(J: Tensor, f: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale Jacobian and residuals so that a robust loss becomes least squares.

    Parameters
    ----------
    J : Tensor
        Jacobians, shape ``(B, m, n)``.
    f : Tensor
        Residuals, shape ``(B, m)``.
    rho : Tensor
        Scaled loss derivatives from :meth:`LossFunction.rho`, shape ``(3, B, m)``.

    Returns
    -------
    J_scaled : Tensor
        ``sqrt(s)[..., None] * J`` with ``s = max(rho1 + 2 rho2 f**2, eps)``.
    f_scaled : Tensor
        ``f * rho1 / sqrt(s)``.

    Notes
    -----
    New tensors are returned; the inputs are not modified.  ``eps`` is the
    machine epsilon of the dtype of ``s``.
    """
    return _scale_system(J, f, rho[1], rho[2])


def _scale_system(J: Tensor, f: Tensor, rho1: Tensor, rho2: Tensor,
                  ops: Any = _TENSORS) -> tuple[Tensor, Tensor]:
    """:func:`scale_for_robust_loss` from the loss's two derivatives (tensors, or one
    problem's floats with :class:`_FloatOps`)."""
    s = ops.sqrt(ops.at_least_eps(ops.map(_gauss_newton_weight, rho1, rho2, f)))
    return ops.scale_rows(J, s), ops.map(_scaled_residual, f, rho1, s)


def _gauss_newton_weight(rho1: Tensor, rho2: Tensor, f: Tensor) -> Tensor:
    return rho1 + 2 * rho2 * (f * f)  # (f**2 is f * f)


def _scaled_residual(f: Tensor, rho1: Tensor, root: Tensor) -> Tensor:
    return f * (rho1 / root)
