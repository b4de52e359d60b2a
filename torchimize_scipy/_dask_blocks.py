"""The blocks of a dask batch: per-problem inputs cut into blocks, one task per block.

Used by :mod:`torchimize_scipy.dask`: the per-problem inputs of a call (dask,
numpy or torch arrays with the batch axis first) become *leaves* cut into the
blocks of the first dask input; each block is one task that runs the
in-memory function on that block's rows and returns numpy arrays, which are
assembled into lazy dask arrays of the result fields.
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Callable
from typing import Any

import dask
import dask.array as da
import numpy as np
import torch
from dask.highlevelgraph import HighLevelGraph

from ._arrays import _torch_dtype
from ._dask_workers import prepare_worker


class BlockError(RuntimeError):
    """A block of problems raised an exception whose type cannot carry the problem range.

    Exceptions that can be rebuilt from a message keep their type, with the
    range of problem indices appended to the message.
    """


# ---------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------
class _Leaf:
    """Placeholder for the ``index``-th per-problem input in the static arguments."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class _Leaves:
    """The per-problem inputs of one call, cut into the same blocks of problems."""

    def __init__(self, B: int) -> None:
        self.B = B
        self.arrays: list[Any] = []
        self.order: list[int] = []

    def take(self, a: Any) -> _Leaf:
        self.arrays.append(a)
        return _Leaf(len(self.arrays) - 1)

    def lead_order(self, first: list[_Leaf]) -> None:
        """Look for the blocks in these inputs first (then in the order taken)."""
        self.order = [leaf.index for leaf in first]

    def blocks(self) -> tuple[tuple[int, ...], list[np.ndarray]]:
        """The batch chunks and, per input, its per-block delayed values."""
        order = self.order + [i for i in range(len(self.arrays)) if i not in self.order]
        lead = next((self.arrays[i] for i in order if _is_dask(self.arrays[i])), None)
        if lead is None:
            raise ValueError("no per-problem input is a dask array; call "
                             "torchimize_scipy.batch_least_squares / batch_curve_fit.")
        chunks = tuple(int(c) for c in lead.chunks[0])
        out = []
        for a in self.arrays:
            if not _is_dask(a):
                a = np.asarray(_host(a))
                a = da.from_array(a, chunks=(chunks,) + a.shape[1:])
            a = a.rechunk({0: chunks, **{ax: -1 for ax in range(1, a.ndim)}})
            out.append(a.to_delayed(optimize_graph=False).reshape(-1))
        return chunks, out


def _build(solve_block: Callable, static: dict, leaves: _Leaves,
           fields: dict[str, tuple | None]) -> tuple[dict[str, Any], list]:
    """One task per block running ``solve_block``; each field a dask array of its blocks.

    Returns the fields (None where ``fields`` says so) and the block tasks
    (delayed dicts of numpy arrays, in order).
    """
    chunks, per_leaf = leaves.blocks()
    token = uuid.uuid4().hex
    wanted = {k: v for k, v in fields.items() if v is not None}
    static_d = dask.delayed(static, traverse=True, pure=False)
    tasks = [dask.delayed(_run_block, pure=False)(
        solve_block, static_d, start, start + size, [blocks[k] for blocks in per_leaf], wanted,
        dask_key_name=f"torchimize-block-{token}-{k}")
        for k, (start, size) in enumerate(zip(np.cumsum((0,) + chunks[:-1]).tolist(), chunks,
                                               strict=True))]
    out: dict[str, Any] = dict.fromkeys(fields)
    for field, (tail, dt) in wanted.items():
        name = f"torchimize-{field}-{token}"
        zeros = (0,) * len(tail)
        layer = {(name, k, *zeros): (operator.getitem, task.key, field)
                 for k, task in enumerate(tasks)}
        graph = HighLevelGraph.from_collections(name, layer, dependencies=tasks)
        out[field] = da.Array(graph, name, (chunks, *((c,) for c in tail)),
                              meta=np.empty((0,) * (1 + len(tail)), dtype=dt))
    return out, tasks


def _run_block(solve_block: Callable, static: dict, start: int, stop: int,
               blocks: list[np.ndarray], fields: dict) -> dict[str, np.ndarray]:
    """Solve one block; an exception names the problems the block held.

    On a ``distributed`` worker, the automatic worker settings come first
    (:func:`torchimize_scipy._dask_workers.prepare_worker`: its allocator,
    once, and torch's thread count).
    """
    prepare_worker()
    try:
        return solve_block(static, blocks, fields)
    except Exception as exc:
        message = f"{exc} [in the block of problems {start} to {stop - 1}]"
        try:
            renamed = type(exc)(message)
        except Exception:
            renamed = BlockError(message)
        if str(renamed) != message:
            renamed = BlockError(message)
        raise renamed from exc


def _on_device(opts: dict, blocks: list[np.ndarray], tree: Any,
               kwargs: dict) -> tuple[list, Any, dict]:
    """With ``device``: the blocks and the shared arrays of ``tree``/``kwargs`` as tensors there.

    ``fun`` then receives torch tensors on the worker's device, as in memory
    for torch input; without ``device`` everything stays numpy.
    """
    if opts["device"] is None:
        return blocks, tree, kwargs
    dev = torch.device(opts["device"])
    fdt = torch.float32 if _float_dtype(opts["dtype"]) == np.float32 else torch.float64

    def move(a: Any) -> Any:
        if isinstance(a, tuple):
            return tuple(move(e) for e in a)
        if isinstance(a, np.ndarray) and a.dtype.kind in "fiub":
            t = torch.as_tensor(a, device=dev)
            return t.to(fdt) if a.dtype.kind == "f" else t
        return a

    return ([move(b) for b in blocks], move(tree), {k: move(v) for k, v in kwargs.items()})


def _fill(a: Any, blocks: list[np.ndarray]) -> Any:
    return blocks[a.index] if isinstance(a, _Leaf) else a


def _cast(out: dict[str, Any], fields: dict) -> dict[str, np.ndarray]:
    """numpy arrays in the declared dtypes (those of the lazy arrays)."""
    cast = {}
    for name, (_, dt) in fields.items():
        value = out[name]
        if dt == np.dtype(object):
            cast[name] = np.array(list(value), dtype=object)
        else:
            cast[name] = np.asarray(_host(value)).astype(dt, copy=False)
    return cast


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _is_dask(a: Any) -> bool:
    return dask.is_dask_collection(a)


def _host(a: Any) -> Any:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a


def _ndim(a: Any) -> int:
    shape = getattr(a, "shape", None)
    if shape is None:
        return 0 if a is None or np.isscalar(a) else np.ndim(a)
    return len(shape)


def _rows(a: Any) -> float:
    shape = getattr(a, "shape", None)
    if shape is None:
        shape = np.shape(a)
    return shape[0] if len(shape) else -1


def _batch_shape(x0: Any, name: str) -> tuple[int, int]:
    if _ndim(x0) != 2:
        raise ValueError(f"`{name}` must have shape (B, n) for a batch.")
    B, n = x0.shape if hasattr(x0, "shape") else np.shape(x0)
    if np.isnan(B) or np.isnan(n):
        raise ValueError(f"`{name}` has unknown chunk sizes: call `{name}.compute_chunk_sizes()` "
                         "first.")
    return int(B), int(n)


def default_dtype(dtype: Any, *inputs: Any) -> Any:
    """``dtype``, else the in-memory default: float32 where the first torch tensor among
    ``inputs`` is float32 (the blocks reach the workers as numpy arrays, which would
    otherwise compute in float64), else None (float64)."""
    if dtype is not None:
        return dtype
    first = next((a for a in inputs if isinstance(a, torch.Tensor)), None)
    return torch.float32 if first is not None and first.dtype == torch.float32 else None


def _float_dtype(dtype: Any) -> np.dtype:
    if dtype is None:
        return np.dtype(np.float64)
    return np.dtype(np.float32) if _torch_dtype(dtype) == torch.float32 else np.dtype(np.float64)


def _no_progress(progress: Any) -> None:
    if progress:
        raise ValueError("`progress` is not supported with dask inputs: use "
                         "dask.diagnostics.ProgressBar or the distributed dashboard.")
