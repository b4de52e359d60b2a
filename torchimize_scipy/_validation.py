"""Input checks shared by the frontends, with scipy's wording.

Checks run in scipy's order (string options, ``x0`` and bounds, ``x_scale`` and
tolerances) so that a call that scipy rejects is rejected here with the same
``ValueError``. Options we add are named in the messages.
"""

from __future__ import annotations

import contextvars
import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
from scipy.optimize import Bounds

from ._arrays import to_host

METHODS = ("trf", "dogbox", "lm", "gn", "gd")
FD_METHODS = ("2-point", "3-point", "cs")
JAC_STRINGS = FD_METHODS + ("autograd",)
LOSS_NAMES = ("linear", "huber", "soft_l1", "cauchy", "arctan")


def check_options(method: str, jac: Any, tr_solver: Any, tr_options: Any, loss: Any,
                  verbose: Any, max_nfev: Any, jac_sparsity: Any) -> None:
    """Validate the string and simple options in scipy's order."""
    if method not in METHODS:
        raise ValueError("`method` must be 'trf', 'dogbox', 'lm', 'gn' or 'gd'.")
    if not callable(jac) and jac not in JAC_STRINGS:
        raise ValueError("`jac` must be '2-point', '3-point', 'cs', 'autograd' or callable.")
    if tr_solver not in (None, "exact", "lsmr"):
        raise ValueError("`tr_solver` must be None, 'exact' or 'lsmr'.")
    if not callable(loss) and loss not in LOSS_NAMES:
        raise ValueError("`loss` must be one of dict_keys(['linear', 'huber', 'soft_l1', "
                         "'cauchy', 'arctan']) or a callable.")
    if method == "lm" and loss != "linear":
        raise ValueError("method='lm' supports only 'linear' loss function.")
    if verbose not in (0, 1, 2):
        raise ValueError("`verbose` must be in [0, 1, 2].")
    if max_nfev is not None and max_nfev <= 0:
        raise ValueError("`max_nfev` must be None or positive integer.")


def check_tr_options(tr_options: Any, method: str, tr_solver: str, bounded: bool) -> None:
    """``tr_options`` for the chosen ``tr_solver``, checked as scipy's solvers use them.

    With 'lsmr', scipy's 'trf' takes ``regularize`` (and ``damp`` when
    unbounded) and hands the other keys to :func:`scipy.sparse.linalg.lsmr`,
    whose unknown keyword is a ``TypeError``: raised here with lsmr's message
    before any work. 'dogbox' warns that ``regularize`` is not relevant to
    it, as scipy does. With 'exact' (and with 'lm') scipy ignores
    ``tr_options``, as its documentation says; so do we, so that scipy code
    runs unchanged, but a ``UserWarning`` names the ignored keys (no option is
    ignored silently). With 'lsmr', ``tr_options`` that is not a mapping is
    a ``TypeError`` (scipy's solvers fail on it with errors of their own).
    """
    lsmr = method != "lm" and tr_solver == "lsmr"
    if lsmr and tr_options is not None and not isinstance(tr_options, Mapping):
        # (scipy's solvers fail on it with an AttributeError or a TypeError of their own)
        raise TypeError("`tr_options` must be a dict of keyword arguments for "
                        f"tr_solver='lsmr', not {type(tr_options).__name__}.")
    if not tr_options:
        return
    if not lsmr:
        solver = "method='lm'" if method == "lm" else "tr_solver='exact'"
        named = sorted(tr_options) if isinstance(tr_options, Mapping) else repr(tr_options)
        warnings.warn(f"`tr_options` {named} are ignored with {solver}: they "
                      "apply to tr_solver='lsmr' only (scipy ignores them too).",
                      UserWarning, stacklevel=4)
        return
    if method == "dogbox" and "regularize" in tr_options:
        warnings.warn("The keyword 'regularize' in `tr_options` is not relevant for 'dogbox' "
                      "method.", stacklevel=4)
    from ._engine.steps.trf_lsmr import lsmr_keywords

    lsmr_keywords(tr_options, method, bounded)  # the engine's split of the options, checked


def unbounded_default(bounds: Any) -> bool:
    """Whether ``bounds`` is ``(-inf, inf)`` as two Python floats (the default of
    ``least_squares`` and ``curve_fit``).

    Such bounds need neither broadcasting nor tests: every parameter is free
    (``prepare`` then tests only ``x0`` for NaN, the one test of :func:`check_bounds`
    that could fail).
    """
    return (type(bounds) is tuple and len(bounds) == 2 and type(bounds[0]) is float
            and type(bounds[1]) is float and bounds[0] == -math.inf and bounds[1] == math.inf)


def prepare_bounds(bounds: Any, n: int, batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(lb, ub)`` as float arrays broadcast to ``(n,)`` (or ``(B, n)`` for a batch)."""
    if isinstance(bounds, Bounds):
        lb, ub = bounds.lb, bounds.ub
    else:
        if len(bounds) != 2:
            raise ValueError("`bounds` must contain 2 elements.")
        lb, ub = bounds
    lb = np.asarray(to_host(lb), dtype=float)
    ub = np.asarray(to_host(ub), dtype=float)
    shape = (n,) if batch is None else (batch, n)
    out = []
    for b in (lb, ub):
        if b.ndim == 0:
            b = np.full(shape, float(b))
        elif batch is not None and b.shape == (n,):
            b = np.broadcast_to(b, shape).copy()
        out.append(b)
    return out[0], out[1]


def check_bounds(lb: np.ndarray, ub: np.ndarray, x0: np.ndarray, method: str,
                 nan_ok: bool = False) -> None:
    """scipy's bound checks (``x0`` may be ``(n,)`` or ``(B, n)``).

    scipy calls a NaN in ``x0`` outside the bounds. ``nan_ok`` (batches) lets
    NaN entries pass: such a problem fails alone with a status instead.
    """
    if method == "lm" and not np.all((lb == -np.inf) & (ub == np.inf)):
        raise ValueError("Method 'lm' doesn't support bounds.")
    if lb.shape != x0.shape or ub.shape != x0.shape:
        raise ValueError("Inconsistent shapes between bounds and `x0`.")
    if np.any(lb >= ub):
        raise ValueError("Each lower bound must be strictly less than each upper bound.")
    inside = (x0 >= lb) & (x0 <= ub)
    if nan_ok:
        inside |= np.isnan(x0)
    if not np.all(inside):
        raise ValueError("Initial guess is outside of provided bounds")


def check_x_scale(x_scale: Any, x0: np.ndarray, method: str) -> np.ndarray | str:
    """``'jac'`` or a positive float array shaped like ``x0`` (scipy's defaults)."""
    if x_scale is None:
        if method == "lm":
            return "jac"
        return np.ones(x0.shape)  # (scipy's default 1.0, every entry: nothing to check)
    if isinstance(x_scale, str) and x_scale == "jac":
        return x_scale
    try:
        arr = np.asarray(to_host(x_scale), dtype=float)
        valid = bool(np.all(np.isfinite(arr)) and np.all(arr > 0))
    except (ValueError, TypeError):
        valid = False
    if not valid:
        raise ValueError("`x_scale` must be 'jac' or array_like with positive numbers.")
    if arr.ndim == 0:
        arr = np.full(x0.shape, float(arr))
    elif x0.ndim == 2 and arr.shape == x0.shape[1:]:
        arr = np.broadcast_to(arr, x0.shape).copy()
    if arr.shape != x0.shape:
        raise ValueError("Inconsistent shapes between `x_scale` and `x0`.")
    return arr


#: float32's machine epsilon (2**-23).
EPS32 = float(np.finfo(np.float32).eps)


#: set by ``curve_fit``'s 'lm' (scipy's ``leastsq``) around its solve: ``leastsq``'s
#: options for method 'lm' (its ``factor``), and its rule that tolerances below machine
#: epsilon, 0 among them, are taken as they are, without a warning (MINPACK then stops
#: with its "tolerance too small" codes where they decide; ``termination.FTOL_TINY``).
#: The first ``prepare`` of the solve takes them (:func:`take_leastsq_options`), so that
#: a solve inside the user's function keeps scipy's checks.
_LEASTSQ: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "torchimize_scipy_leastsq", default=None)


@contextmanager
def leastsq_rules(factor: float = 100.0) -> Iterator[None]:
    """Solve the next 'lm' problem by ``leastsq``'s rules: its tolerances as they are, and
    MINPACK's initial step bound ``factor`` (:func:`take_leastsq_options`)."""
    token = _LEASTSQ.set({"factor": float(factor)})
    try:
        yield
    finally:
        _LEASTSQ.reset(token)


def take_leastsq_options(method: str) -> dict | None:
    """The options :func:`leastsq_rules` set for this 'lm' solve, taken (None else)."""
    opts = _LEASTSQ.get()
    if method != "lm" or opts is None:
        return None
    _LEASTSQ.set(None)
    return opts


def check_tolerance(ftol: Any, xtol: Any, gtol: Any, method: str,
                    eps: float = float(np.finfo(float).eps),
                    dtype: Any = None, stacklevel: int = 4,
                    leastsq: bool = False) -> tuple[float, float, float]:
    """None means 0; below-epsilon values warn; scipy's errors when all are too small.

    The warnings and errors are scipy's, against float64's epsilon. When the
    solver computes in float32 (``dtype``), a tolerance from float64's epsilon
    up to float32's (1.19e-7; the 1e-8 defaults among them) is raised to
    float32's epsilon without a warning: float32 cannot resolve a smaller
    relative change, so such a test would only fire on rounding noise, after
    extra evaluations. A tolerance below float64's epsilon keeps scipy's
    meaning (the warning says the test is effectively disabled) and 0/None
    disables the test, in any dtype. With ``leastsq`` ('lm' inside
    :func:`leastsq_rules`) any non-negative tolerance is taken as
    ``leastsq`` takes it. ``stacklevel`` is the warnings' level as seen from
    the inner check (4: the caller of the function that called this one).
    """

    def check(tol: Any, name: str) -> float:
        if tol is None:
            return 0.0
        if tol < eps:
            warnings.warn(f"Setting `{name}` below the machine epsilon ({eps:.2e}) effectively "
                          "disables the corresponding termination condition.",
                          stacklevel=stacklevel)
        return float(tol)

    if leastsq:
        ftol, xtol, gtol = (0.0 if t is None else float(t) for t in (ftol, xtol, gtol))
        if dtype is not None and str(dtype) in ("torch.float32", "float32"):
            ftol, xtol, gtol = (EPS32 if eps <= t < EPS32 else t for t in (ftol, xtol, gtol))
        return ftol, xtol, gtol
    ftol = check(ftol, "ftol")
    xtol = check(xtol, "xtol")
    gtol = check(gtol, "gtol")
    if method == "lm" and (ftol < eps or xtol < eps or gtol < eps):
        raise ValueError("All tolerances must be higher than machine epsilon "
                         f"({eps:.2e}) for method 'lm'.")
    if ftol < eps and xtol < eps and gtol < eps:
        raise ValueError("At least one of the tolerances must be higher than "
                         f"machine epsilon ({eps:.2e}).")
    if dtype is not None and str(dtype) in ("torch.float32", "float32"):
        ftol, xtol, gtol = (EPS32 if eps <= t < EPS32 else t for t in (ftol, xtol, gtol))
    return ftol, xtol, gtol


def check_f_scale(f_scale: Any, loss: Any) -> None:
    """A robust loss needs a finite, nonzero ``f_scale`` (the linear loss ignores it).

    scipy has no explicit check: ``f_scale = 0`` (or ``inf``, ``nan``) makes its
    loss values NaN, and 'trf' then raises ``ValueError('array must not contain
    infs or NaNs')`` ('dogbox' a ``LinAlgError``) in its first factorisation.
    We raise the ``ValueError`` before any work, naming the option. A negative
    value acts as its absolute value, in scipy and here.
    """
    if isinstance(loss, str) and loss == "linear":
        return
    try:
        arr = np.asarray(to_host(f_scale), dtype=float)
        valid = bool(np.all(np.isfinite(arr)) and np.all(arr != 0))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        name = loss if isinstance(loss, str) else "callable"
        raise ValueError("array must not contain infs or NaNs: `f_scale` must be finite and "
                         f"nonzero for loss={name!r} (got {f_scale!r}); the robust loss "
                         "divides the residuals by it.")


def check_diff_step(diff_step: Any, n: int) -> np.ndarray | None:
    """Relative finite-difference step: None or an array broadcast to ``(n,)``."""
    if diff_step is None:
        return None
    arr = np.asarray(to_host(diff_step), dtype=float)
    if arr.ndim == 0 or arr.shape == (1,):  # (scipy broadcasts one step against x0)
        arr = np.full(n, float(arr.reshape(())))
    if arr.shape != (n,):  # (scipy fails on 2-D steps with errors of numpy's)
        raise ValueError("`diff_step` must be a scalar or have the shape of `x0`.")
    return arr
