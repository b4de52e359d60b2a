"""Test helper: the names of the torch functions a block of code calls."""
from __future__ import annotations

from collections.abc import Callable, Iterator
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


def top_level_package_ops(call: Callable[[], object], files: tuple[str, ...],
                          skip: frozenset[str] = frozenset()) -> int:
    """Top-level aten operations that ``call()`` issues from the given package files.

    An event counts when it is an ``aten::`` operation not nested in another
    (up to the innermost frame of the package), its innermost
    ``torchimize_scipy`` frame names one of ``files`` (substrings, e.g.
    ``"torchimize_scipy/_engine/"``) and its name is not in ``skip``: the rule
    ``benchmarks/bench_ops.py`` counts by.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        call()
    ops = 0
    for ev in prof.events():
        if not ev.name.startswith("aten::") or ev.name in skip:
            continue
        frame = ev.cpu_parent
        while frame is not None:
            if frame.name.startswith("aten::"):
                break  # nested in another operation
            if "torchimize_scipy/" in frame.name:
                ops += any(f in frame.name for f in files)
                break
            frame = frame.cpu_parent
    return ops
