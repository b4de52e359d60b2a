"""Per-problem scalars on the host (``_engine/host_scalars.py``, issue 14).

On the CPU the trust-region subproblem and the trial's assessment of 'trf' and
'dogbox' keep their per-problem scalars in numpy (``numpy.float64`` for one
float64 problem); elsewhere the same code runs on tensors. These tests run both
paths on the CPU (``host=False`` / ``host_scalars.HOST = False`` is what a GPU
runs) and compare them to tolerances derived from the problem, check the
float namespace's edge cases, and that a NaN row stays alone on the host.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _parity import assert_bitwise_equal

from torchimize_scipy import batch_least_squares, least_squares
from torchimize_scipy._engine import host_scalars
from torchimize_scipy._engine.host_scalars import Floats, Scalars
from torchimize_scipy._engine.linalg import factorize
from torchimize_scipy._engine.quadratic import update_tr_radius
from torchimize_scipy._engine.termination import RUNNING, trust_region_code
from torchimize_scipy._engine.trust_region import solve_trust_region_scipy

RTOL = 0.01  # solve_trust_region_scipy's default: |p| = delta (1 +- RTOL)


def _factors(B: int, use_gram: bool, seed: int = 0, rank_deficient: bool = False):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((B, 12, 3))
    if rank_deficient:
        A[:, :, 2] = A[:, :, 1]
    f = rng.standard_normal((B, 12)) * np.geomspace(1e-3, 1e2, B)[:, None]
    return factorize(torch.as_tensor(A), None, torch.as_tensor(f), use_gram=use_gram)


def test_scalars_choose_the_namespace():
    one = torch.zeros(1, dtype=torch.float64)
    assert Scalars(one).xp is Floats
    assert Scalars(one, floats=False).xp is np
    assert Scalars(torch.zeros(4, dtype=torch.float64)).xp is np
    assert Scalars(torch.zeros(1, dtype=torch.float32)).xp is np  # floats: float64 only
    assert Scalars(one, host=False).xp is torch


def test_scalars_module_default_runs_the_device_code(monkeypatch):
    monkeypatch.setattr(host_scalars, "HOST", False)
    assert Scalars(torch.zeros(3)).xp is torch


def test_floats_namespace_edge_cases():
    nan, one, two = np.float64("nan"), np.float64(1.0), np.float64(2.0)
    assert Floats.maximum(one, two) == 2.0 and Floats.minimum(one, two) == 1.0
    assert np.isnan(Floats.maximum(nan, one)) and np.isnan(Floats.maximum(one, nan))
    assert np.isnan(Floats.minimum(nan, one)) and np.isnan(Floats.minimum(one, nan))
    assert np.isnan(Floats.sqrt(np.float64(-1.0)))
    assert Floats.sqrt(np.float64(4.0)) == 2.0
    assert Floats.where(np.bool_(True), one, two) == 1.0
    # an array among the arguments: numpy's function
    np.testing.assert_array_equal(Floats.where(np.array([True, False]), one, two), [1.0, 2.0])
    np.testing.assert_array_equal(Floats.maximum(np.array([0.0, 3.0]), two), [2.0, 3.0])
    assert Floats.copysign(one, np.float64(-0.0)) == -1.0
    assert not Floats.isfinite(np.float64("inf"))


def test_quiet_host_arithmetic_warns_nothing():
    sc = Scalars(torch.zeros(1, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sc.quiet():
            assert np.float64(1.0) / np.float64(0.0) == np.inf
            assert np.isnan(np.zeros(2) / np.zeros(2)).all()


def test_tensor_round_trip_remembers_host_values():
    for B in (1, 5):
        sc = Scalars(torch.zeros(B, dtype=torch.float64))
        values = sc.full(2.5) * np.float64(2.0)
        t = sc.tensor(values)
        assert t.shape == (B,) and t.dtype == torch.float64
        assert (t == 5.0).all()
        # the tensor remembers its host values: no conversion when they are read again
        assert sc.get(t) is getattr(t, host_scalars._HOST_VALUE)
        np.testing.assert_array_equal(np.asarray(sc.get(t)).reshape(-1), np.full(B, 5.0))
        assert sc.count(sc.get(t) > 1.0) == B
        codes = sc.tensor(sc.xp.where(sc.get(t) > 1.0, 3, RUNNING))
        assert codes.dtype == torch.long and (codes == 3).all()


@pytest.mark.parametrize("B", [1, 4])
def test_one_tensor_has_one_host_value_whichever_reader_comes_first(B):
    # 'lm' (view/tensors) and 'trf' (get/rows/tensor) share one module and one
    # attribute per tensor rank. Before the merge, host_lm kept a (1, 1) column's
    # (1, 1) array under the attribute from which host_scalars.get read per-problem
    # values, so get returned an array where a numpy.float64 was due.
    sc = Scalars(torch.zeros(B, 3, dtype=torch.float64))
    col = torch.arange(1.0, B + 1.0, dtype=torch.float64)[:, None]  # (B, 1)
    viewed, = sc.view(col)
    assert viewed.shape == (B, 1)
    got = sc.get(col)  # per-problem values, not the rows view() remembered
    if B == 1:
        assert type(got) is np.float64 and got == 1.0
    else:
        assert got.shape == (B, 1)
        np.testing.assert_array_equal(got[:, 0], np.arange(1.0, B + 1.0))
    # rows read by one reader are the other's (no second conversion)
    t = torch.ones(B, 3, dtype=torch.float64)
    assert sc.view(t)[0] is sc.rows(t)
    made, = sc.tensors(np.full((B, 3), 2.0))
    assert sc.rows(made) is sc.view(made)[0]
    # per-problem values: tensor() then view(), tensors() then get()
    one = sc.tensor(sc.full(3.0))
    assert sc.view(one)[0] is sc.get(one)
    two, = sc.tensors(sc.full(4.0))
    assert sc.get(two) is sc.view(two)[0]
    assert np.all(np.asarray(sc.get(two)) == 4.0)


def test_view_of_small_tensors_copies_and_of_large_ones_shares():
    sc = Scalars(torch.zeros(2, 3, dtype=torch.float64))
    small = torch.tensor([1.0, 2.0], dtype=torch.float64)
    large = torch.arange(host_scalars._SMALL + 1, dtype=torch.float64)
    s, lg = sc.view(small, large)
    assert not np.shares_memory(s, small.numpy())  # through tolist
    assert np.shares_memory(lg, large.numpy())


def test_rows_of_one_large_problem_are_viewed_not_listed():
    # one float64 problem: small rows are copied through tolist, large ones (a
    # tr_solver='lsmr' gradient with 10^5 variables) are viewed instead of being
    # converted entry by entry at every outer iteration
    sc = Scalars(torch.zeros(1, dtype=torch.float64))
    assert sc.floats
    small = torch.arange(3, dtype=torch.float64).reshape(1, 3)
    large = torch.arange(host_scalars._SMALL + 1, dtype=torch.float64).reshape(1, -1)
    s, lg = sc.rows(small), sc.rows(large)
    assert s.shape == (1, 3) and lg.shape == large.shape
    assert not np.shares_memory(s, small.numpy())
    assert np.shares_memory(lg, large.numpy())
    np.testing.assert_array_equal(s, small.numpy())
    assert sc.rows(large) is lg  # remembered on the tensor


@pytest.mark.parametrize("B", [1, 5])
def test_counts_and_indices_host_and_device_agree(B):
    # the loop's decisions ("no row", "some", "every row") and row selections
    mask = torch.tensor([True, False, True, True, False][:B])
    other = ~mask
    host = Scalars(torch.zeros(B, dtype=torch.float64))
    device = Scalars(torch.zeros(B, dtype=torch.float64), host=False)
    h_mask, h_other = host.view(mask, other)
    assert host.count_many(h_mask, h_other) == device.count_many(mask, other)
    assert host.count_many(h_mask, h_other) == [int(mask.sum()), int(other.sum())]
    np.testing.assert_array_equal(host.indices(h_mask).numpy(),
                                  device.indices(mask).numpy())
    assert host.indices(h_mask).dtype == torch.long


@pytest.mark.parametrize("B", [1, 6])
@pytest.mark.parametrize("use_gram", [False, True])
@pytest.mark.parametrize("rank_deficient", [False, True])
def test_subproblem_host_and_device_paths_agree(B, use_gram, rank_deficient):
    fac = _factors(B, use_gram, seed=B, rank_deficient=rank_deficient)
    delta = torch.as_tensor(np.geomspace(10.0, 0.01, B) if B > 1 else [1e-5])
    alpha0 = torch.zeros_like(delta)
    p_h, a_h = solve_trust_region_scipy(fac, delta, alpha0, 12, 3, host=True)
    p_d, a_d = solve_trust_region_scipy(fac, delta, alpha0, 12, 3, host=False)
    assert p_h.shape == p_d.shape == (B, 3) and a_h.shape == a_d.shape == (B,)
    # the same branch per problem (Gauss-Newton step inside, or a damped step)
    assert_bitwise_equal((a_h == 0).numpy(), (a_d == 0).numpy())
    damped = (a_h > 0).numpy()
    assert damped.any()
    d = delta.numpy()
    for p in (p_h, p_d):
        norm = np.linalg.norm(p.numpy(), axis=-1)
        # damped steps are put on the boundary, Gauss-Newton steps fit inside
        np.testing.assert_allclose(norm[damped], d[damped], rtol=1e-9)
        assert (norm[~damped] <= d[~damped] * (1 + 1e-9)).all()
    # both stop the Newton iteration within RTOL of the same root: the steps agree to
    # a fraction of the radius, the parameters to a fraction of their size
    np.testing.assert_allclose(p_h.numpy(), p_d.numpy(), rtol=0, atol=(4 * RTOL * d)[:, None]
                               .repeat(3, 1).max())
    np.testing.assert_allclose(a_h.numpy(), a_d.numpy(), rtol=0.5)


def test_subproblem_nan_row_stays_alone_on_the_host():
    fac = _factors(5, use_gram=False, seed=3)
    delta = torch.as_tensor([1.0, 0.3, 0.1, 0.03, 0.01])
    alpha0 = torch.zeros_like(delta)
    p, a = solve_trust_region_scipy(fac, delta, alpha0, 12, 3, host=True)
    bad = fac._replace(s=fac.s.clone(), uf=fac.uf.clone())
    bad.s[2] = float("nan")
    bad.uf[2] = float("nan")
    p_bad, a_bad = solve_trust_region_scipy(bad, delta, alpha0, 12, 3, host=True)
    keep = [0, 1, 3, 4]
    assert_bitwise_equal(p_bad.numpy()[keep], p.numpy()[keep])
    assert_bitwise_equal(a_bad.numpy()[keep], a.numpy()[keep])


@pytest.mark.parametrize("xp_name", ["numpy", "floats"])
def test_radius_update_and_tests_match_torch(xp_name):
    rng = np.random.default_rng(7)
    n = 64
    delta = rng.uniform(0.1, 2.0, n)
    actual = rng.normal(0.0, 1.0, n)
    predicted = np.where(rng.random(n) < 0.1, 0.0, rng.normal(0.5, 1.0, n))
    actual[:4] = 0.0
    predicted[:2] = 0.0
    step = rng.uniform(0.0, 2.0, n)
    hit = rng.random(n) < 0.5
    cost = rng.uniform(0.0, 1.0, n)
    xnorm = rng.uniform(0.0, 10.0, n)
    finite = rng.random(n) < 0.9
    t = [torch.as_tensor(v) for v in (delta, actual, predicted, step, hit, cost, xnorm, finite)]
    new_t, ratio_t = update_tr_radius(*t[:5])
    code_t = trust_region_code(t[1], t[5], t[3] * 1e-9, t[6], ratio_t, t[7], 0.3, 1e-8)
    if xp_name == "numpy":
        new, ratio = update_tr_radius(delta, actual, predicted, step, hit, np)
        code = trust_region_code(actual, cost, step * 1e-9, xnorm, ratio, finite, 0.3, 1e-8, np)
    else:  # one problem at a time, as numpy.float64 scalars
        rows = [update_tr_radius(*(np.float64(v[i]) if v.dtype != bool else np.bool_(v[i])
                                   for v in (delta, actual, predicted, step, hit)), Floats)
                for i in range(n)]
        new = np.array([r[0] for r in rows])
        ratio = np.array([r[1] for r in rows])
        code = np.array([trust_region_code(np.float64(actual[i]), np.float64(cost[i]),
                                           np.float64(step[i] * 1e-9), np.float64(xnorm[i]),
                                           ratio[i], np.bool_(finite[i]), 0.3, 1e-8, Floats)
                         for i in range(n)])
    np.testing.assert_allclose(new, new_t.numpy(), rtol=1e-9)
    np.testing.assert_allclose(ratio, ratio_t.numpy(), rtol=1e-9)
    np.testing.assert_array_equal(code, code_t.numpy())
    assert set(code.tolist()) > {RUNNING}  # some tests fired


def _rosen(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def _rosen_jac(x):
    return np.array([[-20 * x[0], 10.0], [-1.0, 0.0]])


@pytest.mark.parametrize("method", ["trf", "dogbox"])
@pytest.mark.parametrize("bounds", [(-np.inf, np.inf), ([-np.inf, 1.5], np.inf)])
def test_least_squares_host_and_device_paths_agree(monkeypatch, method, bounds):
    x0 = np.array([2.0, 2.0]) if np.ndim(bounds[0]) else np.array([-1.2, 1.0])
    host = least_squares(_rosen, x0, jac=_rosen_jac, method=method, bounds=bounds)
    monkeypatch.setattr(host_scalars, "HOST", False)
    device = least_squares(_rosen, x0, jac=_rosen_jac, method=method, bounds=bounds)
    assert host.status == device.status and host.nfev == device.nfev
    assert host.njev == device.njev
    # both stop by the same test at the same iteration: x agrees to the xtol scale
    np.testing.assert_allclose(host.x, device.x, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_batch_host_path_keeps_a_nan_row_alone(method):
    rng = np.random.default_rng(11)
    t = np.linspace(0, 3, 30)
    y = 2 * np.exp(-rng.uniform(0.5, 2.0, (6, 1)) * t) + 0.01 * rng.standard_normal((6, 30))

    def fun(x, y):
        return x[:, :1] * np.exp(-x[:, 1:] * t) - y

    x0 = np.ones((6, 2))
    clean = batch_least_squares(fun, x0, args=(y,), method=method)
    x0_bad = x0.copy()
    x0_bad[2, 0] = np.nan
    res = batch_least_squares(fun, x0_bad, args=(y,), method=method)
    keep = [0, 1, 3, 4, 5]
    assert not np.isfinite(np.asarray(res.x)[2]).all()
    for key in ("x", "cost", "nfev", "njev", "status"):
        assert_bitwise_equal(np.asarray(getattr(res, key))[keep],
                             np.asarray(getattr(clean, key))[keep], err_msg=key)


@pytest.mark.parametrize("method", ["trf", "dogbox"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_host_and_device_paths_agree(monkeypatch, method, dtype):
    # a bounded batch (numpy arrays (B,) and (B, n) on the host) against the tensor code
    rng = np.random.default_rng(12)
    t = np.linspace(0, 3, 30)
    B = 8
    y = 2 * np.exp(-rng.uniform(0.5, 2.0, (B, 1)) * t) + 0.01 * rng.standard_normal((B, 30))

    def fun(x, y):
        return x[:, :1] * torch.exp(-x[:, 1:] * torch.as_tensor(t, dtype=x.dtype)) - y

    x0 = torch.ones(B, 2, dtype=dtype)
    yt = torch.as_tensor(y, dtype=dtype)
    kw = dict(args=(yt,), method=method, bounds=([0.0, 0.0], [1.9, 3.0]), dtype=dtype)
    host = batch_least_squares(fun, x0, **kw)
    monkeypatch.setattr(host_scalars, "HOST", False)
    device = batch_least_squares(fun, x0, **kw)
    assert torch.as_tensor(host.x).dtype == dtype
    ok_h = np.asarray(host.status) > 0
    assert ok_h.all() and (np.asarray(device.status) > 0).all()
    # both converge to the same bounded minimum; the tolerance follows the dtype's
    # default ftol/xtol scale (1e-8 in float64, about 1e-4 relative in float32)
    tol = 1e-6 if dtype == torch.float64 else 1e-2
    np.testing.assert_allclose(np.asarray(host.x), np.asarray(device.x), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(host.cost), np.asarray(device.cost), rtol=tol)


def test_for_rows_keeps_large_batches_on_tensors():
    small, large = torch.zeros(100, 4), torch.zeros(10_000, 4)
    assert host_scalars.for_rows(small).host
    assert not host_scalars.for_rows(large).host
    assert host_scalars.for_rows(torch.zeros(1, 10 ** 5)).host  # one problem: the host


@pytest.mark.parametrize("method", ["trf", "dogbox"])
@pytest.mark.parametrize("bounded", [False, True])
def test_large_batch_rule_agrees_with_the_host_path(monkeypatch, method, bounded):
    # GRAIN = 0 makes every batch "large": its rows' work on tensors (what a batch of
    # more than GRAIN entries runs), its (B,) scalars still on the host; a NaN start
    # stays alone on that path too
    rng = np.random.default_rng(13)
    t = np.linspace(0, 3, 30)
    B = 6
    y = 2 * np.exp(-rng.uniform(0.5, 2.0, (B, 1)) * t) + 0.01 * rng.standard_normal((B, 30))

    def fun(x, y):
        return x[:, :1] * np.exp(-x[:, 1:] * t) - y

    x0 = np.ones((B, 2))
    x0[3, 1] = np.nan
    kw = dict(args=(y,), method=method)
    if bounded:
        kw["bounds"] = ([0.0, 0.0], [1.9, 3.0])
    host = batch_least_squares(fun, x0, **kw)
    monkeypatch.setattr(host_scalars, "GRAIN", 0)
    large = batch_least_squares(fun, x0, **kw)
    keep = [0, 1, 2, 4, 5]
    assert not np.isfinite(np.asarray(large.x)[3]).all()
    assert (np.asarray(large.status)[keep] > 0).all()
    assert np.array_equal(np.asarray(host.nfev)[keep], np.asarray(large.nfev)[keep])
    # the two paths differ at most in the last bits of square roots: x to the xtol scale
    np.testing.assert_allclose(np.asarray(host.x)[keep], np.asarray(large.x)[keep],
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(host.cost)[keep], np.asarray(large.cost)[keep],
                               rtol=1e-10)


def test_marked_jacobian_alias_keeps_the_host_rows():
    # loop._marked_finite marks an alias of J finite (never the tensor the caller's jac
    # may hold) and hands it J's host rows, so that the rule's reads of J convert nothing
    from torchimize_scipy._engine.counts import known_finite
    from torchimize_scipy._engine.loop import _marked_finite

    J = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=torch.float64)
    plain = _marked_finite(J)
    assert plain is not J and known_finite(plain) and not known_finite(J)
    assert host_scalars.host_rows(plain) is None  # nothing known: nothing handed over
    rows = host_scalars.Scalars(J).rows(J)  # J's host rows, remembered on J
    alias = _marked_finite(J)
    assert alias is not J and known_finite(alias) and not known_finite(J)
    assert host_scalars.host_rows(alias) is rows
    assert alias.data_ptr() == J.data_ptr()  # the same memory: the rows stay valid
    np.testing.assert_array_equal(host_scalars.Scalars(alias).view(alias)[0], J.numpy())


def test_minpack_status_takes_eps_of_the_values_dtype():
    # the table lookup of MINPACK's epsmch: float64 scalars and arrays, float32 arrays
    from torchimize_scipy._engine.termination import GTOL_TINY, minpack_status

    def status(gnorm, dtype):
        one = np.ones(1, dtype=dtype)
        return minpack_status(0.5 * one, 0.5 * one, one, one, one, gnorm * one, np.ones(1),
                              100, 1e-8, 1e-8, xp=np)[0]

    eps32 = float(np.finfo(np.float32).eps)
    assert status(eps32 / 2, np.float32) == GTOL_TINY  # below float32's epsmch
    assert status(eps32 / 2, np.float64) == RUNNING  # far above float64's
    assert status(np.finfo(np.float64).eps, np.float64) == GTOL_TINY
    one = np.float64(1.0)
    assert minpack_status(one / 2, one / 2, one, one, one, np.float64(1e-17), np.int64(1),
                          100, 1e-8, 1e-8, xp=Floats) == GTOL_TINY


def test_one_problem_scalars_follow_the_host_switch(monkeypatch):
    """scalars/for_rows keep one problem's object by dtype; a change of HOST makes a new
    one (the device path on the CPU), and switching back returns the host's again."""
    from torchimize_scipy._engine import host_scalars as hs_mod

    x = torch.zeros(1, 3, dtype=torch.float64)
    first = hs_mod.for_rows(x)
    assert first.host and first.floats and hs_mod.scalars(x) is first
    assert hs_mod.for_rows(torch.zeros(1, 3, dtype=torch.float32)).floats is False
    monkeypatch.setattr(hs_mod, "HOST", False)
    dev = hs_mod.for_rows(x)
    assert not dev.host and not dev.floats and hs_mod.scalars(x) is dev
    monkeypatch.setattr(hs_mod, "HOST", None)
    again = hs_mod.for_rows(x)
    assert again.host and again.floats


def test_where_rows_selects_as_torch_where_from_host_values():
    """host_scalars.where_rows: numpy's selection of the rows both tensors remember, the
    values of torch.where, remembered by the result; None without both host values."""
    from torchimize_scipy._engine import host_scalars as hs_mod

    hs = hs_mod.Scalars(torch.zeros(4, 3, dtype=torch.float64))
    mask = np.array([True, False, True, False])
    new_rows = hs.tensor_rows(np.arange(12.0).reshape(4, 3))
    old_rows = hs.tensor_rows(-np.arange(12.0).reshape(4, 3))
    got = hs_mod.where_rows(mask, new_rows, old_rows)
    want = torch.where(torch.from_numpy(mask)[:, None], new_rows, old_rows)
    assert torch.equal(got, want) and hs.rows(got) is hs_mod.host_rows(got)
    new_v, old_v = hs.tensors(np.array([1, 2, 3, 4]), np.array([5, 6, 7, 8]))
    got = hs_mod.where_rows(mask, new_v, old_v)
    assert got.tolist() == [1, 6, 3, 8] and hs_mod.host_value(got).tolist() == [1, 6, 3, 8]
    plain = torch.zeros(4, 3, dtype=torch.float64)  # (no host value: torch's where instead)
    assert hs_mod.where_rows(mask, new_rows, plain) is None


def test_batch_rows_keeps_a_row_alone_on_the_batch_path():
    from torchimize_scipy._engine import host_scalars

    x = torch.zeros(1, 3, dtype=torch.float64)
    assert host_scalars.for_rows(x).floats  # one problem: host scalars
    with host_scalars.batch_rows():
        sc = host_scalars.for_rows(x)
        assert not sc.floats and sc.host  # a batch's row alone: arrays of one entry
        assert not host_scalars.Scalars(x).floats
        with host_scalars.batch_rows(False):  # a single solve inside a batch's function
            assert host_scalars.for_rows(x).floats
        assert not host_scalars.for_rows(x).floats
    assert host_scalars.for_rows(x).floats


def test_one_problems_norm_is_the_correctly_rounded_root_of_its_sum_in_order():
    """One float64 problem's norms on Python floats (no torch reduction): the squares
    added in order, ``math.sqrt``; remembered on the tensor; inf and NaN kept. A batch
    keeps torch's norms."""
    import math

    gen = torch.Generator().manual_seed(3)
    for n in (1, 2, 9, 40):
        t = torch.randn(1, n, generator=gen, dtype=torch.float64) * 1e3
        sc = Scalars(t)
        assert sc.floats
        got = sc.norm(t)
        total = 0.0
        for v in t[0].tolist():
            total += v * v
        assert type(got) is np.float64 and got == math.sqrt(total)
        # (torch's sum groups the squares otherwise: within the bound of a sum of n terms)
        assert abs(got - float(torch.linalg.vector_norm(t))) <= n * np.finfo(float).eps * got
        assert sc.norm(t, keepdim=True) is got  # (remembered; the scalar is both)
    for bad, want in ((float("inf"), math.inf), (float("nan"), None)):
        t = torch.tensor([[1.0, bad]], dtype=torch.float64)
        value = Scalars(t).norm(t)
        assert (value == want) if want is not None else np.isnan(value)
    rows = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    sc = Scalars(rows)
    assert not sc.floats
    assert np.array_equal(sc.norm(rows), torch.linalg.vector_norm(rows, dim=-1).numpy())
