"""``_engine.loop.put``: rows written in place only into tensors nothing else can see.

Before, every ``put`` merged out of place, copying each ``(B, m, n)``
Jacobian whole for every accepted subset of rows. Now a tensor held by the
state alone is written in place; any tensor that another reference, a view,
a numpy array or autograd can observe is still merged out of place.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchimize_scipy._engine import loop
from torchimize_scipy._engine.loop import RowView, put

ROWS = torch.tensor([1, 3])


@pytest.fixture(autouse=True)
def _small_tensors_in_place(monkeypatch):
    """The tensors here are small: let put write them in place as it would large ones."""
    monkeypatch.setattr(loop, "IN_PLACE_MIN", 0)


def _new_rows(shape: tuple[int, ...] = (2, 3, 2)) -> torch.Tensor:
    return torch.arange(float(np.prod(shape))).reshape(shape) + 100.0


def _put(state: dict, **values: torch.Tensor) -> None:
    sub = RowView(state, ROWS)
    for k, v in values.items():
        sub[k] = v
    put(state, ROWS, sub)


def _expected(before: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    out = before.clone()
    out[ROWS] = new
    return out


def test_private_tensor_is_written_in_place():
    state = {"J": torch.zeros(5, 3, 2)}
    before = state["J"].clone()
    ident = id(state["J"])
    new = _new_rows()
    _put(state, J=new)
    assert id(state["J"]) == ident  # no copy of the whole tensor
    assert torch.equal(state["J"], _expected(before, new))


def test_tensor_held_elsewhere_is_not_modified():
    state = {"J": torch.zeros(5, 3, 2)}
    held = state["J"]
    new = _new_rows()
    _put(state, J=new)
    assert state["J"] is not held
    assert torch.equal(held, torch.zeros(5, 3, 2))
    assert torch.equal(state["J"], _expected(torch.zeros(5, 3, 2), new))


def test_viewed_tensor_is_not_modified():
    state = {"J": torch.zeros(5, 3, 2)}
    view = state["J"][1]  # shares the storage, not the Python object
    new = _new_rows()
    _put(state, J=new)
    assert torch.equal(view, torch.zeros(3, 2))
    assert torch.equal(state["J"], _expected(torch.zeros(5, 3, 2), new))


def test_numpy_memory_is_not_modified():
    a = np.zeros((5, 3, 2), dtype=np.float32)
    state = {"J": torch.from_numpy(a)}  # the state's only Python reference
    new = _new_rows()
    _put(state, J=new)
    assert np.array_equal(a, np.zeros((5, 3, 2)))
    assert torch.equal(state["J"], _expected(torch.zeros(5, 3, 2), new))


def test_tensor_of_autograd_graph_is_not_modified():
    leaf = torch.zeros(5, 2, requires_grad=True)
    state = {"x": leaf * 1.0}
    before = state["x"].detach().clone()
    ident = id(state["x"])
    new = _new_rows((2, 2))
    _put(state, x=new)
    assert id(state["x"]) != ident
    assert torch.equal(state["x"].detach(), _expected(before, new))


def test_shared_keys_written_with_different_values_stay_apart():
    shared = torch.zeros(5, 3)
    state = {"f": shared, "f_true": shared}
    del shared
    v1, v2 = _new_rows((2, 3)), -_new_rows((2, 3))
    _put(state, f=v1, f_true=v2)
    assert torch.equal(state["f"], _expected(torch.zeros(5, 3), v1))
    assert torch.equal(state["f_true"], _expected(torch.zeros(5, 3), v2))


def test_shared_keys_written_with_one_value_stay_shared():
    shared = torch.zeros(5, 3)
    state = {"f": shared, "f_true": shared}
    del shared
    v = _new_rows((2, 3))
    _put(state, f=v, f_true=v)
    assert state["f"] is state["f_true"]
    assert torch.equal(state["f"], _expected(torch.zeros(5, 3), v))


def test_shared_key_not_written_keeps_its_values():
    shared = torch.zeros(5, 3)
    state = {"f": shared, "f_true": shared}
    del shared
    v = _new_rows((2, 3))
    _put(state, f=v)
    assert torch.equal(state["f_true"], torch.zeros(5, 3))
    assert torch.equal(state["f"], _expected(torch.zeros(5, 3), v))


def test_tensor_with_remembered_count_is_not_modified():
    from torchimize_scipy._engine.counts import count_true

    state = {"fresh": torch.zeros(5, dtype=torch.bool)}
    held_count = count_true(state["fresh"])  # remembered on the tensor: 0
    ident = id(state["fresh"])
    _put(state, fresh=torch.ones(2, dtype=torch.bool))
    assert id(state["fresh"]) != ident  # a new tensor, counted anew
    assert held_count == 0
    assert count_true(state["fresh"]) == 2


def test_tensor_with_host_copy_is_not_modified():
    from torchimize_scipy._engine.host_scalars import Scalars

    state = {"nfev": torch.zeros(5, dtype=torch.long)}
    hs = Scalars(state["nfev"])
    before, = hs.view(state["nfev"])  # a small tensor's host copy, kept on the tensor
    _put(state, nfev=torch.ones(2, dtype=torch.long))
    after, = hs.view(state["nfev"])
    assert np.array_equal(np.asarray(before), np.zeros(5))
    assert np.array_equal(np.asarray(after), [0, 1, 0, 1, 0])


def _viewed_on_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its host rows remembered, as 'trf' reads a batch's J (a numpy view)."""
    from torchimize_scipy._engine.host_scalars import Scalars

    Scalars(t).rows(t)
    return t


def test_merged_tensor_viewed_on_host_is_written_in_place():
    """A tensor an earlier put made (torch's memory, marked) whose host rows are a view
    of that memory is written in place, and the view shows the new rows."""
    from torchimize_scipy._engine.host_scalars import host_rows

    zeros = torch.zeros(5, 3, 2, dtype=torch.float64)
    state = {"J": zeros}
    first = _new_rows().double()
    _put(state, J=first)  # (zeros is held here: merged out of place, marked)
    assert state["J"] is not zeros
    _viewed_on_host(state["J"])
    ident = id(state["J"])
    second = -_new_rows().double()
    _put(state, J=second)
    assert id(state["J"]) == ident
    assert torch.equal(state["J"], _expected(zeros, second))
    np.testing.assert_array_equal(host_rows(state["J"]), state["J"].numpy())


def test_numpy_memory_viewed_on_host_is_not_modified():
    """Memory from numpy (the caller's jac) stays untouched even once viewed on the host."""
    a = np.zeros((5, 3, 2))
    state = {"J": _viewed_on_host(torch.from_numpy(a))}
    _put(state, J=_new_rows().double())
    assert np.array_equal(a, np.zeros((5, 3, 2)))


def test_merged_tensor_whose_host_view_is_held_is_not_modified():
    from torchimize_scipy._engine.host_scalars import host_rows

    state = {"J": torch.zeros(5, 3, 2, dtype=torch.float64)}
    keep = state["J"]
    _put(state, J=_new_rows().double())
    del keep
    held = host_rows(_viewed_on_host(state["J"]))  # someone still reads these values
    before = held.copy()
    ident = id(state["J"])
    _put(state, J=-_new_rows().double())
    assert id(state["J"]) != ident
    np.testing.assert_array_equal(held, before)


def test_tensor_with_a_host_copy_of_its_rows_is_not_modified():
    from torchimize_scipy._engine.host_scalars import remember_rows

    state = {"J": torch.zeros(5, 3, 2, dtype=torch.float64)}
    keep = state["J"]
    _put(state, J=_new_rows().double())  # merged out of place, marked
    del keep
    copy = state["J"].numpy().copy()
    remember_rows(state["J"], copy)  # a private copy: in place, it would go stale
    del copy
    ident = id(state["J"])
    _put(state, J=-_new_rows().double())
    assert id(state["J"]) != ident


def test_batch_dogbox_rows_agree_with_single_calls():
    """Regression: an in-place write into a small state tensor whose host copy was kept on
    it left that copy stale, and one row of this batch stopped at a wrong point (found by
    benchmarks/engine_ab.py, cost 0.93 too high)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _parity import assert_cost_close
    from test_parity import PROBLEMS

    from torchimize_scipy import batch_least_squares, least_squares

    fun, _, x0, bounds, _, _, _ = PROBLEMS["gauss_peak_bounded"]
    x0a = np.array(x0, float)
    rng = np.random.default_rng(len("gauss_peak_bounded"))
    X0 = x0a + 0.05 * rng.standard_normal((6, x0a.size))
    lb, ub = (np.broadcast_to(np.asarray(v, float), x0a.shape) for v in bounds)
    X0 = np.clip(X0, np.nextafter(lb, ub), np.nextafter(ub, lb))
    X0[0] = x0a
    X0[3, 0] = np.nan  # fails alone, at its start
    res = batch_least_squares(lambda x: fun(x), X0, bounds=bounds, method="dogbox",
                              vectorized=False)
    assert res.status[3] == 5 and np.isnan(res.x[3]).any()
    for i in (0, 1, 2, 4, 5):
        ref = least_squares(fun, X0[i], bounds=bounds, method="dogbox")
        assert_cost_close(res.cost[i], ref.cost)


def test_small_tensor_is_merged_out_of_place_by_default(monkeypatch):
    monkeypatch.setattr(loop, "IN_PLACE_MIN", 32768)
    state = {"J": torch.zeros(5, 3, 2)}  # 30 entries: the copy is cheaper than the checks
    ident = id(state["J"])
    new = _new_rows()
    _put(state, J=new)
    assert id(state["J"]) != ident
    assert torch.equal(state["J"], _expected(torch.zeros(5, 3, 2), new))
    big = {"J": torch.zeros(6000, 3, 2)}  # 36,000 entries: in place
    ident = id(big["J"])
    _put(big, J=new)
    assert id(big["J"]) == ident
    assert torch.equal(big["J"][ROWS], new)
