"""``batch_least_squares`` with ``jac_sparsity`` when the rows of a batch part ways.

The Jacobian of such a batch is an operator (``tr_solver='lsmr'``), not a
tensor. When some rows accept their trial and others reject theirs, the loop
writes the accepted rows' new Jacobians back into the batch's operator
(``loop.put``); that merge once asked the operator for ``numel`` and crashed,
so every test batch whose rows stayed in step passed while a batch of two
different starts did not. Each row must end as scipy's ``least_squares`` with
the same ``jac_sparsity`` ends from its start (the same minimum, to the
tolerances), and a row whose residuals turn NaN must stop alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp

from torchimize_scipy import batch_least_squares

N = 4


def chained_rosenbrock(X: np.ndarray) -> np.ndarray:
    """Residuals ``(B, 2 (N - 1))`` of the chained Rosenbrock function at the rows of ``X``."""
    return np.concatenate([10 * (X[:, 1:] - X[:, :-1] ** 2), 1 - X[:, :-1]], axis=1)


def _sparsity() -> np.ndarray:
    S = np.zeros((2 * (N - 1), N), dtype=int)
    for i in range(N - 1):
        S[i, i] = S[i, i + 1] = 1
        S[N - 1 + i, i] = 1
    return S


@pytest.mark.parametrize("method", ["trf", "dogbox"])
@pytest.mark.parametrize("jac", ["2-point", "3-point"])
def test_rows_that_part_ways_end_where_scipy_ends(method, jac):
    X0 = np.array([[-1.2] * N, [0.5] * N, [2.0, -1.0, 0.3, 1.5]])
    S = _sparsity()
    res = batch_least_squares(chained_rosenbrock, X0, jac=jac, jac_sparsity=S, method=method)
    for i, x0 in enumerate(X0):
        ref = scipy.optimize.least_squares(lambda x: chained_rosenbrock(x[None])[0], x0,
                                           jac=jac, jac_sparsity=S, method=method)
        assert ref.success and int(res.status[i]) > 0, i
        # the same minimum (cost 0 at x = 1): x to the solver's tolerance, the cost near 0
        np.testing.assert_allclose(res.x[i], ref.x, rtol=0, atol=1e-6)
        assert float(res.cost[i]) <= 1e-12
    # the rows did part ways (else the merge of some rows was not exercised)
    assert len(set(np.asarray(res.nfev).tolist())) > 1


@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_a_row_whose_residuals_turn_nan_stops_alone(method):
    """Broyden's tridiagonal function; row 1 gives NaN once it has moved from its start."""
    n = 40
    S = sp.diags_array([np.ones(n - 1), np.ones(n), np.ones(n - 1)], offsets=[-1, 0, 1])

    def broyden(X, poison):
        F = (3 - 2 * X) * X + 1
        F[:, 1:] -= X[:, :-1]
        F[:, :-1] -= 2 * X[:, 1:]
        F[(poison[:, 0] > 0) & (np.abs(X[:, 0] + 1) > 1e-3), 5] = np.nan
        return F

    X0 = -np.ones((3, n))
    poison = np.array([[0.0], [1.0], [0.0]])
    res = batch_least_squares(broyden, X0, args=(poison,), jac_sparsity=S, method=method)
    # the clean rows: solved as scipy solves them
    ref = scipy.optimize.least_squares(lambda x: broyden(x[None], poison[:1])[0], X0[0],
                                       jac_sparsity=S, method=method)
    for i in (0, 2):
        assert int(res.status[i]) > 0
        np.testing.assert_allclose(res.x[i], ref.x, rtol=0, atol=1e-7)
    # the poisoned row stops on its own (its NaN trials shrink its radius until a tolerance
    # or the budget stops it; which one depends on the path), at a finite point
    assert int(res.status[1]) in (0, 2, 3, 4)
    assert np.isfinite(res.x[1]).all() and np.isfinite(float(res.cost[1]))
