"""``linalg.factorize`` sends rejected problems straight to the direct SVD when none can use eigh.

A batch's ill-conditioned tail is mostly rows whose Gram matrix is beyond
both the inverse's and the eigen-decomposition's limits (issue 14). Those
rows now skip the eigen-decomposition step (which sent every one of them on
to the direct SVD anyway); their factors must be the direct SVD's, row for
row, and the Gram rows' stay as they were.
"""

from __future__ import annotations

import pytest
import torch

from torchimize_scipy._engine import linalg
from torchimize_scipy._engine.linalg import factorize, svd_factors


def _batch(B: int, bad: slice, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(B, 30, 5, dtype=torch.float64, generator=g)
    J[bad, :, -1] = J[bad, :, 0] + 1e-9 * J[bad, :, -1]  # cond(J)**2 ~ 1e18: hopeless
    f = torch.randn(B, 30, dtype=torch.float64, generator=g)
    d = torch.rand(B, 5, dtype=torch.float64, generator=g) + 0.5
    return J, f, d


@pytest.mark.parametrize("bad", [slice(None), slice(1, None, 3)])
@pytest.mark.parametrize("scaled", [False, True])
def test_hopeless_rows_get_the_direct_svd_and_skip_eigh(bad, scaled, monkeypatch):
    B = 9
    J, f, d = _batch(B, bad)
    d = d if scaled else None
    called = []
    monkeypatch.setattr(linalg, "_eig_factors", lambda *a: called.append(1))
    fac = factorize(J, d, f, use_gram=True)
    assert not called  # no problem for the eigen-decomposition
    rows = torch.arange(B)[bad]
    assert not fac.gram[rows].any() and int(fac.gram.sum()) == B - len(rows)
    A = J[rows] if d is None else J[rows] * d[rows].unsqueeze(-2)
    s, V, uf = svd_factors(A, None, f[rows], qr_first=True)  # (a batch's SVD rows)
    assert torch.equal(fac.s[rows], s) and torch.equal(fac.V[rows], V)
    assert torch.equal(fac.uf[rows], uf)
    gram_rows = fac.gram.nonzero().squeeze(-1)
    assert (fac.s[gram_rows] == 0).all() and (fac.V[gram_rows] == 0).all()


def test_rows_for_eigh_still_take_it(monkeypatch):
    g = torch.Generator().manual_seed(1)
    J = torch.randn(6, 100, 12, dtype=torch.float64, generator=g)
    J[::2, :, -1] = J[::2, :, 0] + 3e-5 * J[::2, :, -1]  # cond(J)**2 ~ 1e10: eigh's range
    f = torch.randn(6, 100, dtype=torch.float64, generator=g)
    called = []
    original = linalg._eig_factors

    def spy(*args):
        called.append(args[0].shape[0])
        return original(*args)

    monkeypatch.setattr(linalg, "_eig_factors", spy)
    fac = factorize(J, None, f, use_gram=True)
    assert called == [3]
    assert int(fac.gram.sum()) == 3
