"""The one path from a public call to the engine: checks, conversion, adapters, Jacobian.

``least_squares`` (one problem) and ``batch_least_squares`` (B problems) both
start with :func:`prepare`: scipy's checks in scipy's order (string options,
``x0`` and bounds, ``x_scale``, tolerances, ``diff_step``), the conversion of
``x0``, the bounds and the scale to ``(B, n)`` engine tensors (B = 1 for a
single problem), the shift of ``x0`` strictly inside the bounds for bounded
'trf', the adapters of ``fun`` and ``jac`` to the engine's batched callables
(:mod:`torchimize_scipy._user_functions`) and the one Jacobian choice
(:class:`EngineJacobian`). After evaluating the first residuals, which each
frontend does in its own calling convention (a single problem may return a
scalar and must be finite at ``x0``; a batch marks a non-finite problem as
failed and goes on), both call :func:`check_residuals_and_loss`. The engine's
output becomes scipy's result in :func:`torchimize_scipy._results.build_result`.

What differs between the two frontends, and why: a single problem raises where
a batch lets one problem fail alone (a NaN in ``x0``, non-finite residuals at
``x0``); a single problem's Jacobian at ``x0`` is checked for sparse or
non-finite values as scipy's solvers do; a batch streams its problems through
bounded memory (``_batch._BlockSource``) and always factorises through
``J^T J``, while a single problem uses the SVD unless it is tall and large
(:func:`torchimize_scipy._driver.prefers_gram`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._arrays import Namespace, as_numpy, detect_namespace
from ._engine.bounds import make_strictly_feasible
from ._engine.host_scalars import host_rows, tensor_of_host
from ._engine.problem import LM_FACTOR
from ._jac_forms import engine_jacobian, jacobian_form
from ._jacobian import autograd_jacobian, finite_difference_jacobian
from ._loss import LossFunction, make_loss
from ._sparsity import SparsityPattern, check_jac_sparsity, grouped_difference
from ._user_functions import (
    PerProblemArgs,
    RowwiseFunction,
    VectorizedFunction,
    own_value,
    user_loss,
)
from ._validation import (
    FD_METHODS,
    check_bounds,
    check_diff_step,
    check_f_scale,
    check_tolerance,
    check_tr_options,
    check_x_scale,
    prepare_bounds,
    take_leastsq_options,
    unbounded_default,
)


class EngineJacobian:
    """The engine's ``jac(x (k, n), f (k, m), idx (k,)) -> J (k, m, n)``: the one Jacobian choice.

    Parameters
    ----------
    jac : str or callable
        ``'2-point'``, ``'3-point'``, ``'cs'``, ``'autograd'`` or a callable.
    fun : callable
        The engine's residuals ``fun(x, idx) -> (k, m)`` (finite differences).
    differentiable : callable, optional
        ``differentiable(x, idx) -> (k, m)`` without detaching, for
        ``'autograd'`` (by default ``fun.raw``).
    user : callable, optional
        The adapted callable ``jac``: ``user(x, idx) -> (k, m, n)``.
    rel_step : Tensor, optional
        Relative finite-difference step ``(n,)``.
    lb, ub : Tensor, optional
        ``(B, n)`` bounds indexed by problem id; finite differences respect
        them when given.
    fd_dtype : torch.dtype, optional
        dtype in which finite differences see the residuals (float32 or float16
        residuals take default steps sized by their epsilon, as scipy's gh-12991).

    Attributes
    ----------
    pattern : SparsityPattern or None
        The checked ``jac_sparsity``: finite differences by column groups,
        returning a sparse ``(k, m, n)`` tensor (set after the first residuals,
        once ``m`` is known).
    form : {'dense', 'sparse', 'operator'}
        What a callable ``jac`` returned at ``x0``; for 'sparse' and
        'operator' each value is converted to the engine's sparse tensor or
        operator (:func:`torchimize_scipy._jac_forms.engine_jacobian`).
    """

    def __init__(self, jac: Any, fun: Callable, *, differentiable: Callable | None = None,
                 user: Callable | None = None, rel_step: Tensor | None = None,
                 lb: Tensor | None = None, ub: Tensor | None = None,
                 fd_dtype: torch.dtype | None = None) -> None:
        self.kind = "callable" if callable(jac) else jac
        self.fun, self.user, self.rel_step = fun, user, rel_step
        self.differentiable = differentiable if differentiable is not None else getattr(
            fun, "raw", None)
        self.lb, self.ub, self.fd_dtype = lb, ub, fd_dtype
        self.pattern: SparsityPattern | None = None
        self.form = "dense"

    def __call__(self, x: Tensor, f: Tensor, idx: Tensor) -> Any:
        k, n = x.shape
        m = f.shape[-1]
        if self.kind == "callable" and self.form != "dense":
            return self.user_sparse(x, idx, m, n, f.dtype if f.is_floating_point() else x.dtype)
        if self.kind == "callable":
            # (a jac that takes them gets the residuals at x: _user_functions.WithResiduals)
            J = self.user(x, idx, residuals=f) if getattr(self.user, "takes_residuals", False) \
                else self.user(x, idx)
            if tuple(J.shape) != (k, m, n):
                # (a function of one point is shown its own shapes, not the stack's)
                one = not isinstance(self.user, VectorizedFunction)
                raise ValueError("The return value of `jac` has wrong shape: expected "
                                 f"{(m, n) if one else (k, m, n)}, actual "
                                 f"{tuple(J.shape[1:]) if one else tuple(J.shape)}.")
            return J
        if self.kind in FD_METHODS:
            if self.fd_dtype is not None:
                f = f.to(self.fd_dtype)
            if self.pattern is not None:
                lb = ub = None
                if self.lb is not None:
                    lb, ub = self.lb[idx], self.ub[idx]
                J = grouped_difference(self.fun, x, f, idx, self.pattern, self.kind,
                                       self.rel_step, lb, ub)
                return J.to(dtype=x.dtype) if J.dtype != x.dtype else J
            if self.lb is None:
                return finite_difference_jacobian(self.fun, x, f, idx, self.kind, self.rel_step)
            return finite_difference_jacobian(self.fun, x, f, idx, self.kind, self.rel_step,
                                              self.lb[idx], self.ub[idx])
        differentiable = self.differentiable
        return autograd_jacobian(lambda X: differentiable(X, idx), x, m)

    def user_sparse(self, x: Tensor, idx: Tensor, m: int, n: int, dtype: torch.dtype) -> Any:
        """A callable ``jac`` returning sparse matrices or operators, in the engine's form."""
        if isinstance(self.user, VectorizedFunction):
            J = _vectorized_raw(self.user, x, idx)
            if isinstance(J, Tensor) and J.layout != torch.strided and J.ndim == 3:
                if tuple(J.shape) != (x.shape[0], m, n):
                    raise ValueError("The return value of `jac` has wrong shape: expected "
                                     f"{(x.shape[0], m, n)}, actual {tuple(J.shape)}.")
                J = J.to_sparse_coo() if J.layout != torch.sparse_coo else J
                return J.coalesce().to(device=x.device, dtype=dtype)
            raise ValueError("A vectorised `jac` of batch_least_squares that returns sparse "
                             "values must return a torch sparse tensor of shape (b, m, n); "
                             f"got {type(J).__name__}.")
        ids = idx.tolist()
        # several problems: each value kept as it returns (a sparse matrix refilled at every
        # call would otherwise give every problem the last one's)
        own = own_value if x.shape[0] > 1 else (lambda v: v)
        values = [own(self.user.call_one(x[r], ids[r])) for r in range(x.shape[0])]
        return engine_jacobian(values, m, n, dtype, x.device)


@dataclass
class Prepared:
    """A validated call, converted for the engine (what :func:`prepare` returns).

    Attributes
    ----------
    ns : Namespace
        The caller's array kind and the engine's device and dtype.
    x0_host : numpy.ndarray
        The validated float64 ``x0`` on the host, ``(n,)`` or ``(B, n)``.
    x0, lb, ub : Tensor
        ``(B, n)`` engine tensors; ``x0`` is a private copy, shifted strictly
        inside the bounds for bounded 'trf'.
    bounded : bool
        Whether any bound is finite.
    x_scale : Tensor or str
        ``(B, n)`` or ``'jac'``.
    ftol, xtol, gtol : float
        Checked tolerances.
    fun : RowwiseFunction or VectorizedFunction
        The engine's residuals ``fun(x (k, n), idx (k,)) -> (k, m)``.
    jac_user : RowwiseFunction, VectorizedFunction or None
        The adapted callable ``jac``.
    jac : EngineJacobian
        The engine's Jacobian.
    lm_factor : float
        MINPACK's initial step bound for 'lm' (``leastsq``'s ``factor``; 100
        unless ``curve_fit`` set another).
    """

    ns: Namespace
    x0_host: np.ndarray
    x0: Tensor
    lb: Tensor
    ub: Tensor
    bounded: bool
    x_scale: Tensor | str
    ftol: float
    xtol: float
    gtol: float
    fun: RowwiseFunction | VectorizedFunction
    jac_user: RowwiseFunction | VectorizedFunction | None
    jac: EngineJacobian
    lm_factor: float = LM_FACTOR


def prepare(fun: Callable, x0: Any, jac: Any, bounds: Any, method: str, ftol: Any, xtol: Any,
            gtol: Any, x_scale: Any, diff_step: Any, args: Any, kwargs: dict | None, *,
            device: Any, dtype: Any, batch: bool, vectorized: bool = True,
            workers: Any = None) -> Prepared:
    """Check a call in scipy's order and convert it for the engine.

    The string options are checked before (``check_options``), the residuals
    after (:func:`check_residuals_and_loss`). ``batch`` selects
    ``batch_least_squares``'s conventions: ``x0`` of shape ``(B, n)``, bounds
    and ``x_scale`` per problem, a NaN row allowed (that problem fails alone),
    ``args`` per problem, ``fun`` vectorised or not. Without ``batch``, ``x0``
    is ``(n,)`` (or a scalar) and ``fun`` is a function of one point, whose
    finite-difference points are evaluated through ``workers`` when given.
    The default bounds ``(-inf, inf)`` (``_validation.unbounded_default``) are
    neither broadcast through ``prepare_bounds`` nor checked by ``check_bounds``:
    of its tests only ``x0``'s can fail there (NaN is outside every bound, scipy's
    error), and that one is kept.
    """
    # (a numpy array with the defaults is numpy's float64 on the CPU, what detect_namespace
    # answers after asking array_api_compat: no look-up)
    ns = _NUMPY_NS if (type(x0) is np.ndarray and device is None and dtype is None) \
        else detect_namespace(x0, device, dtype)
    x0_host = as_numpy(x0)
    if np.iscomplexobj(x0_host):
        raise ValueError("`x0` must be real.")
    if batch:
        x0_host = np.asarray(x0_host, dtype=float)
        if x0_host.ndim != 2:
            raise ValueError("`x0` must have shape (B, n) for batch_least_squares.")
        B, n = x0_host.shape
        if B == 0 or n == 0:
            raise ValueError("`x0` must hold at least one problem with at least one variable.")
    else:
        x0_host = np.atleast_1d(x0_host).astype(float)
        if x0_host.ndim > 1:
            raise ValueError("`x0` must have at most 1 dimension.")
        B, n = 1, x0_host.size
    free = unbounded_default(bounds)
    if free:  # every variable free (the default): the arrays check_bounds would pass
        lb, ub = np.full((B, n) if batch else n, -np.inf), np.full((B, n) if batch else n, np.inf)
        # (of its tests only x0's can fail: NaN is outside every bound, as in scipy)
        if not batch and np.isnan(x0_host).any():
            raise ValueError("Initial guess is outside of provided bounds")
    else:
        lb, ub = prepare_bounds(bounds, n, batch=B if batch else None)
        # in a batch, a problem whose x0 has a NaN fails alone (status 5)
        check_bounds(lb, ub, x0_host, method, nan_ok=batch)
    x_scale = check_x_scale(x_scale, x0_host, method)
    leastsq = take_leastsq_options(method)  # (curve_fit's 'lm': leastsq's rules)
    ftol, xtol, gtol = check_tolerance(ftol, xtol, gtol, method, dtype=ns.dtype, stacklevel=5,
                                       leastsq=leastsq is not None)
    rel_step = check_diff_step(diff_step, n)

    dev, dt = ns.device, ns.dtype
    if isinstance(x0, torch.Tensor) and x0.device.type != "cpu":
        x0_t = x0.detach().reshape(B, n).to(device=dev, dtype=dt).clone()
    else:
        # (a CPU tensor too: its float64 host values, copied by numpy, without a torch
        # parallel region over a long x0)
        # (shaped by numpy before the copy: no torch operation for the shape)
        x0_t = _engine_tensor(x0_host.reshape(B, n), dev, dt)
    lb_t = _engine_tensor(lb.reshape(B, n), dev, dt)
    ub_t = _engine_tensor(ub.reshape(B, n), dev, dt)
    bounded = not free and bool(np.isfinite(lb).any() or np.isfinite(ub).any())
    if method == "trf" and bounded:
        x0_t = make_strictly_feasible(x0_t, lb_t, ub_t)
    scale = x_scale if isinstance(x_scale, str) else _engine_tensor(x_scale.reshape(B, n),
                                                                     dev, dt)

    kwargs = {} if kwargs is None else kwargs
    # 'autograd' differentiates fun with torch.func: fun then works on tensors
    fun_ns = Namespace("torch", dev, dt) if jac == "autograd" else ns
    if batch:
        per_problem = PerProblemArgs(args, B, fun_ns)

        def adapt(fn: Callable, fn_ns: Namespace, kind: str) -> Any:
            if vectorized:
                return VectorizedFunction(fn, per_problem, kwargs, fn_ns, kind=kind)
            return RowwiseFunction(fn, per_problem, kwargs, fn_ns, None, kind=kind)

        fun_b = adapt(fun, fun_ns, "fun")
        jac_b = adapt(jac, ns, "jac") if callable(jac) else None
    else:
        fun_b = RowwiseFunction(fun, args, kwargs, fun_ns, None)
        jac_b = RowwiseFunction(jac, args, kwargs, ns, None, kind="jac") if callable(jac) \
            else None
    # scipy's `workers` map the points of the finite differences only; the residuals at
    # x0 and at each trial point are plain calls, as under scipy
    fd_fun = fun_b if batch or workers is None else RowwiseFunction(fun, args, kwargs, fun_ns,
                                                                     workers)
    rel = None if rel_step is None else torch.as_tensor(rel_step, device=dev, dtype=dt)
    engine_jac = EngineJacobian(jac, fd_fun, user=jac_b, rel_step=rel,
                                lb=lb_t if bounded else None, ub=ub_t if bounded else None)
    return Prepared(ns=ns, x0_host=x0_host, x0=x0_t, lb=lb_t, ub=ub_t, bounded=bounded,
                    x_scale=scale, ftol=ftol, xtol=xtol, gtol=gtol, fun=fun_b, jac_user=jac_b,
                    jac=engine_jac,
                    lm_factor=LM_FACTOR if leastsq is None else leastsq["factor"])


#: what :func:`~torchimize_scipy._arrays.detect_namespace` makes of a numpy ``x0`` without
#: ``device`` and ``dtype``
_NUMPY_NS = Namespace("numpy", torch.device("cpu"), torch.float64)


#: the problem index of one problem on the CPU (read, never written: the engine writes no
#: row of a one-problem state in place)
_CPU_IDS = torch.zeros(1, dtype=torch.long)


def one_problem_ids(device: torch.device) -> Tensor:
    """The index ``[0]`` of a single problem on ``device`` (on the CPU one shared tensor)."""
    return _CPU_IDS if device.type == "cpu" else torch.zeros(1, dtype=torch.long,
                                                               device=device)


def _engine_tensor(a: np.ndarray, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A private engine tensor of the float64 host array ``a`` (``torch.tensor``'s values).

    On the CPU in float64 it is a numpy copy handed to torch (``torch.tensor``
    parses its argument as a nested sequence first: several times slower for
    the few entries of one problem).
    """
    if device.type == "cpu" and dtype == torch.float64:
        return torch.from_numpy(np.array(a, dtype=np.float64, order="C"))
    return torch.tensor(a, device=device, dtype=dtype)


def check_residuals_and_loss(method: str, n: int, f0: Tensor, loss: Any, f_scale: Any,
                             ns: Namespace, rowwise: bool) -> LossFunction | None:
    """scipy's checks after the first residuals ``f0 (b, m)``; the engine's loss.

    'lm' needs ``m >= n``; a robust loss needs a finite nonzero ``f_scale``; a
    callable loss is adapted (:func:`~torchimize_scipy._user_functions.user_loss`)
    and its shape checked at ``f0``, as scipy does.
    """
    m = f0.shape[-1]
    if method == "lm" and m < n:
        raise ValueError("Method 'lm' doesn't work when the number of "
                         "residuals is less than the number of variables.")
    check_f_scale(f_scale, loss)
    if not callable(loss):
        return make_loss(loss, f_scale)
    loss_obj = make_loss(user_loss(loss, ns, m, rowwise), f_scale)
    loss_obj.rho(f0)
    return loss_obj


def _vectorized_raw(fn: VectorizedFunction, x: Tensor, idx: Tensor) -> Any:
    """The caller's value of a vectorised ``jac`` at ``x (k, n)``, unconverted."""
    xu = x.clone() if fn.ns.kind == "torch" else x.detach().cpu().numpy().copy()
    return fn.fn(xu, *fn.args.select(idx), **fn.kwargs)


def use_sparsity(p: Prepared, method: str, jac: Any, jac_sparsity: Any, tr_solver: Any,
                 m: int, n: int) -> None:
    """Check ``jac_sparsity`` as scipy does and give it to the finite differences of ``p``.

    Only for a ``jac`` that is not callable (scipy ignores ``jac_sparsity``
    with a callable ``jac``). Raises scipy's errors: with 'lm', with
    ``tr_solver='exact'``, for a wrong shape; and ours for the methods and
    Jacobians it cannot serve ('gn', 'gd', ``jac='autograd'``).
    """
    if jac_sparsity is None:
        return
    if method == "lm":
        raise ValueError("method='lm' does not support `jac_sparsity`.")
    if jac not in FD_METHODS:
        raise ValueError("`jac_sparsity` applies to finite differences ('2-point', "
                         f"'3-point', 'cs'), not to jac={jac!r}.")
    p.jac.pattern = check_jac_sparsity(jac_sparsity, m, n)
    if tr_solver == "exact":
        raise ValueError("tr_solver='exact' is incompatible with `jac_sparsity`.")
    if method in ("gn", "gd"):
        raise ValueError(f"method={method!r} works only with dense Jacobians; use "
                         "method='trf' or 'dogbox' with `jac_sparsity`.")


def jacobian_at_x0(p: Prepared, f0: Tensor, method: str, jac: Any, jac_sparsity: Any,
                   tr_solver: str | None, tr_options: dict | None,
                   x_scale: Any) -> tuple[Any, str]:
    """The Jacobian at ``x0`` of one problem, ``(1, m, n)``, with scipy's checks of it.

    In scipy's order: ``jac_sparsity`` (refused with 'lm' and with
    ``tr_solver='exact'``, its shape checked), the shape of the value, a
    sparse or operator value refused by 'lm' and ``tr_solver='exact'``, an
    operator refused with ``x_scale='jac'``; then ``tr_solver=None`` becomes
    'lsmr' for a sparse or operator Jacobian (finite differences with
    ``jac_sparsity`` included) and 'exact' otherwise, and ``tr_options`` are
    checked for the solver chosen (:func:`check_tr_options`).

    Returns
    -------
    (J0, tr_solver)
        ``J0`` dense ``(1, m, n)``, sparse COO ``(1, m, n)`` or an operator;
        the chosen ``tr_solver`` ('exact' for 'lm').
    """
    n = p.x0.shape[1]
    m = f0.shape[1]
    ns = p.ns
    if not callable(jac):
        use_sparsity(p, method, jac, jac_sparsity, tr_solver, m, n)
        J0 = p.jac(p.x0, f0, one_problem_ids(ns.device)) if n > 0 \
            else torch.zeros(1, m, 0, device=ns.device, dtype=ns.dtype)
        form = "dense" if p.jac.pattern is None else "sparse"
    else:
        J0_raw = p.jac_user.call_one(p.x0[0])
        form = jacobian_form(J0_raw)
        if form == "dense":
            J0_np = np.atleast_2d(as_numpy(J0_raw))
            if J0_np.shape != (m, n):
                raise ValueError("The return value of `jac` has wrong shape: expected "
                                 f"{(m, n)}, actual {J0_np.shape}.")
            J0 = first_value(ns, J0_np, (1, m, n), "jac")
        else:
            if tuple(J0_raw.shape) != (m, n):
                raise ValueError("The return value of `jac` has wrong shape: expected "
                                 f"{(m, n)}, actual {tuple(J0_raw.shape)}.")
            if method == "lm":
                raise ValueError("method='lm' works only with dense Jacobian matrices.")
            if tr_solver == "exact":
                raise ValueError("tr_solver='exact' works only with dense Jacobian matrices.")
            p.jac.form = form
            J0 = engine_jacobian([J0_raw], m, n, ns.dtype, ns.device)
            if form == "operator" and isinstance(p.x_scale, str) and \
                    not hasattr(J0, "column_norms"):
                raise ValueError("x_scale='jac' can't be used when `jac` returns "
                                 "LinearOperator.")
    if method == "lm":
        check_tr_options(tr_options, method, "exact", p.bounded)
        return J0, "exact"
    if method in ("gn", "gd") and (form != "dense" or tr_solver == "lsmr"):
        raise ValueError(f"method={method!r} works only with dense Jacobians and "
                         "tr_solver='exact'; use method='trf' or 'dogbox' for sparse or "
                         "operator Jacobians and tr_solver='lsmr'.")
    if tr_solver is None:
        tr_solver = "exact" if form == "dense" else "lsmr"
    check_tr_options(tr_options, method, tr_solver, p.bounded)
    return J0, tr_solver


def first_value(ns: Namespace, a: np.ndarray, shape: tuple[int, ...], what: str) -> Tensor:
    """``ns.from_user(a, what=what).reshape(shape)``: one problem's first residuals or
    Jacobian, a host array ``a``, as an engine tensor.

    A float64 array for a float64 engine on the CPU becomes the tensor of its
    (contiguous) memory, as ``from_user`` makes it, remembering that memory as its
    host rows (:func:`~torchimize_scipy._engine.host_scalars.tensor_of_host`), so
    that the checks at ``x0`` and the engine's first host reads of it convert
    nothing (no torch operation).
    """
    if ns.device.type == "cpu" and ns.dtype == torch.float64 and type(a) is np.ndarray \
            and a.dtype == np.float64 and a.flags.writeable:
        return tensor_of_host(np.ascontiguousarray(a).reshape(shape))
    return ns.from_user(a, what=what).reshape(shape)


def jacobian_finite_at_x0(J0: Any) -> bool:
    """Whether the Jacobian at ``x0`` is finite: every entry of a dense or sparse one.

    An operator's entries are not known; its products are checked by the
    engine as it runs (a non-finite gradient ends the problem with status 5).
    """
    if isinstance(J0, Tensor):
        if J0.layout == torch.sparse_coo:
            values = J0.coalesce().values()
        elif J0.layout == torch.sparse_csr:
            values = J0.values()
        else:
            values = J0
        return all_finite(values)
    return True


def all_finite(t: Tensor) -> bool:
    """Whether every entry of the strided tensor ``t`` is finite.

    On the CPU through numpy (one pass, no torch parallel region: torch's
    ``isfinite(t).all()`` is five passes over ``t``, each over more than
    32,768 entries a parallel region of torch's OpenMP team), from the host
    array the tensor remembers where it has one (a numpy ``jac``'s value at
    ``x0``, :func:`~torchimize_scipy._engine.host_scalars.remember_rows`: no
    torch operation); elsewhere in torch, read once.
    """
    if t.device.type == "cpu" and t.dtype != torch.bfloat16:
        known = host_rows(t)
        if known is None:
            known = t.detach().resolve_conj().resolve_neg().numpy()
        return bool(np.isfinite(known).all())
    return bool(torch.isfinite(t).all())
