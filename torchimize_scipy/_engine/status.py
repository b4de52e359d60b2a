"""Termination status codes and the one table that turns them into messages.

Solvers only ever return the integer codes below; the frontends turn them into
``message`` through :data:`TERMINATION_MESSAGES`, whose texts are the ones
``scipy.optimize.least_squares`` prints, so results compare field by field, and
into ``success`` through :func:`success`, the one success rule.
Codes 5 and 6 are ours: a problem whose residuals or Jacobian become non-finite
during the run (scipy would raise ``LinAlgError`` or return NaNs) stops with 5,
and inside a batch the other problems carry on.
"""

from __future__ import annotations

from typing import Any

CALLBACK_STOP = -2
IMPROPER_INPUT = -1
MAX_NFEV = 0
GTOL = 1
FTOL = 2
XTOL = 3
FTOL_XTOL = 4
NONFINITE = 5
SINGULAR = 6

#: Sentinel for "still running" inside the engine; never returned.
RUNNING = -100

TERMINATION_MESSAGES: dict[int, str] = {
    CALLBACK_STOP: "Stopped because `callback` function raised `StopIteration` or "
    "returned `True`",
    IMPROPER_INPUT: "Improper input parameters status returned from `leastsq`",
    MAX_NFEV: "The maximum number of function evaluations is exceeded.",
    GTOL: "`gtol` termination condition is satisfied.",
    FTOL: "`ftol` termination condition is satisfied.",
    XTOL: "`xtol` termination condition is satisfied.",
    FTOL_XTOL: "Both `ftol` and `xtol` termination conditions are satisfied.",
    NONFINITE: "Residuals or Jacobian became non-finite; the problem was stopped.",
    SINGULAR: "The linear system of the step is singular; the problem was stopped.",
}


def success(status: Any) -> Any:
    """Whether a status code (an int, or a tensor or array of codes) reports a solution.

    As scipy: the positive codes (a ``gtol``, ``ftol`` or ``xtol`` test was
    met) are successes; 0 (budget exhausted), -1 and -2 are not. Our codes 5
    (non-finite values) and 6 (singular step) are failures although positive.
    Returns a bool for an int, an elementwise boolean for a tensor or array.
    """
    return (status > 0) & (status != NONFINITE) & (status != SINGULAR)


def message(status: int) -> str:
    """Return the termination message for one integer status code."""
    return TERMINATION_MESSAGES[int(status)]


def messages(statuses: list[int]) -> list[str]:
    """Termination messages of many problems (one dictionary lookup each)."""
    table = TERMINATION_MESSAGES
    return [table[s] for s in statuses]
