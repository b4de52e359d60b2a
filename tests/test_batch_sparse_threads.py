"""batch_least_squares with ``jac_sparsity`` on two torch threads: the whole call,
its frontend included, opens no torch parallel region of its own, and the caller's
``fun`` and ``loss`` run with the caller's thread count (issue 13)."""

from __future__ import annotations

import scipy.optimize as so
import torch
from _parity import assert_cost_close, assert_x_close
from test_blas_threads_sparse import _broyden, _RegionsApart, needs_omp

from torchimize_scipy import batch_least_squares


def fun_torch(x: torch.Tensor) -> torch.Tensor:
    """Broyden's tridiagonal residuals of each row of ``x (b, n)``."""
    _SEEN.append(torch.get_num_threads())
    f = (3 - x) * x + 1
    return (torch.cat([f[:, :1], f[:, 1:] - x[:, :-1]], 1)
            - torch.cat([2 * x[:, 1:], x.new_zeros(x.shape[0], 1)], 1))


_SEEN: list[int] = []


@needs_omp
def test_sparse_batch_opens_no_parallel_region_and_user_code_keeps_threads(two_threads) -> None:
    """Regression: the batch frontend evaluated and checked the residuals and the sparse
    Jacobian at x0 with torch's two threads (operations over more than 32,768
    elements: the finiteness checks, the difference steps, the sparse Jacobian's
    assembly, the scaling, the result's copy). Now none; the
    caller's ``fun`` and a callable ``loss`` still see two threads."""
    n, B = 20_000, 2
    fun_np, sparsity = _broyden(n)
    x0 = -torch.ones(B, n, dtype=torch.float64)
    _SEEN.clear()
    mode = _RegionsApart("fun_torch")
    with mode:
        res = batch_least_squares(fun_torch, x0, jac_sparsity=sparsity, loss="soft_l1")
    assert mode.package == []
    assert len(mode.user) > 0 and set(_SEEN) == {2}
    ref = so.least_squares(fun_np, x0[0].numpy(), jac_sparsity=sparsity, tr_solver="lsmr",
                           loss="soft_l1")
    for i in range(B):
        assert_cost_close(float(res.cost[i]), ref.cost, 1e-8)
        assert_x_close(res.x[i].numpy(), ref.x, xtol=1e-8)
    assert torch.get_num_threads() == 2

    seen_by_loss: list[int] = []

    def loss(z: torch.Tensor) -> torch.Tensor:
        seen_by_loss.append(torch.get_num_threads())
        return torch.stack([z, torch.ones_like(z), torch.zeros_like(z)])

    _SEEN.clear()
    res = batch_least_squares(fun_torch, x0, jac_sparsity=sparsity, loss=loss)
    assert len(seen_by_loss) > 0 and set(seen_by_loss) == {2} and set(_SEEN) == {2}
    assert float(res.cost.max()) < 1e-12
    assert torch.get_num_threads() == 2
