"""Oracle tests of the engine's damped least-squares solves (``_engine/linalg.py``,
``_engine/trust_region.py``).

Every solve is compared with numpy's ``lstsq`` on the stacked system
``[A; sqrt(alpha) I] p = -[b; 0]``, whichever route (Gram inverse or SVD data)
``factorize`` chose for the problem, and the routes are checked to be chosen
by conditioning as documented.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _parity import ONE_EVAL_RTOL

from torchimize_scipy._engine.linalg import (
    factorize,
    full_rank_mask,
    gauss_newton_step,
    grad_norm,
    gram_cond_limit,
)
from torchimize_scipy._engine.quadratic import build_quadratic_1d, cross_jac, evaluate_quadratic
from torchimize_scipy._engine.trust_region import damped_step, radius_mismatch

M, N = 30, 4
#: Relative accuracy expected per problem of ``batch``: the Gram route squares cond(A).
RTOL = (1e-11, 1e-8, 1e-7, 1e-10)


def _matrix(rng, cond):
    """An ``M x N`` matrix with singular values spread from 1 to ``1/cond``."""
    U, _ = np.linalg.qr(rng.standard_normal((M, N)))
    V, _ = np.linalg.qr(rng.standard_normal((N, N)))
    s = np.geomspace(1.0, 1.0 / cond, N)
    return U @ np.diag(s) @ V.T


@pytest.fixture
def batch():
    """Problems 0-1 well conditioned, 2 with cond(A) = 1e6, 3 rank deficient."""
    rng = np.random.default_rng(0)
    A = np.stack([_matrix(rng, 10.0), _matrix(rng, 1e3), _matrix(rng, 1e6), _matrix(rng, 1.0)])
    A[3, :, 3] = A[3, :, 0] + A[3, :, 1]  # rank 3
    f = rng.standard_normal((4, M))
    return torch.as_tensor(A), torch.as_tensor(f)


def _reference(A, f, alpha):
    """Minimum-norm solution of ``min |A p + f|^2 + alpha |p|^2`` by numpy."""
    aug = np.vstack([A, np.sqrt(alpha) * np.eye(A.shape[1])])
    rhs = -np.concatenate([f, np.zeros(A.shape[1])])
    return np.linalg.lstsq(aug, rhs, rcond=None)[0]


def test_routes_follow_conditioning(batch):
    A, f = batch
    fac = factorize(A, None, f, use_gram=True)
    assert fac.gram.tolist() == [True, True, False, False]
    single = factorize(A, None, f, use_gram=False)
    assert single.gram is None and single.H is None


def test_full_rank_mask(batch):
    A, f = batch
    for use_gram in (True, False):
        fac = factorize(A, None, f, use_gram=use_gram)
        assert full_rank_mask(fac, M, N).tolist() == [True, True, True, False]


@pytest.mark.parametrize("use_gram", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 1e-3, 0.3, 50.0])
def test_damped_step_matches_lstsq(batch, use_gram, alpha):
    A, f = batch
    fac = factorize(A, None, f, use_gram=use_gram)
    p = damped_step(fac, torch.full((4,), alpha, dtype=A.dtype), zero=alpha == 0).numpy()
    rows = range(3) if alpha == 0 else range(4)  # alpha = 0: full-rank problems only
    for i in rows:
        ref = _reference(A[i].numpy(), f[i].numpy(), alpha)
        np.testing.assert_allclose(p[i], ref, rtol=RTOL[i], atol=RTOL[i] * np.abs(ref).max(),
                                   err_msg=f"problem {i}")


@pytest.mark.parametrize("use_gram", [True, False])
def test_gauss_newton_step_is_minimum_norm(batch, use_gram):
    A, f = batch
    fac = factorize(A, None, f, use_gram=use_gram)
    p = gauss_newton_step(fac).numpy()
    for i in range(4):
        ref = np.linalg.lstsq(A[i].numpy(), -f[i].numpy(), rcond=None)[0]
        np.testing.assert_allclose(p[i], ref, rtol=RTOL[i], atol=RTOL[i] * np.abs(ref).max())


@pytest.mark.parametrize("use_gram", [True, False])
def test_phi_derivative_matches_finite_difference(batch, use_gram):
    A, f = batch
    fac = factorize(A, None, f, use_gram=use_gram)
    alpha = torch.full((4,), 0.2, dtype=A.dtype)
    delta = torch.ones(4, dtype=A.dtype)
    phi, dphi, pnorm = radius_mismatch(fac, alpha, delta)
    h = 1e-6
    up = radius_mismatch(fac, alpha + h, delta)[2]
    down = radius_mismatch(fac, alpha - h, delta)[2]
    np.testing.assert_allclose(dphi.numpy(), ((up - down) / (2 * h)).numpy(), rtol=1e-6)
    # the same values through the same operations: a few ulps at most
    np.testing.assert_allclose((phi + delta).numpy(), pnorm.numpy(), rtol=1e-15)


def test_grad_norm(batch):
    A, f = batch
    ref = np.linalg.norm(np.einsum("bmn,bm->bn", A.numpy(), f.numpy()), axis=-1)
    for use_gram in (True, False):
        np.testing.assert_allclose(grad_norm(factorize(A, None, f, use_gram=use_gram)).numpy(),
                                   ref, rtol=ONE_EVAL_RTOL)


def test_scaling_and_augmentation_match_stacked_system(batch):
    """``A = [J diag(d); diag(c)^(1/2)]`` by either route equals numpy on the stacked matrix."""
    A, f = batch
    rng = np.random.default_rng(1)
    d = torch.as_tensor(rng.uniform(0.5, 2.0, (4, N)))
    c = torch.as_tensor(rng.uniform(0.0, 0.1, (4, N)))
    alpha = torch.full((4,), 0.05, dtype=A.dtype)
    for use_gram in (True, False):
        fac = factorize(A, d, f, diag=c, use_gram=use_gram)
        p = damped_step(fac, alpha).numpy()
        for i in range(2):
            Ai = np.vstack([A[i].numpy() * d[i].numpy(), np.diag(np.sqrt(c[i].numpy()))])
            fi = np.concatenate([f[i].numpy(), np.zeros(N)])
            np.testing.assert_allclose(p[i], _reference(Ai, fi, 0.05), rtol=RTOL[i])


def test_nonfinite_problem_is_isolated(batch):
    A, f = batch
    A = A.clone()
    A[1, 5, 2] = float("nan")
    fac = factorize(A, None, f, use_gram=True)
    assert not bool(fac.gram[1])
    assert bool(torch.isnan(fac.s[1]).all())
    clean = factorize(batch[0], None, f, use_gram=True)
    p = damped_step(fac, torch.full((4,), 0.3, dtype=A.dtype)).numpy()
    p_clean = damped_step(clean, torch.full((4,), 0.3, dtype=A.dtype)).numpy()
    np.testing.assert_array_equal(p[[0, 2, 3]], p_clean[[0, 2, 3]])


def test_cross_jac_gram_form_matches_direct():
    rng = np.random.default_rng(2)
    J = torch.as_tensor(rng.standard_normal((6, M, N)))
    G = J.mT @ J
    u = torch.as_tensor(rng.standard_normal((6, N)))
    v = torch.as_tensor(rng.standard_normal((6, N)))
    direct_uv = ((J @ u[..., None]) * (J @ v[..., None])).sum((-2, -1))
    direct_uu = ((J @ u[..., None]) ** 2).sum((-2, -1))
    for mask in ([True] * 6, [False] * 6, [True, False] * 3):
        gram = torch.tensor(mask)
        np.testing.assert_allclose(cross_jac(J, u, v, G, gram).numpy(), direct_uv.numpy(),
                                   rtol=ONE_EVAL_RTOL)
        np.testing.assert_allclose(cross_jac(J, u, u, G, gram).numpy(), direct_uu.numpy(),
                                   rtol=ONE_EVAL_RTOL)


def test_quadratic_models_gram_form_match_direct():
    rng = np.random.default_rng(3)
    J = torch.as_tensor(rng.standard_normal((5, M, N)))
    G = J.mT @ J
    g, s, s0, d, c = (torch.as_tensor(rng.standard_normal((5, N))) for _ in range(5))
    c = c.abs()
    gram = torch.tensor([True, False, True, True, False])
    np.testing.assert_allclose(evaluate_quadratic(J, d, g, s, diag=c, G=G, gram=gram).numpy(),
                               evaluate_quadratic(J, d, g, s, diag=c).numpy(),
                               rtol=ONE_EVAL_RTOL)
    got = build_quadratic_1d(J, d, g, s, diag=c, s0=s0, G=G, gram=gram)
    ref = build_quadratic_1d(J, d, g, s, diag=c, s0=s0)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=ONE_EVAL_RTOL)


def test_float32_gram_limit(batch):
    """In float32 a Gram matrix with cond 1e6 is not trusted; the step stays accurate."""
    A, f = batch
    assert gram_cond_limit(torch.float64) == 1e10
    assert 1e4 < gram_cond_limit(torch.float32) < 1e5
    fac = factorize(A.float(), None, f.float(), use_gram=True)
    assert fac.gram.tolist() == [True, False, False, False]
    p = damped_step(fac, torch.full((4,), 1e-3), zero=False).double().numpy()
    for i in range(2):
        ref = _reference(A[i].numpy(), f[i].numpy(), 1e-3)
        np.testing.assert_allclose(p[i], ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_eigen_route_between_the_limits(monkeypatch):
    """cond_1(H) above limit/n but cond_2(H) below the limit: eigen-decomposition, no SVD."""
    import torchimize_scipy._engine.linalg as linalg

    rng = np.random.default_rng(5)
    A = torch.as_tensor(np.stack([_matrix(rng, 10.0), _matrix(rng, 1.5e4)]))
    f = torch.as_tensor(rng.standard_normal((2, M)))
    monkeypatch.setattr(linalg, "GRAM_COND2_LIMIT", 1e9)
    H = (A.mT @ A).numpy()
    cond1 = [np.linalg.cond(h, 1) for h in H]
    assert cond1[0] < 1e9 / N < cond1[1] and np.linalg.cond(H[1]) < 1e9
    svd_calls = []
    direct = linalg.svd_direct
    monkeypatch.setattr(linalg, "svd_direct",
                        lambda *a: svd_calls.append(a) or direct(*a))
    fac = factorize(A, None, f, use_gram=True)
    assert fac.gram.tolist() == [True, False] and not svd_calls
    p = damped_step(fac, torch.full((2,), 0.01, dtype=A.dtype)).numpy()
    for i in range(2):
        ref = _reference(A[i].numpy(), f[i].numpy(), 0.01)
        np.testing.assert_allclose(p[i], ref, rtol=1e-7, atol=1e-7 * np.abs(ref).max())


def test_hopeless_conditions_skip_the_eigen_route(monkeypatch):
    """cond_1(H) beyond n * limit proves cond_2(H) beyond the limit: straight to the SVD."""
    rng = np.random.default_rng(6)
    A = torch.as_tensor(np.stack([_matrix(rng, 10.0), _matrix(rng, 1e6), _matrix(rng, 1e7)]))
    f = torch.as_tensor(rng.standard_normal((3, M)))
    eigh_sizes = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda H: eigh_sizes.append(H.shape[0]) or eigh(H))
    fac = factorize(A, None, f, use_gram=True)
    assert fac.gram.tolist() == [True, False, False] and eigh_sizes == []
    p = damped_step(fac, torch.full((3,), 0.01, dtype=A.dtype)).numpy()
    for i in range(3):
        ref = _reference(A[i].numpy(), f[i].numpy(), 0.01)
        np.testing.assert_allclose(p[i], ref, rtol=1e-7, atol=1e-7 * np.abs(ref).max())
