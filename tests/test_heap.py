"""``_engine.heap.keep_freed_memory``: glibc's thresholds raised for large CPU runs only.

A fake C library records the ``mallopt`` calls: a large CPU run raises the
mmap and trim thresholds and the last overlapping run sets them to glibc's
adaptive ceilings; small runs, other devices, ``ENABLED = False`` and a
process without glibc leave ``malloc`` alone. On glibc the real call succeeds
and a batch fitted inside it gives the results of one fitted outside.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchimize_scipy._engine import heap

CPU = torch.device("cpu")


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


@pytest.fixture
def fake(monkeypatch):
    lib = FakeLibc()
    monkeypatch.setattr(heap, "_libc", lib)
    monkeypatch.setattr(heap, "_active", 0)
    return lib


RAISED = [(heap.M_MMAP_THRESHOLD, heap.RUN_THRESHOLD), (heap.M_TRIM_THRESHOLD, heap.RUN_THRESHOLD)]
AFTER = [(heap.M_MMAP_THRESHOLD, heap.AFTER_MMAP), (heap.M_TRIM_THRESHOLD, heap.AFTER_TRIM)]


def test_large_cpu_run_raises_then_settles(fake):
    with heap.keep_freed_memory(CPU, heap.MIN_BYTES):
        assert fake.calls == RAISED
    assert fake.calls == RAISED + AFTER
    assert heap._active == 0


def test_overlapping_runs_settle_once(fake):
    with heap.keep_freed_memory(CPU, heap.MIN_BYTES):
        with heap.keep_freed_memory(CPU, 2 * heap.MIN_BYTES):
            assert fake.calls == RAISED
        assert fake.calls == RAISED  # the outer run still holds the raised thresholds
    assert fake.calls == RAISED + AFTER


def test_settles_when_the_run_raises(fake):
    with pytest.raises(ValueError), heap.keep_freed_memory(CPU, heap.MIN_BYTES):
        raise ValueError
    assert fake.calls == RAISED + AFTER and heap._active == 0


@pytest.mark.parametrize("device, nbytes", [(CPU, heap.MIN_BYTES - 1),
                                            (torch.device("meta"), heap.MIN_BYTES)])
def test_small_or_other_device_runs_leave_malloc_alone(fake, device, nbytes):
    with heap.keep_freed_memory(device, nbytes):
        pass
    assert fake.calls == []


def test_disabled_or_without_glibc_leaves_malloc_alone(fake, monkeypatch):
    monkeypatch.setattr(heap, "ENABLED", False)
    with heap.keep_freed_memory(CPU, heap.MIN_BYTES):
        pass
    monkeypatch.setattr(heap, "ENABLED", True)
    monkeypatch.setattr(heap, "_libc", False)
    with heap.keep_freed_memory(CPU, heap.MIN_BYTES):
        pass
    assert fake.calls == []


def _peaks(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return p[:, :1] * torch.exp(-(t - p[:, 1:2]) ** 2) + p[:, 2:3]


def test_batch_inside_a_raised_heap_gives_its_results(monkeypatch):
    from torchimize_scipy import batch_least_squares

    if not heap._glibc():
        pytest.skip("not glibc")
    t = torch.linspace(-2, 2, 30, dtype=torch.float64)
    p0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) + 0.2 * torch.rand(
        (64, 3), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    monkeypatch.setattr(heap, "ENABLED", False)
    plain = batch_least_squares(_peaks, p0, args=(t,), method="lm")
    monkeypatch.setattr(heap, "ENABLED", True)
    monkeypatch.setattr(heap, "MIN_BYTES", 0)  # (this small batch raises the thresholds too)
    kept = batch_least_squares(_peaks, p0, args=(t,), method="lm")
    assert heap._active == 0
    np.testing.assert_allclose(kept.x.numpy(), plain.x.numpy(), rtol=1e-12, atol=0)
    assert torch.equal(kept.nfev, plain.nfev) and torch.equal(kept.status, plain.status)
