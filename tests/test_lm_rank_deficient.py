"""'lm' on rank-deficient Jacobians: MINPACK's pivoted-QR basic step (issue 18).

scipy's 'lm' is MINPACK's ``lmder``: it factorises ``J P = Q R`` with column
pivoting and, where ``R`` has a zero on its diagonal, takes the *basic*
Gauss-Newton solution (the pivot columns move, the others stay), where a
minimum-norm (SVD) step spreads the move over every parameter. These tests
compare with scipy on problems whose Jacobian is exactly rank deficient:

* the two reproducers of the issue (x, nfev, status);
* a 2-D model on a grid from 1 to 1e10 where one residual of 121 depends on
  the parameters (rank 1, like astropy's Sersic fits);
* interchangeable exponential terms from the symmetric start ``p0 = 1``
  (issue 19: the minimum-norm step never leaves the symmetric subspace);
* a batch mixing full-rank and rank-deficient problems against a loop of
  single calls, and a batch of one against a single call when the residual
  reaches exactly zero (issue 11).

Exact ``nfev``/``status`` are asserted only where both runs take the same
decisions in exact arithmetic (a basic step that lands on an exact zero); on
the other problems the stop is compared within its class (the solution has a
zero residual, so ftol/xtol/gtol stops are equivalent) and x within a
tolerance far below the size of the difference the issue reports.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize as so
import torch

from torchimize_scipy import batch_least_squares, curve_fit, least_squares
from torchimize_scipy._curve_fit import batch_curve_fit
from torchimize_scipy._engine.minpack_qr import basic_gauss_newton, pivoted_qr

#: Stops that mean "converged" on a zero-residual problem (gtol, ftol, xtol, both).
CONVERGED = {1, 2, 3, 4}


def fun_plane(x):
    """One informative residual: rank 1, pivot on x[1] (the larger column)."""
    return np.array([x[0] + 10.0 * x[1] - 3.0, 0.0])


def fun_exp(x):
    return np.array([np.exp(x[0]) * x[1] - 2.0, 0.0, 0.0])


def assert_same_stop(ours, ref, nfev_slack=1):
    """Same status, or both converged on an exact solution within ``nfev_slack``."""
    if ours.status == ref.status and ours.nfev == ref.nfev:
        return
    assert ours.status in CONVERGED and ref.status in CONVERGED, (ours.status, ref.status)
    assert ref.cost <= 1e-20 and ours.cost <= 1e-20, (ours.cost, ref.cost)
    assert abs(int(ours.nfev) - int(ref.nfev)) <= nfev_slack, (ours.nfev, ref.nfev)


# ============================================================================ reproducers
def test_plane_takes_basic_step():
    """x = [0, 0.3] after one step: only the pivot column moves (exact arithmetic)."""
    ref = so.least_squares(fun_plane, np.zeros(2), method="lm")
    ours = least_squares(fun_plane, np.zeros(2), method="lm")
    np.testing.assert_allclose(ref.x, [0.0, 0.3], atol=1e-12)
    np.testing.assert_allclose(ours.x, ref.x, atol=1e-12)
    assert (ours.nfev, ours.status) == (ref.nfev, ref.status) == (2, 1)
    assert ours.cost == 0.0


def test_exp_keeps_the_non_pivot_parameter():
    """scipy: x = [ln 2, 1] (x[1] never moves); the minimum-norm step gave [0.397, 1.345]."""
    x0 = np.array([0.0, 1.0])
    ref = so.least_squares(fun_exp, x0, method="lm")
    ours = least_squares(fun_exp, x0, method="lm")
    np.testing.assert_allclose(ref.x, [np.log(2.0), 1.0], rtol=1e-7)
    np.testing.assert_allclose(ours.x, ref.x, rtol=1e-7)
    assert ours.x[1] == 1.0
    assert (ours.nfev, ours.status) == (ref.nfev, ref.status)


def test_basic_step_with_analytic_jac_and_x_scale():
    """The basic step does not depend on the scaling; the radius does, the same in both."""
    jac = lambda x: np.array([[1.0, 10.0], [0.0, 0.0]])  # noqa: E731
    for x_scale in (1.0, np.array([2.0, 0.5])):
        ref = so.least_squares(fun_plane, np.ones(2), jac=jac, method="lm", x_scale=x_scale)
        ours = least_squares(fun_plane, np.ones(2), jac=jac, method="lm", x_scale=x_scale)
        np.testing.assert_allclose(ours.x, ref.x, atol=1e-12)
        assert ours.x[0] == 1.0  # x[0] is not a pivot: it stays at x0
        assert (ours.nfev, ours.status) == (ref.nfev, ref.status)


# ============================================================================ 2-D, rank 1
GRID = np.logspace(0, 10, 11)
GX, GY = (a.ravel() for a in np.meshgrid(GRID, GRID))


def gauss2d(p, x=GX, y=GY):
    """Elliptical Gaussian; on GRID only the point (1, 1) is not underflowed to 0."""
    amp, x0, y0, sx, sy, th = p
    c, s = np.cos(th), np.sin(th)
    u = (x - x0) * c + (y - y0) * s
    v = -(x - x0) * s + (y - y0) * c
    with np.errstate(under="ignore"):
        return amp * np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))


def gauss2d_jac(p, x=GX, y=GY):
    amp, x0, y0, sx, sy, th = p
    c, s = np.cos(th), np.sin(th)
    u = (x - x0) * c + (y - y0) * s
    v = -(x - x0) * s + (y - y0) * c
    with np.errstate(under="ignore"):
        e = np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))
    m = amp * e
    du, dv = -u / sx**2, -v / sy**2  # derivatives of the exponent in u and v
    return np.stack([e, m * (-du * c + dv * s), m * (-du * s - dv * c),
                     m * u**2 / sx**3, m * v**2 / sy**3, m * (du * v - dv * u)], -1)


P_TRUE = np.array([3.0, 1.0005, 0.9995, 0.003, 0.002, 0.4])
P0_2D = np.array([1.0, 1.001, 0.999, 0.0025, 0.0025, 0.3])
Y_2D = gauss2d(P_TRUE)


def fun_2d(p):
    return gauss2d(p) - Y_2D


def test_2d_model_jacobian_has_rank_one():
    J = gauss2d_jac(P0_2D)
    assert np.count_nonzero(np.any(J != 0, axis=1)) == 1
    assert np.linalg.matrix_rank(J) == 1


@pytest.mark.parametrize("jac", ["analytic", "2-point"])
def test_2d_rank_one_model_matches_scipy(jac):
    j = (lambda p: gauss2d_jac(p)) if jac == "analytic" else "2-point"
    ref = so.least_squares(fun_2d, P0_2D, jac=j, method="lm")
    ours = least_squares(fun_2d, P0_2D, jac=j, method="lm")
    # the fit is not unique (one equation, six unknowns): x is where the path ends.
    # The minimum-norm step ended elsewhere by 4e-2 on theta and 5e-3 on sx.
    np.testing.assert_allclose(ours.x, ref.x, rtol=1e-6, atol=1e-9)
    assert ours.cost <= 1e-20 and ref.cost <= 1e-20
    assert_same_stop(ours, ref)


# ============================================================================ A_RANK
# (the parity-matrix case lives in test_parity.py; here the two x0 of the issue)
A_RANK = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 0.0, 1.0], [0.0, 2.0, 2.0]])


@pytest.mark.parametrize("x0", [np.zeros(3), np.array([1.0, -1.0, 0.5])])
def test_rank_two_linear_problem(x0):
    """R has a pivot of 3e-16 (not exactly zero): MINPACK solves through it, and so do we."""
    b = np.array([1.0, 1.5, -2.0, 0.7])
    fun = lambda x: A_RANK @ x - b  # noqa: E731
    jac = lambda x: A_RANK.copy()  # noqa: E731
    ref = so.least_squares(fun, x0, jac=jac, method="lm")
    ours = least_squares(fun, x0, jac=jac, method="lm")
    np.testing.assert_allclose(ours.cost, ref.cost, rtol=1e-8)
    # x moves along the null space by ~10 (a minimum-norm step stays within 1 of x0)
    np.testing.assert_allclose(ours.x, ref.x, rtol=1e-6)
    assert (ours.status, ours.nfev) == (ref.status, ref.nfev)


# ============================================================================ symmetric starts
def biexp(x, a1, k1, a2, k2):
    return a1 * np.exp(-k1 * x) + a2 * np.exp(-k2 * x)


def biexp_jac(x, a1, k1, a2, k2):
    e1, e2 = np.exp(-k1 * x), np.exp(-k2 * x)
    return np.stack([e1, -a1 * x * e1, e2, -a2 * x * e2], -1)


def _ssr(p, x, y):
    return float(((biexp(x, *p) - y) ** 2).sum())


def _terms_by_rate(p):
    """``(a1, k1, a2, k2)`` with the slower decay first: the two terms are
    interchangeable, and from a symmetric start which one ends up first is decided by
    rounding (it differs between CPUs, for scipy and for us alike)."""
    p = np.asarray(p, dtype=float)
    return p if p[1] <= p[3] else p[[2, 3, 0, 1]]


def test_biexp_symmetric_start_converges():
    """Issue 19's reproducer: from p0 = 1 scipy reaches SSR 1.5e-31; the minimum-norm
    step stayed at a1 == a2, k1 == k2 with SSR 0.33."""
    x = np.linspace(0, 6, 40)
    y = biexp(x, 0.5, 0.25, 1.0, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # exp overflow at a trial point
        ref = so.curve_fit(biexp, x, y, jac=biexp_jac)[0]
        ours = curve_fit(biexp, x, y, jac=biexp_jac)[0]
    assert _ssr(ref, x, y) < 1e-20
    assert _ssr(ours, x, y) < 1e-20
    np.testing.assert_allclose(_terms_by_rate(ours), _terms_by_rate(ref), rtol=1e-6)


def test_biexp_symmetric_start_batch():
    """batch_curve_fit, rows taking the pivoted route beside rows that do not."""
    x = np.linspace(0, 6, 40)
    truths = np.array([[0.5, 0.25, 1.0, 2.0], [1.5, 0.4, 0.7, 1.6], [1.0, 1.0, 0.0, 1.0]])
    Y = np.stack([biexp(x, *t) for t in truths])
    P0 = np.ones((3, 4))
    P0[2] = [0.9, 1.1, 0.1, 0.5]  # not symmetric: full rank, not routed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        popt = np.asarray(batch_curve_fit(biexp, x, Y, P0, jac=biexp_jac)[0])
        for i in range(3):
            ref = so.curve_fit(biexp, x, Y[i], P0[i], jac=biexp_jac)[0]
            assert _ssr(popt[i], x, Y[i]) <= max(2 * _ssr(ref, x, Y[i]), 1e-20), i


def test_symmetric_start_sweep_no_worse_than_scipy():
    """Random two-exponential fits from p0 = 1: ours ends worse than scipy on none
    (before: 59 of 60 worse)."""
    rng = np.random.default_rng(3)
    x = np.linspace(0, 6, 40)
    worse = better = 0
    for _ in range(12):
        truth = np.concatenate([rng.uniform(0.2, 2, 1), rng.uniform(0.1, 3, 1),
                                rng.uniform(0.2, 2, 1), rng.uniform(0.1, 3, 1)])
        y = biexp(x, *truth)
        tol = 1e-10 * (1 + (y**2).sum())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s_ref = _ssr(so.curve_fit(biexp, x, y, jac=biexp_jac, maxfev=2000)[0], x, y)
            s_ours = _ssr(curve_fit(biexp, x, y, jac=biexp_jac, maxfev=2000)[0], x, y)
        worse += s_ours > s_ref + tol
        better += s_ref > s_ours + tol
    assert worse <= better, (worse, better)


# ============================================================================ batches
def fun_mixed(x, c, a, s):
    """Rows with s = 0 have one informative residual (rank 1); s = 1 rows full rank."""
    return np.stack([x[:, 0] + c[:, 0] * x[:, 1] - a[:, 0],
                     s[:, 0] * (x[:, 0] - 2.0 * x[:, 1] - 0.5),
                     s[:, 0] * (x[:, 0] * x[:, 1] - 1.0)], -1)


def jac_mixed(x, c, a, s):
    z = np.zeros_like(x[:, 0])
    one = np.ones_like(z)
    return np.stack([np.stack([one, c[:, 0]], -1),
                     s * np.stack([one, -2.0 * one], -1),
                     s * np.stack([x[:, 1], x[:, 0]], -1)], -2)


def test_batch_mixing_ranks_matches_loop():
    rng = np.random.default_rng(5)
    B = 8
    c = rng.uniform(2.0, 5.0, (B, 1))
    a = rng.uniform(1.0, 3.0, (B, 1))
    s = np.array([0.0, 1.0] * (B // 2))[:, None]
    x0 = rng.uniform(0.5, 1.5, (B, 2))
    res = batch_least_squares(fun_mixed, x0, jac=jac_mixed, method="lm", args=(c, a, s))
    for i in range(B):
        args = (c[i:i + 1], a[i:i + 1], s[i:i + 1])

        def fun(x, args=args):
            return fun_mixed(x[None], *args)[0]

        def jac(x, args=args):
            return jac_mixed(x[None], *args)[0]

        one = least_squares(fun, x0[i], jac=jac, method="lm")
        ref = so.least_squares(fun, x0[i], jac=jac, method="lm")
        np.testing.assert_allclose(res.x[i], one.x, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(one.x, ref.x, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(res.cost[i], one.cost, rtol=1e-8, atol=1e-20)
        if s[i, 0] == 0:  # basic step: x[0] (the smaller column) never moves
            assert res.x[i, 0] == x0[i, 0] and one.x[0] == x0[i, 0]
        assert int(res.status[i]) in CONVERGED and one.status in CONVERGED


def test_batch_of_one_rosenbrock_lands_like_single():
    """Issue 11: the batch (Gram route) stopped at 2e-15 and took one more step (xtol,
    nfev 22) where the single problem lands on the exact zero (gtol, nfev 21)."""
    def rosen(x):
        return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])

    def rosen_b(x):
        return torch.stack([10 * (x[:, 1] - x[:, 0] ** 2), 1 - x[:, 0]], -1)

    one = least_squares(rosen, [-1.2, 1.0], method="lm")
    batch = batch_least_squares(rosen_b, torch.tensor([[-1.2, 1.0]], dtype=torch.float64),
                                method="lm")
    assert float(batch.cost[0]) == one.cost == 0.0
    assert (int(batch.nfev[0]), int(batch.status[0])) == (one.nfev, one.status) == (21, 1)


# ============================================================================ linear algebra
def test_pivoted_qr_factorises_and_orders_like_lapack():
    rng = np.random.default_rng(0)
    J = rng.standard_normal((3, 7, 4))
    J[1, :, 3] = J[1, :, 0] + J[1, :, 1]  # rank 3
    J[2, :, 2] = 0.0  # a zero column
    f = rng.standard_normal((3, 7))
    R, perm, qtf = pivoted_qr(torch.as_tensor(J), torch.as_tensor(f))
    R, perm, qtf = R.numpy(), perm.numpy(), qtf.numpy()
    for i in range(3):
        Jp = J[i][:, perm[i]]
        np.testing.assert_allclose(R[i].T @ R[i], Jp.T @ Jp, atol=1e-13)
        assert np.all(np.abs(np.diag(R[i]))[:-1] >= np.abs(np.diag(R[i]))[1:])
        np.testing.assert_array_equal(perm[i], scipy.linalg.qr(J[i], pivoting=True)[2])
        # R^T (Q^T f) = P^T J^T f: the gradient is kept
        np.testing.assert_allclose(R[i].T @ qtf[i], Jp.T @ f[i], atol=1e-13)
    assert R[2, 3, 3] == 0.0  # the zero column is pivoted last, with an exact zero


def test_pivoted_qr_on_the_host_recomputes_only_stale_norms(monkeypatch):
    # nearly dependent columns: downdating a remaining norm loses its digits, and
    # MINPACK computes it again in full; on the host only the columns where some
    # problem needs it are summed again, and the factorisation is the same
    from torchimize_scipy._engine import minpack_qr

    rng = np.random.default_rng(5)
    J = rng.standard_normal((6, 30, 6))
    J[:, :, 4] = J[:, :, 0] * (1 + 1e-10) + 1e-9 * J[:, :, 4]  # cancels after column 0
    J[::2, :, 5] = 2.0 * J[::2, :, 1]  # exactly dependent in half the problems
    f = rng.standard_normal((6, 30))
    summed = []
    seq_norm = minpack_qr._seq_norm
    monkeypatch.setattr(minpack_qr, "_seq_norm",
                        lambda a, dim: summed.append(a.shape) or seq_norm(a, dim))
    R, perm, qtf = pivoted_qr(J.copy(), f.copy())
    recomputed = [shape for shape in summed if len(shape) == 3][1:]  # (after the first)
    # (at column j: rows j + 1 .., of the 5 - j columns left, only some)
    assert recomputed and all(shape[2] < 6 - 30 + shape[1] for shape in recomputed)
    R_t, perm_t, qtf_t = pivoted_qr(torch.as_tensor(J), torch.as_tensor(f))
    np.testing.assert_array_equal(perm, perm_t.numpy())
    np.testing.assert_allclose(R, R_t.numpy(), rtol=0, atol=1e-12)
    for i in range(6):
        Jp = J[i][:, perm[i]]
        np.testing.assert_allclose(R[i].T @ R[i], Jp.T @ Jp, atol=1e-12)
        np.testing.assert_allclose(R[i].T @ qtf[i], Jp.T @ f[i], atol=1e-12)
    assert np.all(np.abs(R[::2, 5, 5]) <= 1e-12 * np.abs(R[::2, 0, 0]))


def test_basic_gauss_newton_is_the_basic_solution():
    J = torch.tensor([[[1.0, 10.0, 0.0], [0.0, 0.0, 0.0], [2.0, 20.0, 0.0]]],
                     dtype=torch.float64)
    f = torch.tensor([[-3.0, 0.0, -6.0]], dtype=torch.float64)
    diag = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
    basic, _ = basic_gauss_newton(J, diag, f)
    assert bool(basic.rows[0]) and not bool(basic.full[0])
    step = (basic.p / diag)[0].numpy()  # scaled step back to x
    np.testing.assert_allclose(step, [0.0, 0.3, 0.0], atol=1e-15)


def test_curve_fit_pcov_of_rank_deficient_fit_is_scipys():
    """A parameter the model ignores: R has an exact zero, scipy's pcov is all inf."""
    x = np.linspace(0, 1, 10)
    y = 2 * np.exp(-1.3 * x) + 0.01 * np.cos(5 * x)

    def f(x, a, b, c):
        return a * np.exp(-b * x) + 0 * c

    def jac(x, a, b, c):
        e = np.exp(-b * x)
        return np.stack([e, -a * x * e, np.zeros_like(x)], -1)

    for j in (None, jac):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", so.OptimizeWarning)
            p_ref, c_ref, info_ref = so.curve_fit(f, x, y, p0=[1, 1, 1], jac=j,
                                                  full_output=True)[:3]
            p, c, info = curve_fit(f, x, y, p0=[1, 1, 1], jac=j, full_output=True)[:3]
        np.testing.assert_allclose(p, p_ref, rtol=1e-7)
        assert p[2] == 1.0  # the ignored parameter never moves
        assert np.all(np.isinf(c_ref)) and np.all(np.isinf(c))
        assert abs(int(info["nfev"]) - int(info_ref["nfev"])) <= 1


def test_refinement_gives_gram_rows_the_accuracy_of_a_qr_solve():
    """Zero-residual rows with cond(A) = 1e4 (on the Gram route): the normal equations
    leave an error ~eps cond^2; one refinement with A brings it to ~eps cond."""
    from torchimize_scipy._engine.linalg import factorize, gauss_newton_step, refine_gauss_newton

    rng = np.random.default_rng(2)
    B, m, n = 6, 20, 4
    A = np.empty((B, m, n))
    for i in range(B):
        U, _ = np.linalg.qr(rng.standard_normal((m, n)))
        V, _ = np.linalg.qr(rng.standard_normal((n, n)))
        A[i] = U @ np.diag(np.geomspace(1.0, 1e-4, n)) @ V.T
    x_true = rng.standard_normal((B, n))
    f = -np.einsum("bmn,bn->bm", A, x_true)
    f[0] += rng.standard_normal(m)  # a residual: that row is left as it is
    At, ft = torch.as_tensor(A), torch.as_tensor(f)
    fac = factorize(At, None, ft, use_gram=True)
    assert bool(fac.gram.all())
    p = gauss_newton_step(fac)
    fixed = refine_gauss_newton(fac, p, At, None, ft).numpy()
    err_before = np.abs(p.numpy() - x_true).max(-1)
    err_after = np.abs(fixed - x_true).max(-1)
    assert np.all(err_after[1:] < 1e-11) and err_before[1:].max() > 1e-11
    assert np.array_equal(fixed[0], p.numpy()[0])
