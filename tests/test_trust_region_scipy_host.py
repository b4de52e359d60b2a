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
from _parity import assert_bitwise_equal

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
