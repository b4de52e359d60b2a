"""Small problems do not pay for parallelism they cannot use (issue 14).

While the engine runs problems whose Jacobian has at most 32,768 entries
(torch's grain size), MKL runs single-threaded in the calling thread only
(``torchimize_scipy._blas_threads``): MKL fanned a ``3 x 50`` product out to
every intra-op thread, and on a loaded machine each such parallel region cost
up to a scheduler time slice. These tests check the switch itself (set,
restored, nested, restored after an error, per thread), that the solvers use
it for small problems and not for large ones, and that the results do not
depend on it.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import scipy.optimize
import torch
from _parity import assert_cost_close, assert_counts_close, assert_x_close

import torchimize_scipy._blas_threads as bt
from torchimize_scipy import batch_least_squares, curve_fit, least_squares
from torchimize_scipy._engine import loop

needs_mkl = pytest.mark.skipif(bt._SET_LOCAL is None, reason="torch is not built with MKL")

CPU = torch.device("cpu")


@pytest.fixture
def local_three():
    """MKL's thread-local count set to 3 in this thread for the test, then put back."""
    torch.get_num_threads()
    previous = bt._SET_LOCAL(3)
    try:
        yield 3
    finally:
        bt._SET_LOCAL(previous)


def rosenbrock(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def test_is_small_threshold():
    assert bt.GRAIN_SIZE == 32768
    assert bt.is_small(32768, 1)
    assert bt.is_small(16384, 2)
    assert not bt.is_small(16385, 2)


@needs_mkl
def test_serial_blas_sets_and_restores(local_three):
    with bt.serial_blas(CPU, 50, 3) as used:
        assert used
        assert bt.mkl_local_threads() == 1
    assert bt.mkl_local_threads() == local_three


@needs_mkl
def test_serial_blas_nests(local_three):
    with bt.serial_blas(CPU, 50, 3):
        with bt.serial_blas(CPU, 2, 2):
            assert bt.mkl_local_threads() == 1
        assert bt.mkl_local_threads() == 1
    assert bt.mkl_local_threads() == local_three


@needs_mkl
def test_serial_blas_restores_after_error(local_three):
    with pytest.raises(RuntimeError, match="boom"), bt.serial_blas(CPU, 50, 3):
        raise RuntimeError("boom")
    assert bt.mkl_local_threads() == local_three


@needs_mkl
@pytest.mark.parametrize(("device", "m", "n"), [(CPU, 40000, 1), (CPU, 200_000, 20),
                                                (torch.device("cuda"), 50, 3),
                                                (torch.device("meta"), 50, 3)])
def test_serial_blas_leaves_large_and_other_devices(local_three, device, m, n):
    with bt.serial_blas(device, m, n) as used:
        assert not used
        assert bt.mkl_local_threads() == local_three


@needs_mkl
def test_serial_blas_is_per_thread(local_three):
    """Another thread's MKL count is untouched while this one is inside the block."""
    inside, seen = threading.Event(), []
    done = threading.Event()

    def other():
        torch.get_num_threads()
        previous = bt._SET_LOCAL(5)
        try:
            inside.wait(10)
            seen.append(bt.mkl_local_threads())
            done.set()
        finally:
            bt._SET_LOCAL(previous)

    t = threading.Thread(target=other)
    t.start()
    with bt.serial_blas(CPU, 50, 3):
        inside.set()
        assert done.wait(10)
        assert bt.mkl_local_threads() == 1
    t.join()
    assert seen == [5]
    assert bt.mkl_local_threads() == local_three


@needs_mkl
@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_small_solve_runs_serial_mkl(local_three, method):
    """Regression: the engine ran small problems with MKL on every intra-op thread."""
    seen = []

    def fun(x):
        seen.append(bt.mkl_local_threads())
        return rosenbrock(x)

    res = least_squares(fun, [-1.2, 1.0], method=method)
    assert res.success
    # the frontend's evaluations at x0 (f0 and the '2-point' J0) precede the engine
    k = seen.index(1)
    assert 1 <= k <= 3
    assert set(seen[:k]) == {local_three}
    assert set(seen[k:]) == {1}
    assert bt.mkl_local_threads() == local_three


@needs_mkl
def test_batch_of_small_problems_runs_serial_mkl(local_three):
    seen = []

    def fun(x):
        seen.append(bt.mkl_local_threads())
        return torch.stack([10 * (x[:, 1] - x[:, 0] ** 2), 1 - x[:, 0]], dim=1)

    x0 = torch.tensor([[-1.2, 1.0], [2.0, 2.0], [0.5, -0.5]], dtype=torch.float64)
    res = batch_least_squares(fun, x0, method="lm")
    assert bool(np.all(np.asarray(res.success)))
    assert 1 in seen
    assert bt.mkl_local_threads() == local_three


@needs_mkl
def test_large_batch_of_small_problems_keeps_threads(local_three):
    """B m n above the tail's limit (70,000 x 2 x 2 > ``loop.TAIL_ENTRIES``): MKL's batched
    products keep their threads (the rows all finish together: no tail)."""
    seen = []

    def fun(x):
        seen.append(bt.mkl_local_threads())
        return torch.stack([10 * (x[:, 1] - x[:, 0] ** 2), 1 - x[:, 0]], dim=1)

    x0 = torch.tensor([[-1.2, 1.0]], dtype=torch.float64).repeat(70_000, 1)
    assert 70_000 * 2 * 2 > loop.TAIL_ENTRIES
    res = batch_least_squares(fun, x0, method="lm")
    assert bool(np.all(np.asarray(res.success)))
    assert 1 not in seen


@needs_mkl
def test_large_solve_keeps_threads(local_three):
    """A problem above the grain size (m n = 40,000) keeps the caller's MKL threads."""
    t = np.linspace(0, 1, 20000)
    y = 2.0 * np.exp(-1.5 * t)
    seen = []

    def fun(p):
        seen.append(bt.mkl_local_threads())
        return p[0] * np.exp(-p[1] * t) - y

    res = least_squares(fun, [1.0, 1.0], method="lm")
    assert res.success
    assert set(seen) == {local_three}


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_small_results_match_scipy_with_two_threads(method):
    """With torch's intra-op pool at two threads the small solve still gives scipy's answer."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ours = least_squares(rosenbrock, [-1.2, 1.0], method=method)
    finally:
        torch.set_num_threads(before)
    ref = scipy.optimize.least_squares(rosenbrock, [-1.2, 1.0], method=method)
    assert_x_close(ours.x, ref.x)
    assert_cost_close(ours.cost, ref.cost)
    assert_counts_close(ours.status, ref.status, ours.nfev, ref.nfev)


def test_curve_fit_exp_decay_matches_scipy():
    def f(x, a, b, c):
        return a * np.exp(-b * x) + c

    x = np.linspace(0, 4, 50)
    y = f(x, 2.5, 1.3, 0.5) + 0.2 * np.random.default_rng(0).normal(size=x.size)
    popt, pcov = curve_fit(f, x, y)
    ref, ref_cov = scipy.optimize.curve_fit(f, x, y)
    assert_x_close(popt, ref)
    # pcov = s^2 (J^T J)^-1 at popt: x agrees to ~1e-8 relative, pcov to well within 1e-5
    np.testing.assert_allclose(pcov, ref_cov, rtol=1e-5)


# --------------------------------------------------------------------------- numpy adapters
def rosenbrock_jac(x):
    return np.array([[-20 * x[0], 10.0], [-1.0, 0.0]])


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_fun_and_jac_may_reuse_their_output_buffer(method):
    """The engine keeps a private copy of what ``fun``/``jac`` return (one problem, numpy).

    A function that writes every result into the same array must give the run
    of a function that returns fresh arrays (same code path: bit for bit).
    """
    fbuf, jbuf = np.empty(2), np.empty((2, 2))

    def fun_reuse(x):
        fbuf[:] = rosenbrock(x)
        return fbuf

    def jac_reuse(x):
        jbuf[:] = rosenbrock_jac(x)
        return jbuf

    fresh = least_squares(rosenbrock, [-1.2, 1.0], jac=rosenbrock_jac, method=method)
    reused = least_squares(fun_reuse, [-1.2, 1.0], jac=jac_reuse, method=method)
    np.testing.assert_array_equal(reused.x, fresh.x)
    np.testing.assert_array_equal(reused.fun, fresh.fun)
    np.testing.assert_array_equal(reused.jac, fresh.jac)
    assert (reused.nfev, reused.njev, reused.status) == (fresh.nfev, fresh.njev, fresh.status)
    assert fresh.fun is not fbuf and not np.shares_memory(reused.fun, fbuf)
    assert not np.shares_memory(reused.jac, jbuf)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numpy_fun_gets_private_float64_rows(dtype):
    """``fun`` receives a writable float64 copy; writing to it changes nothing."""
    seen = []
    x0 = np.array([-1.2, 1.0])

    def fun(x):
        seen.append((x.dtype, x.flags.writeable))
        out = rosenbrock(x)
        x[:] = 1e6  # the solver's state must not see this
        return out

    res = least_squares(fun, x0, method="trf", dtype=dtype)
    ref = least_squares(rosenbrock, x0, method="trf", dtype=dtype)
    assert set(seen) == {(np.dtype(np.float64), True)}
    np.testing.assert_array_equal(res.x, ref.x)
    np.testing.assert_array_equal(x0, [-1.2, 1.0])
    assert res.x.dtype == (np.float64 if dtype is torch.float64 else np.float32)


@pytest.mark.parametrize(("ret", "dtype"), [(lambda x: [10 * (x[1] - x[0] ** 2), 1 - x[0]], None),
                                             (lambda x: np.float32(1.0) * rosenbrock(x), None),
                                             (lambda x: rosenbrock(x).astype(np.float32),
                                              torch.float32)])
def test_one_problem_return_kinds_match_scipy(ret, dtype):
    """Lists and float32 arrays from ``fun`` are converted as numpy would (one problem)."""
    ours = least_squares(ret, [-1.2, 1.0], dtype=dtype)
    ref = scipy.optimize.least_squares(ret, [-1.2, 1.0])
    if dtype is None:
        assert_x_close(ours.x, ref.x)
    else:  # float32 engine: x to a few times sqrt(float32 eps) ~ 3.5e-4
        np.testing.assert_allclose(ours.x, ref.x, rtol=3 * np.sqrt(np.finfo(np.float32).eps))


def test_complex_return_still_refused_for_one_problem():
    with pytest.raises(ValueError, match="complex"):
        least_squares(lambda x: rosenbrock(x) + 0j, [-1.2, 1.0])


def test_fortran_ordered_and_reversed_jac_match_c_ordered():
    """A Jacobian returned transposed (Fortran order) or as a reversed view converts as a copy.

    Same code path, same values: bit for bit the run of a C-ordered Jacobian.
    """
    def jac_f(x):
        return np.asfortranarray(rosenbrock_jac(x))

    def jac_rev(x):
        return rosenbrock_jac(x)[::-1][::-1]  # a view with the same values

    def fun_rev(x):
        return np.array([1 - x[0], 10 * (x[1] - x[0] ** 2)])[::-1]  # negative stride

    ref = least_squares(rosenbrock, [-1.2, 1.0], jac=rosenbrock_jac)
    for fun, jac in ((rosenbrock, jac_f), (rosenbrock, jac_rev), (fun_rev, rosenbrock_jac)):
        res = least_squares(fun, [-1.2, 1.0], jac=jac)
        np.testing.assert_array_equal(res.x, ref.x)
        assert (res.nfev, res.njev, res.status) == (ref.nfev, ref.njev, ref.status)
