r"""Gradients through the solution: implicit differentiation of a least-squares fit.

At a local minimum :math:`x^*(\theta)` of :math:`F(x, \theta)` the gradient
:math:`g = \nabla_x F` vanishes for every :math:`\theta` nearby, so by the
implicit function theorem

.. math::

    \frac{\partial x^*}{\partial \theta} = -H^{-1} \frac{\partial g}{\partial \theta},
    \qquad H = \nabla_x^2 F(x^*, \theta),

with :math:`H` the full Hessian of the cost (second-order residual terms and
the robust loss's curvature included), not its Gauss-Newton approximation
:math:`J^T J` (Dontchev and Rockafellar, "Implicit Functions and Solution
Mappings", 2009; the same adjoint is optimistix's ``ImplicitAdjoint`` and
jaxopt's ``custom_root``, Blondel et al., "Efficient and Modular Implicit
Differentiation", NeurIPS 2022). A vector-Jacobian product needs one linear
solve per problem, :math:`H \lambda = v`, and then the product
:math:`-\lambda^T \partial g / \partial \theta`, which reverse-mode autograd
does through the graph of :math:`g`.

How it is built (:func:`attach`). The solve runs detached, as always. After
it, at the returned :math:`x^*`, the residuals are evaluated once more with
autograd on, :math:`g(x^*, \theta)` is formed with ``create_graph=True``, so
that it is a differentiable function of every tensor ``fun`` uses (passed in
``args``/``kwargs``, captured, parameters of an ``nn.Module``) without naming
them, and the returned solution is ``x* + S(g)``, where ``S``
(:class:`_ImplicitStep`) returns zeros and, in the backward pass, maps the
incoming gradient :math:`v` to :math:`-H^{-1} v`. ``H`` is built only then,
per problem, from ``n`` Hessian-vector products of the summed gradient (the
problems are independent, so one product gives one column of every
problem's block), and solved through a batched ``(B, n, n)`` symmetric
eigendecomposition: never a ``(B n)^2`` matrix. ``fun`` and ``cost`` are the
engine's values plus a zero-valued differentiable term: the residuals
re-evaluated at ``x* + S(g)``, so their gradients are total derivatives
(for ``cost``, the envelope theorem's :math:`\partial F / \partial \theta`
plus the vanishing :math:`g \cdot \partial x^*/\partial\theta`).

Cases:

* Active bounds (``active_mask != 0``): those variables have zero
  derivative; the free ones are differentiated on the reduced system
  :math:`H_{ff}` (the active constraints hold for nearby :math:`\theta`).
* A singular or indefinite :math:`H_{ff}`: the minimum-norm solution
  (pseudo-inverse; eigenvalues below ``10 n eps`` times the largest are
  dropped) and a ``RuntimeWarning``.
* A problem that did not succeed (status 0, -1, -2, 5, 6) or whose solution or
  Hessian is not finite: NaN in its gradient rows, with a ``RuntimeWarning``
  (rows whose incoming gradient is zero, e.g. masked out by the caller, stay
  zero).
* Higher-order gradients: a backward pass with ``create_graph=True`` through
  ``S`` raises a ``RuntimeError`` (:data:`HIGHER_ORDER`) rather than return a
  second derivative that would miss the Hessian's own dependence. ``torch.func`` transforms
  cannot trace the solver (it reads values on the host) and raise too.

Nothing of this runs when grad mode is off or no tensor that ``fun`` uses
requires grad (:func:`requested`): the call costs what it cost before.
"""

from __future__ import annotations

import threading
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._engine import status as codes
from ._loss import LOSSES, LossFunction

__all__ = ["GradProbe", "attach", "check_numpy_error", "evaluating", "requested",
           "solve_adjoint"]

_STATE = threading.local()


def evaluating() -> bool:
    """True while :func:`attach` evaluates the residuals (after the solve).

    Wrappers that count evaluations against a budget (``curve_fit``'s MINPACK
    bookkeeping) skip these: they are not part of the solve.
    """
    return getattr(_STATE, "depth", 0) > 0

#: Eigenvalues of H at or below ``RTOL_FACTOR * n * eps * max|eig|`` count as zero.
RTOL_FACTOR = 10.0

HIGHER_ORDER = (
    "Higher-order gradients through a least-squares solution are not supported: the "
    "implicit derivative is first order (the Hessian's own dependence on the inputs is "
    "not tracked). Call backward/autograd.grad without create_graph=True."
)

_NUMPY_MESSAGE = (
    "Gradients through the solution need `fun` written with torch operations: {what}. "
    "Pass `x0` as a torch tensor and compute the residuals with torch on the tensors "
    "`fun` receives, or detach the tensors (`.detach()`) if no gradient is wanted."
)


# ---------------------------------------------------------------- detection
def _holds_grad(obj: Any, depth: int = 0) -> bool:
    """Whether ``obj`` is (or holds, in a container or module) a tensor that requires grad."""
    if isinstance(obj, Tensor):
        return obj.requires_grad
    if isinstance(obj, torch.nn.Module):
        return any(p.requires_grad for p in obj.parameters())
    if depth > 2:
        return False
    if isinstance(obj, (list, tuple)):
        return any(_holds_grad(a, depth + 1) for a in obj)
    if isinstance(obj, dict):
        return any(_holds_grad(a, depth + 1) for a in obj.values())
    return False


def _captures_grad(fn: Any, depth: int = 0) -> bool:
    """Whether a function reaches a grad-requiring tensor or module it did not receive.

    Looks, without calling anything, at an ``nn.Module`` (its parameters), a
    bound method's object, a ``functools.partial``'s arguments, and a plain
    function's closure cells and the module globals its code names, following
    functions found there two levels deep.
    """
    if depth > 2 or fn is None:
        return False
    if isinstance(fn, torch.nn.Module):
        return _holds_grad(fn)
    if isinstance(fn, types.MethodType):
        return _holds_grad(fn.__self__) or _captures_grad(fn.__func__, depth + 1)
    partial_fn = getattr(fn, "func", None)
    if partial_fn is not None and hasattr(fn, "args") and hasattr(fn, "keywords"):
        return (_holds_grad(fn.args) or _holds_grad(fn.keywords)
                or _captures_grad(partial_fn, depth + 1))
    code = getattr(fn, "__code__", None)
    if code is None:
        if callable(fn) and not isinstance(fn, type):  # an object with __call__
            return (_holds_grad(getattr(fn, "__dict__", {}))
                    or _captures_grad(type(fn).__call__, depth + 1))
        return False
    seen: list[Any] = [c.cell_contents for c in (fn.__closure__ or ())
                       if _cell_filled(c)]
    glb = getattr(fn, "__globals__", {})
    seen += [glb[name] for name in code.co_names if name in glb]
    seen += list(fn.__defaults__ or ())
    for obj in seen:
        if _holds_grad(obj):
            return True
        if (isinstance(obj, (types.FunctionType, types.MethodType))
                and _captures_grad(obj, depth + 1)):
            return True
    return False


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


class GradProbe:
    """Wraps ``fun`` and records whether a returned tensor required grad.

    Costs one attribute read per call; the frontends keep it for the first
    evaluation only (under ``torch.vmap`` the flag is not visible, which
    :func:`requested`'s look at ``fun``'s captured objects covers).
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.seen_grad = False
        self.seen_tensor = False
        self.seen_other = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            out = self.fn(*args, **kwargs)
        except RuntimeError as exc:
            check_numpy_error(exc)
            raise
        if isinstance(out, Tensor):
            self.seen_tensor = True
            self.seen_grad = self.seen_grad or out.requires_grad
        else:
            self.seen_other = True
        return out


def check_numpy_error(exc: BaseException) -> None:
    """Turn torch's error for ``.numpy()`` on a grad-requiring tensor into ours."""
    if isinstance(exc, RuntimeError) and "numpy() on Tensor that requires grad" in str(exc):
        raise ValueError(_NUMPY_MESSAGE.format(
            what="it converted a tensor that requires grad to numpy")) from exc


def requested(ns: Any, fun: Callable, args: Any, kwargs: Any, f_scale: Any,
              loss: Any, first_out: Any = None, probe: GradProbe | None = None) -> bool:
    """Whether the returned solution must carry gradients, checked at no cost.

    True when grad mode is on, the caller works in torch, and ``fun``
    depends on a tensor that requires grad: one in ``args``/``kwargs`` or
    ``f_scale``, one ``fun`` captures or holds (module parameters), or one
    its first result was computed from (``first_out`` or ``probe``). Raises a
    ``ValueError`` when such tensors meet numpy: a numpy ``x0`` (numpy
    results cannot carry gradients), or a ``fun`` returning numpy although
    its inputs require grad; and for a grad-requiring ``f_scale`` with a
    callable ``loss`` (whose derivatives in ``f_scale`` are unknown).
    """
    if not torch.is_grad_enabled():
        return False
    inputs = _holds_grad(args) or _holds_grad(kwargs)
    scale_grad = isinstance(f_scale, Tensor) and f_scale.requires_grad
    out_grad = (isinstance(first_out, Tensor) and first_out.requires_grad) or (
        probe is not None and probe.seen_grad)
    if ns.kind != "torch":
        if inputs or out_grad or scale_grad:
            raise ValueError(_NUMPY_MESSAGE.format(
                what="`x0` is not a torch tensor, so the results are not either, but "
                     "`fun` uses tensors that require grad"))
        return False
    returned_other = (first_out is not None and not isinstance(first_out, Tensor)) or (
        probe is not None and probe.seen_other and not probe.seen_tensor)
    if inputs and returned_other:
        raise ValueError(_NUMPY_MESSAGE.format(
            what="`args`/`kwargs` hold tensors that require grad, but `fun` returned "
                 "a non-tensor result"))
    if scale_grad and callable(loss):
        raise ValueError("A callable `loss` cannot be differentiated in `f_scale`: "
                         "use a built-in loss, or pass `f_scale` detached.")
    return inputs or scale_grad or out_grad or _captures_grad(fun)


# ---------------------------------------------------------------- the cost
def _differentiable_cost(f: Tensor, loss: LossFunction | None) -> Tensor:
    """``F`` per problem from residuals ``f (B, m)``, differentiable twice.

    Built-in losses are torch code, so autograd sees their exact curvature
    (and a grad-requiring ``f_scale``). A callable loss gives only its values
    and two derivatives at a point, so it is replaced by its second-order
    Taylor expansion around the (detached) current residuals: the same value
    of the gradient and the same Hessian at that point, which is all the
    implicit derivative needs.
    """
    if loss is None:
        return 0.5 * (f * f).sum(-1)
    if loss.rho_fn in LOSSES.values():
        return loss.cost(f)
    f0 = f.detach()
    with torch.no_grad():
        rho = loss.rho(f0)  # (3, B, m): value, d/d(f^2), d2/d(f^2)^2
    a = rho[1] * f0  # dF/df
    b = rho[1] + 2 * rho[2] * f0 * f0  # d2F/df2
    d = f - f0
    return (a * d + 0.5 * b * d * d).sum(-1)


# ---------------------------------------------------------------- the adjoint
def _ok_rows(status: Tensor, x: Tensor) -> Tensor:
    """Problems whose gradient is defined: a successful status and a finite solution."""
    return codes.success(status) & torch.isfinite(x).all(-1)


def solve_adjoint(H: Tensor, v: Tensor, free: Tensor, ok: Tensor) -> tuple[Tensor, dict]:
    """Minimum-norm solutions of ``H_ff lam_f = v_f`` per problem, ``lam_a = 0``.

    Parameters
    ----------
    H : Tensor
        Hessians, ``(B, n, n)`` (symmetrised here).
    v : Tensor
        Right-hand sides, ``(B, n)``.
    free : Tensor
        ``(B, n)`` bool, False for variables held at an active bound.
    ok : Tensor
        ``(B,)`` bool, False for problems without a defined gradient: their
        rows are NaN unless ``v``'s row is zero (then zero).

    Returns
    -------
    lam : Tensor
        ``(B, n)``.
    flags : dict
        ``(B,)`` bool tensors ``singular``, ``indefinite``, ``undefined``.
    """
    B, n = v.shape
    dt = H.dtype
    pair = free[:, :, None] & free[:, None, :]
    Hs = 0.5 * (H + H.transpose(-1, -2))
    Hs = torch.where(pair, Hs, torch.zeros((), dtype=dt, device=H.device))
    ok = ok & torch.isfinite(Hs).all(-1).all(-1)
    eye = torch.eye(n, dtype=dt, device=H.device).expand(B, n, n)
    Hs = torch.where(ok[:, None, None], Hs, eye)  # eigh must not see NaN
    w, V = torch.linalg.eigh(Hs)  # (B, n), (B, n, n)
    top = w.abs().amax(-1, keepdim=True)
    tol = RTOL_FACTOR * n * torch.finfo(dt).eps * top
    small = w.abs() <= tol
    winv = torch.where(small, torch.zeros((), dtype=dt, device=H.device), 1 / w)
    vf = torch.where(free, v, torch.zeros((), dtype=dt, device=v.device))
    vf = torch.where(ok[:, None], vf, torch.zeros((), dtype=dt, device=v.device))
    lam = (V @ (winv[..., None] * (V.transpose(-1, -2) @ vf[..., None])))[..., 0]
    lam = torch.where(free, lam, torch.zeros((), dtype=dt, device=v.device))
    asked = (v != 0).any(-1)
    undefined = ~ok & asked
    lam = torch.where(undefined[:, None], torch.full((), float("nan"), dtype=dt,
                                                     device=v.device), lam)
    n_active = (~free).sum(-1)
    singular = ok & asked & (small.sum(-1) > n_active)
    indefinite = ok & asked & (w < -tol).any(-1)
    return lam, {"singular": singular, "indefinite": indefinite, "undefined": undefined}


def _hessian(g: Tensor, xs: Tensor) -> Tensor:
    """``(B, n, n)`` Hessian blocks from ``g (B, n)``, the gradient of a sum over problems.

    Row ``j`` of every block is one vector-Hessian product with the ``j``-th
    unit vector in every problem: the problems are independent, so the
    product of the summed cost separates into the blocks.
    """
    B, n = g.shape
    rows = []
    for j in range(n):
        e = torch.zeros_like(g)
        e[:, j] = 1
        (row,) = torch.autograd.grad(g, xs, grad_outputs=e, retain_graph=True,
                                     allow_unused=True)
        rows.append(torch.zeros_like(xs) if row is None else row)
    return torch.stack(rows, dim=1)


def _describe(mask: Tensor) -> str:
    ids = torch.nonzero(mask).flatten().tolist()
    head = ", ".join(str(i) for i in ids[:8])
    return f"{len(ids)} problem(s) ({head}{', ...' if len(ids) > 8 else ''})"


class _Adjoint:
    """What the backward pass of :class:`_ImplicitStep` needs (graph of ``g``, masks)."""

    def __init__(self, g: Tensor, xs: Tensor, free: Tensor, ok: Tensor,
                 bad: Tensor | None = None) -> None:
        self.g, self.xs, self.free, self.ok = g, xs, free, ok
        self.bad = bad  # rows with non-finite residuals, kept out of g's graph
        self.undefined: Tensor | None = None  # of the last apply()

    def apply(self, v: Tensor) -> Tensor:
        with torch.enable_grad():
            H = _hessian(self.g, self.xs)
        lam, flags = solve_adjoint(H.detach(), v, self.free, self.ok)
        self.undefined = flags["undefined"]
        if bool(flags["undefined"].any()):
            warnings.warn(
                "Gradient through the solution is NaN for " + _describe(flags["undefined"])
                + ": the solve did not succeed (status 0, -1, -2, 5 or 6) or its solution "
                "or Hessian is not finite, so the implicit derivative is undefined.",
                RuntimeWarning, stacklevel=3)
        if bool(flags["singular"].any()):
            warnings.warn(
                "The Hessian of the cost is singular at the solution of "
                + _describe(flags["singular"]) + ": the solution is not locally unique; "
                "the gradient is the minimum-norm one (pseudo-inverse).",
                RuntimeWarning, stacklevel=3)
        if bool(flags["indefinite"].any()):
            warnings.warn(
                "The Hessian of the cost is not positive semi-definite at the solution of "
                + _describe(flags["indefinite"]) + " (not a local minimum); the gradient "
                "uses its pseudo-inverse.", RuntimeWarning, stacklevel=3)
        return lam


class _ImplicitStep(torch.autograd.Function):
    """``S(g) = 0`` in value; in the backward pass ``v -> -H^{-1} v`` (see the module)."""

    @staticmethod
    def forward(ctx: Any, g: Tensor, adjoint: _Adjoint,  # noqa: D102
                poison: Tensor | None = None) -> Tensor:
        ctx.adjoint = adjoint
        return torch.zeros_like(g)

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor, None, Tensor | None]:  # noqa: D102
        if torch.is_grad_enabled():  # create_graph=True: a second derivative is coming
            raise RuntimeError(HIGHER_ORDER)
        adjoint = ctx.adjoint
        lam = -adjoint.apply(v)
        poison = None
        if adjoint.bad is not None and ctx.needs_input_grad[2]:
            # an asked row with non-finite residuals: NaN into what its residuals depend
            # on (its lam is NaN, but its row of g is a constant); none asked: nothing
            asked = adjoint.bad & adjoint.undefined
            if bool(asked.any()):
                nan = torch.full((), float("nan"), dtype=v.dtype, device=v.device)
                poison = torch.where(asked, nan, torch.zeros((), dtype=v.dtype,
                                                            device=v.device))
        return lam, None, poison


# ---------------------------------------------------------------- attach
def attach(out: dict[str, Tensor], resid: Callable[[Tensor], Tensor],
           loss: LossFunction | None) -> None:
    """Make ``out``'s ``x``, ``cost`` and ``f_true`` differentiable in ``fun``'s inputs.

    Parameters
    ----------
    out : dict
        The engine's result tensors (``x (B, n)``, ``cost (B,)``,
        ``f_true (B, m)``, ``status (B,)``, ``active_mask (B, n)``); the
        three are replaced, with the same values.
    resid : callable
        ``resid(x (B, n)) -> (B, m)``, the residuals of all problems,
        differentiable (the caller's torch ``fun`` with its arguments).
    loss : LossFunction or None
        The engine's robust loss.
    """
    x = out["x"]
    dt = x.dtype
    ok = _ok_rows(out["status"], x)
    free = out["active_mask"] == 0
    # a failed problem's x may be NaN (a NaN start): its rows are evaluated at 0
    # instead, so that a zero incoming gradient stays zero (0 * NaN is NaN)
    finite = torch.isfinite(x).all(-1, keepdim=True)
    zero = torch.zeros((), dtype=dt, device=x.device)
    xs = torch.where(finite, x.detach(), zero).requires_grad_(True)
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        _attach(out, resid, loss, x, xs, finite, zero, free, ok)
    finally:
        _STATE.depth -= 1


def _finite_rows_only(f: Tensor, fill: float | None) -> tuple[Tensor, Tensor | None]:
    """``f (B, m)`` with its rows that hold a non-finite value out of the graph, and those
    rows (``(B,)`` bool; None when there are none).

    Such a row (a failed problem: NaN data, an overflow) would turn a zero
    incoming gradient into NaN (``0 * NaN``) on its way to the tensors that
    every problem shares (a ``kwargs`` entry, a captured parameter), spoiling
    the others' gradients. Its values are kept (``fill`` None, ``f`` detached
    there: a loss that takes them is NaN already) or replaced by ``fill`` (the
    graph of the gradient ``g``; a gradient asked of such a row's ``x`` is
    undefined, and :class:`_ImplicitStep` makes it NaN by another path).
    """
    bad = ~torch.isfinite(f.detach()).all(-1)
    if not bool(bad.any()):
        return f, None
    other = f.detach() if fill is None else torch.full_like(f, fill)
    return torch.where(bad[:, None], other, f), bad


def _attach(out: dict[str, Tensor], resid: Callable[[Tensor], Tensor],
            loss: LossFunction | None, x: Tensor, xs: Tensor, finite: Tensor, zero: Tensor,
            free: Tensor, ok: Tensor) -> None:
    """The body of :func:`attach`."""
    dt = x.dtype
    with torch.enable_grad():
        try:
            f_raw = torch.as_tensor(resid(xs)).to(dt)
            f, bad = _finite_rows_only(f_raw, 0.0)
            cost = _differentiable_cost(f, loss)
            (g,) = torch.autograd.grad(cost.sum(), xs, create_graph=True)
        except RuntimeError as exc:
            check_numpy_error(exc)
            if "does not require grad" in str(exc) or "not have been used" in str(exc):
                raise ValueError(_NUMPY_MESSAGE.format(
                    what="its residuals do not depend on `x` through torch operations")) \
                    from exc
            raise
        # the rows kept out of g's graph reach fun's inputs through their residuals'
        # sums instead, NaN where a gradient of their x is asked (undefined)
        poison = None if bad is None else torch.where(bad, f_raw.sum(-1), 0.0)
        x_out = x.detach() + _ImplicitStep.apply(g, _Adjoint(g, xs, free, ok, bad), poison)
        f_out = torch.as_tensor(resid(torch.where(finite, x_out, zero))).to(dt)
        f_out, _ = _finite_rows_only(f_out, None)
        c_out = _differentiable_cost(f_out, loss)
    out["x"] = x_out
    out["f_true"] = out["f_true"].detach() + (f_out - f_out.detach())
    out["cost"] = out["cost"].detach() + (c_out - c_out.detach())
