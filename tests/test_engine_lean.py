"""Lean iterations (issue 14): the engine's host reads, remembered counts and the paths
that replaced host-side branches.

* :mod:`torchimize_scipy._engine.counts`: a count is read once per mask object;
* the trust-region subproblems give each problem of a batch the answer it gets
  alone, whether every problem iterates (no masking) or only some;
* a Jacobian that turns non-finite in the middle of a run stops that problem
  with the optimality of its last finite Jacobian (its row still takes part in
  the next round's top stage, whose measure it must not take);
* a profiler count (not a timing): the engine makes no ``bool(tensor)`` host
  synchronisation on a single unbounded problem and stays within a few host
  reads per evaluation on the code a GPU runs (``host_scalars.HOST = False``),
  and with its per-problem scalars on the host (the CPU) it stays within an
  operation budget per evaluation and makes at most two device waits per
  evaluation (its own bookkeeping makes none);
* the loop's bookkeeping on the host and on tensors (the code a GPU runs) ends
  a streamed batch alike.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from _parity import assert_bitwise_equal
from _torch_calls import top_level_package_ops
from torch.profiler import ProfilerActivity, profile

from torchimize_scipy import batch_least_squares, least_squares
from torchimize_scipy._engine import counts, host_scalars
from torchimize_scipy._engine.linalg import factorize, gram_solve
from torchimize_scipy._engine.trust_region import (
    solve_trust_region_minpack,
    solve_trust_region_scipy,
)


def test_count_true_reads_once_per_mask():
    mask = torch.tensor([True, False, True])
    assert counts.count_true(mask) == 2
    # a remembered count is what the engine uses from then on (no second read)
    counts.remember(mask, 7)
    assert counts.count_true(mask) == 7
    # an equal but new tensor is counted anew
    assert counts.count_true(mask.clone()) == 2
    a, b = torch.tensor([True, True, False]), torch.tensor([False, False, False])
    assert counts.count_many(a, b) == [2, 0]
    assert counts.count_true(a) == 2 and counts.count_true(b) == 0


def test_known_finite_marks_only_marked_tensors():
    t = torch.zeros(3)
    assert not counts.known_finite(t)
    assert counts.mark_finite(t) is t
    assert counts.known_finite(t)
    assert not counts.known_finite(torch.zeros(3))


def _factors(use_gram: bool, seed: int = 0):
    """Six well-conditioned 12 x 3 problems with right-hand sides of very different sizes."""
    rng = np.random.default_rng(seed)
    A = torch.as_tensor(rng.standard_normal((6, 12, 3)))
    f = torch.as_tensor(rng.standard_normal((6, 12)) * np.geomspace(1e-3, 1e2, 6)[:, None])
    return factorize(A, None, f, use_gram=use_gram), A, f


@pytest.mark.parametrize("use_gram", [False, True])
@pytest.mark.parametrize("solver", ["scipy", "minpack"])
def test_subproblem_rows_answer_as_alone(use_gram, solver):
    # radii that leave some Gauss-Newton steps inside and send others through 1 to
    # several Newton iterations: the batch mixes the masked and unmasked updates
    fac, A, f = _factors(use_gram)
    delta = torch.tensor([10.0, 1.0, 0.3, 0.1, 0.03, 0.01], dtype=A.dtype)
    alpha0 = torch.zeros_like(delta)

    def solve(fac_, delta_, alpha0_):
        if solver == "scipy":
            return solve_trust_region_scipy(fac_, delta_, alpha0_, 12, 3)
        return solve_trust_region_minpack(fac_, delta_, alpha0_, 12, 3)

    p, alpha = solve(fac, delta, alpha0)
    assert (alpha == 0).any() and (alpha > 0).any()  # both kinds of rows are present
    for i in range(6):
        fac_i = factorize(A[i:i + 1], None, f[i:i + 1], use_gram=use_gram)
        p_i, alpha_i = solve(fac_i, delta[i:i + 1], alpha0[i:i + 1])
        np.testing.assert_allclose(p[i].numpy(), p_i[0].numpy(), rtol=1e-9,
                                   atol=1e-12 * float(delta[i]), err_msg=f"row {i}")
        np.testing.assert_allclose(float(alpha[i]), float(alpha_i[0]), rtol=1e-9,
                                   atol=1e-300, err_msg=f"row {i}")
    if solver == "scipy":  # the steps that do not fit end on the boundary
        norms = torch.linalg.vector_norm(p, dim=-1)
        moved = alpha > 0
        np.testing.assert_allclose(norms[moved].numpy(), delta[moved].numpy(), rtol=1e-12)


def test_gram_solve_keepdim_is_the_column_of_the_vector():
    fac, A, _ = _factors(True)
    alpha = torch.full((6,), 0.3, dtype=A.dtype)
    p, q = gram_solve(fac, alpha)
    p_c, q_c = gram_solve(fac, alpha.unsqueeze(-1), keepdim=True)
    assert q.shape == (6,) and q_c.shape == (6, 1)
    np.testing.assert_allclose(p_c.numpy(), p.numpy(), rtol=1e-14)
    np.testing.assert_allclose(q_c[:, 0].numpy(), q.numpy(), rtol=1e-14)


def _rosen(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def _rosen_jac(x):
    return np.array([[-20 * x[0], 10.0], [-1.0, 0.0]])


class _JacobianTurnsNaN:
    """Rosenbrock's Jacobian, NaN from call ``bad_call`` on; keeps the last finite one."""

    def __init__(self, bad_call: int):
        self.bad_call = bad_call
        self.calls = 0
        self.last_good = None

    def __call__(self, x):
        self.calls += 1
        J = _rosen_jac(x)
        if self.calls >= self.bad_call:
            return J * np.nan
        self.last_good = np.array(x, dtype=float)
        return J


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_nonfinite_jacobian_keeps_last_optimality(method):
    jac = _JacobianTurnsNaN(4)
    res = least_squares(_rosen, np.array([-1.2, 1.0]), jac=jac, method=method)
    assert res.status == 5 and not res.success
    # the reported optimality is the one measured at the last finite Jacobian
    # (|J^T f|_inf there: no bounds, no scaling, linear loss)
    x = jac.last_good
    expected = np.abs(_rosen_jac(x).T @ _rosen(x)).max()
    assert np.isfinite(res.optimality)
    np.testing.assert_allclose(res.optimality, expected, rtol=1e-9)


def _rosen_rows(x, tag):
    return np.stack([10 * (x[:, 1] - x[:, 0] ** 2), 1 - x[:, 0]], axis=1)


def _rosen_rows_jac(x, tag):
    J = np.zeros((x.shape[0], 2, 2))
    J[:, 0, 0] = -20 * x[:, 0]
    J[:, 0, 1] = 10.0
    J[:, 1, 0] = -1.0
    return J


@pytest.mark.parametrize("method", ["trf", "lm"])
def test_nonfinite_jacobian_in_a_batch_leaves_the_others_alone(method):
    rng = np.random.default_rng(3)
    X0 = np.array([-1.2, 1.0]) + 0.1 * rng.standard_normal((5, 2))
    tag = np.arange(5.0)
    calls = {"n": 0}

    def jac(x, tag):
        calls["n"] += 1
        J = _rosen_rows_jac(x, tag)
        if calls["n"] >= 3:  # problem 2's Jacobian turns NaN after two steps
            J[tag == 2] = np.nan
        return J

    res = batch_least_squares(_rosen_rows, X0, jac=jac, args=(tag,), method=method)
    clean = batch_least_squares(_rosen_rows, X0, jac=_rosen_rows_jac, args=(tag,),
                                method=method)
    status = np.asarray(res.status)
    assert status[2] == 5 and int(np.asarray(res.njev)[2]) >= 2
    assert np.isfinite(np.asarray(res.optimality)[2])
    keep = [0, 1, 3, 4]
    # a neighbour that fails: the same code path for the others, bit for bit
    for key in ("x", "cost", "optimality", "nfev", "njev", "status"):
        assert_bitwise_equal(np.asarray(getattr(res, key))[keep],
                             np.asarray(getattr(clean, key))[keep], err_msg=key)


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_residuals_in_a_batch_leave_the_others_alone(method, bad):
    # problem 2's residuals turn non-finite (in one entry) from the third evaluation
    # on: each of its trials is rejected, and nothing of it reaches the other rows
    rng = np.random.default_rng(4)
    X0 = np.array([-1.2, 1.0]) + 0.1 * rng.standard_normal((5, 2))
    tag = np.arange(5.0)
    calls = {"n": 0}

    def fun(x, tag):
        calls["n"] += 1
        f = _rosen_rows(x, tag)
        if calls["n"] >= 3:
            f[tag == 2, 1] = bad
        return f

    res = batch_least_squares(fun, X0, jac=_rosen_rows_jac, args=(tag,), method=method)
    clean = batch_least_squares(_rosen_rows, X0, jac=_rosen_rows_jac, args=(tag,),
                                method=method)
    assert np.isfinite(np.asarray(res.x)[2]).all()
    assert np.isfinite(np.asarray(res.cost)[2])
    keep = [0, 1, 3, 4]
    for key in ("x", "cost", "optimality", "nfev", "njev", "status"):
        assert_bitwise_equal(np.asarray(getattr(res, key))[keep],
                             np.asarray(getattr(clean, key))[keep], err_msg=key)


def test_verbose_table_has_no_row_for_a_nonfinite_jacobian():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res = least_squares(_rosen, np.array([-1.2, 1.0]), jac=_JacobianTurnsNaN(4),
                            method="trf", verbose=2)
    rows = [line for line in out.getvalue().splitlines()
            if line.strip() and line.split()[0].isdigit()]
    # one row per outer iteration with a finite Jacobian, none with a NaN measure
    assert len(rows) == res.njev - 1
    assert not any("nan" in line.lower() for line in rows)


def _engine_waits(call) -> tuple[int, int, int]:
    """Host syncs of ``bool(t)`` kind, all syncs and tolist() reads issued by the engine."""
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        call()
    is_nonzero = syncs = reads = 0
    for ev in prof.events():
        frame = ev.cpu_parent
        while frame is not None and "torchimize_scipy/" not in frame.name:
            frame = frame.cpu_parent
        if frame is None or "torchimize_scipy/_engine/" not in frame.name:
            continue
        if ev.name == "aten::is_nonzero":
            is_nonzero += 1
        if ev.name in ("aten::is_nonzero", "aten::item", "aten::nonzero"):
            syncs += 1
        elif "tolist of Tensor" in ev.name:
            reads += 1
    return is_nonzero, syncs, reads


def _rosen_calls(method: str = "trf"):
    fun_calls = {"n": 0}

    def fun(x):
        fun_calls["n"] += 1
        return _rosen(x)

    def call():
        fun_calls["n"] = 0
        return least_squares(fun, np.array([-1.2, 1.0]), jac=_rosen_jac, method=method)

    return call, fun_calls


@pytest.mark.parametrize("method", ["trf", "lm"])
def test_engine_reads_per_evaluation_single_problem(monkeypatch, method):
    # what a GPU runs: the per-problem scalars stay tensors beside the data (one
    # switch for every method: 'lm' kept its own, so this path still read its scalars
    # to the host, 18.7 syncs+reads per evaluation, each a device-to-host copy on a GPU)
    monkeypatch.setattr(host_scalars, "HOST", False)
    call, fun_calls = _rosen_calls(method)
    call()  # warm-up
    is_nonzero, syncs, reads = _engine_waits(call)
    evals = fun_calls["n"]
    assert evals > 10
    assert is_nonzero == 0  # no ``if tensor:`` in the engine on this path
    # 'trf': two reads per round in the loop and one per new Jacobian, one before and
    # one per iteration of the trust-region subproblem, and the SVD's own checks: about
    # 7.3 per evaluation (11 before issue 14); 'lm': about 7.7
    assert (syncs + reads) / evals <= 8.5


@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_engine_operations_per_evaluation_on_host_scalars(method):
    # on the CPU the per-problem scalars of the subproblem and of the trial's
    # assessment live on the host (host_scalars): 'trf' made 230 engine operations per
    # evaluation before, 'dogbox' 220, then about 85 and 115, and with the loop's
    # bookkeeping and dogbox's (B, n) work on the host too about 71 and 83, then 53 and
    # 62 (no products by an x_scale of ones, no finiteness tests of a Jacobian proven
    # finite, shared (1,) tensors; bench_ops.py counts the same way), then 52 and 65
    # and, with the quadratic model's values in numpy, 48 and 50
    call, fun_calls = _rosen_calls(method)
    call()  # warm-up
    ops = _engine_operations(call)
    evals = fun_calls["n"]
    assert evals > 10
    assert ops / evals <= {"trf": 52, "dogbox": 55}[method]


def _engine_operations(call) -> int:
    """Top-level aten operations issued by the engine (as bench_ops.py counts them)."""
    return top_level_package_ops(call, ("torchimize_scipy/_engine/",))


def exp_fits_thread_log(B: int, farthest: float):
    """``B`` exponential fits (m = 100, n = 2) whose starts run from close to
    ``farthest`` times the true rate away, so that they end at different rounds:
    the result and, per call of ``fun``, its rows and the thread's MKL count."""
    from torchimize_scipy import _blas_threads

    rng = np.random.default_rng(5)
    t = np.linspace(0.0, 4.0, 100)
    rate = rng.uniform(0.5, 3.0, B)
    y = 2.0 * np.exp(-rate[:, None] * t) + 0.01 * rng.standard_normal((B, 100))
    x0 = np.stack([np.full(B, 1.0), rate * np.geomspace(1.05, farthest, B)], 1)
    seen = []

    def fun(x, y):
        seen.append((x.shape[0], _blas_threads.mkl_local_threads()))
        return x[:, :1] * np.exp(-x[:, 1:] * t) - y

    def jac(x, y):
        e = np.exp(-x[:, 1:] * t)
        return np.stack([e, -x[:, :1] * t * e], -1)

    # the tests ask whether the engine itself drops to one thread: start from MKL's
    # global count with two threads, whatever OMP_NUM_THREADS or an earlier test that
    # restored torch's thread count left in this thread's MKL-local setting
    threads, local = torch.get_num_threads(), _blas_threads.mkl_local_threads()
    torch.set_num_threads(2)
    if local is not None:
        _blas_threads._SET_LOCAL(0)
    try:
        before = _blas_threads.mkl_local_threads()
        res = batch_least_squares(fun, x0, jac=jac, args=(y,), method="trf")
        assert _blas_threads.mkl_local_threads() == before  # restored after the run
    finally:
        if local is not None:
            _blas_threads._SET_LOCAL(local)
        torch.set_num_threads(threads)
    assert np.isfinite(np.asarray(res.cost)).all()
    return res, seen


def test_a_batch_admitted_at_once_within_tail_entries_runs_mkl_single_threaded():
    # 300 exponential fits, m = 100, n = 2: B m n = 60,000 entries, above torch's grain
    # size but within loop.TAIL_ENTRIES, all in the first block (nothing left to admit):
    # MKL runs single-threaded in this thread from the engine's first evaluation on
    # (only the frontend's evaluation at x0 keeps the caller's count)
    from torchimize_scipy import _blas_threads

    if _blas_threads.mkl_local_threads() is None:
        pytest.skip("torch is not built with MKL")
    _, seen = exp_fits_thread_log(300, 20.0)
    assert seen[0] == (300, 0)  # (the frontend's f0: MKL's global count)
    assert len(seen) > 2 and all(threads == 1 for _, threads in seen[1:])


def _waits_outside_host_scalars(call) -> tuple[int, int]:
    """The engine's device waits on the CPU path: syncs and ``tolist`` reads whose
    innermost package frame is in ``_engine/`` but not ``host_scalars.py`` (whose
    reads of CPU tensors wait for no device), as ``bench_ops.py`` counts them."""
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        call()
    syncs = reads = 0
    for ev in prof.events():
        sync = ev.name in ("aten::is_nonzero", "aten::item", "aten::_local_scalar_dense",
                           "aten::nonzero")
        read = "tolist of Tensor" in ev.name
        if not (sync or read):
            continue
        frame, outer_sync = ev.cpu_parent, False
        while frame is not None and "torchimize_scipy/" not in frame.name:
            outer_sync |= frame.name in ("aten::is_nonzero", "aten::item",
                                         "aten::_local_scalar_dense")
            frame = frame.cpu_parent
        if outer_sync or frame is None or "torchimize_scipy/_engine/" not in frame.name:
            continue
        if "_engine/host_scalars.py" in frame.name:
            continue
        syncs += sync
        reads += read
    return syncs, reads


@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_engine_waits_per_evaluation_on_the_cpu(method):
    # on the CPU the loop's per-round bookkeeping (codes, counters, masks and their
    # counts) lives on the host: its two reads per round and the new Jacobian's
    # finiteness read are gone (4.5 waits per evaluation before for 'trf': 2.4 of the
    # loop, 0.7 of flag_singular_factors); what is left is the SVD route's finiteness
    # guard in linalg.py and torch's own info check inside linalg_svd (0.7 each); the
    # guard is gone too for a Jacobian the loop proved finite with x_scale of ones
    # (1.4 -> 0.7 for 'trf', 1.6 -> 0.8 for 'dogbox'): torch's own check is left
    call, fun_calls = _rosen_calls(method)
    call()  # warm-up
    syncs, reads = _waits_outside_host_scalars(call)
    evals = fun_calls["n"]
    assert evals > 10
    assert reads == 0  # no count_many / tolist of the loop on this path
    assert (syncs + reads) / evals <= 1.0


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_streamed_batch_bookkeeping_host_and_device_paths_agree(monkeypatch, method):
    # the loop's per-round bookkeeping (status, nfev, njev, nit, the fresh and accept
    # masks, the counts that drive compaction and refills) is numpy on the CPU and
    # tensors on a GPU: a streamed batch (refills, compaction, a non-finite start,
    # problems stopped by their budget) ends alike on both paths
    rng = np.random.default_rng(5)
    t = np.linspace(0, 3, 25)
    B = 11
    k = rng.uniform(0.5, 2.0, (B, 1))
    y = 2 * np.exp(-k * t) + 0.01 * rng.standard_normal((B, 25))

    def fun(x, y):
        return x[:, :1] * np.exp(-x[:, 1:] * t) - y

    x0 = np.ones((B, 2))
    x0[3, 1] = np.nan
    kw = dict(args=(y,), method=method, chunk_size=4, max_nfev=None)
    host = batch_least_squares(fun, x0, **kw)
    short = batch_least_squares(fun, x0, **{**kw, "max_nfev": 3})
    monkeypatch.setattr(host_scalars, "HOST", False)
    device = batch_least_squares(fun, x0, **kw)
    short_device = batch_least_squares(fun, x0, **{**kw, "max_nfev": 3})
    ok = np.arange(B) != 3
    for res in (host, device):
        status = np.asarray(res.status)
        assert status[3] == 5  # non-finite start: stopped alone, never evaluated again
        assert np.asarray(res.nfev)[3] == 1
        assert (status[ok] > 0).all() and (status[ok] != 5).all()
    # the same minimum on both paths, to the scale of the default ftol/xtol (1e-8)
    np.testing.assert_allclose(np.asarray(host.x)[ok], np.asarray(device.x)[ok],
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(host.cost)[ok], np.asarray(device.cost)[ok],
                               rtol=1e-6)
    for res in (short, short_device):  # three evaluations cannot solve these fits
        status = np.asarray(res.status)
        assert (status[ok] == 0).all() and status[3] == 5
        assert (np.asarray(res.nfev)[ok] <= 3 + (method == "lm")).all()
