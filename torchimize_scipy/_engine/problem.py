"""The static description of one engine run and the per-problem linearisation.

:class:`Problem` holds what does not change during a run: the batched residual
and Jacobian callables, the loss, tolerances and limits. The engine's mutable
state lives in a plain ``dict`` of batch-first tensors (see ``loop.py``).

One float64 problem on the CPU with few residuals and variables (at most
:data:`HOST_SUM_ROWS` and :data:`HOST_SUM_COLS`) takes its cost, ``J^T f``
and ``J^T J`` as host sums in the order torch adds the terms (the same
values, no torch operation but the tensors handed over with their host
values; issue 14): Rosenbrock 'lm', 30 -> 20 engine operations per
evaluation (``benchmarks/bench_ops.py --only-b1``). With more of them, below
:data:`BMM_NAIVE_TERMS` multiply-adds ``m n``, its ``J^T f`` is still summed
on the host in the order of torch's own small ``bmm`` kernel
(:func:`host_transposed_rows`, numpy's ``add.accumulate``; scipy's
``curve_fit`` example, ``m = 50``, ``n = 3``), its ``J^T J`` and cost are
torch's.

With a built-in robust loss, one float64 problem with at most
:data:`HOST_LOSS_ROWS` residuals takes its cost and the loss's scaling of
``J`` and ``f`` on its Python floats (:meth:`LossFunction.host_cost
<torchimize_scipy._loss.LossFunction.host_cost>`, the same values), and
``J^T f``, ``J^T J`` as host sums in the order of torch's own small ``bmm``
kernel (below :data:`BMM_NAIVE_TERMS` multiply-adds): the soft_l1
exponential fit (``m = 15``, ``n = 3``), 27 torch operations of the loss
and products per evaluation to 4 kernels (issue 14).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .._loss import LossFunction, scale_for_robust_loss
from .host_scalars import Scalars, quiet, scalars, sum_of_squares

#: Residuals and variables up to which one float64 problem's cost and ``J^T f``, ``J^T J``
#: are summed on the host (:meth:`Problem.cost`, :meth:`Problem.linearize`): torch's sum
#: over so few entries, and its own ``bmm`` kernel (below 400 multiply-adds per matrix;
#: MKL's ``gemm`` from there on), add the terms one after the other from zero, as these
#: host sums do. Beyond, torch's vectorised reductions and MKL's products group the terms
#: their own way.
HOST_SUM_ROWS = 4
HOST_SUM_COLS = 4

#: Residuals up to which one float64 problem evaluates a built-in robust loss on its
#: Python floats (:meth:`Problem.cost`, :meth:`Problem.linearize`): a pass over a few
#: floats costs less than a dispatched torch operation.
HOST_LOSS_ROWS = 64
#: torch's ``bmm`` multiplies by its own kernel below this many multiply-adds per matrix
#: (``m * n * n`` for ``J^T J``), adding the terms over the rows in order from zero:
#: one problem's robust-loss products are summed the same way on the host below it
#: (:func:`_host_normal_equations`).
BMM_NAIVE_TERMS = 400

#: ``fun(x (k, n), idx (k,)) -> f (k, m)``; ``idx`` names the problem of each row.
BatchedFun = Callable[[Tensor, Tensor], Tensor]
#: ``jac(x (k, n), f (k, m), idx (k,)) -> J (k, m, n)``.
BatchedJac = Callable[[Tensor, Tensor, Tensor], Tensor]


#: MINPACK's default initial step bound factor (``leastsq``'s ``factor``)
LM_FACTOR = 100.0


@dataclass
class Problem:
    """Everything the engine needs that is fixed for a run.

    Attributes
    ----------
    fun, jac
        Batched residuals and Jacobian (see :data:`BatchedFun`, :data:`BatchedJac`).
    m, n
        Number of residuals and of variables.
    loss
        A robust loss object from :mod:`torchimize_scipy._loss`, or None for
        the linear loss.
    ftol, xtol, gtol
        Tolerances (already checked by the frontend; 0 disables a test).
    max_nfev
        Evaluation budget per problem.
    jac_scale
        True for ``x_scale='jac'``.
    bounded
        True when some problem has a finite bound (selects the bounded code
        paths; they reduce to the unbounded ones when all bounds are infinite).
    callback
        ``callback(state_row_dict) -> bool`` called after each iteration of a
        single problem; True stops it with status -2.
    verbose
        0, 1 or 2 as in scipy; the iteration table is printed for ``B == 1``.
    step_length
        Line-search methods only: the length tried first in every outer
        iteration ('gn': fraction of the Gauss-Newton step, default 1; 'gd':
        multiple of the scaled anti-gradient, default adaptive).
    tr_solver
        ``'exact'`` (dense factorisations) or ``'lsmr'`` (products only; the
        rule is one of ``steps/*_lsmr.py``).
    use_gram
        Factorise through the Gram matrix ``J^T J`` (batches) rather than by
        a direct SVD of ``J`` (single problems); see ``linalg.factorize``.
    final_jacobian
        Evaluate the Jacobian at a point accepted by the trial that stops the
        problem (default), for the results ``jac``, ``grad`` and
        ``optimality`` there, as scipy evaluates it after MINPACK returns.
        False skips that evaluation (MINPACK never makes it): those results
        then stay at the previous Jacobian and ``njev`` counts the skipped
        one as made (the 'lm' rule reports it less one); for callers that
        read none of them (``batch_curve_fit``'s 'lm', whose covariance comes
        from MINPACK's last Jacobian).
    evals_per_jacobian
        Residual evaluations that each Jacobian costs against ``max_nfev``
        (0: none). MINPACK's ``lmdif`` (``leastsq`` and so ``curve_fit``'s
        'lm' without ``jac``) counts the ``n`` evaluations of its forward
        differences in ``nfev`` and stops at ``maxfev`` by that count; the 'lm'
        rule then tests ``nfev + evals_per_jacobian * njev``.
    lm_factor
        MINPACK's initial step bound for 'lm': the first radius is
        ``lm_factor * |diag x0|`` (``lm_factor`` where that is 0);
        ``leastsq``'s ``factor``, :data:`LM_FACTOR` by default.
    """

    fun: BatchedFun
    jac: BatchedJac
    m: int
    n: int
    loss: object | None
    ftol: float
    xtol: float
    gtol: float
    max_nfev: int
    jac_scale: bool
    bounded: bool
    callback: Callable[[dict], bool] | None = None
    verbose: int = 0
    use_gram: bool = False
    step_length: float | None = None
    tr_solver: str = "exact"
    final_jacobian: bool = True
    evals_per_jacobian: int = 0
    lm_factor: float = LM_FACTOR

    @property
    def products_only(self) -> bool:
        """``tr_solver='lsmr'``: ``J`` is used through products only (no ``J^T J``)."""
        return self.tr_solver == "lsmr"

    @property
    def cost_proves_finite(self) -> bool:
        """Whether a problem's finite :meth:`cost` proves each of its residuals finite.

        The linear cost ``0.5 * sum(f**2)`` is infinite or NaN when an entry is
        (a square is never negative, so nothing cancels); likewise the robust
        losses whose ``rho`` grows without bound
        (:attr:`~torchimize_scipy._loss.LossFunction.cost_proves_finite`). The
        converse does not hold: a cost may overflow with finite residuals.
        """
        return self.loss is None or getattr(self.loss, "cost_proves_finite", False)

    def cost(self, f: Tensor) -> Tensor:
        """Cost ``0.5 * sum(rho(f**2))`` per problem, ``(B,)``."""
        if self.loss is None:
            if f.shape[-1] <= HOST_SUM_ROWS and not f.requires_grad:
                hs = scalars(f)
                if hs.floats:  # one float64 problem: its few squares summed on the host
                    # (the squares added in order: torch's order for so few entries)
                    total = sum_of_squares(hs.view(f)[0][0].tolist())
                    return hs.tensors(np.float64(0.5 * total))[0]
            if self.products_only and f.device.type == "cpu" and f.dtype == torch.float64 \
                    and not f.requires_grad:  # numpy on this thread: no torch parallel region
                a = f.numpy()  # beside the sparse products' helper threads (trf_lsmr)
                return torch.from_numpy(0.5 * np.einsum("ij,ij->i", a, a))
            return 0.5 * (f * f).sum(-1)
        hs = self._host_loss(f)
        if hs is not None:  # one float64 problem: the loss on its floats (the same value)
            return hs.tensors(np.float64(self.loss.host_cost(f, hs.view(f)[0][0].tolist())))[0]
        return self.loss.cost(f)

    def _host_loss(self, f: Tensor, J: Tensor | None = None) -> Scalars | None:
        """The :class:`~.host_scalars.Scalars` of one float64 problem's residuals ``f``
        (and Jacobian ``J``) whose robust loss is evaluated on the host
        (:meth:`~torchimize_scipy._loss.LossFunction.host_cost`), or None: a
        built-in loss with a scalar ``f_scale``, no autograd, at most
        :data:`HOST_LOSS_ROWS` residuals, a strided ``J``."""
        loss = self.loss
        if not isinstance(loss, LossFunction) or not loss.host_capable \
                or f.requires_grad or f.shape[-1] > HOST_LOSS_ROWS:
            return None
        if J is not None and (J.requires_grad or J.layout != torch.strided):
            return None
        hs = scalars(f)
        return hs if hs.floats else None

    def linearize(self, f_true: Tensor, J_true: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Loss-scaled residuals and Jacobian, the gradient and the Gram matrix.

        Returns ``(f, J, g, G)`` with ``g = J^T f`` and ``G = J^T J``: for a
        robust loss, ``G`` is the Gauss-Newton Hessian of the cost and ``g`` its
        gradient.

        With ``tr_solver='lsmr'`` ``J`` may be sparse or an operator and ``G`` is
        replaced by the squared column norms ``(B, n)``
        (:func:`~torchimize_scipy._engine.operator.linearize_products`).
        """
        if self.products_only:
            from .operator import linearize_products

            return linearize_products(f_true, J_true, self.loss)
        if self.loss is None:
            f, J = f_true, J_true
            if J.shape[-2] <= HOST_SUM_ROWS and J.shape[-1] <= HOST_SUM_COLS \
                    and not J.requires_grad and not f.requires_grad \
                    and J.layout == torch.strided:
                hs = scalars(f)
                if hs.floats:  # one float64 problem: its few products summed on the host
                    f_h, J_h = hs.view(f, J)
                    g, G = _host_normal_equations(f_h[0].tolist(), J_h[0].tolist(),
                                                  J.shape[-1])
                    return (f, J) + hs.tensors(g, G)
            elif J.shape[-2] * J.shape[-1] < BMM_NAIVE_TERMS and not J.requires_grad \
                    and not f.requires_grad and J.layout == torch.strided \
                    and (hs := scalars(f)).floats:
                # one float64 problem: J^T f within torch's own bmm kernel, summed on the
                # host in its order (the same values; host_transposed_rows); J^T J by bmm
                # (MKL's gemm from BMM_NAIVE_TERMS multiply-adds on, whose order is its own)
                f_h, J_h = hs.view(f, J)
                g, = hs.tensors(host_transposed_rows(J_h[0], f_h[0])[None])
                return f, J, g, torch.bmm(J.transpose(-1, -2), J)
        elif (hs := self._host_loss(f_true, J_true)) is not None:
            # one float64 problem: the scaling on its floats (the same values), and its
            # few products summed on the host as torch's small ``bmm`` kernel sums them
            f_h, J_h = hs.view(f_true, J_true)
            J_s, f_s = self.loss.host_scaled_system(f_true, f_h[0].tolist(), J_h)
            m, n = J_s.shape[-2:]
            f, J = hs.tensors(np.array(f_s, dtype=np.float64).reshape(1, m), J_s)
            if m * n * n < BMM_NAIVE_TERMS:
                return (f, J) + hs.tensors(*_host_normal_equations(f_s, J_s[0].tolist(), n))
        elif isinstance(self.loss, LossFunction):  # (without the loss's value)
            J, f = self.loss.scaled_system(J_true, f_true)
        else:
            J, f = scale_for_robust_loss(J_true, f_true, self.loss.rho(f_true))
        Jt = J.transpose(-1, -2)
        g = torch.bmm(Jt, f.unsqueeze(-1)).squeeze(-1)
        return f, J, g, torch.bmm(Jt, J)


def host_transposed_product(A: list[list[float]], f: list[float], n: int) -> list[float]:
    """``A^T f`` of one problem's few rows ``A (m, n)`` as Python floats, each entry
    the sum over the rows in order from zero, as torch's small ``bmm`` kernel adds
    them (so the values equal ``bmm``'s; see :data:`HOST_SUM_ROWS`)."""
    out = []
    for i in range(n):
        total = 0.0
        for row, v in zip(A, f, strict=True):
            total += row[i] * v
        out.append(total)
    return out


def host_transposed_rows(A: np.ndarray, f: np.ndarray) -> np.ndarray:
    """``A^T f (k,)`` of one problem's host arrays ``A (m, k)`` and ``f (m,)`` with fewer
    than :data:`BMM_NAIVE_TERMS` multiply-adds ``m k``, as torch's own small ``bmm``
    kernel computes it: each entry the sum over the rows in order from zero.

    numpy's ``add.accumulate`` adds one row after the other (no pairwise blocks, unlike
    ``add.reduce``), so its last row is that sum, the same values as ``bmm`` (checked
    on 3,900 random shapes below the limit); one numpy pass instead of the four torch
    operations (transpose, unsqueeze, ``bmm``, squeeze) and a read of the result.
    """
    if A.shape[0] == 0:
        return np.zeros(A.shape[1], dtype=np.float64)
    return np.add.accumulate(A * f[:, None], axis=0)[-1]


def host_matvec_rows(A: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    """``A v (1, n)`` of one problem's host arrays ``A (1, n, k)`` and ``v (1, k)`` as
    ``torch.bmm(A, v[..., None])`` computes it below :data:`BMM_NAIVE_TERMS`
    multiply-adds ``n k`` (its small kernel: each entry the sum over ``j`` in order
    from zero; ``np.add.accumulate`` adds the same terms in the same order, as in
    :func:`host_transposed_rows`), or None at and above that size (MKL's order)."""
    n, k = A.shape[-2], A.shape[-1]
    if n * k >= BMM_NAIVE_TERMS:
        return None
    if k == 0:
        return np.zeros((1, n), dtype=np.float64)
    with quiet():  # (an overflow gives inf, a 0 * inf NaN, as in torch: without a warning)
        return np.ascontiguousarray(np.add.accumulate(A[0] * v[0], axis=1)[:, -1])[None]


def _host_normal_equations(f: list[float], J: list[list[float]],
                           n: int) -> tuple[np.ndarray, np.ndarray]:
    """``J^T f (1, n)`` and ``J^T J (1, n, n)`` of one problem's few rows ``J (m, n)``
    (Python floats, as :func:`~.host_scalars.sum_of_squares`), each entry the sum over
    the rows in order from zero, as torch's small ``bmm`` kernel adds them; ``J^T J`` is symmetric
    entry by entry (the same products in the same order)."""
    g = host_transposed_product(J, f, n)
    G = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            total = 0.0
            for row in J:
                total += row[i] * row[j]
            G[i][j] = G[j][i] = total
    return (np.array(g, dtype=np.float64).reshape(1, n),
            np.array(G, dtype=np.float64).reshape(1, n, n))
