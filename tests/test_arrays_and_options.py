"""Array kinds in and out, and the options that are not about the solution.

numpy (or list, scalar) ``x0``: ``fun`` receives 1-D float64 numpy arrays and the
result holds numpy arrays. torch ``x0``: tensors in and out, same dtype/device
(``cost``/``optimality`` 0-d tensors). Plus ``dtype=``/``device=``, not mutating
the caller's arrays, callbacks, ``verbose`` output, ``workers`` and the
evaluation counters, each compared with SciPy where SciPy has the same thing.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.optimize as so
import torch
from _parity import (
    assert_counts_close,
    assert_messages_equivalent,
    assert_status_equivalent,
    assert_x_close,
)
from scipy.optimize._lsq.least_squares import TERMINATION_MESSAGES

from torchimize_scipy import least_squares

ROSEN_BOUNDS = ([-np.inf, 1.5], np.inf)
RESULT_KEYS = {"x", "cost", "fun", "jac", "grad", "optimality", "active_mask", "nfev", "njev",
               "status", "message", "success"}


def fun_rosenbrock(x):
    return np.array([10 * (x[1] - x[0] ** 2), (1 - x[0])])


def jac_rosenbrock(x):
    return np.array([[-20 * x[0], 10], [-1, 0]])


def fun_rosenbrock_torch(x):
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def jac_rosenbrock_torch(x):
    one = torch.ones_like(x[0])
    return torch.stack([torch.stack([-20 * x[0], 10 * one]), torch.stack([-one, 0 * one])])


def fun_trivial(x, a=0.0):
    return (x - a) ** 2 + 5.0


class Recorder:
    """Wraps a function and records the type, dtype and shape of every argument."""

    def __init__(self, fn):
        self.fn = fn
        self.seen = []

    def __call__(self, x, *args, **kwargs):
        self.seen.append((type(x), x.dtype, tuple(x.shape)))
        return self.fn(x, *args, **kwargs)


# ============================================================================ numpy in / out
@pytest.mark.parametrize("x0,n", [([2, 2], 2), ((2.0, 2.0), 2), (np.array([2, 2]), 2),
                                  (np.array([2.0, 2.0], dtype=np.float32), 2),
                                  (np.array([2.0, 2.0]), 2)])
@pytest.mark.parametrize("method", ["trf", "dogbox", "lm", "gn"])
def test_numpy_in_numpy_out(x0, n, method):
    fun = Recorder(fun_rosenbrock)
    jac = Recorder(jac_rosenbrock)
    res = least_squares(fun, x0, jac, method=method)
    assert set(res.keys()) >= RESULT_KEYS
    for key in ("x", "fun", "jac", "grad", "active_mask"):
        assert isinstance(res[key], np.ndarray), key
    for key in ("x", "fun", "jac", "grad"):
        assert res[key].dtype == np.float64, key
    assert res.x.shape == (n,) and res.fun.shape == (2,) and res.jac.shape == (2, n)
    assert isinstance(res.cost, float) and isinstance(res.optimality, float)
    assert isinstance(res.nfev, int) and isinstance(res.status, int)
    assert isinstance(res.success, bool) and isinstance(res.message, str)
    assert set(fun.seen) == {(np.ndarray, np.dtype(np.float64), (n,))}
    assert set(jac.seen) == {(np.ndarray, np.dtype(np.float64), (n,))}
    ref = so.least_squares(fun_rosenbrock, x0, jac_rosenbrock, method=method if method != "gn"
                           else "trf")
    assert res.active_mask.dtype == ref.active_mask.dtype  # float for unbounded trf
    np.testing.assert_allclose(res.x, ref.x, rtol=1e-6)


@pytest.mark.parametrize("x0", [2.0, 2, [2.0], np.float64(2.0), np.array(2.0)])
@pytest.mark.parametrize("jac", ["2-point", "cs"])
def test_scalar_x0(x0, jac):
    fun = Recorder(fun_trivial)
    res = least_squares(fun, x0, jac=jac)
    ref = so.least_squares(fun_trivial, x0, jac=jac)
    dtypes = {np.dtype(np.float64)} | ({np.dtype(np.complex128)} if jac == "cs" else set())
    assert {d for _, d, _ in fun.seen} == dtypes  # complex only for the complex step
    assert all(t is np.ndarray and s == (1,) for t, _, s in fun.seen)
    assert res.x.shape == ref.x.shape == (1,)
    np.testing.assert_allclose(res.x, ref.x, atol=1e-8)
    assert res.fun.shape == ref.fun.shape == (1,)


def test_scalar_fun_output():
    """fun returning a scalar is a 1-residual problem, as in scipy."""
    fun = lambda x: float(x[0] ** 2 - 2)  # noqa: E731
    res = least_squares(fun, [1.0])
    ref = so.least_squares(fun, [1.0])
    assert_x_close(res.x, ref.x)
    assert res.fun.shape == ref.fun.shape == (1,)


def test_fun_returning_list_and_ints():
    res = least_squares(lambda x: [x[0] - 1, 2 * x[1] + 4, 3], [0.0, 0.0])
    ref = so.least_squares(lambda x: [x[0] - 1, 2 * x[1] + 4, 3], [0.0, 0.0])
    np.testing.assert_allclose(res.x, ref.x, atol=1e-8)
    assert res.fun.dtype == np.float64


# ============================================================================ torch in / out
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["trf", "dogbox", "lm", "gn"])
@pytest.mark.parametrize("jac", ["2-point", "autograd", "analytic"])
def test_torch_in_torch_out(dtype, method, jac):
    fun = Recorder(fun_rosenbrock_torch)
    j = jac_rosenbrock_torch if jac == "analytic" else jac
    x0 = torch.tensor([2.0, 2.0], dtype=dtype)
    bounds = ROSEN_BOUNDS if method in ("trf", "dogbox") else (-np.inf, np.inf)
    res = least_squares(fun, x0, j, method=method, bounds=bounds)
    for key in ("x", "fun", "jac", "grad", "active_mask", "cost", "optimality"):
        assert isinstance(res[key], torch.Tensor), key
        assert res[key].device == x0.device, key
    for key in ("x", "fun", "jac", "grad", "cost", "optimality"):
        assert res[key].dtype == dtype, key
    assert res.cost.ndim == 0 and res.optimality.ndim == 0
    assert res.x.shape == (2,) and res.jac.shape == (2, 2)
    assert all(t is torch.Tensor and d == dtype for t, d, _ in fun.seen)
    assert isinstance(res.status, int) and isinstance(res.nfev, int)
    assert res.success
    ref = so.least_squares(fun_rosenbrock, [2.0, 2.0], jac_rosenbrock, bounds=bounds,
                           method="trf" if method == "gn" else method)
    tol = 1e-6 if dtype == torch.float64 else 2e-3
    np.testing.assert_allclose(res.x.numpy(), ref.x, rtol=tol, atol=tol)
    np.testing.assert_allclose(float(res.cost), ref.cost, atol=tol)


def test_torch_integer_x0_becomes_float64():
    res = least_squares(fun_rosenbrock_torch, torch.tensor([2, 2]))
    assert res.x.dtype == torch.float64
    np.testing.assert_allclose(res.x.numpy(), [1.0, 1.0])


def test_torch_x0_requires_grad():
    x0 = torch.tensor([2.0, 2.0], dtype=torch.float64, requires_grad=True)
    res = least_squares(fun_rosenbrock_torch, x0, jac="autograd")
    np.testing.assert_allclose(res.x.detach().numpy(), [1.0, 1.0])
    assert x0.grad is None


# ---------------------------------------------------------------- float32 (scipy gh-12991)
RNG = np.random.default_rng(1978)
X32 = np.linspace(0, 1, 100, dtype=np.float32)
Y32 = RNG.random(size=100, dtype=np.float32)
EXACT32 = np.polynomial.polynomial.polyfit(X32.astype(float), Y32.astype(float), 1)


def err32(p, x, y):
    return ((p[0] + p[1] * x).astype(np.float32) - y).astype(np.float32)


def test_float32_scipy_reference():
    """What scipy (since gh-21872) does on the gh-12991 example: a good fit."""
    ref = so.least_squares(err32, [-1.0, -1.0], args=(X32, Y32))
    assert ref.nfev > 2
    np.testing.assert_allclose(ref.x, EXACT32, atol=9e-5)


def test_float32_residuals_numpy_x0():
    res = least_squares(err32, [-1.0, -1.0], args=(X32, Y32))
    assert res.nfev > 2
    np.testing.assert_allclose(res.x, EXACT32, atol=9e-5)


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm", "gn"])
@pytest.mark.parametrize("jac", ["2-point", "3-point", "autograd"])
def test_float32_torch_x0(method, jac):
    xt, yt = torch.from_numpy(X32), torch.from_numpy(Y32)
    res = least_squares(lambda p: p[0] + p[1] * xt - yt, torch.tensor([-1.0, -1.0]),
                        jac=jac, method=method)
    assert res.x.dtype == torch.float32 and res.cost.dtype == torch.float32
    assert res.success and res.nfev > 2
    np.testing.assert_allclose(res.x.numpy(), EXACT32, atol=5e-4)


# ============================================================================ dtype / device
def test_dtype_keyword_numpy_x0():
    fun = Recorder(fun_rosenbrock)
    res = least_squares(fun, [2.0, 2.0], dtype=torch.float32)
    assert isinstance(res.x, np.ndarray) and res.x.dtype == np.float32
    assert all(t is np.ndarray and d == np.float64 for t, d, _ in fun.seen)
    np.testing.assert_allclose(res.x, [1.0, 1.0], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, np.float64, "float64"])
def test_dtype_keyword_upcasts_torch_x0(dtype):
    res = least_squares(fun_rosenbrock_torch, torch.tensor([2.0, 2.0]), dtype=dtype)
    assert res.x.dtype == torch.float64 and res.cost.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.int32, np.int64, torch.complex128, "complex64"])
def test_dtype_keyword_invalid(dtype):
    with pytest.raises(ValueError, match="`dtype` must be a real floating dtype."):
        least_squares(fun_rosenbrock, [2.0, 2.0], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, np.float16, "float16"])
def test_dtype_keyword_half_precision(dtype):
    """torch's linear algebra has no half precision: a clear error, not a failed solve."""
    with pytest.raises(ValueError, match=r"`dtype` is torch\.(b?float16); the solvers compute "
                                         r"in torch\.float32 or torch\.float64"):
        least_squares(fun_rosenbrock, [2.0, 2.0], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_torch_x0(dtype):
    with pytest.raises(ValueError, match=r"`x0` has dtype torch\.(b?float16).*float32"):
        least_squares(fun_rosenbrock_torch, torch.tensor([2.0, 2.0], dtype=dtype))
    # the suggested remedy works
    res = least_squares(fun_rosenbrock_torch, torch.tensor([2.0, 2.0], dtype=dtype),
                        dtype=torch.float32)
    assert res.x.dtype == torch.float32 and res.success


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_device_keyword_cpu(device):
    res = least_squares(fun_rosenbrock_torch, torch.tensor([2.0, 2.0], dtype=torch.float64),
                        device=device)
    assert res.x.device.type == "cpu"
    res_np = least_squares(fun_rosenbrock, np.array([2.0, 2.0]), device=device)
    assert isinstance(res_np.x, np.ndarray)
    np.testing.assert_allclose(res_np.x, res.x.numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_device(dtype):
    x0 = torch.tensor([2.0, 2.0], dtype=dtype, device="cuda")
    seen = []

    def fun(x):
        seen.append(x.device.type)
        return fun_rosenbrock_torch(x)

    for jac in ("2-point", "autograd"):
        res = least_squares(fun, x0, jac=jac, bounds=ROSEN_BOUNDS)
        assert res.x.device.type == "cuda" and res.cost.device.type == "cuda"
        assert res.x.dtype == dtype
        assert set(seen) == {"cuda"}
        tol = 1e-6 if dtype == torch.float64 else 2e-3
        np.testing.assert_allclose(res.x.cpu().numpy(), [1.22437075, 1.5], rtol=tol)
    # numpy x0 computed on the GPU: fun still gets numpy, the result is numpy
    res = least_squares(fun_rosenbrock, [2.0, 2.0], device="cuda")
    assert isinstance(res.x, np.ndarray)
    np.testing.assert_allclose(res.x, [1.0, 1.0], rtol=1e-6)


# ============================================================================ no mutation
@pytest.mark.parametrize("method", ["trf", "dogbox", "lm", "gn", "gd"])
def test_x0_not_mutated_numpy(method):
    x0 = np.array([0.0, 1.5])  # on trf's bound: trf moves it inside, not in place
    keep = x0.copy()
    bounds = ([0.0, 1.5], [3.0, 3.0]) if method != "lm" else (-np.inf, np.inf)
    least_squares(fun_rosenbrock, x0, bounds=bounds, method=method, max_nfev=50)
    np.testing.assert_array_equal(x0, keep)


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm", "gn"])
@pytest.mark.parametrize("jac", ["2-point", "autograd"])
def test_x0_not_mutated_torch(method, jac):
    x0 = torch.tensor([0.0, 1.5], dtype=torch.float64)
    keep = x0.clone()
    bounds = ([0.0, 1.5], [3.0, 3.0]) if method != "lm" else (-np.inf, np.inf)
    res = least_squares(fun_rosenbrock_torch, x0, jac=jac, bounds=bounds, method=method)
    assert torch.equal(x0, keep)
    assert res.x.data_ptr() != x0.data_ptr()


def test_bounds_and_x_scale_not_mutated():
    lb, ub = np.array([-np.inf, 1.5]), np.array([np.inf, np.inf])
    xs = np.array([1.0, 2.0])
    copies = [a.copy() for a in (lb, ub, xs)]
    least_squares(fun_rosenbrock, [2.0, 2.0], bounds=(lb, ub), x_scale=xs)
    for a, b in zip((lb, ub, xs), copies, strict=True):
        np.testing.assert_array_equal(a, b)


def fun_mutating_numpy(x):
    r = fun_rosenbrock(x)
    x[0] = 1e6  # a rude fun that scribbles on its argument
    return r


def fun_mutating_torch(x):
    r = fun_rosenbrock_torch(x)
    x.mul_(0).add_(1e6)
    return r


def test_fun_mutating_input_scipy_reference():
    ref = so.least_squares(fun_mutating_numpy, np.array([2.0, 2.0]))
    np.testing.assert_allclose(ref.x, [1.0, 1.0])


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_fun_mutating_input_numpy(method):
    x0 = np.array([2.0, 2.0])
    ref = so.least_squares(fun_mutating_numpy, x0, method=method)
    res = least_squares(fun_mutating_numpy, x0, method=method)
    np.testing.assert_allclose(res.x, ref.x, rtol=1e-6)
    assert_status_equivalent(res.status, ref.status)


@pytest.mark.parametrize("jac", ["2-point", "autograd"])
def test_fun_mutating_input_torch(jac):
    res = least_squares(fun_mutating_torch, torch.tensor([2.0, 2.0], dtype=torch.float64),
                        jac=jac)
    np.testing.assert_allclose(res.x.numpy(), [1.0, 1.0], rtol=1e-6)


# ============================================================================ callback
CALLBACK_CASES = [("trf", {}), ("trf", {"bounds": ROSEN_BOUNDS}), ("dogbox", {}),
                  ("dogbox", {"bounds": ROSEN_BOUNDS}), ("trf", {"loss": "soft_l1"})]


def _history(solver, method, kw, x0=(2.0, 2.0)):
    hist = []

    def cb(intermediate_result):
        r = intermediate_result
        hist.append({"keys": set(r.keys()), "x": np.array(r.x, copy=True),
                     "fun": np.array(r.fun, copy=True), "nit": r.nit, "nfev": r.nfev,
                     "cost": float(r.cost)})

    res = solver(fun_rosenbrock, np.array(x0), method=method, callback=cb, **kw)
    return hist, res


@pytest.mark.parametrize("method,kw", CALLBACK_CASES)
def test_callback_intermediate_result(method, kw):
    ours, res = _history(least_squares, method, kw)
    ref, ref_res = _history(so.least_squares, method, kw)
    # the iterations agree until the last one, where rounding may decide the stop
    assert len(ref) > 0 and abs(len(ours) - len(ref)) <= 1
    for a, b in zip(ours, ref, strict=False):
        assert a["keys"] == b["keys"] == {"x", "fun", "nit", "nfev", "cost"}
        assert (a["nit"], a["nfev"]) == (b["nit"], b["nfev"])
        np.testing.assert_allclose(a["x"], b["x"], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(a["fun"], b["fun"], rtol=1e-5, atol=1e-10)
        np.testing.assert_allclose(a["cost"], b["cost"], rtol=1e-6, atol=1e-12)
    assert [h["nit"] for h in ours] == list(range(1, len(ours) + 1))
    np.testing.assert_allclose(ours[-1]["x"], res.x)
    assert_status_equivalent(res.status, ref_res.status)


def test_callback_dogbox_loss_fun_is_true_residuals():
    """scipy's dogbox hands the callback the loss-scaled residuals; we hand the true ones
    (as scipy's trf does)."""
    ours, _ = _history(least_squares, "dogbox", {"loss": "soft_l1"})
    ref, _ = _history(so.least_squares, "dogbox", {"loss": "soft_l1"})
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a["x"], b["x"], rtol=1e-6)
        np.testing.assert_allclose(a["fun"], fun_rosenbrock(a["x"]), rtol=1e-12)
    assert not np.allclose(ours[0]["fun"], ref[0]["fun"])


def test_callback_torch_receives_tensors():
    seen = []

    def cb(intermediate_result):
        seen.append(intermediate_result)

    x0 = torch.tensor([2.0, 2.0], dtype=torch.float32)
    least_squares(fun_rosenbrock_torch, x0, callback=cb)
    assert seen
    for r in seen:
        assert isinstance(r.x, torch.Tensor) and r.x.dtype == torch.float32
        assert isinstance(r.fun, torch.Tensor)
        assert isinstance(r.cost, torch.Tensor) and r.cost.ndim == 0


@pytest.mark.parametrize("method,kw", CALLBACK_CASES + [("gn", {}), ("gd", {})])
def test_callback_stop_iteration(method, kw):
    calls = []

    def stop(intermediate_result):
        calls.append(intermediate_result.nit)
        raise StopIteration

    res = least_squares(fun_rosenbrock, [2.0, 2.0], method=method, callback=stop, **kw)
    assert calls == [1]
    assert res.status == -2 and not res.success
    assert res.message == TERMINATION_MESSAGES[-2]
    if method in ("trf", "dogbox"):
        ref = so.least_squares(fun_rosenbrock, [2.0, 2.0], method=method, callback=stop, **kw)
        assert (res.status, res.message, res.success) == (ref.status, ref.message, ref.success)
        np.testing.assert_allclose(res.x, ref.x, rtol=1e-6)
        assert res.nfev == ref.nfev


@pytest.mark.parametrize("method,kw", CALLBACK_CASES)
def test_callback_x_form(method, kw):
    xs, xs_ref = [], []
    res = least_squares(fun_rosenbrock, [2.0, 2.0], method=method,
                        callback=lambda x: xs.append(np.array(x, copy=True)), **kw)
    so.least_squares(fun_rosenbrock, [2.0, 2.0], method=method,
                     callback=lambda x: xs_ref.append(np.array(x, copy=True)), **kw)
    assert len(xs) == len(xs_ref) > 0
    np.testing.assert_allclose(np.array(xs), np.array(xs_ref), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(xs[-1], res.x)
    assert all(isinstance(x, np.ndarray) and x.shape == (2,) for x in xs)


def test_callback_x_form_stop_iteration():
    def stop(x):
        raise StopIteration

    res = least_squares(fun_rosenbrock, [2.0, 2.0], callback=stop)
    ref = so.least_squares(fun_rosenbrock, [2.0, 2.0], callback=stop)
    assert res.status == ref.status == -2
    assert res.message == ref.message


def test_callback_returning_true_does_not_stop():
    """scipy stops only on StopIteration (the message mentions ``True`` but
    ``_call_callback_maybe_halt`` ignores return values of ``callback(x)``)."""
    res = least_squares(fun_rosenbrock, [2.0, 2.0], callback=lambda x: True)
    ref = so.least_squares(fun_rosenbrock, [2.0, 2.0], callback=lambda x: True)
    assert res.status > 0 and ref.status > 0  # not -2: the callback did not stop them
    assert_status_equivalent(res.status, ref.status)


# ============================================================================ verbose
def _run_capture(capsys, solver, **kw):
    solver(fun_rosenbrock, [2.0, 2.0], **kw)
    return capsys.readouterr().out


@pytest.mark.parametrize("method,kw", [("trf", {}), ("trf", {"bounds": ROSEN_BOUNDS}),
                                       ("dogbox", {}), ("dogbox", {"bounds": ROSEN_BOUNDS}),
                                       ("lm", {})])
def test_verbose_1(capsys, method, kw):
    ours = _run_capture(capsys, least_squares, method=method, verbose=1, **kw)
    ref = _run_capture(capsys, so.least_squares, method=method, verbose=1, **kw)
    ours_lines, ref_lines = ours.splitlines(), ref.splitlines()
    assert len(ours_lines) == len(ref_lines) == 2
    assert_verbose_summary(ours_lines, ref_lines, method)


def assert_verbose_summary(ours_lines, ref_lines, method):
    """The two closing lines of ``verbose>=1``, by the parity policy."""
    # the termination message: equal, or both a converged one
    assert_messages_equivalent(ours_lines[-2], ref_lines[-2], TERMINATION_MESSAGES)
    pattern = (r"Function evaluations (\d+), initial cost (\S+), final cost \S+, "
               r"first-order optimality \S+\.")
    m_ours, m_ref = re.fullmatch(pattern, ours_lines[-1]), re.fullmatch(pattern, ref_lines[-1])
    assert m_ours and m_ref
    assert m_ours.group(2) == m_ref.group(2)  # initial cost: one evaluation of the same fun
    assert_counts_close(0, 0, int(m_ours.group(1)), int(m_ref.group(1)),
                        slack=4 if method == "lm" else 2)


@pytest.mark.parametrize("method,kw", [("trf", {}), ("trf", {"bounds": ROSEN_BOUNDS}),
                                       ("dogbox", {"bounds": ROSEN_BOUNDS})])
def test_verbose_2_iteration_table(capsys, method, kw):
    ours = _run_capture(capsys, least_squares, method=method, verbose=2, **kw).splitlines()
    ref = _run_capture(capsys, so.least_squares, method=method, verbose=2, **kw).splitlines()
    assert ours[0] == ref[0]  # header
    assert "Iteration" in ours[0] and "Optimality" in ours[0]
    # rows (iteration, nfev columns) agree but for the last, where rounding may decide
    # the stop (one row more or less)
    assert abs(len(ours) - len(ref)) <= 1
    rows = min(len(ours), len(ref)) - 3
    assert rows > 0
    for a, b in zip(ours[1:1 + rows], ref[1:1 + rows], strict=True):
        assert a.split()[:2] == b.split()[:2]
    if method == "trf" and kw:
        assert ours[1:1 + rows] == ref[1:1 + rows]  # bounded trf: to the printed digits
    assert_verbose_summary(ours, ref, method)


def test_verbose_0_silent(capsys):
    assert _run_capture(capsys, least_squares, verbose=0) == ""


def test_verbose_2_lm_no_table(capsys):
    ours = _run_capture(capsys, least_squares, method="lm", verbose=2).splitlines()
    ref = _run_capture(capsys, so.least_squares, method="lm", verbose=2).splitlines()
    assert len(ours) == len(ref) == 2  # no table: the message and the summary
    assert_verbose_summary(ours, ref, "lm")


def test_verbose_2_gn_prints_table(capsys):
    out = _run_capture(capsys, least_squares, method="gn", verbose=2).splitlines()
    assert "Iteration" in out[0] and len(out) >= 4


# ============================================================================ workers
@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
@pytest.mark.parametrize("jac", ["2-point", "3-point", "cs"])
def test_workers_map(method, jac):
    calls = []

    def my_map(func, iterable):
        items = list(iterable)
        calls.append(len(items))
        return map(func, items)

    serial = least_squares(fun_rosenbrock, [2.0, 2.0], jac=jac, method=method)
    for workers in (map, my_map):
        res = least_squares(fun_rosenbrock, [2.0, 2.0], jac=jac, method=method,
                            workers=workers)
        np.testing.assert_array_equal(res.x, serial.x)
        assert (res.nfev, res.njev, res.status) == (serial.nfev, serial.njev, serial.status)
    assert calls  # the map-like callable was used
    # for the finite differences only (several points a call), never for the residuals
    # at x0 or at a trial point, as under scipy
    assert min(calls) > 1
    ref = so.least_squares(fun_rosenbrock, [2.0, 2.0], jac=jac, method=method, workers=map)
    np.testing.assert_allclose(res.x, ref.x, rtol=1e-6)
    assert_counts_close(res.status, ref.status, res.nfev, ref.nfev,
                        slack=4 if method == "lm" else 2)


def test_workers_one_and_none():
    a = least_squares(fun_rosenbrock, [2.0, 2.0], workers=None)
    b = least_squares(fun_rosenbrock, [2.0, 2.0], workers=1)
    np.testing.assert_array_equal(a.x, b.x)


# ============================================================================ counters
@pytest.mark.parametrize("method", ["trf", "dogbox"])
@pytest.mark.parametrize("jac", ["2-point", "3-point", "cs", "analytic"])
@pytest.mark.parametrize("x0,bounds", [([2.0, 2.0], (-np.inf, np.inf)),
                                       ([2.0, 2.0], ROSEN_BOUNDS),
                                       ([-2.0, 1.0], (-np.inf, np.inf)),
                                       ([-1.2, 1.0], ([-50.0, 0.0], [0.5, 100]))])
def test_nfev_njev_rosenbrock(method, jac, x0, bounds):
    j = jac_rosenbrock if jac == "analytic" else jac
    res = least_squares(fun_rosenbrock, x0, j, bounds=bounds, method=method)
    ref = so.least_squares(fun_rosenbrock, x0, j, bounds=bounds, method=method)
    # the conventions are tested exactly against real calls below; against scipy the
    # counts agree within an iteration (the parity policy)
    assert_counts_close(res.status, ref.status, (res.nfev, res.njev), (ref.nfev, ref.njev))


@pytest.mark.parametrize("jac", ["2-point", "3-point", "cs"])
def test_njev_none_for_lm_finite_differences(jac):
    res = least_squares(fun_rosenbrock, [2.0, 2.0], jac=jac, method="lm")
    ref = so.least_squares(fun_rosenbrock, [2.0, 2.0], jac=jac, method="lm")
    assert res.njev is None and ref.njev is None
    assert_counts_close(res.status, ref.status, res.nfev, ref.nfev, slack=4)  # n + 2


def test_njev_lm_analytic():
    res = least_squares(fun_rosenbrock, [2.0, 2.0], jac_rosenbrock, method="lm")
    ref = so.least_squares(fun_rosenbrock, [2.0, 2.0], jac_rosenbrock, method="lm")
    assert isinstance(res.njev, int)
    assert_counts_close(res.status, ref.status, (res.nfev, res.njev), (ref.nfev, ref.njev))


class CountingFun:
    def __init__(self):
        self.nfev = 0

    def __call__(self, x, a=0):
        self.nfev += 1
        return fun_rosenbrock(x)


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
@pytest.mark.parametrize("max_nfev", [2, 3, None])
def test_nfev_counts_real_calls_with_analytic_jac(method, max_nfev):
    """As scipy's test_nfev: with an analytic Jacobian, nfev is the true number of calls
    (the first-point evaluation included)."""
    rng = np.random.default_rng(128908)
    x0 = rng.uniform(size=2) * 10
    f = CountingFun()
    res = least_squares(f, x0, jac=jac_rosenbrock, method=method, max_nfev=max_nfev)
    assert res.nfev == f.nfev
