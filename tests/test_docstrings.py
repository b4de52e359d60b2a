"""The examples in the public docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib

import pytest

from torchimize_scipy import batch_curve_fit, batch_least_squares, curve_fit, least_squares

# The modules that define the public functions (wherever they live).
MODULES = list({importlib.import_module(f.__module__): None for f in
                (least_squares, batch_least_squares, curve_fit, batch_curve_fit)})
for _name in ("torchimize_scipy.dask", "torchimize_scipy.xarray"):  # optional extras
    try:
        MODULES.append(importlib.import_module(_name))
    except ImportError:
        pass


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE
                             | doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
