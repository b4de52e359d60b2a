"""Array namespaces at the boundary: what the caller passed, and what comes back.

The engine works on torch tensors only. At the boundary we remember which kind
of array the caller used (numpy or anything numpy-like, torch, or another
array-API library found through ``array-api-compat``) so that ``fun`` receives
and the result holds that same kind, as under scipy for numpy users.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as _sp
import torch
from scipy.sparse.linalg import LinearOperator as _LinearOperator

try:  # optional at import time; declared as a dependency
    import array_api_compat
except ImportError:  # pragma: no cover - exercised only without the dependency
    array_api_compat = None


@dataclass(frozen=True)
class Namespace:
    """Where the caller's arrays live.

    Attributes
    ----------
    kind : {'numpy', 'torch', 'xp'}
        ``'xp'`` is any other array-API library (reached through numpy on the host).
    device : torch.device
        Device the engine computes on.
    dtype : torch.dtype
        Floating dtype the engine computes in.
    xp : module or None
        The foreign namespace for ``kind == 'xp'``.
    """

    kind: str
    device: torch.device
    dtype: torch.dtype
    xp: Any = None

    # ---- engine -> caller -------------------------------------------------
    def to_user(self, t: torch.Tensor) -> Any:
        """Convert an engine tensor to the caller's array kind."""
        if self.kind == "torch":
            return t
        a = _host_numpy(t)
        if self.kind == "xp":
            return self.xp.asarray(a)
        return a

    def row_to_fun(self, t: torch.Tensor) -> Any:
        """Convert one point ``(n,)`` to what ``fun`` receives: a fresh copy.

        ``fun`` may write to its argument without touching the solver's state.
        """
        if self.kind == "torch":
            return t.clone()
        a = _host_numpy(t)
        a = a.astype(np.float64) if a.dtype == np.float32 else a.copy()
        if self.kind == "xp":
            return self.xp.asarray(a)
        return a

    # ---- caller -> engine -------------------------------------------------
    def from_user(self, a: Any, complex_ok: bool = False, what: str = "fun") -> torch.Tensor:
        """Convert an array returned by the caller's function to an engine tensor.

        ``what`` names that function in error messages. Complex values are
        refused unless ``complex_ok`` (complex-step differentiation evaluates
        ``fun`` at complex points on purpose): scipy requires real residuals
        and, given complex ones, casts them with a ``ComplexWarning`` into a
        meaningless result, so we stop with a ``ValueError`` instead.
        """
        if isinstance(a, torch.Tensor):
            t = a.detach()
            if t.layout != torch.strided:
                raise ValueError(_SPARSE_HERE.format(what=what))
        else:
            if _sparse_or_operator(a):
                raise ValueError(_SPARSE_HERE.format(what=what))
            arr = np.asarray(a)
            if arr.dtype == object:
                raise ValueError("`fun` and `jac` must return numeric array_like values.")
            arr = np.ascontiguousarray(arr)
            if not arr.flags.writeable:  # (torch warns of read-only memory; scipy does not)
                arr = arr.copy()
            t = torch.from_numpy(arr)
        if t.is_complex():
            if not complex_ok:
                dtype = a.dtype if isinstance(a, torch.Tensor) else np.asarray(a).dtype
                raise ValueError(
                    f"`{what}` returned complex values (dtype {dtype}); least-squares "
                    "residuals must be real. Write each complex residual r as the two real "
                    "residuals r.real and r.imag (e.g. return np.concatenate([r.real, "
                    "r.imag])), with a real Jacobian to match.")
            return t.to(device=self.device)
        return t.to(device=self.device, dtype=self.dtype)


#: a sparse or operator value where only a dense one can go (least_squares converts those
#: before they get here)
_SPARSE_HERE = ("`{what}` returned a sparse matrix or a linear operator where a dense array "
                "was expected: batch_least_squares takes them when its value at the first "
                "problem's start is one too, and curve_fit takes dense Jacobians only (for one "
                "sparsity structure shared by all problems pass `jac_sparsity` and a "
                "finite-difference `jac`).")


def _sparse_or_operator(a: Any) -> bool:
    """A scipy sparse matrix/array or a ``scipy.sparse.linalg.LinearOperator``."""
    return _sp.issparse(a) or isinstance(a, _LinearOperator)


#: CPU tensors of at most this many entries reach numpy through ``tolist`` (:func:`_host_numpy`)
_SMALL = 64
_NUMPY_OF = {torch.float64: np.float64, torch.float32: np.float32, torch.int64: np.int64,
             torch.int32: np.int32, torch.bool: np.bool_}


def host_view(t: torch.Tensor) -> np.ndarray:
    """numpy array of a tensor's values: a view of a CPU tensor that needs no grad
    (``Tensor.numpy``: four torch dispatches, against six for
    ``detach().cpu().numpy()``, which any other tensor takes)."""
    if t.device.type == "cpu" and not t.requires_grad:
        return t.numpy()
    return t.detach().cpu().numpy()


def _host_numpy(t: torch.Tensor) -> np.ndarray:
    """numpy array of a tensor's values on the host (a view, or a copy of a small one).

    The engine's tensors never require grad, and ``Tensor.numpy`` of a CPU
    tensor is then a view, without the ``detach``/``cpu`` calls (a few
    microseconds each, per field and per evaluation). A CPU tensor of at
    most :data:`_SMALL` entries is copied through ``tolist`` instead (exact,
    and cheaper than the four operations ``Tensor.numpy`` dispatches: one
    problem's result fields).
    """
    if t.device.type == "cpu" and not t.requires_grad:
        kind = _NUMPY_OF.get(t.dtype)
        if kind is not None and 0 < t.numel() <= _SMALL:
            return np.array(t.tolist(), dtype=kind)
        return t.numpy()
    return t.detach().cpu().numpy()


def is_torch(x: Any) -> bool:
    """True for torch tensors."""
    return isinstance(x, torch.Tensor)


def detect_namespace(x0: Any, device: Any = None, dtype: Any = None) -> Namespace:
    """Work out the caller's array kind and the engine's device and dtype.

    numpy arrays, lists and scalars give ``'numpy'`` with float64 on the CPU
    (as scipy casts ``x0`` to float); tensors keep their device and floating
    dtype (integers become float64); ``device=``/``dtype=`` override both.
    """
    tdtype = _torch_dtype(dtype) if dtype is not None else None
    if device is not None:
        device = _torch_device(device)
    if is_torch(x0):
        dev = device if device is not None else x0.device
        if tdtype is None:
            tdtype = x0.dtype if x0.is_floating_point() else torch.float64
            _check_engine_dtype(tdtype, "`x0` has dtype")
        return Namespace("torch", dev, tdtype)
    xp = None
    kind = "numpy"
    if array_api_compat is not None and not isinstance(x0, (list, tuple, int, float)):
        try:
            ns = array_api_compat.array_namespace(x0)
        except TypeError:
            ns = None
        if ns is not None and not array_api_compat.is_numpy_namespace(ns):
            kind, xp = "xp", ns
    dev = device if device is not None else torch.device("cpu")
    return Namespace(kind, dev, tdtype or torch.float64, xp)


def _torch_device(device: Any) -> torch.device:
    """``device=`` as a torch device, with a ``ValueError`` naming it where torch has no
    such device (not torch's ``AssertionError`` from deep inside the first copy)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"`device`={device!r} is not a torch device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device`={device!r}: torch has no CUDA device here "
                         "(torch.cuda.is_available() is False).")
    return dev


#: Dtypes the engine computes in: torch's linear algebra has no half precision.
ENGINE_DTYPES = (torch.float32, torch.float64)


def _check_engine_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in ENGINE_DTYPES:
        raise ValueError(
            f"{what} {dtype}; the solvers compute in torch.float32 or torch.float64 "
            "(torch's linear algebra has no half precision): pass dtype=torch.float32.")


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError("`dtype` must be a real floating dtype.")
        _check_engine_dtype(dtype, "`dtype` is")
        return dtype
    np_dtype = np.dtype(dtype)
    table = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32,
             np.dtype(np.float16): torch.float16}
    if np_dtype not in table:
        raise ValueError("`dtype` must be a real floating dtype.")
    _check_engine_dtype(table[np_dtype], "`dtype` is")
    return table[np_dtype]


def to_host(a: Any) -> Any:
    """The one host-array helper: tensors (also inside lists and tuples) to numpy.

    Anything else is returned unchanged, so that a later ``np.asarray(...,
    dtype=float)`` refuses what numpy refuses (a complex scalar raises
    instead of being silently cast).
    """
    if is_torch(a):
        t = a.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16
            t = t.float()
        return t.numpy()
    if isinstance(a, list | tuple) and any(isinstance(e, torch.Tensor | list | tuple)
                                           for e in a):
        return [to_host(e) for e in a]
    return a


def as_numpy(a: Any) -> np.ndarray:
    """Host numpy view of any supported array (see :func:`to_host`)."""
    return np.asarray(to_host(a))
