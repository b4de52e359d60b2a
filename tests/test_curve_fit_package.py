"""The ``_curve_fit`` package: one batched core under ``curve_fit`` and ``batch_curve_fit``.

``curve_fit`` is a batch of one of the same data, model, book and covariance
code as ``batch_curve_fit``; these tests pin what that sharing must keep:
scipy's way of calling ``f`` in ``curve_fit``, the caller's tensors reaching
``f`` undetached, the status of problems kept out of a batch, and the
covariance helpers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _parity import assert_x_close
from scipy.optimize import OptimizeWarning

from torchimize_scipy import batch_curve_fit, curve_fit
from torchimize_scipy._curve_fit._covariance import finish_covariance, pivoted_inverse
from torchimize_scipy._curve_fit._data import NONFINITE_DATA_MSG
from torchimize_scipy._engine import status as codes


def decay(x, a, k):
    return a * np.exp(-k * x)


def decay_t(x, a, k):
    return a * torch.exp(-k * x)


X = np.linspace(0, 3, 25)
Y = decay(X, 2.0, 1.3) + 0.01 * np.sin(5 * X)


@pytest.mark.parametrize("method", ["lm", "trf"])
def test_curve_fit_calls_f_with_scalars_as_scipy(method):
    """One call per parameter vector, numpy float64 scalars, ``xdata`` unchanged."""
    seen = []

    def f(x, a, k):
        seen.append((type(a), type(k), x is X))
        return decay(x, a, k)

    popt, _, info, _, _ = curve_fit(f, X, Y, p0=[1.0, 1.0], method=method, full_output=True)
    assert set(seen) == {(np.float64, np.float64, True)}
    assert len(seen) >= info["nfev"]  # every evaluation is one call of f
    if method == "lm":
        # MINPACK's counts: each forward difference is one call of f; beyond them only
        # the n = 2 differences of the Jacobian after an accepted final step, which
        # MINPACK never makes and nfev does not count (see LeastsqBook)
        assert len(seen) - info["nfev"] in (0, 2)


@pytest.mark.parametrize("api", ["curve_fit", "batch_curve_fit"])
def test_torch_xdata_reaches_f_undetached(api):
    """The caller's tensors are not copied through the host: ``f`` sees the graph."""
    x = torch.linspace(0, 3, 25, dtype=torch.float64, requires_grad=True)
    y = decay_t(x, 2.0, 1.3).detach()
    flags = []

    def f(xx, a, k):
        flags.append(xx.requires_grad)
        return decay_t(xx, a, k)

    if api == "curve_fit":
        popt, _ = curve_fit(f, x, y, p0=torch.ones(2, dtype=torch.float64), method="trf")
    else:
        popt, _ = batch_curve_fit(f, x, y[None], torch.ones(1, 2, dtype=torch.float64),
                                  method="trf")
    assert flags and all(flags)
    np.testing.assert_allclose(popt.detach().reshape(-1).numpy(), [2.0, 1.3], rtol=1e-6)


@pytest.mark.parametrize("method", ["lm", "trf"])
def test_batch_nonfinite_data_status(method):
    """A problem kept out for its data: NONFINITE status, curve_fit's ValueError text."""
    Yb = np.stack([Y, Y, Y])
    Yb[1, 4] = np.inf
    with pytest.warns(OptimizeWarning, match="Optimal parameters not found for 1 of 3"):
        popt, pcov, _, mesg, ier = batch_curve_fit(decay, X, Yb, np.ones((3, 2)),
                                                   method=method, full_output=True)
    assert mesg[1] == NONFINITE_DATA_MSG
    assert int(ier[1]) == (0 if method == "lm" else codes.NONFINITE)
    assert np.isnan(popt[1]).all() and np.isnan(pcov[1]).all()
    assert not codes.success(int(ier[1])) or method == "lm"
    assert_x_close(popt[2], popt[0])  # the same data set beside a failing one
    with pytest.raises(ValueError, match=NONFINITE_DATA_MSG):
        curve_fit(decay, X, Yb[1], p0=[1.0, 1.0], method=method)


def test_pivoted_inverse_undoes_the_permutation():
    """``P R^{-1} R^{-T} P^T`` equals ``(J^T J)^{-1}`` of the unpermuted ``J``."""
    import scipy.linalg

    rng = np.random.default_rng(0)
    J = rng.normal(size=(12, 4)) * np.array([1.0, 30.0, 0.1, 5.0])
    _, R, perm = scipy.linalg.qr(J, pivoting=True, mode="economic")
    assert not np.array_equal(perm, np.arange(4))  # the test needs a real permutation
    cov = pivoted_inverse(torch.from_numpy(R)[None], torch.from_numpy(perm)[None])[0].numpy()
    ref = np.linalg.inv(J.T @ J)
    # two kernels: each within a few eps * cond(J^T J) of the true inverse
    tol = 10 * np.finfo(float).eps * np.linalg.cond(J) ** 2 * np.abs(ref).max()
    np.testing.assert_allclose(cov, ref, rtol=0, atol=tol)


def test_pivoted_inverse_singular_is_nan():
    R = torch.tensor([[[2.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    assert torch.isnan(pivoted_inverse(R, torch.tensor([[1, 0]]))).all()


def test_finish_covariance_rules():
    """Scaled by chi-square / (m - n); inf when indeterminate or m <= n; NaN if not ok."""
    cov = torch.eye(2, dtype=torch.float64).expand(4, 2, 2).clone()
    cov[1, 0, 0] = float("nan")
    ok = torch.tensor([True, True, True, False])
    chisq = torch.full((4,), 6.0, dtype=torch.float64)
    m = torch.tensor([5, 5, 2, 5])
    out, bad = finish_covariance(cov, ok, 2, m, chisq, absolute_sigma=False)
    np.testing.assert_array_equal(out[0].numpy(), 2.0 * np.eye(2))  # 6 / (5 - 2)
    assert torch.isinf(out[1]).all() and torch.isinf(out[2]).all()
    assert torch.isnan(out[3]).all()
    assert bad == 2
    out, bad = finish_covariance(cov, ok, 2, m, chisq, absolute_sigma=True)
    np.testing.assert_array_equal(out[2].numpy(), np.eye(2))  # m <= n does not matter
    assert bad == 1


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_batch_calls_f_in_cache_sized_groups_of_problems(monkeypatch, kind):
    """Large batches call ``f`` for consecutive groups of problems (the model's
    temporaries stay in the cache), forward differences included; the fits are
    those of whole calls to the solver's accuracy."""
    from torchimize_scipy._curve_fit import _model

    B = 150
    rng = np.random.default_rng(3)
    amp, rate = rng.uniform(1, 3, B), rng.uniform(0.5, 2, B)
    y = decay(X, amp[:, None], rate[:, None]) + 0.01 * rng.standard_normal((B, X.size))
    p0 = np.ones((B, 2))
    if kind == "torch":
        y, p0 = torch.as_tensor(y), torch.as_tensor(p0)
    rows = []

    def f(x, a, k):
        rows.append(a.shape[0])
        return (decay_t if kind == "torch" else decay)(x, a, k)

    xdata = torch.as_tensor(X) if kind == "torch" else X
    whole = batch_curve_fit(f, xdata, y, p0, full_output=True)
    calls = len(rows)
    assert max(rows) >= B  # one call for every running problem
    group = 40 * X.size  # residuals per call: 40 problems, or 20 with their 2 differences
    monkeypatch.setattr(_model, "CHUNK_ELEMENTS", group)
    rows.clear()
    grouped = batch_curve_fit(f, xdata, y, p0, full_output=True)
    # (the first residuals and Jacobians of torch input are evaluated while gradients are
    # recorded, before the solve: those calls stay whole)
    assert max(rows[2:]) == 40 and len(rows) > 2 * calls  # several calls per evaluation
    np.testing.assert_array_equal(np.asarray(grouped[4]), np.asarray(whole[4]))  # ier
    assert_x_close(grouped[0], whole[0])
    assert_x_close(grouped[1], whole[1], xtol=None, rtol=1e-6)
