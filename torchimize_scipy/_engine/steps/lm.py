r"""Levenberg-Marquardt ('lm') step rule with MINPACK's scaling and safeguards.

J. J. Moré, "The Levenberg-Marquardt algorithm: implementation and theory",
Lecture Notes in Mathematics 630, Springer, 1978, pp. 105-116; and the MINPACK
``lmder`` routine (Moré, Garbow & Hillstrom, Argonne ANL-80-74, 1980), which
scipy's ``method='lm'`` calls.

Variables are scaled by ``diag``: with ``x_scale='jac'`` (scipy's default for
'lm') it starts as the column norms of the first Jacobian and is the running
maximum of the column norms afterwards; otherwise ``diag = 1 / x_scale``. Each
trial solves :math:`\min \lVert J p + f\rVert` with :math:`\lVert \mathrm{diag}\,
p\rVert \le \Delta` to 10 % accuracy (``lmpar``). The radius follows MINPACK's
rules on the ratio of actual to predicted relative reductions, steps with
ratio :math:`\ge 10^{-4}` are taken, and the termination tests are MINPACK's:
``ftol`` on the relative reductions, ``xtol`` on :math:`\Delta \le
\mathrm{xtol}\,\lVert \mathrm{diag}\,x\rVert`, ``gtol`` on the largest cosine
between ``f`` and a column of ``J``. MINPACK's codes map onto scipy's status
(1 -> 2, 2 -> 3, 3 -> 4, 4 -> 1, 5 -> 0); its "tolerance too small" codes 6, 7
and 8 have codes of their own (failures, :mod:`..termination`), which only
tolerances below machine epsilon can reach (``curve_fit``, as ``leastsq``).

Full-rank problems solve every trial from the SVD (or, in batches, the Gram
inverse) of the scaled Jacobian, whose Gauss-Newton step is MINPACK's to
rounding. Where the Jacobian is rank deficient the two differ: MINPACK's QR
with column pivoting yields the *basic* solution (the pivot columns move, the
others stay), the SVD the minimum-norm one (every parameter moves, and a
symmetric start stays symmetric). Rows whose smallest singular value is below
``100 eps`` times the largest therefore take MINPACK's route
(:func:`~torchimize_scipy._engine.linalg.basic_gauss_newton`): the pivoted QR
in MINPACK's order of operations, its basic step and its lower bound for the
damping, and damped steps from the SVD of that ``R`` (issue 18). The
Gauss-Newton step is computed once per outer iteration (``build_model``); on Gram
rows that predict a nearly zero residual it is refined with ``J`` so that a
batch lands on an exact zero as a single problem does (issue 11). A batch takes
``|f|`` at the top of an outer iteration from its accepted trial, whose norm
``assess_trial`` keeps (rows admitted since the last top are measured), and the
refinement's ``|f|^2`` as twice the linear cost where no halved cost is below
the smallest normal number: the same reductions of the same values, one pass
over the residuals fewer each (issue 14; ``tests/test_lm_batch_norms.py``).

On the CPU the rule's per-problem work (the optimality measure and scaling,
``lmpar``'s Newton iteration, the Gauss-Newton step's quotients, the trial's
assessment, radius update and tests) runs on host scalars
(:mod:`..host_scalars`). A batch keeps torch's norms, sums and square roots,
so that its host and tensor paths agree bit for bit; batches whose ``(B, n)``
rows exceed torch's grain size keep the tensor path (``host_scalars.for_rows``).
Its optimality measure takes the row maxima column by column on the host
(:meth:`~..host_scalars.Scalars.amax`: numpy's ``amax`` along four entries cost
20 times more) and
its cosines unguarded where no norm is zero (the same values); the rows that
stop at a top keep the model computed for them (``model_on_stopped_rows``).
One float64 problem (``least_squares``, ``curve_fit``) also takes its norms,
square roots, the products with ``V`` and ``J`` and the step's arithmetic
from numpy (:func:`..trust_region.host_norm`): about a third fewer torch
operations per evaluation, at the price of rounding-level differences from
the tensor path (numpy's square root is correctly rounded, torch's float64
one is not always; reductions may sum in another order); the iterations, and
so nfev, njev and status, are the same on the parity problems. With at
most four residuals and variables its cost, ``J^T f`` and ``J^T J`` are host
sums too (:meth:`..problem.Problem.cost`, :meth:`..problem.Problem.linearize`:
torch's order of terms, bit for bit; ``J^T f`` and ``U^T f`` below
:data:`..problem.BMM_NAIVE_TERMS` multiply-adds at any size,
:func:`..problem.host_transposed_rows`). Off the Gram route the rule reads
no cost (:meth:`LevenbergMarquardt.reads_cost`: one problem's loop takes it
once, where it writes the result), and each stage of the rule enters
numpy's ignore-all error state once (:meth:`..host_scalars.Scalars.quiet`; the
subproblem and the step share the proposal's, the factors and the
Gauss-Newton step the model's; never around the user's functions). Its
factorisation forms ``J d`` and tests it on the host (:func:`_host_svd`;
torch's SVD, whose rounding numpy's would not reproduce, for a small matrix
torch's own LAPACK routine called on the host arrays, :mod:`..host_lapack`),
and lmpar runs written out for it (``trust_region._solve_minpack_one``; its
radius terms on Python floats). Under ``x_scale='jac'`` every entry of
``J d`` is at most 1 in size, so a batch's ``d`` is marked finite for a
Jacobian the loop proved finite and its factorisation tests nothing (nor
does one problem's host test). That problem's radius, damping, norms, masks
and codes stay ``numpy`` scalars in the state from ``init_state`` on
(:meth:`..host_scalars.Scalars.keep`), so a trial makes no ``(1,)`` tensor
for them.

The rule sums squares directly (MINPACK's ``enorm`` scales them): problems
whose residuals or Jacobian at ``x0`` come near float64's overflow are run by
the driver on residuals scaled by a power of two, under which this iteration
is invariant (``_driver._LMScaling``, issue 14).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm

from .. import host_lapack
from ..counts import count_true, evaluated, known_finite, mark_finite, remember
from ..host_scalars import Floats, Scalars, as_tensor, for_rows, remember_rows
from ..linalg import Factors, factorize, host_svd_factors, refine_gauss_newton
from ..minpack_qr import BasicStep, basic_gauss_newton, rank_deficient_rows
from ..problem import BMM_NAIVE_TERMS, Problem, host_transposed_rows
from ..quadratic import cross_jac, jac_times
from ..termination import (
    RUNNING,
    minpack_status,
    reported_njev,
    uncounted_jacobian,
)
from ..trust_region import host_norm, minimum_norm_step, solve_trust_region_minpack
from ._common import (
    FACTOR_KEYS,
    alloc_factors,
    column_norms,
    flag_singular_factors,
    inf_norm,
    known_factors,
    load_factors,
    store_factors,
)
from .base import ResultFields, StepRule, Verdict


def _norms(hs: Scalars, a: Any) -> Any:
    """Row norms of ``a`` as per-problem values of ``hs``: a tensor's by torch's reduction
    (a batch), a host array's by numpy's (one problem, :attr:`Scalars.floats`)."""
    if hs.floats:
        return host_norm(a if isinstance(a, np.ndarray) else hs.view(a)[0])
    return hs.view(vnorm(a, dim=-1))[0]


def _host_svd(hs: Scalars, J: Tensor, diag: Tensor, f: Tensor,
              finite: bool = False) -> Factors | None:
    """The SVD factors of one float64 problem's scaled Jacobian ``J / diag``, kept on the host.

    The same operations as :func:`~..linalg.svd_factors` (``d = 1 / diag`` and
    the products ``J d`` elementwise, torch's SVD, ``U^T f`` by torch's
    ``bmm``: the same values), with ``J d`` formed and tested for finiteness
    on the host from the values the rule already holds there (no torch
    operation for the scaling, no sum and read for the test); below
    :data:`~..problem.BMM_NAIVE_TERMS` multiply-adds ``U^T f`` is summed on
    the host in the order of torch's own ``bmm`` kernel
    (:func:`~..problem.host_transposed_rows`), and the factors carry their
    host rows (:func:`~..host_scalars.remember_rows`). numpy's SVD
    would cost less, but rounds differently from torch's: on problems whose
    last steps are at rounding level (linear models) that moved MINPACK's
    ``xtol`` test and with it the reported status. None when an entry of
    ``J d`` is not finite: the tensor path then flags the problem as it
    always does. ``finite``: the caller knows every entry of ``J d`` to be
    finite (a Jacobian the loop proved finite under ``x_scale='jac'``, see
    :meth:`LevenbergMarquardt.build_model`), which is then not tested. Up to
    :data:`~..host_lapack.MAX_ENTRIES` entries the SVD is LAPACK's called on
    the host arrays (:mod:`..host_lapack`: the routine and arguments of
    torch's, the same bits, without torch's dispatch, copies and queries),
    and ``s`` and ``V`` carry their host rows. The caller holds
    :meth:`~..host_scalars.Scalars.quiet`.
    """
    J_h, diag_h, f_h = hs.view(J, diag, f)
    A = J_h * (1.0 / diag_h)[:, None, :]
    if not finite and not np.isfinite(A).all():
        return None
    m, n = A.shape[-2:]
    if host_lapack.AVAILABLE and 0 < m * n <= host_lapack.MAX_ENTRIES:
        # torch's own LAPACK routine called on the host arrays (host_lapack: the same bits)
        # (U^T f: m k <= MAX_ENTRIES < BMM_NAIVE_TERMS multiply-adds, summed on the host
        # in the order of torch's own bmm kernel: the same values)
        out = host_svd_factors(A[0], f_h[0])
        if out is None:  # (did not converge: the tensor path isolates the problem)
            return None
        return Factors(mark_finite(out[0]), out[1], out[2])
    try:
        U, s, Vh = torch.linalg.svd(torch.from_numpy(A), full_matrices=False)
    except RuntimeError:  # (did not converge: the tensor path isolates the problem)
        return None
    k = U.shape[-1]
    if m * k >= BMM_NAIVE_TERMS:  # (MKL's gemm inside bmm: its own order of the terms)
        uf = torch.bmm(U.transpose(-1, -2), f.unsqueeze(-1)).squeeze(-1)
        return Factors(mark_finite(s), Vh.transpose(-1, -2), uf)
    # U^T f summed on the host as torch's small bmm kernel sums it (host_transposed_rows):
    # the same values; s, V and U^T f carry their host rows for the step and lmpar
    U_h, Vh_h = hs.rows(U), hs.rows(Vh)
    hs.rows(s)  # (remembered on s for the step and lmpar)
    # (V contiguous, as Scalars.rows gives it: numpy's products depend on the layout)
    V_h = np.ascontiguousarray(Vh_h.transpose(0, 2, 1))
    return Factors(mark_finite(s), remember_rows(torch.from_numpy(V_h), V_h),
                   hs.tensor_rows(host_transposed_rows(U_h[0], f_h[0])[None]))


def _enorm_nonfinite(hs: Scalars, f: Tensor) -> Any:
    """MINPACK's ``enorm`` of residual rows that are not all finite, per problem.

    Its scaled sum of squares gives ``inf`` for a row with exactly one
    infinite entry and no NaN, and NaN for a row with a NaN or two infinities
    or more (``inf / inf``). After such a trial MINPACK's radius update
    then differs: ``0.1 |f_new| >= |f|`` holds for ``inf``, not for NaN (the
    shrink factor is then ``0.5 dirder / (dirder + 0.5 actred)``, not 0.1).
    Read for the rows that are not finite only; finite rows are the caller's.
    """
    nan_row = torch.isnan(f).any(-1) | (torch.isinf(f).sum(-1) >= 2)
    rows, = hs.view(nan_row)
    norms = hs.xp.where(rows, float("nan"), float("inf"))
    # (in f's dtype: a float64 norm in a float32 run made the radius, and every value
    # after it, float64)
    if not hs.host:
        return norms.to(f.dtype)
    if f.dtype != torch.float32:
        return norms
    return np.float32(norms) if np.ndim(norms) == 0 else norms.astype(np.float32)


def _squares_from_cost(hs: Scalars, cost: Tensor) -> Tensor | None:
    """``(f * f).sum(-1)`` of a batch on the host from its linear cost ``0.5 * (f * f).sum(-1)``
    (:meth:`..problem.Problem.cost`, the same squares summed by the same reduction):
    ``2 * cost``, the same values, or None where that would not be exact.

    Halving and doubling are exact unless the half falls below the smallest normal
    number (a subnormal half may round): where some cost does, None (the caller sums the
    squares again). NaN and infinite costs double back to themselves. On the host only
    (the test reads the costs' host values; a device would wait for them).
    """
    tiny = _TINY.get(cost.dtype)
    if tiny is None or (hs.view(cost)[0] < tiny).any():
        return None
    return cost * 2.0


#: smallest positive normal number of the float dtypes
_TINY = {dt: torch.finfo(dt).tiny for dt in (torch.float64, torch.float32)}


class LMTrial:
    """A trial of 'lm': the point, the step, its scaled norm and the damping it used.

    ``pnorm`` and ``par`` are ``(B,)`` tensors, or ``numpy.float64`` for one
    float64 problem on the host (:meth:`..host_scalars.Scalars.keep`).
    ``step_norm`` (the loop reads it for scipy's iteration table only) is
    computed when first asked for.
    """

    __slots__ = ("x_new", "step", "pnorm", "par", "_step_norm")

    def __init__(self, x_new: Tensor, step: Tensor, pnorm: Tensor, par: Tensor) -> None:
        self.x_new = x_new
        self.step = step
        self.pnorm = pnorm  # |diag * step|
        self.par = par
        self._step_norm: Tensor | None = None

    @property
    def step_norm(self) -> Tensor:
        """``|step|`` per problem, ``(B,)``."""
        if self._step_norm is None:
            self._step_norm = vnorm(self.step, dim=-1)
        return self._step_norm


class LevenbergMarquardt(StepRule):
    """Step rule reproducing MINPACK ``lmder``."""

    state_keys = frozenset({
        "diag",  # MINPACK's variable scaling
        "delta",  # trust radius on |diag * step|
        "par",  # Levenberg-Marquardt parameter
        "xnorm",  # |diag * x|
        "gnorm",  # largest cosine between f and a column of J (the gtol measure)
        "fnorm",  # |f| at the current point
        "no_step_yet",  # no trial accepted so far: the radius follows the first step
        "radius_set",  # diag and the radius were set by the first outer iteration
        "uncounted_jac",  # termination.uncounted_jacobian of the stopping trial
        "basic_rows", "gn_step", "basic_curv", "basic_full",  # see build_model
        *FACTOR_KEYS,
    })
    budget_at_top = False  # MINPACK tests nfev after each trial
    prints_table = False  # scipy prints no iteration table for 'lm'
    fixed_residual_count = True  # MINPACK's wrapper refuses residuals of another length
    # build_model writes the factors, the Gauss-Newton step and its basic-row data (read
    # by propose_step only) and SINGULAR on running rows: rows that stopped at the top
    # may keep what it computes for them (loop.on_rows, no torch.where per key)
    model_on_stopped_rows = True

    def __init__(self) -> None:
        #: problems were admitted since the last ``measure_optimality`` (their first top
        #: sets ``diag`` and the radius)
        self._admitted = False

    def init_state(self, problem: Problem, state: dict) -> None:
        self._admitted = True
        x = state["x"]
        B = x.shape[0]
        hs = for_rows(x)
        if problem.jac_scale:  # (one problem: from numpy, no torch operation)
            state["diag"] = hs.tensor_rows(np.ones(x.shape)) if hs.floats else torch.ones_like(x)
        else:
            state["diag"] = state["scale_inv"].clone()
        if hs.floats:  # one problem: host values (host_scalars.Scalars.keep)
            zero = np.float64(0.0)
            state.update(delta=zero, par=zero, xnorm=zero, gnorm=zero, fnorm=zero,
                         no_step_yet=np.bool_(True), radius_set=np.bool_(False),
                         uncounted_jac=np.int64(0))
        else:
            state["delta"] = x.new_zeros(B)
            state["par"] = x.new_zeros(B)
            state["xnorm"] = x.new_zeros(B)
            state["gnorm"] = x.new_zeros(B)
            state["fnorm"] = x.new_zeros(B)  # |f| at the current point (measure_optimality)
            state["no_step_yet"] = torch.ones(B, dtype=torch.bool, device=x.device)
            state["radius_set"] = torch.zeros(B, dtype=torch.bool, device=x.device)
            # MINPACK does not evaluate J at a point accepted by the terminating trial
            state["uncounted_jac"] = torch.zeros(B, dtype=torch.long, device=x.device)
        alloc_factors(problem, state, augmented=False)
        # MINPACK's basic Gauss-Newton step on (nearly) rank-deficient rows (see build_model)
        # (its count known: build_model reads none while no row is rank deficient)
        if hs.floats:  # one problem: the shared (1,) False and zeros from numpy
            no = as_tensor(np.bool_(False))
            state["basic_rows"], state["basic_full"] = remember(no, 0), no
            state["gn_step"] = hs.tensor_rows(np.zeros(x.shape))  # the Gauss-Newton step
            state["basic_curv"] = as_tensor(np.float64(0.0))
            return
        state["basic_rows"] = remember(torch.zeros(B, dtype=torch.bool, device=x.device), 0)
        state["gn_step"] = torch.zeros_like(x)  # the Gauss-Newton step (scaled)
        state["basic_curv"] = x.new_zeros(B)
        state["basic_full"] = torch.zeros(B, dtype=torch.bool, device=x.device)

    def measure_optimality(self, problem: Problem, state: dict) -> Tensor:
        hs = for_rows(state["x"])
        xp = hs.xp
        g_t = state["g"]
        n = g_t.shape[-1]
        # scaling and initial radius on the very first outer iteration
        # (the host knows whether problems were admitted since the last call: no sync)
        any_start, self._admitted = self._admitted, False
        with hs.quiet():
            if hs.floats:  # one problem: its norms on the host (see trust_region.host_norm)
                G, f, g_h, status, diag = hs.view(state["G"], state["f"], g_t, state["status"],
                                                  state["diag"])
                acnorm = np.sqrt(np.maximum(G.diagonal(0, -2, -1), 0.0))
                fnorm = host_norm(f)
                state["fnorm"], = hs.keep(fnorm)
            else:
                acnorm_t = column_norms(state)
                if any_start:
                    fnorm_t = vnorm(state["f"], dim=-1)
                    state["fnorm"] = fnorm_t
                else:  # |f| of each row's point: assess_trial kept its accepted trial's
                    fnorm_t = state["fnorm"]
                acnorm, fnorm, g_h, status, diag = hs.view(acnorm_t, fnorm_t, g_t,
                                                           state["status"], state["diag"])
            if n:
                g_abs = abs(g_h)
                optimality = hs.amax(g_abs)
                denom = fnorm[..., None] * acnorm
                if hs.host and not hs.floats and denom.all() and acnorm.all():
                    # (a batch's host rows without a zero column norm nor denominator: the
                    # same quotients, without two guards over (B, n))
                    cosines = g_abs / denom
                else:
                    cosines = xp.where(acnorm != 0, g_abs / xp.where(denom != 0, denom, 1.0),
                                       0.0)
                # (the cosines are not negative: their max-norm is their max)
                gnorm = xp.where(fnorm != 0, hs.amax(cosines), 0.0)
            else:  # no variables
                optimality = gnorm = hs.view(inf_norm(g_t))[0]
            if any_start:
                start = ~hs.view(state["radius_set"])[0]
            if problem.jac_scale:
                grown = xp.maximum(diag, acnorm)
                if any_start:
                    first_diag = xp.where(acnorm == 0, 1.0, acnorm)
                    diag = xp.where(start[..., None], first_diag, grown)
                else:
                    diag = grown
                state["diag"], = hs.keep(diag)
            hit = (gnorm <= problem.gtol) & (status == RUNNING)
            state["optimality"], state["gnorm"], hit = hs.keep(optimality, gnorm, hit)
            if any_start:
                # (a norm: torch's reduction for a batch, numpy's for one problem)
                xnorm = _norms(hs, state["diag"] * state["x"] if not hs.floats
                               else diag * hs.view(state["x"])[0])
                factor = problem.lm_factor  # (MINPACK's initial step bound, 100 by default)
                delta0 = xp.where(xnorm == 0, factor, factor * xnorm)
                delta, old_xnorm = hs.view(state["delta"], state["xnorm"])
                state["delta"], state["xnorm"] = hs.keep(xp.where(start, delta0, delta),
                                                        xp.where(start, xnorm, old_xnorm))
                state["radius_set"] = (np.bool_(True) if hs.floats
                                       else torch.ones_like(state["radius_set"]))
        return hit

    def build_model(self, problem: Problem, state: dict) -> None:
        hs = for_rows(state["x"])
        fac = None
        if hs.floats and not problem.use_gram:  # one problem: J d formed on the host
            with hs.quiet():  # (one numpy errstate for the factors and the step)
                # (J proven finite and diag at least each column's norm: every entry of
                # J d is at most 1 in size, as below)
                fac = _host_svd(hs, state["J"], state["diag"], state["f"],
                                finite=problem.jac_scale and known_finite(state["J"]))
                if fac is not None:
                    p_gn = minimum_norm_step(fac, host=True, quiet=False)
        if fac is None:
            # (``1 / diag`` exactly: torch's ``1.0 / t`` is ``reciprocal(t) * 1.0``)
            d = torch.reciprocal(state["diag"])
            if problem.jac_scale and known_finite(state["J"]):
                # J proven finite, and diag at least each column's norm (the running
                # maximum): every entry of J d is at most 1 in size, so its
                # factorisation needs no test of its own (linalg.svd_factors)
                d = mark_finite(d)
            fac = factorize(state["J"], d, state["f"], gram=state["G"], g=state["g"],
                            use_gram=problem.use_gram, rejected=state.get("fac_rejected"),
                            known=known_factors(state))
            ff = (_squares_from_cost(hs, state["cost"])
                  if hs.host and fac.gram is not None and count_true(fac.gram)
                  and problem.loss is None else None)
            p_gn = refine_gauss_newton(fac, minimum_norm_step(fac, host=hs.host),
                                       state["J"], d, state["f"], ff)
        store_factors(state, fac)
        flag_singular_factors(state, fac.s)
        # Rank-deficient rows: MINPACK solves with a column-pivoted QR and takes the basic
        # solution, which the minimum-norm SVD step would not reproduce. Full-rank rows
        # (every Gram row among them) keep the factorisation above untouched.
        deficient = rank_deficient_rows(fac)
        n_deficient = count_true(deficient)
        if n_deficient:
            # (every row deficient, as one problem's always is: the rows themselves, without
            # the selections and copies into the state, which would keep every value)
            every = n_deficient == deficient.shape[0]
            rows = None if every else deficient.nonzero().squeeze(-1)

            def pick(t: Tensor) -> Tensor:
                return t if every else t.index_select(0, rows)

            def put(t: Tensor, value: Tensor) -> Tensor:
                return value if every else t.index_copy(0, rows, value)

            basic, qr_fac = basic_gauss_newton(pick(state["J"]), pick(state["diag"]),
                                               pick(state["f"]))
            keys = ("basic_rows", "basic_curv", "basic_full")
            values = (basic.rows, basic.curv, basic.full)
            for key, value in zip(keys, values, strict=True):
                state[key] = value if every else torch.zeros_like(state[key]).index_copy(
                    0, rows, value)
            p_gn = put(p_gn, torch.where(basic.rows.unsqueeze(-1), basic.p, pick(p_gn)))
            # their damped steps from the same R (rows whose QR data is not finite keep the SVD)
            keep = basic.rows
            for key, value in (("fac_s", qr_fac.s), ("fac_V", qr_fac.V), ("fac_uf", qr_fac.uf)):
                new = torch.where(keep.view(-1, *([1] * (value.ndim - 1))), value,
                                  pick(state[key]))
                state[key] = put(state[key], new)
        elif count_true(state["basic_rows"]):  # (a mask known empty is kept)
            state["basic_rows"] = remember(torch.zeros_like(state["basic_rows"]), 0)
        state["gn_step"] = p_gn

    def propose_step(self, problem: Problem, state: dict) -> LMTrial:
        hs = for_rows(state["x"])
        basic = None
        if count_true(state["basic_rows"]):  # (known from build_model until rows change)
            basic = BasicStep(state["basic_rows"], state["gn_step"], state["basic_curv"],
                              state["basic_full"])
        # (without Gram rows, the three SVD fields: no lookup of the others)
        fac = (load_factors(state) if "fac_gram" in state
               else Factors(state["fac_s"], state["fac_V"], state["fac_uf"]))
        with hs.quiet():  # (one numpy errstate for the subproblem and the step)
            q, par = solve_trust_region_minpack(fac, state["delta"], state["par"],
                                                problem.m, problem.n, basic=basic,
                                                p_gn=state["gn_step"], host=hs.host,
                                                quiet=False)
            if hs.floats:  # one problem: the step's arithmetic on the host
                q_h, diag, x = hs.view(q, state["diag"], state["x"])
                step_h = q_h / diag
                pn = host_norm(q_h)
                step, x_new = hs.tensors(step_h, x + step_h)
                pnorm = pn
            else:
                step = q / state["diag"]
                pnorm = vnorm(q, dim=-1)
                x_new = state["x"] + step
                pn, = hs.view(pnorm)
            # on the first iteration the radius is cut to the first step's length
            delta_t = state["delta"]
            first, delta = hs.view(state["no_step_yet"], delta_t)
            state["delta"] = hs.renewed(delta_t,
                                        hs.xp.where(first, hs.xp.minimum(delta, pn), delta))
        return LMTrial(x_new, step, pnorm, par)

    def assess_trial(self, problem: Problem, state: dict, trial: LMTrial, f_new: Tensor,
                     cost_new: Tensor, finite: Tensor) -> Verdict:
        hs = for_rows(state["x"])
        xp = hs.xp
        step, x_new = trial.step, trial.x_new
        (pnorm, par, fnorm, delta, xnorm, gnorm, nfev, no_step_yet, finite) = hs.view(
            trial.pnorm, trial.par,
            state["fnorm"],  # f has not changed since measure_optimality
            state["delta"], state["xnorm"], state["gnorm"], state["nfev"],
            state["no_step_yet"], finite)
        with hs.quiet():
            if hs.floats and "fac_gram" not in state:
                # one problem: norms, products and square roots on the host (numpy's; see
                # trust_region.host_norm)
                J, step_h, f_h, diag, x_h = hs.view(state["J"], step, f_new, state["diag"], x_new)
                Jstep_norm = host_norm((J @ step_h[..., None])[..., 0])
                fnorm_new = host_norm(f_h)
                xnorm_new = host_norm(diag * x_h)
                par_sqrt = Floats.sqrt(par)
            else:
                # a batch: the norms are torch's reductions; everything else is elementwise on
                # (B,) values
                if "fac_gram" in state:  # |J step| through J^T J on the Gram rows
                    Jstep_norm = cross_jac(state["J"], step, step, state["G"],
                                           state["fac_gram"]).sqrt()
                else:
                    Jstep_norm = vnorm(jac_times(state["J"], step), dim=-1)
                # (square roots too: torch's float64 sqrt is not always numpy's, see host_scalars)
                fnorm_new, Jstep_norm, xnorm_new = hs.view(
                    vnorm(f_new, dim=-1), Jstep_norm, vnorm(state["diag"] * x_new, dim=-1))
                # (the square root of a zero damping, a Gauss-Newton step, is zero: no torch op)
                par_sqrt = par if hs.host and not par.any() else hs.view(trial.par.sqrt())[0]
            fnorm1 = xp.where(finite, fnorm_new, xp.inf)
            if hs.count(finite) != hs.B:  # (a host count: no read off the host)
                fnorm1 = xp.where(finite, fnorm1, _enorm_nonfinite(hs, evaluated(f_new)))
            safe_f = xp.where(fnorm != 0, fnorm, 1.0)
            tenth1 = 0.1 * fnorm1
            small = tenth1 < fnorm
            rel1 = fnorm1 / safe_f
            # (x * x is x ** 2 exactly, without the slower pow call)
            actred = xp.where(small, 1 - rel1 * rel1, -1.0)
            temp1 = Jstep_norm / safe_f
            temp2 = par_sqrt * pnorm / safe_f
            t1sq = temp1 * temp1
            t2sq = temp2 * temp2
            prered = t1sq + t2sq / 0.5
            neg_dirder = t1sq + t2sq  # MINPACK's directional derivative, negated
            pos = prered != 0
            ratio = xp.where(pos, actred / xp.where(pos, prered, 1.0), 0.0)
            # radius and damping update: MINPACK's 0.5 dirder / (dirder + 0.5 actred), with
            # both signs flipped (exactly the same quotient; -1 stands for its divisor 1)
            den = neg_dirder - 0.5 * actred
            temp = xp.where(actred >= 0, 0.5,
                            0.5 * neg_dirder / xp.where(den != 0, den, -1.0))
            temp = xp.where((tenth1 >= fnorm) | (temp < 0.1), 0.1, temp)
            shrink = ratio <= 0.25
            # (for booleans ``a > b`` is ``a & ~b``)
            grow = ((par == 0) | (ratio >= 0.75)) > shrink
            delta = xp.where(shrink, temp * xp.minimum(delta, pnorm / 0.1),
                             xp.where(grow, pnorm / 0.5, delta))
            par = xp.where(shrink, par / temp, xp.where(grow, 0.5 * par, par))
            accept = ratio >= 1e-4
            xnorm = xp.where(accept, xnorm_new, xnorm)
            if problem.evals_per_jacobian:  # MINPACK's differences count against maxfev
                nfev = nfev + problem.evals_per_jacobian * hs.view(state["njev"])[0]
            status = minpack_status(actred, prered, ratio, delta, xnorm, gnorm, nfev,
                                    problem.max_nfev, problem.ftol, problem.xtol, xp=xp)
            state["xnorm"] = hs.renewed(state["xnorm"], xnorm)  # (kept by a rejection)
            if not hs.floats:
                # a batch keeps |f| of the accepted trials for the next measure_optimality
                # (torch's norm of each row, the one it would take there of the same values)
                state["fnorm"] = hs.renewed(state["fnorm"], xp.where(accept, fnorm_new, fnorm))
            (state["delta"], state["par"], state["no_step_yet"],
             state["uncounted_jac"], accept, status) = hs.keep(
                delta, par, no_step_yet > accept,  # (and not accepted)
                uncounted_jacobian(accept, status), accept, status)
        return Verdict(accept, status, x_new)

    def after_jacobian(self, problem: Problem, state: dict) -> None:
        """MINPACK keeps its own scaling ``diag`` (updated in ``measure_optimality``)."""

    def trial_unread(self, problem: Problem, state: dict) -> tuple[str, ...]:
        """The trial reads neither the residuals at ``x`` nor the gradient (``|f|`` is
        kept in ``fnorm``, the step comes from the factors), and reads ``J`` only for
        ``|J step|`` on rows off the Gram route (:func:`..quadratic.cross_jac`)."""
        gram = state.get("fac_gram")
        if gram is not None and count_true(gram) == gram.shape[0]:
            return ("f_true", "f", "g", "J")
        return ("f_true", "f", "g")

    def reads_cost(self, problem: Problem) -> bool:
        """Only the Gram route's refinement reads the cost (:func:`_squares_from_cost`);
        MINPACK's tests use the norms of the residuals, not ``cost_new``."""
        return problem.use_gram

    def result_fields(self, problem: Problem, state: dict) -> ResultFields:
        x = state["x"]
        # (one problem's zeros from numpy: no torch operation)
        if for_rows(x).floats:
            zeros = np.zeros(x.shape, dtype=np.int64)
            active = remember_rows(torch.from_numpy(zeros), zeros)
        else:
            active = torch.zeros_like(x, dtype=torch.long)
        return ResultFields(active,
                            njev=reported_njev(state["njev"], state["uncounted_jac"]))
