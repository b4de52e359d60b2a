r"""Glue between torchimize's calling conventions and the shared batched engine.

Every function of :mod:`torchimize_scipy.functions` is a thin frontend: it
checks its arguments, wraps the caller's callables as a *model* that maps a
``(B, n)`` tensor of parameters to the engine's ``(B, m)`` residual vectors and
``(B, m, n)`` Jacobians, and hands the problems to
:func:`torchimize_scipy._driver.solve` with one of the engine's step rules
(``'lm'``, ``'gn'`` or ``'gd'``). The iterates are recorded with the engine's
``on_iteration`` hook.

Cost.  For ``C`` cost channels with residuals :math:`f_c \in \mathbb{R}^N` and
weights :math:`w_c \ge 0` (``wvec``) every method minimises

.. math:: F(p) = \tfrac12 \sum_c w_c \lVert f_c(p) \rVert^2 ,

whose gradient :math:`\sum_c w_c J_c^\top f_c` and Gauss-Newton matrix
:math:`\sum_c w_c J_c^\top J_c` are the ones torchimize builds. It is the
ordinary least-squares cost of the stacked residual vector
:math:`(\sqrt{w_1} f_1, \dots, \sqrt{w_C} f_C)` of length ``m = C N``, which
is what the engine receives.

Iterations.  One *iteration* is one round of the engine: every problem still
running proposes one trial point and evaluates its residuals there (one
function evaluation). An accepted trial moves the problem; a rejected one
(LM trust-region shrink, line-search backtracking) leaves it where it was, so
its row repeats in the next recorded iterate, as in torchimize's LM. Problems
that have terminated are frozen (and no longer evaluated by the engine).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._driver import EngineRun, initial_state, prefers_gram, solve
from .._engine import status as codes
from .._frontend import EngineJacobian
from .._validation import EPS32

__all__ = [
    "Iterates", "ParallelModel", "SingleModel", "check_step",
    "check_lm_options", "check_max_iter", "check_tolerances", "check_weights", "minimize",
    "parallel_result", "run_torchimize", "single_result", "start_point",
]


class Iterates(list):
    """The list of iterates torchimize returns, with the engine's final report.

    It *is* a ``list`` of tensors (``(n,)`` for single problems, ``(B, n)`` for
    parallel ones), so code written for torchimize keeps working; the extra
    attribute :attr:`info` holds the engine's per-problem results.

    Attributes
    ----------
    info : dict
        ``x`` (final parameters), ``cost`` (:math:`\\tfrac12\\sum_c w_c\\lVert
        f_c\\rVert^2`), ``status`` (scipy's termination codes, see
        :mod:`torchimize_scipy._engine.status`), ``message`` (list of strings),
        ``nfev``, ``njev`` and ``nit`` (per problem, batch-first tensors; scalars
        and a single string for the single-problem functions).
    """

    info: dict


# ---------------------------------------------------------------------------- validation
def start_point(p: Any, ndim: int) -> Tensor:
    """A detached copy of the starting point, after checking its type and shape."""
    if not isinstance(p, torch.Tensor):
        raise ValueError(f"`p` must be a torch.Tensor, got {type(p).__name__}.")
    if not p.is_floating_point():
        raise ValueError(f"`p` must have a real floating-point dtype, got {p.dtype}.")
    if p.ndim != ndim:
        shape = "(n,)" if ndim == 1 else "(B, n)"
        raise ValueError(f"`p` must have shape {shape} ({ndim} dim{'s' if ndim > 1 else ''}), "
                         f"got shape {tuple(p.shape)} ({p.ndim} dims).")
    if p.numel() == 0:
        raise ValueError(f"`p` must not be empty, got shape {tuple(p.shape)}.")
    return p.detach().clone()


def _number(value: Any, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a real number, got {value!r}.") from None
    if isinstance(value, bool) or not math.isfinite(out):
        raise ValueError(f"`{name}` must be a finite real number, got {value!r}.")
    return out


def check_tolerances(ftol: Any, ptol: Any, gtol: Any) -> tuple[float, float, float]:
    """``(ftol, xtol, gtol)`` for the engine; each must be a finite number ``>= 0``."""
    out = []
    for value, name in ((ftol, "ftol"), (ptol, "ptol"), (gtol, "gtol")):
        v = _number(value, name)
        if v < 0:
            raise ValueError(f"`{name}` must be non-negative, got {value!r}.")
        out.append(v)
    return out[0], out[1], out[2]


def check_max_iter(max_iter: Any) -> int:
    """``max_iter`` as a positive ``int``."""
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"`max_iter` must be a positive integer, got {max_iter!r}.")
    return int(max_iter)


def check_step(l: Any, meaning: str) -> float:
    """Step length ``l`` of 'gd' (step size) or 'gn' (step fraction): finite and positive."""
    v = _number(l, "l")
    if not v > 0:
        raise ValueError(f"`l` (the {meaning}) must be positive, got {l!r}.")
    return v


#: torchimize's Levenberg-Marquardt defaults, which name the engine's own rule.
LM_DEFAULTS = {"tau": 1e-3, "rho1": 0.25, "rho2": 0.75, "beta": 2.0, "gama": 3.0}


def check_lm_options(tau: Any, meth: Any, rho1: Any, rho2: Any, beta: Any, gama: Any,
                     names: tuple[str, str] = ("beta", "gama")) -> str:
    """Check torchimize's LM options; return ``meth`` (``'lev'`` or ``'marq'``).

    The engine runs MINPACK's trust-region Levenberg-Marquardt method, whose
    damping is controlled by the trust radius, not by torchimize's
    ``tau``/``rho1``/``rho2``/``beta``/``gama`` schedule. Their default values
    are accepted and select MINPACK's rule (``rho1``/``rho2`` are exactly
    MINPACK's thresholds 0.25/0.75 on the gain ratio); any other value raises.
    """
    if meth not in ("lev", "marq"):
        raise ValueError(f"`meth` must be 'lev' (Levenberg: damping lambda*I) or 'marq' "
                         f"(Marquardt: damping lambda*diag(J^T J)), got {meth!r}.")
    given = {"tau": tau, "rho1": rho1, "rho2": rho2, names[0]: beta, names[1]: gama}
    defaults = dict(zip(given, LM_DEFAULTS.values(), strict=True))
    for name, value in given.items():
        v = _number(value, name)
        if v != defaults[name]:
            raise ValueError(
                f"`{name}={value!r}` cannot be honoured: torchimize_scipy's Levenberg-Marquardt "
                "is MINPACK's trust-region method (as scipy's method='lm'), whose damping "
                "follows the trust radius: it starts undamped with radius 100*||D p0|| and "
                "shrinks/grows the radius when the gain ratio is <= 0.25 / >= 0.75. Only the "
                f"default {name}={defaults[name]!r}, which selects that rule, is accepted.")
    return meth


def check_weights(wvec: Any, C: int, like: Tensor) -> Tensor:
    """Channel weights ``(C,)`` on ``like``'s device and dtype (ones when None).

    A ``(1,)`` tensor is one weight for every channel, as torchimize's
    solvers broadcast it (its default ``wvec`` is ``ones(1)``).
    """
    if wvec is None:
        return torch.ones(C, dtype=like.dtype, device=like.device)
    try:
        w = torch.as_tensor(wvec).detach()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"`wvec` must be a tensor of shape (C,), got {wvec!r}.") from None
    if w.ndim != 1 or w.shape[0] not in (1, C):
        raise ValueError(f"`wvec` must hold one weight per cost channel: expected shape ({C},) "
                         f"for C={C} channels (or (1,) for one weight shared by all), got "
                         f"shape {tuple(w.shape)}.")
    if w.is_complex() or not (w.is_floating_point() or w.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"`wvec` must be real, got dtype {w.dtype}.")
    w = w.to(device=like.device, dtype=like.dtype).expand(C).clone()
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("`wvec` must be finite and non-negative: the cost is "
                         "0.5 * sum_c wvec[c] * ||f_c||^2.")
    return w


def _tensor_out(value: Any, what: str) -> Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"`{what}` must return a torch.Tensor, got {type(value).__name__}.")
    return value


def _shaped_out(value: Any, what: str, expected: tuple, layout: str) -> Tensor:
    """``value`` as returned by ``what(p, *args)``, checked to be a tensor of ``expected`` shape.

    ``layout`` names the axes of ``expected`` in the error message, e.g. ``"(B, C, N)"``.
    """
    out = _tensor_out(value, what)
    if tuple(out.shape) != tuple(expected):
        raise ValueError(f"`{what}(p, *args)` returned shape {tuple(out.shape)}, expected "
                         f"{layout} = {tuple(expected)}.")
    return out


# ---------------------------------------------------------------------------- models
def _check_callables(function: Any, jac_function: Any) -> None:
    """``function`` must be callable, ``jac_function`` callable or None."""
    if not callable(function):
        raise ValueError("`function` must be callable.")
    if jac_function is not None and not callable(jac_function):
        raise ValueError("`jac_function` must be callable or None.")


class ParallelModel:
    """``function(p (B, n), *args) -> (B, C, N)`` as weighted ``(B, C*N)`` residuals.

    The caller's callables always receive the parameters of *all* ``B``
    problems, as in torchimize (so ``args`` may hold per-problem data of any
    layout); the engine's rows are embedded into the latest iterate of the
    batch and only the rows asked for are returned.
    """

    def __init__(self, function: Callable, jac_function: Callable | None, args: Sequence,
                 p0: Tensor, wvec: Any) -> None:
        _check_callables(function, jac_function)
        self.function = function
        self.jac_function = jac_function
        self.args = tuple(args)
        self.B, self.n = p0.shape
        self.dtype, self.device = p0.dtype, p0.device
        f = _tensor_out(function(p0, *self.args), "function")
        if f.ndim != 3:
            raise ValueError("`function(p, *args)` must return a tensor of shape (B, C, N) "
                             "(problems, cost channels, residuals per channel), got shape "
                             f"{tuple(f.shape)} ({f.ndim} dims).")
        if f.shape[0] != self.B:
            raise ValueError(f"`function(p, *args)` returned {f.shape[0]} problems (shape "
                             f"{tuple(f.shape)}) for p of shape {tuple(p0.shape)}: the first "
                             f"dimension must be B={self.B}.")
        if f.shape[1] == 0 or f.shape[2] == 0:
            raise ValueError(f"`function(p, *args)` returned an empty residual tensor of shape "
                             f"{tuple(f.shape)}.")
        self.C, self.N = int(f.shape[1]), int(f.shape[2])
        self.m = self.C * self.N
        self.w = check_weights(wvec, self.C, p0)
        self.sqrt_w = self.w.sqrt()

    @property
    def has_jacobian(self) -> bool:
        return self.jac_function is not None

    def raw_residuals(self, X: Tensor) -> Tensor:
        f = _shaped_out(self.function(X, *self.args), "function",
                        (X.shape[0], self.C, self.N), "(B, C, N)")
        return f.to(device=self.device, dtype=self.dtype)

    def residuals(self, X: Tensor) -> Tensor:
        f = self.raw_residuals(X)
        return (f * self.sqrt_w[:, None]).reshape(X.shape[0], self.m)

    def raw_jacobian(self, X: Tensor) -> Tensor:
        J = _shaped_out(self.jac_function(X, *self.args), "jac_function",
                        (X.shape[0], self.C, self.N, self.n), "(B, C, N, n)")
        return J.to(device=self.device, dtype=self.dtype)

    def jacobian(self, X: Tensor) -> Tensor:
        J = self.raw_jacobian(X)
        return (J * self.sqrt_w[:, None, None]).reshape(X.shape[0], self.m, self.n)


class SingleModel:
    """``function(p (n,), *args) -> (m,)`` and ``jac_function -> (m, n)`` as a batch of one."""

    def __init__(self, function: Callable, jac_function: Callable | None, args: Sequence,
                 p0: Tensor) -> None:
        _check_callables(function, jac_function)
        self.function = function
        self.jac_function = jac_function
        self.args = tuple(args)
        self.n = p0.shape[0]
        self.dtype, self.device = p0.dtype, p0.device
        f = _tensor_out(function(p0, *self.args), "function")
        if f.ndim != 1 or f.shape[0] == 0:
            raise ValueError("`function(p, *args)` must return a 1-D tensor of residuals, "
                             f"shape (m,), got shape {tuple(f.shape)}.")
        self.m = int(f.shape[0])

    @property
    def has_jacobian(self) -> bool:
        return self.jac_function is not None

    def residuals(self, X: Tensor) -> Tensor:
        rows = []
        for i in range(X.shape[0]):
            rows.append(_shaped_out(self.function(X[i], *self.args), "function",
                                    (self.m,), "(m,)"))
        return torch.stack(rows).to(device=self.device, dtype=self.dtype)

    def jacobian(self, X: Tensor) -> Tensor:
        rows = []
        for i in range(X.shape[0]):
            rows.append(_shaped_out(self.jac_function(X[i], *self.args), "jac_function",
                                    (self.m, self.n), "(m, n)"))
        return torch.stack(rows).to(device=self.device, dtype=self.dtype)


# ---------------------------------------------------------------------------- engine run
def minimize(model: ParallelModel | SingleModel, x0: Tensor, method: str, *, ftol: float,
             xtol: float, gtol: float, max_trials: int, meth: str = "lev",
             step_size: float = 1.0) -> Iterates:
    """Run the engine's ``method`` on the ``(B, n)`` starting points ``x0``.

    Parameters
    ----------
    model : ParallelModel or SingleModel
    x0 : Tensor
        ``(B, n)`` starting points (already a private copy).
    method : {'lm', 'gn', 'gd'}
    ftol, xtol, gtol : float
        Engine tolerances (torchimize's ``ftol``, ``ptol``, ``gtol``).
    max_trials : int
        Iterations (trial steps, i.e. residual evaluations after the first) per problem.
    meth : {'lev', 'marq'}
        ``'lm'`` only: identity damping (``x_scale=1``) or Marquardt's
        ``diag(J^T J)`` damping (``x_scale='jac'``).
    step_size : float
        ``'gd'``: every iteration first tries ``p - l * g(p)``; ``'gn'``: the
        fraction ``l`` of the Gauss-Newton step is tried first.

    Returns
    -------
    Iterates
        One ``(B, n)`` tensor per iteration (empty when every problem stopped
        before its first trial), with :attr:`Iterates.info`.
    """
    B, n = x0.shape
    dev = x0.device
    all_rows = torch.arange(B, device=dev)
    current = x0.clone()  # latest iterate of every problem

    def embed(x: Tensor, idx: Tensor) -> Tensor:
        # engine rows are sorted problem indices, so B rows means all of them in order
        return x if x.shape[0] == B else current.index_copy(0, idx, x)

    def pick(values: Tensor, idx: Tensor, k: int) -> Tensor:
        return values if k == B else values.index_select(0, idx)

    def fun(x: Tensor, idx: Tensor) -> Tensor:
        return pick(model.residuals(embed(x, idx)), idx, x.shape[0])

    def user_jac(x: Tensor, idx: Tensor) -> Tensor:
        return pick(model.jacobian(embed(x, idx)), idx, x.shape[0])

    if model.has_jacobian:
        jac = EngineJacobian(user_jac, fun, user=user_jac)
    else:
        jac = EngineJacobian("autograd", fun, differentiable=fun)

    with torch.no_grad():
        f0 = fun(x0, all_rows)
    if max_trials == 0:  # no step allowed (MINPACK's LM would still take one)
        return _no_step(x0, f0)
    J0 = jac(x0, f0, all_rows)

    if method == "lm":
        x_scale: Tensor | str = torch.ones_like(x0) if meth == "lev" else "jac"
    else:
        x_scale = torch.ones_like(x0)

    iterates = Iterates()

    def record(state: dict) -> None:
        ids = state["ids"]
        current.index_copy_(0, ids, state["x"])
        iterates.append(current.clone())

    inf = torch.full_like(x0, math.inf)
    start = initial_state(all_rows, x0, f0, J0, -inf, inf, x_scale)
    out = solve(EngineRun(
        method=method, fun=fun, jac=jac, start=start, loss=None, ftol=ftol, xtol=xtol,
        gtol=gtol, max_nfev=max_trials + 1, bounded=False, jac_scale=isinstance(x_scale, str),
        use_gram=prefers_gram(model.m, n), on_iteration=record,
        step_length=step_size if method in ("gd", "gn") else None))
    x_final = out["x"]
    status = out["status"]
    iterates.info = {
        "x": x_final, "cost": out["cost"], "status": status,
        "message": codes.messages(status.tolist()),
        "nfev": out["nfev"], "njev": out["njev"], "nit": out["nit"],
    }
    return iterates


def _no_step(x0: Tensor, f0: Tensor) -> Iterates:
    """The report of a run that was allowed no trial step (status 0, budget exhausted)."""
    B = x0.shape[0]
    zeros = torch.zeros(B, dtype=torch.long, device=x0.device)
    status = torch.full_like(zeros, codes.MAX_NFEV)
    its = Iterates()
    its.info = {"x": x0.clone(), "cost": 0.5 * (f0 * f0).sum(-1), "status": status,
                "message": [codes.message(codes.MAX_NFEV)] * B, "nfev": zeros + 1,
                "njev": zeros, "nit": zeros}
    return its


def parallel_result(iterates: Iterates) -> Iterates:
    """torchimize's parallel convention: the iterates after each iteration, at least one."""
    if not iterates:  # every problem stopped before its first trial
        iterates.append(iterates.info["x"].clone())
    return iterates


def single_result(x0: Tensor, iterates: Iterates) -> Iterates:
    """torchimize's single-problem convention: ``[p0, p1, ...]`` as ``(n,)`` tensors."""
    out = Iterates([x0[0].clone()] + [x[0] for x in iterates])
    info = iterates.info
    out.info = {"x": info["x"][0], "cost": float(info["cost"][0]),
                "status": int(info["status"][0]), "message": info["message"][0],
                "nfev": int(info["nfev"][0]), "njev": int(info["njev"][0]),
                "nit": int(info["nit"][0])}
    return out


#: float64's machine epsilon (the lower end of the float32 raise of the tolerances)
EPS64 = float(torch.finfo(torch.float64).eps)


def run_torchimize(method: str, p: Any, function: Callable, jac_function: Callable | None,
                   args: Sequence, *, parallel: bool, tolerances: tuple | None, max_iter: Any,
                   rule_options: Callable[[], dict], wvec: Any = None,
                   plain: bool = False) -> Any:
    """The body of every function of the torchimize API.

    Checks in torchimize's argument order (``p``, the tolerances ``(ftol,
    ptol, gtol)`` unless None, which means none, the rule's own options from
    ``rule_options()``, ``max_iter``), wraps the callables as a model, runs
    the engine's ``method`` and returns torchimize's convention: for a single
    problem the list ``[p0, p1, ...]`` (``max_iter`` counts ``p0``), for
    parallel ones the ``(B, n)`` iterates, or only the final ``(B, n)`` when
    ``plain``.
    """
    x0 = start_point(p, 2 if parallel else 1)
    ftol, xtol, gtol = (0.0, 0.0, 0.0) if tolerances is None else check_tolerances(*tolerances)
    if x0.dtype == torch.float32:
        # as batch_least_squares: float32 resolves no relative change below its epsilon, so
        # a tolerance from float64's epsilon up to float32's (the 1e-8 defaults) is raised to
        # it; smaller ones (and 0) keep their meaning
        ftol, xtol, gtol = (EPS32 if EPS64 <= t < EPS32 else t for t in (ftol, xtol, gtol))
    options = rule_options()
    max_iter = check_max_iter(max_iter)
    if not parallel:
        model = SingleModel(function, jac_function, args, x0)
        its = minimize(model, x0[None], method, ftol=ftol, xtol=xtol, gtol=gtol,
                       max_trials=max_iter - 1, **options)
        return single_result(x0[None], its)
    model = ParallelModel(function, jac_function, args, x0, wvec)
    its = minimize(model, x0, method, ftol=ftol, xtol=xtol, gtol=gtol, max_trials=max_iter,
                   **options)
    return its.info["x"] if plain else parallel_result(its)
