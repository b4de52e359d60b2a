"""'lm' with its per-problem scalars on the host (CPU) against the same rule in torch.

``_engine/host_scalars.py`` lets the 'lm' step rule run its elementwise scalar work
in numpy when the tensors are on the CPU; ``HOST = False`` runs the
very same code with ``xp = torch`` on the CPU (the path every other device
takes). Both must take the same iterations (counts and status) to the same
solutions: bit for bit for batches, to rounding for one float64 problem,
whose norms, square roots and small products are numpy's on the host.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _parity import assert_cost_close, assert_status_equivalent, assert_x_close
from _torch_calls import top_level_package_ops
from scipy.optimize import least_squares as scipy_least_squares

import torchimize_scipy as ts
from torchimize_scipy._curve_fit._leastsq import LeastsqBook
from torchimize_scipy._engine import host_scalars
from torchimize_scipy._engine import status as codes


def rosen(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def rosen_jac(x):
    return np.array([[-20 * x[0], 10.0], [-1.0, 0.0]])


def rosen_batch(x):
    return np.stack([10 * (x[:, 1] - x[:, 0] ** 2), 1 - x[:, 0]], axis=1)


def decay(x, a, b, c):
    return a * np.exp(-b * x) + c


XD = np.linspace(0, 4, 50)
YD = decay(XD, 2.5, 1.3, 0.5) + 0.2 * np.random.default_rng(0).normal(size=XD.size)


def _both(monkeypatch, call):
    """``call()`` on the host path and on the torch path (CPU both)."""
    host = call()
    monkeypatch.setattr(host_scalars, "HOST", False)
    dev = call()
    monkeypatch.setattr(host_scalars, "HOST", None)
    return host, dev


def _close(a, b, scale=1.0, tol=1e-8):
    """Within ``tol`` (default: scipy's ``xtol``, to which 'lm' places its solution)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("jac", [rosen_jac, "2-point"])
@pytest.mark.parametrize("x_scale", [1.0, "jac"])
def test_host_and_torch_paths_agree_on_rosenbrock(monkeypatch, jac, x_scale):
    host, dev = _both(monkeypatch, lambda: ts.least_squares(
        rosen, [-1.2, 1.0], jac=jac, method="lm", x_scale=x_scale))
    assert host.status == dev.status and host.status > 0
    assert (host.nfev, host.njev) == (dev.nfev, dev.njev)
    _close(host.x, dev.x)
    _close(host.cost, dev.cost, tol=1e-8)  # (both at a zero residual)
    ref = scipy_least_squares(rosen, [-1.2, 1.0], jac=jac, method="lm", x_scale=x_scale)
    _close(host.x, ref.x, tol=1e-6)  # both at scipy's solution (xtol = 1e-8)


def test_host_and_torch_paths_agree_on_curve_fit(monkeypatch):
    (ph, ch, ih, _, ierh), (pd, cd, idd, _, ierd) = _both(
        monkeypatch, lambda: ts.curve_fit(decay, XD, YD, full_output=True))
    assert ierh == ierd and ierh in (1, 2, 3, 4)
    assert ih["nfev"] == idd["nfev"]
    _close(ph, pd)
    _close(ch, cd, tol=1e-6)  # (a covariance: the solution's differences, squared)


def test_host_and_torch_paths_agree_on_a_float32_batch(monkeypatch):
    x0 = np.array([-1.2, 1.0]) + np.random.default_rng(1).uniform(0, 0.5, (6, 2))
    host, dev = _both(monkeypatch, lambda: ts.batch_least_squares(
        rosen_batch, torch.tensor(x0, dtype=torch.float32), method="lm"))
    assert torch.equal(host.status, dev.status)
    assert torch.equal(host.nfev, dev.nfev)
    np.testing.assert_allclose(host.x.numpy(), dev.x.numpy(), rtol=1e-5, atol=1e-5)


def test_a_nan_row_stops_alone_on_the_host_path():
    """One problem's NaN residuals must not change its neighbours' runs."""
    x0 = np.array([[-1.2, 1.0], [0.5, 0.5], [2.0, 2.0]])

    def fun(x):
        r = rosen_batch(x)
        r[np.abs(x[:, 0] - 0.5) < 1e-12] = np.nan  # problem 1 fails at its start
        return r

    def good(x):
        return rosen_batch(x)

    ok = ts.batch_least_squares(good, x0[[0, 2]], method="lm")
    with pytest.raises(ValueError, match="not finite"):
        ts.least_squares(lambda x: fun(x[None])[0], x0[1], method="lm")
    res = ts.batch_least_squares(fun, x0, method="lm")
    assert res.status[1] not in (1, 2, 3, 4) and not res.success[1]
    np.testing.assert_array_equal(res.x[[0, 2]], ok.x)  # the same path run twice
    np.testing.assert_array_equal(res.nfev[[0, 2]], ok.nfev)


def test_scalars_namespace_round_trip():
    hs = host_scalars.Scalars(torch.zeros(2, 3, dtype=torch.float64))  # a batch of two
    assert hs.host and hs.xp is np
    small = torch.tensor([1.5, -2.0], dtype=torch.float64)
    other = torch.tensor([3.0, 4.0], dtype=torch.float64)
    large = torch.arange(1000, dtype=torch.float32)
    flags = torch.tensor([True, False])
    a, b, c, o = hs.view(small, large, flags, other)
    assert a.dtype == np.float64 and b.dtype == np.float32 and c.dtype == np.bool_
    np.testing.assert_array_equal(a, [1.5, -2.0])
    np.testing.assert_array_equal(o, [3.0, 4.0])  # (stacked with ``small``)
    assert np.shares_memory(b, large.numpy())  # a large tensor is viewed, not copied
    t, = hs.tensors(a * 2)
    assert t.dtype == torch.float64 and t.tolist() == [3.0, -4.0]
    again, = hs.view(t)
    assert np.shares_memory(again, t.numpy())  # the array it came from, no crossing
    assert hs.amax(np.array([[1.0, 3.0], [-1.0, -2.0]])).tolist() == [3.0, -1.0]
    with hs.quiet():  # no floating-point warning from numpy
        assert np.isinf(np.array([1.0]) / np.array([0.0]))[0]


def test_scalars_namespace_of_one_float64_problem():
    hs = host_scalars.Scalars(torch.zeros(1, 3, dtype=torch.float64))
    assert hs.host and hs.floats and hs.xp is host_scalars.Floats
    d, flag, n, row = hs.view(torch.tensor([2.0], dtype=torch.float64), torch.tensor([True]),
                              torch.tensor([7]), torch.tensor([[1.0, -3.0, 2.0]],
                                                              dtype=torch.float64))
    assert type(d) is np.float64 and type(flag) is np.bool_ and type(n) is np.int64
    assert row.shape == (1, 3) and hs.amax(row) == 2.0
    xp = hs.xp
    with hs.quiet():
        assert np.isinf(d / np.float64(0.0))  # numpy's division, not ZeroDivisionError
        nan = np.float64("nan")
        assert np.isnan(xp.minimum(nan, d)) and np.isnan(xp.maximum(d, nan))
    assert xp.where(flag, d, 0.0) == 2.0 and xp.where(~flag, d, 0.0) == 0.0
    np.testing.assert_array_equal(xp.where(row > 0, row, 0.0), [[1.0, 0.0, 2.0]])
    t_d, t_flag, t_code, t_zero = hs.tensors(d * 3, flag, np.where(flag, 2, -100), 0.0)
    assert t_d.dtype == torch.float64 and t_d.tolist() == [6.0]
    assert t_flag.dtype == torch.bool and t_code.dtype == torch.int64
    assert t_code.tolist() == [2] and t_zero.tolist() == [0.0]
    assert hs.view(t_d)[0] == 6.0 and type(hs.view(t_code)[0]) is np.int64
    # float32 and batches keep arrays
    assert host_scalars.Scalars(torch.zeros(1, 3, dtype=torch.float32)).xp is np


def test_scalars_namespace_off_the_host(monkeypatch):
    monkeypatch.setattr(host_scalars, "HOST", False)
    hs = host_scalars.Scalars(torch.zeros(1, 2))
    assert not hs.host and hs.xp is torch
    t = torch.tensor([1.0, 2.0])
    assert hs.view(t)[0] is t and hs.tensors(t)[0] is t
    assert torch.equal(hs.amax(torch.tensor([[1.0, 3.0]])), torch.tensor([3.0]))


def _top_level_ops_of_lm_rosenbrock(files: tuple, crossings: set) -> tuple[int, int]:
    """Evaluations of one 'lm' Rosenbrock solve, and the top-level aten operations
    called from the given source files, leaving out the events named in ``crossings``."""
    calls = []

    def fun(x):
        calls.append(1)
        return rosen(x)

    def solve():
        ts.least_squares(fun, [-1.2, 1.0], jac=rosen_jac, method="lm")

    solve()
    calls.clear()
    own = top_level_package_ops(solve, files, frozenset(crossings))
    return len(calls), own


def test_lm_rule_issues_few_torch_operations_per_evaluation():
    """Regression guard: the rule's own work (steps/lm.py, host_scalars.py) per evaluation.

    Before its scalars moved to the host it issued ~100 top-level aten
    operations per evaluation on this problem (assess_trial alone ~53); now
    about 12, not counting the events of the host crossings themselves
    (``tolist``'s ``resolve_conj``/``resolve_neg``, ``from_numpy``'s
    ``lift_fresh``: no arithmetic, a fraction of a microsecond each).
    """
    crossings = {"aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh"}
    evaluations, own = _top_level_ops_of_lm_rosenbrock(
        ("steps/lm.py", "host_scalars.py", "linalg.py"), crossings)
    assert evaluations == 21
    # one problem also takes its norms, square roots and step on the host (issue 14:
    # 327 operations in this solve before, 30 after: the scaling's reciprocal per model).
    # Its factorisation (steps/lm.py::_host_svd since, linalg.py before) scales and tests
    # J on the host: 180 operations in these files before, 105 after (the SVD, U^T f)
    assert own / evaluations < 6


def test_lmpar_of_one_problem_issues_no_torch_operation():
    """One float64 problem runs MINPACK's lmpar wholly on the host: its norms, sums and
    the damped step's product with ``V`` in numpy (235 top-level aten operations in the
    Rosenbrock solve before, from torch's norms, sums and ``bmm``; now none but the
    crossings that hand the step back as a tensor)."""
    crossings = {"aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh"}
    evaluations, own = _top_level_ops_of_lm_rosenbrock(("trust_region.py",), crossings)
    assert evaluations == 21
    assert own == 0


def test_one_problem_overflowing_its_norms_warns_nothing(monkeypatch):
    """Residuals whose squares overflow, without numpy's overflow warning (an error under
    this suite's settings) on either path. Regression: the host norms of one problem
    warned before they ran under ``Scalars.quiet``. Since issue 14 such a problem runs on
    residuals scaled by a power of two (``_driver._LMScaling``) and is solved as scipy's
    MINPACK solves it (before, both paths stopped at x0 with an infinite cost)."""
    def fun(x):
        return np.array([1e160 * (x[0] - 1.0), x[1] - 1.0, x[0] * x[1]])

    host, dev = _both(monkeypatch, lambda: ts.least_squares(fun, [3.0, 0.0], method="lm"))
    assert (host.status, host.nfev) == (dev.status, dev.nfev)
    with warnings.catch_warnings():  # (scipy's own initial cost overflows)
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = scipy_least_squares(fun, [3.0, 0.0], method="lm")
    for res in (host, dev):
        assert_x_close(res.x, ref.x)
        assert_cost_close(res.cost, ref.cost)
        assert_status_equivalent(res.status, ref.status)


# ---------------------------------------------------------------- MINPACK's QR in numpy
def _rank_deficient(seed, B=3, m=12, n=4):
    rng = np.random.default_rng(seed)
    J = rng.normal(size=(B, m, n))
    J[0, :, 3] = 0.0  # a zero column: a zero pivot in R
    J[1, :, 3] = 2.0 * J[1, :, 0]  # dependent columns (to rounding)
    f = rng.normal(size=(B, m))
    diag = rng.uniform(0.5, 2.0, size=(B, n))
    return J, f, diag


def test_pivoted_qr_takes_numpy_arrays_like_tensors():
    from torchimize_scipy._engine.minpack_qr import pivoted_qr

    J, f, _ = _rank_deficient(0)
    R_t, perm_t, qtf_t = pivoted_qr(torch.tensor(J), torch.tensor(f))
    R_n, perm_n, qtf_n = pivoted_qr(J.copy(), f.copy())
    assert isinstance(R_n, np.ndarray) and perm_n.dtype == np.int64
    np.testing.assert_array_equal(perm_n, perm_t.numpy())  # well-separated column norms
    tol = 100 * np.finfo(float).eps * np.abs(J).sum(axis=(1, 2)).max()
    np.testing.assert_allclose(R_n, R_t.numpy(), rtol=0, atol=tol)
    np.testing.assert_allclose(qtf_n, qtf_t.numpy(), rtol=0, atol=tol * np.abs(f).sum())


def test_basic_gauss_newton_host_and_torch_paths_agree(monkeypatch):
    from torchimize_scipy._engine.minpack_qr import basic_gauss_newton

    J, f, diag = (torch.tensor(a) for a in _rank_deficient(1))
    host, host_fac = basic_gauss_newton(J, diag, f)
    monkeypatch.setattr(host_scalars, "HOST", False)
    dev, dev_fac = basic_gauss_newton(J, diag, f)
    assert torch.equal(host.rows, dev.rows) and bool(host.rows.all())
    assert torch.equal(host.full, dev.full)
    assert host.full.tolist() == [False, True, True]  # the zero column
    scale = float(dev.p.abs().max())
    np.testing.assert_allclose(host.p.numpy(), dev.p.numpy(), rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(host.curv.numpy(), dev.curv.numpy(), rtol=1e-10)
    np.testing.assert_allclose(host_fac.s.numpy(), dev_fac.s.numpy(), rtol=1e-10,
                               atol=1e-12 * float(dev_fac.s.max()))


# ---------------------------------------------------------------- MINPACK's lmpar on the host
def _lmpar_factors(use_gram, B=6, m=12, n=3, seed=0):
    from torchimize_scipy._engine.linalg import factorize

    rng = np.random.default_rng(seed)
    A = torch.as_tensor(rng.standard_normal((B, m, n)))
    A[0, :, 2] = A[0, :, 0]  # an exactly rank-deficient row (a zero singular value)
    f = torch.as_tensor(rng.standard_normal((B, m)) * np.geomspace(1e-3, 1e2, B)[:, None])
    return factorize(A, None, f, use_gram=use_gram), A, f


@pytest.mark.parametrize("use_gram", [False, True])
@pytest.mark.parametrize("rows", [slice(None), slice(2, 3)])  # a batch; one problem (floats)
def test_lmpar_host_and_torch_paths_agree(use_gram, rows):
    """MINPACK's lmpar on host scalars (numpy, or numpy.float64 for one problem) against
    the same body on tensors: the same steps and damping, to rounding (issue 14)."""
    from torchimize_scipy._engine.linalg import factorize, gauss_newton_step
    from torchimize_scipy._engine.trust_region import solve_trust_region_minpack

    _, A, f = _lmpar_factors(use_gram)
    A, f = A[rows], f[rows]
    B = A.shape[0]
    fac = factorize(A, None, f, use_gram=use_gram)
    # radii from "the Gauss-Newton step fits" to "several Newton iterations"
    gn = torch.linalg.vector_norm(gauss_newton_step(fac), dim=-1)
    delta = gn * torch.tensor([10.0, 1.05, 0.5, 0.2, 0.05, 0.01], dtype=A.dtype)[rows]
    par0 = torch.tensor([0.0, 0.5, 0.0, 2.0, 0.0, 1e-3], dtype=A.dtype)[rows]
    ph, ah = solve_trust_region_minpack(fac, delta, par0, 12, 3, host=True)
    pd, ad = solve_trust_region_minpack(fac, delta, par0, 12, 3, host=False)
    assert ph.shape == (B, 3) and ah.shape == (B,) and ah.dtype == A.dtype
    if B > 1:
        assert bool((ad == 0).any()) and bool((ad > 0).any())  # both kinds of rows
    else:
        assert float(ad[0]) > 0  # one problem that iterates
    scale = float(delta.max())
    np.testing.assert_allclose(ph.numpy(), pd.numpy(), rtol=1e-10, atol=1e-13 * scale)
    np.testing.assert_allclose(ah.numpy(), ad.numpy(), rtol=1e-10, atol=0)
    # MINPACK's acceptance: |p| within 10 % of the radius wherever the damping is positive
    moved = ad > 0
    norms = torch.linalg.vector_norm(pd, dim=-1)[moved]
    assert bool((abs(norms - delta[moved]) <= 0.1 * delta[moved] * (1 + 1e-12)).all())


def test_lmpar_reuses_the_norm_of_its_gauss_newton_step():
    """The host keeps |p_gn| on the step tensor for the trials of one outer iteration;
    a second call with the same step (a rejected trial, smaller radius) answers as a
    first call with a fresh copy of that step."""
    from torchimize_scipy._engine.linalg import factorize, gauss_newton_step
    from torchimize_scipy._engine.trust_region import solve_trust_region_minpack

    _, A, f = _lmpar_factors(False)
    fac = factorize(A[1:2], None, f[1:2], use_gram=False)
    p_gn = gauss_newton_step(fac)
    gn = torch.linalg.vector_norm(p_gn, dim=-1)
    big, small = 10 * gn, 0.1 * gn
    zero = torch.zeros(1, dtype=A.dtype)
    p1, a1 = solve_trust_region_minpack(fac, big, zero, 12, 3, p_gn=p_gn)
    assert float(a1[0]) == 0 and torch.equal(p1, p_gn)  # the Gauss-Newton step fits
    p2, a2 = solve_trust_region_minpack(fac, small, zero, 12, 3, p_gn=p_gn)
    p3, a3 = solve_trust_region_minpack(fac, small, zero, 12, 3, p_gn=p_gn.clone())
    assert float(a2[0]) > 0
    assert torch.equal(p2, p3) and torch.equal(a2, a3)  # the same path run twice


def test_minimum_norm_step_is_the_gauss_newton_step():
    """The Gauss-Newton step from the host rows: the step of linalg.gauss_newton_step
    (zero singular values dropped) on the SVD rows, the Gram solve on the others."""
    from torchimize_scipy._engine.linalg import gauss_newton_step
    from torchimize_scipy._engine.trust_region import minimum_norm_step

    for use_gram in (False, True):
        fac, A, f = _lmpar_factors(use_gram)
        ref = gauss_newton_step(fac)
        for got in (minimum_norm_step(fac), minimum_norm_step(
                _lmpar_factors(use_gram, B=1, seed=3)[0])):
            assert got.dtype == A.dtype and torch.isfinite(got).all()
        got = minimum_norm_step(fac)
        scale = float(ref.abs().max())
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-12, atol=1e-14 * scale)
        # the rank-deficient row moves orthogonally to the null vector (1, 0, -1)
        assert abs(float(got[0, 0] - got[0, 2])) <= 1e-10 * scale


def test_lm_trial_norm_of_the_step_on_demand():
    """'lm''s trial computes |step| only when the loop asks (scipy's table, verbose=2)."""
    from torchimize_scipy._engine.steps.lm import LMTrial

    step = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    trial = LMTrial(step + 1, step, torch.ones(2), torch.zeros(2))
    assert trial._step_norm is None
    assert trial.step_norm.tolist() == [5.0, 0.0]
    assert trial.step_norm is trial.step_norm  # computed once


def test_lm_verbose_2_reads_the_step_norm_on_demand(capsys):
    """With verbose=2 the loop reads the trial's |step| (scipy prints no table for 'lm'):
    the lazy norm must serve it, and the run report as scipy's."""
    res = ts.least_squares(rosen, [-1.2, 1.0], jac=rosen_jac, method="lm", verbose=2)
    ref = scipy_least_squares(rosen, [-1.2, 1.0], jac=rosen_jac, method="lm")
    assert res.status == ref.status and res.nfev == ref.nfev
    assert "Function evaluations" in capsys.readouterr().out


def test_lmpar_issues_few_torch_operations_per_evaluation():
    """Regression guard (issue 14): MINPACK's lmpar (trust_region.py) per evaluation.

    With its scalars as tensors it issued ~100 top-level aten operations per
    evaluation on this problem; on the host only its norms and sums (torch's
    reductions, kept for bitwise agreement with the tensor path) and the
    products with ``V`` remain: about 11, not counting the host crossings.
    """
    crossings = {"aten::resolve_conj", "aten::resolve_neg", "aten::lift_fresh", "aten::item"}
    evaluations, own = _top_level_ops_of_lm_rosenbrock(("trust_region.py",), crossings)
    assert evaluations == 21
    assert own / evaluations < 20


# ---------------------------------------------------------------- curve_fit's MINPACK book
def _book_script(book):
    """Evaluations and Jacobians of two problems, whole-batch and one at a time."""
    ids, one = torch.tensor([0, 1]), torch.tensor([1])
    x = torch.zeros(2, 1, dtype=torch.float64)
    f = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    book.record_call(ids, x, f)
    book.add_fd_evals(ids, 1)
    book.record_jac(ids, torch.ones(2, 1, 1, dtype=torch.float64), lambda: f)
    book.record_call(ids, x + 1, f + 1)
    book.record_call(one, x[1:] + 2, f[1:] + 2)
    book.add_fd_evals(one, 1)
    book.record_jac(one, torch.full((1, 1, 1), 2.0, dtype=torch.float64), lambda: f[1:] + 2)
    book.record_call(one, x[1:] + 3, f[1:] + 3)
    book.record_call(one, x[1:] + 4, f[1:] + 4)
    return book


def test_book_counts_on_the_host_as_in_tensors():
    """On the CPU the book's counts are numpy arrays (no torch operation per update); the
    tensor code other devices run (host=False) counts the same (issue 14)."""
    host = _book_script(LeastsqBook(5, 1e-8, 2, "cpu", keep_residuals=True))
    dev = _book_script(LeastsqBook(5, 1e-8, 2, "cpu", keep_residuals=True, host=False))
    assert host.host and not dev.host
    assert isinstance(host.rows["trials"], np.ndarray)
    assert isinstance(dev.rows["trials"], torch.Tensor)
    for name in LeastsqBook.COUNTS:
        assert host.rows[name].tolist() == dev.rows[name].tolist(), name
    # problem 1: 4 trials + 2 differences + the first call = 7 >= maxfev 5: spent, and
    # the trial made with the budget spent is MINPACK's info 5
    assert host.rows["trials"].tolist() == [1, 4]
    assert host.spent.tolist() == [False, True] and host.hit.tolist() == [False, True]
    assert host.any_spent() and dev.any_spent()
    assert isinstance(host.spent, torch.Tensor) and isinstance(host.jac_calls, torch.Tensor)
    status = torch.tensor([codes.FTOL, codes.GTOL])
    assert host.minpack_njev(status).tolist() == dev.minpack_njev(status).tolist() == [1, 2]


def test_lm_large_batches_keep_the_tensor_path(monkeypatch):
    """Above torch's grain size the rule's (B, n) work stays torch's (threaded), below it
    lives on the host; both give the same fits (issue 14, the B = 10,000 regression)."""
    from torchimize_scipy._engine import host_scalars

    for_rows = host_scalars.for_rows
    assert for_rows(torch.zeros(10, 4, dtype=torch.float64)).host
    assert not for_rows(torch.zeros(10_000, 4, dtype=torch.float64)).host
    assert for_rows(torch.zeros(8_192, 4, dtype=torch.float64)).host  # 32,768 entries
    assert for_rows(torch.zeros(1, 100_000, dtype=torch.float64)).host  # one problem
    x0 = np.array([-1.2, 1.0]) + np.random.default_rng(2).uniform(0, 0.5, (6, 2))

    def run():
        return ts.batch_least_squares(rosen_batch, x0, method="lm")

    host = run()
    monkeypatch.setattr(host_scalars, "GRAIN", 0)  # every batch "large"
    dev = run()
    assert np.array_equal(host.status, dev.status) and np.array_equal(host.nfev, dev.nfev)
    _close(host.x, dev.x)


# ---------------------------------------------------------------- shared Scalars, kept tensors
def test_scalars_shared_per_shape_and_following_host_switch(monkeypatch):
    """``for_rows``/``scalars`` hand out one object per CPU batch size and dtype, and a
    change of ``host_scalars.HOST`` (the tests' device path) is not hidden by the cache."""
    x = torch.zeros(1, 2, dtype=torch.float64)
    a, b = host_scalars.for_rows(x), host_scalars.for_rows(x.clone())
    assert a is b and a.host and a.floats
    assert host_scalars.for_rows(torch.zeros(3, 2, dtype=torch.float64)) is not a
    assert not host_scalars.for_rows(torch.zeros(3, 2, dtype=torch.float64)).floats
    assert host_scalars.scalars(x, host=False) is not a
    assert not host_scalars.scalars(x, host=False).host
    monkeypatch.setattr(host_scalars, "HOST", False)
    c = host_scalars.for_rows(x)
    assert not c.host and c.xp is torch


def test_renewed_keeps_a_tensor_only_for_its_own_value():
    hs = host_scalars.for_rows(torch.zeros(1, 2, dtype=torch.float64))
    old, = hs.tensors(np.float64(2.5))
    value, = hs.view(old)
    assert hs.renewed(old, value) is old  # the very value it remembers
    new = hs.renewed(old, np.float64(2.5))  # an equal value, another object: kept as it is
    assert new is not old and type(new) is np.float64 and new == 2.5
    assert hs.renewed(new, new) is new
    dev = host_scalars.Scalars(old, host=False)
    t = torch.tensor([1.0], dtype=torch.float64)
    assert dev.renewed(old, t) is t  # off the host the value is the tensor


def test_one_problem_keeps_host_values_as_numpy_scalars():
    """One float64 problem's state holds numpy scalars (Scalars.keep), read back as they
    are and turned into tensors where a tensor is needed; a batch keeps tensors."""
    hs = host_scalars.for_rows(torch.zeros(1, 2, dtype=torch.float64))
    kept = hs.keep(np.float64(1.5), 2.5, True, 7, np.bool_(False), np.int64(3))
    assert [type(v) for v in kept] == [np.float64, np.float64, np.bool_, np.int64, np.bool_,
                                       np.int64]
    assert hs.view(*kept) == kept and hs.get(kept[0]) is kept[0]
    rows, = hs.keep(np.array([[1.0, 2.0]]))  # rows stay tensors
    assert isinstance(rows, torch.Tensor) and rows.shape == (1, 2)
    t = host_scalars.as_tensor(kept[0])
    assert t.shape == (1,) and t.dtype == torch.float64 and float(t[0]) == 1.5
    assert host_scalars.as_tensor(t) is t
    assert host_scalars.as_tensor(kept[3]).dtype == torch.long
    batch = host_scalars.for_rows(torch.zeros(3, 2, dtype=torch.float64))
    v, = batch.keep(np.array([1.0, 2.0, 3.0]))
    assert isinstance(v, torch.Tensor) and v.tolist() == [1.0, 2.0, 3.0]


def test_one_problem_state_reaches_callers_as_tensors():
    """The loop hands ``on_iteration``/``callback`` tensors, whatever it keeps (one
    problem's host values); the results are the same with and without the hook."""
    from torchimize_scipy._engine.loop import tensor_state

    state = {"a": torch.zeros(1), "b": np.float64(2.0), "c": np.bool_(True)}
    out = tensor_state(state)
    assert all(isinstance(v, torch.Tensor) for v in out.values())
    assert out["a"] is state["a"] and float(out["b"][0]) == 2.0 and bool(out["c"][0])
    only = {"a": torch.zeros(1)}
    assert tensor_state(only) is only
    seen = []

    def cb(intermediate_result):
        seen.append((intermediate_result.nit, intermediate_result.nfev))

    x0 = np.array([-1.2, 1.0])
    plain = ts.least_squares(_rosen, x0, jac=_rosen_jac, method="trf")
    hooked = ts.least_squares(_rosen, x0, jac=_rosen_jac, method="trf", callback=cb)
    nits = [nit for nit, _ in seen]
    assert len(seen) > 3 and nits == list(range(nits[0], nits[0] + len(seen)))
    assert all(isinstance(v, int) for pair in seen for v in pair)
    assert seen[-1][1] <= hooked.nfev
    assert hooked.nfev == plain.nfev and np.array_equal(hooked.x, plain.x)


def _rosen(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def _rosen_jac(x):
    return np.array([[-20 * x[0], 10.0], [-1.0, 0.0]])


def test_one_lm_problem_makes_no_tensor_per_host_value(monkeypatch):
    """Regression (issue 14): one problem's iteration kept every per-problem value as a
    ``(1,)`` tensor (388 made per Rosenbrock solve, 19 per trial); the state now keeps
    numpy scalars, and the only ``(1,)`` tensors made are the shared flags of a trial's
    finiteness and rank test and the results' few values."""
    made = []
    real = host_scalars._scalar_tensor

    def counting(v):
        made.append(type(v))
        return real(v)

    monkeypatch.setattr(host_scalars, "_scalar_tensor", counting)
    res = ts.least_squares(_rosen, np.array([-1.2, 1.0]), jac=_rosen_jac, method="lm")
    ref = scipy_least_squares(_rosen, np.array([-1.2, 1.0]), jac=_rosen_jac, method="lm")
    assert res.nfev == ref.nfev and res.status == ref.status
    # (the cost of each evaluation is a (1,) tensor: problem.cost sums few residuals on
    # the host, in place of three torch operations)
    costs = res.nfev + 1
    assert len(made) <= 2 * res.nfev + costs
    assert made.count(np.float64) <= 3 + costs  # (the costs and the reported values only)


def test_numpy_fun_hands_its_private_copy_over_as_host_rows():
    """A numpy ``fun``'s result reaches the engine as a tensor that remembers the private
    copy it was made from (no conversion back to the host), and a point the engine made
    on the host is passed from its host rows: the same values, a fresh array."""
    from torchimize_scipy._arrays import Namespace
    from torchimize_scipy._user_functions import RowwiseFunction

    seen = []

    def fun(x):
        seen.append(x)
        out = np.array([x[0] - 1.0, 2.0 * x[1]])
        seen.append(out)
        return out

    ns = Namespace("numpy", torch.device("cpu"), torch.float64)
    uf = RowwiseFunction(fun, (), {}, ns, kind="fun")
    row = np.array([[3.0, 4.0]])
    x = host_scalars.remember_rows(torch.from_numpy(row), row)
    f = uf(x, torch.zeros(1, dtype=torch.long))
    assert seen[0] is not row[0] and np.array_equal(seen[0], [3.0, 4.0])
    rows = host_scalars.host_rows(f)
    assert rows is not None and rows is not seen[1] and np.array_equal(rows, f.numpy())
    assert f.tolist() == [[2.0, 8.0]]
    seen[1][0] = 99.0  # fun may reuse its output: the engine's copy does not change
    assert f.tolist() == [[2.0, 8.0]]


def test_stop_running_takes_one_problems_host_status_with_tensor_masks():
    """A rule's tensor code (``_common.flag_singular``) may stop a problem whose status
    the loop keeps on the host (Scalars.keep): the status becomes a tensor."""
    from torchimize_scipy._engine import termination as term

    out = term.stop_running(np.int64(term.RUNNING), torch.tensor([True]), term.SINGULAR)
    assert isinstance(out, torch.Tensor) and out.tolist() == [term.SINGULAR]
    kept = term.stop_running(np.int64(term.FTOL), torch.tensor([True]), term.SINGULAR)
    assert kept.tolist() == [term.FTOL]
    # and the loop hands a state holding a Jacobian operator to callers as it is
    from torchimize_scipy._engine.loop import tensor_state

    op = object()
    out = tensor_state({"J": op, "nit": np.int64(2)})
    assert out["J"] is op and out["nit"].tolist() == [2]


@pytest.mark.parametrize("row", [0, 1, 2])
def test_one_problem_pivoted_qr_and_basic_step_agree_with_the_batch(row):
    """One problem's host route (``_pivoted_qr_one``, ``_basic_one``) against the same
    problem as a row of a batch (a zero column, dependent columns, a regular row)."""
    from torchimize_scipy._engine.minpack_qr import basic_gauss_newton, pivoted_qr

    J, f, diag = _rank_deficient(2)
    R_b, perm_b, qtf_b = pivoted_qr(J.copy(), f.copy())
    R_1, perm_1, qtf_1 = pivoted_qr(J[row:row + 1].copy(), f[row:row + 1].copy())
    assert R_1.shape == (1,) + R_b.shape[1:] and perm_1.dtype == np.int64
    np.testing.assert_array_equal(perm_1[0], perm_b[row])
    tol = 100 * np.finfo(float).eps * np.abs(J[row]).sum()
    np.testing.assert_allclose(R_1[0], R_b[row], rtol=0, atol=tol)
    np.testing.assert_allclose(qtf_1[0], qtf_b[row], rtol=0, atol=tol * np.abs(f[row]).sum())

    Jt, ft, dt = (torch.tensor(a) for a in (J, f, diag))
    batch, batch_fac = basic_gauss_newton(Jt, dt, ft)
    one, one_fac = basic_gauss_newton(Jt[row:row + 1], dt[row:row + 1], ft[row:row + 1])
    assert torch.equal(one.rows, batch.rows[row:row + 1])
    assert torch.equal(one.full, batch.full[row:row + 1])
    scale = float(batch.p[row].abs().max())
    np.testing.assert_allclose(one.p.numpy()[0], batch.p.numpy()[row], rtol=0,
                               atol=1e-10 * scale)
    np.testing.assert_allclose(one.curv.numpy()[0], batch.curv.numpy()[row], rtol=1e-10)
    s_max = float(batch_fac.s[row].max())
    np.testing.assert_allclose(one_fac.s.numpy()[0], batch_fac.s.numpy()[row], rtol=0,
                               atol=1e-12 * s_max)


def test_one_problem_basic_step_with_a_nan_entry_fails_alone():
    """A NaN in one problem's Jacobian: its basic step is not taken (the tensors' path)."""
    from torchimize_scipy._engine.minpack_qr import basic_gauss_newton

    J, f, diag = _rank_deficient(3)
    J = J[:1].copy()
    J[0, 2, 1] = np.nan
    one, _ = basic_gauss_newton(torch.tensor(J), torch.tensor(diag[:1]), torch.tensor(f[:1]))
    assert one.rows.tolist() == [False]
    assert torch.equal(one.p, torch.zeros_like(one.p))
