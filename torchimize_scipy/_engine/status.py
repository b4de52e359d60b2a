"""The one table that turns termination status codes into messages.

Solvers only ever return the integer codes of :mod:`.termination` (re-exported
here for the frontends); the frontends turn them into ``message`` through
:data:`TERMINATION_MESSAGES`, whose texts are the ones
``scipy.optimize.least_squares`` prints, so results compare field by field,
and into ``success`` through :func:`~.termination.success`, the one success
rule. Codes 5 and 6 are ours: a problem whose residuals or Jacobian become
non-finite during the run (scipy would raise ``LinAlgError`` or return NaNs)
stops with 5, and inside a batch the other problems carry on. Codes 7 to 9
are MINPACK's "tolerance too small" stops of 'lm', reachable only with a
tolerance below machine epsilon (``curve_fit``, which raises on them as
scipy's does; in a batch the problem fails alone).
"""

from __future__ import annotations

from .termination import (
    CALLBACK_STOP,
    FTOL,
    FTOL_TINY,
    FTOL_XTOL,
    GTOL,
    GTOL_TINY,
    IMPROPER_INPUT,
    MAX_NFEV,
    NONFINITE,
    RUNNING,
    SINGULAR,
    XTOL,
    XTOL_TINY,
    success,
)

__all__ = ["CALLBACK_STOP", "FTOL", "FTOL_TINY", "FTOL_XTOL", "GTOL", "GTOL_TINY",
           "IMPROPER_INPUT", "MAX_NFEV", "NONFINITE", "RUNNING", "SINGULAR",
           "TERMINATION_MESSAGES", "XTOL", "XTOL_TINY", "message", "messages", "success"]

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
    FTOL_TINY: "`ftol` is too small: no further reduction in the sum of squares is possible.",
    XTOL_TINY: "`xtol` is too small: no further improvement in the approximate solution is "
    "possible.",
    GTOL_TINY: "`gtol` is too small: `fun` is orthogonal to the columns of the Jacobian to "
    "machine precision.",
}


def message(status: int) -> str:
    """Return the termination message for one integer status code."""
    return TERMINATION_MESSAGES[int(status)]


def messages(statuses: list[int]) -> list[str]:
    """Termination messages of many problems (one dictionary lookup each)."""
    table = TERMINATION_MESSAGES
    return [table[s] for s in statuses]
