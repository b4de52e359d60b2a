"""One float64 'lm' problem on the host: its SVD from numpy, lmpar written out (issue 14).

``steps/lm.py::_host_svd`` factorises one problem's scaled Jacobian with
numpy's LAPACK instead of torch's, and ``trust_region._solve_minpack_one``
runs MINPACK's lmpar for it on ``numpy.float64`` scalars without the
namespace calls of the general body. Both must give the values of the
general code to rounding, hand over to it whatever they cannot handle (non-
finite entries) and keep scipy's results.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _parity import (
    assert_cost_close,
    assert_counts_close,
    assert_status_equivalent,
    assert_x_close,
)
from scipy.optimize import least_squares as scipy_least_squares

import torchimize_scipy as ts
from torchimize_scipy._engine import host_scalars
from torchimize_scipy._engine.counts import known_finite, mark_finite
from torchimize_scipy._engine.linalg import Factors, gauss_newton_step, svd_factors
from torchimize_scipy._engine.minpack_qr import basic_gauss_newton
from torchimize_scipy._engine.steps.lm import _host_svd
from torchimize_scipy._engine.trust_region import (
    _solve_minpack,
    _solve_minpack_one,
    solve_trust_region_minpack,
)


def _problem(seed=0, m=7, n=3, deficient=False):
    rng = np.random.default_rng(seed)
    J = rng.standard_normal((1, m, n))
    if deficient:
        J[0, :, 2] = J[0, :, 0]
    diag = rng.uniform(0.5, 3.0, (1, n))
    f = rng.standard_normal((1, m))
    return (torch.as_tensor(J), torch.as_tensor(diag), torch.as_tensor(f))


def _hs():
    return host_scalars.for_rows(torch.zeros(1, 3, dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_host_svd_matches_torch_factorisation(seed):
    J, diag, f = _problem(seed)
    fac = _host_svd(_hs(), J, diag, f)
    s, V, uf = svd_factors(J, torch.reciprocal(diag), f)
    scale = float(s[0, 0])
    assert fac is not None and known_finite(fac.s)
    np.testing.assert_allclose(fac.s.numpy(), s.numpy(), rtol=0, atol=1e-12 * scale)
    # V and uf are determined up to the signs of the singular pairs: compare V diag(uf)
    # and the minimum-norm step built from them
    np.testing.assert_allclose((fac.V * fac.uf[:, None, :]).numpy(),
                               (V * uf[:, None, :]).numpy(), rtol=0, atol=1e-12 * scale)
    p_host = gauss_newton_step(fac)
    p_torch = gauss_newton_step(Factors(s, V, uf))
    np.testing.assert_allclose(p_host.numpy(), p_torch.numpy(), rtol=1e-10,
                               atol=1e-12 * float(p_torch.abs().max()))


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_host_svd_hands_non_finite_jacobians_to_the_tensor_path(bad):
    J, diag, f = _problem()
    J = J.clone()
    J[0, 1, 1] = bad
    assert _host_svd(_hs(), J, diag, f) is None


def test_host_svd_hands_an_overflowing_scaled_jacobian_to_the_tensor_path():
    """A finite J whose product with 1 / diag overflows is not factorised on the host."""
    J, diag, f = _problem()
    J = mark_finite(J.clone() * 1e300)
    diag = diag.clone()
    diag[0, 0] = 1e-300
    hs = _hs()
    # (no floating-point warning escapes the caller's Scalars.quiet either)
    with np.errstate(all="raise"), hs.quiet():
        assert _host_svd(hs, J, diag, f) is None


def test_svd_factors_trusts_j_d_only_when_both_are_marked():
    J, diag, f = _problem()
    d = torch.reciprocal(diag)
    s, _, _ = svd_factors(J, d, f)
    assert not known_finite(s)  # nothing known: the entries were tested (and not marked)
    s, _, _ = svd_factors(mark_finite(J.view_as(J)), d, f)
    assert not known_finite(s)  # d not known finite
    s_marked, _, _ = svd_factors(mark_finite(J.view_as(J)), mark_finite(d.clone()), f)
    assert known_finite(s_marked)
    np.testing.assert_array_equal(s_marked.numpy(), s.numpy())  # the same path's SVD


def _lmpar_inputs(seed=0, deficient=False):
    J, diag, f = _problem(seed, deficient=deficient)
    fac = Factors(*svd_factors(J, torch.reciprocal(diag), f))
    p_gn = gauss_newton_step(fac)
    return J, diag, f, fac, p_gn


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("ratio", [10.0, 1.05, 0.5, 0.2, 0.01, 1e-6])
@pytest.mark.parametrize("par0", [0.0, 0.3])
def test_lmpar_of_one_problem_follows_the_general_body(seed, ratio, par0):
    """The written-out lmpar takes the general body's iterations: the same damping and
    step to rounding, whichever case the radius selects."""
    _, _, _, fac, p_gn = _lmpar_inputs(seed)
    delta = torch.linalg.vector_norm(p_gn, dim=-1) * ratio
    par0_t = torch.tensor([par0], dtype=torch.float64)
    sc = host_scalars.scalars(delta, host=True)
    assert sc.floats
    with sc.quiet():
        p1, a1 = _solve_minpack_one(sc, fac, delta, par0_t, 7, 3, 10, None, p_gn.clone())
        a1 = torch.tensor([a1])  # (a numpy.float64: the host value the rule keeps)
        p2, a2 = _solve_minpack(sc, fac, delta, par0_t, 7, 3, 10, None, p_gn.clone())
    if ratio >= 1.05:
        assert float(a1[0]) == 0.0 and torch.equal(p1, p_gn)  # the Gauss-Newton step fits
    else:
        assert float(a1[0]) > 0
        norm = float(torch.linalg.vector_norm(p1))
        assert abs(norm - float(delta[0])) <= 0.1 * float(delta[0]) * (1 + 1e-12)
    np.testing.assert_allclose(a1.numpy(), a2.numpy(), rtol=1e-10, atol=0)
    np.testing.assert_allclose(p1.numpy(), p2.numpy(), rtol=1e-10,
                               atol=1e-12 * float(delta[0]))


def test_lmpar_of_one_problem_with_minpack_basic_step():
    """A rank-deficient problem: MINPACK's lower bound from R (``basic``) as in the
    general body."""
    J, diag, f, _, _ = _lmpar_inputs(1, deficient=True)
    basic, qr_fac = basic_gauss_newton(J, diag, f)
    assert bool(basic.rows[0])
    delta = torch.linalg.vector_norm(basic.p, dim=-1) * 0.3
    par0 = torch.zeros(1, dtype=torch.float64)
    sc = host_scalars.scalars(delta, host=True)
    with sc.quiet():
        p1, a1 = _solve_minpack_one(sc, qr_fac, delta, par0, 7, 3, 10, basic, basic.p)
        a1 = torch.tensor([a1])  # (a numpy.float64: the host value the rule keeps)
        p2, a2 = _solve_minpack(sc, qr_fac, delta, par0, 7, 3, 10, basic, basic.p.clone())
    assert float(a1[0]) > 0
    np.testing.assert_allclose(a1.numpy(), a2.numpy(), rtol=1e-10, atol=0)
    np.testing.assert_allclose(p1.numpy(), p2.numpy(), rtol=1e-10,
                               atol=1e-12 * float(delta[0]))


def test_lmpar_of_one_problem_propagates_nan():
    """NaN factors give a NaN damping, as the general body's NaN-propagating bounds do."""
    _, _, _, fac, p_gn = _lmpar_inputs()
    nan_fac = Factors(fac.s, fac.V, torch.full_like(fac.uf, float("nan")))
    delta = torch.tensor([1e-3], dtype=torch.float64)
    p, par = solve_trust_region_minpack(nan_fac, delta, torch.zeros(1, dtype=torch.float64),
                                        7, 3, p_gn=torch.full_like(p_gn, float("nan")),
                                        host=True)
    assert np.isnan(par.numpy()).all() and np.isnan(p.numpy()).all()


def test_scalars_full_takes_the_dtype_without_a_tensor(monkeypatch):
    """``Scalars.full`` knows numpy's dtype from its table (issue 14: no tensor per call)."""
    hs = host_scalars.Scalars(torch.zeros(3, 2, dtype=torch.float32))

    def no_tensor(*args, **kwargs):
        raise AssertionError("torch.empty called")

    monkeypatch.setattr(torch, "empty", no_tensor)
    v = hs.full(2.5)
    assert v.dtype == np.float32 and v.tolist() == [2.5, 2.5, 2.5]


@pytest.mark.parametrize("x_scale", [1.0, "jac"])
def test_one_problem_keeps_scipys_results(x_scale):
    """Rosenbrock from two starts, analytic and '2-point': scipy's counts, status and
    solution."""
    def rosen(x):
        return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])

    def rosen_jac(x):
        return np.array([[-20 * x[0], 10.0], [-1.0, 0.0]])

    for fun, jac, x0 in ((rosen, rosen_jac, [-1.2, 1.0]), (rosen, "2-point", [2.0, -1.0])):
        ours = ts.least_squares(fun, x0, jac=jac, method="lm", x_scale=x_scale)
        ref = scipy_least_squares(fun, x0, jac=jac, method="lm", x_scale=x_scale)
        assert_status_equivalent(ours.status, ref.status)
        assert_counts_close(ours.status, ref.status, (ours.nfev, ours.njev),
                            (ref.nfev, ref.njev))
        assert_x_close(ours.x, ref.x, xtol=1e-8)
        assert_cost_close(ours.cost, ref.cost)



def _rosen(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def _rosen_jac(x):
    return np.array([[-20 * x[0], 10.0], [-1.0, 0.0]])


def test_one_lm_problem_enters_numpy_errstate_once_per_stage(monkeypatch):
    """Regression (issue 14): one problem entered numpy's ``errstate`` 106 times per
    Rosenbrock solve (about 2 µs each): the subproblem and the step, the factors and the
    Gauss-Newton step each entered their own. Now once per stage of the rule
    (optimality, model, proposal, assessment), never around the user's functions."""
    entered = []
    real = np.errstate

    class Counting(real):
        def __enter__(self):
            entered.append(1)
            return super().__enter__()

    monkeypatch.setattr(np, "errstate", Counting)
    # (Scalars.quiet's own context, host_scalars._Quiet, counted as well)
    monkeypatch.setattr(host_scalars, "quiet", lambda: Counting(all="ignore"))
    res = ts.least_squares(_rosen, np.array([-1.2, 1.0]), jac=_rosen_jac, method="lm")
    monkeypatch.setattr(np, "errstate", real)
    ref = scipy_least_squares(_rosen, np.array([-1.2, 1.0]), jac=_rosen_jac, method="lm")
    assert res.nfev == ref.nfev and res.status == ref.status
    # (two per trial: proposal and assessment; two per outer iteration: optimality, model)
    assert res.njev <= len(entered) <= 2 * res.nfev + 2 * res.njev


@pytest.mark.parametrize("m,n", [(2, 2), (4, 2), (7, 3), (50, 3), (140, 3)])
def test_host_svd_sums_u_t_f_on_the_host_for_small_matrices(m, n):
    # below BMM_NAIVE_TERMS multiply-adds U^T f is summed on the host (the order of torch's
    # own bmm kernel) and the factors carry their host rows; above it torch's bmm forms it
    from torchimize_scipy._engine import host_lapack
    from torchimize_scipy._engine.host_scalars import host_rows
    from torchimize_scipy._engine.problem import BMM_NAIVE_TERMS

    J, diag, f = _problem(seed=3, m=m, n=n)
    hs = _hs()
    with hs.quiet():
        fac = _host_svd(hs, J, diag, f)
    A = J * torch.reciprocal(diag).unsqueeze(-2)
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    uf = torch.bmm(U.transpose(-1, -2), f.unsqueeze(-1)).squeeze(-1)
    # the same SVD; U^T f by another summation: equal to rounding of |U^T| |f|
    bound = 4 * m * np.finfo(np.float64).eps * float((U.abs().transpose(-1, -2)
                                                      @ f.abs().unsqueeze(-1)).max())
    np.testing.assert_allclose(fac.uf.numpy(), uf.numpy(), rtol=0, atol=bound)
    # the same LAPACK routine (host_lapack, or torch's SVD itself): equal to rounding
    scale = 64 * max(m, n) * np.finfo(np.float64).eps * float(s.max())
    np.testing.assert_allclose(fac.s.numpy(), s.numpy(), rtol=0, atol=scale)
    np.testing.assert_allclose(fac.V.numpy(), Vh.transpose(-1, -2).numpy(), rtol=0,
                               atol=64 * max(m, n) * np.finfo(np.float64).eps)
    small = m * min(m, n) < BMM_NAIVE_TERMS
    # (s and V come as host arrays from LAPACK called directly, host_lapack, up to its size)
    direct = host_lapack.AVAILABLE and m * n <= host_lapack.MAX_ENTRIES
    for t, kept in ((fac.s, small or direct), (fac.V, small or direct), (fac.uf, small)):
        known = host_rows(t)
        assert (known is not None) == kept
        if kept:  # the remembered host rows are the tensor's values, in C order
            np.testing.assert_array_equal(known, t.numpy())
            assert known.flags.c_contiguous


def test_one_problem_takes_its_cost_once_at_write_out(monkeypatch):
    """'lm' reads no cost while it iterates: one problem's loop takes the cost of the
    residuals it stops at when it writes the result, not at every trial nor at x0
    (``loop.admit(late_cost=True)``)."""
    from torchimize_scipy._engine.problem import Problem

    calls = []
    real = Problem.cost

    def counting(self, f):
        calls.append(f.shape)
        return real(self, f)

    monkeypatch.setattr(Problem, "cost", counting)
    t = np.linspace(0, 4, 50)
    y = 2.5 * np.exp(-1.3 * t) + 0.5 + 0.01 * np.sin(7 * t)

    def fun(p):
        return p[0] * np.exp(-p[1] * t) + p[2] - y

    res = ts.least_squares(fun, np.ones(3), method="lm")
    assert res.nfev > 5 and len(calls) == 1  # (the result only)
    # (torch's sum against numpy's: m positive terms, each sum within (m - 1) eps)
    np.testing.assert_allclose(res.cost, 0.5 * np.sum(res.fun ** 2),
                               rtol=2 * t.size * np.finfo(np.float64).eps)
    calls.clear()
    res_trf = ts.least_squares(fun, np.ones(3), method="trf")  # (trf reads its costs)
    assert len(calls) >= res_trf.nfev
    # a run that stops at x0 (its gradient is zero there) takes the cost of x0, once
    calls.clear()
    still = ts.least_squares(lambda p: np.array([p[0] - 1.0, 2.0]), np.ones(1), method="lm")
    assert len(calls) == 1 and still.cost == 2.0 and still.nfev == 1


def test_quiet_is_numpys_errstate_ignoring_every_error():
    """host_scalars.quiet: numpy ignores every floating-point error inside, nested states
    are restored on exit, and the caller's settings hold again after it."""
    before = np.geterr()
    with host_scalars.quiet():
        assert set(np.geterr().values()) == {"ignore"}
        assert np.float64(1.0) / 0.0 == np.inf  # (no warning, no error)
    assert np.geterr() == before
    with np.errstate(all="raise"):
        with host_scalars.quiet():
            assert np.isnan(np.float64(0.0) / 0.0)
            with host_scalars.quiet():
                assert set(np.geterr().values()) == {"ignore"}
        with pytest.raises(FloatingPointError):
            np.float64(1.0) / 0.0
    assert np.geterr() == before
