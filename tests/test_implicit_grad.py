"""Gradients through the solution (issue 15): implicit differentiation.

Every gradient is compared with central differences of fully re-solved
problems. Each re-solve is polished by a few Newton steps on the exact cost
(``torch.func.hessian``), so the reference solutions are accurate to rounding
and the differences' error is the step's truncation error, O(h**2): with
h = 1e-4 and costs of unit size, about 1e-8 relative, hence the tolerance
``FD_RTOL`` (relative to the largest derivative).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tests._parity import assert_close_scaled
from torchimize_scipy import batch_least_squares, least_squares

T = torch.linspace(0.0, 3.0, 30, dtype=torch.float64)
TIGHT = dict(xtol=1e-15, ftol=1e-15, gtol=1e-15)
#: central differences with step H_FD, against the implicit gradient
H_FD = 1e-4
FD_RTOL = 1e-6
METHODS = ["trf", "dogbox", "lm"]


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def data(theta):
    """Exp-decay data with a nonzero residual: theta = (amplitude, rate, wiggle)."""
    return theta[0] * torch.exp(-theta[1] * T) + theta[2] * torch.sin(7 * T)


def expfit(x, y):
    return x[0] * torch.exp(-x[1] * T) - y


def cost_of(resid, loss="linear", f_scale=1.0):
    """The exact cost ``0.5 sum rho`` of scipy's definition, for the Newton polish."""
    def cost(x):
        f = resid(x)
        if loss == "linear":
            return 0.5 * (f * f).sum()
        z = (f / f_scale) ** 2
        rho = {"soft_l1": lambda z: 2 * ((1 + z) ** 0.5 - 1),
               "cauchy": torch.log1p}[loss](z)
        return 0.5 * f_scale**2 * rho.sum()
    return cost


def polish(cost, x, free=None, steps=6):
    """Newton steps on ``cost`` from ``x`` (only the ``free`` variables move)."""
    x = x.detach().clone()
    free = torch.ones_like(x, dtype=torch.bool) if free is None else free
    idx = torch.nonzero(free).flatten()
    for _ in range(steps):
        g = torch.func.grad(cost)(x)[idx]
        H = torch.func.hessian(cost)(x)[idx][:, idx]
        x[idx] = x[idx] - torch.linalg.solve(H, g)
    return x


def central_differences(objective, theta, h=H_FD):
    """d objective / d theta by central differences (objective re-solves)."""
    out = torch.zeros_like(theta)
    for i in range(theta.numel()):
        tp, tm = theta.clone(), theta.clone()
        tp[i] += h
        tm[i] -= h
        out[i] = (objective(tp) - objective(tm)) / (2 * h)
    return out


def assert_grad_close(got, ref, rtol=FD_RTOL):
    ref_t = torch.as_tensor(ref)
    scale = float(ref_t.abs().max()) + 1e-300
    assert torch.isfinite(torch.as_tensor(got)).all()
    assert_close_scaled(got, ref, rtol, scale=np.full(tuple(ref_t.shape), scale))


THETA = torch.tensor([2.0, 0.7, 0.05], dtype=torch.float64)
W = torch.tensor([1.0, -2.0], dtype=torch.float64)


def _solve_exp(theta, method, **kw):
    return least_squares(expfit, torch.tensor([1.0, 1.0]), args=(data(theta),), method=method,
                         jac="autograd", **TIGHT, **kw)


# ------------------------------------------------------------ unbounded
@pytest.mark.parametrize("method", METHODS)
def test_unbounded_matches_central_differences(method):
    theta = THETA.clone().requires_grad_(True)
    res = _solve_exp(theta, method)
    (res.x @ W).backward()

    def objective(th):
        y = data(th)
        x = _solve_exp(th, method).x
        return polish(cost_of(lambda x: expfit(x, y)), x) @ W

    with torch.no_grad():
        ref = central_differences(objective, THETA)
    assert_grad_close(theta.grad, ref)


@pytest.mark.parametrize("method", METHODS)
def test_finite_difference_jacobian_solve_gives_the_same_gradient(method):
    # the forward solve with jac='2-point' stops a little off x* (about 1e-9):
    # the implicit gradient moves by that order only
    theta = THETA.clone().requires_grad_(True)
    res = least_squares(expfit, torch.tensor([1.0, 1.0]), args=(data(theta),), method=method)
    (res.x @ W).backward()
    theta2 = THETA.clone().requires_grad_(True)
    (_solve_exp(theta2, method).x @ W).backward()
    assert_grad_close(theta.grad, theta2.grad, rtol=1e-6)


def test_full_hessian_not_gauss_newton():
    """The exp fit has nonzero residuals: the Gauss-Newton implicit gradient differs."""
    theta = THETA.clone().requires_grad_(True)
    res = _solve_exp(theta, "trf")
    (res.x @ W).backward()
    x = res.x.detach()
    y = data(THETA)
    J = torch.func.jacrev(lambda x: expfit(x, y))(x)  # (m, n)
    dg_dy = -J.T  # g = J^T (f(x) - y): dg/dy = -J^T
    dy_dtheta = torch.func.jacrev(data)(THETA)  # (m, 3)
    gn = -(W @ torch.linalg.solve(J.T @ J, dg_dy @ dy_dtheta))
    rel = float((gn - theta.grad).abs().max() / theta.grad.abs().max())
    assert rel > 1e-3  # measured 3.6e-3: the second-order residual terms matter
    with torch.no_grad():
        ref = central_differences(
            lambda th: polish(cost_of(lambda x: expfit(x, data(th))),
                              _solve_exp(th, "trf").x) @ W, THETA)
    assert_grad_close(theta.grad, ref)


def test_cost_and_fun_are_differentiable():
    theta = THETA.clone().requires_grad_(True)
    res = _solve_exp(theta, "trf")
    gc, = torch.autograd.grad(res.cost, theta, retain_graph=True)
    gf, = torch.autograd.grad(res.fun.sum(), theta)

    def solved(th):
        y = data(th)
        return y, polish(cost_of(lambda x: expfit(x, y)), _solve_exp(th, "trf").x)

    with torch.no_grad():
        ref_c = central_differences(lambda th: 0.5 * (expfit(solved(th)[1], data(th)) ** 2)
                                    .sum(), THETA)
        ref_f = central_differences(lambda th: expfit(solved(th)[1], data(th)).sum(), THETA)
    assert_grad_close(gc, ref_c)
    assert_grad_close(gf, ref_f)
    # values are the engine's, unchanged
    plain = _solve_exp(THETA, "trf")
    assert float(res.cost.detach()) == float(plain.cost)


def test_gradcheck():
    def solution(y):
        return least_squares(expfit, torch.tensor([1.0, 1.0]), args=(y,), jac="autograd",
                             **TIGHT).x

    y = data(THETA).clone().requires_grad_(True)
    assert torch.autograd.gradcheck(solution, (y,), eps=1e-4, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------ captured and module tensors
def test_captured_tensor_and_module_parameters():
    lin = torch.nn.Linear(1, 1)
    with torch.no_grad():
        lin.weight.fill_(0.8)
        lin.bias.fill_(0.1)
    y = data(THETA)

    def fun(x):  # lin is captured: its parameters shift the model
        return x[0] * torch.exp(-x[1] * T) + lin(T[:, None])[:, 0] - y

    res = least_squares(fun, torch.tensor([1.0, 1.0]), jac="autograd", **TIGHT)
    (res.x @ W).backward()
    got = torch.stack([lin.weight.grad[0, 0], lin.bias.grad[0]])

    def objective(wb):
        def f(x):
            return x[0] * torch.exp(-x[1] * T) + wb[0] * T + wb[1] - y
        x = least_squares(f, torch.tensor([1.0, 1.0]), jac="autograd", **TIGHT).x
        return polish(cost_of(f), x) @ W

    with torch.no_grad():
        ref = central_differences(objective, torch.tensor([0.8, 0.1]))
    assert_grad_close(got, ref)


def test_module_as_fun():
    class Residuals(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.y = torch.nn.Parameter(data(THETA))

        def forward(self, x):
            return x[0] * torch.exp(-x[1] * T) - self.y

    mod = Residuals()
    res = least_squares(mod, torch.tensor([1.0, 1.0]), jac="autograd", **TIGHT)
    (res.x @ W).backward()
    y = data(THETA).clone().requires_grad_(True)
    (least_squares(expfit, torch.tensor([1.0, 1.0]), args=(y,), jac="autograd",
                   **TIGHT).x @ W).backward()
    assert_grad_close(mod.y.grad, y.grad, rtol=1e-10)


# ------------------------------------------------------------ bounds
@pytest.mark.parametrize("method", ["trf", "dogbox"])
def test_active_bound_has_zero_derivative(method):
    # the rate wants 0.7; an upper bound of 0.5 holds it there (active)
    bounds = (torch.tensor([-np.inf, 0.0]), torch.tensor([np.inf, 0.5]))

    def solve(th):
        return least_squares(expfit, torch.tensor([1.0, 0.3]), args=(data(th),), bounds=bounds,
                             method=method, jac="autograd", **TIGHT)

    theta = THETA.clone().requires_grad_(True)
    res = solve(theta)
    assert int(res.active_mask[1]) == 1
    gx0, = torch.autograd.grad(res.x[0], theta, retain_graph=True)
    gx1, = torch.autograd.grad(res.x[1], theta, allow_unused=True)
    assert gx1 is None or bool((gx1 == 0).all())

    def objective(th):
        y = data(th)
        x = solve(th).x.clone()
        x[1] = 0.5
        return polish(cost_of(lambda x: expfit(x, y)), x, free=torch.tensor([True, False]))[0]

    with torch.no_grad():
        ref = central_differences(objective, THETA)
    assert_grad_close(gx0, ref)


# ------------------------------------------------------------ robust losses
@pytest.mark.parametrize("method", ["trf", "dogbox"])
@pytest.mark.parametrize(("loss", "f_scale"), [("soft_l1", 1.0), ("cauchy", 0.05)])
def test_robust_loss_matches_central_differences(method, loss, f_scale):
    outl = torch.zeros_like(T)
    outl[[4, 17]] = torch.tensor([0.6, -0.4])

    def solve(th):
        return least_squares(expfit, torch.tensor([1.0, 1.0]), args=(data(th) + outl,),
                             method=method, loss=loss, f_scale=f_scale, jac="autograd",
                             **TIGHT)

    theta = THETA.clone().requires_grad_(True)
    (solve(theta).x @ W).backward()

    def objective(th):
        y = data(th) + outl
        return polish(cost_of(lambda x: expfit(x, y), loss, f_scale), solve(th).x) @ W

    with torch.no_grad():
        ref = central_differences(objective, THETA)
    assert_grad_close(theta.grad, ref)


def test_f_scale_tensor_is_differentiable():
    outl = torch.zeros_like(T)
    outl[[4, 17]] = torch.tensor([0.6, -0.4])
    y = data(THETA) + outl

    def solve(c):
        return least_squares(expfit, torch.tensor([1.0, 1.0]), args=(y,), loss="cauchy",
                             f_scale=c, jac="autograd", **TIGHT)

    c = torch.tensor(0.1, requires_grad=True)
    (solve(c).x @ W).backward()
    with torch.no_grad():
        ref = central_differences(
            lambda c: polish(cost_of(lambda x: expfit(x, y), "cauchy", c[0]),
                             solve(float(c[0])).x) @ W, torch.tensor([0.1]), h=1e-5)
    assert_grad_close(c.grad.reshape(1), ref)


def test_callable_loss_gives_the_builtin_gradient():
    def soft_l1(z):
        t = 1 + z
        return torch.stack([2 * (t**0.5 - 1), t**-0.5, -0.5 * t**-1.5])

    outl = torch.zeros_like(T)
    outl[4] = 0.6
    grads = []
    for loss in ("soft_l1", soft_l1):
        theta = THETA.clone().requires_grad_(True)
        res = least_squares(expfit, torch.tensor([1.0, 1.0]), args=(data(theta) + outl,),
                            loss=loss, f_scale=0.2, jac="autograd", **TIGHT)
        (res.x @ W).backward()
        grads.append(theta.grad)
    assert_grad_close(grads[1], grads[0], rtol=1e-8)
    with pytest.raises(ValueError, match="callable `loss` cannot be differentiated"):
        least_squares(expfit, torch.tensor([1.0, 1.0]), args=(data(THETA),), loss=soft_l1,
                      f_scale=torch.tensor(0.2, requires_grad=True))


# ------------------------------------------------------------ failure cases
def test_rank_deficient_gives_minimum_norm_and_warns():
    # x0 and x1 enter only as their sum: H is singular; dx/dy = pinv(A)
    A = torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 2.0]])
    y = torch.tensor([1.0, 2.0, 2.5], requires_grad=True)
    res = least_squares(lambda x, y: A @ x - y, torch.tensor([0.3, 0.1]), args=(y,),
                        method="trf", jac="autograd", **TIGHT)
    with pytest.warns(RuntimeWarning, match="singular"):
        (res.x @ W).backward()
    ref = torch.linalg.pinv(A).T @ W
    assert_grad_close(y.grad, ref, rtol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_not_converged_gives_nan_and_warns(method):
    theta = THETA.clone().requires_grad_(True)
    res = least_squares(expfit, torch.tensor([1.0, 1.0]), args=(data(theta),), method=method,
                        max_nfev=2)
    assert int(res.status) == 0
    with pytest.warns(RuntimeWarning, match="NaN"):
        (res.x @ W).backward()
    assert bool(torch.isnan(theta.grad).all())


def test_batch_failed_problem_leaves_the_others_alone():
    B = 4
    thetas = THETA.repeat(B, 1) * torch.tensor([1.0, 1.1, 0.9, 1.2])[:, None]
    y = torch.stack([data(th) for th in thetas]).requires_grad_(True)
    x0 = torch.ones(B, 2)
    x0[2, 0] = float("nan")  # problem 2 fails alone (status 5)

    def vfun(x, y):
        return x[:, :1] * torch.exp(-x[:, 1:] * T) - y

    res = batch_least_squares(vfun, x0, args=(y,), jac="autograd", **TIGHT)
    assert res.status.tolist()[2] == 5
    with pytest.warns(RuntimeWarning, match="NaN for 1 problem"):
        (res.x @ W).sum().backward()
    assert bool(torch.isnan(y.grad[2]).all())
    keep = [0, 1, 3]
    assert bool(torch.isfinite(y.grad[keep]).all())
    # the others' gradients are those of their single problems
    for b in keep:
        yb = y.detach()[b].clone().requires_grad_(True)
        (least_squares(expfit, torch.ones(2), args=(yb,), jac="autograd", **TIGHT).x
         @ W).backward()
        assert_grad_close(y.grad[b], yb.grad, rtol=1e-8)
    # masking the failed problem out gives no NaN and no warning
    y.grad = None
    res = batch_least_squares(vfun, x0, args=(y,), jac="autograd", **TIGHT)
    ok = torch.tensor([True, True, False, True])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (torch.where(ok[:, None], res.x, 0.0) @ W).sum().backward()
    assert bool(torch.isfinite(y.grad).all())
    assert bool((y.grad[2] == 0).all())


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_batch_failed_problem_with_bad_data_leaves_shared_gradients_alone(bad_value):
    """A problem that fails on non-finite data (status 5): masked out, or left out of the
    loss, it gives the other problems' gradients, also of a tensor they all share (0 * NaN
    on its residuals' graph spoilt them); asked for, its gradient is NaN (undefined)."""
    B = 4
    thetas = THETA.repeat(B, 1) * torch.tensor([1.0, 1.1, 0.9, 1.2])[:, None]
    y0 = torch.stack([data(th) for th in thetas])
    y0[2, 5] = bad_value
    keep = [0, 1, 3]

    def vfun(x, y, gain):
        return x[:, :1] * torch.exp(-x[:, 1:] * T * gain) - y

    def run(rows, loss_of):
        y = y0[rows].clone().requires_grad_(True)
        gain = torch.tensor(1.0, requires_grad=True)
        res = batch_least_squares(vfun, torch.ones(len(rows), 2), args=(y,),
                                  kwargs={"gain": gain}, jac="autograd", **TIGHT)
        loss_of(res).backward()
        return res, y.grad, gain.grad

    ok = torch.tensor([True, True, False, True])
    res, y_grad, gain_grad = run(list(range(B)),
                                 lambda r: (torch.where(ok[:, None], r.x, 0.0) @ W).sum())
    assert res.status.tolist()[2] == 5
    _, y_ref, gain_ref = run(keep, lambda r: (r.x @ W).sum())
    assert bool(torch.isfinite(gain_grad)) and bool((y_grad[2] == 0).all())
    assert_grad_close(gain_grad, gain_ref, rtol=1e-7)
    assert_grad_close(y_grad[keep], y_ref, rtol=1e-7)
    # the others' cost alone: no NaN either
    _, y_grad, gain_grad = run(list(range(B)), lambda r: r.cost[keep].sum())
    _, y_ref, gain_ref = run(keep, lambda r: r.cost.sum())
    # (noiseless data: the costs and their gradients are rounding noise, ~1e-17)
    torch.testing.assert_close(gain_grad, gain_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(y_grad[keep], y_ref, rtol=0, atol=1e-12)
    # asked of the failed problem: NaN, with the warning
    with pytest.warns(RuntimeWarning, match="NaN for 1 problem"):
        _, y_grad, gain_grad = run(list(range(B)), lambda r: (r.x @ W).sum())
    assert bool(torch.isnan(gain_grad)) and bool(torch.isnan(y_grad[2]).all())


# ------------------------------------------------------------ batches
@pytest.mark.parametrize("vectorized", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_batch_gradient_equals_per_problem_gradients(method, vectorized):
    B = 5
    gen = torch.Generator().manual_seed(3)
    y0 = data(THETA) + 0.05 * torch.randn(B, T.numel(), generator=gen)
    y = y0.clone().requires_grad_(True)
    amp = torch.tensor(1.3, requires_grad=True)  # shared, captured
    if vectorized:
        def fun(x, y):
            return amp * x[:, :1] * torch.exp(-x[:, 1:] * T) - y
    else:
        def fun(x, y):
            return amp * x[0] * torch.exp(-x[1] * T) - y
    res = batch_least_squares(fun, torch.ones(B, 2), args=(y,), method=method,
                              vectorized=vectorized, jac="autograd", **TIGHT)
    (res.x @ W).sum().backward()
    amp_sum = 0.0
    for b in range(B):
        yb = y0[b].clone().requires_grad_(True)
        a = torch.tensor(1.3, requires_grad=True)
        r = least_squares(lambda x, y, a: a * x[0] * torch.exp(-x[1] * T) - y, torch.ones(2),
                          args=(yb, a), method=method, jac="autograd", **TIGHT)
        (r.x @ W).backward()
        assert_grad_close(y.grad[b], yb.grad, rtol=1e-8)
        amp_sum = amp_sum + a.grad
    assert_grad_close(amp.grad.reshape(1), amp_sum.reshape(1), rtol=1e-8)


def test_batch_robust_bounded_matches_central_differences():
    # two problems, shared theta in kwargs; problem 1 has an active bound
    lb = torch.tensor([[-np.inf, 0.0], [-np.inf, 0.0]])
    ub = torch.tensor([[np.inf, 5.0], [np.inf, 0.5]])

    def vfun(x, *, theta):
        y = data(theta)
        return x[:, :1] * torch.exp(-x[:, 1:] * T) - y

    def solve(th):
        return batch_least_squares(vfun, torch.tensor([[1.0, 0.3], [1.0, 0.3]]),
                                   kwargs={"theta": th}, bounds=(lb, ub), loss="soft_l1",
                                   f_scale=0.5, jac="autograd", **TIGHT)

    theta = THETA.clone().requires_grad_(True)
    res = solve(theta)
    assert res.active_mask.tolist() == [[0, 0], [0, 1]]
    (res.x[:, 0].sum() + res.x[0, 1]).backward()

    def objective(th):
        x = solve(th).x
        y = data(th)
        c = cost_of(lambda x: expfit(x, y), "soft_l1", 0.5)
        x0 = polish(c, x[0])
        x1 = x[1].clone()
        x1[1] = 0.5
        x1 = polish(c, x1, free=torch.tensor([True, False]))
        return x0[0] + x1[0] + x0[1]

    with torch.no_grad():
        ref = central_differences(objective, THETA)
    assert_grad_close(theta.grad, ref)


# ------------------------------------------------------------ dtype, device
def test_float32_gradient_close_to_float64():
    theta = THETA.clone().requires_grad_(True)
    (_solve_exp(theta, "trf").x @ W).backward()
    t32 = THETA.float().clone().requires_grad_(True)
    T32 = T.float()
    res = least_squares(lambda x, y: x[0] * torch.exp(-x[1] * T32) - y,
                        torch.tensor([1.0, 1.0], dtype=torch.float32),
                        args=(t32[0] * torch.exp(-t32[1] * T32) + t32[2] * torch.sin(7 * T32),),
                        jac="autograd")
    (res.x @ W.float()).backward()
    assert t32.grad.dtype == torch.float32
    # float32 solutions are accurate to about sqrt(eps32) relative in x
    assert_grad_close(t32.grad.double(), theta.grad, rtol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_gradient_matches_cpu():
    B = 64
    y0 = data(THETA).repeat(B, 1) * torch.linspace(0.8, 1.2, B)[:, None]
    grads = []
    for dev in ("cpu", "cuda"):
        y = y0.to(dev).clone().requires_grad_(True)
        Td = T.to(dev)
        res = batch_least_squares(lambda x, y, *, t: x[:, :1] * torch.exp(-x[:, 1:] * t) - y,
                                  torch.ones(B, 2, device=dev), args=(y,), kwargs={"t": Td},
                                  jac="autograd", **TIGHT)
        (res.x @ W.to(dev)).sum().backward()
        grads.append(y.grad.cpu())
    assert_grad_close(grads[1], grads[0], rtol=1e-8)


# ------------------------------------------------------------ when nothing happens
def test_no_graph_without_grad_inputs_or_grad_mode():
    calls = {"n": 0}

    def fun(x, y):
        calls["n"] += 1
        return expfit(x, y)

    y = data(THETA)
    res = least_squares(fun, torch.tensor([1.0, 1.0]), args=(y,))
    assert res.x.grad_fn is None and not res.x.requires_grad
    n_plain = calls["n"]
    yg = y.clone().requires_grad_(True)
    calls["n"] = 0
    with torch.no_grad():
        res = least_squares(fun, torch.tensor([1.0, 1.0]), args=(yg,))
    assert not res.x.requires_grad and calls["n"] == n_plain
    # with a grad-requiring input: two more evaluations (at x*, and at x* + S(g))
    calls["n"] = 0
    res = least_squares(fun, torch.tensor([1.0, 1.0]), args=(yg,))
    assert res.x.requires_grad and calls["n"] == n_plain + 2


def test_caller_tensors_unchanged():
    y = data(THETA).clone().requires_grad_(True)
    before = y.detach().clone()
    x0 = torch.tensor([1.0, 1.0])
    res = least_squares(expfit, x0, args=(y,))
    (res.x @ W + res.cost).backward()
    assert torch.equal(y.detach(), before) and torch.equal(x0, torch.tensor([1.0, 1.0]))


# ------------------------------------------------------------ errors and limits
def test_numpy_x0_with_grad_inputs_raises():
    y = data(THETA).clone().requires_grad_(True)
    with pytest.raises(ValueError, match="`x0` is not a torch tensor"):
        least_squares(lambda x, y: expfit(torch.as_tensor(x), y),
                      np.array([1.0, 1.0]), args=(y,))


def test_fun_returning_numpy_with_grad_inputs_raises():
    y = data(THETA).clone().requires_grad_(True)
    yn = y.detach().numpy()

    def fun(x, y):  # ignores y's graph, returns numpy
        return x[0].item() * np.exp(-x[1].item() * T.numpy()) - yn

    with pytest.raises(ValueError, match="returned a non-tensor result"):
        least_squares(fun, torch.tensor([1.0, 1.0]), args=(y,))


def test_fun_converting_grad_input_to_numpy_raises():
    y = data(THETA).clone().requires_grad_(True)

    def fun(x, y):
        return torch.as_tensor(x.numpy() - np.resize(y.numpy(), 2))

    with pytest.raises(ValueError, match="converted a tensor that requires grad to numpy"):
        least_squares(fun, torch.tensor([1.0, 1.0]), args=(y,))
    with pytest.raises(ValueError, match="converted a tensor that requires grad to numpy"):
        batch_least_squares(lambda x, y: torch.as_tensor(x.numpy() - y.numpy()[:, :2]),
                            torch.ones(3, 2), args=(y.expand(3, -1),))


def test_double_backward_raises():
    theta = THETA.clone().requires_grad_(True)
    res = _solve_exp(theta, "trf")
    with pytest.raises(RuntimeError, match="Higher-order gradients"):
        torch.autograd.grad(res.x @ W, theta, create_graph=True)
    # without create_graph the same graph differentiates once
    g, = torch.autograd.grad(res.x @ W, theta)
    assert bool(torch.isfinite(g).all())


def test_torch_func_transform_raises():
    def sol(th):
        return _solve_exp(th, "trf").x @ W

    with pytest.raises(RuntimeError):
        torch.func.grad(sol)(THETA.clone())


# ------------------------------------------------------------ curve fits
def _decay(x, a, k):
    return a * torch.exp(-k * x)


SIG = 0.1 + 0.05 * T


@pytest.mark.parametrize("method", ["lm", "trf", "dogbox"])
def test_curve_fit_popt_differentiable_in_xdata_ydata_sigma(method):
    from torchimize_scipy import curve_fit

    y0 = data(THETA)
    kw = dict(p0=torch.tensor([1.0, 1.0]), method=method, **TIGHT)
    xg, yg, sg = (a.clone().requires_grad_(True) for a in (T, y0, SIG))
    popt, pcov = curve_fit(_decay, xg, yg, sigma=sg, **kw)
    (popt @ W).backward()
    assert not pcov.requires_grad  # pcov is not differentiated (documented)

    def objective(x, y, s):
        p, _ = curve_fit(_decay, x, y, sigma=s, **kw)
        return polish(lambda q: 0.5 * (((_decay(x, *q) - y) / s) ** 2).sum(), p) @ W

    picks = [0, 9, 21, 29]
    for k, got in enumerate((xg.grad, yg.grad, sg.grad)):
        ref = torch.zeros(len(picks))
        with torch.no_grad():
            for j, i in enumerate(picks):
                args_p, args_m = [T, y0, SIG], [T, y0, SIG]
                args_p[k] = args_p[k].clone()
                args_m[k] = args_m[k].clone()
                args_p[k][i] += H_FD
                args_m[k][i] -= H_FD
                ref[j] = (objective(*args_p) - objective(*args_m)) / (2 * H_FD)
        # the tested solve uses forward differences (x* within about 1e-9)
        assert_grad_close(got[picks], ref, rtol=1e-5)


@pytest.mark.parametrize("method", ["lm", "trf"])
def test_batch_curve_fit_gradient_equals_curve_fit(method):
    from torchimize_scipy import batch_curve_fit, curve_fit

    B = 4
    Y0 = data(THETA).repeat(B, 1) * torch.linspace(0.8, 1.2, B)[:, None]
    Y = Y0.clone().requires_grad_(True)
    popt, pcov = batch_curve_fit(_decay, T, Y, torch.ones(B, 2), method=method, **TIGHT)
    (popt @ W).sum().backward()
    assert not pcov.requires_grad
    for b in range(B):
        yb = Y0[b].clone().requires_grad_(True)
        p, _ = curve_fit(_decay, T, yb, p0=torch.ones(2), method=method, **TIGHT)
        (p @ W).backward()
        assert_grad_close(Y.grad[b], yb.grad, rtol=1e-7)


def test_curve_fit_gradient_with_omitted_observations_raises():
    from torchimize_scipy import curve_fit

    y = data(THETA).clone()
    y[3] = float("nan")
    with pytest.raises(ValueError, match="nan_policy='omit'"):
        curve_fit(_decay, T, y.requires_grad_(True), p0=torch.ones(2), nan_policy="omit")
