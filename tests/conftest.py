"""Fixtures shared by several test modules.

The suite runs MKL in its Conditional Numerical Reproducibility mode
(``MKL_CBWR=AUTO,STRICT``, unless the environment sets another), set here before
torch loads MKL: MKL's default kernels round a matrix that does not start on a
16-byte boundary differently (on some CPUs a 64-byte one), and the tests that
hold a batch cut into other chunks to the same bits (``docs/parity.md``) must
not depend on where a problem's matrices fall in memory.
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def two_threads():
    """torch at two threads for the test (the thread-hold tests need more than one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)
