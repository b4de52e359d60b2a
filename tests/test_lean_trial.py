"""Lean iterations, session 6 (issue 14): the trial's finiteness from its cost, the
robust losses' value and parts without extra stacking.

* :mod:`torchimize_scipy._loss`: ``LossFunction.cost`` evaluates only ``rho``
  for the built-in losses and ``LossFunction.rho`` stacks once; both give the
  values of the public ``(3, ...)`` functions bit for bit (the same operations),
  also at zero, huge, infinite and NaN residuals;
* the loop (``_engine/loop.py``): on the host a finite cost of every row proves
  the trial's residuals finite for the losses whose ``rho`` is unbounded; a
  non-finite residual is still caught for every loss, ``arctan`` included (whose
  cost stays finite at an infinite residual), in one problem and in a batch,
  and the other rows of the batch are left as they are.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _parity import assert_bitwise_equal

from torchimize_scipy import batch_least_squares, least_squares
from torchimize_scipy._engine import host_scalars
from torchimize_scipy._engine.problem import Problem
from torchimize_scipy._loss import LOSSES, make_loss

ROBUST = ("soft_l1", "huber", "cauchy", "arctan")


def _residuals() -> torch.Tensor:
    f = torch.tensor([[0.0, -0.0, 1e-3, -0.7, 2.5, 1e150],
                      [3.0, -1e-200, 0.9, 1.0, -1.1, 40.0],
                      [np.inf, 1.0, -2.0, 0.5, 0.1, 0.2],
                      [np.nan, -np.inf, 0.3, 7.0, -7.0, 1e300]], dtype=torch.float64)
    return f


@pytest.mark.parametrize("name", ROBUST)
@pytest.mark.parametrize("f_scale", [1.0, 0.3, "per-problem"])
def test_loss_cost_and_rho_equal_the_stacked_functions(name, f_scale):
    f = _residuals()
    c = torch.tensor([1.0, 0.3, 2.0, 0.05], dtype=torch.float64) if f_scale == "per-problem" \
        else f_scale
    loss = make_loss(name, c)
    c_elem = c[:, None] if isinstance(c, torch.Tensor) else c
    c_prob = c
    z = (f / c_elem) ** 2
    ref = LOSSES[name](z)  # the public (3, ...) function
    cost_ref = 0.5 * c_prob**2 * ref[0].sum(dim=-1)
    rho_ref = torch.stack([ref[0] * c_elem**2, ref[1], ref[2] / c_elem**2])
    assert_bitwise_equal(loss.cost(f), cost_ref, err_msg="cost")
    assert_bitwise_equal(loss.rho(f), rho_ref, err_msg="rho")


def test_loss_callable_keeps_its_own_path():
    calls = []

    def rho(z):
        calls.append(z.shape)
        return torch.stack([z, torch.ones_like(z), torch.zeros_like(z)])

    loss = make_loss(rho, 2.0)
    f = torch.tensor([[1.0, -3.0]], dtype=torch.float64)
    torch.testing.assert_close(loss.cost(f), 0.5 * (f * f).sum(-1), rtol=0, atol=0)
    torch.testing.assert_close(loss.rho(f)[0], f * f, rtol=0, atol=0)
    assert calls == [(1, 2), (1, 2)]
    assert not loss.cost_proves_finite


def test_cost_proves_finite_only_for_unbounded_losses():
    kw = dict(fun=None, jac=None, m=1, n=1, ftol=1e-8, xtol=1e-8, gtol=1e-8, max_nfev=10,
              jac_scale=False, bounded=False)
    assert Problem(loss=None, **kw).cost_proves_finite
    for name in ("soft_l1", "huber", "cauchy"):
        assert Problem(loss=make_loss(name, 1.0), **kw).cost_proves_finite
    assert not Problem(loss=make_loss("arctan", 1.0), **kw).cost_proves_finite
    # the reason: arctan's cost is finite at an infinite residual
    f = torch.tensor([[np.inf, 1.0]], dtype=torch.float64)
    assert torch.isfinite(make_loss("arctan", 1.0).cost(f)).all()
    for name in ("soft_l1", "huber", "cauchy"):
        assert not torch.isfinite(make_loss(name, 1.0).cost(f)).any()


def _exp_data():
    t = np.linspace(0, 4, 25)
    y = 3 * np.exp(-0.8 * t) + 0.05 * np.sin(5 * t)
    return t, y


@pytest.mark.parametrize("loss", ["linear", *ROBUST])
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_single_problem_rejects_a_nonfinite_trial(monkeypatch, loss, bad):
    # the third evaluation (the second trial) returns one non-finite residual: the trial is
    # rejected as the tensor code (host_scalars.HOST = False) rejects it, for every
    # loss (arctan's cost is finite there: the rows are checked one by one)
    t, y = _exp_data()

    def run():
        calls = {"n": 0}

        def fun(p):
            calls["n"] += 1
            f = p[0] * np.exp(-p[1] * t) - y
            if calls["n"] == 3:
                f[4] = bad
            return f

        def jac(p):
            e = np.exp(-p[1] * t)
            return np.stack([e, -p[0] * t * e], axis=1)

        return least_squares(fun, np.array([1.0, 0.2]), jac=jac, loss=loss, f_scale=0.5)

    host = run()
    monkeypatch.setattr(host_scalars, "HOST", False)
    device = run()
    assert host.status > 0 and np.isfinite(host.cost)
    assert (host.status, host.nfev, host.njev) == (device.status, device.nfev, device.njev)
    # the same steps; both stop by the same test: x agrees to the xtol scale
    np.testing.assert_allclose(host.x, device.x, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("loss", ["linear", *ROBUST])
def test_batch_nonfinite_trial_row_stays_alone(loss):
    # row 1's trial residuals turn infinite at the second round: the others are
    # unaffected, bit for bit (their trials and costs do not depend on row 1)
    t, y = _exp_data()
    Y = np.stack([y, 1.3 * y, 0.7 * y])

    def make(bad_row):
        calls = {"n": 0}

        def fun(p, Y):
            calls["n"] += 1
            f = p[:, :1] * np.exp(-p[:, 1:] * t) - Y
            if bad_row and calls["n"] >= 2 and f.shape[0] == 3:
                f[1, 3] = np.inf
            return f

        return fun

    def jac(p, Y):
        e = np.exp(-p[:, 1:] * t)
        return np.stack([e, -p[:, :1] * t * e], axis=-1)

    x0 = np.tile([1.0, 0.2], (3, 1))
    kw = dict(args=(Y,), jac=jac, loss=loss, f_scale=0.5, method="trf")
    clean = batch_least_squares(make(False), x0, **kw)
    res = batch_least_squares(make(True), x0, **kw)
    assert np.isfinite(np.asarray(res.cost)[1])
    keep = [0, 2]
    for key in ("x", "cost", "nfev", "njev", "status"):
        assert_bitwise_equal(np.asarray(getattr(res, key))[keep],
                             np.asarray(getattr(clean, key))[keep], err_msg=key)


def test_one_problem_flags_and_small_integers_are_shared_tensors():
    sc = host_scalars.Scalars(torch.zeros(1, 2, dtype=torch.float64))
    assert sc.floats
    t_true = sc.tensor(np.bool_(True))
    assert sc.tensor(True) is t_true and sc.tensors(np.bool_(True))[0] is t_true
    assert t_true.dtype == torch.bool and t_true.tolist() == [True]
    code = sc.tensors(np.int64(-100))[0]
    assert sc.tensor(-100) is code and code.dtype == torch.int64 and code.tolist() == [-100]
    assert sc.view(code)[0] == -100
    # floats and large integers get their own tensors
    assert sc.tensor(np.float64(0.5)) is not sc.tensor(np.float64(0.5))
    assert sc.tensor(np.int64(10**6)) is not sc.tensor(np.int64(10**6))
    assert sc.tensor(np.int64(10**6)).tolist() == [10**6]


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_shared_tensors_are_never_written(method):
    # runs of every method (bounded too, a callback stop, a NaN start in a batch)
    # leave each shared (1,) tensor holding the value it was made for
    t, y = _exp_data()

    def fun(p):
        return p[0] * np.exp(-p[1] * t) - y

    least_squares(fun, np.array([1.0, 0.2]), method=method)
    if method != "lm":
        least_squares(fun, np.array([1.0, 0.2]), method=method, bounds=([0, 0], [2.5, 5]))
    if method != "lm":  # (scipy's 'lm' takes no callback)
        least_squares(fun, np.array([1.0, 0.2]), method=method, callback=lambda *a: True)
    X0 = np.array([[1.0, 0.2], [np.nan, 0.3]])
    batch_least_squares(lambda P: P[:, :1] * np.exp(-P[:, 1:] * t) - y, X0, method=method)
    shared = dict(host_scalars._SHARED)
    assert shared
    for (kind, value), tensor in shared.items():
        assert tensor.shape == (1,)
        assert tensor.tolist() == [kind(value)]
        assert host_scalars.Scalars(torch.zeros(1, 1, dtype=torch.float64)).view(tensor)[0] \
            == value


def test_times_skips_only_a_marked_scaling():
    from torchimize_scipy._engine import counts

    v = torch.tensor([[2.0, -3.0]], dtype=torch.float64)
    ones = torch.ones(1, 2, dtype=torch.float64)
    assert counts.times(None, v) is v
    prod = counts.times(ones, v)
    assert prod is not v and torch.equal(prod, v)
    assert counts.times(counts.mark_unit(ones.view_as(ones)), v) is v
    assert not counts.known_unit(ones)  # (the mark went on the alias)


def test_svd_of_a_jacobian_marked_finite_is_the_same_and_marks_its_values():
    from torchimize_scipy._engine import counts
    from torchimize_scipy._engine.linalg import svd_factors

    rng = np.random.default_rng(3)
    J = torch.as_tensor(rng.standard_normal((3, 7, 2)))
    f = torch.as_tensor(rng.standard_normal((3, 7)))
    plain = svd_factors(J, None, f)
    marked = svd_factors(counts.mark_finite(J.view_as(J)), None, f)
    for a, b in zip(plain, marked, strict=True):
        assert_bitwise_equal(a, b)
    assert counts.known_finite(marked[0]) and not counts.known_finite(plain[0])


def test_marks_go_on_aliases_not_on_the_callers_tensors():
    # a torch jac returning the same tensor each time, and an x_scale tensor of ones:
    # the engine marks its own aliases only (a caller may change its tensors later)
    from torchimize_scipy._engine import counts

    t = torch.linspace(0, 4, 25, dtype=torch.float64)
    y = 3 * torch.exp(-0.8 * t)
    A = torch.stack([t, torch.ones_like(t)], dim=1)
    scale = torch.ones(2, dtype=torch.float64)
    res = least_squares(lambda p: A @ p - y, torch.tensor([0.0, 0.0], dtype=torch.float64),
                        jac=lambda p: A, x_scale=scale)
    assert res.success
    assert not counts.known_finite(A) and not counts.known_unit(scale)
    np.testing.assert_allclose(np.asarray(res.x),
                               np.linalg.lstsq(A.numpy(), y.numpy(), rcond=None)[0],
                               rtol=1e-8, atol=1e-10)  # (xtol, ftol: 1e-8)


def test_serial_blas_sets_the_threads_openmp_count_for_this_thread_only():
    import threading

    from torchimize_scipy import _blas_threads as bt

    if bt._OMP is None or bt._SET_LOCAL is None:
        pytest.skip("torch without MKL or an OpenMP runtime")
    before = torch.get_num_threads()
    seen = {}
    with bt.serial_blas(torch.device("cpu"), 10, 2) as serial:
        assert serial
        assert torch.get_num_threads() == 1  # torch's parallel regions: one thread here
        other = threading.Thread(target=lambda: seen.update(n=bt._OMP[0]()))
        other.start()
        other.join()
    assert torch.get_num_threads() == before  # restored
    assert seen["n"] != 1 or before == 1  # another thread kept its own count
    # a large problem keeps the threads
    with bt.serial_blas(torch.device("cpu"), 10**6, 10) as serial:
        assert not serial and torch.get_num_threads() == before


def test_serial_blas_inside_another_sets_nothing_and_the_outer_restores():
    from torchimize_scipy import _blas_threads as bt

    if bt._OMP is None or bt._SET_LOCAL is None:
        pytest.skip("torch without MKL or an OpenMP runtime")
    before, mkl_before = torch.get_num_threads(), bt.mkl_local_threads()
    calls = []
    real = bt._SET_LOCAL
    try:
        bt._SET_LOCAL = lambda n: calls.append(n) or real(n)
        with bt.serial_blas(torch.device("cpu"), 10, 2) as outer:
            set_by_outer = len(calls)
            with bt.serial_blas(torch.device("cpu"), 10, 2, limit=10**6) as inner:
                assert outer and inner
                assert len(calls) == set_by_outer  # the inner block set nothing
                assert torch.get_num_threads() == 1
            assert torch.get_num_threads() == 1  # (still the outer block's count)
    finally:
        bt._SET_LOCAL = real
    assert torch.get_num_threads() == before and bt.mkl_local_threads() == mkl_before
    assert not bt.csr._LOCAL.serial  # the mark is gone: the next block sets the counts again
