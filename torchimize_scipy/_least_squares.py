"""``least_squares``: scipy's frontend on the batched torch engine.

The checks run in scipy's order and raise scipy's errors; then the problem is
handed to the engine as a batch of one, and the result is scipy's
:class:`~scipy.optimize.OptimizeResult` with every field filled as scipy fills
it. numpy (or list, or scalar) ``x0`` means ``fun`` receives 1-D float64 numpy
arrays and the result holds numpy arrays; a torch ``x0`` means tensors in and
tensors out, on ``x0``'s device and dtype unless ``device=``/``dtype=`` say
otherwise.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeResult
from scipy.sparse import issparse
from scipy.sparse.linalg import LinearOperator

from ._arrays import Namespace, as_numpy, detect_namespace
from ._driver import solve
from ._engine import status as codes
from ._engine.bounds import make_strictly_feasible
from ._jacobian import autograd_jacobian, finite_difference_jacobian
from ._loss import make_loss
from ._user_functions import RowwiseFunction
from ._validation import (
    FD_METHODS,
    check_bounds,
    check_diff_step,
    check_f_scale,
    check_options,
    check_tolerance,
    check_x_scale,
    prepare_bounds,
)


def least_squares(
    fun: Callable,
    x0: Any,
    jac: str | Callable = "2-point",
    bounds: Any = (-np.inf, np.inf),
    method: str = "trf",
    ftol: float | None = 1e-8,
    xtol: float | None = 1e-8,
    gtol: float | None = 1e-8,
    x_scale: Any = None,
    loss: str | Callable = "linear",
    f_scale: float = 1.0,
    diff_step: Any = None,
    tr_solver: str | None = None,
    tr_options: dict | None = None,
    jac_sparsity: Any = None,
    max_nfev: int | None = None,
    verbose: int = 0,
    args: tuple = (),
    kwargs: dict | None = None,
    callback: Callable | None = None,
    workers: Any = None,
    *,
    device: Any = None,
    dtype: Any = None,
) -> OptimizeResult:
    """Solve a nonlinear least-squares problem with bounds on the variables.

    A drop-in replacement for :func:`scipy.optimize.least_squares` (scipy 1.17
    signature and results) whose solvers are batched PyTorch code. Given the
    residuals ``f(x)`` (``m`` real functions of ``n`` real variables) and a
    loss ``rho``, it finds a local minimum of::

        F(x) = 0.5 * sum(rho(f_i(x)**2), i = 0, ..., m - 1)  subject to  lb <= x <= ub

    Parameters
    ----------
    fun : callable
        ``fun(x, *args, **kwargs)`` returning the ``m`` residuals (1-D
        array_like or a scalar). ``x`` is a 1-D float64 numpy array when
        ``x0`` is numpy-like, a tensor when ``x0`` is a tensor. Residuals
        must be real: complex ones raise a ``ValueError`` (write a complex
        residual as its real and imaginary parts).
    x0 : array_like or Tensor, shape (n,) or scalar
        Initial guess. With ``n = 0`` the result is scipy's: ``fun`` is
        evaluated once and the status is 1 (-1 with 'lm', whose MINPACK
        refuses ``n = 0``, and ``nfev = 0``).
    jac : {'2-point', '3-point', 'cs', 'autograd'} or callable, optional
        Jacobian: finite differences as in scipy (``diff_step`` rules and
        bounds respected), complex step, the exact Jacobian from
        :mod:`torch.func` (``'autograd'``; ``fun`` must then accept and
        return tensors), or a callable ``jac(x, *args, **kwargs)`` returning
        an ``(m, n)`` array_like. A Jacobian that is not finite at ``x0``
        raises scipy's ``ValueError`` ("array must not contain infs or
        NaNs"), with every method.
    bounds : 2-tuple of array_like or `scipy.optimize.Bounds`, optional
        Lower and upper bounds, scalars or shape ``(n,)``; ``±inf`` means none.
    method : {'trf', 'dogbox', 'lm', 'gn', 'gd'}, optional
        'trf' Trust Region Reflective (default), 'dogbox' rectangular
        trust-region dogleg, 'lm' Levenberg-Marquardt as MINPACK (no bounds,
        ``m >= n``); ours: 'gn' Gauss-Newton with a backtracking line search,
        'gd' steepest descent with a backtracking line search (both project
        onto the bounds).
    ftol, xtol, gtol : float or None, optional
        Tolerances on the cost change, step size and gradient, as in scipy.
        When computing in float32, a tolerance from float64's epsilon up to
        float32's (1.19e-7; the 1e-8 defaults among them) is raised to
        float32's epsilon, the smallest relative change float32 resolves.
    x_scale : array_like or 'jac', optional
        Characteristic scale of each variable (default 1; 'jac' for 'lm').
    loss : {'linear', 'soft_l1', 'huber', 'cauchy', 'arctan'} or callable, optional
        Robust loss; a callable ``loss(z)`` returns an array of shape ``(3, m)``.
    f_scale : float, optional
        Soft margin between inlier and outlier residuals. A robust loss needs
        it finite and nonzero; otherwise scipy's ``ValueError`` ("array must
        not contain infs or NaNs") is raised, naming ``f_scale``.
    diff_step : array_like, optional
        Relative finite-difference step.
    tr_solver : {None, 'exact'}, optional
        Only the dense 'exact' solver is available; 'lsmr' raises.
    tr_options : dict, optional
        Not supported yet (raises when non-empty, except for 'lm' where scipy
        ignores it).
    jac_sparsity : None, optional
        Not supported yet (raises).
    max_nfev : int, optional
        Budget of residual evaluations (default ``100 n``; ``1000 n`` for 'gd').
        As in scipy, evaluations made for finite-difference Jacobians are not
        counted.
    verbose : {0, 1, 2}, optional
        1 prints a termination report, 2 also the iteration table
        (not for 'lm', as in scipy).
    args, kwargs : tuple and dict, optional
        Extra arguments of ``fun`` and ``jac``.
    callback : callable, optional
        ``callback(intermediate_result)`` (or ``callback(x)``) after each
        iteration; raising ``StopIteration`` stops with status -2. Not
        supported with 'lm' (a warning, as in scipy).
    workers : int or map-like callable, optional
        Evaluates the rows of a finite-difference Jacobian in parallel, as in
        scipy.
    device, dtype : optional
        Keyword-only: where and in which floating dtype to compute
        (float32 or float64; torch's linear algebra has no half precision).

    Returns
    -------
    OptimizeResult
        ``x, cost, fun, jac, grad, optimality, active_mask, nfev, njev,
        status, message, success`` with scipy's meanings.

    Examples
    --------
    >>> import numpy as np
    >>> from torchimize_scipy import least_squares
    >>> def fun_rosenbrock(x):
    ...     return np.array([10 * (x[1] - x[0]**2), (1 - x[0])])
    >>> res = least_squares(fun_rosenbrock, np.array([2.0, 2.0]))
    >>> np.round(res.x, 6), res.status
    (array([1., 1.]), 1)
    """
    check_options(method, jac, tr_solver, tr_options, loss, verbose, max_nfev, jac_sparsity)
    ns = detect_namespace(x0, device, dtype)
    x0_host = as_numpy(x0)
    if np.iscomplexobj(x0_host):
        raise ValueError("`x0` must be real.")
    x0_host = np.atleast_1d(x0_host).astype(float)
    if x0_host.ndim > 1:
        raise ValueError("`x0` must have at most 1 dimension.")
    n = x0_host.size
    lb, ub = prepare_bounds(bounds, n)
    check_bounds(lb, ub, x0_host, method)
    x_scale = check_x_scale(x_scale, x0_host, method)
    ftol, xtol, gtol = check_tolerance(ftol, xtol, gtol, method, dtype=ns.dtype)
    rel_step = check_diff_step(diff_step, n)

    dev, dt = ns.device, ns.dtype
    if isinstance(x0, torch.Tensor):
        x0_t = x0.detach().reshape(-1).to(device=dev, dtype=dt).clone()
    else:
        x0_t = torch.tensor(x0_host, device=dev, dtype=dt)
    lb_t = torch.as_tensor(lb, device=dev, dtype=dt).unsqueeze(0)
    ub_t = torch.as_tensor(ub, device=dev, dtype=dt).unsqueeze(0)
    x0_t = x0_t.unsqueeze(0)
    bounded = bool(np.isfinite(lb).any() or np.isfinite(ub).any())
    if method == "trf" and bounded:
        x0_t = make_strictly_feasible(x0_t, lb_t, ub_t)
    kwargs = {} if kwargs is None else kwargs

    fun_ns = Namespace("torch", dev, dt) if jac == "autograd" else ns
    fun_rows = RowwiseFunction(fun, args, kwargs, fun_ns, workers)
    f0_raw = np.atleast_1d(as_numpy(fun_rows.call_one(x0_t[0])))
    if f0_raw.ndim != 1:
        raise ValueError("`fun` must return at most 1-d array_like. "
                         f"f0.shape: {f0_raw.shape}")
    f0 = fun_ns.from_user(f0_raw).reshape(1, -1)
    if not bool(torch.isfinite(f0).all()):
        raise ValueError("Residuals are not finite in the initial point.")
    m = f0.shape[1]
    if method == "lm" and m < n:
        raise ValueError("Method 'lm' doesn't work when the number of "
                         "residuals is less than the number of variables.")

    check_f_scale(f_scale, loss)
    loss_obj = _make_loss(loss, f_scale, ns, f0)

    if not callable(jac) and method == "lm" and jac_sparsity is not None:
        raise ValueError("method='lm' does not support `jac_sparsity`.")

    batched_fun = fun_rows  # (k, n), idx -> (k, m): the engine's residual callable

    if callable(jac):
        jac_rows = RowwiseFunction(jac, args, kwargs, ns, None, kind="jac")
        J0_raw = jac_rows.call_one(x0_t[0])
        if issparse(J0_raw) or isinstance(J0_raw, LinearOperator):
            if method == "lm":
                raise ValueError("method='lm' works only with dense Jacobian matrices.")
            raise ValueError("Sparse and LinearOperator Jacobians are not supported yet by "
                             "torchimize_scipy; return a dense array from `jac`.")
        J0_np = np.atleast_2d(as_numpy(J0_raw))
        if J0_np.shape != (m, n):
            raise ValueError(f"The return value of `jac` has wrong shape: expected {(m, n)}, "
                             f"actual {J0_np.shape}.")

        def batched_jac(x, f, idx):
            return jac_rows(x, idx)

        J0 = ns.from_user(J0_np, what="jac").reshape(1, m, n)
    if n == 0:
        # nothing to optimise: scipy reports the start ('lm': MINPACK's improper input)
        out = _no_variables(f0, loss_obj, method)
    elif callable(jac):
        pass  # J0 evaluated and checked above
    elif jac in FD_METHODS:
        rel = None if rel_step is None else torch.as_tensor(rel_step, device=dev, dtype=dt)

        fd_lb, fd_ub = (lb_t, ub_t) if bounded else (None, None)
        # float32 residuals take float32-sized default steps (scipy gh-12991);
        # the residuals themselves were float32, so this cast is exact
        f_dtype = torch.float32 if (f0_raw.dtype == np.float32 and dt == torch.float64) else dt

        def batched_jac(x, f, idx):
            return finite_difference_jacobian(batched_fun, x, f.to(f_dtype), idx, jac, rel,
                                              fd_lb, fd_ub)

        J0 = batched_jac(x0_t, f0, torch.zeros(1, dtype=torch.long, device=dev))
    else:  # autograd
        def fun_torch(X: torch.Tensor) -> torch.Tensor:
            rows = [torch.as_tensor(fun(X[i].clone(), *args, **kwargs)).reshape(-1)
                    for i in range(X.shape[0])]
            return torch.stack(rows)

        def batched_jac(x, f, idx):
            return autograd_jacobian(fun_torch, x, m)

        J0 = batched_jac(x0_t, f0, torch.zeros(1, dtype=torch.long, device=dev))

    if method == "lm" and callback is not None:
        warnings.warn("Callback function specified, but not supported with `lm` method.",
                      stacklevel=2)
        callback = None
    engine_callback = _wrap_callback(callback, ns) if callback is not None else None

    if n > 0:
        J0 = J0.to(device=dev, dtype=dt)
        if not bool(torch.isfinite(J0).all()):
            # scipy's 'trf' and 'dogbox' fail in their first factorisation of J0
            # (ValueError / LinAlgError); every method refuses it here, by name
            raise ValueError("array must not contain infs or NaNs: the Jacobian is not "
                             "finite in the initial point.")
        scale = x_scale if isinstance(x_scale, str) else torch.as_tensor(
            x_scale, device=dev, dtype=dt).unsqueeze(0)
        out = solve(method=method, fun=batched_fun, jac=batched_jac, x0=x0_t, f0=f0,
                    J0=J0, lb=lb_t, ub=ub_t, x_scale=scale,
                    loss=loss_obj, ftol=ftol, xtol=xtol, gtol=gtol, max_nfev=max_nfev,
                    verbose=verbose, callback=engine_callback)
    result = _build_result(out, ns, method, jac, bounded=bounded)
    if ns.kind == "numpy" and f0_raw.dtype == np.float32:
        result.fun = result.fun.astype(np.float32)  # scipy returns fun's own dtype
    if verbose >= 1:
        initial_cost = float(loss_obj.cost(f0)[0]) if loss_obj is not None else float(
            0.5 * (f0 * f0).sum())
        print(result.message)
        print(f"Function evaluations {result.nfev}, initial cost {initial_cost:.4e}, "
              f"final cost {float(result.cost):.4e}, "
              f"first-order optimality {float(result.optimality):.2e}.")
    return result


def _no_variables(f0: torch.Tensor, loss_obj: Any, method: str) -> dict[str, torch.Tensor]:
    """The engine's output for a problem without variables (``x0`` of size 0).

    As scipy 1.17: 'trf' and 'dogbox' stop at once on the ``gtol`` test
    (optimality 0) after the one evaluation at ``x0``; MINPACK refuses
    ``n = 0`` as improper input, so 'lm' reports status -1 with ``nfev = 0``
    (and ``njev = 0`` for a callable ``jac``, None otherwise, as always for 'lm').
    """
    m = f0.shape[1]
    dev, dt = f0.device, f0.dtype
    cost = loss_obj.cost(f0) if loss_obj is not None else 0.5 * (f0 * f0).sum(-1)
    lm = method == "lm"
    count = torch.tensor([0 if lm else 1], device=dev)
    return {"x": torch.zeros(1, 0, device=dev, dtype=dt), "cost": cost,
            "f_true": f0, "J": torch.zeros(1, m, 0, device=dev, dtype=dt),
            "g": torch.zeros(1, 0, device=dev, dtype=dt),
            "optimality": torch.zeros(1, device=dev, dtype=dt),
            "active_mask": torch.zeros(1, 0, dtype=torch.long, device=dev),
            "nfev": count, "njev": count,
            "status": torch.tensor([codes.IMPROPER_INPUT if lm else codes.GTOL], device=dev)}


def _make_loss(loss: Any, f_scale: float, ns: Namespace, f0: torch.Tensor) -> object | None:
    """Build the engine loss; a user callable is called on one problem at a time."""
    if not callable(loss):
        return make_loss(loss, f_scale)
    m = f0.shape[-1]

    def rho_fn(z: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in range(z.shape[0]):
            r = np.asarray(as_numpy(loss(ns.row_to_fun(z[i]))), dtype=float) \
                if ns.kind != "torch" else loss(z[i])
            r = ns.from_user(r, what="loss")
            if tuple(r.shape) != (3, m):
                raise ValueError("The return value of `loss` callable has wrong shape.")
            rows.append(r)
        return torch.stack(rows, dim=1)

    obj = make_loss(rho_fn, f_scale)
    obj.rho(f0)  # shape check at x0, as scipy does
    return obj


def _wrap_callback(callback: Callable, ns: Namespace) -> Callable[[dict], bool]:
    """Engine-side callback: build scipy's intermediate result, map StopIteration."""
    try:
        params = set(inspect.signature(callback).parameters)
    except (TypeError, ValueError):
        params = set()
    by_name = params == {"intermediate_result"}

    def engine_callback(state: dict) -> bool:
        res = OptimizeResult(x=ns.to_user(state["x"][0].clone()),
                             fun=ns.to_user(state["f_true"][0].clone()),
                             nit=int(state["nit"][0]), nfev=int(state["nfev"][0]))
        res["cost"] = _scalar(state["cost"][0], ns)
        try:
            if by_name:
                callback(intermediate_result=res)
            else:
                callback(res.x)
        except StopIteration:
            return True
        return False

    return engine_callback


def _scalar(t: torch.Tensor, ns: Namespace) -> Any:
    return t.clone() if ns.kind == "torch" else float(t)


def _build_result(out: dict, ns: Namespace, method: str, jac: Any,
                  bounded: bool) -> OptimizeResult:
    """scipy's OptimizeResult for problem 0 of the engine output."""
    status = int(out["status"][0])
    if method in ("trf", "gn", "gd") and not bounded:
        active = torch.zeros_like(out["x"][0])  # scipy's unbounded 'trf' returns float zeros
    else:
        active = out["active_mask"][0]
    njev: int | None = int(out["njev"][0])
    if method == "lm" and not callable(jac):
        njev = None
    return OptimizeResult(
        x=ns.to_user(out["x"][0]),
        cost=_scalar(out["cost"][0], ns),
        fun=ns.to_user(out["f_true"][0]),
        jac=ns.to_user(out["J"][0]),
        grad=ns.to_user(out["g"][0]),
        optimality=_scalar(out["optimality"][0], ns),
        active_mask=ns.to_user(active),
        nfev=int(out["nfev"][0]),
        njev=njev,
        status=status,
        message=codes.message(status),
        success=status > 0 and status not in (codes.NONFINITE, codes.SINGULAR),
    )
