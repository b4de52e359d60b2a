r"""``curve_fit`` and ``batch_curve_fit``: scipy's nonlinear regression on our solvers.

:func:`curve_fit` reproduces :func:`scipy.optimize.curve_fit` on
:func:`torchimize_scipy.least_squares`; :func:`batch_curve_fit` fits one model
to B data sets at once on :func:`torchimize_scipy.batch_least_squares`, with
the results a loop of :func:`curve_fit` would give.

The model is :math:`y = f(x, p) + \varepsilon` with :math:`M` observations and
:math:`N` parameters. With the error covariance :math:`\Sigma` (``sigma``
2-D), or :math:`\Sigma = \mathrm{diag}(\sigma_i^2)` (``sigma`` 1-D or scalar,
standard deviations), write :math:`\Sigma = L L^T` (Cholesky) and fit the
*whitened* residuals

.. math::

    r(p) = L^{-1} \bigl(f(x, p) - y\bigr), \qquad
    \hat p = \arg\min_p \lVert r(p) \rVert^2 = \arg\min_p\,
    (f - y)^T \Sigma^{-1} (f - y),

that is :math:`r_i = (f_i - y_i) / \sigma_i` for 1-D ``sigma``. The
minimisation is :func:`torchimize_scipy.least_squares` (or
``batch_least_squares``) for every method, 'lm' included.

Covariance of the estimate (linearisation of the model at :math:`\hat p`;
Seber & Wild, *Nonlinear Regression*, Wiley 1989, ch. 2; Vugrin et al.,
Water Resour. Res. 43, W03423, 2007): with :math:`J = \partial r / \partial p`
at :math:`\hat p`,

.. math::

    \mathrm{Cov}(\hat p) \approx (J^T J)^{-1} \cdot
    \begin{cases} 1 & \text{absolute\_sigma} \\
    s^2 = \lVert r(\hat p) \rVert^2 / (M - N) & \text{otherwise}
    \end{cases}

where :math:`s^2` (the reduced chi-square) rescales ``sigma`` so that the fit
is statistically consistent. :math:`(J^T J)^{-1}` is computed as scipy does:

* 'trf', 'dogbox' (and our 'gn', 'gd'): thin SVD :math:`J = U S V^T`, singular
  values :math:`s_i \le \epsilon \max(M, N) s_1` are discarded and
  :math:`(J^T J)^{+} = V S^{-2} V^T` (Moore-Penrose pseudo-inverse);
* 'lm': QR with column pivoting :math:`J P = Q R` (Businger & Golub 1965,
  MINPACK's ``qrfac``), :math:`(J^T J)^{-1} = P R^{-1} R^{-T} P^T`; an
  exactly singular :math:`R` means the covariance is indeterminate.

:func:`batch_curve_fit` inverts the small matrix :math:`J^T J` directly for
the problems where it is well conditioned (:math:`\kappa_2(J^T J) \le
10^6` in float64, a relative difference of about :math:`10^{-10}` from the
factorisations above, which it costs a fraction of) and factorises
:math:`J` as above for the others.

An indeterminate covariance (singular :math:`R` for 'lm', NaN entries, or
:math:`M \le N` when the scale :math:`s^2` is needed) is returned filled
with ``inf`` together with an :class:`~scipy.optimize.OptimizeWarning`.

scipy's ``leastsq`` (``method='lm'``) takes ``fjac``/``ipvt``/``qtf`` and
``pcov`` from the Jacobian of MINPACK's *last Jacobian evaluation*, which
usually precedes the final step; the Jacobian at the returned ``popt``
would differ from scipy's 'lm' value by about the size of the last step
(typically :math:`10^{-6}`-:math:`10^{-4}` relative). To match scipy, 'lm'
with a callable or the default finite-difference Jacobian emulates MINPACK:
forward differences with MINPACK's step :math:`h_j = \sqrt{\epsilon}\,|p_j|`,
evaluation counts that include them (``nfev``, ``maxfev``), and ``fjac``,
``ipvt``, ``qtf`` and ``pcov`` from the Jacobian of MINPACK's last Jacobian
evaluation (our engine also evaluates one after an accepted final step,
which MINPACK never does; that one is set aside, recognised by the order of
the evaluations: a Jacobian after the last trial). The other Jacobians
('3-point', 'cs', 'autograd') use the Jacobian at the solution.

Where ``leastsq`` starts from non-finite residuals (a NaN ``p0``, a zero
``sigma``, ``check_finite=False`` with an inf in the data), MINPACK evaluates
the Jacobian once and stops on its gradient test; 'lm' here returns what
scipy returns: ``p0``, an indeterminate (``inf``) ``pcov`` with an
:class:`~scipy.optimize.OptimizeWarning`, and ``ier = 4``. The other methods
raise ``least_squares``'s ValueError, naming a zero ``sigma`` when that is
the cause. A ``sigma`` with one entry but two dimensions is refused: scipy
reads it as a standard deviation and fails on the 2-D residuals it makes.

``batch_curve_fit(nan_policy='omit')`` keeps the batch rectangular: each
problem's omitted observations get a zero residual and a zero Jacobian row
(and an identity row and column in a covariance ``sigma``), which leaves the
cost, :math:`J^T J` and the whitening of the kept observations those of the
reduced data set; the reduced chi-square counts each problem's own
observations.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg
import torch
from scipy.optimize import OptimizeWarning

from ._arrays import as_numpy, detect_namespace, to_host
from ._dask import dispatch, has_dask
from ._engine import status as codes
from ._engine.linalg import inverse_and_condition
from ._least_squares import least_squares
from ._user_functions import _ascending_run
from ._validation import prepare_bounds

#: scipy's ``leastsq`` defaults, used for ``method='lm'``.
LEASTSQ_FTOL = 1.49012e-8
LEASTSQ_XTOL = 1.49012e-8
LEASTSQ_GTOL = 0.0
#: Keywords of scipy's ``leastsq`` accepted (and translated) for ``method='lm'``.
LEASTSQ_KEYS = ("col_deriv", "ftol", "xtol", "gtol", "maxfev", "epsfcn", "factor", "diag")
#: least_squares status -> MINPACK ``info`` (the ``ier`` of ``leastsq``).
STATUS_TO_IER = {codes.FTOL: 1, codes.XTOL: 2, codes.FTOL_XTOL: 3, codes.GTOL: 4,
                 codes.MAX_NFEV: 5}
_EPS = float(np.finfo(float).eps)
_COV_MSG = "Covariance of the parameters could not be estimated"


# ---------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------
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
        (``x_scale = 1 / diag``), ``col_deriv`` and ``factor`` (only 100).

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
    lead = _torch_lead(p0, ydata, xdata)
    ns = detect_namespace(lead, kwargs.get("device"), kwargs.get("dtype")) \
        if lead is not None else None

    # ---- number of parameters, bounds, initial guess, method ----------------
    if p0 is None:
        n = _count_parameters(f)
    else:
        p0 = to_host(p0)
        p0 = np.atleast_1d(p0)
        n = p0.size
    lb, ub = prepare_bounds(bounds, n)
    if p0 is None:
        p0 = _feasible_start(lb, ub)
    bounded = bool(np.any((lb > -np.inf) | (ub < np.inf)))
    if method is None:
        method = "trf" if bounded else "lm"
    if method == "lm" and bounded:
        raise ValueError("Method 'lm' only works for unconstrained problems. "
                         "Use 'trf' or 'dogbox' instead.")

    # ---- data: conversion, finiteness, NaN policy, sigma --------------------
    if check_finite is None:
        check_finite = nan_policy is None
    ydata = _float_array(ydata, check_finite)
    if isinstance(xdata, list | tuple | np.ndarray | torch.Tensor):
        xdata_is_array = True
        xdata = _float_array(xdata, check_finite)
    else:
        xdata_is_array = False  # passed to ``f`` as it is, as scipy does
    if ydata.size == 0:
        raise ValueError("`ydata` must not be empty!")
    if not check_finite and nan_policy is not None:
        xdata, ydata, sigma = _apply_nan_policy(nan_policy, xdata, ydata, sigma)
    transform = _sigma_transform(sigma, ydata.size)

    if ns is not None:
        data = _TorchData(xdata if xdata_is_array else None, ydata, transform,
                          ns.device, ns.dtype)
        p0 = torch.as_tensor(np.asarray(p0, dtype=float), device=ns.device, dtype=ns.dtype)
        kwargs["device"], kwargs["dtype"] = ns.device, ns.dtype
    else:
        data = None
    col_deriv = bool(kwargs.pop("col_deriv", False)) if method == "lm" else False
    model = _Model(f, jac if callable(jac) else None, xdata, xdata_is_array, ydata, transform,
                   data, col_deriv)

    if callable(jac):
        jac_arg: Any = model.jacobian
    elif jac is None:
        jac_arg = "2-point"
    else:
        jac_arg = jac
    if jac_arg == "autograd" and data is None:
        # ``f`` is torch code then: give it tensors even for numpy input
        model.data = _TorchData(xdata if xdata_is_array else None, ydata, transform,
                                None, None)

    if "args" in kwargs:
        raise ValueError("'args' is not a supported keyword argument.")

    if method == "lm":
        _reject_loss_for_lm(kwargs, "curve_fit")
        popt, pcov, infodict, mesg, ier, ysize, cost = _fit_lm(
            model, p0, n, ydata.size, jac_arg, callable(jac), kwargs,
            (ns or detect_namespace(p0, kwargs.get("device"), kwargs.get("dtype"))).dtype)
    else:
        if "max_nfev" not in kwargs:
            kwargs["max_nfev"] = kwargs.pop("maxfev", None)
        try:
            res = least_squares(model.residuals, p0, jac=jac_arg, bounds=bounds, method=method,
                                **kwargs)
        except ValueError as e:
            _name_zero_sigma(e, transform)
            raise
        if not res.success:
            raise RuntimeError("Optimal parameters not found: " + res.message)
        infodict = {"nfev": res.nfev, "fvec": res.fun}
        ier, mesg = res.status, res.message
        fvec = as_numpy(res.fun)
        ysize = fvec.size
        cost = 2 * float(res.cost)
        popt = res.x
        pcov = _pinv_normal_matrix(as_numpy(res.jac))

    pcov = _finish_covariance(pcov, n, ysize, cost, absolute_sigma)
    if ns is not None:
        pcov = torch.as_tensor(pcov, device=ns.device, dtype=ns.dtype)
    if full_output:
        return popt, pcov, infodict, mesg, ier
    return popt, pcov


# ---------------------------------------------------------------------------
# Levenberg-Marquardt path (scipy's ``leastsq``)
# ---------------------------------------------------------------------------
def _fit_lm(model: _Model, p0: Any, n: int, ysize_data: int, jac_arg: Any,
            user_jac: bool, kwargs: dict, dtype: Any) -> tuple:
    """Run ``least_squares(method='lm')`` as scipy's ``leastsq`` would run MINPACK.

    With a callable or forward-difference Jacobian (``lmder``/``lmdif``), the
    Jacobian goes through :class:`_LeastsqBook`, which counts evaluations the
    way MINPACK does (finite-difference evaluations included in ``nfev`` and
    ``maxfev``), and keeps the Jacobian of MINPACK's last Jacobian evaluation
    for ``fjac``/``ipvt``/``qtf`` and ``pcov``. Other string Jacobians
    ('3-point', 'cs', 'autograd') are ours: they use ``least_squares``'s counts
    and the Jacobian at the solution.
    """
    if ysize_data != 1 and n > ysize_data:
        raise TypeError(f"The number of func parameters={n} must not"
                        f" exceed the number of data points={ysize_data}")
    if ysize_data == 1:  # the model may broadcast: check its real length first
        m = np.atleast_1d(as_numpy(model.evaluate(p0))).size
        if n > m:
            raise TypeError(f"Improper input: func input vector length N={n} must"
                            f" not exceed func output vector length M={m}")
    opts = _leastsq_options(kwargs, n, user_jac)
    ftol, xtol, gtol, maxfev, epsfcn = (opts[k] for k in ("ftol", "xtol", "gtol", "maxfev",
                                                          "epsfcn"))
    messages = _leastsq_messages(ftol, xtol, gtol, maxfev)

    minpack_fd = jac_arg == "2-point"
    if not _all_finite(p0):
        # scipy's leastsq runs MINPACK from a non-finite guess (least_squares would
        # refuse it as outside the bounds)
        f0 = model.evaluate(p0)
        if _all_finite(f0):
            raise ValueError("`p0` contains NaN or inf while the residuals there are "
                             "finite: give a finite initial guess.")
        return _nonfinite_start_lm(model, p0, n, f0, user_jac, minpack_fd, messages, epsfcn,
                                   kwargs, dtype)
    book = None
    if user_jac or minpack_fd:
        rel = _minpack_step(epsfcn, kwargs.pop("diff_step", None), n, dtype)
        book = _LeastsqBook(maxfev, rel, n)
        model.book = book
        jac_arg = model.jacobian if user_jac else model.fd_jacobian
    elif epsfcn is not None and "diff_step" not in kwargs:
        kwargs["diff_step"] = math.sqrt(max(float(epsfcn), _EPS))

    model.first_finite = None
    try:
        res = least_squares(model.residuals, p0, jac=jac_arg, method="lm", **_lm_tolerances(opts),
                            **kwargs)
    except _MaxfevReached:
        raise RuntimeError("Optimal parameters not found: " + messages[5]) from None
    except ValueError as e:
        if model.first_finite is not False or not str(e).startswith(_NONFINITE_START):
            raise
        model.book = None
        return _nonfinite_start_lm(model, p0, n, model.first_r, user_jac, minpack_fd,
                                   messages, epsfcn, kwargs, dtype)
    finally:
        model.book = None
    ier = STATUS_TO_IER.get(int(res.status))
    if ier is None:  # our non-finite / singular stops: no MINPACK equivalent
        raise RuntimeError("Optimal parameters not found: " + res.message)
    mesg = messages[ier]
    if ier not in (1, 2, 3, 4):
        raise RuntimeError("Optimal parameters not found: " + mesg)

    nfev, njev = res.nfev, res.njev
    if book is not None:
        # Our engine also evaluates the Jacobian after an accepted step that
        # ends the run; MINPACK stops before doing so.
        extra = book.extra_jacobian(res.status)
        jac_x, jac_f, J = book.history[-2] if extra and len(book.history) > 1 \
            else book.history[-1]
        njev = book.jac_calls - int(extra)
        if minpack_fd:
            nfev = res.nfev + n * njev
    else:
        jac_f, J = res.fun, res.jac
    fvec = as_numpy(res.fun)
    fjac, ipvt, qtf, R = _pivoted_qr(as_numpy(J), as_numpy(jac_f))
    cov = _inverse_from_qr(R, ipvt)
    infodict: dict[str, Any] = {"fvec": res.fun, "nfev": int(nfev)}
    if user_jac:
        infodict["njev"] = int(njev)
    to_user = model.to_user_like(res.x)
    infodict["fjac"] = to_user(fjac)
    infodict["ipvt"] = ipvt if not isinstance(res.x, torch.Tensor) else torch.as_tensor(
        ipvt, device=res.x.device)
    infodict["qtf"] = to_user(qtf)
    cost = float(np.sum(fvec.astype(float) ** 2))
    return res.x, cov, infodict, mesg, ier, fvec.size, cost


#: Start of the message with which ``least_squares`` refuses non-finite residuals at x0.
_NONFINITE_START = "Residuals are not finite in the initial point"


def _all_finite(a: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return bool(torch.isfinite(a).all())
    return bool(np.isfinite(np.asarray(a, dtype=float)).all())


def _nonfinite_start_lm(model: _Model, p0: Any, n: int, f0: Any, user_jac: bool,
                        minpack_fd: bool, messages: dict, epsfcn: Any, kwargs: dict,
                        dtype: Any) -> tuple:
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
    njev = 0
    nfev = 1
    J = None
    if user_jac:
        J = model.jacobian(p0)
        njev = 1
    elif minpack_fd:
        book = _LeastsqBook(math.inf, _minpack_step(epsfcn, kwargs.get("diff_step"), n, dtype),
                            n)
        book.record_call(p0, f0)
        model.book = book
        try:
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is expected here
                J = model.fd_jacobian(p0)
        finally:
            model.book = None
        nfev += n
    fvec = as_numpy(f0)
    m = np.atleast_1d(fvec).size
    if J is not None and _all_finite(J):
        with np.errstate(invalid="ignore", over="ignore"):
            fjac, ipvt, qtf, _ = _pivoted_qr(as_numpy(J).reshape(m, n), fvec.reshape(m))
    else:
        fjac, ipvt, qtf = (np.full((n, m), np.nan), np.arange(n, dtype=np.int32),
                           np.full(n, np.nan))
    popt = _copy(p0)
    to_user = model.to_user_like(popt)
    infodict: dict[str, Any] = {"fvec": f0, "nfev": nfev}
    if user_jac:
        infodict["njev"] = njev
    infodict["fjac"] = to_user(fjac)
    infodict["ipvt"] = ipvt if not isinstance(popt, torch.Tensor) else torch.as_tensor(
        ipvt, device=popt.device)
    infodict["qtf"] = to_user(qtf)
    with np.errstate(invalid="ignore", over="ignore"):
        cost = float(np.sum(fvec.astype(float) ** 2))
    return popt, None, infodict, messages[4], 4, m, cost


def _reject_loss_for_lm(kwargs: dict, caller: str) -> None:
    """scipy's ``leastsq`` takes no ``loss``: with ``method='lm'`` it is a TypeError."""
    if "loss" in kwargs:
        raise TypeError(f"{caller}() with method='lm' got an unexpected keyword argument "
                        "'loss' (scipy's leastsq has no robust loss; use method='trf' or "
                        "'dogbox').")


def _name_zero_sigma(error: ValueError, transform: np.ndarray | None) -> None:
    """Re-raise ``least_squares``'s non-finite start naming a zero ``sigma`` as its cause."""
    if (transform is not None and np.ndim(transform) < 2
            and str(error).startswith(_NONFINITE_START)
            and not np.isfinite(transform).all()):
        raise ValueError(f"{_NONFINITE_START}: `sigma` contains zeros (a standard deviation "
                         "of 0 gives an infinite weight).") from error


class _MaxfevReached(Exception):
    """Raised inside the residual function once MINPACK's ``maxfev`` is spent."""


class _LeastsqBook:
    """MINPACK's bookkeeping for ``method='lm'``: evaluation counts and Jacobians.

    ``calls`` counts residual evaluations made by the solver (the start point
    and the trial points), ``fd_evals`` those of the forward differences; once
    a trial leaves ``calls + fd_evals >= maxfev`` the next trial is refused,
    which is where MINPACK stops with ``info = 5``. ``history`` keeps the last
    two ``(x, f, J)`` at which the Jacobian was evaluated.
    """

    def __init__(self, maxfev: int, rel_step: Any, n: int) -> None:
        self.maxfev = maxfev
        self.rel_step = rel_step
        self.n = n
        self.calls = 0
        self.fd_evals = 0
        self.jac_calls = 0
        self.over_budget = False
        self.calls_at_jac = 0
        self.last_x: Any = None
        self.last_f: Any = None
        self.history: list[tuple] = []

    def record_call(self, p: Any, r: Any) -> None:
        self.calls += 1
        self.last_x, self.last_f = _copy(p), r
        if self.calls > 1 and self.calls + self.fd_evals >= self.maxfev:
            self.over_budget = True

    def record_jac(self, p: Any, f: Any, J: Any) -> None:
        self.jac_calls += 1
        self.calls_at_jac = self.calls
        self.history = [*self.history[-1:], (_copy(p), f, J)]

    def extra_jacobian(self, status: int) -> bool:
        """Whether the last Jacobian is one MINPACK never evaluates.

        Our engine evaluates the Jacobian after an accepted trial that ends the
        run; MINPACK stops right after the trial. Such a Jacobian follows the
        last trial evaluation (``calls > 1``); a run that ends on the ``gtol``
        test needs it (MINPACK tests the gradient of the new Jacobian). The
        order of the evaluations decides, not the points: a rejected final
        trial can land exactly on the current iterate.
        """
        return self.calls > 1 and self.calls_at_jac == self.calls and int(status) != codes.GTOL


def _copy(a: Any) -> Any:
    return a.detach().clone() if isinstance(a, torch.Tensor) else np.array(a, copy=True)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return bool(torch.equal(torch.as_tensor(a).cpu(), torch.as_tensor(b).cpu()))
    return bool(np.array_equal(a, b))


def _leastsq_options(kwargs: dict, n: int, user_jac: bool) -> dict:
    """Pop ``leastsq``'s keywords from ``kwargs``, check them as MINPACK does.

    ``x_scale`` is set from ``diag``; the returned dict holds ``ftol, xtol,
    gtol, maxfev, epsfcn`` with ``leastsq``'s defaults.
    """
    opts = {"ftol": kwargs.pop("ftol", LEASTSQ_FTOL), "xtol": kwargs.pop("xtol", LEASTSQ_XTOL),
            "gtol": kwargs.pop("gtol", LEASTSQ_GTOL), "epsfcn": kwargs.pop("epsfcn", None)}
    maxfev = kwargs.pop("maxfev", 0)
    if "max_nfev" in kwargs:
        if maxfev:
            raise TypeError("curve_fit() got both 'maxfev' and 'max_nfev'.")
        maxfev = kwargs.pop("max_nfev") or 0
    factor = kwargs.pop("factor", 100)
    diag = kwargs.pop("diag", None)
    if maxfev == 0:
        maxfev = 100 * (n + 1) if user_jac else 200 * (n + 1)
    opts["maxfev"] = maxfev
    improper = (opts["ftol"] < 0 or opts["xtol"] < 0 or opts["gtol"] < 0 or maxfev < 0
                or factor <= 0
                or (diag is not None and bool(np.any(np.asarray(to_host(diag)) <= 0))))
    if improper:  # MINPACK's info = 0; curve_fit turns it into a RuntimeError
        raise RuntimeError("Optimal parameters not found: Improper input parameters.")
    if factor != 100:
        raise ValueError("torchimize_scipy's 'lm' only supports factor=100 (MINPACK's "
                         "default initial step bound).")
    if diag is not None:
        if "x_scale" in kwargs:
            raise ValueError("Give only one of `diag` and `x_scale`.")
        kwargs["x_scale"] = 1.0 / np.asarray(to_host(diag), dtype=float)
    return opts


def _lm_tolerances(opts: dict) -> dict:
    """``least_squares('lm')`` needs tolerances of at least machine epsilon;
    ``leastsq`` accepts smaller ones (including ``gtol=0``, its default)."""
    return {"ftol": max(opts["ftol"], _EPS), "xtol": max(opts["xtol"], _EPS),
            "gtol": max(opts["gtol"], _EPS), "max_nfev": opts["maxfev"]}


def _minpack_step(epsfcn: Any, diff_step: Any, n: int, dtype: Any) -> Any:
    """Relative forward-difference step: ``sqrt(max(epsfcn, eps))`` as MINPACK."""
    eps_mach = float(torch.finfo(dtype).eps)
    if epsfcn is not None:
        return math.sqrt(max(float(epsfcn), eps_mach))
    if diff_step is not None:
        return np.broadcast_to(np.asarray(to_host(diff_step), dtype=float), (n,))
    return math.sqrt(eps_mach)


def _leastsq_messages(ftol: float, xtol: float, gtol: float, maxfev: int) -> dict[int, str]:
    """``leastsq``'s termination messages for MINPACK's ``info`` 1 to 5."""
    return {
        1: "Both actual and predicted relative reductions in the sum of squares\n"
           f"  are at most {ftol:f}",
        2: f"The relative error between two consecutive iterates is at most {xtol:f}",
        3: "Both actual and predicted relative reductions in the sum of squares\n"
           f"  are at most {ftol:f} and the relative error between two consecutive "
           f"iterates is at \n  most {xtol:f}",
        4: "The cosine of the angle between func(x) and any column of the\n"
           f"  Jacobian is at most {gtol:f} in absolute value",
        5: f"Number of calls to function has reached maxfev = {maxfev}.",
    }


def _pivoted_qr(J: np.ndarray, fvec: np.ndarray) -> tuple:
    """MINPACK-style ``fjac, ipvt, qtf`` and ``R`` from ``J P = Q R``.

    ``fjac`` is returned as MINPACK stores it (and ``leastsq`` transposes it):
    ``R`` on and above the diagonal, and below it column ``j`` of MINPACK's
    Householder vector ``u_j`` (reflector ``I - u_j u_j^T / u_jj``), which is
    LAPACK's ``tau_j v_j`` for LAPACK's reflector ``I - tau_j v_j v_j^T``.
    """
    m, n = J.shape
    (raw, tau), _, perm = scipy.linalg.qr(J, pivoting=True, mode="raw")
    R = np.triu(raw[:n, :n])
    below = np.tril(raw, -1) * tau[np.newaxis, :n]
    fjac = np.triu(raw) + below
    Q, _, _ = scipy.linalg.qr(J, pivoting=True, mode="economic")
    qtf = Q.T @ fvec
    return fjac.T.copy(), perm.astype(np.int32), qtf, R


def _inverse_from_qr(R: np.ndarray, perm: np.ndarray) -> np.ndarray | None:
    """``(J^T J)^{-1} = P R^{-1} R^{-T} P^T``; None when ``R`` is exactly singular."""
    trtri = scipy.linalg.get_lapack_funcs("trtri", (R,))
    try:
        Rinv, info = trtri(R)
    except ValueError:
        return None
    if info != 0:
        return None
    W = np.empty_like(Rinv)
    W[perm] = Rinv  # row perm[k] of W is row k of R^{-1}
    return W @ W.T


# ---------------------------------------------------------------------------
# covariance
# ---------------------------------------------------------------------------
def _pinv_normal_matrix(J: np.ndarray) -> np.ndarray:
    """``(J^T J)^+`` from the thin SVD, small singular values discarded."""
    _, s, Vt = scipy.linalg.svd(J, full_matrices=False)
    threshold = np.finfo(J.dtype).eps * max(J.shape) * s[0]
    keep = int(np.count_nonzero(s > threshold))
    s, Vt = s[:keep], Vt[:keep]
    return (Vt.T / s**2) @ Vt


def _finish_covariance(pcov: np.ndarray | None, n: int, ysize: int, cost: float,
                       absolute_sigma: bool) -> np.ndarray:
    """Scale by the reduced chi-square, or fill with inf (and warn) when undefined."""
    warn = False
    if pcov is None or np.isnan(pcov).any():
        pcov = np.full((n, n), np.inf)
        warn = True
    elif not absolute_sigma:
        if ysize > n:
            pcov = pcov * (cost / (ysize - n))
        else:
            pcov = np.full_like(pcov, np.inf)
            warn = True
    if warn:
        warnings.warn(_COV_MSG, category=OptimizeWarning, stacklevel=3)
    return pcov


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------
def _count_parameters(f: Callable) -> int:
    """Positional parameters of ``f`` minus the independent variable."""
    params = inspect.signature(f).parameters.values()
    positional = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                  inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2:
        raise ValueError("Unable to determine number of fit parameters.")
    return len(positional) - 1


def _feasible_start(lb: np.ndarray, ub: np.ndarray) -> np.ndarray:
    """1 where unbounded, midpoints of finite boxes, one unit inside a single bound."""
    lo, hi = np.isfinite(lb), np.isfinite(ub)
    p0 = np.ones_like(lb, dtype=float)
    p0 = np.where(lo & hi, 0.5 * (np.where(lo, lb, 0) + np.where(hi, ub, 0)), p0)
    p0 = np.where(lo & ~hi, np.where(lo, lb, 0) + 1, p0)
    p0 = np.where(~lo & hi, np.where(hi, ub, 0) - 1, p0)
    return p0


def _torch_lead(p0: Any, ydata: Any, xdata: Any) -> torch.Tensor | None:
    """The tensor that decides device and dtype (``p0``, then ``ydata``, then ``xdata``)."""
    for a in (p0, ydata, xdata):
        if isinstance(a, torch.Tensor):
            return a
    if isinstance(xdata, list | tuple):
        for a in xdata:
            if isinstance(a, torch.Tensor):
                return a
    return None


def _float_array(a: Any, check_finite: bool) -> np.ndarray:
    """scipy's cast to float, with ``asarray_chkfinite``'s check when asked."""
    a = to_host(a)
    if check_finite:
        return np.asarray_chkfinite(a, float)
    return np.asarray(a, float)


def _apply_nan_policy(nan_policy: str, xdata: Any, ydata: np.ndarray,
                      sigma: Any) -> tuple:
    """scipy's ``nan_policy`` for curve_fit: 'raise' or 'omit' (rows with a NaN)."""
    if nan_policy == "propagate":
        raise ValueError("`nan_policy='propagate'` is not supported by this function.")
    if nan_policy not in ("raise", "omit"):
        raise ValueError("nan_policy must be one of {None, 'raise', 'omit'}")
    x_nan = _contains_nan(xdata)
    if x_nan and nan_policy == "raise":
        raise ValueError("The input contains nan values")
    y_nan = _contains_nan(ydata)
    if y_nan and nan_policy == "raise":
        raise ValueError("The input contains nan values")
    if (x_nan or y_nan) and nan_policy == "omit":
        xnan = np.isnan(xdata)
        bad = xnan.any(axis=tuple(range(xnan.ndim - 1))) | np.isnan(ydata)
        xdata = xdata[..., ~bad]
        ydata = ydata[~bad]
        if sigma is not None:
            sigma = np.asarray(to_host(sigma))
            if sigma.ndim == 1:
                sigma = sigma[~bad]
            elif sigma.ndim == 2:
                sigma = sigma[~bad][:, ~bad]
    return xdata, ydata, sigma


def _contains_nan(a: Any) -> bool:
    if not isinstance(a, np.ndarray) or a.size == 0:
        return False
    if np.issubdtype(a.dtype, np.inexact):
        return bool(np.isnan(a).any())
    return False


def _sigma_transform(sigma: Any, m: int) -> np.ndarray | None:
    """``1 / sigma`` for standard deviations, lower Cholesky factor for a covariance."""
    if sigma is None:
        return None
    sigma = np.asarray(to_host(sigma))
    if sigma.size == 1 and sigma.ndim > 1:
        # scipy reads a one-entry sigma as a standard deviation of the sigma's own
        # shape and then fails on the 2-D residuals it makes; the value is ambiguous
        # (standard deviation or variance), so refuse it rather than guess
        raise ValueError(f"`sigma` of shape {sigma.shape} is ambiguous: give a standard "
                         "deviation as a scalar or 1-D array, or a covariance matrix of "
                         "shape (M, M) with M > 1.")
    if sigma.size == 1 or sigma.shape == (m,):
        with np.errstate(divide="ignore"):
            return 1.0 / sigma
    if sigma.shape == (m, m):
        try:
            return scipy.linalg.cholesky(sigma, lower=True)
        except np.linalg.LinAlgError as e:
            raise ValueError("`sigma` must be positive definite.") from e
    raise ValueError("`sigma` has incorrect shape.")


class _TorchData:
    """Tensor copies of ``xdata``, ``ydata`` and the ``sigma`` transform."""

    def __init__(self, xdata: np.ndarray | None, ydata: np.ndarray,
                 transform: np.ndarray | None, device: Any, dtype: Any) -> None:
        self.host = (xdata, ydata, transform)
        self.cache: dict = {}
        if device is not None:
            self.get(torch.device(device), dtype)

    def get(self, device: torch.device, dtype: torch.dtype) -> tuple:
        key = (str(device), dtype)
        if key not in self.cache:
            self.cache[key] = tuple(
                None if a is None else torch.as_tensor(a, device=device, dtype=dtype)
                for a in self.host)
        return self.cache[key]


class _Model:
    """Whitened residuals ``L^{-1} (f(x, *p) - y)`` and Jacobian ``L^{-1} J_f``."""

    def __init__(self, f: Callable, jac: Callable | None, xdata: Any, xdata_is_array: bool,
                 ydata: np.ndarray, transform: np.ndarray | None, data: _TorchData | None,
                 col_deriv: bool) -> None:
        self.f = f
        self.jac = jac
        self.xdata = xdata
        self.xdata_is_array = xdata_is_array
        self.ydata = ydata
        self.transform = transform
        self.data = data
        self.col_deriv = col_deriv
        self.book: _LeastsqBook | None = None
        #: whether the first residuals handed to the solver were finite (None: not yet),
        #: and those residuals
        self.first_finite: bool | None = None
        self.first_r: Any = None

    def _inputs(self, p: Any) -> tuple:
        if isinstance(p, torch.Tensor) and self.data is not None:
            x, y, T = self.data.get(p.device, p.dtype)
            return (x if self.xdata_is_array else self.xdata), y, T
        return self.xdata, self.ydata, self.transform

    def evaluate(self, p: Any) -> Any:
        """The whitened residuals at ``p`` (no bookkeeping)."""
        x, y, T = self._inputs(p)
        out = self.f(x, *p)
        if isinstance(y, torch.Tensor):
            if not isinstance(out, torch.Tensor):
                out = torch.as_tensor(np.asarray(out), device=y.device, dtype=y.dtype)
            r = out - y
            if T is None:
                return r
            if T.ndim < 2:
                return T * r
            return torch.linalg.solve_triangular(T, r.unsqueeze(-1), upper=False).squeeze(-1)
        r = np.asarray(out) - y
        if T is None:
            return r
        if T.ndim < 2:
            return T * r
        return scipy.linalg.solve_triangular(T, r, lower=True)

    def residuals(self, p: Any) -> Any:
        """The function handed to ``least_squares``."""
        book = self.book
        if book is not None and book.over_budget:
            raise _MaxfevReached
        r = self.evaluate(p)
        if self.first_finite is None:
            self.first_finite, self.first_r = _all_finite(r), r
        if book is not None:
            book.record_call(p, r)
        return r

    def _value_at(self, p: Any) -> Any:
        book = self.book
        if book is not None and book.last_x is not None and _same(book.last_x, p):
            return book.last_f
        return self.evaluate(p)

    def jacobian(self, p: Any) -> Any:
        """The user's Jacobian of the model, whitened like the residuals."""
        x, y, T = self._inputs(p)
        J = self.jac(x, *p)
        if isinstance(y, torch.Tensor):
            J = J if isinstance(J, torch.Tensor) else torch.as_tensor(
                np.asarray(J), device=y.device, dtype=y.dtype)
        else:
            J = np.asarray(J)
        if self.col_deriv:
            J = J.T
        if T is not None:
            if T.ndim == 1:
                J = T[:, None] * J
            elif T.ndim == 0:
                J = T * J
            elif isinstance(J, torch.Tensor):
                J = torch.linalg.solve_triangular(T, J, upper=False)
            else:
                J = scipy.linalg.solve_triangular(T, J, lower=True)
        if self.book is not None:
            self.book.record_jac(p, self._value_at(p), J)
        return J

    def fd_jacobian(self, p: Any) -> Any:
        """MINPACK's forward differences (``fdjac2``): ``h_j = eps |p_j|`` (``eps`` if 0)."""
        book = self.book
        f0 = self._value_at(p)
        rel = book.rel_step
        cols = []
        for j in range(book.n):
            eps_j = rel if np.ndim(rel) == 0 else float(rel[j])
            h = eps_j * abs(p[j])
            if h == 0:
                h = eps_j
            pj = _copy(p)
            pj[j] = p[j] + h
            cols.append((self.evaluate(pj) - f0) / h)
        book.fd_evals += book.n
        if isinstance(f0, torch.Tensor):
            J = torch.stack(cols, dim=-1)
        else:
            J = np.stack(cols, axis=-1)
        book.record_jac(p, f0, J)
        return J

    def to_user_like(self, like: Any) -> Callable[[np.ndarray], Any]:
        """Converter of host arrays to the kind of ``like`` (numpy or a tensor)."""
        if isinstance(like, torch.Tensor):
            return lambda a: torch.as_tensor(a, device=like.device, dtype=like.dtype)
        return lambda a: a


# ---------------------------------------------------------------------------
# batch_curve_fit
# ---------------------------------------------------------------------------
def batch_curve_fit(
    f: Callable,
    xdata: Any,
    ydata: Any,
    p0: Any,
    sigma: Any = None,
    absolute_sigma: bool = False,
    bounds: Any = (-np.inf, np.inf),
    method: str | None = None,
    jac: Callable | str | None = None,
    *,
    full_output: bool = False,
    device: Any = None,
    dtype: Any = None,
    chunk_size: int | None = None,
    progress: bool | str = False,
    nan_policy: str | None = None,
    **kwargs: Any,
) -> tuple:
    """Fit one model to B data sets at once, as a loop of :func:`curve_fit` would.

    Problem ``i`` fits ``f(x_i, *params)`` to ``ydata[i]`` from ``p0[i]`` with
    the same method, options and covariance formulas as :func:`curve_fit`;
    all problems are solved together by
    :func:`torchimize_scipy.batch_least_squares` (vectorised calls of ``f``,
    finished problems dropped, at most ``chunk_size`` held at once).

    Parameters
    ----------
    f : callable
        ``f(x, p_1, ..., p_P)`` evaluated for ``b`` problems at a time: each
        ``p_j`` is a column of shape ``(b, 1)`` so that numpy-style models such
        as ``a * np.exp(-k * x) + c`` broadcast to ``(b, M)``; ``x`` is the
        ``xdata`` of those problems (see below). Returns ``(b, M)`` (or a
        shape that broadcasts to it).
    xdata : array_like, Tensor, tuple or object
        Shared or per-problem independent variable:

        * ``(M,)`` or ``(k, M)`` with ``k != B``: shared, passed unchanged;
        * ``(B, M)``: per problem, ``f`` receives the ``(b, M)`` rows;
        * ``(B, k, M)``: per problem with ``k`` predictors, ``f`` receives
          ``(k, b, M)`` so that ``x[0]`` is the first predictor;
        * a tuple/list of ``k`` predictors, each ``(M,)`` (shared) or
          ``(B, M)`` (per problem): ``f`` receives a ``(k, M)`` array when all
          are shared, else a tuple of ``(M,)``/``(b, M)`` entries;
        * any other object is passed unchanged.

        A 2-D array with ``B`` rows is taken as per problem; pass shared
        ``k = B`` predictors as a tuple.
    ydata : array_like or Tensor, shape (B, M)
        The observations, one data set per row.
    p0 : array_like or Tensor, shape (B, P)
        Initial guesses.
    sigma : None, scalar, array_like of shape (M,), (B, M) or (B, M, M), optional
        Standard deviations, shared or per problem, or per-problem error
        covariance matrices ``(B, M, M)``.
    absolute_sigma : bool, optional
        As in :func:`curve_fit`.
    bounds : 2-tuple or `scipy.optimize.Bounds`, optional
        Each bound a scalar, shape ``(P,)`` or ``(B, P)``.
    method : {'lm', 'trf', 'dogbox', 'gn', 'gd'}, optional
        Default 'lm' without bounds, 'trf' with bounds. 'lm' follows
        ``leastsq`` as in :func:`curve_fit` (MINPACK's forward differences,
        evaluation counts and ``maxfev``).
    jac : callable or {'2-point', '3-point', 'cs', 'autograd'}, optional
        ``jac(x, p_1, ..., p_P)`` with the same conventions as ``f``, returning
        ``(b, M, P)``; or a finite-difference scheme, or 'autograd'.
    full_output : bool, optional
        Also return ``infodict``, ``mesg`` and ``ier`` per problem.
    device, dtype : optional
        Where and in which floating dtype to compute (default: those of the
        first tensor among ``p0``, ``ydata``, ``xdata``; float64 on the CPU
        for numpy input).
    chunk_size : int, optional
        Most problems held at once (see :func:`batch_least_squares`).
    progress : bool or str, optional
        Show a tqdm progress bar over residual evaluations, labelled
        ``batch_curve_fit[method]``, or with this string as its label.
    nan_policy : {None, 'raise', 'omit'}, optional
        None (default): a problem with a NaN or inf in its data fails alone
        (NaN ``popt``). 'raise': any NaN in ``ydata`` or ``xdata`` raises
        ``ValueError``. 'omit': each problem drops its own observations with
        a NaN in ``ydata`` or in its ``xdata`` (and the matching entries of
        ``sigma``), as :func:`curve_fit` would on that data set; the batch
        keeps its ``(B, M)`` shape by giving the omitted observations a zero
        residual and a zero Jacobian row, so ``fvec`` holds 0 there and the
        reduced chi-square of ``pcov`` divides by that problem's own count
        of observations less ``P``. A problem left with no observation fails;
        one left with ``P`` or fewer gets an ``inf`` ``pcov`` (unless
        ``absolute_sigma``).
    **kwargs
        Options of :func:`curve_fit` / ``least_squares`` (``ftol``, ``xtol``,
        ``gtol``, ``x_scale``, ``loss``, ``maxfev``/``max_nfev``, ``epsfcn``,
        ``diag``, ...), common to all problems.

    Returns
    -------
    popt : ndarray or Tensor, shape (B, P)
        Optimal parameters; NaN for problems whose fit failed (where
        :func:`curve_fit` raises ``RuntimeError``).
    pcov : ndarray or Tensor, shape (B, P, P)
        Covariances as :func:`curve_fit` computes them (``inf`` where they
        cannot be estimated, NaN for failed fits).
    infodict : dict
        Only with ``full_output``: ``nfev (B,)``, ``fvec (B, M)`` and, for 'lm'
        with a callable ``jac``, ``njev (B,)`` (the keys of :func:`curve_fit`
        except ``fjac``, ``ipvt`` and ``qtf``).
    mesg : list of str
        Only with ``full_output``: one termination message per problem.
    ier : ndarray or Tensor of int, shape (B,)
        Only with ``full_output``: ``leastsq``'s ``info`` for 'lm' (1 to 4
        success, 5 ``maxfev`` reached, 0 for a non-finite or singular stop of
        our engine), the ``least_squares`` status otherwise (success if
        positive and not 5 or 6).

    Warns
    -----
    OptimizeWarning
        Once, if some covariances cannot be estimated, and once if some fits
        failed.

    Examples
    --------
    >>> import numpy as np
    >>> from torchimize_scipy import batch_curve_fit
    >>> def decay(x, a, k):          # a, k: (b, 1) columns; x: (M,)
    ...     return a * np.exp(-k * x)
    >>> x = np.linspace(0, 3, 40)
    >>> true = np.array([[1.0, 0.5], [2.0, 1.5], [0.5, 3.0]])
    >>> y = decay(x, true[:, :1], true[:, 1:])
    >>> popt, pcov = batch_curve_fit(decay, x, y, p0=np.ones((3, 2)))
    >>> np.round(popt, 6)
    array([[1. , 0.5],
           [2. , 1.5],
           [0.5, 3. ]])
    """
    if has_dask(p0, ydata, xdata, sigma, bounds, kwargs.get("x_scale")):  # lazy, per block
        return dispatch("batch_curve_fit", locals())
    from ._batch import batch_least_squares

    lead = _torch_lead(p0, ydata, xdata)
    ns = detect_namespace(lead if lead is not None else np.zeros(1), device, dtype)
    p0_host = np.asarray(to_host(p0), dtype=float)
    if p0_host.ndim != 2:
        raise ValueError("`p0` must have shape (B, P) for batch_curve_fit.")
    B, n = p0_host.shape
    Y = np.asarray(to_host(ydata), dtype=float)
    if Y.size == 0:
        raise ValueError("`ydata` must not be empty!")
    if Y.ndim != 2 or Y.shape[0] != B:
        raise ValueError(f"`ydata` must have shape (B, M) = ({B}, M) to match `p0` {(B, n)}.")
    M = Y.shape[1]
    lb, ub = prepare_bounds(bounds, n, batch=B)
    bounded = bool(np.any((lb > -np.inf) | (ub < np.inf)))
    if method is None:
        method = "trf" if bounded else "lm"
    if method == "lm" and bounded:
        raise ValueError("Method 'lm' only works for unconstrained problems. "
                         "Use 'trf' or 'dogbox' instead.")
    if "args" in kwargs:
        raise ValueError("'args' is not a supported keyword argument.")
    if method == "lm" and n > M:
        raise TypeError(f"The number of func parameters={n} must not"
                        f" exceed the number of data points={M}")
    if "return_jac" in kwargs:
        raise ValueError("`return_jac` cannot be set: batch_curve_fit needs the Jacobians "
                         "to compute pcov.")

    if method == "lm":
        _reject_loss_for_lm(kwargs, "batch_curve_fit")
    data = _BatchData(xdata, Y, None, B)
    keep = data.apply_nan_policy(nan_policy)
    data.set_transform(_batch_sigma_transform(sigma, B, M, keep))
    col_deriv = bool(kwargs.pop("col_deriv", False)) if method == "lm" else False
    model = _BatchModel(f, jac if callable(jac) else None, data, n, M, col_deriv)
    torch_mode = lead is not None
    # curve_fit rejects non-finite data (check_finite); here such problems are
    # reported as failed and kept out of the solve.
    good = data.finite_rows() & np.isfinite(p0_host).all(axis=1)
    good_idx = np.flatnonzero(good)
    if torch_mode:
        x0: Any = torch.as_tensor(p0_host[good_idx], device=ns.device, dtype=ns.dtype)
        ids: Any = torch.as_tensor(good_idx, device=ns.device)
    else:
        x0, ids = p0_host[good_idx], good_idx
    if "x_scale" in kwargs and np.ndim(to_host(kwargs["x_scale"])) == 2:
        kwargs["x_scale"] = np.asarray(to_host(kwargs["x_scale"]), dtype=float)[good_idx]

    if callable(jac):
        jac_arg: Any = model.jacobian
    elif jac is None:
        jac_arg = "2-point"
    else:
        jac_arg = jac
    book = None
    opts: dict = {}
    if method == "lm":
        opts = _leastsq_options(kwargs, n, callable(jac))
        if callable(jac) or jac_arg == "2-point":
            rel = _minpack_step(opts["epsfcn"], kwargs.pop("diff_step", None), n, ns.dtype)
            book = _BatchBook(opts["maxfev"], rel, B, n, M, ns.device, ns.dtype)
            model.book = book
            if not callable(jac):
                jac_arg = model.fd_jacobian
        elif opts["epsfcn"] is not None and "diff_step" not in kwargs:
            kwargs["diff_step"] = math.sqrt(max(float(opts["epsfcn"]), _EPS))
        kwargs.update(_lm_tolerances(opts))
    elif "max_nfev" not in kwargs:
        kwargs["max_nfev"] = kwargs.pop("maxfev", None)

    t = _batch_solve(batch_least_squares, model.residuals, x0, jac_arg, lb[good_idx],
                     ub[good_idx], method, ids, good_idx, B, M, ns, book is None,
                     dict(kwargs, chunk_size=chunk_size,
                          progress=progress and (progress if isinstance(progress, str)
                                                 else f"batch_curve_fit[{method}]")))
    status = t["status"]
    nfev = t["nfev"]
    njev = None
    if method == "lm":
        ier = torch.zeros_like(status)
        for code, info in STATUS_TO_IER.items():
            ier = torch.where(status == code, info, ier)
        if book is not None:
            ier = torch.where(book.hit, 5, ier)
            extra = book.extra(status)
            cov = torch.where(extra[:, None, None], book.cov_prev, book.cov_last)
            njev = book.jac_calls - extra.long()
            if not callable(jac):
                nfev = nfev + n * njev
        else:
            cov = _batch_normal_inverse(t["jac"], _qr_inverse)
        ok = (ier >= 1) & (ier <= 4)
        messages = _leastsq_messages(opts["ftol"], opts["xtol"], opts["gtol"], opts["maxfev"])
        mesg = [messages[i] if i in messages else _batch_message(s)
                for i, s in zip(ier.tolist(), status.tolist(), strict=True)]
    else:
        ier = status
        ok = codes.success(status)
        cov = _batch_normal_inverse(t["jac"], _svd_pinv)
        mesg = [_batch_message(s) for s in status.tolist()]

    cost = 2 * t["cost"]
    m_eff: Any = M if keep is None else torch.as_tensor(keep.sum(axis=1), device=cost.device)
    cov, warn_cov = _batch_finish_covariance(cov, ok, n, m_eff, cost, absolute_sigma)
    popt = torch.where(ok[:, None], t["x"], torch.full_like(t["x"], float("nan")))
    if warn_cov:
        warnings.warn(f"{_COV_MSG} for {warn_cov} of {B} problems", category=OptimizeWarning,
                      stacklevel=2)
    failed = int((~ok).sum())
    if failed:
        warnings.warn(f"Optimal parameters not found for {failed} of {B} problems; their "
                      "popt and pcov are NaN (see `mesg` and `ier` with full_output=True)",
                      category=OptimizeWarning, stacklevel=2)

    def out(a: torch.Tensor) -> Any:
        return a if torch_mode else a.detach().cpu().numpy()

    if not full_output:
        return out(popt), out(cov)
    infodict = {"nfev": out(nfev), "fvec": out(t["fun"])}
    if njev is not None and callable(jac):  # 'lm' only, as leastsq
        infodict["njev"] = out(njev)
    return out(popt), out(cov), infodict, mesg, out(ier)


def _batch_solve(batch_least_squares: Callable, fun: Callable, x0: Any, jac: Any,
                 lb: np.ndarray, ub: np.ndarray, method: str, ids: Any, good_idx: np.ndarray,
                 B: int, M: int, ns: Any, want_jac: bool, kwargs: dict) -> dict:
    """Solve the problems ``good_idx`` and scatter the results into B-sized tensors.

    Problems left out keep NaN results and the status :data:`_NOT_FINITE`.
    """
    n = lb.shape[1]
    dev, dt = ns.device, ns.dtype
    t = {"x": torch.full((B, n), float("nan"), device=dev, dtype=dt),
         "cost": torch.full((B,), float("nan"), device=dev, dtype=dt),
         "fun": torch.full((B, M), float("nan"), device=dev, dtype=dt),
         "status": torch.full((B,), _NOT_FINITE, device=dev, dtype=torch.long),
         "nfev": torch.zeros(B, device=dev, dtype=torch.long),
         "jac": torch.zeros(B, M, n, device=dev, dtype=dt)}
    if good_idx.size == 0:
        return t
    res = batch_least_squares(fun, x0, jac=jac, bounds=(lb, ub), method=method, args=(ids,),
                              device=dev, dtype=dt, return_jac=want_jac, **kwargs)
    rows = torch.as_tensor(good_idx, device=dev)
    for key in ("x", "cost", "fun", "status", "nfev", "jac"):
        if key == "jac" and not want_jac:
            continue
        v = res[key]
        v = v if isinstance(v, torch.Tensor) else torch.as_tensor(as_numpy(v))
        t[key] = t[key].index_copy(0, rows, v.to(device=dev, dtype=t[key].dtype))
    return t


#: Status of problems kept out of a batch because their data are not finite.
_NOT_FINITE = -1000


def _batch_message(status: int) -> str:
    if status == _NOT_FINITE:
        return "array must not contain infs or NaNs"
    return codes.message(status)


def _batch_sigma_transform(sigma: Any, B: int, M: int,
                           keep: np.ndarray | None = None) -> tuple[str, np.ndarray] | None:
    """``('diag', 1/sigma)`` (scalar, (M,) or (B, M)) or ``('chol', L)`` for (B, M, M).

    ``keep (B, M)`` (``nan_policy='omit'``) marks the observations each
    problem keeps: the omitted ones get weight 1 and, for a covariance, an
    identity row and column (no correlation with the kept ones), so that the
    whitened kept residuals are those of the reduced data set.
    """
    if sigma is None:
        return None
    sigma = np.asarray(to_host(sigma), dtype=float)
    if sigma.size == 1 or sigma.shape in ((M,), (B, M)):
        with np.errstate(divide="ignore"):
            T = (1.0 / sigma).reshape(1, 1) if sigma.size == 1 else 1.0 / sigma.reshape(-1, M)
        if keep is not None:
            T = np.where(keep, T, 1.0)
        return "diag", T
    if sigma.shape == (B, M, M):
        if keep is not None:
            both = keep[:, :, None] & keep[:, None, :]
            sigma = np.where(both, sigma, np.eye(M))
        try:
            return "chol", np.linalg.cholesky(sigma)
        except np.linalg.LinAlgError as e:
            raise ValueError("`sigma` must be positive definite.") from e
    raise ValueError("`sigma` has incorrect shape.")


class _BatchData:
    """``xdata``, ``ydata`` and the ``sigma`` transform; rows by problem index."""

    def __init__(self, xdata: Any, Y: np.ndarray, transform: tuple | None, B: int) -> None:
        self.B = B
        self.xkind, self.xparts = self._parse_x(xdata, B)
        self.Y = Y
        self.keep: np.ndarray | None = None
        self.set_transform(transform)

    def set_transform(self, transform: tuple | None) -> None:
        """Set the ``sigma`` transform (``('diag', T)``, ``('chol', L)`` or None)."""
        self.tkind = None if transform is None else transform[0]
        self.T = None if transform is None else transform[1]
        self.cache: dict = {}

    def _x_nan(self) -> np.ndarray:
        """``(B, M)`` (or ``(M,)`` when shared): observations with a NaN in ``xdata``."""
        M = self.Y.shape[1]
        if self.xkind == "rows":
            return np.isnan(self.xparts)
        if self.xkind == "stack":
            return np.isnan(self.xparts).any(axis=tuple(range(1, self.xparts.ndim - 1)))
        if self.xkind == "shared":
            x = self.xparts
            nan = np.isnan(x)
            return nan.any(axis=tuple(range(nan.ndim - 1))) if nan.ndim else np.zeros(M, bool)
        if self.xkind == "tuple":
            out = np.zeros(M, dtype=bool)
            for p, batched in self.xparts:
                nan = np.isnan(p)
                out = out | (nan.reshape(self.B, -1, M).any(axis=1) if batched
                             else nan.any(axis=tuple(range(nan.ndim - 1))))
            return out
        return np.zeros(M, dtype=bool)

    def apply_nan_policy(self, nan_policy: str | None) -> np.ndarray | None:
        """Apply ``nan_policy`` to ``ydata``/``xdata``; ``(B, M)`` kept mask for 'omit'.

        'omit' replaces the omitted entries by 0 (so that models and autograd
        see finite numbers there; their residuals are masked in
        :meth:`_BatchModel.evaluate`). Returns None when nothing is omitted.
        """
        if nan_policy is None:
            return None
        if nan_policy == "propagate":
            raise ValueError("`nan_policy='propagate'` is not supported by this function.")
        if nan_policy not in ("raise", "omit"):
            raise ValueError("nan_policy must be one of {None, 'raise', 'omit'}")
        omit = np.isnan(self.Y) | self._x_nan()
        if not omit.any():
            return None
        if nan_policy == "raise":
            raise ValueError("The input contains nan values")
        keep = ~omit
        self.Y = np.where(keep, self.Y, 0.0)
        if self.xkind in ("rows", "shared"):
            self.xparts = np.nan_to_num(self.xparts, nan=0.0)
        elif self.xkind == "stack":
            self.xparts = np.nan_to_num(self.xparts, nan=0.0)
        elif self.xkind == "tuple":
            self.xparts = [(np.nan_to_num(p, nan=0.0), b) for p, b in self.xparts]
        self.keep = keep
        self.cache = {}
        return keep

    @staticmethod
    def _parse_x(xdata: Any, B: int) -> tuple[str, Any]:
        if isinstance(xdata, list | tuple) and any(
                np.ndim(to_host(e)) >= 1 for e in xdata):
            parts = [np.asarray(to_host(e), dtype=float) for e in xdata]
            batched = [p.ndim >= 2 and p.shape[0] == B for p in parts]
            if not any(batched):
                return "shared", np.asarray(parts)
            return "tuple", [(p, s) for p, s in zip(parts, batched, strict=True)]
        if isinstance(xdata, list | tuple | np.ndarray | torch.Tensor):
            arr = np.asarray(to_host(xdata), dtype=float)
            if arr.ndim >= 2 and arr.shape[0] == B:
                return ("rows" if arr.ndim == 2 else "stack"), arr
            return "shared", arr
        return "object", xdata

    def finite_rows(self) -> np.ndarray:
        """Problems whose ``ydata``, per-problem ``xdata`` and ``sigma`` are finite.

        Non-finite shared ``xdata`` raises, as :func:`curve_fit` does.
        """
        ok = np.isfinite(self.Y).all(axis=1)
        if self.keep is not None:  # a problem left without observations fails
            ok &= self.keep.any(axis=1)
        if self.T is not None:
            T = self.T.reshape(self.T.shape[0], -1)
            fin = np.isfinite(T).all(axis=1)
            ok &= fin if T.shape[0] == self.B else bool(fin.all())
        parts = []
        if self.xkind in ("rows", "stack"):
            parts = [(self.xparts, True)]
        elif self.xkind == "shared":
            parts = [(self.xparts, False)]
        elif self.xkind == "tuple":
            parts = self.xparts
        for p, batched in parts:
            if batched:
                ok &= np.isfinite(p.reshape(self.B, -1)).all(axis=1)
            elif not np.isfinite(p).all():
                raise ValueError("array must not contain infs or NaNs")
        return ok

    def arrays(self, like: Any) -> dict:
        """All data converted to the kind (numpy/torch, device, real dtype) of ``like``."""
        if not isinstance(like, torch.Tensor):
            key: Any = "numpy"
        else:
            key = (str(like.device), like.real.dtype if like.is_complex() else like.dtype)
        if key not in self.cache:
            if key == "numpy":
                conv: Callable = np.asarray
            else:
                dev, dt = key

                def conv(a: np.ndarray) -> torch.Tensor:
                    return torch.as_tensor(a, device=dev, dtype=dt)
            if self.xkind == "tuple":
                x = [(conv(p), s) for p, s in self.xparts]
            elif self.xkind == "object":
                x = self.xparts
            else:
                x = conv(self.xparts)
            self.cache[key] = {"x": x, "Y": conv(self.Y),
                               "T": None if self.T is None else conv(self.T),
                               "keep": None if self.keep is None else (
                                   self.keep if key == "numpy"
                                   else torch.as_tensor(self.keep, device=key[0]))}
        return self.cache[key]

    @staticmethod
    def _rows(a: Any, ids: Any, repeat: int = 1) -> Any:
        """Rows ``ids`` of ``a``, each ``repeat`` times; a view when they are one ascending run."""
        idx = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(np.asarray(ids))
        run = _ascending_run(idx) if repeat == 1 else None
        if run is not None:
            return a[run[0]:run[1]]
        if repeat > 1:
            idx = idx.repeat_interleave(repeat)
        if isinstance(a, torch.Tensor):
            return a.index_select(0, idx.to(a.device))
        return a[idx.cpu().numpy()]

    def select(self, ids: Any, like: Any, repeat: int = 1) -> tuple:
        """``(x, y, T)`` for the problems ``ids``, in the kind of ``like``.

        Per-problem ``xdata`` comes ``repeat`` times per problem (for the
        shifted points of forward differences); ``y`` and ``T`` once.
        """
        d = self.arrays(like)
        x = d["x"]
        if self.xkind == "rows":
            x = self._rows(x, ids, repeat)
        elif self.xkind == "stack":
            x = self._rows(x, ids, repeat)
            x = x.movedim(0, 1) if isinstance(x, torch.Tensor) else np.moveaxis(x, 0, 1)
        elif self.xkind == "tuple":
            x = tuple(self._rows(p, ids, repeat) if s else p for p, s in x)
        T = d["T"]
        if T is not None and T.shape[0] == self.B:
            T = self._rows(T, ids)
        return x, self._rows(d["Y"], ids), T

    def kept(self, ids: Any, like: Any) -> Any:
        """``(b, M)`` mask of the observations the problems ``ids`` keep (None: all)."""
        keep = self.arrays(like)["keep"]
        return None if keep is None else self._rows(keep, ids)


class _BatchModel:
    """Vectorised whitened residuals ``(b, M)`` and Jacobians ``(b, M, P)``."""

    def __init__(self, f: Callable, jac: Callable | None, data: _BatchData, n: int, m: int,
                 col_deriv: bool) -> None:
        self.f = f
        self.jac = jac
        self.data = data
        self.n = n
        self.m = m
        self.col_deriv = col_deriv
        self.book: _BatchBook | None = None

    def _whiten(self, r: Any, T: Any, jac: bool) -> Any:
        kind = self.data.tkind
        if kind is None:
            return r
        if kind == "diag":
            if isinstance(r, torch.Tensor):
                T = T.to(r.dtype)
            return (T[..., None] if jac else T) * r
        # L^{-1} r for every problem at once: one batched triangular solve (numpy
        # arrays pass through torch without copies)
        numpy_in = not isinstance(r, torch.Tensor)
        if numpy_in:
            r, T = torch.from_numpy(np.ascontiguousarray(r)), torch.from_numpy(T)
            r = r.to(torch.promote_types(r.dtype, T.dtype))
        rhs = r if jac else r.unsqueeze(-1)
        out = torch.linalg.solve_triangular(T.to(r.dtype), rhs, upper=False)
        out = out if jac else out.squeeze(-1)
        return out.numpy() if numpy_in else out

    def evaluate(self, P: Any, ids: Any, repeat: int = 1) -> Any:
        """Whitened residuals ``(b * repeat, M)`` at parameters ``P (b * repeat, N)``.

        Rows ``k * repeat``, ..., ``k * repeat + repeat - 1`` of ``P`` belong to
        problem ``ids[k]`` (``repeat > 1``: the shifted points of forward
        differences); the data of each problem are selected once and
        broadcast over its rows.
        """
        x, y, T = self.data.select(ids, P, repeat)
        rows = P.shape[0]
        out = self.f(x, *[P[:, j:j + 1] for j in range(self.n)])
        if isinstance(P, torch.Tensor):
            out = out if isinstance(out, torch.Tensor) else torch.as_tensor(
                np.asarray(out), device=P.device)
            if out.shape != (rows, self.m):
                out = out.expand(rows, self.m)
            r = out.reshape(-1, repeat, self.m) - y.unsqueeze(-2)
            keep = self.data.kept(ids, P)
            if keep is not None:
                r = torch.where(keep.unsqueeze(-2), r, torch.zeros((), dtype=r.dtype,
                                                                   device=r.device))
            cols = r.transpose(-1, -2)
        else:
            out = np.asarray(out)
            if out.shape != (rows, self.m):
                out = np.broadcast_to(out, (rows, self.m))
            r = out.reshape(-1, repeat, self.m) - y[..., None, :]
            keep = self.data.kept(ids, P)
            if keep is not None:
                r = np.where(keep[..., None, :], r, 0.0)
            cols = np.swapaxes(r, -1, -2)
        if self.data.tkind is not None:  # whiten the repeat columns of each problem at once
            cols = self._whiten(cols, T, jac=True)
        r = cols.transpose(-1, -2) if isinstance(cols, torch.Tensor) else np.swapaxes(cols, -1, -2)
        return r.reshape(rows, self.m)

    def residuals(self, P: Any, ids: Any) -> Any:
        """The vectorised function handed to ``batch_least_squares``."""
        r = self.evaluate(P, ids)
        if self.book is not None:
            self.book.record_call(_t(ids), _t(P), _t(r))
        return r

    def jacobian(self, P: Any, ids: Any) -> Any:
        """The user's Jacobian ``(b, M, P)``, whitened."""
        x, y, T = self.data.select(ids, P)
        J = self.jac(x, *[P[:, j:j + 1] for j in range(self.n)])
        if isinstance(P, torch.Tensor):
            J = J if isinstance(J, torch.Tensor) else torch.as_tensor(
                np.asarray(J), device=P.device, dtype=P.dtype)
            if self.col_deriv:
                J = J.transpose(-1, -2)
        else:
            J = np.asarray(J)
            if self.col_deriv:
                J = np.swapaxes(J, -1, -2)
        keep = self.data.kept(ids, P)
        if keep is not None:
            if isinstance(J, torch.Tensor):
                J = torch.where(keep.unsqueeze(-1), J, torch.zeros((), dtype=J.dtype,
                                                                   device=J.device))
            else:
                J = np.where(keep[..., None], J, 0.0)
        J = self._whiten(J, T, jac=True)
        if self.book is not None:
            self.book.record_jac(_t(ids), _t(J))
        return J

    def fd_jacobian(self, P: Any, ids: Any) -> Any:
        """MINPACK's forward differences for ``b`` problems in one call of ``f``."""
        book = self.book
        Pt, idt = _t(P), _t(ids)
        f0 = book.value_at(idt, Pt)
        if f0 is None:
            f0 = _t(self.evaluate(P, ids))
        b, n = Pt.shape
        rel = torch.as_tensor(book.rel_step, dtype=Pt.dtype, device=Pt.device)
        h = rel * Pt.abs()
        h = torch.where(h == 0, rel.expand_as(h), h)
        Pp = Pt.unsqueeze(1).repeat(1, n, 1)
        eye = torch.eye(n, dtype=torch.bool, device=Pt.device)
        Pp = torch.where(eye, Pt.unsqueeze(1) + h.unsqueeze(1), Pp).reshape(b * n, n)
        if isinstance(P, torch.Tensor):
            F = self.evaluate(Pp, ids, repeat=n)
        else:
            F = torch.as_tensor(self.evaluate(Pp.cpu().numpy(), ids, repeat=n))
        F = _t(F).to(Pt.device).reshape(b, n, self.m)
        J = ((F - f0.unsqueeze(1)) / h.unsqueeze(-1)).transpose(1, 2)
        book.add_fd_evals(idt, n)
        book.record_jac(idt, J)
        return J if isinstance(P, torch.Tensor) else J.cpu().numpy()


def _t(a: Any) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


class _BatchBook:
    """:class:`_LeastsqBook` for B problems: per-problem counts and Jacobian factors.

    Instead of the Jacobians it keeps ``R`` of their QR factorisations (enough
    for :math:`(J^T J)^{-1} = R^{-1} R^{-T}`) at the last two Jacobian points.
    ``hit`` marks problems that MINPACK would have stopped with ``info = 5``.
    """

    def __init__(self, maxfev: int, rel_step: Any, B: int, n: int, m: int, device: Any,
                 dtype: Any) -> None:
        self.maxfev = maxfev
        self.rel_step = rel_step
        self.device = torch.device(device)
        z = torch.zeros(B, dtype=torch.long, device=self.device)
        self.trials, self.fd_evals, self.jac_calls = z.clone(), z.clone(), z.clone()
        self.over = torch.zeros(B, dtype=torch.bool, device=self.device)
        self.hit = self.over.clone()
        self.seen = self.over.clone()
        # the last Jacobian was evaluated after the last trial evaluation
        self.jac_after_trial = self.over.clone()
        self.last_x = torch.zeros(B, n, dtype=dtype, device=self.device)
        self.last_f = torch.zeros(B, m, dtype=dtype, device=self.device)
        # (J^T J)^{-1} at the last two Jacobian points
        self.cov_last = torch.zeros(B, n, n, dtype=dtype, device=self.device)
        self.cov_prev = self.cov_last.clone()

    def record_call(self, ids: torch.Tensor, x: torch.Tensor, r: torch.Tensor) -> None:
        ids = ids.to(self.device)

        def get(a: torch.Tensor) -> torch.Tensor:
            return a.index_select(0, ids)

        started = get(self.jac_calls) > 0  # evaluations after the first Jacobian are trials
        self.hit.index_copy_(0, ids, get(self.hit) | (get(self.over) & started))
        trials = get(self.trials) + started.long()
        self.trials.index_copy_(0, ids, trials)
        self.jac_after_trial.index_copy_(0, ids, get(self.jac_after_trial) & ~started)
        self.last_x.index_copy_(0, ids, x.to(self.device, self.last_x.dtype))
        self.last_f.index_copy_(0, ids, r.to(self.device, self.last_f.dtype))
        self.seen.index_fill_(0, ids, True)
        total = 1 + trials + get(self.fd_evals)
        self.over.index_copy_(0, ids, get(self.over) | (started & (total >= self.maxfev)))

    def value_at(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """The residuals last evaluated at ``x`` for problems ``ids``, if they match."""
        ids = ids.to(self.device)
        same = bool(self.seen.index_select(0, ids).all()) and torch.equal(
            self.last_x.index_select(0, ids), x.to(self.device, self.last_x.dtype))
        return self.last_f.index_select(0, ids).to(x.device) if same else None

    def record_jac(self, ids: torch.Tensor, J: torch.Tensor) -> None:
        ids = ids.to(self.device)
        cov = _batch_normal_inverse(J.to(self.device, self.cov_last.dtype), _qr_inverse)
        self.cov_prev.index_copy_(0, ids, self.cov_last.index_select(0, ids))
        self.cov_last.index_copy_(0, ids, cov)
        self.jac_calls.index_add_(0, ids, torch.ones_like(ids))
        self.jac_after_trial.index_copy_(0, ids, self.trials.index_select(0, ids) > 0)

    def add_fd_evals(self, ids: torch.Tensor, count: int) -> None:
        ids = ids.to(self.device)
        self.fd_evals.index_add_(0, ids, torch.full_like(ids, count))

    def extra(self, status: torch.Tensor) -> torch.Tensor:
        """Problems whose last Jacobian (ours, after the final step) MINPACK never made.

        As :meth:`_LeastsqBook.extra_jacobian`: decided by the order of the
        evaluations (a Jacobian after the last trial), not by comparing points.
        """
        return self.jac_after_trial & (status.to(self.device) != codes.GTOL)


def _batch_inverse_from_r(R: torch.Tensor) -> torch.Tensor:
    """``R^{-1} R^{-T}``; NaN where ``R`` has an exactly zero diagonal entry."""
    n = R.shape[-1]
    singular = (torch.diagonal(R, dim1=-2, dim2=-1) == 0).any(-1)
    eye = torch.eye(n, dtype=R.dtype, device=R.device).expand_as(R)
    safe = torch.where(singular[:, None, None], eye, R)
    Rinv = torch.linalg.solve_triangular(safe, eye, upper=True)
    cov = Rinv @ Rinv.transpose(-1, -2)
    return torch.where(singular[:, None, None], torch.full_like(cov, float("nan")), cov)


#: Batches invert ``J^T J`` directly where its 2-norm condition number is at most
#: this (float64: a relative error of about ``eps * 1e6 = 2e-10`` in ``pcov``;
#: float32: ``1e-4 / eps``); the other problems take scipy's factorisation.
PCOV_GRAM_COND_LIMIT = 1e6


def _batch_normal_inverse(J: torch.Tensor,
                          factorised: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``(J^T J)^{-1}`` per problem: the Gram inverse where trusted, else ``factorised(J)``.

    Inverting the small Gram matrix costs a fraction of a batched SVD or QR of
    ``J``; for well-conditioned problems the two agree to about ``eps *
    cond(J^T J)``. Rank-deficient, ill-conditioned and non-finite problems
    (and ``M < N``) go through ``factorised``, as scipy computes them; a
    non-finite Jacobian gives a NaN covariance without disturbing the others.
    """
    B, m, n = J.shape
    G = J.transpose(-1, -2) @ J
    finite = torch.isfinite(G.sum((-2, -1)))
    if not bool(finite.all()):  # keep the inversion away from non-finite rows
        G = torch.where(finite[:, None, None], G, torch.eye(n, dtype=G.dtype, device=G.device))
    limit = min(PCOV_GRAM_COND_LIMIT, 1e-4 / torch.finfo(G.dtype).eps)
    Ginv, cond1 = inverse_and_condition(G)
    cov = 0.5 * (Ginv + Ginv.transpose(-1, -2))
    ok = finite & (cond1 <= limit / n) if m >= n else torch.zeros_like(finite)
    if not bool(ok.all()):
        rows = (~ok).nonzero().squeeze(-1)
        Jb = J.index_select(0, rows)
        sub = torch.full((rows.shape[0], n, n), float("nan"), dtype=cov.dtype, device=cov.device)
        good = torch.isfinite(Jb).flatten(1).all(-1)  # a NaN Jacobian gives a NaN covariance
        if bool(good.any()):
            sub[good] = factorised(Jb[good])
        cov = cov.index_copy(0, rows, sub)
    return cov


def _qr_inverse(J: torch.Tensor) -> torch.Tensor:
    """``(J^T J)^{-1} = R^{-1} R^{-T}`` from ``J = Q R`` ('lm'); NaN where ``R`` is singular."""
    return _batch_inverse_from_r(torch.linalg.qr(J, mode="r")[1])


def _svd_pinv(J: torch.Tensor) -> torch.Tensor:
    """``(J^T J)^+`` per problem from the thin SVD, as :func:`_pinv_normal_matrix`."""
    _, s, Vh = torch.linalg.svd(J, full_matrices=False)
    threshold = torch.finfo(J.dtype).eps * max(J.shape[-2:]) * s[:, :1]
    keep = s > threshold
    inv_s2 = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)) ** 2,
                         torch.zeros_like(s))
    return (Vh.transpose(-1, -2) * inv_s2.unsqueeze(-2)) @ Vh


def _batch_finish_covariance(cov: torch.Tensor, ok: torch.Tensor, n: int,
                             m: int | torch.Tensor, cost: torch.Tensor, absolute_sigma: bool
                             ) -> tuple[torch.Tensor, int]:
    """:func:`_finish_covariance` per problem; returns the count that would warn.

    ``m`` is the number of observations, shared or per problem ``(B,)``
    (after ``nan_policy='omit'``).
    """
    bad = torch.isnan(cov).flatten(1).any(-1)
    warn = bad.clone()
    if not absolute_sigma:
        m_t = torch.as_tensor(m, device=cov.device).expand_as(bad)
        enough = m_t > n
        dof = torch.where(enough, m_t - n, torch.ones_like(m_t)).to(cost.dtype)
        cov = cov * (cost / dof)[:, None, None]
        warn = warn | ~enough
        bad = bad | ~enough
    cov = torch.where(bad[:, None, None], torch.full_like(cov, float("inf")), cov)
    cov = torch.where(ok[:, None, None], cov, torch.full_like(cov, float("nan")))
    return cov, int((warn & ok).sum())
