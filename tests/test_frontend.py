"""Tests of the one frontend path (``_frontend.prepare``, ``_results.build_result``,
``_engine.status.success``) that ``least_squares`` and ``batch_least_squares`` share.

The two public functions must reject the same bad input with the same
``ValueError`` (one prologue), report ``success`` by the one rule of the status
table, and build their results the same way (``least_squares`` is problem 0 of
the batch result, with scipy's keys in scipy's order).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import scipy.optimize as so
import torch

from torchimize_scipy import batch_least_squares, least_squares
from torchimize_scipy._arrays import to_host
from torchimize_scipy._engine import status as codes

T = np.linspace(0, 1, 12)


def fun_one(x):
    return x[0] * np.exp(-x[1] * T) - np.exp(-2 * T)


def fun_batch(x):
    return x[:, :1] * np.exp(-x[:, 1:2] * T) - np.exp(-2 * T)


# ---------------------------------------------------------------------------- success rule
@pytest.mark.parametrize("status", sorted(codes.TERMINATION_MESSAGES))
def test_success_rule_per_code(status):
    expected = status in (codes.GTOL, codes.FTOL, codes.XTOL, codes.FTOL_XTOL)
    assert codes.success(status) is expected
    assert bool(codes.success(torch.tensor(status))) is expected
    assert bool(codes.success(np.int64(status))) is expected


def test_success_rule_elementwise():
    statuses = torch.tensor(sorted(codes.TERMINATION_MESSAGES))
    got = codes.success(statuses)
    assert got.dtype == torch.bool
    assert got.tolist() == [codes.success(int(s)) for s in statuses]


def test_results_report_success_from_the_rule():
    """A stop on the budget (status 0) is a failure in both frontends, a tolerance a success."""
    one = least_squares(fun_one, [1.0, 1.0], max_nfev=2)
    assert one.status == codes.MAX_NFEV and one.success is False
    batch = batch_least_squares(fun_batch, np.array([[1.0, 1.0], [1.0, 1.9]]), max_nfev=2)
    assert batch.success.tolist() == [bool(codes.success(int(s))) for s in batch.status]
    done = least_squares(fun_one, [1.0, 1.0])
    assert done.success is True and done.status in (1, 2, 3, 4)


# ---------------------------------------------------------------------------- one prologue
BAD_INPUT = [
    ("bounds-order", {"bounds": ([0.0, 3.0], [2.0, 2.0])}),
    ("outside-bounds", {"bounds": ([1.5, 0.0], [2.0, 3.0])}),
    ("bounds-length", {"bounds": ([0.0, 0.0, 0.0],)}),
    ("x-scale", {"x_scale": -1.0}),
    ("x-scale-complex", {"x_scale": 1 + 2j}),
    ("tolerances", {"ftol": None, "xtol": None, "gtol": None}),
    ("lm-tolerance", {"method": "lm", "ftol": 1e-20}),
    ("lm-bounds", {"method": "lm", "bounds": (0.0, 5.0)}),
    ("diff-step", {"diff_step": [1e-3, 1e-3, 1e-3]}),
    ("f-scale", {"loss": "huber", "f_scale": 0.0}),
    ("max-nfev", {"max_nfev": 0}),
    ("method", {"method": "newton"}),
]


def _error(call) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError) as info:
            call()
    return str(info.value)


@pytest.mark.parametrize(("case", "options"), BAD_INPUT, ids=[c for c, _ in BAD_INPUT])
def test_single_and_batch_reject_alike(case, options):
    single = _error(lambda: least_squares(fun_one, [1.0, 1.0], **options))
    batch = _error(lambda: batch_least_squares(fun_batch, np.ones((3, 2)), **options))
    assert single == batch


def test_lm_needs_as_many_residuals_in_both():
    def short_one(x):
        return np.array([x[0] - 1.0])

    def short_batch(x):
        return x[:, :1] - 1.0

    single = _error(lambda: least_squares(short_one, [1.0, 1.0], method="lm"))
    batch = _error(lambda: batch_least_squares(short_batch, np.ones((3, 2)), method="lm"))
    assert single == batch
    assert "number of residuals is less than the number of variables" in single


def test_tolerance_warning_points_at_the_caller_in_both():
    for call in (lambda: least_squares(fun_one, [1.0, 1.0], ftol=1e-20),
                 lambda: batch_least_squares(fun_batch, np.ones((2, 2)), ftol=1e-20)):
        with pytest.warns(UserWarning, match="machine epsilon") as record:
            call()
        assert record[0].filename == __file__


def test_callable_jac_shape_checked_at_every_call():
    """Regression: a callable ``jac`` of the wrong shape after ``x0`` raised a RuntimeError
    from inside the engine; it now raises the shape ``ValueError``."""
    calls = []

    def fun(x):
        return np.array([x[0] - 1, x[1] - 2, x[0] * x[1]])

    def jac(x):
        calls.append(1)
        J = np.array([[1.0, 0.0], [0.0, 1.0], [x[1], x[0]]])
        return J if len(calls) == 1 else J[:2]

    with pytest.raises(ValueError, match=re.escape("The return value of `jac` has wrong shape")):
        least_squares(fun, [0.0, 0.0], jac=jac)


# ---------------------------------------------------------------------------- one result builder
def test_single_result_has_scipys_keys_in_scipys_order():
    ours = least_squares(fun_one, [1.0, 1.0])
    ref = so.least_squares(fun_one, [1.0, 1.0])
    assert list(ours.keys()) == list(ref.keys())
    assert isinstance(ours.cost, float) and isinstance(ours.status, int)
    np.testing.assert_allclose(ours.x, ref.x, rtol=1e-6)


def test_batch_item_equals_batch_fields():
    x0 = np.array([[1.0, 1.0], [0.5, 3.0], [2.0, 1.0]])
    res = batch_least_squares(fun_batch, x0, method="dogbox", bounds=(0.0, 4.0))
    for i, item in enumerate(res):
        assert list(item.keys()) == list(least_squares(fun_one, x0[i]).keys())
        for name in ("x", "fun", "jac", "grad", "active_mask"):
            np.testing.assert_array_equal(item[name], res[name][i])
        assert item.cost == float(res.cost[i]) and item.status == int(res.status[i])
        assert item.message == res.message[i] and item.success == bool(res.success[i])


def test_lm_njev_is_none_unless_jac_callable_in_both():
    assert least_squares(fun_one, [1.0, 1.0], method="lm").njev is None
    assert batch_least_squares(fun_batch, np.ones((2, 2)), method="lm").njev is None

    def jac_one(x):
        e = np.exp(-x[1] * T)
        return np.stack([e, -x[0] * T * e], axis=1)

    assert least_squares(fun_one, [1.0, 1.0], method="lm", jac=jac_one).njev >= 1


# ---------------------------------------------------------------------------- host helper
def test_to_host_converts_tensors_and_leaves_the_rest():
    t = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert isinstance(to_host(t), np.ndarray) and to_host(t).dtype == np.float32
    nested = to_host([torch.tensor(1.0), (torch.tensor(2.0),)])
    assert isinstance(nested, list) and isinstance(nested[1], list)
    assert to_host(1 + 2j) == 1 + 2j
    with pytest.raises(TypeError):
        np.asarray(to_host(1 + 2j), dtype=float)
