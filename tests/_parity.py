"""The parity policy of the test suite, in one place (see ``docs/parity.md``).

Two runs that take *different code paths* (ours against scipy, a numpy model
against a torch model, a batch against a loop of single problems, one CPU
kernel against another) are compared with the helpers of this module:

* ``x`` and ``cost`` within tolerances derived from the problem
  (:func:`assert_x_close`, :func:`assert_cost_close`);
* ``status`` exactly, or within the class of equivalent stops when both runs
  converged (:func:`assert_status_equivalent`): the tests behind statuses 1-4
  (gtol, ftol, xtol, ftol and xtol) fire next to each other at a solution and
  rounding decides which fires first;
* evaluation counts within a small slack, exactly only where no decision of the
  path can sit near its threshold (:func:`assert_counts_close`);
* messages only as a consequence of the status (:func:`assert_message_matches`,
  :func:`assert_messages_equivalent`).

Two runs of the *same* code path (the same call twice, a batch cut into other
chunks, a neighbour that fails) are compared bit for bit with
:func:`assert_bitwise_equal`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

#: statuses (``least_squares``) / ``ier`` values (``leastsq``) that all mean "converged"
CONVERGED = frozenset({1, 2, 3, 4})

#: default ``xtol`` of ``least_squares`` and ``curve_fit``
XTOL = 1e-8

#: x is compared within ``X_FACTOR * xtol * (max|x| + xtol)``: the xtol test stops once
#: a step is below ``xtol * (xtol + |x|)``, and a run may stop one or a few such steps
#: away (the largest component sets the scale, so a component near 0 of a well-scaled
#: vector is not held to an absolute 1e-15)
X_FACTOR = 10.0

#: cost to this relative accuracy of its scale (``cost`` at the solution, at least 1)
COST_RTOL = 1e-8

#: one evaluation of the same expression by two kernels (torch vs numpy, Gram vs direct,
#: autograd vs formula, vectorised vs scalar loop): a few ulps times the expression's
#: conditioning; 1e-10 leaves room for conditioning up to ~1e5 with no iteration to
#: amplify it
ONE_EVAL_RTOL = 1e-10

#: evaluations that two runs may differ by (an iteration or two of 'trf'/'dogbox')
COUNT_SLACK = 2


def to_numpy(a: Any) -> np.ndarray:
    """``a`` as a numpy array (tensors are detached and moved to the CPU)."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def assert_close_scaled(got: Any, ref: Any, rtol: float, scale: Any = None,
                        err_msg: str = "") -> None:
    """``|got - ref| <= rtol * scale`` elementwise; ``scale`` defaults to ``1 + |ref|``.

    The ``1 +`` makes the bound absolute where ``ref`` is near zero (an exact fit,
    a parameter at 0), which a plain relative tolerance cannot handle.
    """
    a = to_numpy(got).astype(float)
    b = to_numpy(ref).astype(float)
    assert a.shape == b.shape, (a.shape, b.shape, err_msg)
    s = 1.0 + np.abs(b) if scale is None else np.broadcast_to(to_numpy(scale), b.shape)
    err = np.abs(a - b)
    ok = err <= rtol * s
    ok |= (a == b)  # equal infinities
    if not np.all(ok):
        with np.errstate(divide="ignore", invalid="ignore"):
            worst = np.max(np.where(ok, 0.0, err / s))
        raise AssertionError(f"{err_msg} max scaled err {worst:.3e} > {rtol:.1e}\n"
                             f"got {a}\nref {b}")


def assert_x_close(got: Any, ref: Any, xtol: float | None = XTOL, factor: float = X_FACTOR,
                   rtol: float | None = None, err_msg: str = "x") -> None:
    """Solutions agree within ``factor * xtol * (|x| + xtol)``, or within ``rtol``.

    Pass ``rtol`` (relative to ``1 + |x|``) instead where the problem's own scale
    decides (a stop on ftol in a flat valley leaves x known to ~sqrt(ftol) only).
    """
    ref_np = to_numpy(ref).astype(float)
    if rtol is not None:
        assert_close_scaled(got, ref, rtol, err_msg=err_msg)
        return
    tol = xtol if xtol is not None else XTOL
    size = np.abs(ref_np).max(initial=0.0)
    assert_close_scaled(got, ref, factor * tol, scale=np.full(ref_np.shape, size + tol),
                        err_msg=err_msg)


def assert_cost_close(got: Any, ref: Any, rtol: float = COST_RTOL, scale: float | None = None,
                      err_msg: str = "cost") -> None:
    """Costs agree to ``rtol`` of ``scale`` (default: ``max(|ref|, 1)``)."""
    ref_np = to_numpy(ref).astype(float)
    s = np.maximum(np.abs(ref_np), 1.0) if scale is None else scale
    assert_close_scaled(got, ref, rtol, scale=np.broadcast_to(s, ref_np.shape),
                        err_msg=err_msg)


def statuses_equivalent(a: int, b: int) -> bool:
    """The same status, or both in the converged class ``{1, 2, 3, 4}``."""
    a, b = int(a), int(b)
    return a == b or (a in CONVERGED and b in CONVERGED)


def assert_status_equivalent(got: int, ref: int) -> None:
    """Status/ier equal, or both converged.

    Only meaningful together with :func:`assert_x_close` and
    :func:`assert_cost_close`: two converged stops are equivalent because both
    runs are at the same solution, which those checks establish.
    """
    assert statuses_equivalent(got, ref), f"status {int(got)} vs reference {int(ref)}"


def assert_counts_close(got_status: int, ref_status: int, got_counts: Any, ref_counts: Any,
                        slack: int = COUNT_SLACK, exact: bool = False) -> None:
    """Evaluation counts within ``slack`` of each other (or equal with ``exact=True``).

    A count is decided by threshold tests (step accepted, which stop test fires), so
    rounding can move it by an iteration even on the same status: a finite-difference
    Jacobian alone differs by ~1e-8 relative between two implementations. Pass
    ``exact=True`` only where no decision can sit near its threshold (e.g. ``max_nfev``
    reached long before convergence). ``slack`` is in evaluations: one iteration costs
    one ``fun`` call, or ``n + 1`` where finite-difference calls are counted ('lm').
    ``got_counts``/``ref_counts`` are numbers or equal-length sequences (nfev, njev).
    """
    def as_float(c):
        return np.array([np.nan if v is None else float(v) for v in np.atleast_1d(
            np.asarray(c, dtype=object))])

    g, r = as_float(got_counts), as_float(ref_counts)
    assert g.shape == r.shape, (g, r)
    assert np.array_equal(np.isnan(g), np.isnan(r)), (g, r)
    g, r = g[~np.isnan(g)], r[~np.isnan(r)]
    allowed = 0 if exact else slack
    assert np.all(np.abs(g - r) <= allowed), (
        f"counts {g} vs {r} (status {int(got_status)} vs {int(ref_status)}, "
        f"allowed difference {allowed})")


def assert_message_matches(got_status: int, ref_status: int, got_msg: str, ref_msg: str,
                           table: Mapping[int, str] | None = None) -> None:
    """Messages follow the statuses: equal where the statuses are equal; otherwise
    ours must be the message of our own status (``table``, when given)."""
    if int(got_status) == int(ref_status):
        assert got_msg == ref_msg, (got_msg, ref_msg)
    elif table is not None:
        assert got_msg == table[int(got_status)], (got_msg, table[int(got_status)])
    else:
        assert isinstance(got_msg, str) and got_msg and got_msg != ref_msg


def assert_messages_equivalent(got_msg: str, ref_msg: str, table: Mapping[int, str]) -> None:
    """Two termination messages (where the statuses are not at hand, e.g. printed
    output): equal, or both the message of a converged status in ``table``."""
    converged = {table[k] for k in CONVERGED}
    assert got_msg == ref_msg or (got_msg in converged and ref_msg in converged), (
        got_msg, ref_msg)


def assert_result_parity(got: Any, ref: Any, *, xtol: float | None = XTOL,
                         x_rtol: float | None = None, cost_rtol: float = COST_RTOL,
                         counts: bool = True, slack: int = COUNT_SLACK) -> None:
    """The core of the policy for two ``OptimizeResult``-like objects (one problem)."""
    assert_x_close(got.x, ref.x, xtol=xtol, rtol=x_rtol)
    assert_cost_close(got.cost, ref.cost, rtol=cost_rtol)
    assert_status_equivalent(got.status, ref.status)
    assert bool(got.success) == bool(ref.success)
    if counts:
        assert_counts_close(got.status, ref.status, (got.nfev, getattr(got, "njev", None)),
                            (ref.nfev, getattr(ref, "njev", None)), slack)


def assert_bitwise_equal(got: Any, ref: Any, err_msg: str = "") -> None:
    """Bit-for-bit equality: only for two runs of the same code path."""
    a, b = to_numpy(got), to_numpy(ref)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    np.testing.assert_array_equal(a, b, err_msg=err_msg)
