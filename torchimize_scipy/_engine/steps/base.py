"""The contract between the shared loop (``_engine/loop.py``) and a method's step rule.

A step rule reads and writes per-problem tensors of the loop's ``state`` (a
``dict`` of batch-first tensors, compacted as problems finish) and never loops
over problems. For each problem the loop calls:

1. :meth:`StepRule.init_state` once, when the problem is admitted;
2. at the top of every outer iteration (a fresh Jacobian):
   :meth:`StepRule.measure_optimality`, whose ``gtol`` verdict the loop
   applies (:func:`~torchimize_scipy._engine.termination.gtol_status`), then
   for the problems that go on :meth:`StepRule.build_model`
   (factorisations of the local model);
3. for every trial: :meth:`StepRule.propose_step`, the residuals at the trial
   point (one ``nfev``), and :meth:`StepRule.assess_trial` (acceptance,
   radius or damping update, the method's termination tests);
4. after an accepted trial, the new Jacobian (one ``njev``) and
   :meth:`StepRule.after_jacobian`;
5. once a problem has stopped: :meth:`StepRule.result_fields`.

State keys: the loop owns :data:`LOOP_KEYS`; a rule creates its own in
``init_state``, and only those it declares in :attr:`StepRule.state_keys`
(the loop checks it when it admits problems).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple, Protocol

from torch import Tensor

from ..problem import Problem

#: Keys the loop keeps for every problem (the starting rows' keys and its own).
LOOP_KEYS = frozenset({
    "ids", "x", "f_true", "lb", "ub", "scale", "scale_inv", "nfev", "njev",  # starting rows
    "f", "J", "g", "G", "cost",  # loss-scaled linearisation at x
    "nit", "status", "optimality", "last_reduction", "last_step_norm",
    "fresh",  # a new Jacobian: the next round starts an outer iteration
})


class Trial(Protocol):
    """What the loop reads of a rule's trial (each rule returns its own NamedTuple)."""

    @property
    def x_new(self) -> Tensor:
        """Trial point, ``(B, n)``."""

    @property
    def step_norm(self) -> Tensor:
        """Euclidean norm of the step in the original variables, ``(B,)``."""


class Verdict(NamedTuple):
    """:meth:`StepRule.assess_trial`'s decision for each problem.

    Attributes
    ----------
    accept : Tensor, shape (B,), bool
        The trial point becomes the current point.
    status : Tensor, shape (B,), long
        A termination code, or ``RUNNING`` where no test fired.
    x_accepted : Tensor, shape (B, n)
        The point taken where ``accept`` holds.

    A rule whose state keeps one problem's values on the host
    (:meth:`~torchimize_scipy._engine.host_scalars.Scalars.keep`, 'lm') may
    give ``accept`` and ``status`` as numpy scalars; the loop reads both
    through :meth:`~torchimize_scipy._engine.host_scalars.Scalars.view`.
    """

    accept: Tensor
    status: Tensor
    x_accepted: Tensor


class ResultFields(NamedTuple):
    """What a method reports on its own (the loop reports the rest from ``state``).

    Attributes
    ----------
    active_mask : Tensor, shape (B, n), long
    grad : Tensor or None
        Reported gradient when it is not ``state["g"]``.
    njev : Tensor or None
        Reported Jacobian count when it is not ``state["njev"]``.
    """

    active_mask: Tensor
    grad: Tensor | None = None
    njev: Tensor | None = None


class StepRule(ABC):
    """A method's part of the iteration (see the module notes for the call order).

    Attributes
    ----------
    state_keys : frozenset of str
        Every state key the rule may create (beyond :data:`LOOP_KEYS`).
    budget_at_top : bool
        The loop stops a problem whose evaluation budget is spent at the top of
        an outer iteration (scipy's 'trf'/'dogbox'); MINPACK checks it after
        each trial instead, in ``assess_trial``.
    prints_table : bool
        Whether ``verbose=2`` prints scipy's iteration table for this method.
    model_on_stopped_rows : bool
        Whether ``build_model`` may leave what it computes on rows that stopped
        at this top (the loop then need not keep their old values): every key it
        writes is read by no result and by no later stage of a stopped row, and
        the status it may set changes running rows only
        (:func:`~.termination.stop_running`). :func:`~..loop.on_rows` then runs
        it on every row when most rows go on, without a ``torch.where`` per key.
    fixed_residual_count : bool
        Whether residuals of another length than at ``x0`` are an error (MINPACK
        checks every evaluation's length; scipy's 'trf' and 'dogbox' go on with
        the new length, and so do ours).
    """

    state_keys: ClassVar[frozenset[str]] = frozenset()
    budget_at_top: ClassVar[bool] = True
    prints_table: ClassVar[bool] = True
    model_on_stopped_rows: ClassVar[bool] = False
    fixed_residual_count: ClassVar[bool] = False

    @abstractmethod
    def init_state(self, problem: Problem, state: dict) -> None:
        """Create the rule's state keys for newly admitted problems."""

    @abstractmethod
    def measure_optimality(self, problem: Problem, state: dict) -> Tensor:
        """Set ``state["optimality"]``; return the ``(B,)`` mask where ``gtol`` is met."""

    @abstractmethod
    def build_model(self, problem: Problem, state: dict) -> None:
        """Factorise the local model for the trials of this outer iteration."""

    @abstractmethod
    def propose_step(self, problem: Problem, state: dict) -> Trial:
        """The next trial of each problem."""

    @abstractmethod
    def assess_trial(self, problem: Problem, state: dict, trial: Trial, f_new: Tensor,
                     cost_new: Tensor, finite: Tensor) -> Verdict:
        """Accept or reject the trial, update radius/damping, apply the termination tests.

        ``f_new``/``cost_new`` are the trial's residuals and cost (zeros where
        ``finite`` is false: the residuals were not finite).
        """

    @abstractmethod
    def after_jacobian(self, problem: Problem, state: dict) -> None:
        """Update what depends on the new Jacobian at an accepted point."""

    @abstractmethod
    def result_fields(self, problem: Problem, state: dict) -> ResultFields:
        """The fields the method reports its own way, for stopped problems."""

    def trial_unread(self, problem: Problem, state: dict) -> tuple[str, ...]:
        """State keys that :meth:`propose_step` and :meth:`assess_trial` do not read on
        these rows (their factors as :meth:`build_model` left them).

        The loop may then compact those of :data:`~..loop.DEFERRABLE_KEYS` after the
        trial, or not at all where the trial's accepted rows replace them whole
        (:func:`~..loop.compact`). No key by default: the rule may read any.
        """
        return ()

    def reads_cost(self, problem: Problem) -> bool:
        """Whether the rule reads ``state["cost"]`` or a trial's ``cost_new`` while it
        iterates; when not, one problem's loop takes its cost only where it writes the
        result (``loop._late_cost``) and hands ``assess_trial`` None for ``cost_new``."""
        return True
