"""xarray's ``curvefit``, fitted by :func:`torchimize_scipy.batch_curve_fit` one block at a time.

:func:`curvefit` takes the arguments of ``xarray.Dataset.curvefit`` /
``xarray.DataArray.curvefit`` and returns the same Dataset
(``[var_]curvefit_coefficients`` over ``param`` and
``[var_]curvefit_covariance`` over ``cov_i``, ``cov_j``). Where xarray calls
:func:`scipy.optimize.curve_fit` once per pixel (``apply_ufunc`` with
``vectorize=True``), this module hands every block of pixels to one
:func:`torchimize_scipy.batch_curve_fit` call. Dask-backed input gives
dask-backed output: nothing runs before ``compute``, and each block is fitted
on the worker that holds it.

Requires the ``xarray`` extra: ``pip install torchimize-scipy[xarray]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

try:
    import xarray as xr
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("torchimize_scipy.xarray needs xarray: pip install "
                      "'torchimize-scipy[xarray]'") from exc

from . import batch_curve_fit
from ._curve_fit._batched import QUIET_FAILED
from ._curve_fit._data import too_many_parameters
from ._dask_workers import prepare_worker

__all__ = ["curvefit"]


def curvefit(
    obj: xr.Dataset | xr.DataArray,
    coords: str | xr.DataArray | Iterable[str | xr.DataArray],
    func: Callable[..., Any],
    reduce_dims: str | Iterable[Hashable] | None = None,
    skipna: bool = True,
    p0: Mapping[str, float | xr.DataArray] | None = None,
    bounds: Mapping[str, tuple[float | xr.DataArray, float | xr.DataArray]] | None = None,
    param_names: Sequence[str] | None = None,
    errors: str = "raise",
    kwargs: dict[str, Any] | None = None,
) -> xr.Dataset:
    """Fit ``func`` along ``coords`` at every point of ``obj``, as xarray's ``curvefit``.

    Parameters
    ----------
    obj : xarray.Dataset or xarray.DataArray
        The data; every data variable of a Dataset is fitted.
    coords : str, DataArray or sequence of them
        The independent coordinate(s), in the order of ``func``'s first
        argument; names of coordinates of ``obj`` or DataArrays. Dimensions of
        ``obj`` that they span are fitted over (reduced).
    func : callable
        ``func(x, *params)``. It is called for a whole block of pixels at once:
        each parameter is a column of shape ``(b, 1)`` and ``x`` has shape
        ``(N,)`` (one coordinate shared by all pixels), ``(k, N)`` (``k``
        shared coordinates), ``(b, N)`` or ``(k, b, N)`` (coordinates that
        vary with the pixel), where ``N`` is the number of points fitted, so
        numpy expressions such as ``a * np.exp(-k * x)`` work unchanged; it
        must return ``(b, N)`` (or a shape that broadcasts to it).
    reduce_dims : str or iterable of hashable, optional
        More dimensions to aggregate over in each fit.
    skipna : bool, optional
        Leave out, pixel by pixel, the points where the data or a coordinate
        is NaN (``nan_policy='omit'``); a pixel without any point gets NaN.
        False: a NaN raises ``ValueError`` (``nan_policy='raise'``).
    p0 : dict-like, optional
        Initial guesses by parameter name: scalars or DataArrays over the
        dimensions that are not reduced. Others default to the default of
        ``func``'s argument, else 1 (moved inside the bounds, as xarray does).
    bounds : dict-like, optional
        ``(lower, upper)`` by parameter name, scalars or DataArrays as ``p0``.
    param_names : sequence of str, optional
        Names of the parameters, needed when ``func`` takes ``*params``.
    errors : {'raise', 'ignore'}, optional
        'raise': a pixel whose fit fails (where ``curve_fit`` raises
        ``RuntimeError``) raises ``RuntimeError``; 'ignore': its coefficients
        and covariance are NaN.
    kwargs : dict, optional
        Options of :func:`torchimize_scipy.batch_curve_fit` (those of
        ``curve_fit``: ``method``, ``ftol``, ``maxfev``, ``sigma`` is not
        one of them here, as with xarray), plus ``device``, ``dtype`` and
        ``chunk_size``.

    Returns
    -------
    xarray.Dataset
        ``[var_]curvefit_coefficients`` with dims ``(..., 'param')`` and
        ``[var_]curvefit_covariance`` with dims ``(..., 'cov_i', 'cov_j')``
        (``var_`` is empty for a DataArray), float64, with the parameter
        names as coordinates and, for a Dataset, its attributes.

    Raises
    ------
    ValueError
        With xarray's messages: no coordinate on a dimension of ``obj`` and no
        ``reduce_dims``; ``p0``/``bounds`` DataArrays with dimensions that are
        fitted over; ``errors`` not 'raise' or 'ignore'; ``func``'s parameters
        not inspectable without ``param_names``.
    RuntimeError
        With ``errors='raise'``, when a fit fails.
    TypeError
        With xarray's (scipy's) message, whatever ``errors`` says: a pixel
        with fewer valid points than parameters (but at least one) fitted by
        'lm' (the default without bounds).

    Notes
    -----
    Each block of pixels is one :func:`batch_curve_fit` call. As per pixel in
    xarray, the method defaults to 'lm' for pixels without a finite bound and
    'trf' for the others (a block with both kinds is fitted in two calls).
    Fitted dimensions chunked by dask are made one chunk. An ``inf`` in the
    data makes that pixel's fit fail (scipy's ``check_finite`` raises
    ``ValueError`` for the whole call instead).

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> from torchimize_scipy.xarray import curvefit
    >>> t = np.linspace(0, 2, 30)
    >>> k = xr.DataArray([0.5, 1.0, 2.0], dims="pixel")
    >>> data = np.exp(-k * xr.DataArray(t, dims="t", coords={"t": t}))
    >>> fit = curvefit(data, "t", lambda t, k: np.exp(-k * t))
    >>> np.round(fit.curvefit_coefficients.sel(param="k").values, 6)
    array([0.5, 1. , 2. ])
    """
    p0 = {} if p0 is None else dict(p0)
    bounds = {} if bounds is None else dict(bounds)
    kwargs = {} if kwargs is None else dict(kwargs)

    if not reduce_dims:
        reduce_list: list[Hashable] = []
    elif isinstance(reduce_dims, str) or not isinstance(reduce_dims, Iterable):
        reduce_list = [reduce_dims]
    else:
        reduce_list = list(reduce_dims)
    if isinstance(coords, (str, xr.DataArray)) or not isinstance(coords, Iterable):
        coords = [coords]
    coord_arrays = [obj[c] if isinstance(c, str) else c for c in coords]
    for c in coord_arrays:
        reduce_list += [d for d in obj.dims if c.equals(obj[d])]
    reduce_list = list(dict.fromkeys(reduce_list))
    preserved = [d for d in obj.dims if d not in reduce_list]
    if not reduce_list:
        raise ValueError(
            "No arguments to `coords` were identified as a dimension on the calling "
            "object, and no dims were supplied to `reduce_dims`. This would result "
            "in fitting on scalar data.")
    checked = [(f"Initial guess for '{param}'", guess) for param, guess in p0.items()]
    checked += [(f"{label} bound for '{param}'", bound) for param, (lb, ub) in bounds.items()
                for label, bound in (("Lower", lb), ("Upper", ub))]
    for what, value in checked:
        unexpected = set(value.dims) - set(preserved) if isinstance(value, xr.DataArray) \
            else set()
        if unexpected:
            raise ValueError(
                f"{what} has unexpected dimensions {tuple(unexpected)}. It should only have "
                f"dimensions that are in data dimensions {preserved}.")
    if errors not in ("raise", "ignore"):
        raise ValueError('errors must be either "raise" or "ignore"')

    coord_arrays = list(xr.broadcast(*coord_arrays))
    coord_arrays = [c.broadcast_like(obj, exclude=preserved) for c in coord_arrays]
    params, func_args = _parameters(func, param_names)
    starts, limits = _starts_and_bounds(params, p0, bounds, func_args)
    n_coords, n_params = len(coord_arrays), len(params)

    fit = _BlockFit(func=func, n_coords=n_coords, n_core=len(reduce_list), n_params=n_params,
                    skipna=skipna, errors=errors, kwargs=kwargs)
    variables = [("", obj)] if isinstance(obj, xr.DataArray) else list(obj.data_vars.items())
    result = xr.Dataset()
    for name, data in variables:
        prefix = f"{name}_" if name != "" else ""
        if data.chunks is not None:  # fitted dims one chunk; the pixels keep their blocks
            data = data.chunk({d: -1 for d in reduce_list if d in data.dims})
        popt, pcov = xr.apply_ufunc(
            fit, data, *coord_arrays, *starts.values(), *[b[0] for b in limits.values()],
            *[b[1] for b in limits.values()],
            dask="parallelized",
            input_core_dims=[reduce_list] * (n_coords + 1) + [[]] * (3 * n_params),
            output_core_dims=[["param"], ["cov_i", "cov_j"]],
            dask_gufunc_kwargs={"output_sizes": {"param": n_params, "cov_i": n_params,
                                                 "cov_j": n_params},
                                "allow_rechunk": True},
            output_dtypes=(np.float64, np.float64),
            exclude_dims=set(reduce_list),
        )
        result[prefix + "curvefit_coefficients"] = popt
        result[prefix + "curvefit_covariance"] = pcov
    result = result.assign_coords({"param": params, "cov_i": params, "cov_j": params})
    # xarray fits a DataArray through a temporary Dataset, which has no attributes
    result.attrs = {} if isinstance(obj, xr.DataArray) else obj.attrs.copy()
    return result


def _parameters(func: Callable, param_names: Sequence[str] | None) -> tuple[list, Mapping]:
    """The names of the fitted parameters and ``func``'s signature (xarray's rules)."""
    try:
        func_args: Mapping[str, inspect.Parameter] = inspect.signature(func).parameters
    except ValueError as err:
        func_args = {}
        if not param_names:
            raise ValueError("Unable to inspect `func` signature, and `param_names` was not "
                             "provided.") from err
    if param_names:
        return list(param_names), func_args
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in func_args.values()):
        raise ValueError("`param_names` must be provided because `func` takes variable length "
                         "arguments.")
    return list(func_args)[1:], func_args


def _starts_and_bounds(params: list, p0: dict, bounds: dict,
                       func_args: Mapping) -> tuple[dict, dict]:
    """Initial guesses and bounds by parameter, with xarray's defaults.

    A guess is ``p0``'s, else the default of ``func``'s argument, else 1; a
    default outside its bounds moves to the middle of finite bounds, one
    inside a single finite bound, or 0 (``curve_fit``'s feasible start).
    """
    starts: dict[str, Any] = {}
    limits: dict[str, tuple] = {}
    for p in params:
        start: Any = 1
        if p in func_args and func_args[p].default is not inspect.Parameter.empty:
            start = func_args[p].default
        lb, ub = bounds.get(p, (-np.inf, np.inf))
        if p in bounds:
            feasible = xr.where(np.isfinite(lb),
                                xr.where(np.isfinite(ub), 0.5 * (lb + ub), lb + 1),
                                xr.where(np.isfinite(ub), ub - 1, 0))
            start = xr.where((start < lb) | (start > ub), feasible, start)
        starts[p] = p0.get(p, start)
        limits[p] = (lb, ub)
    return starts, limits


class _BlockFit:
    """The function that ``apply_ufunc`` calls on each block of pixels.

    Arguments arrive as ``(Y, *coords, *p0, *lower, *upper)``: ``Y`` and the
    coordinates with the fitted (core) dimensions last, the others with the
    pixel (loop) dimensions only, broadcastable against each other.
    """

    def __init__(self, *, func: Callable, n_coords: int, n_core: int, n_params: int,
                 skipna: bool, errors: str, kwargs: dict) -> None:
        self.func, self.n_coords, self.n_core, self.P = func, n_coords, n_core, n_params
        self.skipna, self.errors, self.kwargs = skipna, errors, kwargs

    def __call__(self, Y: np.ndarray, *args: Any) -> tuple[np.ndarray, np.ndarray]:
        prepare_worker()  # on a dask worker: allocator and torch threads (see _dask_workers)
        k, P, nc = self.n_coords, self.P, self.n_core
        coords = [np.asarray(c, dtype=float) for c in args[:k]]
        per_param = [np.asarray(a, dtype=float) for a in args[k:]]
        Y = np.asarray(Y, dtype=float)
        core = Y.shape[Y.ndim - nc:]
        loop = np.broadcast_shapes(Y.shape[:Y.ndim - nc],
                                   *(c.shape[:c.ndim - nc] for c in coords),
                                   *(a.shape for a in per_param))
        B, N = int(np.prod(loop)), int(np.prod(core))
        y = np.broadcast_to(Y, loop + core).reshape(B, N)
        xs = []
        for c in coords:
            lead = c.shape[:c.ndim - nc]
            if int(np.prod(lead)) == 1:
                xs.append(c.reshape(N))  # one coordinate for every pixel
            else:
                xs.append(np.broadcast_to(c, loop + core).reshape(B, N))
        columns = [np.broadcast_to(a, loop).reshape(B) for a in per_param]
        start = np.stack(columns[:P], axis=1) if P else np.zeros((B, 0))
        lower = np.stack(columns[P:2 * P], axis=1)
        upper = np.stack(columns[2 * P:], axis=1)
        popt = np.full((B, P), np.nan)
        pcov = np.full((B, P, P), np.nan)
        if B:
            bounded = (np.isfinite(lower) | np.isfinite(upper)).any(axis=1)
            groups = [np.arange(B)]
            if "method" not in self.kwargs and bounded.any() and not bounded.all():
                groups = [np.flatnonzero(bounded), np.flatnonzero(~bounded)]  # trf / lm
            for rows in groups:
                popt[rows], pcov[rows] = self._fit(rows, xs, y, start, lower, upper)
        return popt.reshape(loop + (P,)), pcov.reshape(loop + (P, P))

    def _fit(self, rows: np.ndarray, xs: list, y: np.ndarray, start: np.ndarray,
             lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One ``batch_curve_fit`` call for the pixels ``rows``."""
        whole = rows.size == y.shape[0]
        xr_rows = [x if x.ndim == 1 or whole else x[rows] for x in xs]
        if len(xr_rows) == 1:
            xdata: Any = xr_rows[0]
        elif all(x.ndim == 1 for x in xr_rows):
            xdata = tuple(xr_rows)  # f receives (k, N)
        else:
            xdata = np.stack([np.broadcast_to(x, (rows.size, y.shape[1])) for x in xr_rows],
                             axis=1)  # (b, k, N): f receives (k, b, N)
        yr = y if whole else y[rows]
        valid = ~np.isnan(yr)
        for x in xr_rows:
            valid &= ~np.isnan(x) if x.ndim == 2 else ~np.isnan(x)[None, :]
        bounded = bool((np.isfinite(lower[rows]) | np.isfinite(upper[rows])).any())
        if self.skipna and (self.kwargs.get("method") or ("trf" if bounded else "lm")) == "lm":
            _few_points(valid.sum(axis=1), self.P)
        options = {"nan_policy": "omit" if self.skipna else "raise", **self.kwargs}
        # failed fits are reported by `errors`, as xarray does: batch_curve_fit's warning
        # of them left out for this call (a context variable: thread-safe under dask)
        token = QUIET_FAILED.set(True)
        try:
            popt, pcov = batch_curve_fit(self.func, xdata, yr, start[rows],
                                         bounds=(lower[rows], upper[rows]), **options)
        finally:
            QUIET_FAILED.reset(token)
        if self.errors == "raise":
            has_data = valid.any(axis=1) if self.skipna else np.ones(len(rows), dtype=bool)
            failed = np.isnan(popt).any(axis=1) & has_data
            if failed.any():
                raise RuntimeError(f"Optimal parameters not found for {int(failed.sum())} "
                                   f"of {len(rows)} fits of a block (the first at its pixel "
                                   f"{int(rows[np.argmax(failed)])}); errors='ignore' gives "
                                   "them NaN.")
        return popt, pcov


def _few_points(counts: np.ndarray, P: int) -> None:
    """xarray's error for a pixel whose valid points are fewer than the parameters, 'lm'.

    xarray's ``curvefit`` hands each pixel's valid points to scipy's
    ``curve_fit``, which raises ``TypeError`` there (leastsq's message for one
    point, its own otherwise) whatever ``errors`` says; a pixel without valid
    points gets NaN instead.
    """
    few = (counts > 0) & (counts < P)
    if not few.any():
        return
    m = int(counts[np.argmax(few)])
    if m == 1:
        raise TypeError(f"Improper input: func input vector length N={P} must not exceed "
                        f"func output vector length M={m}")
    raise TypeError(too_many_parameters(P, m))
