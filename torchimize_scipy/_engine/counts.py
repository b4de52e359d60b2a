"""Counts of true entries of per-problem masks, read from the device once per mask.

The engine decides "no row", "some rows" or "every row" from such counts
(one host read each, several masks gathered into one read where a stage
needs them together). A tensor that carries a count is never modified in
place (``loop.put`` writes rows in place only into tensors without such
attributes), so a count stays valid for as long as its mask object lives: :func:`count_true` keeps
it on the tensor object itself (an attribute, gone with the tensor), and a
mask that is asked for again, or whose count the engine knew when it built
it (:func:`remember`), costs no further read. A mask made anew (after
compaction, or by ``torch.where``) is counted again. In the same way
:func:`mark_finite` records a tensor known to be finite by construction
(the zero singular values of Gram rows, a Jacobian whose ``J^T J`` was
proven finite), whose finiteness test then needs no read, and
:func:`mark_unit` a scaling of ones (``x_scale`` of 1, the default), by which
:func:`times` multiplies by returning its argument (``v * 1`` is ``v``
exactly, so a mark lost to compaction or concatenation changes no value).
Residuals whose rows that were not finite the loop set to zero remember the
values as evaluated (:func:`remember_evaluated`).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: attribute names set on the engine's own tensors
_COUNT = "_tsc_true_count"
_FINITE = "_tsc_known_finite"
_UNIT = "_tsc_known_unit"
_EVALUATED = "_tsc_evaluated"


def count_true(mask: Tensor) -> int:
    """Number of true entries of ``mask`` (one host read the first time)."""
    count = getattr(mask, _COUNT, None)
    if count is None:
        count = mask.sum().tolist()
        setattr(mask, _COUNT, count)
    return count


def count_many(*masks: Tensor) -> list[int]:
    """:func:`count_true` of several ``(B,)`` masks with one host read."""
    counts = torch.stack(masks).sum(-1).tolist()
    for mask, count in zip(masks, counts, strict=True):
        setattr(mask, _COUNT, count)
    return counts


def known_count(mask: Tensor) -> int | None:
    """The count of ``mask`` if it is known (remembered or read before), else None (no read)."""
    return getattr(mask, _COUNT, None)


def remember(mask: Tensor, count: int) -> Tensor:
    """Record that ``mask`` has ``count`` true entries; returns ``mask``."""
    setattr(mask, _COUNT, count)
    return mask


def mark_finite(t: Tensor) -> Tensor:
    """Record that every entry of ``t`` is finite (known without reading it); returns ``t``."""
    setattr(t, _FINITE, True)
    return t


def known_finite(t: Tensor) -> bool:
    """Whether :func:`mark_finite` recorded ``t`` (False means "not known", not "not finite")."""
    return getattr(t, _FINITE, False)


def mark_unit(t: Tensor) -> Tensor:
    """Record that every entry of ``t`` is 1 (a scaling that changes nothing); returns ``t``."""
    setattr(t, _UNIT, True)
    return t


def known_unit(t: Tensor | None) -> bool:
    """Whether :func:`mark_unit` recorded ``t`` (False means "not known")."""
    return getattr(t, _UNIT, False)


def times(d: Tensor | None, v: Tensor) -> Tensor:
    """``v * d`` (elementwise); ``v`` itself when ``d`` is None or marked as ones."""
    if d is None or getattr(d, _UNIT, False):
        return v
    return v * d


def remember_evaluated(zeroed: Tensor, evaluated: Tensor) -> Tensor:
    """``zeroed`` (residuals whose rows that were not finite are set to zero), remembering
    the residuals as evaluated (:func:`evaluated`)."""
    setattr(zeroed, _EVALUATED, evaluated)
    return zeroed


def evaluated(f: Tensor) -> Tensor:
    """The residuals as evaluated behind ``f`` (:func:`remember_evaluated`), or ``f``.

    For MINPACK's norm of a row that is not finite ('lm'), which depends on
    its NaN and infinite entries.
    """
    return getattr(f, _EVALUATED, f)


def forget_evaluated(f: Tensor) -> None:
    """Drop what :func:`remember_evaluated` kept on ``f`` (once the trial is assessed,
    so that a large batch's evaluated residuals do not live on with ``f``)."""
    if hasattr(f, _EVALUATED):
        delattr(f, _EVALUATED)
