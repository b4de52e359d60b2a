"""``linalg.factorize`` on a batch's tail: every row rejected, few rows, many rows.

A batch whose every row the Gram route rejects (an ill-conditioned tail) takes
its SVD data from the whole tensors, without selecting the rows ``0..B-1``;
batches of fewer than ``WITHIN_MIN_ROWS`` rows decide the route from ``cond1``
without the ``_all_within`` shortcut. The factors must be those of the SVD of
``J diag(d)`` (to a tolerance: another code path) and the routes unchanged.
"""

from __future__ import annotations

import pytest
import torch

from torchimize_scipy._engine import linalg
from torchimize_scipy._engine.linalg import WITHIN_MIN_ROWS, factorize


def _jac(B: int, cond_bad: bool, m: int = 20, n: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    if cond_bad:  # cond(J)**2 far beyond the Gram limit (and beyond the eigh limit)
        J[:, :, -1] = J[:, :, 0] + 1e-9 * J[:, :, -1]
    f = torch.randn(B, m, generator=gen, dtype=torch.float64)
    d = torch.rand(B, n, generator=gen, dtype=torch.float64) + 0.5
    return J, f, d


@pytest.mark.parametrize("noncontiguous", [False, True])
@pytest.mark.parametrize("with_d", [False, True])
def test_every_row_rejected_gives_the_svd_of_the_scaled_jacobian(noncontiguous, with_d):
    J, f, d = _jac(5, cond_bad=True)
    if noncontiguous:  # (a transposed copy viewed back: the same values, other strides)
        J = J.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not J.is_contiguous()
    fac = factorize(J, d if with_d else None, f, use_gram=True)
    assert fac.gram is not None and not bool(fac.gram.any())
    A = J * d.unsqueeze(-2) if with_d else J
    U, s, Vh = torch.linalg.svd(A, full_matrices=False)
    torch.testing.assert_close(fac.s, s, rtol=1e-12, atol=0)
    uf = torch.bmm(U.transpose(-1, -2), f.unsqueeze(-1)).squeeze(-1)
    # singular vectors up to sign: compare the products that do not depend on it
    torch.testing.assert_close(fac.V * fac.uf.unsqueeze(-2), Vh.transpose(-1, -2) *
                               uf.unsqueeze(-2), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("B", [3, WITHIN_MIN_ROWS - 1, WITHIN_MIN_ROWS, 200])
def test_well_conditioned_rows_take_the_gram_route_at_any_size(B, monkeypatch):
    calls = []
    real = linalg._all_within
    monkeypatch.setattr(linalg, "_all_within", lambda *a: calls.append(1) or real(*a))
    J, f, d = _jac(B, cond_bad=False)
    fac = factorize(J, d, f, use_gram=True)
    assert bool(fac.gram.all())
    assert len(calls) == (1 if B >= WITHIN_MIN_ROWS else 0)
    H = torch.bmm((J * d.unsqueeze(-2)).transpose(-1, -2), J * d.unsqueeze(-2))
    torch.testing.assert_close(fac.H, H, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(torch.bmm(fac.H, fac.Hinv),
                               torch.eye(4, dtype=torch.float64).expand(B, 4, 4),
                               rtol=0, atol=1e-10)


def test_mixed_rows_keep_their_routes():
    J, f, d = _jac(6, cond_bad=False)
    Jb, _, _ = _jac(6, cond_bad=True)
    J[::2] = Jb[::2]
    fac = factorize(J, d, f, use_gram=True)
    assert fac.gram.tolist() == [False, True] * 3
    s = torch.linalg.svdvals(J[::2] * d[::2].unsqueeze(-2))
    torch.testing.assert_close(fac.s[::2], s, rtol=1e-12, atol=0)
