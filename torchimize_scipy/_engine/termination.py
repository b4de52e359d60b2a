"""Every stop test of the engine, the status codes they produce and the success rule.

A problem stops when the first of these holds (the loop applies them in this
order; a set status is never overwritten except by ``gtol``, as scipy's):

* at the top of an outer iteration (fresh Jacobian): :func:`gtol_status` (the
  rule's first-order optimality measure below ``gtol``) and, for scipy's
  'trf'/'dogbox', :func:`budget_status` (``nfev >= max_nfev``);
* after each trial: the method's tests, :func:`trust_region_status` (scipy's
  ``ftol``/``xtol`` tests of 'trf', 'dogbox', 'gn', 'gd') or
  :func:`minpack_status` (MINPACK ``lmder``'s tests, its budget included);
* at any point: :func:`stop_running` with :data:`NONFINITE` (residuals or
  Jacobian not finite) or :data:`SINGULAR` (the step's factorisation failed).

The solvers only produce these integer codes; the frontends turn them into
``message`` (``status.TERMINATION_MESSAGES``) and ``success`` (:func:`success`,
the one success rule). MINPACK does not evaluate the Jacobian at a point
accepted by the trial that stops it: :func:`uncounted_jacobian` and
:func:`reported_njev` keep ``njev`` equal to MINPACK's.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .host_scalars import as_tensor

# scipy's codes (``least_squares``' ``status``)
CALLBACK_STOP = -2
#: scipy's code for improper input to MINPACK; the frontend reports it for 'lm' with
#: no variables (``n = 0``), where scipy's ``leastsq`` does.
IMPROPER_INPUT = -1
MAX_NFEV = 0
GTOL = 1
FTOL = 2
XTOL = 3
FTOL_XTOL = 4
# ours: inside a batch a failing problem stops while the others carry on
NONFINITE = 5
SINGULAR = 6
#: ours, 'lm' only: MINPACK's "tolerance too small" stops (its info 6, 7 and 8: the
#: relative reductions, the radius or the gradient at rounding level). They can win only
#: where that tolerance is below machine epsilon, which ``least_squares`` refuses for
#: 'lm' and scipy's ``leastsq`` (``curve_fit``'s 'lm') accepts; ``curve_fit`` then
#: raises, as scipy's does. Failures, like 5 and 6.
FTOL_TINY = 7
XTOL_TINY = 8
GTOL_TINY = 9

#: Sentinel for "still running" inside the engine; never returned.
RUNNING = -100


def success(status: Any) -> Any:
    """Whether a status code (an int, or a tensor or array of codes) reports a solution.

    As scipy: the codes 1 to 4 (a ``gtol``, ``ftol`` or ``xtol`` test was
    met) are successes; 0 (budget exhausted), -1 and -2 are not. Our codes 5
    (non-finite values), 6 (singular step) and 7 to 9 (a tolerance below
    machine epsilon, 'lm') are failures although positive. Returns a bool for
    an int, an elementwise boolean for a tensor or array.
    """
    return (status > 0) & (status < NONFINITE)


def stop_running(status: Any, stop: Any, code: int, xp: Any = torch) -> Any:
    """``status`` with ``code`` on the running problems where ``stop`` holds.

    ``xp``: the namespace of the values (``torch`` for tensors, or that of
    :class:`~.host_scalars.Scalars` for the host's values), here and below.
    A ``status`` kept on the host (one problem's numpy scalar,
    ``Scalars.keep``) given with tensors (``xp`` torch) becomes a tensor.
    """
    if xp is torch:
        status = as_tensor(status)
    return xp.where(stop & (status == RUNNING), code, status)


def gtol_status(status: Any, gtol_hit: Any, xp: Any = torch) -> Any:
    """Apply the ``gtol`` test measured at the top of an outer iteration.

    It stops a running problem, and, as in scipy (which tests ``gtol`` after
    the step's ``ftol``/``xtol`` tests at the next point), it replaces an
    ``ftol``/``xtol`` code set by the trial that led here.
    """
    if xp is torch:  # one operation on tensors
        may_override = torch.isin(status, _overridable(status.device))
    else:  # (the codes FTOL, XTOL, FTOL_XTOL are consecutive)
        may_override = (status == RUNNING) | ((status >= FTOL) & (status <= FTOL_XTOL))
    return xp.where(gtol_hit & may_override, GTOL, status)


@functools.lru_cache(maxsize=8)
def _overridable(device: torch.device) -> Tensor:
    """The codes :func:`gtol_status` may replace, on ``device`` (made once; never modified)."""
    return torch.tensor([RUNNING, FTOL, XTOL, FTOL_XTOL], device=device)


def budget_spent(nfev: Any, max_nfev: int) -> Any:
    """``(B,)`` mask: the evaluation budget is used up."""
    return nfev >= max_nfev


def budget_status(status: Any, nfev: Any, max_nfev: int, xp: Any = torch) -> Any:
    """scipy's 'trf'/'dogbox' test at the top of an outer iteration: budget spent."""
    return xp.where((status == RUNNING) & budget_spent(nfev, max_nfev), MAX_NFEV, status)


def trust_region_status(actual: Tensor, cost: Tensor, step_norm: Tensor, x: Tensor,
                        ratio: Tensor, finite: Tensor, ftol: float, xtol: float) -> Tensor:
    """scipy's ``ftol``/``xtol`` tests after a trial with a finite cost.

    ``ftol``: the actual reduction ``actual`` is below ``ftol * cost`` and the
    model's prediction was fair (``ratio > 0.25``); ``xtol``: the step is
    below ``xtol * (xtol + |x|)``. Returns ``FTOL``, ``XTOL`` or
    ``FTOL_XTOL`` where they hold and ``RUNNING`` elsewhere (and where the
    trial's residuals were not finite).
    """
    return trust_region_code(actual, cost, step_norm, torch.linalg.vector_norm(x, dim=-1),
                             ratio, finite, ftol, xtol)


def trust_region_code(actual: Any, cost: Any, step_norm: Any, x_norm: Any, ratio: Any,
                      finite: Any, ftol: float, xtol: float, xp: Any = torch) -> Any:
    """:func:`trust_region_status` from ``|x|``, on per-problem values of the namespace ``xp``.

    ``xp`` is ``torch`` (``(B,)`` tensors) or a namespace of
    :class:`~.host_scalars.Scalars` (the host's values, the same arithmetic).
    """
    ftol_ok = (actual < ftol * cost) & (ratio > 0.25)
    xtol_ok = step_norm < xtol * (xtol + x_norm)
    code = xp.where(xtol_ok, xp.where(ftol_ok, FTOL_XTOL, XTOL),
                    xp.where(ftol_ok, FTOL, RUNNING))
    return xp.where(finite, code, RUNNING)


#: machine epsilon (MINPACK's ``epsmch``) of numpy's float dtypes
_NP_EPS = {np.dtype(t): np.finfo(t).eps for t in (np.float64, np.float32)}


def minpack_status(actred: Tensor, prered: Tensor, ratio: Tensor, delta: Tensor,
                   xnorm: Tensor, gnorm: Tensor, nfev: Tensor, max_nfev: int, ftol: float,
                   xtol: float, xp: Any = None) -> Tensor:
    """MINPACK ``lmder``'s tests after a trial, mapped onto scipy's codes.

    ``ftol`` on the actual and predicted relative reductions and ``xtol`` on
    the radius ``delta <= xtol * |diag x|`` come first (``FTOL``, ``XTOL``,
    ``FTOL_XTOL``); where neither holds, as in MINPACK the last of these that
    holds wins: the budget (``MAX_NFEV``), then the "tolerance too small"
    tests, relative reductions, radius and ``gnorm`` at rounding level
    (``FTOL_TINY``, ``XTOL_TINY``, ``GTOL_TINY``: MINPACK's info 6, 7, 8).
    With tolerances of at least machine epsilon (``least_squares``' 'lm'
    requires them) each of those implies the corresponding ``ftol``,
    ``xtol`` or (at the top of the iteration) ``gtol`` test, so they never
    decide there.
    """
    # (tensors, or numpy values with their namespace ``xp``: 'lm' keeps its scalars on
    # the host on the CPU, see host_scalars)
    if isinstance(delta, Tensor):
        xp, eps = torch, torch.finfo(delta.dtype).eps
    else:
        # (numpy scalars and arrays know their dtype: no finfo lookup per trial)
        eps = _NP_EPS.get(getattr(delta, "dtype", None))
        if eps is None:
            eps = np.finfo(np.result_type(delta)).eps
        xp = xp or np
    half_ok = 0.5 * ratio <= 1
    abs_actred = abs(actred)
    ftol_ok = (abs_actred <= ftol) & (prered <= ftol) & half_ok
    xtol_ok = delta <= xtol * xnorm
    status = xp.where(budget_spent(nfev, max_nfev), MAX_NFEV, RUNNING)
    tiny_f = (abs_actred <= eps) & (prered <= eps) & half_ok
    status = xp.where(tiny_f, FTOL_TINY, status)
    status = xp.where(delta <= eps * xnorm, XTOL_TINY, status)
    status = xp.where(gnorm <= eps, GTOL_TINY, status)
    return xp.where(xtol_ok, xp.where(ftol_ok, FTOL_XTOL, XTOL),
                    xp.where(ftol_ok, FTOL, status))


def uncounted_jacobian(accept: Tensor, status: Tensor) -> Tensor:
    """``(B,)`` 0/1: the trial that stopped the problem was accepted.

    The loop evaluates the Jacobian at every accepted point; MINPACK does not
    when the same trial stops it, so that evaluation is not reported.
    """
    stopped = accept & (status != RUNNING)
    if type(stopped) is np.bool_:  # (one problem's host value: numpy's bool * 1 is slow)
        return _ONE if stopped else _ZERO
    return stopped * 1  # (0/1 integers, tensor or numpy array)


#: one problem's 0/1 host values of :func:`uncounted_jacobian` (numpy scalars are immutable)
_ZERO, _ONE = np.int64(0), np.int64(1)


def reported_njev(njev: Tensor, uncounted: Tensor) -> Tensor:
    """The Jacobian count MINPACK reports (see :func:`uncounted_jacobian`)."""
    return njev - uncounted
