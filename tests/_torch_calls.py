"""Test helper: the names of the torch functions a block of code calls."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch.overrides import TorchFunctionMode


class _Record(TorchFunctionMode):
    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = names

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@contextmanager
def recorded_torch_calls() -> Iterator[list[str]]:
    """``with recorded_torch_calls() as names:`` fills ``names`` with each torch call's name."""
    names: list[str] = []
    with _Record(names):
        yield names
