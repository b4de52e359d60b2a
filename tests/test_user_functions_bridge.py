"""The numpy bridge of a vectorised ``fun``/``jac`` (``_user_functions.VectorizedFunction``).

A numpy ``fun`` of a batch receives a fresh host copy of the engine's points and
its float64 result becomes the engine's tensor without a conversion, remembered
as its host rows; a result of another dtype is converted as before.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from torchimize_scipy._arrays import Namespace
from torchimize_scipy._engine.host_scalars import host_rows
from torchimize_scipy._user_functions import PerProblemArgs, VectorizedFunction

NS = Namespace("numpy", torch.device("cpu"), torch.float64)


def _adapter(fn, B=4, y=None):
    y = np.arange(B * 3, dtype=np.float64).reshape(B, 3) if y is None else y
    return VectorizedFunction(fn, PerProblemArgs((y,), B, NS), {}, NS)


def _top_level_ops(call) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    count = 0
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        p = e.cpu_parent
        while p is not None and not p.name.startswith("aten::"):
            p = p.cpu_parent
        count += p is None
    return count


def test_result_is_remembered_host_rows_with_the_values():
    seen = []

    def fun(x, y):
        seen.append(x)
        return x[:, :1] * y  # (b, 3) float64

    adapter = _adapter(fun)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    idx = torch.tensor([2, 0])
    out = adapter(x, idx)
    expect = np.array([[6.0, 7.0, 8.0], [0.0, 3.0, 6.0]])
    np.testing.assert_allclose(out.numpy(), expect, rtol=0, atol=0)
    assert out.dtype == torch.float64
    rows = host_rows(out)
    assert rows is not None
    np.testing.assert_allclose(rows, expect, rtol=0, atol=0)
    # ``fun`` got a private copy of the points: writing to it leaves the engine's x alone
    seen[0][:] = -1.0
    np.testing.assert_allclose(x.numpy(), [[1.0, 2.0], [3.0, 4.0]], rtol=0, atol=0)


def test_other_dtypes_are_converted_and_not_remembered():
    adapter = _adapter(lambda x, y: (x[:, :1] * y).astype(np.float32))
    out = adapter(torch.ones(2, 2, dtype=torch.float64), torch.tensor([0, 1]))
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), [[0, 1, 2], [3, 4, 5]], rtol=0, atol=0)
    assert host_rows(out) is None


def test_points_with_host_rows_cross_without_torch_ops():
    from torchimize_scipy._engine.host_scalars import remember_rows

    adapter = _adapter(lambda x, y: x[:, :1] * y)
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    x = remember_rows(torch.from_numpy(a), a)
    idx = torch.tensor([0, 1])
    adapter(x, idx)  # (the selection of args for idx is remembered)
    # only torch.from_numpy of the result remains
    assert _top_level_ops(lambda: adapter(x, idx)) == 1
    x2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    # Tensor.numpy's four dispatches and torch.from_numpy's one (was 8: detach, cpu, to)
    assert _top_level_ops(lambda: adapter(x2, idx)) <= 5
