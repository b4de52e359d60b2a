"""``jac='autograd'`` with a function written in numpy: a clear error (issue 11).

torch cannot differentiate through numpy; every formulation of
``autograd_jacobian`` (forward mode, reverse mode, their vmapped and looped
variants, ``torch.autograd.grad``) fails with one of torch's low-level messages
("Can't call numpy() on Tensor that requires grad", "Cannot access data
pointer of Tensor that doesn't have storage"). The user gets a ``ValueError``
that says what 'autograd' needs and names the alternatives, chained to torch's
error; errors that have nothing to do with numpy pass through unchanged.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from torchimize_scipy import batch_curve_fit, batch_least_squares, curve_fit, least_squares
from torchimize_scipy._jacobian import AUTOGRAD_NEEDS_TORCH, autograd_jacobian

T = np.linspace(0.0, 1.0, 10)
Y = 2.0 * np.exp(-1.5 * T)
MATCH = re.escape(AUTOGRAD_NEEDS_TORCH)

# numpy ufuncs applied to the tensors that `fun` receives (outside of autograd)
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")


def test_message_names_the_alternatives():
    for word in ("torch", "'2-point'", "'3-point'", "'cs'", "callable `jac`"):
        assert word in AUTOGRAD_NEEDS_TORCH


def assert_numpy_error(excinfo: pytest.ExceptionInfo) -> None:
    cause = excinfo.value.__cause__
    assert isinstance(cause, RuntimeError)
    assert "numpy" in str(cause) or "data pointer" in str(cause)


def test_least_squares():
    with pytest.raises(ValueError, match=MATCH) as excinfo:
        least_squares(lambda p: p[0] * np.exp(-p[1] * T) - Y, np.ones(2), jac="autograd")
    assert_numpy_error(excinfo)


def test_batch_least_squares():
    def fun(p, y):
        return p[:, :1] * np.exp(-p[:, 1:2] * T) - y

    with pytest.raises(ValueError, match=MATCH) as excinfo:
        batch_least_squares(fun, np.ones((3, 2)), jac="autograd", args=(np.tile(Y, (3, 1)),))
    assert_numpy_error(excinfo)


def test_batch_least_squares_lm_row_function():
    """A function of one point, vmapped: the vmap and loop fallbacks end in the same error."""
    with pytest.raises(ValueError, match=MATCH):
        batch_least_squares(lambda p: p[0] * np.exp(-p[1] * T) - Y, np.ones((3, 2)),
                            jac="autograd", method="lm", vectorized=False)


def test_curve_fit():
    with pytest.raises(ValueError, match=MATCH):
        curve_fit(lambda x, a, k: a * np.exp(-k * x), T, Y, p0=[1.0, 1.0], jac="autograd")


def test_batch_curve_fit():
    with pytest.raises(ValueError, match=MATCH):
        batch_curve_fit(lambda x, a, k: a * np.exp(-k * x), T, np.tile(Y, (3, 1)),
                        p0=np.ones((3, 2)), jac="autograd")


def test_forward_mode_path():
    """n <= m: forward mode first, then reverse mode, then ``torch.autograd.grad``."""
    x = torch.ones(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=MATCH) as excinfo:
        autograd_jacobian(lambda p: torch.as_tensor(p[:, :1].numpy() * T), x)
    assert_numpy_error(excinfo)


def test_reverse_mode_path():
    """n > m: reverse mode vmapped, looped, then ``torch.autograd.grad``."""
    x = torch.ones(4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=MATCH) as excinfo:
        autograd_jacobian(lambda p: torch.as_tensor(np.sin(p[:, :2])), x, m=2)
    assert_numpy_error(excinfo)


def test_other_errors_pass_through():
    def fun(p):
        raise RuntimeError("model diverged")

    with pytest.raises(RuntimeError, match="model diverged"):
        autograd_jacobian(fun, torch.ones(4, 2, dtype=torch.float64), m=3)


def test_torch_function_still_works():
    """The torch version of the same model is differentiated as before."""
    res = least_squares(lambda p: p[0] * torch.exp(-p[1] * torch.as_tensor(T))
                        - torch.as_tensor(Y), torch.ones(2, dtype=torch.float64),
                        jac="autograd")
    np.testing.assert_allclose(res.x.numpy(), [2.0, 1.5], rtol=1e-6)
