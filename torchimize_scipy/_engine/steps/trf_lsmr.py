r"""'trf' with ``tr_solver='lsmr'``: a two-dimensional subspace step by products only.

M. A. Branch, T. F. Coleman and Y. Li, "A Subspace, Interior, and Conjugate
Gradient Method for Large-Scale Bound-Constrained Minimization Problems",
SIAM J. Sci. Comput. 21(1), 1999; LSMR: D. C.-L. Fong and M. A. Saunders,
SIAM J. Sci. Comput. 33(5), 2011.

The trust-region subproblem of :mod:`.trf` (scaled variables, Coleman-Li
diagonal term :math:`C = \mathrm{diag}(g \odot \partial v \odot s)` for bounds)
is solved in the subspace spanned by the scaled gradient :math:`g_h` and an
approximate Gauss-Newton step :math:`p_{GN}` from LSMR, so that the Jacobian
is only ever multiplied by vectors and may be dense, sparse or a linear
operator (:mod:`.._engine.operator`):

* :math:`p_{GN}` minimises :math:`\lVert J_h p - f\rVert^2 + \lVert
  (C + \mu I)^{1/2} p \rVert^2` (bounds: LSMR on the stacked operator
  :math:`[J_h; (C + \mu I)^{1/2}]`; no bounds: LSMR's damping
  :math:`(\lambda^2 + \mu)^{1/2}` with ``damp`` = :math:`\lambda`). With
  ``regularize`` (the default) :math:`\mu = -q_{ag} / \Delta^2`, where
  :math:`q_{ag} \le 0` is the least value of the model along the
  anti-gradient inside the trust region: the step is damped in proportion to
  what the gradient alone achieves, which keeps LSMR from chasing the
  directions of tiny singular values when the radius is small. Without it
  :math:`\mu = 0`.
* An orthonormal basis :math:`S` of :math:`\{g_h, p_{GN}\}` (Gram-Schmidt,
  reorthogonalised once) reduces the model to :math:`B_S = (J_h S)^\top J_h S
  + S^\top C S` and :math:`g_S = S^\top g_h`; the 2-D trust-region problem is solved exactly
  (:func:`solve_trust_region_2d`). Every trial of the outer iteration reuses
  :math:`S`, :math:`B_S`, :math:`g_S` (two products per outer iteration for
  :math:`J_h S`, none per trial without bounds). Where :math:`p_{GN}` is a
  multiple of :math:`g_h` to rounding (LSMR stopped after one iteration,
  typical of a large regularisation), the second basis vector would be
  rounding noise, i.e. a random direction (scipy keeps it, so its step there
  is decided by rounding); the model's Hessian times :math:`g_h` (the next
  Krylov vector) takes its place, and where that too is along :math:`g_h`
  the second basis vector is zero, which leaves the model along the gradient
  and makes the step reproducible. With :math:`n = 2` the plane is the whole
  space (as scipy's QR of the two vectors completes it): the second vector
  is the unit vector perpendicular to :math:`g_h`, which a step off a saddle
  along a flat direction of the model needs.
* With bounds the step then goes through the reflective selection of
  :mod:`.trf` (cut-back, reflected and anti-gradient steps), whose quadratic
  models are evaluated by products.

The same rule runs with dense Jacobians (scipy accepts ``tr_solver='lsmr'``
for them too); the Gram matrix and SVD of the 'exact' solver are never
formed. ``tr_options`` are LSMR's: ``atol``, ``btol``, ``conlim``,
``maxiter`` (for LSMR itself), ``damp`` and ``regularize`` (for the step).
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm

from ..._blas_threads import serial_torch
from ..bounds import make_strictly_feasible
from ..lsmr import BREAKDOWN, lsmr
from ..operator import JacobianOperator, StackedOperator, as_operator
from ..problem import Problem
from ..quadratic import build_quadratic_1d, minimize_quadratic_1d
from ._common import flag_singular, initial_scale
from .trf import TRF, TRFTrial, _coleman_li, select_step

#: the keyword options of LSMR that ``tr_options`` may carry
LSMR_KEYS = ("atol", "btol", "conlim", "maxiter", "x0", "show")


def lsmr_keywords(options: dict | None, method: str, bounded: bool) -> tuple[dict, float, bool]:
    """Split ``tr_options`` into LSMR's keywords, ``damp`` and ``regularize``.

    As scipy 1.17: unbounded 'trf' takes ``damp`` and ``regularize`` for the
    step; bounded 'trf' takes ``regularize`` and hands ``damp`` to LSMR (on
    the stacked operator); 'dogbox' hands everything to LSMR (the frontend
    drops ``regularize`` for it with scipy's warning). Unknown keys get
    scipy's error (its ``lsmr`` refuses them); ``show=True`` (LSMR's printed
    log) is not available.

    Returns
    -------
    (keywords, damp, regularize)
        ``damp`` is 0 when it goes to LSMR among the keywords.
    """
    opts = dict(options or {})
    damp, regularize = 0.0, True
    if method == "trf":
        regularize = bool(opts.pop("regularize", True))
        if not bounded:
            damp = float(opts.pop("damp", 0.0))
    else:
        opts.pop("regularize", None)
    for key in opts:
        if key not in LSMR_KEYS and key != "damp":
            raise TypeError(f"lsmr() got an unexpected keyword argument '{key}'")
    if opts.pop("show", False):
        raise ValueError("`tr_options` key 'show' (LSMR's printed log) is not supported by "
                         "torchimize_scipy.")
    return opts, damp, regularize


def run_lsmr(A, b: Tensor, keywords: dict, damp: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """LSMR's solution for the rows of a step rule, ``(B, n)``; ``x0`` broadcast if given.

    Returns the solution and a ``(B,)`` mask of the problems whose LSMR broke
    down (non-finite products): the rule stops those as singular.
    """
    kw = dict(keywords)
    if "damp" in kw:
        damp = kw.pop("damp")
    x0 = kw.pop("x0", None)
    if x0 is not None:
        x0 = torch.as_tensor(x0, dtype=b.dtype, device=b.device).expand(b.shape[0], A.shape[2])
    res = lsmr(A, b, damp=damp, x0=x0, **kw)
    return res.x, res.istop == BREAKDOWN


def host_sparse(state: dict) -> bool:
    """Whether the rows' Jacobian is a sparse one whose products run on the host helpers.

    Then the step rule's own torch work runs with this thread's torch count
    at 1 (:func:`~torchimize_scipy._blas_threads.serial_torch`): the products
    have their own threads, and a torch parallel region over the long vectors
    would leave its OpenMP worker spinning on the core they need.
    """
    J = state["J"]
    return isinstance(J, JacobianOperator) and J.sparse_on_host


def _newton_2d(B_S: Tensor, g_S: Tensor) -> tuple[Tensor, Tensor]:
    """``-B^{-1} g`` for symmetric ``B_S (k, 2, 2)`` by the 2x2 Cholesky factor, in closed form.

    Returns the Newton point ``(k, 2)`` and the mask of positive definite
    ``B`` (both pivots positive, the test of LAPACK's ``potrf``); elsewhere the
    point is not used. Closed form rather than a LAPACK call: a batched
    factorisation of 2x2 matrices costs far more in the call than in the
    arithmetic.
    """
    a, b, c = B_S[:, 0, 0], B_S[:, 0, 1], B_S[:, 1, 1]
    g0, g1 = g_S[:, 0], g_S[:, 1]
    l11 = torch.sqrt(a.clamp(min=0))
    l21 = b / torch.where(l11 > 0, l11, 1.0)
    d = c - l21 * l21
    pd = (a > 0) & (d > 0)
    l11 = torch.where(pd, l11, 1.0)
    l22 = torch.where(pd, torch.sqrt(d.clamp(min=0)), 1.0)
    y1 = -g0 / l11  # L y = -g, then L^T p = y
    y2 = (-g1 - l21 * y1) / l22
    p1 = y2 / l22
    p0 = (y1 - l21 * p1) / l11
    return torch.stack([p0, p1], dim=-1), pd


def _gram(JS: Tensor) -> Tensor:
    """``JS^T JS`` for ``JS (B, m, 2)``: ``(B, 2, 2)``.

    On the CPU in numpy's own sum-of-products loop on this thread (``einsum``,
    no BLAS): a threaded matrix product over the ``m`` residuals would open a
    parallel region of torch's threads (left spinning beside the products'
    helper thread as LSMR's products start) for four numbers.
    """
    if JS.device.type == "cpu" and not JS.requires_grad:
        a = JS.numpy()
        return torch.from_numpy(np.einsum("bmi,bmj->bij", a, a))
    return JS.transpose(-1, -2) @ JS


def _orthonormal_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal basis ``(k, n, 2)`` of ``{a, b}`` (rows of ``(k, n)``) and ``|R_22|``, ``(k,)``.

    Gram-Schmidt with one reorthogonalisation of the second vector ("twice
    is enough": L. Giraud, J. Langou and M. Rozloznik, Comput. Math. Appl.
    50, 2005), which makes it orthogonal to working precision like
    Householder QR, without a LAPACK call per outer iteration. ``|R_22|``,
    the part of ``b`` orthogonal to ``a``, tells a ``b`` along ``a``. A zero
    vector gives a zero basis vector.
    """
    r11 = vnorm(a, dim=-1, keepdim=True)
    q1 = a / torch.where(r11 > 0, r11, 1.0)
    w = b - (q1 * b).sum(-1, keepdim=True) * q1
    w = w - (q1 * w).sum(-1, keepdim=True) * q1
    r22 = vnorm(w, dim=-1, keepdim=True)
    q2 = w / torch.where(r22 > 0, r22, 1.0)
    return torch.stack([q1, q2], dim=-1), r22.squeeze(-1)


def solve_trust_region_2d(B_S: Tensor, g_S: Tensor, delta: Tensor) -> Tensor:
    r"""The 2-D trust-region problem: least :math:`\tfrac12 p^\top B p + g^\top p`, |p| <= delta.

    ``B_S (k, 2, 2)`` symmetric, ``g_S (k, 2)``, ``delta (k,)``. Where
    :math:`B` is positive definite (Cholesky) and the Newton point lies
    inside, it is the answer. Otherwise the minimum is on the circle: with
    :math:`p = \Delta\,(2t, 1 - t^2)/(1 + t^2)` the stationarity condition is
    a quartic in :math:`t` whose real roots (eigenvalues of its companion
    matrix with zero imaginary part) are the candidates, the point
    :math:`t = \infty`, :math:`p = (0, -\Delta)`, included; the one of least
    model value wins.
    """
    k = B_S.shape[0]
    p_newton, pd = _newton_2d(B_S, g_S)
    inside = pd & ((p_newton * p_newton).sum(-1) <= delta * delta)

    d2 = delta * delta
    a, b, c = B_S[:, 0, 0] * d2, B_S[:, 0, 1] * d2, B_S[:, 1, 1] * d2
    d, f = g_S[:, 0] * delta, g_S[:, 1] * delta
    coeffs = torch.stack([-b + d, 2 * (a - c + f), 6 * b, 2 * (-a + c + f), -b - d], dim=-1)
    lead = coeffs[:, 0]
    # a vanishing leading coefficient sends a root to t = inf (the point p = (0, -delta),
    # a candidate anyway): a tiny one keeps the companion matrix defined
    tiny = torch.finfo(B_S.dtype).eps * coeffs.abs().amax(-1)
    lead = torch.where(lead == 0, torch.where(tiny > 0, tiny, 1.0), lead)
    comp = torch.zeros(k, 4, 4, dtype=B_S.dtype, device=B_S.device)
    comp[:, 0, :] = -coeffs[:, 1:] / lead.unsqueeze(-1)
    comp[:, 1, 0] = comp[:, 2, 1] = comp[:, 3, 2] = 1.0
    comp = torch.nan_to_num(comp, nan=0.0, posinf=0.0, neginf=0.0)
    roots = torch.linalg.eigvals(comp)
    real = roots.imag == 0
    t = torch.where(real, roots.real, torch.zeros_like(roots.real))
    den = 1 + t * t
    px = torch.cat([delta.unsqueeze(-1) * 2 * t / den, torch.zeros_like(delta).unsqueeze(-1)], -1)
    py = torch.cat([delta.unsqueeze(-1) * (1 - t * t) / den, -delta.unsqueeze(-1)], -1)
    value = (0.5 * (B_S[:, 0, 0, None] * px * px + 2 * B_S[:, 0, 1, None] * px * py
                    + B_S[:, 1, 1, None] * py * py) + g_S[:, 0, None] * px + g_S[:, 1, None] * py)
    usable = torch.cat([real, torch.ones_like(real[:, :1])], -1)
    value = torch.where(usable & torch.isfinite(value), value, float("inf"))
    i = torch.argmin(value, dim=-1, keepdim=True)
    p_circle = torch.stack([px.gather(-1, i).squeeze(-1), py.gather(-1, i).squeeze(-1)], -1)
    return torch.where(inside.unsqueeze(-1), p_newton, p_circle)


class TRFLSMR(TRF):
    """'trf' with the LSMR subspace step (``tr_solver='lsmr'``)."""

    state_keys = frozenset({
        "delta",  # trust radius (scaled variables)
        "alpha",  # always 0: no Levenberg-Marquardt parameter (TRF.assess_trial reads it)
        "tr_scaling",  # D = diag(v^(1/2) * x_scale): scaled variables are x / D
        "diag_h",  # the Coleman-Li term g * dv * x_scale
        "g_h",  # the scaled gradient D g
        "theta",  # how close to the bounds a cut-back step may go
        "coleman_li_v", "coleman_li_dv",  # bounded: Coleman-Li v, dv of the outer iteration
        "sub_S",  # (B, n, 2) orthonormal basis of the subspace {g_h, LSMR step}
        "sub_B",  # (B, 2, 2) the model's matrix in it
        "sub_g",  # (B, 2) the model's gradient in it
    })

    def __init__(self, tr_options: dict | None = None, bounded: bool = False) -> None:
        self.keywords, self.damp, self.regularize = lsmr_keywords(tr_options, "trf", bounded)

    def init_state(self, problem: Problem, state: dict) -> None:
        initial_scale(problem, state)
        x = state["x"]
        if problem.bounded:
            v, dv = _coleman_li(state)
            v = torch.where(dv != 0, v * state["scale_inv"], v)
            delta = vnorm(x * state["scale_inv"] / v.sqrt(), dim=-1)
        else:
            delta = vnorm(x * state["scale_inv"], dim=-1)
        state["delta"] = torch.where(delta == 0, torch.ones_like(delta), delta)
        state["alpha"] = torch.zeros_like(delta)  # no Levenberg-Marquardt parameter here
        state["tr_scaling"] = torch.ones_like(x)
        state["diag_h"] = torch.zeros_like(x)
        state["g_h"] = torch.zeros_like(x)
        state["theta"] = torch.zeros_like(delta)
        B = x.shape[0]
        state["sub_S"] = x.new_zeros(B, x.shape[1], 2)
        state["sub_B"] = x.new_zeros(B, 2, 2)
        state["sub_g"] = x.new_zeros(B, 2)
        if problem.bounded:
            state["coleman_li_v"] = torch.ones_like(x)
            state["coleman_li_dv"] = torch.zeros_like(x)

    def build_model(self, problem: Problem, state: dict) -> None:
        with serial_torch(state["x"].device) if host_sparse(state) else nullcontext():
            self._build_model(problem, state)

    def _build_model(self, problem: Problem, state: dict) -> None:
        g = state["g"]
        if problem.bounded:
            v, dv = state["coleman_li_v"], state["coleman_li_dv"]
            v = torch.where(dv != 0, v * state["scale_inv"], v)
            d = v.sqrt() * state["scale"]
            diag_h = g * dv * state["scale"]
            state["theta"] = torch.clamp(1 - state["optimality"], min=0.995)
        else:
            d = state["scale"]
            diag_h = None
        g_h = d * g
        state["tr_scaling"], state["g_h"] = d, g_h
        if diag_h is not None:
            state["diag_h"] = diag_h
        J_h = as_operator(state["J"]).scale_columns(d)
        delta = state["delta"]
        reg = torch.zeros_like(delta)
        if self.regularize:
            a, b, _ = build_quadratic_1d(J_h, None, g_h, -g_h, diag=diag_h)
            g_norm = vnorm(g_h, dim=-1)
            to_tr = torch.where(g_norm > 0, delta / torch.where(g_norm > 0, g_norm, 1.0), 0.0)
            _, ag_value = minimize_quadratic_1d(a, b, torch.zeros_like(to_tr), to_tr)
            reg = -ag_value / (delta * delta)
        f = state["f"]
        if diag_h is not None:
            A = StackedOperator(J_h, (diag_h + reg.unsqueeze(-1)).clamp(min=0).sqrt())
            gn_h, broke = run_lsmr(A, torch.cat([f, torch.zeros_like(g)], -1), self.keywords)
        else:
            gn_h, broke = run_lsmr(J_h, f, self.keywords, damp=(self.damp ** 2 + reg).sqrt())
        S, r22 = _orthonormal_pair(g_h, gn_h)
        # gn_h along g_h (LSMR stopped after one iteration, whose iterate is a multiple
        # of the gradient): the second basis vector would be rounding noise, a random
        # direction; the next Krylov vector, the model's Hessian times g_h, takes its place
        tiny = 64 * torch.finfo(g.dtype).eps * vnorm(gn_h, dim=-1)
        collinear = r22 <= tiny
        if g_h.shape[-1] == 2 and bool(collinear.any()):
            # n = 2: the plane is the whole space, as scipy's QR of the two vectors completes
            # it (g_h an eigenvector of a flat model, at a saddle, needs the other direction)
            q1 = S[..., 0]
            # (turned as LAPACK's Householder QR turns it: the sign of g_h's first entry)
            turn = torch.where(q1[..., :1] >= 0, 1.0, -1.0)
            perp = torch.stack([-q1[..., 1], q1[..., 0]], -1) * turn
            S = torch.stack([q1, torch.where(collinear.unsqueeze(-1), perp, S[..., 1])], -1)
        elif bool(collinear.any()):
            Hg = J_h.rmatvec(J_h.matvec(g_h))
            if diag_h is not None:
                Hg = Hg + diag_h * g_h
            second = torch.where(collinear.unsqueeze(-1), Hg, gn_h)
            S, r22 = _orthonormal_pair(g_h, second)
            # still along g_h (g_h an eigenvector of the Hessian): the model is 1-D
            flat = r22 <= 64 * torch.finfo(g.dtype).eps * vnorm(second, dim=-1)
            S = torch.cat([S[..., :1], torch.where(flat.view(-1, 1, 1), 0.0, S[..., 1:])], -1)
        B_S = _gram(J_h.matmat(S))
        if diag_h is not None:
            B_S = B_S + S.transpose(-1, -2) @ (diag_h.unsqueeze(-1) * S)
        g_S = (S * g_h.unsqueeze(-1)).sum(-2)
        state["sub_S"], state["sub_B"], state["sub_g"] = S, B_S, g_S
        ok = torch.isfinite(B_S).flatten(1).all(-1) & torch.isfinite(S).flatten(1).all(-1)
        ok = ok & ~broke
        flag_singular(state, ok)

    def propose_step(self, problem: Problem, state: dict) -> TRFTrial:
        with serial_torch(state["x"].device) if host_sparse(state) else nullcontext():
            return self._propose_step(problem, state)

    def _propose_step(self, problem: Problem, state: dict) -> TRFTrial:
        S, B_S, g_S = state["sub_S"], state["sub_B"], state["sub_g"]
        p_S = solve_trust_region_2d(B_S, g_S, state["delta"])
        p_h = (S * p_S.unsqueeze(-2)).sum(-1)
        d = state["tr_scaling"]
        if problem.bounded:
            view = dict(state)
            view["J"] = as_operator(state["J"])
            view["G"] = None
            step, step_h, predicted = select_step(view, p_h, state["diag_h"])
            x_new = make_strictly_feasible(state["x"] + step, state["lb"], state["ub"], rstep=0)
        else:
            step_h = p_h
            step = d * p_h
            # the model in the subspace: p_h = S p_S exactly
            Bp = (B_S * p_S.unsqueeze(-2)).sum(-1)
            predicted = -(0.5 * (p_S * Bp).sum(-1) + (g_S * p_S).sum(-1))
            x_new = state["x"] + step
        return TRFTrial(x_new, vnorm(step, dim=-1), vnorm(step_h, dim=-1), predicted,
                        state["alpha"])
