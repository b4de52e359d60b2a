"""Dask inputs: lazy block-by-block results, on threads and on a distributed cluster.

Problems are independent and each block runs the in-memory code path on its
problems, so the lazy results are compared bit for bit with the in-memory call
(docs/parity.md: "a batch cut into other chunks" is the same path). The
distributed tests share one ``LocalCluster`` of two worker processes per module.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
import torch

import torchimize_scipy
from torchimize_scipy import batch_curve_fit, batch_least_squares

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

from _parity import assert_bitwise_equal  # noqa: E402

from torchimize_scipy.dask import BlockError, DaskBatchResult, configure_workers  # noqa: E402

#: this process's environment before the module's cluster starts
ENV_AT_IMPORT = dict(os.environ)

FIELDS = ("x", "cost", "fun", "jac", "grad", "optimality", "active_mask", "nfev", "njev",
          "status", "success")


#: thread-count variables of the caller that the test clusters' workers do not inherit
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _local_cluster(n_workers: int) -> distributed.LocalCluster:
    """Worker processes on loopback that import this checkout's torchimize_scipy."""
    root = str(pathlib.Path(torchimize_scipy.__file__).parents[1])
    saved = dict(os.environ)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = root + (os.pathsep + old if old else "")
    # dask's defaults for the workers' thread counts (the nanny's OMP_NUM_THREADS=1, ...)
    # whatever the caller's environment says: a value set there would reach the workers
    for name in THREAD_VARIABLES:
        os.environ.pop(name, None)
    try:
        return distributed.LocalCluster(n_workers=n_workers, processes=True,
                                        threads_per_worker=1, dashboard_address=None,
                                        host="127.0.0.1")
    finally:
        # the nanny also writes its worker environment (MALLOC_TRIM_THRESHOLD_,
        # OMP_NUM_THREADS, ...) into this process's os.environ: put it back
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def client():
    """Two worker processes on loopback that import this checkout's torchimize_scipy."""
    cluster = _local_cluster(2)
    c = distributed.Client(cluster)
    c.run(__import__, "torchimize_scipy.dask")  # the imports (torch: seconds) before timing
    yield c
    c.close()
    cluster.close()


@pytest.fixture()
def fresh_client():
    """One new worker process with dask's default environment, that has run no block."""
    cluster = _local_cluster(1)
    c = distributed.Client(cluster)
    c.run(__import__, "torchimize_scipy.dask")
    yield c
    c.close()
    cluster.close()


def decay_data(B: int, M: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, M)
    rates = rng.uniform(0.5, 3.0, B)
    amps = rng.uniform(0.5, 2.0, B)
    y = amps[:, None] * np.exp(-rates[:, None] * t) + 0.01 * rng.standard_normal((B, M))
    return t, y


def residuals(x, y, t):  # x (b, 2), y (b, M), t (M,) shared
    return x[:, :1] * np.exp(-x[:, 1:] * t) - y


def decay(x, a, k):
    return a * np.exp(-k * x)


def assert_same_result(lazy, ref):
    got = lazy.compute() if isinstance(lazy, DaskBatchResult) else lazy
    for name in FIELDS:
        if ref[name] is None:
            assert got[name] is None, name
        else:
            assert_bitwise_equal(got[name], ref[name], err_msg=name)
    assert got["message"] == ref["message"]


# ---------------------------------------------------------------------------
# local schedulers
# ---------------------------------------------------------------------------
def test_dask_x0_and_args_with_other_chunks_match_in_memory():
    t, y = decay_data(230)
    x0 = np.ones((230, 2))
    ref = batch_least_squares(residuals, x0, args=(y, t))
    lazy = batch_least_squares(residuals, da.from_array(x0, chunks=(70, 1)),
                               args=(da.from_array(y, chunks=(50, 7)), t))
    assert isinstance(lazy, DaskBatchResult)
    assert len(lazy) == 230
    assert lazy.x.chunks[0] == (70, 70, 70, 20)  # x0's blocks lead
    assert_same_result(lazy.compute(scheduler="threads"), ref)


def test_float32_torch_x0_computes_in_float32_as_in_memory():
    """A float32 tensor ``x0`` (or ``p0``) sets the blocks' dtype, as in memory (``fun``
    receives numpy blocks without ``device``): the same as the in-memory call on numpy
    float32 arrays with ``dtype=torch.float32``, the same path."""
    t, y = decay_data(60)
    t32, y32 = t.astype(np.float32), y.astype(np.float32)
    calls = []

    def seen(x, y, t):
        calls.append(x.dtype)
        return residuals(x, y, t)

    x0 = torch.ones(60, 2)
    ref = batch_least_squares(residuals, x0.numpy(), args=(y32, t32), dtype=torch.float32)
    lazy = batch_least_squares(seen, x0, args=(da.from_array(y32, chunks=20), t32))
    assert lazy.x.dtype == np.float32
    assert_same_result(lazy.compute(scheduler="sync"), ref)
    assert set(calls) == {np.dtype(np.float32)}
    popt_ref, _ = batch_curve_fit(decay, t32, y32, x0.numpy(), dtype=torch.float32)
    popt, _ = batch_curve_fit(decay, t32, da.from_array(y32, chunks=20), x0)
    popt = popt.compute(scheduler="sync")
    assert popt.dtype == np.float32
    assert_bitwise_equal(popt, popt_ref)


def test_nothing_runs_before_compute():
    calls = []
    t, y = decay_data(40)

    def counted(x, y, t):
        calls.append(x.shape[0])
        return residuals(x, y, t)

    lazy = batch_least_squares(counted, da.from_array(np.ones((40, 2)), chunks=20), args=(y, t))
    assert calls == []
    res = lazy.compute(scheduler="sync")
    assert calls  # computed now
    assert res.success.all()


def test_shared_arg_as_long_as_a_block_stays_shared():
    # t has 20 entries and the blocks hold 20 problems: in a call on one block
    # it would be taken for a per-problem argument
    t, y = decay_data(60)
    ref = batch_least_squares(residuals, np.ones((60, 2)), args=(y, t))
    lazy = batch_least_squares(residuals, da.from_array(np.ones((60, 2)), chunks=20),
                               args=(y, t))
    assert_same_result(lazy.compute(scheduler="sync"), ref)


def test_shared_dask_kwargs_reach_every_block_whole():
    t, y = decay_data(50)

    def fun(x, y, *, t):
        assert isinstance(t, np.ndarray) and t.shape == (20,)
        return residuals(x, y, t)

    ref = batch_least_squares(fun, np.ones((50, 2)), args=(y,), kwargs={"t": t})
    lazy = batch_least_squares(fun, np.ones((50, 2)), args=(da.from_array(y, chunks=25),),
                               kwargs={"t": da.from_array(t, chunks=5)})
    assert lazy.x.numblocks == (2, 1)  # the blocks of the dask argument
    assert_same_result(lazy.compute(scheduler="sync"), ref)


def test_per_problem_bounds_and_x_scale_are_cut_with_the_problems():
    t, y = decay_data(90)
    lb = np.tile([0.0, 0.1], (90, 1))
    ub = np.tile([3.0, 5.0], (90, 1))
    ub[::3, 1] = 1.0  # some problems with an active bound
    scale = np.tile([1.0, 2.0], (90, 1))
    ref = batch_least_squares(residuals, np.ones((90, 2)) * 0.5, bounds=(lb, ub),
                              x_scale=scale, args=(y, t))
    lazy = batch_least_squares(residuals, da.from_array(np.ones((90, 2)) * 0.5, chunks=40),
                               bounds=(da.from_array(lb, chunks=30), ub), x_scale=scale,
                               args=(y, t))
    assert_same_result(lazy.compute(scheduler="sync"), ref)
    assert lazy.active_mask.dtype == ref.active_mask.dtype


def test_bounds_object_with_dask_bounds_dispatches():
    from scipy.optimize import Bounds

    t, y = decay_data(30)
    lb = da.zeros((30, 2), chunks=15)
    lazy = batch_least_squares(residuals, np.ones((30, 2)), bounds=Bounds(lb, 10.0),
                               args=(y, t))
    assert isinstance(lazy, DaskBatchResult) and lazy.x.numblocks == (2, 1)
    ref = batch_least_squares(residuals, np.ones((30, 2)), bounds=Bounds(np.zeros((30, 2)), 10.0),
                              args=(y, t))
    assert_same_result(lazy.compute(scheduler="sync"), ref)


def test_lm_without_callable_jac_has_no_njev_and_unknown_m():
    t, y = decay_data(30)
    lazy = batch_least_squares(residuals, da.from_array(np.ones((30, 2)), chunks=10),
                               method="lm", args=(y, t), return_jac=False)
    assert lazy.njev is None and lazy.jac is None
    assert np.isnan(lazy.fun.shape[1])  # m is known only once fun has run
    ref = batch_least_squares(residuals, np.ones((30, 2)), method="lm", args=(y, t),
                              return_jac=False)
    assert_same_result(lazy.compute(scheduler="sync"), ref)


def test_failing_problem_fails_alone():
    t, y = decay_data(40)
    y[7, 3] = np.nan  # non-finite residuals at the start: status 5 for problem 7 only
    x0 = np.ones((40, 2))
    ref = batch_least_squares(residuals, x0, args=(y, t))
    res = batch_least_squares(residuals, da.from_array(x0, chunks=10),
                              args=(y, t)).compute(scheduler="sync")
    assert res.status[7] == ref.status[7] and not res.success[7]
    assert res.success[np.arange(40) != 7].all()
    assert_same_result(res, ref)


def test_failing_block_names_its_problems():
    t, y = decay_data(40)

    def fragile(x, y, t):
        if np.any(y > 100):
            raise FloatingPointError("overflow in the model")
        return residuals(x, y, t)

    y[25, 0] = 1e3
    lazy = batch_least_squares(fragile, da.from_array(np.ones((40, 2)), chunks=10),
                               args=(y, t))
    with pytest.raises(FloatingPointError, match=r"problems 20 to 29\]"):
        lazy.compute(scheduler="sync")


def test_exception_that_cannot_carry_a_message_becomes_block_error():
    class Strict(Exception):
        def __init__(self, code: int, where: str) -> None:
            super().__init__(code, where)

    def broken(x):
        raise Strict(3, "model")

    lazy = batch_least_squares(broken, da.from_array(np.ones((8, 1)), chunks=4))
    with pytest.raises(BlockError, match=r"problems (0 to 3|4 to 7)\]"):
        lazy.compute(scheduler="sync")


def test_validation_before_anything_runs():
    x0 = da.ones((10, 2), chunks=5)
    with pytest.raises(ValueError, match="`method` must be"):
        batch_least_squares(residuals, x0, method="newton")
    with pytest.raises(ValueError, match="`progress` is not supported"):
        batch_least_squares(residuals, x0, progress=True)
    with pytest.raises(ValueError, match=r"`x0` must have shape \(B, n\)"):
        batch_least_squares(residuals, da.ones(10, chunks=5))
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        batch_least_squares(residuals, x0[x0[:, 0] > 0])
    with pytest.raises(ValueError, match="`bounds` must contain 2 elements"):
        batch_least_squares(residuals, x0, bounds=(0, 1, 2))


def test_curve_fit_validation_before_anything_runs():
    t, y = decay_data(10)
    yd = da.from_array(y, chunks=5)
    p0 = np.ones((10, 2))
    with pytest.raises(ValueError, match="`method` must be None"):
        batch_curve_fit(decay, t, yd, p0, method="newton")
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        batch_curve_fit(decay, t, yd, p0, nan_policy="drop")
    with pytest.raises(ValueError, match="'args' is not a supported"):
        batch_curve_fit(decay, t, yd, p0, args=(1,))
    with pytest.raises(ValueError, match="`return_jac` cannot be set"):
        batch_curve_fit(decay, t, yd, p0, return_jac=False)
    with pytest.raises(ValueError, match=r"`ydata` must have shape \(B, M\)"):
        batch_curve_fit(decay, t, yd[:5], p0)
    with pytest.raises(ValueError, match="`method` must be given when `bounds`"):
        batch_curve_fit(decay, t, yd, p0, bounds=(da.zeros((10, 2), chunks=5), np.inf))
    with pytest.raises(ValueError, match=r"`p0` must have shape \(B, n\)"):
        batch_curve_fit(decay, t, yd, p0[0])


def test_curve_fit_shared_predictors_as_many_as_a_block():
    # two predictors stacked (2, M) and blocks of 2 problems
    rng = np.random.default_rng(3)
    X = rng.uniform(0, 1, (2, 15))
    coef = rng.uniform(1, 2, (6, 2))
    y = coef[:, :1] * X[0] + coef[:, 1:] * X[1]

    def plane(x, a, b):
        return a * x[0] + b * x[1]

    ref = batch_curve_fit(plane, X, y, np.ones((6, 2)))
    got = dask.compute(*batch_curve_fit(plane, X, da.from_array(y, chunks=2), np.ones((6, 2))),
                       scheduler="sync")
    assert_bitwise_equal(got[0], ref[0])
    assert_bitwise_equal(got[1], ref[1])


def test_curve_fit_method_decided_for_the_whole_batch():
    # only the last block has a finite bound: the in-memory call uses 'trf' for all
    t, y = decay_data(20)
    lb = np.full((20, 2), -np.inf)
    lb[-1] = 0.0
    ref = batch_curve_fit(decay, t, y, np.ones((20, 2)), bounds=(lb, np.inf), full_output=True)
    out = batch_curve_fit(decay, t, da.from_array(y, chunks=10), np.ones((20, 2)),
                          bounds=(lb, np.inf), full_output=True)
    got = dask.compute(*out, scheduler="sync")
    for a, b in zip(got, ref, strict=True):
        if isinstance(b, dict):
            assert a.keys() == b.keys()
            for k in b:
                assert_bitwise_equal(a[k], b[k], err_msg=k)
        elif isinstance(b, list):
            assert list(a) == b
        else:
            assert_bitwise_equal(a, b)


def test_float32_results_keep_the_declared_dtype():
    t, y = decay_data(30)
    lazy = batch_least_squares(residuals, da.from_array(np.ones((30, 2)), chunks=10),
                               args=(y, t), dtype=torch.float32)
    assert lazy.x.dtype == np.float32
    res = lazy.compute(scheduler="sync")
    assert res.x.dtype == np.float32 and res.nfev.dtype == np.int64


# ---------------------------------------------------------------------------
# distributed: worker processes
# ---------------------------------------------------------------------------
def test_distributed_least_squares_matches_in_memory(client):
    t, y = decay_data(400, seed=1)
    x0 = np.ones((400, 2))
    ref = batch_least_squares(residuals, x0, args=(y, t), jac="3-point")
    lazy = batch_least_squares(residuals, da.from_array(x0, chunks=100),
                               args=(da.from_array(y, chunks=(130, 20)), t), jac="3-point")
    assert_same_result(lazy.compute(), ref)


def test_distributed_curve_fit_full_output_matches_in_memory(client):
    rng = np.random.default_rng(5)
    B, M = 300, 25
    X = np.sort(rng.uniform(0, 2, (B, M)), axis=1)  # per-problem xdata
    a, k = rng.uniform(0.5, 2, B), rng.uniform(0.5, 3, B)
    sigma = rng.uniform(0.01, 0.03, (B, M))
    y = a[:, None] * np.exp(-k[:, None] * X) + sigma * rng.standard_normal((B, M))
    y[11, 4] = np.nan
    lb, ub = np.zeros((B, 2)), np.full((B, 2), 10.0)
    p0 = np.ones((B, 2))
    kw = {"sigma": sigma, "bounds": (lb, ub), "method": "trf", "full_output": True,
          "nan_policy": "omit"}
    ref = batch_curve_fit(decay, X, y, p0, **kw)
    kw_d = dict(kw, sigma=da.from_array(sigma, chunks=60),
                bounds=(da.from_array(lb, chunks=120), ub))
    out = batch_curve_fit(decay, da.from_array(X, chunks=90), da.from_array(y, chunks=75),
                          p0, **kw_d)
    assert out[0].chunks[0] == (75, 75, 75, 75)  # ydata's blocks: p0 is in memory
    got = dask.compute(*out)
    assert_bitwise_equal(got[0], ref[0])
    assert_bitwise_equal(got[1], ref[1])
    for name in ("nfev", "fvec"):
        assert_bitwise_equal(got[2][name], ref[2][name], err_msg=name)
    assert list(got[3]) == ref[3]
    assert_bitwise_equal(got[4], ref[4])
    assert np.isfinite(got[0][11]).all()  # the NaN observation omitted, not fatal


def test_distributed_fun_with_captured_tensor_on_a_device(client):
    # a closure is shipped by value (cloudpickle), the tensor it holds with it;
    # with device= the blocks reach fun as tensors on each worker
    t_np, y = decay_data(40, seed=2)
    t = torch.as_tensor(t_np)

    def model(x, a, k):
        return a * torch.exp(-k * t)

    ref = batch_curve_fit(model, None, torch.as_tensor(y),
                          torch.ones(40, 2, dtype=torch.float64))
    popt, pcov = batch_curve_fit(model, None, da.from_array(y, chunks=20), np.ones((40, 2)),
                                 device="cpu")
    got = dask.compute(popt, pcov)
    assert isinstance(got[0], np.ndarray)
    assert_bitwise_equal(got[0], ref[0].numpy())
    assert_bitwise_equal(got[1], ref[1].numpy())


def test_distributed_failing_block_is_reported_with_its_problems(client):
    t, y = decay_data(60)
    y[45, 0] = np.nan
    out = batch_curve_fit(decay, t, da.from_array(y, chunks=20), np.ones((60, 2)),
                          nan_policy="raise")
    with pytest.raises(ValueError, match=r"problems 40 to 59\]"):
        dask.compute(*out)


def test_persist_keeps_results_on_the_cluster(client):
    t, y = decay_data(80)
    ref = batch_least_squares(residuals, np.ones((80, 2)), args=(y, t))
    lazy = batch_least_squares(residuals, da.from_array(np.ones((80, 2)), chunks=40),
                               args=(y, t)).persist()
    assert isinstance(lazy, DaskBatchResult)
    assert_same_result(lazy.compute(), ref)


def test_distributed_xarray_curvefit_matches_xarray(client):
    xr = pytest.importorskip("xarray")
    from torchimize_scipy.xarray import curvefit

    rng = np.random.default_rng(8)
    w = np.linspace(-1.0, 1.0, 32)
    a, mu = rng.uniform(0.5, 2.0, (10, 6, 1)), rng.uniform(-0.3, 0.3, (10, 6, 1))
    cube = xr.DataArray(a * np.exp(-((w - mu) ** 2) / 0.08)
                        + 0.01 * rng.standard_normal((10, 6, 32)),
                        dims=("y", "x", "band"), coords={"band": w})

    def peak(x, a, mu):
        return a * np.exp(-((x - mu) ** 2) / 0.08)

    ref = cube.curvefit("band", peak, p0={"mu": 0.0})
    lazy = curvefit(cube.chunk({"y": 4}), "band", peak, p0={"mu": 0.0})
    got = lazy.compute()
    np.testing.assert_allclose(got.curvefit_coefficients.values,
                               ref.curvefit_coefficients.values,
                               rtol=np.sqrt(1.49012e-8))  # as tests/test_xarray.py


def test_jac_sparsity_is_shipped_to_every_block():
    # Broyden tridiagonal problems, one sparsity structure for the whole batch
    def broyden(x, c):
        f = (3 - 2 * x) * x + c
        f[:, 1:] -= x[:, :-1]
        f[:, :-1] -= 2 * x[:, 1:]
        return f

    n, B = 12, 20
    S = np.eye(n, dtype=bool) | np.eye(n, k=1, dtype=bool) | np.eye(n, k=-1, dtype=bool)
    c = np.linspace(0.5, 1.5, B)[:, None] * np.ones((B, n))
    x0 = -np.ones((B, n))
    ref = batch_least_squares(broyden, x0, args=(c,), jac_sparsity=S)
    res = batch_least_squares(broyden, da.from_array(x0, chunks=5), args=(c,),
                              jac_sparsity=S).compute(scheduler="sync")
    assert ref.success.all()
    assert_same_result(res, ref)


# ---------------------------------------------------------------------------
# configure_workers
# ---------------------------------------------------------------------------
def _mmapped_by_one_mib_array() -> dict:
    """On a worker: does a new 1 MiB array get its own mmap? (glibc's mallinfo2)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2().hblks
    a = np.empty(2**17)  # 1 MiB, like a block of 2,000 problems of 64 points
    a[:] = 1.0
    during = libc.mallinfo2().hblks
    del a
    from torchimize_scipy import _dask_workers

    return {"mmapped": during > before, "torch_threads": torch.get_num_threads(),
            "trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
            "mmap": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
            "auto": _dask_workers._AUTO["applied"]}


def test_fixture_leaves_the_test_process_environment_alone(client):
    # regression: LocalCluster's nanny wrote MALLOC_TRIM_THRESHOLD_ and the
    # thread variables of its workers into the test process's os.environ
    nanny_env = dask.config.get("distributed.nanny.pre-spawn-environ")
    assert "MALLOC_TRIM_THRESHOLD_" in nanny_env
    workers = client.run(lambda: {k: os.environ.get(k) for k in nanny_env})
    assert all(env["MALLOC_TRIM_THRESHOLD_"] is not None for env in workers.values())
    assert {k: os.environ.get(k) for k in nanny_env} == \
        {k: ENV_AT_IMPORT.get(k) for k in nanny_env}


@pytest.mark.skipif(not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"),
                    reason="the allocator settings are glibc's")
def test_configure_workers_stops_mmap_per_array_and_sets_torch_threads(client):
    before = client.run(_mmapped_by_one_mib_array)
    for state in before.values():
        if state["trim"] == "65536" and state["mmap"] is None and not state["auto"]:
            assert state["mmapped"]  # dask's nanny default: a fresh mapping per mid-size array
    done = configure_workers(client, torch_threads=1)
    assert sorted(done) == sorted(before)
    assert all(d == {"malloc": True, "torch_threads": 1} for d in done.values())
    after = client.run(_mmapped_by_one_mib_array)
    assert not any(state["mmapped"] for state in after.values())
    assert all(state["torch_threads"] == 1 for state in after.values())


def test_configure_workers_none_leaves_settings_alone(client):
    threads = client.run(torch.get_num_threads)
    done = configure_workers(client, mmap_threshold=None, trim_threshold=None,
                             torch_threads=None)
    assert {a: d["torch_threads"] for a, d in done.items()} == threads


def test_configure_workers_validation():
    with pytest.raises(ValueError, match="`mmap_threshold` must be None or an integer"):
        configure_workers(object(), mmap_threshold=2**31)
    with pytest.raises(ValueError, match="`trim_threshold` must be None or an integer"):
        configure_workers(object(), trim_threshold=-1)
    with pytest.raises(ValueError, match="`torch_threads` must be None or a positive"):
        configure_workers(object(), torch_threads=0)
    with pytest.raises(ValueError, match="`quiet` must be True or False"):
        configure_workers(object(), quiet="yes")


def _worker_callbacks(dask_worker) -> dict:
    """On a worker: (period in ms, running) of the callbacks ``quiet`` changes."""
    return {name: (dask_worker.periodic_callbacks[name].callback_time,
                   dask_worker.periodic_callbacks[name].is_running())
            for name in ("profile", "profile-cycle", "tick", "monitor")
            if name in dask_worker.periodic_callbacks}


def test_configure_workers_quiet_stops_the_profiler_and_slows_tick_and_monitor(fresh_client):
    (before,) = fresh_client.run(_worker_callbacks).values()
    assert before["profile"][1] and before["tick"][0] < 1000  # dask's defaults
    done = configure_workers(fresh_client, mmap_threshold=None, trim_threshold=None,
                             torch_threads=None, quiet=True)
    assert [d["quiet"] for d in done.values()] == [True]
    (after,) = fresh_client.run(_worker_callbacks).values()
    assert not after["profile"][1] and not after["profile-cycle"][1]
    assert after["tick"] == (1000.0, True) and after["monitor"][0] >= 1000.0
    assert after["monitor"][1]
    _one_dask_curve_fit()  # the worker still computes
    again = configure_workers(fresh_client, mmap_threshold=None, trim_threshold=None,
                              torch_threads=None, quiet=True)
    assert [d["quiet"] for d in again.values()] == [False]  # nothing left to change


GLIBC = pytest.mark.skipif(not hasattr(os, "confstr") or not os.confstr("CS_GNU_LIBC_VERSION"),
                           reason="the allocator settings are glibc's")


def _set_auto(value: bool) -> None:
    from torchimize_scipy._dask_workers import AUTO_KEY

    dask.config.set({AUTO_KEY: value})


def _one_dask_curve_fit(**compute_options) -> None:
    t, y = decay_data(300)
    popt, _ = dask.compute(*batch_curve_fit(decay, t, da.from_array(y, chunks=300),
                                            np.ones((300, 2))), **compute_options)
    assert np.isfinite(popt).all()


@GLIBC
def test_first_block_sets_the_allocator_of_a_worker_with_dask_defaults(fresh_client):
    # regression (issue 16): with dask's default worker environment every array
    # above 128 KiB was mapped anew, and our xarray curvefit ran slower than xarray's
    (before,) = fresh_client.run(_mmapped_by_one_mib_array).values()
    assert before["trim"] == "65536" and before["mmap"] is None
    assert before["mmapped"] and before["auto"] is None
    _one_dask_curve_fit()
    (after,) = fresh_client.run(_mmapped_by_one_mib_array).values()
    assert after["auto"] is True
    assert not after["mmapped"]


@GLIBC
def test_automatic_allocator_setting_can_be_turned_off_and_yields_to_configure_workers(
        fresh_client):
    fresh_client.run(_set_auto, False)
    _one_dask_curve_fit()
    (off,) = fresh_client.run(_mmapped_by_one_mib_array).values()
    assert off["mmapped"] and off["auto"] is None  # not decided: can be turned on later
    configure_workers(fresh_client, mmap_threshold=2**22, torch_threads=None)
    fresh_client.run(_set_auto, True)
    _one_dask_curve_fit()
    (user,) = fresh_client.run(_mmapped_by_one_mib_array).values()
    assert user["auto"] is False  # the user's thresholds stay
    assert not user["mmapped"]


def test_automatic_allocator_setting_stays_out_of_the_callers_process(monkeypatch):
    from torchimize_scipy import _dask_workers as w

    monkeypatch.setitem(w._AUTO, "applied", None)
    monkeypatch.setattr(w, "_mallopt", lambda *a: pytest.fail("mallopt called"))
    _one_dask_curve_fit(scheduler="threads")  # the blocks run in this process
    assert w._AUTO["applied"] is False


@pytest.mark.parametrize(("env", "fixed"), [
    ({"MALLOC_TRIM_THRESHOLD_": "65536"}, True),                     # dask's nanny
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=65536"}, True),
    ({"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "1048576"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576:glibc.malloc.trim_threshold=1"},
     False),
    ({}, False),                                                       # glibc's adaptive one
])
def test_fixed_threshold_is_read_from_the_start_environment(monkeypatch, env, fixed):
    from torchimize_scipy import _dask_workers as w

    monkeypatch.setattr(w, "_start_environment", lambda: dict(env))
    assert w._started_with_fixed_threshold() is fixed


def test_start_environment_is_the_process_start_one(monkeypatch):
    from torchimize_scipy import _dask_workers as w

    monkeypatch.setenv("TORCHIMIZE_SCIPY_TEST_LATE_VARIABLE", "1")
    env = w._start_environment()
    assert env.get("PATH") == ENV_AT_IMPORT.get("PATH")
    if os.path.exists("/proc/self/environ"):
        assert "TORCHIMIZE_SCIPY_TEST_LATE_VARIABLE" not in env


@GLIBC
def test_forced_allocator_setting_stops_mmap_per_array_in_a_nanny_like_process():
    # a process started as dask's nanny starts workers: the 128 KiB threshold is fixed
    # and a 1 MiB array is mapped anew; worker_allocator(force=True) (what a worker's
    # first block does when the worker conditions hold) makes it come from the heap
    import subprocess
    import sys

    code = (
        "import ctypes, numpy as np\n"
        "from torchimize_scipy import _dask_workers as w\n"
        "class M(ctypes.Structure):\n"
        "    _fields_ = [(k, ctypes.c_size_t) for k in ('arena', 'ordblks', 'smblks', 'hblks',"
        " 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
        "libc = ctypes.CDLL(None); libc.mallinfo2.restype = M\n"
        "def mapped():\n"
        "    before = libc.mallinfo2().hblks\n"
        "    a = np.ones(2**17)\n"
        "    return libc.mallinfo2().hblks > before\n"
        "print(mapped(), w._started_with_fixed_threshold(), w.worker_allocator(force=True),"
        " w.worker_allocator(), mapped())\n")
    root = str(pathlib.Path(torchimize_scipy.__file__).parents[1])
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536", PYTHONPATH=root)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=300).stdout.split()
    # mapped per array, threshold fixed at start; set (and remembered); no longer mapped
    assert out == ["True", "True", "True", "True", "False"]


# ---------------------------------------------------------------------------
# torch's threads on workers (issue 16)
# ---------------------------------------------------------------------------
def _set_torch_threads(n: int) -> int:
    """In a task (the worker's executor thread): torch's count of that thread."""
    torch.set_num_threads(n)
    return torch.get_num_threads()


def _task_threads(client) -> int:
    # nthreads() asks the scheduler; scheduler_info() returns the client's cached identity,
    # which the client's periodic refresh (n_workers=0, no workers) can overwrite
    (worker,) = client.nthreads()
    return client.submit(torch.get_num_threads, pure=False, workers=[worker]).result()


def _set_threads_key(value: bool) -> None:
    from torchimize_scipy._dask_workers import THREADS_KEY

    dask.config.set({THREADS_KEY: value})


def test_first_block_lowers_torch_threads_raised_in_a_worker(fresh_client):
    # regression (issue 16): bench_xarray's main module, which spawn imports again in
    # every worker, set OMP_NUM_THREADS=2 before torch was imported there; 2 workers x 2
    # torch threads on 2 cores spent 4x the CPU per pixel of configured workers
    (start,) = fresh_client.run(lambda: __import__(
        "torchimize_scipy._dask_workers")._dask_workers._start_thread_count()).values()
    assert start == 1  # dask's nanny: OMP_NUM_THREADS=1
    fresh_client.run(_set_threads_key, False)
    fresh_client.submit(_set_torch_threads, 2, pure=False).result()
    _one_dask_curve_fit()
    assert _task_threads(fresh_client) == 2  # turned off: left as it is
    fresh_client.run(_set_threads_key, True)
    _one_dask_curve_fit()
    assert _task_threads(fresh_client) == 1
    fresh_client.submit(_set_torch_threads, 2, pure=False).result()
    _one_dask_curve_fit()  # every block, not only the first
    assert _task_threads(fresh_client) == 1


def test_configure_workers_threads_reach_executor_threads_that_computed_before(fresh_client):
    # torch's count is per thread and client.run runs in the worker's event loop: the
    # count set there did not reach the thread that had run blocks before
    _one_dask_curve_fit()
    assert _task_threads(fresh_client) == 1
    done = configure_workers(fresh_client, mmap_threshold=None, trim_threshold=None,
                             torch_threads=2)
    assert [d["torch_threads"] for d in done.values()] == [2]
    assert _task_threads(fresh_client) == 1  # the executor thread kept its count
    _one_dask_curve_fit()
    assert _task_threads(fresh_client) == 2  # the user's count, not lowered to the nanny's 1


def test_worker_threads_stays_out_of_the_callers_process(monkeypatch):
    from torchimize_scipy import _dask_workers as w

    monkeypatch.setitem(w._AUTO, "threads", None)
    monkeypatch.setattr(w, "_start_thread_count", lambda: pytest.fail("not a worker"))
    threads = torch.get_num_threads()
    _one_dask_curve_fit(scheduler="threads")  # the blocks run in this process
    assert w._AUTO["threads"] == 0
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(("env", "count"), [
    ({"OMP_NUM_THREADS": "1"}, 1),   # dask's nanny
    ({"OMP_NUM_THREADS": "4,2"}, 4),  # OpenMP's nested form: the outer level
    ({"OMP_NUM_THREADS": "0"}, None),
    ({"OMP_NUM_THREADS": "many"}, None),
    ({}, None),
])
def test_start_thread_count_is_read_from_the_start_environment(monkeypatch, env, count):
    from torchimize_scipy import _dask_workers as w

    monkeypatch.setattr(w, "_start_environment", lambda: dict(env))
    assert w._start_thread_count() == count


def test_forced_worker_threads_lowers_a_count_raised_after_the_process_started():
    # a process started as dask's nanny starts workers (OMP_NUM_THREADS=1) whose main
    # module raised the variable before importing torch, as spawn's __mp_main__ did
    import subprocess
    import sys

    code = (
        "import os\n"
        "os.environ['OMP_NUM_THREADS'] = '2'\n"
        "import torch\n"
        "from torchimize_scipy import _dask_workers as w\n"
        "a = torch.get_num_threads()\n"
        "print(a, w._start_thread_count(), w.worker_threads(), torch.get_num_threads())\n"
        "w._AUTO['threads'] = None\n"
        "print(w.worker_threads(force=True), torch.get_num_threads())\n")
    root = str(pathlib.Path(torchimize_scipy.__file__).parents[1])
    # (MKL_NUM_THREADS in the caller's environment would cap torch's count at start too)
    env = {k: v for k, v in os.environ.items() if k != "MKL_NUM_THREADS"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=300).stdout.split()
    # raised to 2, started with 1; not a worker: no cap, left at 2; forced: lowered to 1
    assert out == ["2", "1", "None", "2", "1", "1"]
