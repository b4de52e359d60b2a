"""``batch_curve_fit``: one model fitted to B data sets at once, as a loop of ``curve_fit``.

The same pieces as :func:`curve_fit` (:mod:`._data`, :mod:`._model` calling
``f`` vectorised, :mod:`._leastsq`, :mod:`._covariance`) on
:func:`batch_least_squares`. Problems whose data are not finite are kept out
of the solve and reported with the status ``NONFINITE`` (where
:func:`curve_fit` raises scipy's ``ValueError``).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.optimize import OptimizeWarning

from .._arrays import as_numpy, detect_namespace, to_host
from .._batch import batch_least_squares, check_shared_diff_step, minpack_bookkeeping
from .._dask import dispatch, has_dask
from .._engine import status as codes
from .._user_functions import WithResiduals
from .._validation import leastsq_rules, prepare_bounds
from ._covariance import COV_MSG, finish_covariance, normal_inverse, qr_inverse, svd_pinv
from ._data import (
    NONFINITE_DATA_MSG,
    FitData,
    any_bound,
    method_for_bounds,
    sigma_transform,
    too_many_parameters,
    torch_lead,
)
from ._leastsq import (
    LeastsqBook,
    epsfcn_diff_step,
    leastsq_messages,
    leastsq_options,
    lm_tolerances,
    minpack_step,
    reject_loss,
    status_to_ier,
)
from ._model import WhitenedModel

#: True (per thread and context) where the caller reports failed fits itself and the
#: "Optimal parameters not found" warning is left out (``torchimize_scipy.xarray``,
#: whose ``errors`` decides; a ``warnings.catch_warnings`` block there would replace the
#: process-wide filter list under dask's threads)
QUIET_FAILED: contextvars.ContextVar[bool] = contextvars.ContextVar("quiet_failed",
                                                                    default=False)


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
        shape that broadcasts to it). Row ``i`` of the result must depend on
        row ``i`` of the parameters only: on the CPU a large batch is
        evaluated in groups of problems of about 2**17 residuals per call.
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
        with 'lm', so does one left with fewer than ``P`` (where
        :func:`curve_fit` raises ``TypeError``; its ``mesg`` is that error's
        text, ``ier`` 0); one left with ``P`` or fewer otherwise gets an
        ``inf`` ``pcov`` (unless ``absolute_sigma``).
    **kwargs
        Options of :func:`curve_fit` / ``least_squares`` (``ftol``, ``xtol``,
        ``gtol``, ``x_scale``, ``loss``, ``maxfev``/``max_nfev``, ``epsfcn``,
        ``diag``, ...), common to all problems; ``x_scale`` and ``diag`` may
        also be ``(B, P)``, one row per problem (any other 2-D shape raises
        ``ValueError``).

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
    lead = torch_lead(p0, ydata, xdata)
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
    method = method_for_bounds(method, any_bound(lb, ub))
    if "args" in kwargs:
        raise ValueError("'args' is not a supported keyword argument.")
    if method == "lm" and n > M:
        raise TypeError(too_many_parameters(n, M))
    if "return_jac" in kwargs:
        raise ValueError("`return_jac` cannot be set: batch_curve_fit needs the Jacobians "
                         "to compute pcov.")
    if method == "lm":
        reject_loss(kwargs, "batch_curve_fit")
    check_shared_diff_step(kwargs.get("diff_step"))

    data = FitData.batch(xdata, Y)
    data.keep_sources(xdata, ydata)
    keep = data.apply_nan_policy(nan_policy, drop=False)
    data.set_transform(sigma_transform(sigma, B, M, keep))
    data.use_graph(xdata, ydata, sigma, omitted=keep is not None)  # gradients through popt
    col_deriv = bool(kwargs.pop("col_deriv", False)) if method == "lm" else False
    model = WhitenedModel(f, jac if callable(jac) else None, data, n, col_deriv, rowwise=False)
    torch_mode = lead is not None
    # curve_fit rejects non-finite data (check_finite); here such problems are
    # reported as failed and kept out of the solve.
    good = data.finite_rows() & np.isfinite(p0_host).all(axis=1)
    # 'lm' on fewer observations than parameters: curve_fit raises TypeError on such a
    # data set (MINPACK cannot start); here the problem fails alone, with that message
    few = None
    if method == "lm" and keep is not None:
        counts = keep.sum(axis=1)
        few = good & (counts < n)
        if few.any():
            good = good & ~few
        else:
            few = None
    good_idx = np.flatnonzero(good)

    jac_arg: Any = model.jacobian if callable(jac) else ("2-point" if jac is None else jac)
    book = None
    if method == "lm":
        opts = leastsq_options(kwargs, n, callable(jac))
        if callable(jac) or jac_arg == "2-point":
            rel = minpack_step(opts["epsfcn"], kwargs.pop("diff_step", None), n, ns.dtype)
            # counts only: the engine skips the Jacobian after a problem's last trial, so
            # its final Jacobian is MINPACK's last one, the covariance's (see _solve_good)
            # the differences take the residuals at their point from the engine
            # (WithResiduals), in its dtype: where that is float64 they are the model's own
            # (numpy models, float64 tensors), and the book need not keep them
            fd = not callable(jac)
            book = LeastsqBook(opts["maxfev"], rel, B, ns.device, keep_jacobians=False,
                               keep_points=not (fd and ns.dtype == torch.float64))
            model.book = book
            if fd:
                jac_arg = WithResiduals(model.fd_jacobian)
        else:
            epsfcn_diff_step(opts["epsfcn"], kwargs)
        kwargs.update(lm_tolerances(opts))
    elif "max_nfev" not in kwargs:
        kwargs["max_nfev"] = kwargs.pop("maxfev", None)
    if "x_scale" in kwargs and np.ndim(to_host(kwargs["x_scale"])) == 2:
        # per problem (or 1 / diag of 'lm', set above): the rows of the problems solved
        x_scale = np.asarray(to_host(kwargs["x_scale"]), dtype=float)
        if x_scale.shape != (B, n):
            raise ValueError(f"Inconsistent shapes between `x_scale` {x_scale.shape} and "
                             f"`p0` {(B, n)}: a 2-D `x_scale` (or `diag`) holds one row "
                             "per problem.")
        kwargs["x_scale"] = x_scale[good_idx]

    label = progress if isinstance(progress, str) else f"batch_curve_fit[{method}]"
    t = _solve_good(model.residuals, p0_host, jac_arg, lb, ub, method, good_idx, B, M, ns,
                    torch_mode, None if book is None else (0 if callable(jac) else n),
                    dict(kwargs, chunk_size=chunk_size, progress=progress and label),
                    opts["factor"] if method == "lm" else 100.0)
    status, nfev = t["status"], t["nfev"]
    njev = None
    if method == "lm":
        ier = status_to_ier(status)  # (0, improper input, for the problems left out)
        cov = normal_inverse(t["jac"], qr_inverse)
        if book is not None:
            ier = torch.where(book.hit, 5, ier)
            njev = book.minpack_njev(status)
            if not callable(jac):
                nfev = nfev + n * njev
        ok = (ier >= 1) & (ier <= 4)
        table = leastsq_messages(opts)
    else:
        ier = status
        ok = codes.success(status)
        cov = normal_inverse(t["jac"], svd_pinv)
        table = {}

    m_eff: Any = M if keep is None else torch.as_tensor(keep.sum(axis=1), device=cov.device)
    cov, indeterminate = finish_covariance(cov, ok, n, m_eff, 2 * t["cost"].detach(),
                                           absolute_sigma)  # pcov: not differentiated
    popt = torch.where(ok[:, None], t["x"], torch.full_like(t["x"], float("nan")))
    if indeterminate:
        warnings.warn(f"{COV_MSG} for {indeterminate} of {B} problems",
                      category=OptimizeWarning, stacklevel=2)
    failed = int((~ok).sum())
    if failed and not QUIET_FAILED.get():
        warnings.warn(f"Optimal parameters not found for {failed} of {B} problems; their "
                      "popt and pcov are NaN (see `mesg` and `ier` with full_output=True)",
                      category=OptimizeWarning, stacklevel=2)

    def out(a: torch.Tensor) -> Any:
        return a if torch_mode else a.detach().cpu().numpy()

    if not full_output:
        return out(popt), out(cov)
    mesg = [NONFINITE_DATA_MSG if not g else table[i] if i in table else codes.message(s)
            for g, i, s in zip(good.tolist(), ier.tolist(), status.tolist(), strict=True)]
    if few is not None:
        for b in np.flatnonzero(few).tolist():
            mesg[b] = too_many_parameters(n, int(counts[b]))
    infodict = {"nfev": out(nfev), "fvec": out(t["fun"])}
    if njev is not None and callable(jac):  # 'lm' only, as leastsq
        infodict["njev"] = out(njev)
    return out(popt), out(cov), infodict, mesg, out(ier)


def _solve_good(fun: Callable, p0: np.ndarray, jac: Any, lb: np.ndarray, ub: np.ndarray,
                method: str, good_idx: np.ndarray, B: int, M: int, ns: Any, torch_mode: bool,
                minpack: int | None, kwargs: dict, lm_factor: float = 100.0) -> dict:
    """Solve the problems ``good_idx`` and scatter the results into B-sized tensors.

    The problems left out keep NaN results, a zero Jacobian and the status
    ``NONFINITE``. ``minpack`` (``'lm'`` with :class:`LeastsqBook`; None
    otherwise): no Jacobian is evaluated after a problem's last trial, so that
    ``jac`` is MINPACK's last Jacobian, and each Jacobian counts ``minpack``
    evaluations against ``max_nfev`` (``n`` for MINPACK's forward differences,
    0 for the user's ``jac``; :func:`~torchimize_scipy._batch.minpack_bookkeeping`).
    """
    n = lb.shape[1]
    dev, dt = ns.device, ns.dtype

    def left_out() -> dict:
        return {"x": torch.full((B, n), float("nan"), device=dev, dtype=dt),
                "cost": torch.full((B,), float("nan"), device=dev, dtype=dt),
                "fun": torch.full((B, M), float("nan"), device=dev, dtype=dt),
                "status": torch.full((B,), codes.NONFINITE, device=dev, dtype=torch.long),
                "nfev": torch.zeros(B, device=dev, dtype=torch.long),
                "jac": torch.zeros(B, M, n, device=dev, dtype=dt)}

    if good_idx.size == 0:
        return left_out()
    if torch_mode:
        x0: Any = torch.as_tensor(p0[good_idx], device=dev, dtype=dt)
        ids: Any = torch.as_tensor(good_idx, device=dev)
    else:
        x0, ids = p0[good_idx], good_idx
    final = minpack_bookkeeping(minpack) if minpack is not None else contextlib.nullcontext()
    # ('lm' takes leastsq's tolerances, below machine epsilon too)
    loose = leastsq_rules(lm_factor) if method == "lm" else contextlib.nullcontext()
    with final, loose:
        res = batch_least_squares(fun, x0, jac=jac, bounds=(lb[good_idx], ub[good_idx]),
                                  method=method, args=(ids,), device=dev, dtype=dt, **kwargs)
    t: dict[str, torch.Tensor] = {}
    for key in ("x", "cost", "fun", "status", "nfev", "jac"):
        v = res[key]
        v = v if isinstance(v, torch.Tensor) else torch.as_tensor(as_numpy(v))
        t[key] = v.to(device=dev, dtype=torch.long if key in ("status", "nfev") else dt)
    if good_idx.size == B:  # good_idx is ascending: the results are the B rows
        return t
    rows = torch.as_tensor(good_idx, device=dev)
    return {k: v.index_copy(0, rows, t[k]) for k, v in left_out().items()}
