"""``linalg.qr_svd``: a batch's SVD rows of tall matrices from their QR factors first.

The SVD data (``s``, ``V``, ``U^T b``) of ``A = Q R`` come from the SVD of the
triangle ``R`` and ``Q^T b``, without forming the thin ``U``. They must be the
SVD's own to rounding (another code path: tolerances), the same bits for a row
alone as in its batch, in one call or shared with the helper threads (the same
path), and batches' rows only: a single problem keeps the SVD of its matrix, as
scipy computes it.
"""

from __future__ import annotations

import pytest
import torch

from torchimize_scipy._engine import linalg
from torchimize_scipy._engine.linalg import QR_FIRST_RATIO, factorize, qr_svd, svd_factors


def _tall(B: int, m: int = 100, n: int = 12, seed: int = 0, cond: float = 1e7):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    A[:, :, 0] /= cond  # an ill-conditioned column, as in a batch's SVD tail
    f = torch.randn(B, m, generator=gen, dtype=torch.float64)
    return A, f


def _steps(s: torch.Tensor, V: torch.Tensor, uf: torch.Tensor, alpha: float) -> torch.Tensor:
    """``-V (s^2 + alpha)^{-1} s uf``: the damped step, free of the vectors' signs."""
    return -(V * (s * uf / (s * s + alpha)).unsqueeze(-2)).sum(-1)


@pytest.mark.parametrize("shape", [(7, 100, 12), (5, 64, 4), (3, 1000, 3)])
def test_the_svd_data_of_the_matrix(shape):
    A, f = _tall(*shape)
    s, V, uf = qr_svd(A, f)
    U, s_ref, Vh = torch.linalg.svd(A, full_matrices=False)
    uf_ref = torch.bmm(U.transpose(-1, -2), f.unsqueeze(-1)).squeeze(-1)
    scale = s_ref[:, :1]
    assert bool(((s - s_ref).abs() <= 1e-13 * scale).all())
    # the steps of the trust-region solves, at alpha = 0 and damped: the conditioning
    # (1e7) times a few ulps
    for alpha in (0.0, 1e-3, 1.0):
        p, p_ref = _steps(s, V, uf, alpha), _steps(s_ref, Vh.transpose(-1, -2), uf_ref, alpha)
        err = (p - p_ref).abs().amax(-1) / p_ref.abs().amax(-1)
        assert bool((err <= 1e-7).all()), (alpha, err)
    # V is orthogonal
    B, _, n = A.shape
    torch.testing.assert_close(torch.bmm(V.transpose(-1, -2), V),
                               torch.eye(n, dtype=A.dtype).expand(B, n, n), rtol=0, atol=1e-13)


def test_a_rank_deficient_matrix_keeps_its_zero_singular_values():
    A, f = _tall(4, m=60, n=5, cond=1.0)
    A[:, :, 3] = A[:, :, 1]  # rank 4
    s, V, uf = qr_svd(A, f)
    assert bool((s[:, -1] <= 1e-13 * s[:, 0]).all())
    assert bool((s[:, -2] > 1e-3 * s[:, 0]).all())


def test_a_row_alone_gives_the_same_bits_as_in_its_batch():
    A, f = _tall(9)
    s, V, uf = qr_svd(A, f)
    for i in (0, 4, 8):
        s1, V1, uf1 = qr_svd(A[i:i + 1], f[i:i + 1])
        assert torch.equal(s1[0], s[i]) and torch.equal(V1[0], V[i])
        assert torch.equal(uf1[0], uf[i])


def test_a_batch_shared_with_the_helpers_gives_the_same_bits(monkeypatch):
    # 100 rows of 100 x 12: over SPLIT_MIN_ROWS and torch's grain size in all, so where
    # torch has two threads the chunks go to a helper thread (forced here, whatever the
    # machine's CPU count); then forced to one call for comparison
    A, f = _tall(100)
    monkeypatch.setattr(linalg, "_lapack_helpers", lambda A: 1)
    shared = qr_svd(A, f)
    monkeypatch.setattr(linalg, "_lapack_helpers", lambda A: 0)
    alone = qr_svd(A, f)
    for got, want in zip(shared, alone, strict=True):
        assert torch.equal(got, want)


def test_svd_factors_takes_it_for_tall_batch_rows_only():
    A, f = _tall(3)
    batch = svd_factors(A, None, f, qr_first=True)
    direct = svd_factors(A, None, f)
    for got, want in zip(batch, qr_svd(A, f), strict=True):
        assert torch.equal(got, want)
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    assert torch.equal(direct[0], s)  # (no qr_first: the SVD of the matrix itself)
    # below QR_FIRST_RATIO the SVD of the matrix itself either way
    short, fs = _tall(3, m=QR_FIRST_RATIO * 12 - 1)
    for got, want in zip(svd_factors(short, None, fs, qr_first=True),
                         svd_factors(short, None, fs), strict=True):
        assert torch.equal(got, want)


def test_an_augmented_system_counts_its_diagonal_rows():
    # bounded 'trf': [J d; diag(sqrt(c))], here 40 + 12 rows of 12 columns: QR first
    A, f = _tall(4, m=40)
    diag = torch.full((4, 12), 1e-6, dtype=torch.float64)
    s, V, uf = svd_factors(A, None, f, diag, qr_first=True)
    Aa = torch.cat([A, torch.diag_embed(diag.sqrt())], dim=-2)
    fa = torch.cat([f, torch.zeros_like(diag)], dim=-1)
    for got, want in zip((s, V, uf), qr_svd(Aa, fa), strict=True):
        assert torch.equal(got, want)
    s_ref = torch.linalg.svdvals(Aa)
    assert bool(((s - s_ref).abs() <= 1e-13 * s_ref[:, :1]).all())


def test_a_non_finite_row_fails_alone():
    A, f = _tall(5)
    A[2, 7, 3] = float("nan")
    s, V, uf = svd_factors(A, None, f, qr_first=True)
    assert bool(s[2].isnan().all()) and bool(uf[2].isnan().all())
    ok = [0, 1, 3, 4]
    for got, want in zip((s, V, uf), qr_svd(A[ok], f[ok]), strict=True):
        assert torch.equal(got[ok], want)


def test_a_non_finite_right_hand_side_spoils_only_its_projection():
    # f is reduced as one more column after A's: the other rows keep their bits, and the
    # row's own factors of A stay finite (LAPACK may round them differently there)
    A, f = _tall(4)
    f[1, 9] = float("inf")
    s, V, uf = qr_svd(A, f)
    s0, V0, uf0 = qr_svd(A, torch.where(torch.isfinite(f), f, 0.0))
    assert not bool(torch.isfinite(uf[1]).any())
    # (backward stable both ways: each singular value to a few eps of the largest)
    torch.testing.assert_close(s[1], s0[1], rtol=0, atol=1e-12 * float(s0[1].max()))
    assert bool(torch.isfinite(V[1]).all())
    ok = [0, 2, 3]
    for got, want in zip((s, V, uf), (s0, V0, uf0), strict=True):
        assert torch.equal(got[ok], want[ok])


def test_single_problems_keep_the_svd_of_their_matrix():
    # no Gram route (one problem, as scipy): the SVD of J itself, not its QR first
    A, f = _tall(1)
    fac = factorize(A, None, f, use_gram=False)
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    uf = torch.bmm(U.transpose(-1, -2), f.unsqueeze(-1)).squeeze(-1)
    assert torch.equal(fac.s, s)  # (the same LAPACK call on the same matrix)
    # U^T f: summed on the host in order, by bmm in MKL's order (which depends on the CPU
    # and on MKL's mode: MKL_CBWR changes it): m terms, each |u_i f_i| <= |f_i|
    torch.testing.assert_close(fac.uf, uf, rtol=0,
                               atol=A.shape[1] * torch.finfo(A.dtype).eps * float(f.abs().sum()))
    # a batch's rejected row: QR first
    batch = factorize(A, None, f, use_gram=True)
    assert not bool(batch.gram.any())
    for got, want in zip(batch[:3], qr_svd(A, f), strict=True):
        assert torch.equal(got, want)


def test_a_matrix_that_records_gradients_keeps_the_differentiable_svd():
    A, f = _tall(3)
    A.requires_grad_(True)
    s, V, uf = svd_factors(A, None, f, qr_first=True)
    (s.sum() + uf.sum()).backward()
    assert A.grad is not None and bool(torch.isfinite(A.grad).all())
    with torch.no_grad():
        want = svd_factors(A.detach(), None, f, qr_first=False)
    assert torch.equal(s.detach(), want[0]) and torch.equal(uf.detach(), want[2])
