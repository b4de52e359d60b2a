r"""The covariance of the estimate, for B problems at once (torch, or numpy for one).

:math:`\mathrm{Cov}(\hat p) \approx (J^T J)^{-1}`, times the reduced
chi-square :math:`s^2 = \lVert r \rVert^2 / (M - N)` unless
``absolute_sigma`` (Seber & Wild, *Nonlinear Regression*, Wiley 1989, ch. 2).
:math:`(J^T J)^{-1}` as scipy computes it:

* 'trf', 'dogbox' (and 'gn', 'gd'): :func:`svd_pinv`, the Moore-Penrose
  pseudo-inverse from the thin SVD with singular values at most
  :math:`\epsilon \max(M, N) s_1` discarded;
* 'lm': from ``R`` of a QR factorisation, :math:`R^{-1} R^{-T}`
  (:func:`pivoted_inverse` with MINPACK's column pivoting; Businger & Golub,
  Numer. Math. 7, 1965), indeterminate (NaN) where ``R`` has an exactly zero
  diagonal entry.

Batches may first try :func:`normal_inverse`'s shortcut, the inverse of the
small Gram matrix where it is well conditioned. :func:`finish_covariance`
scales, and fills indeterminate covariances with ``inf``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat.numpy as _COMPAT_NUMPY
import array_api_compat.torch as _TORCH_XP
import numpy as np
import torch
from array_api_compat import device

from .._engine.linalg import inverse_and_condition
from .._engine.problem import BMM_NAIVE_TERMS

#: Batches invert ``J^T J`` directly where its 2-norm condition number is at most
#: this (float64: a relative error of about ``eps * 1e6 = 2e-10`` in ``pcov``;
#: float32: ``1e-4 / eps``); the other problems take scipy's factorisation.
PCOV_GRAM_COND_LIMIT = 1e6
#: The warning of an indeterminate covariance (scipy's text).
COV_MSG = "Covariance of the parameters could not be estimated"


#: numpy's namespace here: numpy itself from 2.1 on (an array API namespace for every
#: function used here, without the wrappers' few microseconds per call), else
#: array_api_compat's wrapper of it
_NUMPY_XP: Any = np if hasattr(np, "astype") else _COMPAT_NUMPY


def _namespace(a: Any) -> Any:
    """The array namespace of a tensor or a numpy array, chosen by type (no
    ``array_namespace`` look-up per call: one problem's covariance is a few
    microseconds of arithmetic)."""
    return _TORCH_XP if isinstance(a, torch.Tensor) else _NUMPY_XP


def inverse_from_r(R: Any, back: list[int] | None = None) -> Any:
    """``R^{-1} R^{-T}`` per problem; NaN where ``R`` has an exactly zero diagonal entry.

    ``R (B, N, N)`` is a tensor, or a numpy array (:func:`curve_fit`'s one
    problem): one body over the array's namespace (numpy's own, see :data:`_NUMPY_XP`,
    or ``array_api_compat``'s torch); the
    triangular solve and the product are torch's for both (the same kernels,
    on the numpy array's memory), and the result is of ``R``'s kind. ``back``
    (one problem's numpy ``R`` only): rows and columns taken in that order
    (``cov[back][:, back]``, :func:`pivoted_inverse`).
    """
    xp = _namespace(R)
    B, n = R.shape[0], R.shape[-1]
    # a singular R is replaced by the identity (in R's dtype) for the solve (on the host,
    # where the test is free, only when there is one, found by one test of the diagonal;
    # a device is not read)
    safe = R
    if xp is _TORCH_XP:
        any_singular = True
    elif B == 1:  # (one problem, curve_fit: its few pivots as Python floats; == as nonzero)
        any_singular = 0.0 in R[0].diagonal().tolist()
    else:
        any_singular = not R.diagonal(0, -2, -1).all()
    if any_singular:
        # (methods numpy and torch share, where the namespace's wrapper would cost more)
        singular = (R.diagonal(0, -2, -1) == 0).any(-1)[:, None, None]
        safe = xp.where(singular, xp.eye(n, dtype=R.dtype, device=device(R)), R)
    Rt = safe if xp is _TORCH_XP else torch.from_numpy(safe)
    # (one problem: the identity kept with its batch dimension, no view made per call)
    eye = _identity(n, Rt.dtype, Rt.device, B) if B == 1 else \
        _identity(n, Rt.dtype, Rt.device).expand_as(Rt)
    Rinv = torch.linalg.solve_triangular(Rt, eye, upper=True)
    if xp is not _TORCH_XP and B == 1 and 0 < n and n * n * n < BMM_NAIVE_TERMS:
        # one small problem: Rinv Rinv^T summed on the host in the order of torch's own
        # bmm kernel (each entry over k in order from the first product: the same values
        # as the product below, without matmul's dispatch); in float64 as Python floats
        # (IEEE double arithmetic), its rows and columns taken in the order ``back`` as
        # they are made, in another dtype by numpy's accumulate in that dtype
        if R.dtype == np.float64:
            rows = Rinv.tolist()[0]
            order = range(n) if back is None else back
            cov = np.array([[_running_dot(rows[i], rows[j]) for j in order]
                            for i in order], dtype=np.float64)[None]
            back = None  # (taken)
        else:
            a = Rinv.numpy()[0]
            cov = np.add.accumulate(a[:, None, :] * a[None, :, :], axis=-1)[None, :, :, -1]
    else:
        cov = Rinv @ Rinv.transpose(-1, -2)
        if xp is not _TORCH_XP:
            cov = cov.numpy()
    if back is not None:
        cov = cov[0][back][:, back][None]
    if xp is not _TORCH_XP and not any_singular:  # (known on the host: nothing to fill)
        return cov
    return xp.where(singular, float("nan"), cov)


def _running_dot(u: list[float], v: list[float]) -> float:
    """``sum_k u[k] v[k]`` added in order from the first product (numpy's
    ``add.accumulate``, torch's small ``bmm`` kernel), in Python floats."""
    total = u[0] * v[0]
    for k in range(1, len(u)):
        total = total + u[k] * v[k]
    return total


#: Identity matrices by (size, dtype, device): the right-hand sides of inverse_from_r
#: (read only)
_IDENTITIES: dict[tuple, torch.Tensor] = {}


def _identity(n: int, dtype: torch.dtype, dev: torch.device,
              batch: int | None = None) -> torch.Tensor:
    """The ``(n, n)`` identity (``(batch, n, n)`` copies of it with ``batch``), kept for a
    few sizes, dtypes and devices."""
    key = (n, dtype, str(dev), batch)
    eye = _IDENTITIES.get(key)
    if eye is None:
        eye = torch.eye(n, dtype=dtype, device=dev)
        if batch is not None:
            eye = eye.expand(batch, n, n).contiguous()
        if len(_IDENTITIES) < 64:
            _IDENTITIES[key] = eye
    return eye


def pivoted_inverse(R: Any, perm: Any) -> Any:
    """``P R^{-1} R^{-T} P^T`` from ``J P = Q R`` (column ``k`` of ``R``: variable ``perm[k]``).

    ``R (B, N, N)`` and ``perm (B, N)``: tensors, or numpy arrays (a numpy result).
    """
    if isinstance(R, np.ndarray) and R.shape[0] == 1:
        # one problem: the inverse permutation of its pivots (argsort of a permutation)
        # as a list, its rows and columns taken in that order by inverse_from_r
        back = [0] * R.shape[-1]
        for k, v in enumerate(np.asarray(perm)[0].tolist()):
            back[v] = k  # variable v is column k
        return inverse_from_r(R, back)
    cov = inverse_from_r(R)
    xp = _namespace(cov)
    back = xp.argsort(perm, axis=-1)  # variable i is column back[i]
    problem = xp.arange(cov.shape[0], device=device(cov))[:, None, None]
    return cov[problem, back[:, :, None], back[:, None, :]]


def qr_inverse(J: torch.Tensor) -> torch.Tensor:
    """``(J^T J)^{-1} = R^{-1} R^{-T}`` from ``J = Q R``; NaN where ``R`` is singular."""
    return inverse_from_r(torch.linalg.qr(J, mode="r")[1])


def svd_pinv(J: torch.Tensor) -> torch.Tensor:
    """``(J^T J)^+ = V S^{-2} V^T`` from the thin SVD, small singular values discarded."""
    _, s, Vh = torch.linalg.svd(J, full_matrices=False)
    threshold = torch.finfo(J.dtype).eps * max(J.shape[-2:]) * s[:, :1]
    keep = s > threshold
    inv_s2 = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)) ** 2,
                         torch.zeros_like(s))
    return (Vh.transpose(-1, -2) * inv_s2.unsqueeze(-2)) @ Vh


def normal_inverse(J: torch.Tensor, factorised: Callable[[torch.Tensor], torch.Tensor],
                   gram_first: bool = True) -> torch.Tensor:
    """``(J^T J)^{-1}`` per problem ``(B, N, N)``: ``factorised(J)``, or the Gram inverse first.

    With ``gram_first``, inverting the small Gram matrix costs a fraction of a
    batched SVD or QR of ``J``; for well-conditioned problems the two agree to
    about ``eps * cond(J^T J)``. Rank-deficient, ill-conditioned and
    non-finite problems (and ``M < N``) go through ``factorised``, as scipy
    computes them; a non-finite Jacobian gives a NaN covariance without
    disturbing the others.
    """
    B, m, n = J.shape
    if gram_first:
        G = J.transpose(-1, -2) @ J
        finite = torch.isfinite(G.sum((-2, -1)))
        if not bool(finite.all()):  # keep the inversion away from non-finite rows
            G = torch.where(finite[:, None, None], G,
                            torch.eye(n, dtype=G.dtype, device=G.device))
        limit = min(PCOV_GRAM_COND_LIMIT, 1e-4 / torch.finfo(G.dtype).eps)
        Ginv, cond1 = inverse_and_condition(G)
        cov = 0.5 * (Ginv + Ginv.transpose(-1, -2))
        ok = finite & (cond1 <= limit / n) if m >= n else torch.zeros_like(finite)
    else:
        cov = J.new_zeros(B, n, n)
        ok = torch.zeros(B, dtype=torch.bool, device=J.device)
    if not bool(ok.all()):
        rows = (~ok).nonzero().squeeze(-1)
        Jb = J.index_select(0, rows)
        sub = torch.full((rows.shape[0], n, n), float("nan"), dtype=cov.dtype, device=cov.device)
        good = torch.isfinite(Jb).flatten(1).all(-1)  # a NaN Jacobian gives a NaN covariance
        if bool(good.any()):
            sub[good] = factorised(Jb[good])
        cov = cov.index_copy(0, rows, sub)
    return cov


def finish_covariance(cov: Any, ok: Any, n: int, m: Any, chisq: Any,
                      absolute_sigma: bool) -> tuple[Any, int]:
    """Scale by the reduced chi-square; ``inf`` where indeterminate, NaN where ``~ok``.

    ``cov (B, N, N)`` is ``(J^T J)^{-1}`` (NaN entries: indeterminate),
    ``chisq (B,)`` the sum of squared whitened residuals, ``m`` the number of
    observations, shared or per problem ``(B,)`` (after ``nan_policy='omit'``).
    All arrays are tensors, or all numpy arrays (:func:`curve_fit`'s one
    problem, on the host: the same IEEE operations); one body over their
    namespace (:func:`_namespace`). Returns the covariances
    and how many of the ``ok`` problems are indeterminate (the caller's warning).
    """
    xp = _namespace(cov)
    bad = xp.isnan(cov).reshape(cov.shape[0], -1).any(-1)
    if not absolute_sigma and xp is _NUMPY_XP and isinstance(m, int):
        # one shared count on the host (curve_fit): the same division by the same
        # float64 count, decided in Python
        scale = chisq / (m - n if m > n else 1)
        cov = cov * xp.astype(scale, cov.dtype)[:, None, None]
        if m <= n:
            bad = xp.ones_like(bad)
    elif not absolute_sigma:
        m_t = xp.asarray(m, device=device(cov))  # (shared, or per problem (B,): broadcasts)
        enough = m_t > n
        dof = xp.where(enough, m_t - n, 1)
        scale = chisq / xp.astype(dof, chisq.dtype)
        cov = cov * xp.astype(scale, cov.dtype)[:, None, None]
        bad = bad | ~enough
    if xp is _NUMPY_XP and not bad.any() and ok.all():
        # (on the host, where the tests are free: nothing to fill, the same values)
        return cov, 0
    cov = xp.where(bad[:, None, None], float("inf"), cov)
    cov = xp.where(ok[:, None, None], cov, float("nan"))
    return cov, int((bad & ok).sum())
