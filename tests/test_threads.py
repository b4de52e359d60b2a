"""Concurrent calls from several threads give the results of sequential calls (issue 17).

Every method and every kind of Jacobian (a callable, '2-point', '3-point',
'autograd') of ``least_squares``, ``batch_least_squares`` and
``batch_curve_fit`` is first run once in the main thread, then from several
threads at once (released together by a barrier; half of them run the cases in
reverse order so that different Jacobians overlap as well as equal ones). A
concurrent call takes the same code path as its sequential twin, so the results
must be bit-identical; any difference means one thread disturbed another, as
forward-mode AD did before its lock (torch keeps its state per process). The
thread switch interval is shortened while the threads run, so that they
interleave often even on small problems.

Further tests: ``autograd_jacobian`` itself (forward mode looped and vmapped,
reverse mode, the ``torch.autograd.grad`` fallback) from several threads, and
the one-time preparation of forward AD, which must leave the warning filters of
other threads alone.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

import torchimize_scipy._jacobian as jacobian
from torchimize_scipy import batch_curve_fit, batch_least_squares, least_squares
from torchimize_scipy._jacobian import autograd_jacobian

THREADS = 3
METHODS = ["trf", "dogbox", "lm", "gn", "gd"]
JACS = ["callable", "2-point", "3-point", "autograd"]
T = torch.linspace(0.0, 2.0, 12, dtype=torch.float64)
B = 4  # problems per batch call
SWITCH_INTERVAL = 1e-5  # seconds; Python's default is 5e-3


# ============================================================================ problems
def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` noisy decays ``a exp(-k t)``: starting points ``(B, 2)``, data ``(B, m)``."""
    g = torch.Generator().manual_seed(seed)
    a = 0.5 + 1.5 * torch.rand(B, 1, generator=g, dtype=torch.float64)
    k = 0.3 + 1.7 * torch.rand(B, 1, generator=g, dtype=torch.float64)
    y = a * torch.exp(-k * T) + 0.01 * torch.randn(B, T.numel(), generator=g,
                                                   dtype=torch.float64)
    x0 = torch.cat([a, k], dim=1) * (0.8 + 0.4 * torch.rand(B, 2, generator=g,
                                                            dtype=torch.float64))
    return x0, y


def fun_1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Residuals of one problem, ``x (2,)``."""
    return x[0] * torch.exp(-x[1] * T) - y


def jac_1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    e = torch.exp(-x[1] * T)
    return torch.stack([e, -x[0] * T * e], dim=-1)


def fun_v(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Residuals of a batch, ``x (b, 2)``, ``y (b, m)``."""
    a, k = x.unbind(-1)
    return a[:, None] * torch.exp(-k[:, None] * T) - y


def jac_v(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    a, k = x.unbind(-1)
    e = torch.exp(-k[:, None] * T)
    return torch.stack([e, -a[:, None] * T * e], dim=-1)


def model(t: torch.Tensor, a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``batch_curve_fit`` model: ``a, k`` are ``(b, 1)`` columns."""
    return a * torch.exp(-k * t)


def model_jac(t: torch.Tensor, a: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    e = torch.exp(-k * t)
    return torch.stack([e, -a * t * e], dim=-1)


def options(method: str) -> dict[str, Any]:
    # gradient descent needs many evaluations; a budget keeps the test fast
    # and its status (max_nfev) is as deterministic as any other
    return {"max_nfev": 12} if method == "gd" else {}


def solver(api: str, method: str, jac: str, seed: int) -> Callable[[], tuple]:
    """A call of ``api`` on the problems of ``seed``; returns the arrays to compare."""
    x0, y = make_data(seed)
    opts = options(method)
    if api == "least_squares":
        jac_arg: Any = jac_1 if jac == "callable" else jac

        def call() -> tuple:
            res = least_squares(fun_1, x0[0], jac=jac_arg, method=method, args=(y[0],), **opts)
            return res.x, res.cost, res.fun, res.jac, res.nfev, res.njev, res.status

    elif api == "batch_least_squares":
        jac_arg = jac_v if jac == "callable" else jac

        def call() -> tuple:
            res = batch_least_squares(fun_v, x0, jac=jac_arg, method=method, args=(y,), **opts)
            return res.x, res.cost, res.fun, res.jac, res.nfev, res.njev, res.status

    else:
        jac_arg = model_jac if jac == "callable" else jac

        def call() -> tuple:
            popt, pcov, info, _, ier = batch_curve_fit(model, T, y, p0=x0, method=method,
                                                       jac=jac_arg, full_output=True, **opts)
            return popt, pcov, info["nfev"], info["fvec"], ier

    return call


def as_numpy(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def assert_identical(got: tuple, ref: tuple, label: str) -> None:
    assert len(got) == len(ref)
    for k, (g, r) in enumerate(zip(got, ref, strict=True)):
        if g is None or r is None:  # njev of 'lm' with finite differences
            assert g is r, f"{label}: output {k} is {g!r}, sequentially {r!r}"
            continue
        g, r = as_numpy(g), as_numpy(r)
        assert g.shape == r.shape, f"{label}: output {k} shape {g.shape} != {r.shape}"
        assert np.array_equal(g, r, equal_nan=True), (
            f"{label}: output {k} differs from the sequential call by up to "
            f"{np.nanmax(np.abs(g.astype(float) - r.astype(float)))}")


@contextmanager
def fast_switching() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def run_threads(work: Callable[[int], Any], threads: int = THREADS) -> list[Any]:
    """``work(i)`` in ``threads`` threads released together; results or exceptions."""
    barrier = threading.Barrier(threads)
    out: list[Any] = [None] * threads

    def target(i: int) -> None:
        try:
            barrier.wait()
            out[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            out[i] = exc

    pool = [threading.Thread(target=target, args=(i,)) for i in range(threads)]
    with fast_switching():
        for th in pool:
            th.start()
        for th in pool:
            th.join()
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out


# ============================================================================ the solvers
@pytest.mark.filterwarnings("ignore:Optimal parameters not found")  # 'gd' within 12 nfev
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("api", ["least_squares", "batch_least_squares", "batch_curve_fit"])
def test_concurrent_calls_equal_sequential(api, method):
    cases = [(jac, seed) for seed, jac in enumerate(JACS)]
    calls = {case: solver(api, method, *case) for case in cases}
    ref = {case: call() for case, call in calls.items()}

    def work(i: int) -> dict:
        order = cases if i % 2 == 0 else cases[::-1]
        return {case: calls[case]() for case in order}

    for got in run_threads(work):
        for case in cases:
            assert_identical(got[case], ref[case], f"{api}, {method}, jac={case[0]!r}")


# ============================================================================ autograd_jacobian
def peaks(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Sums of Gaussian peaks, ``p (B, 3K)`` -> ``(B, m)``: ``n = 3K`` against ``m``."""
    out = torch.zeros(p.shape[0], t.numel(), dtype=p.dtype)
    for q in p.view(p.shape[0], -1, 3).unbind(1):
        a, mu, s = q.unbind(-1)
        z = (t - mu[:, None]) / s[:, None]
        out = out + a[:, None] * torch.exp(-0.5 * z * z)
    return out


class _Square(torch.autograd.Function):
    """x**2 as a classic autograd Function: no forward mode, no torch.func support."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


def _points(B_: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(B_, n, generator=g, dtype=torch.float64)
    return p + torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64).repeat(n // 3)


JACOBIAN_CASES = {
    # n = 6 <= m = 40: forward mode, a loop of jvp
    "forward, loop": (lambda p: peaks(p, torch.linspace(-2, 2, 40, dtype=torch.float64)), 6),
    # n = 12 > SMALL_N: forward mode vmapped over the directions
    "forward, vmap": (lambda p: peaks(p, torch.linspace(-2, 2, 40, dtype=torch.float64)), 12),
    # n = 12 > m = 5: reverse mode
    "reverse": (lambda p: peaks(p, torch.linspace(-2, 2, 5, dtype=torch.float64)), 12),
    # forward and torch.func reverse mode fail: the torch.autograd.grad fallback
    "autograd.grad fallback": (
        lambda p: _Square.apply(peaks(p, torch.linspace(-2, 2, 12, dtype=torch.float64))), 6),
}


@pytest.mark.parametrize("name", list(JACOBIAN_CASES))
def test_autograd_jacobian_concurrent(name):
    fun, n = JACOBIAN_CASES[name]
    xs = [_points(32, n, seed) for seed in range(THREADS)]
    ref = [autograd_jacobian(fun, x) for x in xs]
    # the references are right (not only reproducible): central differences
    x = xs[0].clone()
    h = 1e-6
    for j in range(n):
        e = torch.zeros(n, dtype=torch.float64)
        e[j] = h
        fd = (fun(x + e) - fun(x - e)) / (2 * h)
        torch.testing.assert_close(ref[0][:, :, j], fd, rtol=1e-6, atol=1e-8)

    def work(i: int) -> list:
        # every thread differentiates every point set, starting at its own
        return [autograd_jacobian(fun, xs[(i + r) % THREADS]) for r in range(2 * THREADS)]

    for i, got in enumerate(run_threads(work)):
        for r, J in enumerate(got):
            assert torch.equal(J, ref[(i + r) % THREADS]), f"{name}: thread {i}, call {r}"


def test_autograd_jacobian_concurrent_with_reverse_mode():
    """Forward mode in some threads while reverse mode runs in the others."""
    t_long = torch.linspace(-2, 2, 40, dtype=torch.float64)
    t_short = torch.linspace(-2, 2, 5, dtype=torch.float64)
    x_fwd, x_rev = _points(32, 6, 11), _points(32, 12, 12)

    def fwd():
        return autograd_jacobian(lambda p: peaks(p, t_long), x_fwd)

    def rev():
        return autograd_jacobian(lambda p: peaks(p, t_short), x_rev)

    ref_fwd, ref_rev = fwd(), rev()

    def work(i: int) -> list:
        return [fwd() if i % 2 == 0 else rev() for _ in range(4)]

    for i, got in enumerate(run_threads(work)):
        for J in got:
            assert torch.equal(J, ref_fwd if i % 2 == 0 else ref_rev)


# ============================================================================ warning filters
def test_forward_ad_preparation_keeps_other_threads_filters(monkeypatch):
    """The one-time preparation must not replace the process-wide warning filters.

    ``warnings.catch_warnings`` (used before issue 17) saves the filter list on
    entry and puts it back on exit, so a filter that another thread adds
    meanwhile is lost. Here the preparation's loader adds a filter from another
    thread while it runs, and emits the torch.jit deprecation it hides.
    """
    added = ("ignore", None, UserWarning, None, 0)

    def loader():
        th = threading.Thread(
            target=lambda: warnings.filterwarnings("ignore", category=UserWarning))
        th.start()
        th.join()
        warnings.warn_explicit("`torch.jit.script` is deprecated", DeprecationWarning,
                               "_script.py", 1, module="torch.jit._script", registry={})

    monkeypatch.setattr(torch.autograd.forward_ad, "_maybe_load_decompositions", loader)
    monkeypatch.setattr(jacobian, "_forward_ad_ready", False)
    with warnings.catch_warnings(record=True) as caught:  # restores the test's filters
        warnings.simplefilter("always")
        filters = warnings.filters
        jacobian._prepare_forward_ad()
        assert warnings.filters is filters
        assert added in filters  # the other thread's filter survived
        assert not any(getattr(f[3], "pattern", f[3]) == r"torch\.jit" for f in filters)
        assert not [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert jacobian._forward_ad_ready
