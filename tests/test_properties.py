"""Property suite: random small problems and options, run against scipy.

Hypothesis draws a problem from three families and the options of a call
(method, loss, bounds, ``x_scale``, kind of Jacobian) and checks four
properties against ``scipy.optimize.least_squares``:

1. **cost no worse than scipy's** beyond the parity policy's tolerance
   (``docs/parity.md``), wherever scipy converged;
2. **the same exception type as scipy** for invalid input (bad shapes, bad
   bounds, ``x0`` outside the bounds, unknown method/loss/jac strings,
   negative or zero tolerances, ``max_nfev``, ``f_scale``, ``x_scale``...);
3. **no input is mutated**, numpy arrays or torch tensors;
4. **a batch of one equals the single call** (``batch_least_squares`` with
   ``B = 1`` against ``least_squares``) within the policy's tolerances.

Why the cost comparison is meaningful on every draw: the families have a
unique minimum *value* wherever a run can end.

* ``linear``: ``f = A x - b`` with ``A`` of full column rank, and a loss that
  is convex in the residual ('linear', 'soft_l1', 'huber'), with or without a
  box: a convex objective on a convex set, so every local minimum is global
  and has the same cost. ('cauchy' and 'arctan' are not convex in ``f`` and
  are left out here.)
* ``rosenbrock``: ``f = (s (x1 - x0^2), 1 - x0)``, unbounded, any loss. Its
  Jacobian has determinant ``s`` and never vanishes, so ``J^T rho'(f) f = 0``
  forces ``f = 0`` (``rho' > 0`` for every loss): the only stationary point is
  the zero-residual minimum.
* ``exponential``: ``a exp(-k t) - y`` on data from known parameters with small
  noise, linear loss, started within 20 % of the truth and with a box that
  keeps ``k > 0``: the cost is locally convex around the fit and the runs stay
  in that basin (the property is checked where scipy converged).

The suite is deterministic for CI: every test runs with ``derandomize=True``
and no example database (``SETTINGS``), so the same examples are drawn on every
run and machine; ``max_examples`` keeps the file well under a minute on two
cores. Set ``HYPOTHESIS_PROFILE=thorough`` to draw 10x more, randomly.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import pytest
import scipy.optimize as so
import torch
from _parity import (
    assert_counts_close,
    assert_result_parity,
    assert_status_equivalent,
    assert_x_close,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from torchimize_scipy import batch_least_squares, least_squares

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"


def SETTINGS(n: int) -> Any:  # noqa: N802 - reads as a constant at the decorator
    """Deterministic, database-free settings with ``n`` examples (10x with the
    ``thorough`` profile, then random)."""
    return settings(max_examples=10 * n if THOROUGH else n, deadline=None, database=None,
                    derandomize=not THOROUGH,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ============================================================================ problems
T_EXP = np.linspace(0.0, 3.0, 10)


class Problem:
    """A small problem: single (``fun``, ``jac``) and batched (``fun_b``, ``jac_b``) forms."""

    def __init__(self, family: str, seed: int, m: int, n: int, scale: float) -> None:
        rng = np.random.default_rng(seed)
        self.family = family
        self.args = (family, seed, m, n, scale)
        if family == "linear":
            # full column rank, singular values in [0.5, 2]
            U, _ = np.linalg.qr(rng.standard_normal((m, n)))
            V, _ = np.linalg.qr(rng.standard_normal((n, n)))
            A = (U * rng.uniform(0.5, 2.0, n)) @ V.T
            self.A, self.b = A, rng.standard_normal(m) * scale
            self.x0 = rng.standard_normal(n)
            self.truth = np.linalg.lstsq(A, self.b, rcond=None)[0]
        elif family == "rosenbrock":
            self.s = scale
            self.x0 = rng.uniform(-2.0, 2.0, 2)
            self.truth = np.ones(2)
        else:  # exponential
            self.truth = np.array([rng.uniform(0.5, 3.0), rng.uniform(0.3, 2.0)])
            self.y = (self.truth[0] * np.exp(-self.truth[1] * T_EXP)
                      + 0.01 * scale * rng.standard_normal(T_EXP.size))
            self.x0 = self.truth * rng.uniform(0.8, 1.2, 2)

    def __repr__(self) -> str:  # hypothesis prints it: enough to rebuild the problem
        return f"Problem{self.args!r}"

    # single problem, numpy
    def fun(self, x: np.ndarray) -> np.ndarray:
        return self.fun_b(np.asarray(x)[None])[0]

    def jac(self, x: np.ndarray) -> np.ndarray:
        return self.jac_b(np.asarray(x)[None])[0]

    # batched, numpy: x (b, n)
    def fun_b(self, x: np.ndarray) -> np.ndarray:
        if self.family == "linear":
            return x @ self.A.T - self.b
        if self.family == "rosenbrock":
            return np.stack([self.s * (x[:, 1] - x[:, 0] ** 2), 1.0 - x[:, 0]], axis=-1)
        return x[:, :1] * np.exp(-x[:, 1:2] * T_EXP) - self.y

    def jac_b(self, x: np.ndarray) -> np.ndarray:
        b = x.shape[0]
        if self.family == "linear":
            return np.broadcast_to(self.A, (b,) + self.A.shape).copy()
        if self.family == "rosenbrock":
            J = np.zeros((b, 2, 2))
            J[:, 0, 0] = -2.0 * self.s * x[:, 0]
            J[:, 0, 1] = self.s
            J[:, 1, 0] = -1.0
            return J
        e = np.exp(-x[:, 1:2] * T_EXP)
        return np.stack([e, -x[:, :1] * T_EXP * e], axis=-1)

    def default_bounds(self, draw_box: bool, rng: np.random.Generator) -> tuple:
        n = self.x0.size
        if self.family == "exponential":
            return (np.array([0.0, 0.05]), np.array([10.0, 5.0]))
        if not draw_box or self.family == "rosenbrock":
            return (-np.inf, np.inf)
        # a box around x0 that may cut the unconstrained minimum
        lb = self.x0 - rng.uniform(0.1, 2.0, n)
        ub = self.x0 + rng.uniform(0.1, 2.0, n)
        lb[rng.random(n) < 0.3] = -np.inf
        return (lb, ub)


@st.composite
def problems_and_options(draw: Any) -> tuple[Problem, dict]:
    family = draw(st.sampled_from(["linear", "rosenbrock", "exponential"]))
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(1, 4)) if family == "linear" else 2
    m = draw(st.integers(n, n + 5)) if family == "linear" else (2 if family == "rosenbrock"
                                                                 else T_EXP.size)
    scale = draw(st.sampled_from([0.1, 1.0, 10.0]))
    prob = Problem(family, seed, m, n, scale)
    boxed = draw(st.booleans())
    bounds = prob.default_bounds(boxed, np.random.default_rng(seed + 1))
    bounded = not (np.isscalar(bounds[0]) and np.isinf(bounds[0]))
    methods = ["trf", "dogbox"] + ([] if bounded else ["lm"])
    method = draw(st.sampled_from(methods))
    if family == "linear":
        losses = ["linear", "soft_l1", "huber"]
    elif family == "rosenbrock":
        losses = ["linear", "soft_l1", "huber", "cauchy", "arctan"]
    else:
        losses = ["linear"]
    loss = "linear" if method == "lm" else draw(st.sampled_from(losses))
    jac_kind = draw(st.sampled_from(["2-point", "3-point", "cs", "analytic"]))
    x_scale = draw(st.sampled_from([None, 1.0, "jac", "array"]))
    opts: dict[str, Any] = {"method": method, "loss": loss, "bounds": bounds,
                            "jac": prob.jac if jac_kind == "analytic" else jac_kind}
    if x_scale == "array":
        opts["x_scale"] = np.linspace(0.5, 2.0, n)
    elif x_scale is not None:
        opts["x_scale"] = x_scale
    if loss != "linear":
        opts["f_scale"] = draw(st.sampled_from([0.5, 1.0, 3.0]))
    return prob, opts


def case_of(family: str, seed: int, m: int, n: int, scale: float, boxed: bool,
            **opts: Any) -> tuple[Problem, dict]:
    """The case ``problems_and_options`` draws for these choices (explicit examples)."""
    prob = Problem(family, seed, m, n, scale)
    bounds = prob.default_bounds(boxed, np.random.default_rng(seed + 1))
    return prob, {"bounds": bounds, **opts}


#: found by this suite (HYPOTHESIS_PROFILE=thorough): a linear problem, one variable on
#: its upper bound at the solution; scipy's dogbox stops on gtol after 9 evaluations.
#: Single ``least_squares`` 'dogbox' needs 12 with jac='cs', and with '3-point' stops on
#: ftol at optimality 1.8e-6, x off by 6e-6; the batch of one matches scipy. This is the
#: dogbox active-bound defect of issue 11 part 2, fixed in steps/dogbox.py (the Newton
#: step is exactly zero on the fixed variables); kept as a regression example.
DOGBOX_ACTIVE_BOUND = {
    jac: case_of("linear", 14191565, 4, 4, 1.0, True, method="dogbox", loss="soft_l1",
                 jac=jac, f_scale=0.5)
    for jac in ("cs", "3-point")
}


#: found by this suite (thorough profile): 'trf' + 'huber' on a 1x1 linear problem whose
#: solution is on its lower bound. scipy and single ``least_squares`` approach the bound
#: from inside (x - lb ~ 1e-11, 12 evaluations with x_scale='jac', 4 with 1.0); the batch
#: of one lands on it (x - lb ~ 6e-17) after 2. Cost and x agree; the counts do not. In
#: the batch engine's 'trf' route (not owned by the issue-11 engineers): strict xfail.
TRF_HUBER_BOUND = case_of("linear", 1, 1, 1, 0.1, True, method="trf", loss="huber",
                          jac="3-point", x_scale="jac", f_scale=0.5)


def _scipy(fun: Any, x0: Any, **kw: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return so.least_squares(fun, x0, **kw)


# ============================================================================ 1. cost
#: scipy's run counts as "at the minimum" below this first-order optimality
OPTIMAL = 1e-4

@SETTINGS(30)
@given(problems_and_options())
def test_cost_no_worse_than_scipy(case: tuple[Problem, dict]) -> None:
    prob, opts = case
    ref = _scipy(prob.fun, prob.x0.copy(), **opts)
    res = least_squares(prob.fun, prob.x0.copy(), **opts)
    if ref.status <= 0 or ref.optimality > OPTIMAL:
        # scipy did not reach a stationary point (it can stop on xtol with a collapsed
        # trust region, e.g. dogbox + huber on Rosenbrock): no claim on the cost
        return
    assert res.status > 0, (res.status, res.message, ref.status)
    # the policy's cost tolerance: 1e-8 of max(cost, 1), one-sided
    tol = 1e-8 * max(float(ref.cost), 1.0)
    assert float(res.cost) <= float(ref.cost) + tol, (float(res.cost), float(ref.cost))
    if prob.family == "linear" and opts["loss"] == "linear" and not _bounded(opts):
        assert_x_close(res.x, prob.truth, rtol=1e-6)  # the unique minimiser


def _bounded(opts: dict) -> bool:
    lb = np.asarray(opts["bounds"][0], dtype=float)
    ub = np.asarray(opts["bounds"][1], dtype=float)
    return bool(np.isfinite(lb).any() or np.isfinite(ub).any())


# ============================================================================ 2. errors
def _lin(x: np.ndarray) -> np.ndarray:
    return np.array([x[0] - 1.0, x[-1] + 2.0, 0.5 * x.sum()])


INVALID: dict[str, tuple[Any, np.ndarray, dict]] = {
    "method": (_lin, np.zeros(2), {"method": "newton"}),
    "loss": (_lin, np.zeros(2), {"loss": "l2"}),
    "jac_string": (_lin, np.zeros(2), {"jac": "4-point"}),
    "tr_solver": (_lin, np.zeros(2), {"tr_solver": "qr"}),
    "x0_2d": (_lin, np.zeros((2, 1)), {}),
    "x0_complex": (_lin, np.zeros(2, dtype=complex), {}),
    "bounds_shape": (_lin, np.zeros(2), {"bounds": (np.zeros(3), np.ones(3))}),
    "bounds_three": (_lin, np.zeros(2), {"bounds": (0.0, 1.0, 2.0)}),
    "lb_ge_ub": (_lin, np.full(2, 0.5), {"bounds": (np.ones(2), np.zeros(2))}),
    "lb_eq_ub": (_lin, np.full(2, 0.5), {"bounds": (np.full(2, 0.5), np.full(2, 0.5))}),
    "x0_outside": (_lin, np.full(2, 5.0), {"bounds": (0.0, 1.0)}),
    "lm_bounds": (_lin, np.full(2, 0.5), {"method": "lm", "bounds": (0.0, 1.0)}),
    "lm_underdetermined": (_lin, np.zeros(4), {"method": "lm"}),
    "all_tolerances_none": (_lin, np.zeros(2), {"ftol": None, "xtol": None, "gtol": None}),
    "max_nfev_zero": (_lin, np.zeros(2), {"max_nfev": 0}),
    "max_nfev_negative": (_lin, np.zeros(2), {"max_nfev": -3}),
    "f_scale_negative": (_lin, np.zeros(2), {"loss": "huber", "f_scale": -1.0}),
    "x_scale_negative": (_lin, np.zeros(2), {"x_scale": np.array([1.0, -1.0])}),
    "x_scale_shape": (_lin, np.zeros(2), {"x_scale": np.ones(3)}),
    "x_scale_string": (_lin, np.zeros(2), {"x_scale": "auto"}),
    "fun_2d": (lambda x: np.ones((2, 2)) * x[0], np.zeros(2), {}),
    "fun_nonfinite_x0": (lambda x: np.array([np.inf, x[0]]), np.zeros(2), {}),
    "jac_shape": (_lin, np.zeros(2), {"jac": lambda x: np.ones((2, 2))}),
    "loss_callable_shape": (_lin, np.zeros(2), {"loss": lambda z: z}),
    "verbose_bad": (_lin, np.zeros(2), {"verbose": 5}),
    "diff_step_shape": (_lin, np.zeros(2), {"diff_step": np.ones(3)}),
    "x0_nan": (_lin, np.array([np.nan, 0.0]), {}),
    "x0_strings": (_lin, np.array(["a", "b"]), {}),
    "bounds_nan": (_lin, np.zeros(2), {"bounds": (np.nan, 1.0)}),
    "tolerances_zero": (_lin, np.zeros(2), {"ftol": 0.0, "xtol": 0.0, "gtol": 0.0}),
    "kwargs_unknown": (_lin, np.zeros(2), {"kwargs": {"zz": 1}}),
    "args_extra": (_lin, np.zeros(2), {"args": (1,)}),
}

#: defects of input handling that this suite found (issue 11, part 2), fixed since;
#: kept as explicit examples so that they stay fixed
KNOWN_DEFECTS: dict[str, tuple[Any, np.ndarray, dict]] = {
    # scipy runs a problem with no variables (we used to fail inside torch)
    "x0_empty": (lambda x: np.array([1.0, 2.0]), np.zeros(0), {}),
    # scipy: ValueError('array must not contain infs or NaNs') (we used to give status 5)
    "jac_nan_at_x0": (_lin, np.zeros(2), {"jac": lambda x: np.full((3, 2), np.nan)}),
    "f_scale_zero": (_lin, np.zeros(2), {"loss": "huber", "f_scale": 0.0}),
}
CATALOGUE = {**INVALID, **KNOWN_DEFECTS}


def _outcome(solver: Any, fun: Any, x0: np.ndarray, kw: dict) -> type | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            solver(fun, x0.copy(), **kw)
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        return type(e)
    return None


@SETTINGS(40)
@example(name="x0_empty", method=None, tol=None)
@example(name="jac_nan_at_x0", method=None, tol=None)
@example(name="f_scale_zero", method=None, tol=None)
@given(name=st.sampled_from(sorted(INVALID)),
       method=st.sampled_from([None, "trf", "dogbox", "lm"]),
       tol=st.sampled_from([None, -1.0, 0.0, 1e-20]))
def test_invalid_input_same_exception_as_scipy(name: str, method: str | None,
                                               tol: float | None) -> None:
    fun, x0, kw = CATALOGUE[name]
    kw = dict(kw)
    if method is not None and "method" not in kw:
        kw["method"] = method
    if tol is not None and "ftol" not in kw:
        kw["ftol"] = tol  # negative, zero or tiny ftol on top of the defect
    ref = _outcome(so.least_squares, fun, x0, kw)
    got = _outcome(least_squares, fun, x0, kw)
    if ref is None:
        assert got is None, f"{name} {kw}: we raise {got}, scipy runs"
    else:
        assert got is not None and issubclass(got, ref), (
            f"{name} {kw}: scipy raises {ref.__name__}, we {got and got.__name__}")


# ============================================================================ 3. no mutation
@SETTINGS(20)
@given(problems_and_options(), st.booleans())
def test_inputs_not_mutated(case: tuple[Problem, dict], use_torch: bool) -> None:
    prob, opts = case
    opts = dict(opts)
    lb, ub = (np.broadcast_to(np.asarray(b, dtype=float), prob.x0.shape).copy()
              for b in opts["bounds"])
    x0 = prob.x0.copy()
    if isinstance(opts.get("x_scale"), np.ndarray):
        xs = opts["x_scale"].copy()
    else:
        xs = None
    if use_torch:
        if prob.family != "linear":
            return  # the torch form below is written for the linear family
        A, b = torch.tensor(prob.A), torch.tensor(prob.b)

        def fun(x: torch.Tensor) -> torch.Tensor:
            return A @ x - b

        x0_in, lb_in, ub_in = (torch.tensor(a) for a in (x0, lb, ub))
        xs_in = None if xs is None else torch.tensor(xs)
        jac: Any = "autograd" if callable(opts["jac"]) else opts["jac"]
        if jac == "cs":
            jac = "2-point"
    else:
        fun = prob.fun
        x0_in, lb_in, ub_in, xs_in = x0.copy(), lb.copy(), ub.copy(), (
            None if xs is None else xs.copy())
        jac = opts["jac"]
    kw = {k: v for k, v in opts.items() if k not in ("bounds", "x_scale", "jac")}
    if xs_in is not None:
        kw["x_scale"] = xs_in
    elif "x_scale" in opts:
        kw["x_scale"] = opts["x_scale"]
    if not _bounded(opts):
        kw["bounds"] = (-np.inf, np.inf)
    else:
        kw["bounds"] = (lb_in, ub_in)
    least_squares(fun, x0_in, jac=jac, **kw)
    pairs = [(x0_in, x0), (lb_in, lb), (ub_in, ub)] + ([] if xs is None else [(xs_in, xs)])
    for got, keep in pairs:
        got_np = got.numpy() if isinstance(got, torch.Tensor) else got
        np.testing.assert_array_equal(got_np, keep)
    if not use_torch:  # the data the function closes over is untouched too
        if prob.family == "linear":
            assert np.isfinite(prob.A).all()


# ============================================================================ 4. batch of one
@SETTINGS(25)
@example(DOGBOX_ACTIVE_BOUND["cs"])
@example(DOGBOX_ACTIVE_BOUND["3-point"])
@example(TRF_HUBER_BOUND).xfail(
    reason="batch 'trf' + huber lands on an active bound in 2 evaluations, single in 12",
    raises=AssertionError)
@given(problems_and_options())
def test_batch_of_one_equals_single(case: tuple[Problem, dict]) -> None:
    prob, opts = case
    opts = dict(opts)
    jac_b = prob.jac_b if callable(opts["jac"]) else opts["jac"]
    single = least_squares(prob.fun, prob.x0.copy(), **opts)
    batch_opts = {k: v for k, v in opts.items() if k != "jac"}
    batch = batch_least_squares(prob.fun_b, prob.x0[None].copy(), jac=jac_b, **batch_opts)
    got = batch[0]
    assert got.x.shape == single.x.shape
    n = prob.x0.size
    slack = n + 2 if opts["method"] == "lm" and not callable(opts["jac"]) else 2
    if single.status > 0 and single.optimality <= OPTIMAL:
        # the single call reached a stationary point: the batch reaches the same one,
        # within the policy's tolerances
        assert_result_parity(got, single, x_rtol=1e-6, slack=slack)
    else:
        # a stop away from a stationary point (scipy's own runs stop on ftol there too,
        # e.g. dogbox + huber + x_scale='jac' on a linear problem, optimality 0.59):
        # x is known only to ~sqrt(ftol) of the stop, so only the stop is compared
        assert_status_equivalent(got.status, single.status)
        assert_counts_close(got.status, single.status, got.nfev, single.nfev, slack=slack)


@pytest.mark.parametrize("method", ["trf", "lm"])
def test_batch_of_one_zero_residual_rosenbrock(method: str) -> None:
    """The issue's example: Rosenbrock from (-1.2, 1) without jac reaches f = 0 exactly;
    a batch of one ends within the converged class and an iteration of the single call."""
    prob = Problem("rosenbrock", 0, 2, 2, 10.0)
    x0 = np.array([-1.2, 1.0])
    single = least_squares(prob.fun, x0, method=method)
    batch = batch_least_squares(prob.fun_b, x0[None], method=method)[0]
    assert single.cost < 1e-20 and float(batch.cost) < 1e-20
    assert_status_equivalent(batch.status, single.status)
    assert_counts_close(batch.status, single.status, batch.nfev, single.nfev, slack=4)


@pytest.mark.parametrize("jac", sorted(DOGBOX_ACTIVE_BOUND))
def test_dogbox_active_bound_like_scipy(jac: str) -> None:
    """The single call against scipy on the case found above: same minimum, counts within
    an iteration, optimality at scipy's level (regression test for the dogbox fix)."""
    prob, opts = DOGBOX_ACTIVE_BOUND[jac]
    ref = _scipy(prob.fun, prob.x0.copy(), **opts)
    res = least_squares(prob.fun, prob.x0.copy(), **opts)
    assert ref.status > 0 and ref.optimality <= OPTIMAL
    assert_result_parity(res, ref, x_rtol=1e-6)
