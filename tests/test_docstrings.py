"""The examples in the public docstrings run and print what they claim."""

from __future__ import annotations

import doctest

import pytest

import torchimize_scipy._batch
import torchimize_scipy._curve_fit
import torchimize_scipy._least_squares

MODULES = [torchimize_scipy._least_squares, torchimize_scipy._batch,
           torchimize_scipy._curve_fit]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE
                             | doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
