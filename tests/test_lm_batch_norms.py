"""Norms a batched 'lm' run takes once instead of twice (issue 14's 20,000 peaks).

* ``|f|`` at the top of an outer iteration: ``assess_trial`` keeps torch's norm
  of each accepted trial's residuals, which ``measure_optimality`` would take
  again of the same values (only rows admitted since the last top are
  measured there);
* ``|f|^2`` of ``refine_gauss_newton``: twice the linear cost, which summed
  the same squares (``steps.lm._squares_from_cost``), unless a halved cost
  could have rounded.

Both are the same reductions of the same values as before, so a run must keep
the invariant exactly; the test of the invariant compares one reduction with
itself (the same code path).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.linalg import vector_norm as vnorm

from torchimize_scipy import batch_least_squares
from torchimize_scipy._engine import host_scalars
from torchimize_scipy._engine.host_scalars import for_rows
from torchimize_scipy._engine.steps import lm

T = torch.linspace(0.0, 10.0, 40, dtype=torch.float64)


def _peaks(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    a, mu, s = p[:, :1], p[:, 1:2], p[:, 2:3]
    return a * torch.exp(-0.5 * ((T - mu) / s) ** 2) - y


def _data(B: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    true = torch.stack([1 + torch.rand(B, generator=g, dtype=torch.float64),
                        3 + 4 * torch.rand(B, generator=g, dtype=torch.float64),
                        0.5 + torch.rand(B, generator=g, dtype=torch.float64)], 1)
    y = _peaks(true, torch.zeros(B, T.numel(), dtype=torch.float64))
    y = y + 0.01 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    return true * (1 + 0.2 * torch.randn(true.shape, generator=g, dtype=torch.float64)), y


@pytest.mark.parametrize("host", [True, False])
def test_kept_norm_is_the_norm_of_the_residuals(monkeypatch, host):
    # at every top after the first, the kept |f| is torch's norm of the rows' f
    checked = []
    measure = lm.LevenbergMarquardt.measure_optimality

    def checking(self, problem, state):
        # (one float64 problem on the host measures |f| with numpy: not a batch's path)
        if not self._admitted and not for_rows(state["x"]).floats:
            kept = state["fnorm"]
            assert torch.equal(torch.as_tensor(kept), vnorm(state["f"], dim=-1))
            checked.append(state["f"].shape[0])
        return measure(self, problem, state)

    monkeypatch.setattr(lm.LevenbergMarquardt, "measure_optimality", checking)
    monkeypatch.setattr(host_scalars, "HOST", None if host else False)
    p0, y = _data(300)
    # (chunks of 64 rows: problems admitted mid-run, beside rows that keep their norm)
    res = batch_least_squares(_peaks, p0, method="lm", args=(y,), chunk_size=64)
    assert np.all(np.asarray(res.status) > 0)
    assert len(checked) > 5 and max(checked) > 1


def test_squares_from_cost_doubles_normal_costs():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(50, 30, dtype=torch.float64, generator=g)
    cost = 0.5 * (f * f).sum(-1)
    hs = for_rows(f[:, :4].contiguous())
    assert hs.host
    ff = lm._squares_from_cost(hs, cost)
    assert ff is not None and torch.equal(ff, (f * f).sum(-1))


def test_squares_from_cost_refuses_a_subnormal_half():
    # squares of 3 x the smallest subnormal: the half rounds (ties to even), so twice
    # the cost is not the squares' sum; such a batch sums its squares again (None)
    smallest = 4.9406564584124654e-324
    squares = torch.tensor([1.0, 2.0, 3 * smallest, 4.0], dtype=torch.float64)
    cost = 0.5 * squares
    assert cost[2] < torch.finfo(torch.float64).tiny
    assert not torch.equal(cost * 2.0, squares)
    hs = for_rows(torch.zeros(4, 2, dtype=torch.float64))
    assert lm._squares_from_cost(hs, cost) is None
    assert torch.equal(lm._squares_from_cost(hs, cost[[0, 1, 3]]), squares[[0, 1, 3]])
