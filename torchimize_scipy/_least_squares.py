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
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeResult

from . import _implicit as implicit
from ._arrays import Namespace, as_numpy
from ._batch import engine_mode_of_this_call
from ._blas_threads import serial_torch, user_threads
from ._driver import EngineRun, initial_state, prefers_gram, solve
from ._engine import status as codes
from ._engine.loop import RESULT_KEYS, one_problem_slots
from ._frontend import (
    all_finite,
    check_residuals_and_loss,
    first_value,
    jacobian_at_x0,
    jacobian_finite_at_x0,
    one_problem_ids,
    prepare,
)
from ._jac_forms import result_jacobian
from ._results import build_one_result
from ._user_functions import caller_grad
from ._validation import check_options


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
        an ``(m, n)`` array_like, a ``scipy.sparse`` matrix or array, a
        torch sparse tensor, a ``scipy.sparse.linalg.LinearOperator`` or a
        torch operator (``shape == (m, n)``, ``matvec``/``rmatvec`` on 1-D
        tensors, optionally ``column_norms()``); sparse and operator
        Jacobians are used through products ('trf' and 'dogbox' with
        ``tr_solver='lsmr'``). A Jacobian that is not finite at ``x0``
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
    tr_solver : {None, 'exact', 'lsmr'}, optional
        As scipy: 'exact' factorises the dense Jacobian, 'lsmr' solves a 2-D
        subspace problem ('trf') or the Gauss-Newton step ('dogbox') with a
        batched LSMR, using the Jacobian through products only. None picks
        'exact' for a dense Jacobian and 'lsmr' for a sparse or operator one
        (``jac_sparsity`` included), as scipy.
    tr_options : dict, optional
        With ``tr_solver='lsmr'``: LSMR's ``atol``, ``btol``, ``conlim``,
        ``maxiter`` (and ``x0``), plus ``damp`` and ``regularize`` ('trf') as
        scipy takes them; an unknown key is scipy's ``TypeError``, and a
        ``tr_options`` that is not a dict a ``TypeError``. With 'exact' and
        with 'lm' it is ignored, as scipy ignores it, with a ``UserWarning``
        naming it.
    jac_sparsity : {None, array_like, sparse matrix}, optional, shape (m, n)
        Which entries of the Jacobian can be nonzero, for finite differences:
        columns that share no row are perturbed together (scipy's greedy
        grouping, with the columns taken largest first: often fewer groups),
        the Jacobian stays sparse and ``res.jac`` is a
        ``scipy.sparse.csr_array`` (a torch sparse tensor for torch input).
        A torch ``fun`` evaluates all groups in one vmapped call. Ignored
        with a callable ``jac``, as in scipy; refused with 'lm' and
        ``tr_solver='exact'`` (scipy's errors).
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
        status, message, success`` with scipy's meanings; ``jac`` is sparse
        for a sparse Jacobian and a ``LinearOperator`` for an operator, as in
        scipy.

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
    p = prepare(fun, x0, jac, bounds, method, ftol, xtol, gtol, x_scale, diff_step, args, kwargs,
                device=device, dtype=dtype, batch=False, workers=workers)
    # a Jacobian kept sparse on the CPU (jac_sparsity): no torch parallel region in the
    # checks and the evaluations at x0 either (the caller's functions keep their threads;
    # _blas_threads.serial_torch, and the driver's note on it)
    with engine_mode_of_this_call() as mode, \
            serial_torch(p.x0.device) if jac_sparsity is not None else nullcontext():
        ns, n = p.ns, p.x0.shape[1]
        try:
            f0_user = p.fun.call_one(p.x0[0])
        except RuntimeError as exc:
            implicit.check_numpy_error(exc)
            raise
        track = implicit.requested(ns, fun, args, kwargs, f_scale, loss, first_out=f0_user)
        f0_raw = np.atleast_1d(as_numpy(f0_user))
        del f0_user  # its graph, if any, is not needed
        if f0_raw.ndim != 1:
            if not callable(jac):  # (scipy differences at x0 first: approx_derivative's)
                raise ValueError("`f0` passed has more than 1 dimension.")
            raise ValueError("`fun` must return at most 1-d array_like. "
                             f"f0.shape: {f0_raw.shape}")
        f0 = first_value(p.fun.ns, f0_raw, (1, f0_raw.shape[0]), "fun")
        if not all_finite(f0):
            raise ValueError("Residuals are not finite in the initial point.")
        m = f0.shape[1]
        loss_obj = check_residuals_and_loss(method, n, f0, loss, f_scale, ns, rowwise=True)
        if f0_raw.dtype in _NARROW_FLOATS and f0_raw.dtype.itemsize < ns.dtype.itemsize:
            # float32 (or float16) residuals take default steps sized by their own
            # epsilon (scipy gh-12991; a float64-sized step leaves float16 residuals
            # unchanged: a zero Jacobian); they were of that dtype, so this cast is exact
            p.jac.fd_dtype = _NARROW_FLOATS[f0_raw.dtype]
        J0, tr_solver = jacobian_at_x0(p, f0, method, jac, jac_sparsity, tr_solver, tr_options,
                                       x_scale)
        dense_jac = isinstance(J0, torch.Tensor) and J0.layout == torch.strided

        if callback is not None and not callable(callback):  # (scipy's, from inspect)
            raise TypeError(f"{callback!r} is not a callable object")
        if method == "lm" and callback is not None:
            warnings.warn("Callback function specified, but not supported with `lm` method.",
                          stacklevel=2)
            callback = None

        if n == 0:
            # nothing to optimise: scipy reports the start ('lm': MINPACK's improper input)
            out = _no_variables(f0, loss_obj, method)
        else:
            if dense_jac and (J0.dtype != ns.dtype or J0.device != ns.device):
                J0 = J0.to(device=ns.device, dtype=ns.dtype)
            if not jacobian_finite_at_x0(J0):
                # scipy's 'trf' and 'dogbox' fail in their first factorisation of J0
                # (ValueError / LinAlgError); every method refuses it here, by name
                raise ValueError("array must not contain infs or NaNs: the Jacobian is not "
                                 "finite in the initial point.")
            start = initial_state(one_problem_ids(ns.device), p.x0, f0, J0,
                                  p.lb, p.ub, p.x_scale)
            keys = _ONE_RESULT_KEYS[dense_jac, mode.final_jacobian]
            out = solve(EngineRun(
                method=method, fun=p.fun, jac=p.jac, start=start, loss=loss_obj, ftol=p.ftol,
                xtol=p.xtol, gtol=p.gtol, max_nfev=max_nfev, bounded=p.bounded,
                jac_scale=isinstance(p.x_scale, str), use_gram=prefers_gram(m, n), verbose=verbose,
                callback=_wrap_callback(callback, ns) if callback is not None else None,
                out=one_problem_slots(keys),
                tr_solver=tr_solver, tr_options=tr_options,
                final_jacobian=mode.final_jacobian,
                evals_per_jacobian=mode.evals_per_jacobian, lm_factor=p.lm_factor))
            if track:
                idx = torch.zeros(1, dtype=torch.long, device=ns.device)
                implicit.attach(out, lambda x: p.fun.raw(x, idx), loss_obj)
        sparse_J = None if dense_jac or n == 0 else out.pop("J", None)
        result = build_one_result(out, ns, method, jac, p.bounded)
        if sparse_J is not None:
            result.jac = result_jacobian(sparse_J, numpy_caller=ns.kind != "torch")
        if ns.kind == "numpy" and f0_raw.dtype in _NARROW_FLOATS and method != "lm":
            # scipy's 'trf' and 'dogbox' return fun's own dtype (MINPACK's 'lm': float64),
            # and the linear loss's cost, 0.5 f.f, in it too (a robust one's is float64)
            result.fun = result.fun.astype(f0_raw.dtype)
            if isinstance(loss, str) and loss == "linear":
                result.cost = f0_raw.dtype.type(result.cost)
        if verbose >= 1:
            initial_cost = float(loss_obj.cost(f0)[0]) if loss_obj is not None else float(
                0.5 * (f0 * f0).sum())
            print(result.message)
            print(f"Function evaluations {result.nfev}, initial cost {initial_cost:.4e}, "
                  f"final cost {float(result.cost):.4e}, "
                  f"first-order optimality {float(result.optimality):.2e}.")
        return result


def _one_result_keys(dense_jac: bool, final_jacobian: bool) -> tuple[str, ...]:
    """The engine's result buffers that the one problem's result reads.

    ``nit`` is not a field of scipy's result; a sparse or operator Jacobian
    is handed out by the engine as it is (no dense buffer). Without the final
    Jacobian (:func:`~torchimize_scipy._batch.minpack_bookkeeping`, for
    internal callers that read neither) ``jac`` and ``grad`` would be those
    of the Jacobian before the stopping trial: they are not written, and the
    result holds None for them.
    """
    unread = {"nit"}
    if not dense_jac or not final_jacobian:
        unread.add("J")
    if not final_jacobian:
        unread.add("g")
    return tuple(k for k in RESULT_KEYS if k not in unread)


#: residual dtypes narrower than an engine's float64 (or float32) whose own epsilon sizes the
#: default finite-difference steps, and their torch dtypes
_NARROW_FLOATS = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}

#: :func:`_one_result_keys` by ``(dense_jac, final_jacobian)`` (made once).
_ONE_RESULT_KEYS = {(d, f): _one_result_keys(d, f) for d in (False, True) for f in (False, True)}


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


def _wrap_callback(callback: Callable, ns: Namespace) -> Callable[[dict], bool]:
    """Engine-side callback: build scipy's intermediate result, map StopIteration."""
    try:
        params = set(inspect.signature(callback).parameters)
    except (TypeError, ValueError):
        params = set()
    by_name = params == {"intermediate_result"}
    grad = torch.is_grad_enabled()  # (the caller's mode, as scipy calls it: caller_grad)

    def engine_callback(state: dict) -> bool:
        res = OptimizeResult(x=ns.to_user(state["x"][0].clone()),
                             fun=ns.to_user(state["f_true"][0].clone()),
                             nit=int(state["nit"][0]), nfev=int(state["nfev"][0]))
        cost = state["cost"][0]
        res["cost"] = cost.clone() if ns.kind == "torch" else float(cost)
        try:
            # (the caller's thread counts, also in a sparse solve, and grad mode)
            with user_threads(), caller_grad(grad):
                if by_name:
                    callback(intermediate_result=res)
                else:
                    callback(res.x)
        except StopIteration:
            return True
        return False

    return engine_callback
