"""``curve_fit``: scipy's nonlinear regression as a batch of one.

The data (:mod:`._data`), the whitened model (:mod:`._model`, calling ``f``
row by row as scipy does), MINPACK's bookkeeping for 'lm' (:mod:`._leastsq`)
and the covariance (:mod:`._covariance`) are those of
:func:`batch_curve_fit`; the minimisation is :func:`least_squares`, and for
'lm' the results are translated to what scipy's ``leastsq`` reports.

``least_squares`` receives the model's functions as :class:`_EngineCall`
objects: a function of one point (its checks at ``x0``), and of the engine's
rows ``(1, N)`` for a numpy model on the host (``engine_rows``, which the
frontend's row adapter calls directly): the model hands ``f`` the parameters
as scalars and returns arrays of its own, so the engine's host rows are read
without a copy and its float64 residuals are not copied back (the values are
the same; scipy's ``curve_fit`` example: about 3 % of a fit). An unweighted
analytic Jacobian is the array the user's ``jac`` returned, which its next
call may refill: that one is copied.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
from scipy.optimize import OptimizeWarning

from .. import _implicit as implicit
from .._arrays import Namespace, as_numpy, detect_namespace, to_host
from .._batch import minpack_bookkeeping
from .._engine.host_scalars import host_rows
from .._least_squares import least_squares
from .._validation import leastsq_rules, prepare_bounds
from ._covariance import COV_MSG, finish_covariance, normal_inverse, pivoted_inverse, svd_pinv
from ._data import (
    FitData,
    any_bound,
    count_parameters,
    feasible_start,
    float_array,
    method_for_bounds,
    sigma_transform,
    too_many_parameters,
    torch_lead,
    unbounded_default,
)
from ._leastsq import (
    STATUS_TO_IER,
    LeastsqBook,
    MaxfevReached,
    dfun_shape_error,
    epsfcn_diff_step,
    leastsq_message,
    leastsq_options,
    lm_tolerances,
    minpack_qr_outputs,
    minpack_step,
    reject_loss,
)
from ._model import WhitenedModel, as_tensor

#: Start of the message with which ``least_squares`` refuses non-finite residuals at x0.
NONFINITE_START = "Residuals are not finite in the initial point"
_CPU = torch.device("cpu")
#: The problem index of :class:`_OneProblem` (read, never written)
_ONE_ID = torch.zeros(1, dtype=torch.long)


def curve_fit(
    f: Callable,
    xdata: Any,
    ydata: Any,
    p0: Any = None,
    sigma: Any = None,
    absolute_sigma: bool = False,
    check_finite: bool | None = None,
    bounds: Any = (-np.inf, np.inf),
    method: str | None = None,
    jac: Callable | str | None = None,
    *,
    full_output: bool = False,
    nan_policy: str | None = None,
    **kwargs: Any,
) -> tuple:
    """Fit a model ``f(xdata, *params)`` to data by nonlinear least squares.

    A drop-in replacement for :func:`scipy.optimize.curve_fit` (scipy 1.17
    behaviour, errors and warnings) whose minimisation runs on
    :func:`torchimize_scipy.least_squares`. It assumes
    ``ydata = f(xdata, *params) + eps`` and minimises
    ``sum(((f(xdata, *params) - ydata) / sigma)**2)`` (or the generalised
    ``r.T @ inv(sigma) @ r`` for a 2-D ``sigma``).

    Parameters
    ----------
    f : callable
        The model ``f(x, p_1, ..., p_N)``: the independent variable first, then
        the ``N`` parameters as separate scalar arguments. It returns an array
        of the shape of ``ydata`` (or one that broadcasts against it).
    xdata : array_like or object
        The independent variable. A list, tuple, numpy array or tensor is
        converted to a float array (e.g. ``(k, M)`` for ``k`` predictors, or a
        tuple of ``k`` arrays) and checked as scipy does; any other object is
        passed to ``f`` unchanged.
    ydata : array_like or Tensor, shape (M,)
        The observations.
    p0 : array_like or Tensor, shape (N,), optional
        Initial guess. By default ``N`` is read from ``f``'s signature (the
        number of positional parameters minus one) and the guess is 1 for
        unbounded parameters, the midpoint of two finite bounds, or one unit
        inside a single finite bound.
    sigma : None, scalar, array_like of shape (M,) or (M, M), optional
        Standard deviations of ``ydata`` (scalar or 1-D), or the covariance
        matrix of its errors (2-D, must be positive definite). None means
        ones.
    absolute_sigma : bool, optional
        If True, ``sigma`` is absolute and ``pcov`` is ``inv(J.T @ J)``. If
        False (default), only the relative sizes of ``sigma`` matter and
        ``pcov`` is scaled by the reduced chi-square ``chisq / (M - N)``.
    check_finite : bool, optional
        Reject NaN or inf in ``xdata``/``ydata`` with a ``ValueError``.
        Default: True unless ``nan_policy`` is given.
    bounds : 2-tuple of array_like or `scipy.optimize.Bounds`, optional
        Lower and upper bounds on the parameters (scalars or length ``N``).
    method : {'lm', 'trf', 'dogbox', 'gn', 'gd'}, optional
        Default 'lm' without bounds, 'trf' with bounds. 'lm' is scipy's
        ``leastsq`` (MINPACK Levenberg-Marquardt), here
        ``least_squares(method='lm')`` with ``leastsq``'s tolerances; 'gn' and
        'gd' are torchimize_scipy's Gauss-Newton and gradient descent.
    jac : callable or {'2-point', '3-point', 'cs', 'autograd'}, optional
        ``jac(x, p_1, ..., p_N)`` returning the ``(M, N)`` Jacobian of the
        model (it is whitened with ``sigma`` here), or a finite-difference
        scheme; 'autograd' (ours) differentiates ``f`` with :mod:`torch.func`,
        so ``f`` must then be torch code (it receives ``xdata``, ``ydata``-like
        data and the parameters as tensors). Default: '2-point'.
    full_output : bool, optional
        Also return ``infodict``, ``mesg`` and ``ier``.
    nan_policy : {'raise', 'omit', None}, optional
        'raise' raises on NaN in the data, 'omit' drops the observations with
        a NaN in ``ydata`` or in any row of ``xdata`` (and the matching entries
        of ``sigma``); None does nothing special. Giving it turns
        ``check_finite`` off by default.
    **kwargs
        Passed to :func:`torchimize_scipy.least_squares` (e.g. ``x_scale``,
        ``loss``, ``ftol``, ``max_nfev``, ``device``, ``dtype``). ``maxfev``
        means ``max_nfev``. For 'lm', ``leastsq``'s keywords are understood:
        ``ftol``, ``xtol``, ``gtol`` (defaults 1.49012e-8, 1.49012e-8, 0),
        ``maxfev`` (default ``200 (N + 1)``, ``100 (N + 1)`` with a callable
        ``jac``), ``epsfcn`` (``diff_step = sqrt(epsfcn)``), ``diag``
        (``x_scale = 1 / diag``), ``col_deriv`` and ``factor``.

    Returns
    -------
    popt : ndarray or Tensor, shape (N,)
        Optimal parameters.
    pcov : ndarray or Tensor, shape (N, N)
        Estimated covariance of ``popt`` (``inf`` where it cannot be
        estimated; see the module notes for its formula).
    infodict : dict
        Only with ``full_output``: ``nfev`` and ``fvec`` (the whitened
        residuals at ``popt``); for 'lm' also ``fjac`` (shape ``(N, M)``,
        MINPACK's layout: ``triu(fjac.T[:N])`` is ``R`` of the pivoted QR of
        the Jacobian MINPACK factored last, the rest its Householder vectors;
        see the module notes), ``ipvt`` (the
        0-based pivot indices, int32, as scipy 1.17 returns them), ``qtf``
        (the first ``N`` entries of ``Q.T @ fvec``) and, with a callable
        ``jac``, ``njev``.
    mesg : str
        Only with ``full_output``: the termination message (``leastsq``'s
        texts for 'lm').
    ier : int
        Only with ``full_output``: ``leastsq``'s ``info`` (1 to 4 is success)
        for 'lm'; the ``least_squares`` status otherwise.

    Raises
    ------
    ValueError
        For NaN or inf in the data when checked, empty ``ydata``, a ``sigma``
        of the wrong shape or not positive definite, bounds with 'lm', or a
        signature from which ``N`` cannot be read.
    RuntimeError
        If the minimisation fails (``"Optimal parameters not found: ..."``).

    Warns
    -----
    OptimizeWarning
        If the covariance of the parameters cannot be estimated.

    Notes
    -----
    numpy input (``p0``, ``ydata`` and ``xdata`` not tensors) gives numpy
    output and ``f`` receives float64 numpy data and scalar parameters, as
    under scipy. If any of ``p0``, ``ydata``, ``xdata`` is a tensor, the data
    are converted to tensors on the device and in the floating dtype of the
    first one of them (unless ``device=``/``dtype=`` say otherwise), ``f``
    receives tensors (the parameters as 0-d tensors) and ``popt``, ``pcov``
    and the arrays of ``infodict`` are tensors there.

    Examples
    --------
    >>> import numpy as np
    >>> from torchimize_scipy import curve_fit
    >>> def func(x, a, b, c):
    ...     return a * np.exp(-b * x) + c
    >>> xdata = np.linspace(0, 4, 50)
    >>> ydata = func(xdata, 2.5, 1.3, 0.5)
    >>> popt, pcov = curve_fit(func, xdata, ydata)
    >>> np.round(popt, 6)
    array([2.5, 1.3, 0.5])
    >>> popt, pcov = curve_fit(func, xdata, ydata, bounds=(0, [3., 1., 0.5]))
    >>> np.round(popt, 4)
    array([2.4079, 1.    , 0.3902])
    """
    lead = torch_lead(p0, ydata, xdata)
    ns = detect_namespace(lead, kwargs.get("device"), kwargs.get("dtype")) \
        if lead is not None else None

    # ---- number of parameters, bounds, initial guess, method ----------------
    if p0 is None:
        n = count_parameters(f)
    else:
        p0 = np.atleast_1d(to_host(p0))
        n = p0.size
    if unbounded_default(bounds):  # every parameter free: nothing to broadcast or test
        if p0 is None:
            p0 = np.ones(n)
        method = method_for_bounds(method, False)
    else:
        lb, ub = prepare_bounds(bounds, n)
        if p0 is None:
            p0 = feasible_start(lb, ub)
        method = method_for_bounds(method, any_bound(lb, ub))

    # ---- data: conversion, finiteness, NaN policy, sigma --------------------
    if check_finite is None:
        check_finite = nan_policy is None
    y_in, x_in, sigma_in = ydata, xdata, sigma  # the caller's (tensors: gradients)
    ydata = float_array(ydata, check_finite)
    xdata_is_array = isinstance(xdata, list | tuple | np.ndarray | torch.Tensor)
    if xdata_is_array:
        xdata = float_array(xdata, check_finite)
    # else: passed to ``f`` as it is, as scipy does
    if ydata.size == 0:
        raise ValueError("`ydata` must not be empty!")
    data = FitData.single(xdata, xdata_is_array, ydata)
    data.keep_sources(x_in, y_in)
    if not check_finite and nan_policy is not None:
        keep = data.apply_nan_policy(nan_policy, drop=True)
        if keep is not None and sigma is not None:
            sigma = np.asarray(to_host(sigma))
            sigma = sigma[keep[0]] if sigma.ndim == 1 else (
                sigma[keep[0]][:, keep[0]] if sigma.ndim == 2 else sigma)
    data.set_transform(sigma_transform(sigma, None, data.M))
    data.use_graph(x_in, y_in, sigma_in, omitted=data.Y.size != ydata.size)

    if ns is not None:
        p0 = torch.as_tensor(np.asarray(p0, dtype=float), device=ns.device, dtype=ns.dtype)
        kwargs["device"], kwargs["dtype"] = ns.device, ns.dtype
    col_deriv = bool(kwargs.pop("col_deriv", False)) if method == "lm" else False
    problem = _OneProblem(WhitenedModel(f, jac if callable(jac) else None, data, n, col_deriv,
                                        rowwise=True))
    problem.model.vector_jac = method == "lm" and n == 1
    problem.model.finite_for_cholesky = True  # (scipy's error for a covariance sigma)
    jac_arg: Any = problem.jac if callable(jac) else ("2-point" if jac is None else jac)
    if "args" in kwargs:
        raise ValueError("'args' is not a supported keyword argument.")

    if method == "lm":
        reject_loss(kwargs, "curve_fit")
        p0 = p0.reshape(-1)  # (scipy's leastsq flattens p0; least_squares refuses 2-D x0)
        if ns is not None:
            ns_lm = ns
        elif kwargs.get("device") is None and kwargs.get("dtype") is None:
            # numpy data: float64 on the host (what detect_namespace says of a numpy p0)
            ns_lm = Namespace("numpy", _CPU, torch.float64)
        else:
            ns_lm = detect_namespace(p0, kwargs.get("device"), kwargs.get("dtype"))
        popt, cov, infodict, mesg, ier, ysize, chisq = _fit_lm(
            problem, p0, n, data.M, jac_arg, callable(jac), kwargs, ns_lm, full_output)
    else:
        if data.M == 0:  # (scipy fails on it with an IndexError in its covariance)
            raise ValueError("`ydata` holds no observation to fit (none is left after "
                             "`nan_policy='omit'`).")
        if "max_nfev" not in kwargs:
            kwargs["max_nfev"] = kwargs.pop("maxfev", None)
        try:
            res = least_squares(problem.fun, p0, jac=jac_arg, bounds=bounds,
                                method=method, **kwargs)
        except ValueError as e:
            _name_zero_sigma(e, data)
            raise
        if not res.success:
            raise RuntimeError("Optimal parameters not found: " + res.message)
        infodict = {"nfev": res.nfev, "fvec": res.fun}
        ier, mesg, popt = res.status, res.message, res.x
        ysize = as_numpy(res.fun).size
        chisq = 2 * float(as_numpy(res.cost))  # pcov is not differentiated
        cov = normal_inverse(as_tensor(_dense(res.jac))[None], svd_pinv, gram_first=False)

    if isinstance(cov, torch.Tensor):
        ok, chisqs = (torch.ones(1, dtype=torch.bool, device=cov.device),
                      torch.tensor([chisq], dtype=torch.float64, device=cov.device))
    else:  # 'lm': the covariance of MINPACK's R, on the host
        ok, chisqs = np.ones(1, dtype=bool), np.array([chisq], dtype=np.float64)
    pcov, indeterminate = finish_covariance(cov, ok, n, ysize, chisqs, absolute_sigma)
    if indeterminate:
        warnings.warn(COV_MSG, category=OptimizeWarning, stacklevel=2)
    pcov = as_tensor(pcov[0]).to(ns.device, ns.dtype) if ns is not None else as_numpy(pcov[0])
    if isinstance(popt, np.ndarray) and pcov.dtype != popt.dtype:  # 'lm' with dtype=float32
        pcov = pcov.astype(popt.dtype)
    if full_output:
        return popt, pcov, infodict, mesg, ier
    return popt, pcov


class _OneProblem:
    """:class:`WhitenedModel` as ``least_squares`` calls it: 1-D parameters, one problem.

    It also keeps the first residuals (``leastsq`` starts from non-finite
    ones, see :func:`_nonfinite_start_lm`) and refuses a trial beyond
    ``maxfev`` (MINPACK's ``info = 5``).
    """

    def __init__(self, model: WhitenedModel) -> None:
        self.model = model
        self.ids = _ONE_ID
        self.first_r: Any = None
        #: the functions handed to ``least_squares`` (:class:`_EngineCall`): of a point, and
        #: of the engine's rows for a numpy model
        self.fun = _EngineCall(self.residuals, self.residual_rows)
        self.fd_jac = _EngineCall(self.fd_jacobian, self.fd_jacobian_rows)
        self.jac = _EngineCall(self.jacobian, self.jacobian_rows)

    def evaluate(self, p: Any) -> Any:
        """Whitened residuals at ``p`` (no bookkeeping)."""
        return self.model.evaluate(p[None], self.ids)[0]

    def residuals(self, p: Any) -> Any:
        """The function handed to ``least_squares``."""
        book = self.model.book
        if book is not None and book.any_spent() and not implicit.evaluating():
            raise MaxfevReached
        r = self.model.residuals(p[None], self.ids)[0]
        if self.first_r is None:
            self.first_r = r
        return r

    def residual_rows(self, x: torch.Tensor, idx: Any) -> Any:
        """:meth:`residuals` at the engine's rows ``x (1, n)`` (a CPU float64 tensor of a
        numpy model), as ``(1, m)``: the parameters reach ``f`` as scalars, so its host rows
        are read without a copy (the engine never writes them, nor does the book)."""
        book = self.model.book
        if book is not None and book.any_spent() and not implicit.evaluating():
            raise MaxfevReached
        r = self.model.residuals(_host_point(x), self.ids)
        if self.first_r is None:
            self.first_r = r[0]
        return r

    def jacobian(self, p: Any) -> Any:
        """The user's Jacobian, whitened."""
        return self.model.jacobian(p[None], self.ids)[0]

    def jacobian_rows(self, x: torch.Tensor, idx: Any) -> Any:
        """:meth:`jacobian` at the engine's rows (as :meth:`residual_rows`), ``(1, m, N)``,
        row-major: a copy, since unweighted it is the array the user's ``jac`` returned,
        which the next call may refill (the engine keeps the values it is handed)."""
        return np.array(self.model.jacobian(_host_point(x), self.ids), order="C")

    def fd_jacobian_rows(self, x: torch.Tensor, idx: Any) -> Any:
        """:meth:`fd_jacobian` at the engine's rows (as :meth:`residual_rows`), ``(1, m, N)``,
        made row-major (a copy of the differences' transposed view, the one the frontend
        makes of a point's value)."""
        return np.ascontiguousarray(self.model.fd_jacobian(_host_point(x), self.ids))

    def fd_jacobian(self, p: Any) -> Any:
        """MINPACK's forward differences ``(m, N)``.

        A numpy ``J`` may be a transposed view: ``least_squares`` copies what
        a numpy Jacobian function returns into its own row-major array anyway
        (one copy instead of two); a tensor is made row-major here.
        """
        J = self.model.fd_jacobian(p[None], self.ids)[0]
        return J.contiguous() if isinstance(J, torch.Tensor) else J


class _EngineCall:
    """One of :class:`_OneProblem`'s functions as ``least_squares`` receives it.

    Called with a point ``(N,)`` (the frontend's first evaluation and checks); its
    ``engine_rows`` takes the engine's rows ``(1, N)`` directly
    (:class:`~torchimize_scipy._user_functions.RowwiseFunction` uses it for a numpy
    model on the host instead of copying each row out and each value back in: the
    model hands ``f`` the parameters as scalars and returns arrays of its own).
    """

    __slots__ = ("point", "engine_rows")
    #: the model calls ``f`` in the caller's grad mode itself (``WhitenedModel._call``)
    CALLER_GRAD_INSIDE = True

    def __init__(self, point: Callable, rows: Callable | None) -> None:
        self.point = point
        self.engine_rows = rows

    def __call__(self, p: Any) -> Any:
        return self.point(p)


def _host_point(x: torch.Tensor) -> np.ndarray:
    """The engine's rows ``x (1, N)`` (CPU, float64) as a host array: the one it remembers,
    or a copy."""
    known = host_rows(x)
    return known if known is not None else np.array(x.tolist(), dtype=np.float64)


def _dense(J: Any) -> Any:
    """``J`` itself, or a sparse Jacobian (a sparse ``jac`` or ``jac_sparsity``) or a
    linear operator as a dense array for the covariance (scipy's SVD of them fails)."""
    if scipy.sparse.issparse(J):
        return J.toarray()
    if isinstance(J, scipy.sparse.linalg.LinearOperator):
        return J.matmat(np.eye(J.shape[1]))
    if isinstance(J, torch.Tensor) and J.layout != torch.strided:
        return J.to_dense()
    return J


def _all_finite(a: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return bool(torch.isfinite(a).all())
    return bool(np.isfinite(np.asarray(a, dtype=float)).all())


def _name_zero_sigma(error: ValueError, data: FitData) -> None:
    """Re-raise ``least_squares``'s non-finite start naming a zero (or NaN) ``sigma`` as its
    cause (the weights ``1 / sigma`` are then infinite, or NaN)."""
    if (data.tkind == "diag" and str(error).startswith(NONFINITE_START)
            and not np.isfinite(data.T).all()):
        if np.isinf(data.T).any():
            raise ValueError(f"{NONFINITE_START}: `sigma` contains zeros (a standard "
                             "deviation of 0 gives an infinite weight).") from error
        raise ValueError(f"{NONFINITE_START}: `sigma` contains NaN.") from error


def _fit_lm(problem: _OneProblem, p0: Any, n: int, ysize_data: int, jac_arg: Any,
            user_jac: bool, kwargs: dict, ns: Any, full_output: bool = True) -> tuple:
    """Run ``least_squares(method='lm')`` as scipy's ``leastsq`` would run MINPACK.

    With a callable or forward-difference Jacobian (``lmder``/``lmdif``), the
    model's :class:`LeastsqBook` counts evaluations the way MINPACK does
    (finite-difference evaluations included in ``nfev`` and ``maxfev``), and
    keeps the Jacobian of MINPACK's last Jacobian evaluation for
    ``fjac``/``ipvt``/``qtf`` and ``pcov``. Other string Jacobians ('3-point',
    'cs', 'autograd') are ours: they use ``least_squares``'s counts and the
    Jacobian at the solution. Without ``full_output`` the ``infodict`` (None) and
    MINPACK's ``fjac``/``qtf`` are not formed: the covariance needs ``R`` and the
    pivots of the QR alone (:func:`minpack_qr_outputs`' ``factors_only``).
    """
    if ysize_data != 1 and n > ysize_data:
        raise TypeError(too_many_parameters(n, ysize_data))
    if ysize_data == 1:  # the model may broadcast: check its real length first
        m = np.atleast_1d(as_numpy(problem.evaluate(p0))).size
        if n > m:
            raise TypeError(f"Improper input: func input vector length N={n} must"
                            f" not exceed func output vector length M={m}")
    opts = leastsq_options(kwargs, n, user_jac)
    model = problem.model
    minpack_fd = jac_arg == "2-point"
    if minpack_fd:
        # MINPACK's forward differences evaluate f in one call of its n shifted points:
        # neither a sparsity pattern nor a map of workers would be used (scipy's leastsq
        # takes neither: a TypeError; least_squares' 'lm' refuses jac_sparsity)
        for key in ("jac_sparsity", "workers"):
            if kwargs.get(key) is not None:
                raise TypeError(f"curve_fit() with method='lm' got an unexpected keyword "
                                f"argument '{key}' (MINPACK's forward differences take "
                                "none; use method='trf' or 'dogbox').")
    rel = None
    if user_jac or minpack_fd:
        rel = minpack_step(opts["epsfcn"], kwargs.pop("diff_step", None), n, ns.dtype)
    if not _all_finite(p0):
        # scipy's leastsq runs MINPACK from a non-finite guess (least_squares would
        # refuse it as outside the bounds)
        f0 = problem.evaluate(p0)
        if _all_finite(f0):
            raise ValueError("`p0` contains NaN or inf while the residuals there are "
                             "finite: give a finite initial guess.")
        return _nonfinite_start_lm(problem, p0, n, f0, user_jac, rel, opts)
    if rel is not None:
        # (the residuals at MINPACK's last Jacobian serve qtf, of full_output only)
        model.book = LeastsqBook(opts["maxfev"], rel, 1, ns.device,
                                 keep_residuals=full_output)
        jac_arg = problem.jac if user_jac else problem.fd_jac
    else:
        epsfcn_diff_step(opts["epsfcn"], kwargs)

    problem.first_r = None
    book = model.book
    # with the book, the covariance and counts are those of MINPACK's last Jacobian, which
    # precedes the stopping trial: the engine evaluates none at the point that trial
    # accepts (the Jacobian scipy evaluates after MINPACK returns; nothing here reads it)
    # (the differences' evaluations need no count in the engine: the book stops the
    # solve at maxfev with MaxfevReached)
    final = minpack_bookkeeping() if book is not None else contextlib.nullcontext()
    try:
        with final, leastsq_rules(opts["factor"]):
            res = least_squares(problem.fun, p0, jac=jac_arg, method="lm",
                                **lm_tolerances(opts), **kwargs)
    except MaxfevReached:
        raise RuntimeError("Optimal parameters not found: "
                           + leastsq_message(opts, 5)) from None
    except ValueError as e:
        shape_error = dfun_shape_error(e) if user_jac else None
        if shape_error is not None:
            raise shape_error from None
        if (problem.first_r is None or _all_finite(problem.first_r)
                or not str(e).startswith(NONFINITE_START)):
            raise
        model.book = None
        return _nonfinite_start_lm(problem, p0, n, problem.first_r, user_jac, rel, opts)
    finally:
        model.book = None
    ier = STATUS_TO_IER.get(int(res.status))
    if ier is None:  # our non-finite / singular stops: no MINPACK equivalent
        raise RuntimeError("Optimal parameters not found: " + res.message)
    if ier not in (1, 2, 3, 4):
        raise RuntimeError("Optimal parameters not found: " + leastsq_message(opts, ier))
    mesg = leastsq_message(opts, ier) if full_output else None  # (returned with infodict)

    nfev, njev = res.nfev, res.njev
    if book is not None:
        J, *jac_f, njev = book.last_minpack_jacobian_of_one(int(res.status))
        jac_f = jac_f[0] if jac_f else None  # (kept with full_output)
        if minpack_fd:
            nfev = res.nfev + n * njev
    else:
        jac_f, J = res.fun, res.jac
    fvec = as_numpy(res.fun)
    fjac, ipvt, qtf, R = minpack_qr_outputs(as_numpy(J), as_numpy(jac_f) if full_output
                                            else None, factors_only=not full_output)
    cov = pivoted_inverse(R[None], ipvt[None])  # numpy: one small matrix on the host
    infodict = _infodict(res.fun, nfev, njev if user_jac else None, fjac, ipvt, qtf,
                         res.x) if full_output else None
    chisq = float(np.sum(fvec.astype(float) ** 2))
    return res.x, cov, infodict, mesg, ier, fvec.size, chisq


def _infodict(fvec: Any, nfev: int, njev: int | None, fjac: np.ndarray, ipvt: np.ndarray,
              qtf: np.ndarray, like: Any) -> dict[str, Any]:
    """``leastsq``'s ``infodict``: the arrays in the kind (numpy or a tensor) of ``like``."""
    def to_user(a: np.ndarray, dtype: Any = None) -> Any:
        if not isinstance(like, torch.Tensor):
            return a
        return torch.as_tensor(a, device=like.device, dtype=dtype or like.dtype)

    info: dict[str, Any] = {"fvec": fvec, "nfev": int(nfev)}
    if njev is not None:
        info["njev"] = int(njev)
    info.update(fjac=to_user(fjac), ipvt=to_user(ipvt, torch.int32), qtf=to_user(qtf))
    return info


def _nonfinite_start_lm(problem: _OneProblem, p0: Any, n: int, f0: Any, user_jac: bool,
                        rel: Any, opts: dict) -> tuple:
    """scipy's ``leastsq`` result when the residuals at ``p0`` are not finite.

    MINPACK evaluates the Jacobian at ``p0`` and then stops on its gradient
    test (every comparison with a NaN norm fails), so ``curve_fit`` returns
    ``p0`` itself with ``ier = 4``; the covariance is indeterminate (``inf``
    with an :class:`~scipy.optimize.OptimizeWarning`). The Jacobian is
    evaluated as MINPACK does (user ``jac``, or ``n`` forward differences), so
    ``nfev``/``njev`` count what was called; ``fjac``/``ipvt``/``qtf`` come
    from its pivoted QR when it is finite, else they are NaN (``ipvt`` the
    identity order).
    """
    nfev, J = 1, None
    if user_jac:
        J = problem.jacobian(p0)
    elif rel is not None:  # MINPACK's forward differences from f0
        book = LeastsqBook(np.inf, rel, 1, "cpu", keep_residuals=True)
        book.record_call(problem.ids, as_tensor(p0)[None], as_tensor(f0)[None])
        problem.model.book = book
        try:
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is expected here
                J = problem.fd_jacobian(p0)
        finally:
            problem.model.book = None
        nfev += n
    fvec = as_numpy(f0)
    m = np.atleast_1d(fvec).size
    if J is not None and _all_finite(J):
        with np.errstate(invalid="ignore", over="ignore"):
            fjac, ipvt, qtf, _ = minpack_qr_outputs(as_numpy(J).reshape(m, n), fvec.reshape(m))
    else:
        fjac, ipvt, qtf = (np.full((n, m), np.nan), np.arange(n, dtype=np.int32),
                           np.full(n, np.nan))
    popt = p0.detach().clone() if isinstance(p0, torch.Tensor) else np.array(p0, dtype=np.float64)
    infodict = _infodict(f0, nfev, 1 if user_jac else None, fjac, ipvt, qtf, popt)
    with np.errstate(invalid="ignore", over="ignore"):
        chisq = float(np.sum(fvec.astype(float) ** 2))
    cov = np.full((1, n, n), np.nan)
    return popt, cov, infodict, leastsq_message(opts, 4), 4, m, chisq
