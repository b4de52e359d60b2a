"""Shortcuts of a batched 'lm' model that must not change what it decides (issue 14).

* The Gram factorisation decides that every row's condition number is within the
  limit from the largest entries of ``H`` and its inverse where that proves it
  (``linalg._all_within``), and otherwise computes them.
* The Gram factorisation decides that every entry of ``H`` and ``A^T b`` is finite
  from one host read of their sums (``linalg._all_finite_on_host``); an overflowing
  sum, a non-finite entry, or the device's code (``host_scalars.HOST = False``)
  fall back to the per-row test, which keeps non-finite rows off the Gram route.
* ``loop.on_rows(..., others_free=True)`` runs ``fn`` on every row when most rows
  are selected: the rows outside the mask take what ``fn`` assigns (for 'lm''s
  ``build_model``, rows that stopped at the top: ``model_on_stopped_rows``).
* ``measure_optimality`` takes a batch's row maxima column by column
  (``host_scalars.Scalars.amax``) and its cosines without guards where no norm is zero.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchimize_scipy import batch_least_squares
from torchimize_scipy._engine import host_scalars, linalg, loop
from torchimize_scipy._engine.host_scalars import Scalars
from torchimize_scipy._engine.steps import lm
from torchimize_scipy._engine.steps.base import StepRule


def _batch(B: int = 6, m: int = 8, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(B, m, n, generator=g, dtype=torch.float64)
    f = torch.randn(B, m, generator=g, dtype=torch.float64)
    return J, f


def test_all_finite_on_host_reads_the_sums():
    J, f = _batch()
    H = J.transpose(-1, -2) @ J
    b = (J.transpose(-1, -2) @ f.unsqueeze(-1)).squeeze(-1)
    assert linalg._all_finite_on_host(H, b) is True
    big = torch.full_like(H, 1e307)  # finite entries whose sum overflows: per-row test
    assert torch.isfinite(big).all()
    assert linalg._all_finite_on_host(big, b) is False
    nan_b = b.clone()
    nan_b[2, 1] = float("nan")
    assert linalg._all_finite_on_host(H, nan_b) is False


def test_all_finite_on_host_defers_to_the_device_code(monkeypatch):
    J, f = _batch()
    H = J.transpose(-1, -2) @ J
    b = (J.transpose(-1, -2) @ f.unsqueeze(-1)).squeeze(-1)
    monkeypatch.setattr(host_scalars, "HOST", False)
    assert linalg._all_finite_on_host(H, b) is False


@pytest.mark.parametrize("host", [None, False])
def test_nonfinite_row_stays_off_the_gram_route(monkeypatch, host):
    monkeypatch.setattr(host_scalars, "HOST", host)
    J, f = _batch()
    J[3, 0, 1] = float("inf")
    fac = linalg.factorize(J, None, f, use_gram=True)
    gram = fac.gram.tolist()
    assert gram[3] is False
    assert all(gram[i] for i in range(6) if i != 3)
    # the finite rows' inverse is the inverse of their Gram matrix
    H = J.transpose(-1, -2) @ J
    eye = torch.eye(3, dtype=torch.float64)
    for i in (0, 5):
        np.testing.assert_allclose((fac.Hinv[i] @ H[i]).numpy(), eye.numpy(), atol=1e-10)


def test_overflowing_sum_keeps_every_finite_row_on_the_gram_route():
    J, f = _batch(B=12)
    # positive entries near 4e152: J^T J entries near 4e306, each row's sum finite, the
    # batch's sum not
    J = (J.abs() + 1.0) * 4e152
    fac = linalg.factorize(J, None, f, use_gram=True)
    assert torch.isfinite(fac.H.sum((-2, -1))).all()
    assert bool(torch.isinf(fac.H.sum()))
    assert fac.gram.all()


def _state(B: int = 8):
    return {"x": torch.arange(B, dtype=torch.float64).unsqueeze(-1),
            "v": torch.zeros(B, dtype=torch.float64)}


def _write_ones(view) -> None:
    view["v"] = torch.ones(view["x"].shape[0], dtype=torch.float64)


def test_on_rows_keeps_the_unselected_rows_by_default():
    state = _state()
    mask = torch.ones(8, dtype=torch.bool)
    mask[[1, 6]] = False
    loop.on_rows(state, mask, _write_ones, 6)
    assert state["v"].tolist() == [1, 0, 1, 1, 1, 1, 0, 1]


def test_on_rows_others_free_leaves_fn_values_on_every_row():
    state = _state()
    mask = torch.ones(8, dtype=torch.bool)
    mask[[1, 6]] = False
    loop.on_rows(state, mask, _write_ones, 6, others_free=True)
    assert state["v"].tolist() == [1.0] * 8
    # few rows selected: gathered and scattered as ever (the others keep their values)
    state = _state()
    mask = torch.zeros(8, dtype=torch.bool)
    mask[2] = True
    loop.on_rows(state, mask, _write_ones, 1, others_free=True)
    assert state["v"].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]


def test_only_lm_leaves_its_model_on_stopped_rows():
    assert lm.LevenbergMarquardt.model_on_stopped_rows is True
    assert StepRule.model_on_stopped_rows is False


def test_row_max_is_each_rows_largest_entry():
    rng = np.random.default_rng(1)
    a = np.abs(rng.standard_normal((100, 4)))
    a[7, 2] = np.nan
    hs = Scalars(torch.zeros(100, dtype=torch.float64))
    out = hs.amax(a)
    assert out.shape == (100,)
    assert np.isnan(out[7])
    for i in range(100):
        if i != 7:
            assert out[i] == max(a[i].tolist())
    # few rows, or many columns: numpy's amax (the same maxima)
    few = Scalars(torch.zeros(3, dtype=torch.float64)).amax(a[:3])
    assert few.tolist() == [max(r) for r in a[:3].tolist()]


def _peaks(p, y):
    t = torch.linspace(0.0, 10.0, 30, dtype=torch.float64)
    a, mu, s, c = p.unbind(-1)
    return a[:, None] * torch.exp(-0.5 * ((t - mu[:, None]) / s[:, None]) ** 2) + c[:, None] - y


@pytest.mark.parametrize("host", [None, False])
def test_zero_column_and_zero_residual_rows_measure_zero_cosines(monkeypatch, host):
    # a row whose Jacobian has a zero column (a = 0: the mu and s columns vanish) and a
    # row that starts at its exact fit (f = 0) take the guarded quotients: the first
    # stops on gtol (its nonzero columns are orthogonal to f there), and no NaN reaches
    # the results
    monkeypatch.setattr(host_scalars, "HOST", host)
    B = 80
    g = torch.Generator().manual_seed(3)
    p0 = torch.stack([1 + torch.rand(B, generator=g, dtype=torch.float64),
                      3 + 4 * torch.rand(B, generator=g, dtype=torch.float64),
                      0.5 + torch.rand(B, generator=g, dtype=torch.float64),
                      torch.zeros(B, dtype=torch.float64)], 1)
    y = _peaks(p0 * 1.1, torch.zeros(B, 30, dtype=torch.float64))
    p0[5, 0] = 0.0  # zero amplitude: zero mu and s columns
    y[9] = _peaks(p0[9:10], torch.zeros(1, 30, dtype=torch.float64))[0]  # exact at x0
    res = batch_least_squares(_peaks, p0, method="lm", args=(y,))
    assert torch.isfinite(torch.as_tensor(res.optimality)).all()
    assert int(res.status[9]) == 1  # gtol at the start: f = 0
    assert float(res.cost[9]) == 0.0
    assert torch.isfinite(torch.as_tensor(res.x)).all()
    assert (torch.as_tensor(res.status)[[i for i in range(B) if i not in (5, 9)]] > 0).all()


def _gram_batch(B: int = 6, n: int = 3):
    J, _ = _batch(B=B, n=n)
    H = J.transpose(-1, -2) @ J
    Hinv, info = torch.linalg.inv_ex(H)
    return H, Hinv, info


def test_all_within_bounds_the_condition_numbers():
    H, Hinv, info = _gram_batch()
    cond1 = linalg._condition(H, Hinv, info)
    bound = float((H.abs().amax((-2, -1)) * Hinv.abs().amax((-2, -1)) * 9).max())
    assert bound >= float(cond1.max())  # n^2 max|H| max|H^-1| bounds cond1
    assert linalg._all_within(H, Hinv, info, bound * 2.01) is True
    # a limit the bound cannot prove (though every cond1 is below it) says False
    assert linalg._all_within(H, Hinv, info, float(cond1.max()) * 1.01) is False


def test_all_within_refuses_a_failed_lu_and_the_device_code(monkeypatch):
    H, Hinv, info = _gram_batch()
    failed = info.clone()
    failed[2] = 1
    assert linalg._all_within(H, Hinv, failed, 1e300) is False
    nan = Hinv.clone()
    nan[4, 0, 0] = float("nan")
    assert linalg._all_within(H, nan, info, 1e300) is False
    monkeypatch.setattr(host_scalars, "HOST", False)
    assert linalg._all_within(H, Hinv, info, 1e300) is False


def test_ill_conditioned_row_leaves_the_gram_route():
    J, f = _batch(B=6, m=8, n=3)
    J[1, :, 2] = J[1, :, 1] * (1 + 1e-7)  # cond(J^T J) near 1e14: beyond the limit
    fac = linalg.factorize(J, None, f, use_gram=True)
    assert fac.gram.tolist() == [True, False, True, True, True, True]
    assert fac.s[1, 0] > 0  # its SVD data
