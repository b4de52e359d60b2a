"""The short cuts of 'trf''s trust-region subproblem on the host (issue 14).

``_engine/trust_region.py`` drops the guards of its quotients
``s uf / (s**2 + alpha)`` when every ``alpha > 0`` is known on the host, and,
on the SVD route alone, keeps each step as ``V coef`` (its negative) until it
is returned, folding the sign into the final scale. These tests check the
guards where they matter (a zero singular value with ``alpha = 0``), the
sign of every kind of returned step against an independent numpy solution,
and that the unguarded quotients are the guarded ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _parity import ONE_EVAL_RTOL, assert_bitwise_equal

from torchimize_scipy._engine.host_scalars import Scalars
from torchimize_scipy._engine.linalg import Factors, factorize
from torchimize_scipy._engine.trust_region import (
    _damped_coef,
    _radius_terms,
    _spectral,
    solve_trust_region_scipy,
)

RTOL = 0.01  # solve_trust_region_scipy's default: |p| = delta (1 +- RTOL)


def _zero_singular_value_factors(B: int) -> Factors:
    """SVD factors whose last singular value is exactly zero (V = I)."""
    s = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64).repeat(B, 1)
    uf = torch.tensor([[0.5, -1.5, 0.7]], dtype=torch.float64).repeat(B, 1)
    V = torch.eye(3, dtype=torch.float64).repeat(B, 1, 1)
    return Factors(s, V, uf)


@pytest.mark.parametrize("B", [1, 2])
def test_damped_coef_keeps_its_guard_where_an_alpha_is_zero(B):
    fac = _zero_singular_value_factors(B)
    sc = Scalars(fac.s, host=True)
    sp = _spectral(sc, fac)
    alpha = sc.get_col(torch.tensor([0.0, 0.5][:B], dtype=torch.float64))
    with sc.quiet():
        coef = np.asarray(_damped_coef(sc, sp, alpha))
    # 0 / 0 would be NaN without the guard: the zero singular value's term is 0
    assert np.isfinite(coef).all()
    assert (coef[:, 2] == 0).all()
    np.testing.assert_allclose(coef[0, :2], [2.0 * 0.5 / 4.0, 1.0 * -1.5 / 1.0], rtol=1e-15)


@pytest.mark.parametrize("B", [1, 3])
def test_unguarded_radius_terms_are_the_guarded_ones(B):
    # with every alpha > 0 no denominator is zero: the same quotients, the same bits
    fac = _zero_singular_value_factors(B)
    sc = Scalars(fac.s, host=True)
    sp = _spectral(sc, fac)
    alpha = sc.get_col(torch.tensor([0.3, 1e-3, 7.0][:B], dtype=torch.float64))
    delta = sc.get_col(torch.full((B,), 0.4, dtype=torch.float64))
    with sc.quiet():
        guarded = _radius_terms(sc, fac, sp, alpha, delta)
        unguarded = _radius_terms(sc, fac, sp, alpha, delta, positive=True)
    for g, u in zip(guarded, unguarded, strict=True):
        assert np.isfinite(np.asarray(u)).all()
        assert_bitwise_equal(np.asarray(u), np.asarray(g))


def _reference_step(A: np.ndarray, f: np.ndarray, alpha: float, delta: float) -> np.ndarray:
    """``-(A^T A + alpha I)^{-1} A^T f``, put on the boundary when ``alpha > 0``."""
    n = A.shape[1]
    if alpha == 0:
        return -np.linalg.lstsq(A, f, rcond=None)[0]
    p = -np.linalg.solve(A.T @ A + alpha * np.eye(n), A.T @ f)
    return p * (delta / np.linalg.norm(p))


@pytest.mark.parametrize("host", [True, False])
@pytest.mark.parametrize("deltas", [[100.0], [0.05], [100.0, 0.05, 100.0], [0.05, 0.02]],
                         ids=["one inside", "one damped", "mixed", "all damped"])
def test_subproblem_steps_have_the_right_sign(host, deltas):
    # the SVD route alone: every kind of returned step (Gauss-Newton, damped, mixed rows)
    rng = np.random.default_rng(11)
    B = len(deltas)
    A = rng.standard_normal((B, 8, 3))
    f = rng.standard_normal((B, 8))
    fac = factorize(torch.as_tensor(A), None, torch.as_tensor(f), use_gram=False)
    assert fac.gram is None  # the SVD route alone
    delta = torch.tensor(deltas, dtype=torch.float64)
    p, alpha = solve_trust_region_scipy(fac, delta, torch.zeros_like(delta), 8, 3, host=host)
    p, alpha = p.numpy(), alpha.numpy()
    for k in range(B):
        assert (alpha[k] == 0) == (deltas[k] == 100.0)
        ref = _reference_step(A[k], f[k], float(alpha[k]), deltas[k])
        # the returned alpha reproduces the step (up to rounding of the solves)
        np.testing.assert_allclose(p[k], ref, rtol=0, atol=1e-10 * np.linalg.norm(ref))
        # a descent direction: p . (A^T f) < 0
        assert p[k] @ (A[k].T @ f[k]) < 0
        if alpha[k] > 0:
            np.testing.assert_allclose(np.linalg.norm(p[k]), deltas[k], rtol=1e-12)
            # and alpha solves |p(alpha)| = delta to RTOL
            unscaled = -np.linalg.solve(A[k].T @ A[k] + alpha[k] * np.eye(3), A[k].T @ f[k])
            assert abs(np.linalg.norm(unscaled) - deltas[k]) <= RTOL * deltas[k]


def test_subproblem_leaves_the_factors_alone():
    # the in-place negations and squeezes touch only the subproblem's own products
    rng = np.random.default_rng(5)
    fac = factorize(torch.as_tensor(rng.standard_normal((2, 6, 2))), None,
                    torch.as_tensor(rng.standard_normal((2, 6))), use_gram=False)
    before = [t.clone() for t in (fac.s, fac.V, fac.uf)]
    delta = torch.tensor([100.0, 0.01], dtype=torch.float64)
    alpha0 = torch.zeros_like(delta)
    solve_trust_region_scipy(fac, delta, alpha0, 6, 2, host=True)
    for t, b in zip((fac.s, fac.V, fac.uf), before, strict=True):
        assert_bitwise_equal(t.numpy(), b.numpy())
    assert_bitwise_equal(delta.numpy(), np.array([100.0, 0.01]))
    assert_bitwise_equal(alpha0.numpy(), np.zeros(2))


@pytest.mark.parametrize("k", [2, 3, 7])
def test_one_problem_radius_terms_on_floats_match_the_arrays(k):
    # one float64 problem (Scalars.floats) with fewer than 8 singular values takes the
    # radius terms on Python floats (_radius_one); arrays of one row take numpy's
    rng = np.random.default_rng(k)
    s = torch.as_tensor(np.sort(rng.uniform(0.1, 3.0, (1, k)))[:, ::-1].copy())
    s[0, -1] = 0.0  # a zero singular value: its guarded terms are 0
    uf = torch.as_tensor(rng.standard_normal((1, k)))
    fac = Factors(s, torch.eye(k, dtype=torch.float64)[None], uf)
    floats, arrays = Scalars(s, host=True), Scalars(s, host=True, floats=False)
    assert floats.floats and not arrays.floats
    sp_f, sp_a = _spectral(floats, fac), _spectral(arrays, fac)
    assert sp_f.floats == [] and sp_a.floats is None  # (filled on the first use)
    for alpha in (None, 0.0, 0.37, 5.0):
        with floats.quiet():
            a_f = None if alpha is None else np.float64(alpha)
            got = _radius_terms(floats, fac, sp_f, a_f, np.float64(0.4))
            a_a = None if alpha is None else np.full((1, 1), alpha)
            ref = _radius_terms(arrays, fac, sp_a, a_a, np.full((1, 1), 0.4))
        for g, r in zip(got, ref, strict=True):
            assert type(g) is np.float64
            # (Python floats against numpy arrays: the same operations in the same order
            # here, but another platform may round one path otherwise)
            np.testing.assert_allclose(g, np.asarray(r).item(), rtol=ONE_EVAL_RTOL, atol=0)
    assert len(sp_f.floats) == 3


def test_long_rows_keep_the_arrays():
    s = torch.linspace(3.0, 1.0, 8, dtype=torch.float64)[None]
    fac = Factors(s, torch.eye(8, dtype=torch.float64)[None], torch.ones_like(s))
    sc = Scalars(s, host=True)
    assert sc.floats and _spectral(sc, fac).floats is None


@pytest.mark.parametrize("delta", [100.0, 0.05], ids=["inside", "damped"])
def test_host_radius_gives_host_alpha(delta):
    # 'trf' keeps one problem's radius as a host value (Scalars.keep): the subproblem
    # then returns its alpha as one, and a tensor radius still gets a tensor
    rng = np.random.default_rng(3)
    A, f = rng.standard_normal((1, 8, 3)), rng.standard_normal((1, 8))
    fac = factorize(torch.as_tensor(A), None, torch.as_tensor(f), use_gram=False)
    p, alpha = solve_trust_region_scipy(fac, np.float64(delta), np.float64(0.0), 8, 3)
    p_t, alpha_t = solve_trust_region_scipy(fac, torch.tensor([delta], dtype=torch.float64),
                                            torch.zeros(1, dtype=torch.float64), 8, 3)
    assert type(alpha) is np.float64 and isinstance(alpha_t, torch.Tensor)
    # (host values against tensors: a different path, compared at one evaluation's
    # tolerance, not bitwise)
    np.testing.assert_allclose(alpha, alpha_t.item(), rtol=ONE_EVAL_RTOL)
    np.testing.assert_allclose(p.numpy(), p_t.numpy(), rtol=ONE_EVAL_RTOL)
    if delta < 1:
        assert alpha > 0
        np.testing.assert_allclose(np.linalg.norm(p.numpy()), delta, rtol=1e-12)
    else:
        assert alpha == 0
