"""Tests for torchimize_scipy._jacobian (finite-difference and autograd Jacobians)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _parity import ONE_EVAL_RTOL
from scipy.optimize._numdiff import _eps_for_method, approx_derivative

import torchimize_scipy._jacobian as jacobian_module
from torchimize_scipy._jacobian import (
    autograd_jacobian,
    default_rel_step,
    finite_difference_jacobian,
)

METHODS = ["2-point", "3-point", "cs"]
B, N, M = 6, 4, 5
RNG = np.random.default_rng(1234)
A = RNG.normal(size=(B, M, N))
C = RNG.normal(size=(B, M))


# ---------------------------------------------------------------- test problems
def f_np(x: np.ndarray, b: int) -> np.ndarray:
    """Residuals of problem ``b`` (real or complex ``x`` of shape (N,))."""
    return A[b] @ np.sin(x) + C[b] * np.exp(0.3 * x[0] * x[1]) + x[N - 1] ** 3 / (1 + x[2] ** 2)


def jac_np(x: np.ndarray, b: int) -> np.ndarray:
    J = A[b] * np.cos(x)[None, :]
    e = np.exp(0.3 * x[0] * x[1])
    J[:, 0] += C[b] * 0.3 * x[1] * e
    J[:, 1] += C[b] * 0.3 * x[0] * e
    J[:, 2] += -2 * x[2] * x[N - 1] ** 3 / (1 + x[2] ** 2) ** 2
    J[:, N - 1] += 3 * x[N - 1] ** 2 / (1 + x[2] ** 2)
    return J


class NumpyFun:
    """Batched ``fun(x, idx)`` evaluating :func:`f_np` row by row with NumPy.

    Using exactly the same floating-point evaluation as the SciPy reference makes the
    comparison bit-for-bit.  Records calls and optionally checks the bounds.
    """

    def __init__(self, lb=None, ub=None):
        self.calls = []
        self.lb, self.ub = lb, ub

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 2 and idx.shape == (x.shape[0],) and idx.dtype == torch.long
        self.calls.append((x.shape, x.dtype))
        xn, bn = x.numpy(), idx.numpy()
        if self.lb is not None:
            assert np.all(xn.real >= self.lb[bn]) and np.all(xn.real <= self.ub[bn])
        out = np.stack([f_np(row, int(b)) for row, b in zip(xn, bn, strict=True)])
        return torch.from_numpy(out)


def torch_fun(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The same residuals as :func:`f_np`, vectorised in torch (works for complex x)."""
    a = torch.from_numpy(A).to(x.device)[idx].to(x.dtype)
    c = torch.from_numpy(C).to(x.device)[idx].to(x.dtype)
    s = (a @ torch.sin(x)[..., None])[..., 0]
    return s + c * torch.exp(0.3 * x[:, :1] * x[:, 1:2]) + (x[:, -1:] ** 3) / (1 + x[:, 2:3] ** 2)


def make_x0() -> np.ndarray:
    x0 = RNG.normal(size=(B, N)) * 2
    x0[0, 0] = 0.0
    x0[2, 3] = 0.0
    x0[3, 1] = -0.0
    x0[4, 2] = 1.5e3
    x0[5, 0] = -7e2
    return x0


X0 = make_x0()


def make_bounds(kind: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Bounds of various difficulty around ``X0`` (distances scale with max(1, |x0|))."""
    if kind == "none":
        return None
    s = np.maximum(1.0, np.abs(X0))
    inf = np.full_like(X0, np.inf)
    cases = [
        (-inf, inf),  # free
        (X0, inf),  # on the lower bound
        (-inf, X0),  # on the upper bound
        (X0 - 1e-10 * s, X0 + 1e-3 * s),  # near lower
        (X0 - 1e-3 * s, X0 + 1e-10 * s),  # near upper
        (X0 - 1e-10 * s, X0 + 2e-10 * s),  # box narrower than any step
        (X0 - 3e-6 * s, X0 + 2e-6 * s),  # central 3-point step does not fit
        (X0, X0 + 5e-6 * s),  # on lb, 3-point one-sided with shrunk step
        (X0 - 1.0 * s, X0 + 1.0 * s),  # far
        (X0 - 2e-8 * s, X0 + 2e-8 * s),  # 2-point: flip is impossible, shrink
        (X0 - 1e-8 * s, inf),  # 2-point backward possible
    ]
    shift = {"mixed": 0, "mixed2": 5}[kind]
    lb, ub = np.empty_like(X0), np.empty_like(X0)
    for b in range(B):
        for j in range(N):
            lo, hi = cases[(b * N + j + shift) % len(cases)]
            lb[b, j], ub[b, j] = lo[b, j], hi[b, j]
    assert np.all(lb <= X0) and np.all(X0 <= ub)
    return lb, ub


REL_STEPS = {
    "none": None,
    "vec": np.array([1e-3, 0.0, 1e-20, 3e-7]),  # includes zero and vanishing steps
    "mat": RNG.uniform(1e-9, 1e-4, size=(B, N)),
}


def scipy_jac(method, rel_step, bounds, x0=X0):
    out = []
    for b in range(x0.shape[0]):
        rs = None if rel_step is None else (rel_step[b] if rel_step.ndim == 2 else rel_step)
        bd = (-np.inf, np.inf) if bounds is None else (bounds[0][b], bounds[1][b])
        out.append(
            approx_derivative(
                lambda x, b=b: f_np(x, b), x0[b], method=method, rel_step=rs,
                f0=f_np(x0[b], b), bounds=bd,
            )
        )  # fmt: skip
    return np.stack(out)


def ours(fun, method, rel_step, bounds, x0=X0, idx=None):
    x = torch.from_numpy(x0)
    if idx is None:
        idx = torch.arange(x.shape[0])
    f0 = torch.from_numpy(np.stack([f_np(r, int(b)) for r, b in zip(x0, idx, strict=True)]))
    rs = None if rel_step is None else torch.from_numpy(rel_step)
    lb = ub = None
    if bounds is not None:
        lb, ub = torch.from_numpy(bounds[0]), torch.from_numpy(bounds[1])
    return finite_difference_jacobian(fun, x, f0, idx, method, rs, lb, ub)


# ------------------------------------------------------------- default steps
@pytest.mark.parametrize("method", METHODS)
def test_default_rel_step_matches_scipy(method):
    pairs = [
        (torch.float64, torch.float64, np.float64, np.float64),
        (torch.float32, torch.float32, np.float32, np.float32),
        (torch.float64, torch.float32, np.float64, np.float32),
        (torch.float32, torch.float64, np.float32, np.float64),
    ]
    for tx, tf, nx, nf in pairs:
        ref = float(_eps_for_method(nx, nf, method))
        assert default_rel_step(tx, tf, method) == pytest.approx(ref, rel=1e-6)
    assert default_rel_step(torch.float64, torch.float64, method) == float(
        _eps_for_method(np.float64, np.float64, method)
    )


def test_unknown_method():
    x = torch.zeros(1, 2, dtype=torch.float64)
    with pytest.raises(ValueError):
        finite_difference_jacobian(NumpyFun(), x, torch.zeros(1, 3), method="4-point")


# ---------------------------------------------------- bit-level scipy parity
@pytest.mark.parametrize("rel_key", list(REL_STEPS))
@pytest.mark.parametrize("bounds_kind", ["none", "mixed", "mixed2"])
@pytest.mark.parametrize("method", METHODS)
def test_matches_scipy_approx_derivative(method, bounds_kind, rel_key):
    bounds = make_bounds(bounds_kind)
    rel_step = REL_STEPS[rel_key]
    fun = NumpyFun(*(bounds if bounds is not None and method != "cs" else (None, None)))
    J = ours(fun, method, rel_step, bounds)
    J_ref = scipy_jac(method, rel_step, bounds)
    assert J.shape == (B, M, N) and J.dtype == torch.float64
    assert np.all(np.isfinite(J_ref))
    scale = np.abs(J_ref).max()
    # tight on purpose (an exception the parity policy allows): the same numpy function
    # at steps built from correctly rounded IEEE operations only, so nothing depends on
    # the CPU's kernels, and a looser bound could not tell two step rules apart
    np.testing.assert_allclose(J.numpy(), J_ref, rtol=1e-12, atol=1e-14 * scale)
    if rel_step is not None:
        return  # user steps up to 1e-3 |x| are deliberately inaccurate
    # Sanity: close to the analytic Jacobian as well.
    J_true = np.stack([jac_np(X0[b], b) for b in range(B)])
    tol = {"2-point": 1e-3, "3-point": 1e-3, "cs": 1e-10}[method]
    np.testing.assert_allclose(J.numpy(), J_true, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("method", ["2-point", "3-point"])
def test_bounds_edge_cases_scalar(method):
    # Single-variable problems exercising each branch of the bound adjustment, compared
    # with SciPy one by one: x0 on either bound, in a tiny box, and near a bound.
    x0 = np.array([1.0, 1.0, 1.0, 0.0, 0.0, -2.0, 5.0])[:, None]
    lb = np.array([1.0, -np.inf, 1.0 - 1e-12, -1e-9, 0.0, -2.0 - 1e-5, 5.0 - 1e-12])[:, None]
    ub = np.array([np.inf, 1.0, 1.0 + 1e-12, np.inf, 1e-20, -2.0 + 1e-7, 5.0 + 1e-4])[:, None]
    fun_np = lambda x: np.array([np.exp(x[0]), x[0] ** 3 - x[0]])  # noqa: E731

    def fun(x, idx):
        return torch.from_numpy(np.stack([fun_np(r) for r in x.numpy()]))

    f0 = torch.from_numpy(np.stack([fun_np(r) for r in x0]))
    J = finite_difference_jacobian(
        fun, torch.from_numpy(x0), f0, None, method, None, torch.from_numpy(lb),
        torch.from_numpy(ub),
    )  # fmt: skip
    for k in range(x0.shape[0]):
        ref = approx_derivative(fun_np, x0[k], method=method, bounds=(lb[k], ub[k]))
        np.testing.assert_allclose(J[k].numpy(), ref, rtol=1e-12, atol=0)


def test_inputs_not_mutated():
    x = torch.from_numpy(X0.copy())
    f0 = NumpyFun()(x, torch.arange(B))
    bounds = make_bounds("mixed")
    lb, ub = torch.from_numpy(bounds[0].copy()), torch.from_numpy(bounds[1].copy())
    rs = torch.full((N,), 1e-6, dtype=torch.float64)
    copies = [t.clone() for t in (x, f0, lb, ub, rs)]
    for method in METHODS:
        finite_difference_jacobian(NumpyFun(), x, f0, None, method, rs, lb, ub)
    for t, c in zip((x, f0, lb, ub, rs), copies, strict=True):
        assert torch.equal(t, c)


# ------------------------------------------------------------ torch functions
@pytest.mark.parametrize("bounds_kind", ["none", "mixed"])
@pytest.mark.parametrize("method", METHODS)
def test_torch_function_float64(method, bounds_kind):
    # A vectorised torch residual differs from NumPy's by a few ulps, amplified by 1/h;
    # with the tiny steps forced by narrow boxes (~1e-10) only ~1e-5 agreement is possible.
    bounds = make_bounds(bounds_kind)
    lb = ub = None
    if bounds is not None:
        lb, ub = torch.from_numpy(bounds[0]), torch.from_numpy(bounds[1])
    x = torch.from_numpy(X0)
    J = finite_difference_jacobian(torch_fun, x, torch_fun(x, torch.arange(B)), None, method,
                                   None, lb, ub)  # fmt: skip
    J_ref = scipy_jac(method, None, bounds)
    scale = np.abs(J_ref).max()
    if bounds is None or method == "cs":
        tol = {"2-point": 1e-7, "3-point": 1e-9, "cs": 1e-13}[method]
    else:
        tol = 1e-5
    np.testing.assert_allclose(J.numpy(), J_ref, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("method", METHODS)
def test_float32_sanity(method):
    x0 = RNG.uniform(-1.5, 1.5, size=(B, N))
    x = torch.from_numpy(x0).float()
    f0 = torch_fun(x, torch.arange(B))
    J = finite_difference_jacobian(torch_fun, x, f0, None, method)
    assert J.dtype == torch.float32 and J.shape == (B, M, N)
    J_true = np.stack([jac_np(x.double().numpy()[b], b) for b in range(B)])
    scale = np.abs(J_true).max()
    tol = {"2-point": 3e-3, "3-point": 3e-4, "cs": 1e-5}[method]
    np.testing.assert_allclose(J.double().numpy(), J_true, rtol=tol, atol=tol * scale)


# ---------------------------------------------------------- batching and calls
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_separate_calls(method):
    bounds = make_bounds("mixed2")
    rel_step = REL_STEPS["mat"]
    J = ours(NumpyFun(), method, rel_step, bounds)
    for b in range(B):
        sl = slice(b, b + 1)
        Jb = ours(
            NumpyFun(), method, rel_step[sl], (bounds[0][sl], bounds[1][sl]), X0[sl],
            torch.tensor([b]),
        )  # fmt: skip
        assert torch.equal(J[b], Jb[0])


def test_idx_selects_problem_data():
    perm = torch.tensor([4, 0, 3])
    x0 = X0[perm.numpy()]
    J_all = ours(NumpyFun(), "3-point", None, None)
    J_sub = ours(NumpyFun(), "3-point", None, None, x0, perm)
    assert torch.equal(J_sub, J_all[perm])


@pytest.mark.parametrize(
    ("method", "rows", "dtype"),
    [
        ("2-point", B * N, torch.float64),
        ("3-point", 2 * B * N, torch.float64),
        ("cs", B * N, torch.complex128),
    ],
)
def test_fun_called_once(method, rows, dtype):
    fun = NumpyFun()
    ours(fun, method, None, make_bounds("mixed"))
    assert fun.calls == [(torch.Size([rows, N]), dtype)]


@pytest.mark.parametrize(
    ("method", "calls", "dtype"),
    [("2-point", N, torch.float64), ("3-point", 2 * N, torch.float64),
     ("cs", N, torch.complex128)],
)
@pytest.mark.parametrize("bounds_kind", ["none", "mixed"])
def test_columnwise_calls_give_the_same_jacobian(monkeypatch, method, calls, dtype, bounds_kind):
    """Large batches perturb one column per call: same values, bit for bit."""
    bounds = make_bounds(bounds_kind)
    J_once = ours(NumpyFun(), method, REL_STEPS["mat"], bounds)
    monkeypatch.setattr(jacobian_module, "COLUMNWISE_ENTRIES", 0)
    fun = NumpyFun(*(bounds or (None, None)))
    J_cols = ours(fun, method, REL_STEPS["mat"], bounds)
    assert fun.calls == [(torch.Size([B, N]), dtype)] * calls
    assert torch.equal(J_cols, J_once)
    np.testing.assert_allclose(J_cols.numpy(), scipy_jac(method, REL_STEPS["mat"], bounds),
                               rtol=1e-12, atol=1e-12)


def test_complex_step_ignores_bounds():
    bounds = make_bounds("mixed")
    J_b = ours(NumpyFun(), "cs", None, bounds)
    J_free = ours(NumpyFun(), "cs", None, None)
    assert torch.equal(J_b, J_free)


# ----------------------------------------------------------------- autograd
def _row_fun(n: int, m: int):
    gen = torch.Generator().manual_seed(n * 100 + m)
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)

    def fun(x):
        return torch.tanh(x @ W.T) + (x**2).sum(-1, keepdim=True) * torch.arange(m)

    def jac(x):
        t = torch.tanh(x @ W.T)
        return (1 - t**2)[..., None] * W + 2 * x[:, None, :] * torch.arange(m)[None, :, None]

    return fun, jac


@pytest.mark.parametrize(("n", "m"), [(3, 7), (4, 4), (6, 2), (9, 1)])
@pytest.mark.parametrize("give_m", [False, True])
def test_autograd_jacobian(n, m, give_m):
    fun, jac = _row_fun(n, m)
    x = torch.randn(5, n, dtype=torch.float64, requires_grad=True)
    J = autograd_jacobian(fun, x, m if give_m else None)
    assert J.shape == (5, m, n) and not J.requires_grad
    torch.testing.assert_close(J, jac(x.detach()), rtol=ONE_EVAL_RTOL, atol=1e-13)


class _SquareNoVmap(torch.autograd.Function):
    """Elementwise x**2 with forward and reverse rules but no vmap support."""

    @staticmethod
    def forward(x):
        return x**2

    @staticmethod
    def setup_context(ctx, inputs, output):
        (ctx.x,) = inputs
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        return 2 * ctx.x * g

    @staticmethod
    def jvp(ctx, t):
        return 2 * ctx.x * t


class _SquareOldStyle(torch.autograd.Function):
    """Old-style Function (forward takes ctx): unsupported by torch.func."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


@pytest.mark.parametrize("op", [_SquareNoVmap, _SquareOldStyle])
@pytest.mark.parametrize(("n", "m"), [(2, 3), (3, 2)])
def test_autograd_jacobian_fallbacks(op, n, m):
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)

    def fun(x):
        return op.apply(x) @ W.T

    x = torch.randn(4, n, dtype=torch.float64)
    J = autograd_jacobian(fun, x)
    torch.testing.assert_close(J, 2 * x[:, None, :] * W[None], rtol=ONE_EVAL_RTOL, atol=1e-14)


@pytest.mark.parametrize("method", ["2-point", "3-point"])
def test_one_bound_only_and_scalar_rel_step(method):
    # lb only / ub only (the other side None) and a Python-float rel_step, vs SciPy.
    lb = X0 - 1e-9
    ub = X0 + 1e-9
    for lo, hi in [(lb, None), (None, ub)]:
        x = torch.from_numpy(X0)
        lo_t = None if lo is None else torch.from_numpy(lo)
        hi_t = None if hi is None else torch.from_numpy(hi)
        f0 = NumpyFun()(x, torch.arange(B))
        J = finite_difference_jacobian(NumpyFun(), x, f0, None, method, 1e-7, lo_t, hi_t)
        bounds = (
            np.full_like(X0, -np.inf) if lo is None else lo,
            np.full_like(X0, np.inf) if hi is None else hi,
        )
        J_ref = scipy_jac(method, np.full(N, 1e-7), bounds)
        np.testing.assert_allclose(J.numpy(), J_ref, rtol=1e-12, atol=0)


# ---- one float64 problem: the steps and quotients in numpy (_host_differences) ----------

def _one_problem_fun(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    a = x.numpy()
    return torch.from_numpy(np.stack([np.sin(a[:, 0]) * a[:, 1], a[:, 0] ** 3 - a[:, 2],
                                      np.exp(0.1 * a[:, 1]) + a[:, 2] ** 2], axis=1))


@pytest.mark.parametrize("method", ["2-point", "3-point"])
@pytest.mark.parametrize("bounds_kind", ["none", "tight", "upper_only"])
def test_one_problem_on_the_host_gives_the_tensor_paths_jacobian(monkeypatch, method,
                                                                 bounds_kind):
    from torchimize_scipy._engine import host_scalars

    # 0, a negative entry, entries on and next to the bounds (one-sided adjustments)
    x = torch.tensor([[0.0, -2.5, 1.0]], dtype=torch.float64)
    lb = ub = None
    if bounds_kind == "tight":
        lb = torch.tensor([[-1e-9, -2.5, 1.0 - 1e-12]], dtype=torch.float64)
        ub = torch.tensor([[1e-9, 3.0, 1.0]], dtype=torch.float64)
    elif bounds_kind == "upper_only":
        ub = torch.tensor([[0.0, np.inf, 1.0 + 1e-10]], dtype=torch.float64)
    f0 = _one_problem_fun(x, torch.zeros(1, dtype=torch.long))
    calls = []
    real = jacobian_module._host_differences
    monkeypatch.setattr(jacobian_module, "_host_differences",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    J = finite_difference_jacobian(_one_problem_fun, x, f0, None, method, None, lb, ub)
    assert calls == [1]
    monkeypatch.setattr(host_scalars, "HOST", False)  # (the tensor path)
    J_ref = finite_difference_jacobian(_one_problem_fun, x, f0, None, method, None, lb, ub)
    assert calls == [1]
    assert J.shape == J_ref.shape == (1, 3, 3) and J.stride() == J_ref.stride()
    scale = float(J_ref.abs().max())
    np.testing.assert_allclose(J.numpy(), J_ref.numpy(), rtol=0,
                               atol=64 * np.finfo(np.float64).eps * scale)


@pytest.mark.parametrize("case", ["batch", "float32", "cs", "rel_step"])
def test_other_cases_keep_the_tensor_path(monkeypatch, case):
    calls = []
    monkeypatch.setattr(jacobian_module, "_host_differences",
                        lambda *a, **k: calls.append(1))
    x = torch.tensor([[0.5, -2.5, 1.0]], dtype=torch.float64)
    method, rel_step = "2-point", None
    if case == "batch":
        x = x.repeat(2, 1)
    elif case == "float32":
        x = x.float()
    elif case == "cs":
        method = "cs"
    else:
        rel_step = 1e-6

    def fun(p, idx):
        return torch.stack([p[:, 0] * p[:, 1], p[:, 2] ** 2], dim=1)

    f0 = fun(x, torch.zeros(x.shape[0], dtype=torch.long))
    J = finite_difference_jacobian(fun, x, f0, None, method, rel_step)
    assert calls == []
    assert J.shape == (x.shape[0], 2, 3) and torch.isfinite(J).all()


def test_one_problem_on_the_host_keeps_the_functions_own_warnings():
    # the steps and quotients are taken with numpy's errors ignored, the user's function
    # is not: its overflow warns as it does under scipy
    def fun(x, idx):
        a = x.numpy()
        return torch.from_numpy(np.exp(1000.0 * a))

    x = torch.tensor([[0.0, 0.8]], dtype=torch.float64)  # (exp(800) overflows)
    f0 = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="overflow"):
        finite_difference_jacobian(fun, x, f0, None, "2-point")


def _rosen_scalar_ops(x):  # 0-d float32 tensors times Python floats (float64 tangents in jvp)
    return torch.stack([10.0 * (x[1] - x[0] ** 2), 1.0 - x[0]])


@pytest.mark.parametrize("method", ["trf", "dogbox", "lm"])
def test_autograd_float32_with_python_float_constants(method):
    """torch's forward mode gives such a function float64 tangents for float32 ``x``;
    the Jacobian is taken in ``x``'s dtype and the solve matches scipy's."""
    import scipy.optimize as so

    from torchimize_scipy import least_squares

    ref = so.least_squares(lambda x: _rosen_scalar_ops(torch.as_tensor(x)).numpy(),
                           [2.0, 2.0], method=method)
    res = least_squares(_rosen_scalar_ops, torch.tensor([2.0, 2.0]), jac="autograd",
                        method=method)
    assert res.x.dtype == torch.float32 and res.jac.dtype == torch.float32
    np.testing.assert_allclose(res.x.numpy(), ref.x, rtol=1e-5)
    J = autograd_jacobian(lambda X: torch.stack([_rosen_scalar_ops(r) for r in X]),
                          torch.tensor([[2.0, 2.0]]))
    assert J.dtype == torch.float32
