"""Tests of ``torchimize_scipy.functions``, the torchimize-compatible API.

The reference for the weighted multi-channel problems is
``scipy.optimize.least_squares`` on the equivalent stacked problem, whose
residual vector is ``(sqrt(w_1) f_1, ..., sqrt(w_C) f_C)``: LM and GN must
reach the cost scipy reaches. Further tests check the kick-start snippet of
torchimize's documentation (only the imports changed), the return
conventions (lists of iterates), that ``p`` is never modified, that finished
problems stay frozen, that ``l`` is honoured and gradient descent is gradient
descent, and the errors of the shape and option checks.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize as so
import torch
from _parity import ONE_EVAL_RTOL

import torchimize_scipy.functions as tf

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, C, N, n = 4, 3, 24, 3
TRUE = [[1.0, 0.7, 0.2], [2.0, 1.3, -0.1], [0.5, 0.4, 0.3], [1.5, 2.0, 0.0]]
WEIGHTS = [1.0, 0.5, 2.0]


# ============================================================================ problems
def channels(p, t):
    """Three cost channels of the parameters ``(a, k, c)``: ``(B, 3, N)``."""
    a, k, c = p[:, 0:1], p[:, 1:2], p[:, 2:3]
    return torch.stack([a * torch.exp(-k * t) + c, a * torch.exp(-0.5 * k * t),
                        c + a * k * t / (1 + t)], dim=1)


def residuals(p, t, y):
    return channels(p, t) - y


def jacobian(p, t, y):
    """Analytic ``(B, 3, N, 3)`` Jacobian of :func:`residuals`."""
    a, k = p[:, 0:1], p[:, 1:2]
    e1, e2, r = torch.exp(-k * t), torch.exp(-0.5 * k * t), t / (1 + t)
    one, zero = torch.ones_like(e1), torch.zeros_like(e1)
    ch0 = torch.stack([e1, -a * t * e1, one], -1)
    ch1 = torch.stack([e2, -0.5 * a * t * e2, zero], -1)
    ch2 = torch.stack([k * r, a * r, one], -1)
    return torch.stack([ch0, ch1, ch2], dim=1)


def make_problem(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0.0, 3.0, N, dtype=torch.float64)
    truth = torch.tensor(TRUE, dtype=torch.float64)
    y = channels(truth, t) + 0.02 * torch.randn(B, C, N, generator=gen, dtype=torch.float64)
    p0 = torch.tensor([[1.0, 1.0, 0.0]] * B, dtype=torch.float64)
    w = torch.tensor(WEIGHTS, dtype=torch.float64)
    return tuple(v.to(DEVICE, dtype) for v in (p0, t, y, w))


def weighted_cost(p, t, y, w):
    f = residuals(p.double(), t.double(), y.double())
    return 0.5 * (w.double()[:, None] * f**2).sum((1, 2))


def scipy_costs(p0, t, y, w):
    """scipy's cost on each stacked problem ``sqrt(w_c) f_c``, from ``p0``."""
    t, y, w = (v.double().cpu() for v in (t, y, w))
    out = []
    for b in range(p0.shape[0]):
        def fun(x, b=b):
            f = residuals(torch.from_numpy(x)[None], t, y[b:b + 1])[0]
            return (w.sqrt()[:, None] * f).reshape(-1).numpy()

        res = so.least_squares(fun, p0[b].double().cpu().numpy(), method="lm", xtol=1e-12,
                               ftol=1e-12, gtol=1e-12)
        out.append(res.cost)
    return np.array(out)


RTOL = {torch.float64: 1e-7, torch.float32: 1e-4}


# ============================================================================ kick-start
def test_kickstart_snippet_runs():
    """The kick-start of torchimize's docs, with only the imports changed."""
    gen = torch.Generator().manual_seed(1)
    tt = torch.linspace(0.0, 2.0, 20, dtype=torch.float64, device=DEVICE)
    truth = torch.tensor([1.5, 0.8, 0.1], dtype=torch.float64, device=DEVICE)
    five = torch.tensor([1.0, 1.2, 1.4, 1.6, 1.8], dtype=torch.float64, device=DEVICE)

    def single_model(p, t):
        return p[0] * torch.exp(-p[1] * t) + p[2]

    y_single = single_model(truth, tt) + 0.01 * torch.randn(
        20, generator=gen, dtype=torch.float64).to(DEVICE)

    def cost_fun(p, t):
        return single_model(p, t) - y_single

    def jac_fun(p, t):
        e = torch.exp(-p[1] * t)
        return torch.stack([e, -p[0] * t * e, torch.ones_like(t)], -1)

    def batch_model(p, t):  # (B, 5, N): channel c decays c-times faster
        a, k, c = p[:, 0, None, None], p[:, 1, None, None], p[:, 2, None, None]
        return a * torch.exp(-k * five[:, None] * t) + c

    truths = truth + torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.2, -0.1], [-0.3, 0.4, 0.2]],
                                  dtype=torch.float64, device=DEVICE)
    y_batch = batch_model(truths, tt)

    def multi_cost_fun_batch(p, t):
        return batch_model(p, t) - y_batch

    def multi_jac_fun_batch(p, t):
        a, k = p[:, 0, None, None], p[:, 1, None, None]
        e = torch.exp(-k * five[:, None] * t)
        return torch.stack([e, -a * five[:, None] * t * e, torch.ones_like(e)], -1)

    initials = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64, device=DEVICE)
    initials_batch = torch.tensor([[1.0, 1.0, 0.0]] * 3, dtype=torch.float64, device=DEVICE)
    other_args = tt
    device = DEVICE
    results = {}

    # ---- the snippet (torchimize -> torchimize_scipy, 'cuda' -> device) ----
    # single gradient descent
    from torchimize_scipy.functions.single.gda_fun_single import gradient_descent
    coeffs_list = gradient_descent(initials, cost_fun, args=(other_args,))
    results["gd"] = coeffs_list

    # single gauss-newton
    from torchimize_scipy.functions import lsq_gna
    coeffs_list = lsq_gna(initials, cost_fun, args=(other_args,))
    results["gn"] = coeffs_list

    # single levenberg-marquardt
    from torchimize_scipy.functions import lsq_lma
    coeffs_list = lsq_lma(initials, function=cost_fun, jac_function=jac_fun, args=(other_args,))
    results["lm"] = coeffs_list

    # parallel gradient descent for several optimization problems at multiple costs
    from torchimize_scipy.functions import gradient_descent_parallel
    coeffs_list = gradient_descent_parallel(
                        p = initials_batch,
                        function = multi_cost_fun_batch,
                        jac_function = multi_jac_fun_batch,
                        args = (other_args,),
                        wvec = torch.ones(5, device=device, dtype=initials_batch.dtype),
                        ftol = 1e-8,
                        ptol = 1e-8,
                        gtol = 1e-8,
                        l = 1.,
                        max_iter = 80,
                    )
    results["gd_parallel"] = coeffs_list

    # parallel gauss-newton for several optimization problems at multiple costs
    from torchimize_scipy.functions import lsq_gna_parallel
    coeffs_list = lsq_gna_parallel(
                        p = initials_batch,
                        function = multi_cost_fun_batch,
                        jac_function = multi_jac_fun_batch,
                        args = (other_args,),
                        wvec = torch.ones(5, device=device, dtype=initials_batch.dtype),
                        ftol = 1e-8,
                        ptol = 1e-8,
                        gtol = 1e-8,
                        l = 1.,
                        max_iter = 80,
                    )
    results["gn_parallel"] = coeffs_list

    # parallel levenberg-marquardt for several optimization problems at multiple costs
    from torchimize_scipy.functions import lsq_lma_parallel
    coeffs_list = lsq_lma_parallel(
                        p = initials_batch,
                        function = multi_cost_fun_batch,
                        jac_function = multi_jac_fun_batch,
                        args = (other_args,),
                        wvec = torch.ones(5, device=device, dtype=initials_batch.dtype),
                        ftol = 1e-8,
                        ptol = 1e-8,
                        gtol = 1e-8,
                        meth = 'marq',
                        max_iter = 40,
                    )
    results["lm_parallel"] = coeffs_list

    # validate that your provided functions return correct tensor dimensionality
    from torchimize_scipy.functions import test_fun_dims_parallel
    ret = test_fun_dims_parallel(
        p = initials_batch,
        function = multi_cost_fun_batch,
        jac_function = multi_jac_fun_batch,
        args = (other_args,),
        wvec = torch.ones(5, device=device, dtype=initials_batch.dtype),
    )
    # ---- end of the snippet ----

    assert ret is True
    for key in ("gd", "gn", "lm"):
        its = results[key]
        assert isinstance(its, list) and len(its) <= 100
        assert all(x.shape == (3,) for x in its)
        assert torch.equal(its[0], initials)
    for key in ("gn", "lm"):
        torch.testing.assert_close(results[key][-1], results["lm"][-1], rtol=1e-6, atol=1e-6)
        assert float((results[key][-1] - truth).abs().max()) < 0.05
    for key, cap in (("gd_parallel", 80), ("gn_parallel", 80), ("lm_parallel", 40)):
        its = results[key]
        assert 1 <= len(its) <= cap
        assert all(x.shape == (3, 3) for x in its)
    # zero-residual batch: GN and LM recover the parameters that made the data
    for key in ("gn_parallel", "lm_parallel"):
        torch.testing.assert_close(results[key][-1], truths, rtol=1e-6, atol=1e-6)
    assert float(results["gd_parallel"].info["cost"].max()) < float(
        0.5 * (multi_cost_fun_batch(initials_batch, tt) ** 2).sum((1, 2)).min())


# ============================================================================ parity
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver,kw", [
    (tf.lsq_lma_parallel, {"meth": "lev"}),
    (tf.lsq_lma_parallel, {"meth": "marq"}),
    (tf.lsq_gna_parallel, {}),
])
@pytest.mark.parametrize("analytic", [True, False])
def test_weighted_channels_reach_scipy_cost(dtype, solver, kw, analytic):
    p0, t, y, w = make_problem(dtype)
    its = solver(p0, residuals, jacobian if analytic else None, args=(t, y), wvec=w,
                 ftol=1e-12, ptol=1e-12, gtol=1e-12, **kw)
    ref = scipy_costs(p0, t, y, w)
    cost = weighted_cost(its[-1], t, y, w).cpu().numpy()
    np.testing.assert_allclose(cost, ref, rtol=RTOL[dtype])
    # the engine's cost is the weighted cost 0.5 * sum_c w_c ||f_c||^2
    np.testing.assert_allclose(its.info["cost"].double().cpu().numpy(), cost,
                               rtol=10 * RTOL[dtype])
    assert its[-1].dtype == dtype and its[-1].device == p0.device


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_descent_parallel_reaches_scipy_cost(dtype):
    p0, t, y, w = make_problem(dtype)
    its = tf.gradient_descent_parallel(p0, residuals, jacobian, args=(t, y), wvec=w,
                                       ftol=1e-12, ptol=1e-12, gtol=1e-7, l=0.05,
                                       max_iter=3000)
    cost = weighted_cost(its[-1], t, y, w).cpu().numpy()
    np.testing.assert_allclose(cost, scipy_costs(p0, t, y, w), rtol=1e-4)


def test_wvec_weights_whole_channels():
    """``wvec`` scales channel c's squared residuals by w_c; None means ones."""
    p0, t, y, w = make_problem(torch.float64)
    scaled = tf.lsq_lma_parallel(p0, residuals, jacobian, args=(t, y), wvec=3.0 * w)
    plain = tf.lsq_lma_parallel(p0, residuals, jacobian, args=(t, y), wvec=w)
    torch.testing.assert_close(scaled[-1], plain[-1], rtol=1e-6, atol=1e-7)
    ones = tf.lsq_gna_parallel(p0, residuals, jacobian, args=(t, y), wvec=torch.ones(C,
                               dtype=torch.float64, device=DEVICE))
    default = tf.lsq_gna_parallel(p0, residuals, jacobian, args=[t, y])
    torch.testing.assert_close(ones[-1], default[-1])
    # one weight for all channels broadcasts, as torchimize's einsum does
    shared = tf.lsq_gna_parallel(p0, residuals, jacobian, args=(t, y),
                                 wvec=torch.ones(1, dtype=torch.float64, device=DEVICE))
    torch.testing.assert_close(shared[-1], default[-1])
    # a zero weight removes a channel: fit channels 0 and 1 only
    w01 = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64, device=DEVICE)
    two = tf.lsq_lma_parallel(p0, residuals, jacobian, args=(t, y), wvec=w01)
    ref = tf.lsq_lma_parallel(p0, lambda p, t, y: residuals(p, t, y)[:, :2],
                              lambda p, t, y: jacobian(p, t, y)[:, :2], args=(t, y))
    torch.testing.assert_close(two[-1], ref[-1], rtol=1e-6, atol=1e-8)


def test_single_problem_functions_reach_scipy():
    p0, t, y, _ = make_problem(torch.float64)
    x0, yy = p0[0], y[0, 0]

    def fun(p, t, y):
        return p[0] * torch.exp(-p[1] * t) + p[2] - y

    ref = so.least_squares(lambda x: fun(torch.from_numpy(x), t.cpu(), yy.cpu()).numpy(),
                           x0.cpu().numpy(), method="lm", xtol=1e-12, ftol=1e-12, gtol=1e-12)
    for solver in (tf.lsq_lma, tf.lsq_gna):
        its = solver(x0, fun, args=(t, yy), ftol=1e-12, ptol=1e-12, gtol=1e-12)
        np.testing.assert_allclose(its[-1].cpu().numpy(), ref.x, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(its.info["cost"], ref.cost, rtol=1e-8)
    its = tf.gradient_descent(x0, fun, args=(t, yy), ftol=0, ptol=0, gtol=1e-6, l=0.1,
                              max_iter=3000)
    np.testing.assert_allclose(its.info["cost"], ref.cost, rtol=1e-4)


# ============================================================================ conventions
SOLVERS_PARALLEL = [tf.gradient_descent_parallel, tf.lsq_gna_parallel, tf.lsq_lma_parallel]
SOLVERS_SINGLE = [tf.gradient_descent, tf.lsq_gna, tf.lsq_lma]


@pytest.mark.parametrize("solver", SOLVERS_PARALLEL)
def test_parallel_iterates_and_p_untouched(solver):
    p0, t, y, w = make_problem(torch.float64)
    p = p0.clone().requires_grad_(True)
    keep = p.detach().clone()
    seen = []

    def fun(q, t, y):
        seen.append(q.shape[0])
        return residuals(q, t, y)

    its = solver(p, fun, jacobian, args=(t, y), wvec=w, max_iter=7)
    assert torch.equal(p.detach(), keep) and p.requires_grad
    assert isinstance(its, list) and 1 <= len(its) <= 7
    assert all(x.shape == (B, n) and not x.requires_grad for x in its)
    assert len({id(x) for x in its}) == len(its)  # separate tensors, not one buffer
    torch.testing.assert_close(its[-1], its.info["x"], rtol=0, atol=0)
    # one iteration = one trial = one residual evaluation per running problem
    assert len(its) == int(its.info["nfev"].max()) - 1
    assert set(seen) == {B}  # function always receives the whole batch, as in torchimize


@pytest.mark.parametrize("solver", SOLVERS_SINGLE)
def test_single_iterates_and_p_untouched(solver):
    p0, t, y, _ = make_problem(torch.float64)
    x0 = p0[0].clone()

    def fun(p, t, y):
        return p[0] * torch.exp(-p[1] * t) + p[2] - y

    its = solver(x0, fun, args=(t, y[0, 0]), max_iter=5)
    assert torch.equal(x0, p0[0])
    assert 2 <= len(its) <= 5
    assert torch.equal(its[0], x0) and its[0] is not x0
    assert all(x.shape == (n,) for x in its)
    assert torch.equal(its[-1], its.info["x"])
    assert len(solver(x0, fun, args=(t, y[0, 0]), max_iter=1)) == 1


@pytest.mark.parametrize("solver", SOLVERS_PARALLEL)
def test_finished_problems_stay_frozen(solver):
    """Problem 0 starts at its exact solution; problem 1 converges, the others run on."""
    p0, t, _, w = make_problem(torch.float64)
    truth = torch.tensor(TRUE, dtype=torch.float64, device=DEVICE)
    y = channels(truth, t)
    start = p0.clone()
    start[0] = truth[0]
    its = solver(start, residuals, jacobian, args=(t, y), wvec=w, max_iter=60)
    assert len(its) > 2
    for x in its:  # the converged problem never moves
        assert torch.equal(x[0], truth[0])
    status = its.info["status"]
    assert int(status[0]) == 1  # gtol at the start
    # every problem, once it stops moving, stays where it ended
    final = its[-1]
    for b in range(B):
        rows = torch.stack([x[b] for x in its])
        moved = (rows != final[b]).any(-1).nonzero()
        last_move = int(moved.max()) + 1 if moved.numel() else 0
        assert torch.equal(rows[last_move:], final[b].expand(len(its) - last_move, n))


def test_parallel_list_never_empty():
    p0, t, _, w = make_problem(torch.float64)
    truth = torch.tensor(TRUE, dtype=torch.float64, device=DEVICE)
    its = tf.lsq_gna_parallel(truth, residuals, jacobian, args=(t, channels(truth, t)), wvec=w)
    assert len(its) == 1 and torch.equal(its[0], truth)


# ============================================================================ l and GD
@pytest.mark.parametrize("l", [0.01, 0.2, 5.0])
def test_gradient_descent_honours_l(l):
    """The first trial point of every problem is ``p0 - l * g(p0)``, accepted or not."""
    p0, t, y, w = make_problem(torch.float64)
    points = []

    def fun(p, t, y):
        points.append(p.clone())
        return residuals(p, t, y)

    its = tf.gradient_descent_parallel(p0, fun, jacobian, args=(t, y), wvec=w, l=l,
                                       max_iter=3)
    J = jacobian(p0, t, y)
    f = residuals(p0, t, y)
    g = torch.einsum("bcnp,bcn,c->bp", J, f, w)  # sum_c w_c J_c^T f_c
    first_trial = next(p for p in points if not torch.equal(p, p0))
    torch.testing.assert_close(first_trial, p0 - l * g, rtol=ONE_EVAL_RTOL, atol=1e-14)
    cost0 = weighted_cost(p0, t, y, w)
    accepted = weighted_cost(first_trial, t, y, w) < cost0
    # an accepted first trial is the first iterate; a rejected one leaves p0 in place
    expected = torch.where(accepted[:, None], p0 - l * g, p0)
    torch.testing.assert_close(its[0], expected, rtol=ONE_EVAL_RTOL, atol=1e-14)


def test_single_gradient_descent_is_gradient_descent():
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    x0 = torch.tensor([0.5, 0.5], dtype=torch.float64)
    its = tf.gradient_descent(x0, lambda p: A @ p - b, l=0.05, max_iter=4)
    g0 = A.T @ (A @ x0 - b)
    torch.testing.assert_close(its[1], x0 - 0.05 * g0, rtol=ONE_EVAL_RTOL, atol=1e-15)
    gn = torch.linalg.lstsq(A, (A @ x0 - b)[:, None]).solution[:, 0]
    assert not torch.allclose(its[1], x0 - 0.05 * gn)


def test_gauss_newton_step_fraction_is_honoured():
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    x0 = torch.tensor([0.5, 0.5], dtype=torch.float64)
    its = tf.lsq_gna(x0, lambda p: A @ p - b, l=0.5, max_iter=3)
    gn = torch.linalg.lstsq(A, (A @ x0 - b)[:, None]).solution[:, 0]
    # a linear problem: half the Gauss-Newton step always decreases the cost
    torch.testing.assert_close(its[1], x0 - 0.5 * gn, rtol=ONE_EVAL_RTOL, atol=1e-14)


def test_plain_variants_return_final_parameters():
    p0, t, y, w = make_problem(torch.float64)
    yy = y

    def fun(p):
        return residuals(p, t, yy)

    def jac(p):
        return jacobian(p, t, yy)

    out = tf.lsq_gna_parallel_plain(p0, fun, jac, w, max_iter=30)
    ref = tf.lsq_gna_parallel(p0, residuals, jacobian, args=(t, y), wvec=w)
    assert out.shape == (B, n)
    torch.testing.assert_close(out, ref[-1], rtol=1e-6, atol=1e-8)
    gd = tf.gradient_descent_parallel_plain(p0, fun, jac, w, l=0.01, max_iter=5)
    its = tf.gradient_descent_parallel(p0, fun, jac, wvec=w, ftol=0, ptol=0, gtol=0, l=0.01,
                                       max_iter=5)
    assert len(its) == 5
    torch.testing.assert_close(gd, its[-1], rtol=0, atol=0)


# ============================================================================ errors
def _setup():
    p0, t, y, w = make_problem(torch.float64)
    return p0, (t, y), w


def test_fun_dims_parallel_accepts_good_input():
    p0, args, w = _setup()
    assert tf.test_fun_dims_parallel(p0, residuals, jacobian, args, w) is True
    assert tf.test_fun_dims_parallel(p0, residuals, None, args) is True


@pytest.mark.parametrize("case,match", [
    ("p_1d", r"`p` must have shape \(B, n\)"),
    ("p_int", "floating-point"),
    ("f_2d", r"must return a tensor of shape \(B, C, N\)"),
    ("f_batch", "the first dimension must be B=4"),
    ("f_numpy", "must return a torch.Tensor"),
    ("jac_shape", r"expected \(B, C, N, n\) = \(4, 3, 24, 3\)"),
    ("wvec_len", r"expected shape \(3,\) for C=3 channels .*got shape \(5,\)"),
    ("wvec_neg", "non-negative"),
    ("wvec_2d", r"got shape \(1, 3\)"),
])
def test_fun_dims_parallel_errors(case, match):
    p0, args, w = _setup()
    p, fun, jac, wvec = p0, residuals, jacobian, w
    if case == "p_1d":
        p = p0[0]
    elif case == "p_int":
        p = p0.long()
    elif case == "f_2d":
        def fun(q, t, y):
            return residuals(q, t, y).reshape(q.shape[0], -1)
    elif case == "f_batch":
        def fun(q, t, y):
            return residuals(q, t, y)[:2]
    elif case == "f_numpy":
        def fun(q, t, y):
            return residuals(q, t, y).cpu().numpy()
    elif case == "jac_shape":
        def jac(q, t, y):
            return jacobian(q, t, y).transpose(1, 2)
    elif case == "wvec_len":
        wvec = torch.ones(5, dtype=torch.float64)
    elif case == "wvec_neg":
        wvec = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    elif case == "wvec_2d":
        wvec = torch.ones(1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        tf.test_fun_dims_parallel(p, fun, jac, args, wvec)
    # the solvers run the same checks
    with pytest.raises(ValueError, match=match):
        tf.lsq_lma_parallel(p, fun, jac, args, wvec)


@pytest.mark.parametrize("solver,kw,match", [
    (tf.lsq_lma_parallel, {"tau": 1e-2}, "tau=0.01"),
    (tf.lsq_lma_parallel, {"rho1": 0.1}, "rho1"),
    (tf.lsq_lma_parallel, {"rho2": 0.9}, "rho2"),
    (tf.lsq_lma_parallel, {"beta": 3}, "beta"),
    (tf.lsq_lma_parallel, {"gama": 2}, "gama"),
    (tf.lsq_lma_parallel, {"meth": "foo"}, "`meth` must be 'lev'"),
    (tf.lsq_gna_parallel, {"l": -0.5}, "must be positive"),
    (tf.gradient_descent_parallel, {"l": 0.0}, "must be positive"),
    (tf.gradient_descent_parallel, {"l": float("nan")}, "finite"),
    (tf.lsq_gna_parallel, {"max_iter": 0}, "max_iter"),
    (tf.lsq_lma_parallel, {"ftol": -1.0}, "ftol"),
    (tf.gradient_descent_parallel, {"ptol": float("inf")}, "ptol"),
])
def test_option_errors(solver, kw, match):
    p0, args, w = _setup()
    with pytest.raises(ValueError, match=match):
        solver(p0, residuals, jacobian, args, w, **kw)


def test_single_option_errors():
    x0 = torch.tensor([1.0, 2.0], dtype=torch.float64)

    def fun(p):
        return torch.stack([p[0] - 1, p[1] - 2, p[0] * p[1]])

    with pytest.raises(ValueError, match="bet"):
        tf.lsq_lma(x0, fun, bet=3)
    with pytest.raises(ValueError, match="gam"):
        tf.lsq_lma(x0, fun, gam=2)
    with pytest.raises(ValueError, match="must be positive"):
        tf.lsq_gna(x0, fun, l=0)
    with pytest.raises(ValueError, match=r"shape \(n,\)"):
        tf.lsq_lma(x0[None], fun)
    with pytest.raises(ValueError, match="1-D tensor"):
        tf.lsq_gna(x0, lambda p: fun(p)[None])
    with pytest.raises(ValueError, match=r"expected \(m, n\) = \(3, 2\)"):
        tf.lsq_lma(x0, fun, lambda p: torch.zeros(2, 3, dtype=torch.float64))
    # the defaults, given explicitly, are accepted
    its = tf.lsq_lma(x0, fun, tau=1e-3, meth="marq", rho1=0.25, rho2=0.75, bet=2, gam=3)
    assert its.info["status"] > 0


def test_float32_default_tolerances_raised_as_in_batch_least_squares():
    """float32 ``p`` with the 1e-8 defaults: the tolerances are raised to float32's
    epsilon, so no problem ends on MINPACK's "tolerance too small" codes (7-9, which
    scipy never returns) and the solutions are float64's to float32 precision."""
    g = torch.Generator().manual_seed(0)
    T = torch.linspace(0, 2, 15)
    amp = torch.rand(64, 1, generator=g) + 1
    rate = torch.rand(64, 1, generator=g) + 0.5
    Y = amp * torch.exp(-rate * T) + 0.02 * torch.randn(64, 15, generator=g)

    def fun(p, Y):
        return (p[:, :1] * torch.exp(-p[:, 1:2] * T.to(p.dtype)) - Y)[:, None]

    res32 = tf.lsq_lma_parallel(torch.ones(64, 2), fun, None, args=(Y,))
    res64 = tf.lsq_lma_parallel(torch.ones(64, 2, dtype=torch.float64), fun, None,
                                args=(Y.double(),))
    status = res32.info["status"]
    assert not bool(((status >= 7) & (status <= 9)).any()), status.tolist()
    assert bool((status >= 1).all() & (status <= 4).all()), status.tolist()
    torch.testing.assert_close(res32.info["x"].double(), res64.info["x"], rtol=1e-4, atol=1e-5)
