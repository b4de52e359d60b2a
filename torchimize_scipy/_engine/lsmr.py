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

Batching: every scalar of the recurrences is one entry per problem, kept
where it is cheapest (:mod:`.lsmr_scalars`: numpy arrays on the host, one
problem's ``numpy.float64`` scalars, or tensors on a device), and the vector
work runs on numpy arrays on the host or on tensors elsewhere
(:mod:`.lsmr_vectors`). The recurrence below is written once, against
``xp`` (the scalars' functions) and ``vx`` (the vectors'). On the host no
torch operation runs per iteration, and with a sparse Jacobian cut into
several row blocks the next iteration's ``A v`` starts on the products'
helper threads (:mod:`.csr`) as soon as ``v`` is known, while this thread
updates the scalars, ``x`` and the search directions (the values are those
of the product made later, bit for bit; a problem that stops has that
product's rows discarded as it is frozen anyway). For one problem that
product, ``A v - alpha u`` formed in its row blocks, is written straight into
the buffer the next ``u`` takes (u's current one, the spare once the new
``u`` is taken): no copy of a product buffer per iteration. The vector work per
iteration is the two products, three norms, two scalings and five updates
``y - c x`` (a multiplication and a subtraction each: a fused ``addcmul``
rounds differently with the batch size, and a problem's result must not
depend on its neighbours).

A problem that has stopped is frozen: its vectors and scalars are kept by
``where`` while the others go on (skipped while every problem runs), so its
result does not depend on its neighbours or on ``check_every``. A problem
whose residual estimate or iterate norm becomes non-finite (a breakdown, e.g.
from a non-finite product) stops alone with ``istop = -1`` and keeps its last
finite iterate.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .lsmr_scalars import FloatScalars, Scalars, sym_ortho
from .lsmr_vectors import DeviceVectors, HostVectors, Vector
from .operator import JacobianOperator, as_operator

__all__ = ["BREAKDOWN", "LSMRResult", "lsmr", "sym_ortho"]

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



#: rows of the packed scalar state of :func:`lsmr`, ``(K, B)``
_KEYS = ("alpha", "beta", "zetabar", "alphabar", "rho", "rhobar", "cbar", "sbar", "betadd",
         "betad", "rhodold", "tautildeold", "thetatilde", "zeta", "d", "normA2", "maxrbar",
         "minrbar", "normA", "condA", "normx", "normr", "normar")
_NORMA, _CONDA, _NORMX, _NORMR, _NORMAR = (_KEYS.index(k) for k in
                                           ("normA", "condA", "normx", "normr", "normar"))



@torch.no_grad()
def lsmr(A: Any, b: Tensor, damp: float | Tensor = 0.0, atol: float = 1e-6, btol: float = 1e-6,
         conlim: float = 1e8, maxiter: int | None = None, x0: Tensor | None = None,
         check_every: int | None = None, host_scalars: bool | None = None,
         _floats: bool | None = None) -> LSMRResult:
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
        Iterations between the host's checks of "all stopped" when the
        vectors are not on the CPU (default 8; on the CPU the scalars live on
        the host and every iteration is checked for free). Stopped problems
        are frozen in between, so the results do not depend on it.
    host_scalars : bool, optional
        Keep the scalars on the host as numpy arrays (default: when ``b`` is
        on the CPU) or as tensors beside the vectors (default elsewhere). Both
        run the same recurrence; the choice exists for the tests. One float64
        problem on the host keeps them as ``numpy.float64`` scalars
        (``_floats=False``, for the tests, keeps arrays of one entry).

    Returns
    -------
    LSMRResult
    """
    if isinstance(A, Tensor):
        A = as_operator(A)
    if isinstance(A, JacobianOperator):
        A = A.folded()  # a sparse matrix's scalings into its values: none per product
    B, m, n = A.shape
    dtype, dev = b.dtype, b.device
    if maxiter is None:
        maxiter = min(m, n)
    host = dev.type == "cpu" if host_scalars is None else bool(host_scalars)
    if host and dev.type != "cpu":
        raise ValueError("host scalars need the vectors on the CPU")
    if check_every is None or host:
        check_every = 1 if host else 8
    if host and B == 1 and dtype == torch.float64 and _floats is not False:
        sc: Any = FloatScalars(dtype)  # one problem: plain float64 scalars, cheapest of all
    else:
        sc = Scalars(host, B, dtype, dev)
    xp = sc.xp
    damp = sc.per_problem(damp)
    atol = sc.per_problem(atol)
    btol = sc.per_problem(btol)
    ctol = 1.0 / conlim if conlim > 0 else 0.0

    vx: Any = HostVectors(A, dtype) if host else DeviceVectors(A, dtype, dev)
    b = vx.from_tensor(b)
    normb = sc.norm(b)
    if x0 is None:
        x = vx.zeros(B, n)
        u = b
    else:
        x = vx.copy(x0.to(dtype))
        u = b - vx.product(True, x)
    beta = sc.norm(u)
    u = u * sc.coef(sc.inverse(beta))
    v = vx.product(False, u)
    if not sc.all(beta > 0):
        v = vx.where(sc.mask(beta > 0), v, 0.0)
    alpha = sc.norm(v)
    v = v * sc.coef(sc.inverse(alpha))

    zero = sc.full(0.0)
    one = sc.full(1.0)
    # the scalars of the recurrences, one row of (K, B) each (order: _KEYS)
    s = xp.stack([alpha, beta, alpha * beta, alpha, one, one, one, zero, beta, zero, one, zero,
                  zero, zero, zero, alpha * alpha, zero,
                  sc.full(min(1e100, float(torch.finfo(dtype).max))), xp.sqrt(alpha * alpha),
                  one, zero, beta, alpha * beta])
    h = vx.copy(v)  # h and v must not share memory: both are updated through buffers
    hbar = vx.zeros(B, n)
    istop = sc.zeros_int()
    itn = sc.zeros_int()
    # b = 0: x = 0 is exact (also with x0); A^T b = 0: the start is exact
    if not sc.all(normb != 0):
        x = vx.where(sc.mask(normb != 0), x, 0.0)
    active = (s[_NORMAR] != 0) & (normb != 0)
    safe_normb = xp.where(normb > 0, normb, 1.0)
    inf = sc.full(float("inf"))

    # the vectors, each with a spare buffer the next value is written into
    x, u, v, h, hbar = (Vector(t, vx) for t in (x, u, v, h, hbar))
    tm = vx.empty(B, m)  # c * u
    tn = vx.empty(B, n)  # c * (v, hbar, h)
    sub, mul, add = vx.sub, vx.mul, vx.add
    # numpy's warnings for the branches where() discards (the torch path has none)
    quiet = np.errstate(all="ignore") if host else contextlib.nullcontext()
    pending = None  # J v of the next iteration, started while the scalars are updated
    with quiet:
        k = 0
        while k < maxiter:
            if k % check_every == 0 and not sc.any(active):
                break
            k += 1
            (alpha_o, _, zetabar_o, alphabar_o, rho_o, rhobar_o, cbar_o, sbar_o, betadd_o, betad_o,
             rhodold_o, tautildeold_o, thetatilde_o, zeta_o, d_o, normA2_o, maxrbar_o, minrbar_o,
             *_) = s if host else s.unbind(0)
            # ---- Golub-Kahan bidiagonalisation step ---------------------------------
            # (every vector update writes into a spare buffer of ours: no allocation and
            # no page faults for long vectors, never into a caller's array)
            u_new = vx.product_sub(True, v.cur, sc.coef(alpha_o), u.cur, u.spare, tm, pending)
            pending = None
            beta = sc.norm(u_new)
            go = beta > 0
            inv_beta = sc.coef(sc.inverse(beta))
            vx.scale_(u_new, inv_beta)
            # (A^T u_new: on the host's sparse path A^T of the unscaled u, times inv_beta)
            v_new = vx.product_sub(False, u_new, sc.coef(beta), v.cur, v.spare, tn,
                                   scale=inv_beta)
            alpha_new = sc.norm(v_new)
            vx.scale_(v_new, sc.coef(sc.inverse(alpha_new)))
            if not sc.all(go):  # beta = 0: v and alpha stay (the reference implementation)
                v_new = vx.where(sc.mask(go), v_new, v.cur)
            alpha = xp.where(go, alpha_new, alpha_o)
            if k < maxiter:
                # the next iteration's A v, on the helper threads while this thread updates the
                # scalars and x: v_new becomes v of every problem that goes on (the rows
                # of the others are discarded by the freezing below, as usual)
                # (the product formed into u's current buffer, the spare once u_new is taken:
                # where the next iteration's u is written, so that no copy is made)
                pending = vx.start_forward(v_new, u_new, sc.coef(alpha), u.cur)
            # ---- rotation eliminating the damping, then the subdiagonal beta ---------
            chat, shat, alphahat = sym_ortho(alphabar_o, damp)
            c, sn, rho = sym_ortho(alphahat, beta)
            thetanew = sn * alpha
            alphabar = c * alpha
            # ---- rotation of the second QR factorisation ------------------------------
            thetabar = sbar_o * rho
            rhotemp = cbar_o * rho
            cbar, sbar, rhobar = sym_ortho(rhotemp, thetanew)
            zeta = cbar * zetabar_o
            zetabar = -sbar * zetabar_o
            # ---- update of h, hbar and x ------------------------------------------------
            c_hbar, c_x, c_h = sc.coefs(thetabar * rho / (rho_o * rhobar_o),
                                        zeta / (rho * rhobar), thetanew / rho)
            hbar_new = sub(h.cur, mul(hbar.cur, c_hbar, out=tn), out=hbar.spare)
            x_new = add(x.cur, mul(hbar_new, c_x, out=tn), out=x.spare)
            h_new = sub(v_new, mul(h.cur, c_h, out=tn), out=h.spare)
            normx = sc.norm(x_new)
            # ---- estimate of |r| (section 5.2 of the paper) -----------------------------
            betaacute = chat * betadd_o
            betacheck = -shat * betadd_o
            betahat = c * betaacute
            betadd = -sn * betaacute
            ctildeold, stildeold, rhotildeold = sym_ortho(rhodold_o, thetabar)
            thetatilde = stildeold * rhobar
            rhodold = ctildeold * rhobar
            betad = -stildeold * betad_o + ctildeold * betahat
            tautildeold = (zeta_o - thetatilde_o * tautildeold_o) / rhotildeold
            taud = (zeta - thetatilde * tautildeold) / rhodold
            d = d_o + betacheck * betacheck
            normr = xp.sqrt(d + (betad - taud) ** 2 + betadd * betadd)
            # ---- estimates of |A| and cond(A) ---------------------------------------------
            normA2 = normA2_o + beta * beta
            normA = xp.sqrt(normA2)
            normA2 = normA2 + alpha * alpha
            maxrbar = xp.maximum(maxrbar_o, rhobar_o)
            minrbar = minrbar_o if k == 1 else xp.minimum(minrbar_o, rhobar_o)
            condA = xp.maximum(maxrbar, rhotemp) / xp.minimum(minrbar, rhotemp)
            normar = xp.abs(zetabar)

            # ---- stopping rules -------------------------------------------------------------
            test1 = normr / safe_normb
            an_r = normA * normr
            test2 = xp.where(an_r != 0, normar / xp.where(an_r != 0, an_r, 1.0), inf)
            test3 = 1.0 / condA
            ax = normA * normx / safe_normb
            t1 = test1 / (1 + ax)
            rtol = btol + atol * ax
            stop = sc.zeros_int()
            # later rules win, as in the reference implementation
            for code, hit in ((7, itn + 1 >= maxiter), (6, 1 + test3 <= 1), (5, 1 + test2 <= 1),
                              (4, 1 + t1 <= 1), (3, test3 <= ctol), (2, test2 <= atol),
                              (1, test1 <= rtol)):
                stop = xp.where(hit, code, stop)

            finite = xp.isfinite(normr) & xp.isfinite(normx)
            commit = active & finite
            new = xp.stack([alpha, beta, zetabar, alphabar, rho, rhobar, cbar, sbar, betadd, betad,
                            rhodold, tautildeold, thetatilde, zeta, d, normA2, maxrbar, minrbar,
                            normA, condA, normx, normr, normar])
            if sc.all(commit):
                s = new
                for vec, value in ((x, x_new), (u, u_new), (v, v_new), (h, h_new),
                                   (hbar, hbar_new)):
                    vec.take(value)
            else:
                if pending is not None and getattr(pending, "out", None) is u.cur:
                    pending.wait()  # it writes u's current buffer (one problem, which stops)
                    pending = None
                s = xp.where(commit, new, s)
                c2 = sc.mask(commit)
                for vec, value in ((x, x_new), (u, u_new), (v, v_new), (h, h_new),
                                   (hbar, hbar_new)):
                    vec.take(vx.where(c2, value, vec.cur))
            istop = xp.where(commit, stop,
                             xp.where(active & xp.logical_not(finite), BREAKDOWN, istop))
            itn = itn + active
            active = commit & (stop == 0)
    if pending is not None:  # the solve stopped: the product started ahead is not needed
        pending.wait()
    return LSMRResult(vx.to_tensor(x.cur), sc.tensor(istop), sc.tensor(itn), sc.tensor(s[_NORMR]),
                      sc.tensor(s[_NORMAR]), sc.tensor(s[_NORMA]), sc.tensor(s[_CONDA]),
                      sc.tensor(s[_NORMX]))

