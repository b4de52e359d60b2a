"""The data of a fit: ``xdata``, ``ydata``, ``sigma``, ``nan_policy``, ``p0`` and bounds defaults.

One batched description serves both public functions: :func:`curve_fit` is a
batch of one whose ``xdata`` is passed to ``f`` unchanged, as scipy does;
:func:`batch_curve_fit` holds B data sets, with ``xdata`` shared or per
problem. The ``sigma`` transform is either ``('diag', 1 / sigma)`` of shape
``(1 or B, M)`` (standard deviations) or ``('chol', L)`` of shape
``(1 or B, M, M)`` with ``Sigma = L L^T`` (covariance matrices).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg
import torch

from .._arrays import to_host
from .._user_functions import _ascending_run
from .._validation import unbounded_default  # noqa: F401  (curve_fit's test of its default)

#: What ``curve_fit`` raises for NaN or inf in checked data (numpy's text); also the
#: message of the problems ``batch_curve_fit`` keeps out of the solve for that reason.
NONFINITE_DATA_MSG = "array must not contain infs or NaNs"


def too_many_parameters(n: int, m: int) -> str:
    """What ``curve_fit`` ('lm') raises as ``TypeError`` for ``n`` parameters and ``m < n``
    data points (scipy's text); also the message of such a problem of a batch."""
    return f"The number of func parameters={n} must not exceed the number of data points={m}"


# ---------------------------------------------------------------------------
# parameters: count, default start, the tensor that decides device and dtype
# ---------------------------------------------------------------------------
def count_parameters(f: Callable) -> int:
    """Positional parameters of ``f`` minus the independent variable.

    A plain Python function (no ``__signature__`` or ``__wrapped__`` that
    :func:`inspect.signature` would follow) is read from its code object, at
    no cost; anything else through :func:`inspect.signature`.
    """
    if (type(f) is types.FunctionType and not hasattr(f, "__signature__")
            and not hasattr(f, "__wrapped__")):
        count = f.__code__.co_argcount  # positional-only and positional-or-keyword
    else:
        params = inspect.signature(f).parameters.values()
        count = sum(p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                               inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params)
    if count < 2:
        raise ValueError("Unable to determine number of fit parameters.")
    return count - 1


def feasible_start(lb: np.ndarray, ub: np.ndarray) -> np.ndarray:
    """1 where unbounded, midpoints of finite boxes, one unit inside a single bound."""
    lo, hi = np.isfinite(lb), np.isfinite(ub)
    p0 = np.ones_like(lb, dtype=float)
    if not (lo.any() or hi.any()):  # unbounded (curve_fit's usual call): ones
        return p0
    p0 = np.where(lo & hi, 0.5 * (np.where(lo, lb, 0) + np.where(hi, ub, 0)), p0)
    p0 = np.where(lo & ~hi, np.where(lo, lb, 0) + 1, p0)
    p0 = np.where(~lo & hi, np.where(hi, ub, 0) - 1, p0)
    return p0


def any_bound(lb: np.ndarray, ub: np.ndarray) -> bool:
    """Whether some parameter has a bound (``lb > -inf`` or ``ub < inf``)."""
    return bool(np.any((lb > -np.inf) | (ub < np.inf)))


def method_for_bounds(method: str | None, bounded: bool) -> str:
    """The method: 'trf' with finite bounds, else 'lm' by default; 'lm' refuses bounds."""
    if method is None:
        method = "trf" if bounded else "lm"
    if method == "lm" and bounded:
        raise ValueError("Method 'lm' only works for unconstrained problems. "
                         "Use 'trf' or 'dogbox' instead.")
    return method


def torch_lead(p0: Any, ydata: Any, xdata: Any) -> torch.Tensor | None:
    """The tensor that decides device and dtype (``p0``, then ``ydata``, then ``xdata``)."""
    for a in (p0, ydata, xdata):
        if isinstance(a, torch.Tensor):
            return a
    if isinstance(xdata, list | tuple):
        for a in xdata:
            if isinstance(a, torch.Tensor):
                return a
    return None


def float_array(a: Any, check_finite: bool) -> np.ndarray:
    """scipy's cast to float, with ``asarray_chkfinite``'s check when asked."""
    a = to_host(a)
    if check_finite:
        return np.asarray_chkfinite(a, float)
    return np.asarray(a, float)


def check_nan_policy(nan_policy: str) -> None:
    """scipy's refusals of ``nan_policy`` values other than 'raise' and 'omit'."""
    if nan_policy == "propagate":
        raise ValueError("`nan_policy='propagate'` is not supported by this function.")
    if nan_policy not in ("raise", "omit"):
        raise ValueError("nan_policy must be one of {None, 'raise', 'omit'}")


# ---------------------------------------------------------------------------
# sigma
# ---------------------------------------------------------------------------
def sigma_transform(sigma: Any, B: int | None, M: int,
                    keep: np.ndarray | None = None) -> tuple[str, np.ndarray] | None:
    """``('diag', 1 / sigma)`` of shape ``(1 or B, M)`` or ``('chol', L)`` of ``(1 or B, M, M)``.

    ``B`` is None for :func:`curve_fit`, which takes a scalar, ``(M,)`` or a
    covariance ``(M, M)``; :func:`batch_curve_fit` takes a scalar, ``(M,)``,
    ``(B, M)`` or covariances ``(B, M, M)``. ``keep (B, M)``
    (``nan_policy='omit'`` in a batch) marks the observations each problem
    keeps: the omitted ones get weight 1 and, in a covariance, an identity row
    and column (no correlation with the kept ones), so that the whitened kept
    residuals are those of the reduced data set.
    """
    if sigma is None:
        return None
    sigma = np.asarray(to_host(sigma), dtype=None if B is None else float)
    if B is None and sigma.size == 1 and sigma.ndim > 1:
        # scipy reads a one-entry sigma as a standard deviation of the sigma's own
        # shape and then fails on the 2-D residuals it makes; the value is ambiguous
        # (standard deviation or variance), so refuse it rather than guess
        raise ValueError(f"`sigma` of shape {sigma.shape} is ambiguous: give a standard "
                         "deviation as a scalar or 1-D array, or a covariance matrix of "
                         "shape (M, M) with M > 1.")
    if sigma.size == 1 or sigma.shape == (M,) or (B is not None and sigma.shape == (B, M)):
        with np.errstate(divide="ignore"):
            T = 1.0 / sigma.reshape(-1, 1 if sigma.size == 1 else M)
        if keep is not None:
            T = np.where(keep, T, 1.0)
        return "diag", T
    if sigma.shape == ((M, M) if B is None else (B, M, M)):
        if keep is not None:
            both = keep[:, :, None] & keep[:, None, :]
            sigma = np.where(both, sigma, np.eye(M))
        try:
            if B is None:
                return "chol", scipy.linalg.cholesky(sigma, lower=True)[None]
            return "chol", np.linalg.cholesky(sigma)
        except np.linalg.LinAlgError as e:
            raise ValueError("`sigma` must be positive definite.") from e
    raise ValueError("`sigma` has incorrect shape.")


# ---------------------------------------------------------------------------
# the data of B problems
# ---------------------------------------------------------------------------
class FitData:
    """``xdata``, ``ydata (B, M)``, the ``sigma`` transform and the kept mask, by problem.

    ``xkind`` says how ``xdata`` reaches ``f``: 'shared' (one array, given
    unchanged to every call), 'rows' (``(B, M)``: the rows of the problems
    called), 'stack' (``(B, k, M)``: ``(k, b, M)``), 'tuple' (predictors,
    each shared or per problem) or 'object' (anything else, unchanged).
    :meth:`single` builds the batch of one of :func:`curve_fit`.
    """

    def __init__(self, xkind: str, xparts: Any, Y: np.ndarray,
                 yshape: tuple | None = None) -> None:
        self.B = Y.shape[0]
        self.xkind, self.xparts = xkind, xparts
        self.Y = Y
        #: ``ydata``'s own shape in :func:`curve_fit` (None in a batch)
        self.yshape = yshape
        self.keep: np.ndarray | None = None
        #: the caller's tensors behind ``xparts`` ('x') and ``Y`` ('Y'), handed to the
        #: model as they are (autograd graph included) instead of host copies
        self.sources: dict[str, torch.Tensor] = {}
        self.set_transform(None)

    def keep_sources(self, x: Any = None, Y: Any = None) -> None:
        """Remember the caller's tensors for ``xdata`` and ``ydata`` (others are ignored)."""
        if isinstance(x, torch.Tensor) and self.xkind in ("shared", "rows", "stack") and (
                tuple(x.shape) == np.shape(self.xparts)):
            self.sources["x"] = x
        if isinstance(Y, torch.Tensor) and Y.numel() == self.Y.size:
            self.sources["Y"] = Y.reshape(self.Y.shape)
        self.cache = {}

    @classmethod
    def single(cls, xdata: Any, xdata_is_array: bool, ydata: np.ndarray) -> FitData:
        """:func:`curve_fit`'s data: ``xdata`` passed to ``f`` as it is."""
        return cls("shared" if xdata_is_array else "object", xdata, ydata.reshape(1, -1),
                   ydata.shape)

    @classmethod
    def batch(cls, xdata: Any, Y: np.ndarray) -> FitData:
        """:func:`batch_curve_fit`'s data: ``xdata`` shared or per problem (see its docs)."""
        B = Y.shape[0]
        if isinstance(xdata, list | tuple) and any(np.ndim(to_host(e)) >= 1 for e in xdata):
            parts = [np.asarray(to_host(e), dtype=float) for e in xdata]
            batched = [p.ndim >= 2 and p.shape[0] == B for p in parts]
            if not any(batched):
                return cls("shared", np.asarray(parts), Y)
            return cls("tuple", list(zip(parts, batched, strict=True)), Y)
        if isinstance(xdata, list | tuple | np.ndarray | torch.Tensor):
            arr = np.asarray(to_host(xdata), dtype=float)
            if arr.ndim >= 2 and arr.shape[0] == B:
                return cls("rows" if arr.ndim == 2 else "stack", arr, Y)
            return cls("shared", arr, Y)
        return cls("object", xdata, Y)

    @property
    def M(self) -> int:
        """Number of observations per problem."""
        return self.Y.shape[1]

    def set_transform(self, transform: tuple | None) -> None:
        """Set the ``sigma`` transform (``('diag', T)``, ``('chol', L)`` or None)."""
        self.tkind = None if transform is None else transform[0]
        self.T = None if transform is None else transform[1]
        self.cache: dict = {}
        self.graph: torch.Tensor | None = None

    def use_graph(self, xdata: Any, ydata: Any, sigma: Any, omitted: bool) -> None:
        """Keep a grad-requiring ``sigma`` tensor; refuse what cannot carry gradients.

        ``xdata`` and ``ydata`` tensors already reach the model undetached
        (:meth:`keep_sources`); with a grad-requiring ``sigma`` the transform
        of :meth:`arrays` is computed from it too, inside its autograd graph,
        so that ``popt`` is differentiable with respect to all three
        (gradients through the solution, ``docs/gradients.md``). Not when
        ``nan_policy='omit'`` removed observations, nor for an ``xdata``
        given as a tuple of predictors: a ``ValueError`` says so rather than
        return a ``popt`` silently cut from their graph.
        """
        def grad(a: Any) -> bool:
            return isinstance(a, torch.Tensor) and a.requires_grad

        if not torch.is_grad_enabled() or not (grad(xdata) or grad(ydata) or grad(sigma)):
            return
        if omitted:
            raise ValueError("Gradients with respect to `xdata`, `ydata` or `sigma` are not "
                             "supported when `nan_policy='omit'` omits observations.")
        if grad(xdata) and "x" not in self.sources:
            raise ValueError("Gradients with respect to `xdata` need it as one array "
                             "(not a tuple of predictors).")
        if grad(ydata) and "Y" not in self.sources:
            raise ValueError("Gradients with respect to `ydata` need it as one tensor of "
                             "the data's shape.")
        self.graph = sigma if grad(sigma) else None
        self.cache = {}

    def _graph_arrays(self, d: dict, dev: Any, dt: Any) -> dict:
        """``d`` with the ``sigma`` transform recomputed from the caller's tensor."""
        s = self.graph.to(device=dev, dtype=dt)
        T = (1 / s) if self.tkind == "diag" else torch.linalg.cholesky(s)
        return dict(d, T=T.reshape(self.T.shape))

    def _parts(self) -> list[tuple[np.ndarray, bool]]:
        """The numeric parts of ``xdata`` with whether each is per problem."""
        if self.xkind in ("rows", "stack"):
            return [(self.xparts, True)]
        if self.xkind == "shared":
            return [(np.asarray(self.xparts), False)]
        return list(self.xparts) if self.xkind == "tuple" else []

    def _x_nan(self) -> np.ndarray:
        """``(B, M)`` or ``(M,)``: observations with a NaN in ``xdata``."""
        out = np.zeros(self.M, dtype=bool)
        for p, batched in self._parts():
            if not np.issubdtype(p.dtype, np.inexact) or p.size == 0:
                continue
            nan = np.isnan(p)
            out = out | (nan.reshape(self.B, -1, nan.shape[-1]).any(axis=1) if batched
                         else nan.any(axis=tuple(range(nan.ndim - 1))))
        return out

    def apply_nan_policy(self, nan_policy: str | None, drop: bool) -> np.ndarray | None:
        """Apply ``nan_policy``; return the ``(B, M)`` kept mask of an 'omit' (or None).

        'raise' raises on any NaN; 'omit' either drops the observations
        (``drop``, :func:`curve_fit`: ``M`` shrinks) or keeps the batch
        rectangular, zeroing the omitted entries (so that models and autograd
        see finite numbers; their residuals are masked by the model). Returns
        None when nothing is omitted.
        """
        if nan_policy is None:
            return None
        check_nan_policy(nan_policy)
        omit = np.isnan(self.Y) | self._x_nan()
        if not omit.any():
            return None
        if nan_policy == "raise":
            raise ValueError("The input contains nan values")
        keep = ~omit
        if drop:  # one problem: its reduced data set
            self.Y = self.Y[:, keep[0]]
            self.yshape = self.Y.shape[1:]
            self.xparts = self.xparts[..., keep[0]]
            self.sources = {}
            return keep
        self.Y = np.where(keep, self.Y, 0.0)
        if self.xkind == "tuple":
            self.xparts = [(np.nan_to_num(p, nan=0.0), b) for p, b in self.xparts]
        elif self.xkind != "object":
            self.xparts = np.nan_to_num(self.xparts, nan=0.0)
        self.keep = keep
        self.sources = {}  # the data changed: host copies from here on
        self.cache = {}
        return keep

    def finite_rows(self) -> np.ndarray:
        """Problems whose ``ydata``, per-problem ``xdata`` and ``sigma`` are finite.

        Non-finite shared ``xdata`` raises, as :func:`curve_fit` does.
        """
        ok = np.isfinite(self.Y).all(axis=1)
        if self.keep is not None:  # a problem left without observations fails
            ok &= self.keep.any(axis=1)
        if self.T is not None:
            fin = np.isfinite(self.T.reshape(self.T.shape[0], -1)).all(axis=1)
            ok &= fin if fin.shape[0] == self.B else bool(fin.all())
        for p, batched in self._parts():
            if batched:
                ok &= np.isfinite(p.reshape(self.B, -1)).all(axis=1)
            elif not np.isfinite(p).all():
                raise ValueError(NONFINITE_DATA_MSG)
        return ok

    def arrays(self, like: Any) -> dict:
        """All data in the kind (numpy, or torch on a device and real dtype) of ``like``.

        Tensors come from the caller's tensors where they are kept (see
        :meth:`keep_sources`), converted but not detached.
        """
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
                x = conv(self.sources.get("x", self.xparts) if key != "numpy" else self.xparts)
            keep = self.keep
            Y = self.sources.get("Y", self.Y) if key != "numpy" else self.Y
            self.cache[key] = {"x": x, "Y": conv(Y),
                               "T": None if self.T is None else conv(self.T),
                               "keep": keep if key == "numpy" or keep is None
                               else torch.as_tensor(keep, device=key[0])}
            if self.graph is not None and key != "numpy":
                self.cache[key] = self._graph_arrays(self.cache[key], *key)
        return self.cache[key]

    @staticmethod
    def _rows(a: Any, ids: Any, repeat: int = 1) -> Any:
        """Rows ``ids`` of ``a``, each ``repeat`` times; a view when they are one ascending run."""
        if a.shape[0] == 1 and repeat == 1:  # one problem (curve_fit): no index to check
            return a
        if isinstance(ids, np.ndarray) and isinstance(a, np.ndarray):
            # numpy rows of numpy data (batch_curve_fit of a numpy model): the test and the
            # selection with numpy's own functions, no tensor round trip
            run = _ascending_run(ids) if repeat == 1 else None
            if run is not None:
                return a[run[0]:run[1]]
            return np.take(a, ids if repeat == 1 else np.repeat(ids, repeat), axis=0)
        idx = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(np.asarray(ids))
        run = _ascending_run(idx) if repeat == 1 else None
        if run is not None:
            return a[run[0]:run[1]]
        if repeat > 1:
            idx = idx.repeat_interleave(repeat)
        if isinstance(a, torch.Tensor):
            return a.index_select(0, idx.to(a.device))
        return np.take(a, idx.cpu().numpy(), axis=0)  # (about twice a[idx]'s speed for rows)

    def select(self, ids: Any, like: Any, repeat: int = 1) -> tuple:
        """``(x, y, T, keep)`` for the problems ``ids``, in the kind of ``like``.

        Per-problem ``xdata`` comes ``repeat`` times per problem (for the
        shifted points of forward differences); ``y``, ``T`` and ``keep`` once.
        """
        if self.B == 1 and self.xkind in ("shared", "object"):  # curve_fit: all as they are
            d = self.arrays(like)
            return d["x"], d["Y"], d["T"], d["keep"]
        d = self.arrays(like)
        x = d["x"]
        if self.xkind in ("rows", "stack"):
            x = self._rows(x, ids, repeat)
            if self.xkind == "stack":
                x = x.movedim(0, 1) if isinstance(x, torch.Tensor) else np.moveaxis(x, 0, 1)
        elif self.xkind == "tuple":
            x = tuple(self._rows(p, ids, repeat) if s else p for p, s in x)
        T = d["T"]
        if T is not None and T.shape[0] == self.B and self.B > 1:
            T = self._rows(T, ids)
        keep = None if d["keep"] is None else self._rows(d["keep"], ids)
        return x, self._rows(d["Y"], ids), T, keep
