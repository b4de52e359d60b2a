"""Factorised test batches shared by the row-restriction tests of trf's and 'lm''s subproblems."""

from __future__ import annotations

import torch

from torchimize_scipy._engine.linalg import factorize


def factor_batch(B: int, m: int = 12, n: int = 4, seed: int = 0):
    """Factors of a batch with Gram and SVD rows (every fifth row nearly rank-deficient).

    Returns ``(factors, J, d, f)``.
    """
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    # nearly parallel columns: cond(J)**2 beyond the Gram route's limit (SVD rows)
    J[::5, :, -1] = J[::5, :, 0] + 1e-7 * J[::5, :, -1]
    f = torch.randn(B, m, generator=gen, dtype=torch.float64)
    d = torch.rand(B, n, generator=gen, dtype=torch.float64) + 0.5
    return factorize(J, d, f, use_gram=True), J, d, f
