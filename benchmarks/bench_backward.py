"""Gradients through the solution: backward time against forward time (issue 15).

20,000 noisy Gaussian peaks (``_common.peak_data``: 4 parameters, 64 points),
fitted by ``batch_least_squares`` ('trf', analytic torch Jacobian) with the
data ``y`` requiring grad, as if it came out of a network. The scalar
``L = sum(x * w)`` is then differentiated with respect to ``y``.

Measured, each the median of ``--repeat`` runs after a warm-up:

* ``forward``: the solve with ``y`` detached (no gradients: the plain cost);
* ``forward + attach``: the solve with ``y`` requiring grad (the residuals are
  evaluated once more with autograd at the solution and the gradient of the
  cost is built with ``create_graph=True``);
* ``backward``: ``L.backward()``: the Hessian blocks (``n`` Hessian-vector
  products of the batch), the ``(B, 4, 4)`` eigendecompositions and one
  reverse pass through the gradient's graph;
* ``unrolled``: the alternative without implicit differentiation, a plain
  Levenberg-Marquardt loop written in torch (fixed damping 1e-3 relative to
  ``diag(J^T J)``, analytic Jacobian, ``K`` iterations, every one recorded by
  autograd), its forward and its backward; its gradient is compared with the
  implicit one;
* for context, a loop of ``scipy.optimize.least_squares`` on ``--scipy-subset``
  problems (same Jacobian), extrapolated to B.

Usage::

    python benchmarks/bench_backward.py [--quick] [--threads 2] [--B 20000]
           [--repeat 3] [--unrolled-iters 20]
"""

from __future__ import annotations

import time

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import scipy.optimize
import torch
from _common import (
    PEAK_T,
    base_parser,
    md_table,
    median_time,
    peak_1d,
    peak_data,
    setup,
    write_json,
)

from torchimize_scipy import batch_least_squares


def make_model(t: torch.Tensor):
    """Residuals and analytic Jacobian of a batch of peaks, torch, ``p (b, 4)``."""

    def fun(p, y):
        a, mu, s, c = (p[:, i:i + 1] for i in range(4))
        z = (t - mu) / s
        return a * torch.exp(-0.5 * z * z) + c - y

    def jac(p, y):
        a, mu, s = (p[:, i:i + 1] for i in range(3))
        z = (t - mu) / s
        e = torch.exp(-0.5 * z * z)
        dmu = e * (a / s) * z
        return torch.stack([e, dmu, dmu * z, torch.ones_like(e)], dim=-1)

    return fun, jac


def unrolled_lm(fun, jac, p0, y, iters: int, damping: float = 1e-3):
    """``iters`` Levenberg-Marquardt steps, every operation recorded by autograd."""
    p = p0
    for _ in range(iters):
        f = fun(p, y)
        J = jac(p, y)
        A = J.transpose(1, 2) @ J
        A = A + damping * torch.diag_embed(torch.diagonal(A, dim1=1, dim2=2))
        step = torch.linalg.solve(A, (J.transpose(1, 2) @ f[..., None]))[..., 0]
        p = p - step
    return p


def scipy_loop(y: np.ndarray, p0: np.ndarray, sub: int) -> float:
    """Seconds per problem of a ``scipy.optimize.least_squares`` loop on ``sub`` problems."""
    from _common import peak_jac_np

    def jac1(p, yy):
        return peak_jac_np(p[None, :], yy[None, :])[0]

    t0 = time.perf_counter()
    for i in range(sub):
        scipy.optimize.least_squares(peak_1d, p0[i], jac=jac1, args=(y[i],), method="trf")
    return (time.perf_counter() - t0) / sub


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--B", type=int, default=20_000, help="problems (default 20,000)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--unrolled-iters", type=int, default=20,
                        help="iterations of the unrolled LM (default 20)")
    parser.add_argument("--scipy-subset", type=int, default=300,
                        help="problems of the scipy loop (default 300)")
    args = parser.parse_args()
    dev, dt = setup(args)
    B = 500 if args.quick else args.B
    y_np, _, p0_np = peak_data(B, seed=args.seed)
    y0 = torch.as_tensor(y_np, device=dev, dtype=dt)
    p0 = torch.as_tensor(p0_np, device=dev, dtype=dt)
    fun, jac = make_model(torch.as_tensor(PEAK_T, device=dev, dtype=dt))
    w = torch.linspace(-1.0, 1.0, 4, device=dev, dtype=dt)

    def forward(y):
        return batch_least_squares(fun, p0, jac=jac, args=(y,), method="trf",
                                   return_jac=False)

    t_plain, res_plain = median_time(lambda: forward(y0), repeat=args.repeat, dev=dev)
    y = y0.clone().requires_grad_(True)
    t_attach, res = median_time(lambda: forward(y), repeat=args.repeat, dev=dev)

    def backward():
        y.grad = None
        r = forward(y)
        loss = (r.x * w).sum()
        t0 = time.perf_counter()
        loss.backward()
        return time.perf_counter() - t0

    backward()  # warm-up
    t_back = float(np.median([backward() for _ in range(args.repeat)]))
    g_implicit = y.grad.detach().clone()
    ok = res.success

    def unrolled():
        yu = y0.clone().requires_grad_(True)
        t0 = time.perf_counter()
        p = unrolled_lm(fun, jac, p0, yu, args.unrolled_iters)
        t1 = time.perf_counter()
        (p * w).sum().backward()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, p.detach(), yu.grad

    unrolled()
    runs = [unrolled() for _ in range(args.repeat)]
    t_un_f = float(np.median([r[0] for r in runs]))
    t_un_b = float(np.median([r[1] for r in runs]))
    p_un, g_un = runs[-1][2], runs[-1][3]
    x_diff = float(((p_un - res_plain.x)[ok]).abs().max())
    scale = g_implicit[ok].abs().amax(-1)
    g_diff = float(np.median(((g_un - g_implicit)[ok].abs().amax(-1) / scale).cpu().numpy()))

    sub = min(args.scipy_subset, B)
    t_scipy = scipy_loop(y_np, p0_np, sub) * B

    rows = [
        ["forward, no gradient (plain solve)", t_plain, 1.0, "–"],
        ["forward + attach (y requires grad)", t_attach, t_attach / t_plain, "–"],
        ["backward (implicit, full Hessian)", t_back, t_back / t_plain, "–"],
        [f"unrolled LM x{args.unrolled_iters}: forward with graph", t_un_f,
         t_un_f / t_plain, "–"],
        [f"unrolled LM x{args.unrolled_iters}: backward", t_un_b, t_un_b / t_plain,
         f"{g_diff:.1e}"],
        [f"scipy least_squares loop (extrapolated from {sub})", t_scipy,
         t_scipy / t_plain, "–"],
    ]
    print(f"B = {B}, {dev}, {dt}, threads {args.threads}; converged "
          f"{int(ok.sum())}/{B}; max |x_unrolled - x| = {x_diff:.1e}")
    print(md_table(["step", "seconds", "/ forward", "median rel. grad diff vs implicit"],
                   rows))
    write_json(args, "bench_backward", {
        "B": B, "forward_s": t_plain, "forward_attach_s": t_attach, "backward_s": t_back,
        "unrolled_iters": args.unrolled_iters, "unrolled_forward_s": t_un_f,
        "unrolled_backward_s": t_un_b, "unrolled_grad_rel_diff_median": g_diff,
        "unrolled_x_max_diff": x_diff, "scipy_loop_s_extrapolated": t_scipy,
        "scipy_subset": sub, "converged": int(ok.sum()),
    })


if __name__ == "__main__":
    main()
