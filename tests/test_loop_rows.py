"""``_engine.loop``'s row selections: ``gather_rows`` and the write-out's reads.

The batch loop selects whole rows of its per-problem tensors (compaction, row
views, the write-out of finished problems). From
:data:`~torchimize_scipy._engine.loop.NUMPY_ROWS_MIN` entries on, the rows
of a CPU tensor laid out in no order of its dimensions are copied by numpy's
``take`` instead of torch's ``index_select``; every move keeps a tensor's
layout (``row_layout``: a transposed Jacobian stays transposed). The tests
check the rows, the layout of the result, that the source is left alone, and
that a compacted tensor is still written in place by ``put``. The write-out
selects the rows of a value only for a result the caller keeps.
"""

from __future__ import annotations

import pytest
import torch

from torchimize_scipy._engine import loop
from torchimize_scipy._engine.loop import RowView, compact, gather_rows, put

B = 4096  # rows of 64 x 4: 1,048,576 entries, far above NUMPY_ROWS_MIN


def _big(dtype=torch.float64, shape=(B, 64, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.int64, torch.bool])
def test_gather_rows_takes_the_rows(dtype):
    t = _big(dtype)
    rows = torch.tensor([0, 5, 6, 4095, 17])
    out = gather_rows(t, rows)
    assert out.shape == (5, 64, 4) and out.dtype == dtype and out.is_contiguous()
    for i, r in enumerate(rows.tolist()):
        assert torch.equal(out[i], t[r])
    out.zero_()  # a copy: the source keeps its values
    assert torch.equal(t[5], _big(dtype)[5])


def test_gather_rows_of_a_transposed_batch_keeps_its_layout():
    t = _big(shape=(B * 8, 4, 4)).mT  # LAPACK's column-major inverses
    rows = torch.arange(0, B * 8, 3)
    out = gather_rows(t, rows)
    assert out.stride() == (16, 1, 4)  # (row_layout: the rows stay column-major)
    assert torch.equal(out[7], t[21])
    out.zero_()  # a copy: the source keeps its values
    assert torch.equal(t[21], _big(shape=(B * 8, 4, 4)).mT[21])


def test_gather_rows_of_a_strided_slice_takes_numpys_copy(monkeypatch):
    t = _big(shape=(B, 64, 8))[:, :, ::2]  # (laid out in no order of its dimensions)
    assert loop.row_layout(t) is None and not t.is_contiguous()
    taken = []
    real = loop.np.take
    monkeypatch.setattr(loop.np, "take", lambda *a, **k: taken.append(1) or real(*a, **k))
    rows = torch.tensor([3, 0, 4000])
    out = gather_rows(t, rows)
    assert taken == [1] and out.is_contiguous()
    for i, r in enumerate(rows.tolist()):
        assert torch.equal(out[i], t[r])


@pytest.mark.parametrize("shape", [(6, 5, 3), (B, 64, 4)])
def test_moves_of_rows_keep_a_transposed_layout(shape):
    """Compaction, merges (out of place) and appended rows keep the Jacobian's layout of
    finite differences, so that a moved row's products sum in the same order."""
    J = _big(shape=(shape[0], shape[2], shape[1])).mT
    layout = J.stride()
    state = {"J": J, "x": torch.zeros(shape[0], 3)}
    compact(state, torch.arange(0, shape[0], 2))
    kept = state["J"]
    assert kept.stride() == (layout[0], 1, shape[1]) and torch.equal(kept, J[::2])
    assert not kept._is_view()  # (a tensor of its own: put may write it in place)
    view = RowView(state, torch.tensor([1]))
    view["J"] = view["J"] * 2
    state["other"] = kept  # (held elsewhere too: merged out of place)
    put(state, torch.tensor([1]), view)
    assert state["J"].stride() == kept.stride() and not state["J"]._is_view()
    assert torch.equal(state["J"][1], 2 * J[2]) and torch.equal(state["J"][0], J[0])
    del state["other"]
    more = {"J": J[:2].clone(memory_format=torch.preserve_format),
            "x": torch.zeros(2, 3)}
    assert more["J"].stride() == J.stride()
    n = state["J"].shape[0]
    loop.concat(state, more)
    assert state["J"].stride() == (layout[0], 1, shape[1]) and not state["J"]._is_view()
    assert torch.equal(state["J"][n:], J[:2])


def test_a_compacted_transposed_jacobian_is_still_written_in_place():
    state = {"J": _big(shape=(B, 4, 64)).mT, "x": torch.zeros(B, 4)}
    compact(state, torch.arange(0, B, 2))
    ident, layout = id(state["J"]), state["J"].stride()
    rows = torch.tensor([1, 7])
    sub = RowView(state, rows)
    sub["J"] = sub["J"] + 1
    put(state, rows, sub)
    assert id(state["J"]) == ident and state["J"].stride() == layout


def test_small_or_autograd_tensors_stay_with_torch():
    small = torch.arange(12.0).reshape(6, 2)
    assert small.numel() < loop.NUMPY_ROWS_MIN
    assert torch.equal(gather_rows(small, torch.tensor([4, 1])), small[[4, 1]])
    leaf = _big(shape=(B, 64)).requires_grad_()
    out = gather_rows(leaf, torch.tensor([3, 2]))
    assert out.requires_grad and torch.equal(out.detach(), leaf.detach()[[3, 2]])


def test_compacted_tensor_is_still_written_in_place():
    state = {"J": _big(), "x": torch.zeros(B, 4)}
    compact(state, torch.arange(0, B, 2))
    assert state["J"].shape[0] == B // 2
    ident = id(state["J"])
    rows = torch.tensor([1, 7])
    sub = RowView(state, rows)
    sub["J"] = torch.full((2, 64, 4), 3.0, dtype=torch.float64)
    put(state, rows, sub)
    assert id(state["J"]) == ident  # written in place, not copied whole
    assert torch.equal(state["J"][7], torch.full((64, 4), 3.0, dtype=torch.float64))
    assert torch.equal(state["J"][2], _big()[4])


def _peaks(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return p[:, :1] * torch.exp(-(t - p[:, 1:2]) ** 2) + p[:, 2:3]


@pytest.mark.parametrize("return_jac", [False, True])
def test_write_out_selects_jacobian_rows_only_when_returned(monkeypatch, return_jac):
    from torchimize_scipy import batch_least_squares

    read: list[str] = []

    class Recording(RowView):
        def __missing__(self, key):
            read.append(key)
            return super().__missing__(key)

    monkeypatch.setattr(loop, "take", lambda state, rows: Recording(state, rows))
    t = torch.linspace(-2, 2, 20, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    p0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) + 0.3 * torch.rand(
        (40, 3), generator=g, dtype=torch.float64)
    p0[::7, 0] = 1.0  # problems that finish at different rounds: several write-outs
    res = batch_least_squares(_peaks, p0, args=(t,), method="lm", return_jac=return_jac)
    assert int((res.status > 0).sum()) == 40
    assert ("J" in read) == return_jac
    assert ("x" in read) and ("f_true" in read)


def test_deferred_keys_keep_their_rows_until_gathered():
    """``compact`` leaves the keys it is told to put off (a rule's trial does not read
    them) as they were, shared tensors included; ``gather_deferred`` then selects the
    same rows that compacting them at once would have."""
    J, f = _big(), _big(shape=(B, 64))
    state = {"J": J, "f": f, "f_true": f, "x": torch.arange(B * 4.0).reshape(B, 4)}
    keep = torch.arange(1, B, 3)
    deferred = compact(state, keep, ("J", "f", "f_true", "absent"))
    assert state["J"] is J and state["f"] is f and state["f_true"] is f
    assert torch.equal(state["x"], torch.arange(B * 4.0).reshape(B, 4)[keep])
    assert deferred is not None and deferred[1] == ("J", "f", "f_true")
    loop.gather_deferred(state, deferred)
    assert torch.equal(state["J"], J[keep]) and torch.equal(state["f"], f[keep])
    assert state["f"] is state["f_true"]  # (one gather for the shared tensor)
    assert compact(state, torch.arange(2), ()) is None


@pytest.mark.parametrize("reject", [False, True])
def test_lm_batch_whose_rows_finish_apart_matches_one_by_one(reject):
    """'lm' batches put off compacting ``J``, ``f`` and ``g`` (``trial_unread``): rows
    that finish at different iterations, with and without rows that reject a trial
    after others finished, give each problem its own solve's result."""
    import numpy as np

    from torchimize_scipy import batch_least_squares, least_squares

    t = torch.linspace(0.0, 3.0, 40, dtype=torch.float64)
    rng = np.random.default_rng(3)
    truth = np.column_stack([rng.uniform(1, 2, 24), rng.uniform(0.2, 1.5, 24)])
    y = truth[:, :1] * np.exp(-truth[:, 1:] * t.numpy()) + 0.01 * rng.standard_normal((24, 40))
    x0 = truth * (1 + 0.3 * rng.uniform(-1, 1, truth.shape))
    if reject:  # (far starts, whose steps are rejected while the near ones finish)
        x0[::2] = truth[::2] * rng.uniform(5.0, 20.0, (12, 2))

    def fun(p, yy):
        return p[:, :1] * torch.exp(-p[:, 1:] * t) - yy

    def jac(p, yy):
        e = torch.exp(-p[:, 1:] * t)
        return torch.stack([e, -p[:, :1] * t * e], dim=-1)

    res = batch_least_squares(fun, torch.as_tensor(x0), jac=jac, method="lm",
                              args=(torch.as_tensor(y),))
    assert len(set(np.asarray(res.nfev).tolist())) > 1  # rows finish apart
    for i in range(24):
        one = least_squares(lambda p, yy=y[i]: p[0] * np.exp(-p[1] * t.numpy()) - yy, x0[i],
                            jac=lambda p: np.column_stack(
                                [np.exp(-p[1] * t.numpy()),
                                 -p[0] * t.numpy() * np.exp(-p[1] * t.numpy())]),
                            method="lm")
        assert np.asarray(res.nfev)[i] == one.nfev
        np.testing.assert_allclose(np.asarray(res.x)[i], one.x, rtol=1e-9, atol=1e-12)
