r"""LSMR for a batch of least-squares problems, in torch.

D. C.-L. Fong and M. A. Saunders, "LSMR: An iterative algorithm for sparse
least-squares problems", SIAM J. Sci. Comput. 33(5), 2950-2971 (2011).

For every problem ``k`` of the batch, LSMR minimises

.. math:: \lVert A_k x - b_k \rVert^2 + \lambda_k^2 \lVert x \rVert^2

using only the products :math:`A_k v` and :math:`A_k^\top u`. It runs the
Golub-Kahan bidiagonalisation of :math:`A_k` started at :math:`b_k` and chooses
the iterate that makes :math:`\lVert A_k^\top r_k \rVert` minimal over the
Krylov subspace (MINRES on the normal equations), so that
:math:`\lVert A^\top r\rVert` decreases monotonically. Two QR factorisations by
Givens rotations are updated per step: one of the lower bidiagonal matrix
(with the damping folded in) and one of the resulting upper bidiagonal matrix;
the norms used by the stopping rules (:math:`\lVert r\rVert`,
:math:`\lVert A^\top r\rVert`, :math:`\lVert A\rVert_F`, :math:`\mathrm{cond}(A)`)
are estimated from them at no extra product (section 5 of the paper).

Stopping rules (the paper's section 6, with the codes of its reference
implementation, which scipy's ``lsmr`` returns as ``istop``):

== ==========================================================================
0  ``x = 0`` (or ``x0``) is the exact solution: ``b = 0`` or ``A^T b = 0``
1  :math:`\lVert r\rVert \le \mathrm{btol}\,\lVert b\rVert +
   \mathrm{atol}\,\lVert A\rVert\,\lVert x\rVert` (compatible system)
2  :math:`\lVert A^\top r\rVert \le \mathrm{atol}\,\lVert A\rVert\,\lVert r\rVert`
   (least-squares solution)
3  the estimate of :math:`\mathrm{cond}(A)` exceeds ``conlim``
4, 5, 6  as 1, 2, 3 with the tolerances at the machine precision
7  ``maxiter`` iterations
== ==========================================================================

Batching: every scalar of the recurrences is a ``(B,)`` tensor. A problem that
has stopped is frozen: its vectors and scalars are kept by ``torch.where``
while the others go on, so its result does not depend on its neighbours.
A problem whose iterate or residual estimate becomes non-finite (a breakdown,
e.g. from a non-finite product) stops alone with ``istop = -1`` and keeps its
last finite iterate. The loop asks the device whether any problem is still
running only every ``check_every`` iterations (one host synchronisation each).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.linalg import vector_norm as vnorm

from .operator import as_operator

#: ``istop`` of a problem whose iteration produced non-finite values (ours)
BREAKDOWN = -1


class LSMRResult(NamedTuple):
    """What :func:`lsmr` returns, per problem (scipy's tuple, batched).

    Attributes
    ----------
    x : Tensor, shape (B, n)
    istop : Tensor, shape (B,), int64
        Stopping reason (module notes).
    itn : Tensor, shape (B,), int64
        Iterations taken.
    normr, normar, norma, conda, normx : Tensor, shape (B,)
        Estimates of :math:`\\lVert b - Ax\\rVert`, :math:`\\lVert A^\\top(b - Ax)\\rVert`,
        :math:`\\lVert A\\rVert_F`, :math:`\\mathrm{cond}(A)` and
        :math:`\\lVert x\\rVert` (with the damping included in ``A``).
    """

    x: Tensor
    istop: Tensor
    itn: Tensor
    normr: Tensor
    normar: Tensor
    norma: Tensor
    conda: Tensor
    normx: Tensor


def sym_ortho(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Stable Givens rotation ``(c, s, r)`` with ``[c s; -s c] [a; b] = [r; 0]``, batched.

    The division is by the larger of ``|a|`` and ``|b|`` (S.-C. Choi, "Iterative
    methods for singular linear equations and least-squares problems", PhD
    thesis, Stanford 2006, SymOrtho). ``b = 0`` gives ``(sign a, 0, |a|)`` and
    ``a = 0`` gives ``(0, sign b, |b|)``.
    """
    one = torch.ones_like(a)
    b_big = b.abs() > a.abs()
    safe_b = torch.where(b == 0, one, b)
    safe_a = torch.where(a == 0, one, a)
    # |b| > |a|: t = a / b, s = sign(b) / sqrt(1 + t^2), c = s t, r = b / s
    t1 = a / safe_b
    s1 = torch.sign(b) / torch.sqrt(1 + t1 * t1)
    c1 = s1 * t1
    r1 = b / torch.where(s1 == 0, one, s1)
    # otherwise: t = b / a, c = sign(a) / sqrt(1 + t^2), s = c t, r = a / c
    t2 = b / safe_a
    c2 = torch.sign(a) / torch.sqrt(1 + t2 * t2)
    s2 = c2 * t2
    r2 = a / torch.where(c2 == 0, one, c2)
    c = torch.where(b_big, c1, c2)
    s = torch.where(b_big, s1, s2)
    r = torch.where(b_big, r1, r2)
    # exact zeros (also the case a = b = 0, where c = s = r = 0)
    zero = torch.zeros_like(a)
    c = torch.where(b == 0, torch.sign(a), torch.where(a == 0, zero, c))
    s = torch.where(b == 0, zero, torch.where(a == 0, torch.sign(b), s))
    r = torch.where(b == 0, a.abs(), torch.where(a == 0, b.abs(), r))
    return c, s, r


def _per_problem(value: Any, B: int, like: Tensor) -> Tensor:
    """A float or a ``(B,)`` tensor as a ``(B,)`` tensor of ``like``'s dtype/device."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return t.expand(B) if t.ndim == 0 else t


@torch.no_grad()
def lsmr(A: Any, b: Tensor, damp: float | Tensor = 0.0, atol: float = 1e-6, btol: float = 1e-6,
         conlim: float = 1e8, maxiter: int | None = None, x0: Tensor | None = None,
         check_every: int | None = None) -> LSMRResult:
    """Solve ``min |A x - b|^2 + damp^2 |x|^2`` for each problem of a batch.

    Parameters
    ----------
    A : Tensor or linear operator
        ``(B, m, n)``: a dense or sparse COO tensor, a
        :class:`~torchimize_scipy._engine.operator.JacobianOperator`, or any
        object with ``shape``, ``matvec(p (B, n))`` and ``rmatvec(u (B, m))``.
    b : Tensor
        Right-hand sides, ``(B, m)``.
    damp : float or Tensor
        Damping :math:`\\lambda`, one for all problems or ``(B,)``.
    atol, btol : float or Tensor
        Stopping tolerances (module notes); scalars or ``(B,)``.
    conlim : float
        Stop when the condition estimate exceeds it; 0 disables the test.
    maxiter : int, optional
        Iteration limit, ``min(m, n)`` by default.
    x0 : Tensor, optional
        Starting iterate ``(B, n)``; zeros by default.
    check_every : int, optional
        Iterations between host checks of "all stopped" (default 1 on the CPU,
        8 on other devices). Stopped problems are frozen in between, so the
        results do not depend on it.

    Returns
    -------
    LSMRResult
    """
    if isinstance(A, Tensor):
        A = as_operator(A)
    B, m, n = A.shape
    dtype, dev = b.dtype, b.device
    if maxiter is None:
        maxiter = min(m, n)
    if check_every is None:
        check_every = 1 if dev.type == "cpu" else 8
    damp = _per_problem(damp, B, b)
    atol = _per_problem(atol, B, b)
    btol = _per_problem(btol, B, b)
    ctol = 1.0 / conlim if conlim > 0 else 0.0

    def unit(w: Tensor, nrm: Tensor) -> Tensor:
        """``w / nrm`` on rows with ``nrm > 0``, ``w`` elsewhere."""
        pos = nrm > 0
        return torch.where(pos.unsqueeze(-1), w / torch.where(pos, nrm, 1.0).unsqueeze(-1), w)

    normb = vnorm(b, dim=-1)
    if x0 is None:
        x = torch.zeros(B, n, dtype=dtype, device=dev)
        u = b
    else:
        x = x0.to(dtype).clone()
        u = b - A.matvec(x)
    beta = vnorm(u, dim=-1)
    u = unit(u, beta)
    v = torch.where((beta > 0).unsqueeze(-1), A.rmatvec(u), torch.zeros(B, n, dtype=dtype,
                                                                          device=dev))
    alpha = vnorm(v, dim=-1)
    v = unit(v, alpha)

    one = torch.ones(B, dtype=dtype, device=dev)
    zero = torch.zeros(B, dtype=dtype, device=dev)
    s = {  # the scalars of the recurrences, (B,) each
        "alpha": alpha, "beta": beta, "zetabar": alpha * beta, "alphabar": alpha,
        "rho": one, "rhobar": one, "cbar": one, "sbar": zero, "betadd": beta,
        "betad": zero, "rhodold": one, "tautildeold": zero, "thetatilde": zero,
        "zeta": zero, "d": zero, "normA2": alpha * alpha, "maxrbar": zero,
        "minrbar": torch.full((B,), min(1e100, torch.finfo(dtype).max), dtype=dtype,
                              device=dev),
        "normA": alpha.clone(), "condA": one, "normx": zero, "normr": beta,
        "normar": alpha * beta,
    }
    h = v
    hbar = torch.zeros(B, n, dtype=dtype, device=dev)
    istop = torch.zeros(B, dtype=torch.long, device=dev)
    itn = torch.zeros(B, dtype=torch.long, device=dev)
    # b = 0: x = 0 is exact (also with x0); A^T b = 0: the start is exact
    x = torch.where((normb == 0).unsqueeze(-1), torch.zeros_like(x), x)
    active = (s["normar"] != 0) & (normb != 0)
    safe_normb = torch.where(normb > 0, normb, 1.0)

    k = 0
    while k < maxiter:
        if k % check_every == 0 and not bool(active.any()):
            break
        k += 1
        S = s
        # ---- Golub-Kahan bidiagonalisation step ---------------------------------
        u_new = A.matvec(v) - S["alpha"].unsqueeze(-1) * u
        beta = vnorm(u_new, dim=-1)
        go = beta > 0
        u_new = unit(u_new, beta)
        v_new = A.rmatvec(u_new) - beta.unsqueeze(-1) * v
        alpha_new = vnorm(v_new, dim=-1)
        v_new = torch.where(go.unsqueeze(-1), unit(v_new, alpha_new), v)
        alpha = torch.where(go, alpha_new, S["alpha"])

        # ---- rotation eliminating the damping, then the subdiagonal beta ---------
        chat, shat, alphahat = sym_ortho(S["alphabar"], damp)
        c, sn, rho = sym_ortho(alphahat, beta)
        thetanew = sn * alpha
        alphabar = c * alpha
        # ---- rotation of the second QR factorisation ------------------------------
        thetabar = S["sbar"] * rho
        rhotemp = S["cbar"] * rho
        cbar, sbar, rhobar = sym_ortho(S["cbar"] * rho, thetanew)
        zeta = cbar * S["zetabar"]
        zetabar = -sbar * S["zetabar"]
        # ---- update of h, hbar and x ------------------------------------------------
        coef = (thetabar * rho / (S["rho"] * S["rhobar"])).unsqueeze(-1)
        hbar_new = h - coef * hbar
        x_new = x + (zeta / (rho * rhobar)).unsqueeze(-1) * hbar_new
        h_new = v_new - (thetanew / rho).unsqueeze(-1) * h
        # ---- estimate of |r| (section 5.2 of the paper) -----------------------------
        betaacute = chat * S["betadd"]
        betacheck = -shat * S["betadd"]
        betahat = c * betaacute
        betadd = -sn * betaacute
        ctildeold, stildeold, rhotildeold = sym_ortho(S["rhodold"], thetabar)
        thetatilde = stildeold * rhobar
        rhodold = ctildeold * rhobar
        betad = -stildeold * S["betad"] + ctildeold * betahat
        tautildeold = (S["zeta"] - S["thetatilde"] * S["tautildeold"]) / rhotildeold
        taud = (zeta - thetatilde * tautildeold) / rhodold
        d = S["d"] + betacheck * betacheck
        normr = torch.sqrt(d + (betad - taud) ** 2 + betadd * betadd)
        # ---- estimates of |A| and cond(A) ---------------------------------------------
        normA2 = S["normA2"] + beta * beta
        normA = torch.sqrt(normA2)
        normA2 = normA2 + alpha * alpha
        maxrbar = torch.maximum(S["maxrbar"], S["rhobar"])
        minrbar = S["minrbar"] if k == 1 else torch.minimum(S["minrbar"], S["rhobar"])
        condA = torch.maximum(maxrbar, rhotemp) / torch.minimum(minrbar, rhotemp)
        normar = zetabar.abs()
        normx = vnorm(x_new, dim=-1)

        # ---- stopping rules -------------------------------------------------------------
        test1 = normr / safe_normb
        an_r = normA * normr
        test2 = torch.where(an_r != 0, normar / torch.where(an_r != 0, an_r, 1.0),
                            torch.full_like(normr, float("inf")))
        test3 = 1.0 / condA
        t1 = test1 / (1 + normA * normx / safe_normb)
        rtol = btol + atol * normA * normx / safe_normb
        stop = torch.zeros_like(istop)
        # later rules win, as in the reference implementation
        for code, hit in ((7, itn + 1 >= maxiter), (6, 1 + test3 <= 1), (5, 1 + test2 <= 1),
                          (4, 1 + t1 <= 1), (3, test3 <= ctol), (2, test2 <= atol),
                          (1, test1 <= rtol)):
            stop = torch.where(hit, code, stop)

        finite = torch.isfinite(normr) & torch.isfinite(x_new).all(-1)
        commit = active & finite
        broke = active & ~finite
        new = {"alpha": alpha, "beta": beta, "zetabar": zetabar, "alphabar": alphabar,
               "rho": rho, "rhobar": rhobar, "cbar": cbar, "sbar": sbar, "betadd": betadd,
               "betad": betad, "rhodold": rhodold, "tautildeold": tautildeold,
               "thetatilde": thetatilde, "zeta": zeta, "d": d, "normA2": normA2,
               "maxrbar": maxrbar, "minrbar": minrbar, "normA": normA, "condA": condA,
               "normx": normx, "normr": normr, "normar": normar}
        s = {key: torch.where(commit, new[key], S[key]) for key in S}
        c2 = commit.unsqueeze(-1)
        x = torch.where(c2, x_new, x)
        u = torch.where(c2, u_new, u)
        v = torch.where(c2, v_new, v)
        h = torch.where(c2, h_new, h)
        hbar = torch.where(c2, hbar_new, hbar)
        itn = itn + active.long()
        istop = torch.where(commit, stop, torch.where(broke, BREAKDOWN, istop))
        active = commit & (stop == 0)
    return LSMRResult(x, istop, itn, s["normr"], s["normar"], s["normA"], s["condA"],
                      s["normx"])
