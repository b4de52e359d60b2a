"""float32 'trf' on exactly rank-deficient Jacobians, against scipy's float64 solution.

With a zero singular value the trust-region iteration on ``alpha`` drives
``alpha`` towards 0 (scipy's rule), and ``(s**2 + alpha)**3`` underflowed to 0
in float32 (``0 / 0``: the row never moved and stopped at ``max_nfev``). The
cost reached must be scipy's to float32's precision.
"""

import numpy as np
import pytest
import scipy.optimize as so
import torch

from torchimize_scipy import batch_least_squares, least_squares


def unused_variable(x, lib=np):
    return lib.stack([x[0] ** 2 - 3, x[0] - 1.5])


def colinear(x, lib=np):
    return lib.stack([(x[0] + x[1]) ** 2 - 3, x[0] + x[1] - 1.5])


@pytest.mark.parametrize("fun", [unused_variable, colinear])
@pytest.mark.parametrize("bounds", [(-np.inf, np.inf), ([-10.0, -10.0], [10.0, 40.0])])
def test_trf_float32_reaches_scipys_cost(fun, bounds):
    ref = so.least_squares(fun, [1.0, 2.0], bounds=bounds)
    res = least_squares(lambda x: fun(x, torch), torch.tensor([1.0, 2.0]), bounds=bounds)
    assert res.x.dtype == torch.float32
    assert res.status > 0, res.message
    np.testing.assert_allclose(float(res.cost), ref.cost, rtol=1e-4)
    np.testing.assert_allclose(float(res.x[0] + (res.x[1] if fun is colinear else 0)),
                               ref.x[0] + (ref.x[1] if fun is colinear else 0), rtol=1e-4)


def test_trf_float32_batch_reaches_scipys_cost():
    ref = so.least_squares(unused_variable, [1.0, 2.0])

    def batch(X):
        return torch.stack([X[:, 0] ** 2 - 3, X[:, 0] - 1.5], -1)

    res = batch_least_squares(batch, torch.tensor([[1.0, 2.0]] * 3))
    assert (res.status > 0).all(), res.status
    np.testing.assert_allclose(res.cost.numpy(), ref.cost, rtol=1e-4)
    np.testing.assert_allclose(res.x[:, 0].numpy(), ref.x[0], rtol=1e-5)
