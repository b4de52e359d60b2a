"""Every ```python block of README.md runs as written (on a CPU-only machine too)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"),
                    flags=re.S | re.M)


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("k", range(len(BLOCKS)))
def test_readme_block_runs(k, capsys):
    """Each block runs in a fresh namespace; a result named ``res`` must be a success."""
    namespace: dict = {"__name__": f"readme_block_{k}"}
    exec(compile(BLOCKS[k], f"README.md python block {k}", "exec"), namespace)  # noqa: S102
    res = namespace.get("res")
    if res is not None:
        success = res.success
        success = success.cpu().numpy() if isinstance(success, torch.Tensor) else success
        assert np.all(success)
