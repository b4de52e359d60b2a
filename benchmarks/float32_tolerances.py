"""float32 against float64 batches: status counts, evaluations and costs.

With the default tolerances (1e-8, below float32's epsilon) raised to float32's
epsilon in float32 (see ``check_tolerance``), a float32 batch should stop
after about as many evaluations as a float64 one and reach the same costs to
float32 rounding. This script prints, for Gaussian-peak fits (torch model)
and each method/Jacobian, the status counts, the mean and largest ``nfev``
and the relative cost difference to float64. Evaluations, not seconds: no
speed claim is made from it.

Usage::

    python benchmarks/float32_tolerances.py [--B 2000]
"""

from __future__ import annotations

import argparse

import _env  # noqa: F401  (sets BLAS threads before numpy is imported)
import numpy as np
import torch

from torchimize_scipy import batch_least_squares

M = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    B = args.B
    t = np.linspace(-3.0, 3.0, M)
    a, mu = rng.uniform(0.5, 2.0, B), rng.uniform(-1.0, 1.0, B)
    s, c = rng.uniform(0.5, 1.5, B), rng.uniform(-0.2, 0.2, B)
    Y = (a[:, None] * np.exp(-0.5 * ((t - mu[:, None]) / s[:, None]) ** 2) + c[:, None]
         + 0.02 * rng.standard_normal((B, M)))
    ref: dict = {}
    print(f"{'dtype':8} {'method':6} {'jac':9} {'status counts':32} {'nfev mean':>9} "
          f"{'max':>4} {'cost vs float64 (median, max rel.)':>36}")
    for dt in (torch.float64, torch.float32):
        tt = torch.tensor(t, dtype=dt)
        y = torch.tensor(Y, dtype=dt)

        def gaussian(p, y, tt=tt):
            a, mu, s, c = p.unbind(-1)
            return a[:, None] * torch.exp(-0.5 * ((tt - mu[:, None]) / s[:, None]) ** 2) \
                + c[:, None] - y

        p0 = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=dt).repeat(B, 1)
        for method in ("trf", "lm"):
            for jac in ("autograd", "2-point"):
                r = batch_least_squares(gaussian, p0, args=(y,), method=method, jac=jac)
                key = (method, jac)
                if dt == torch.float64:
                    ref[key] = r
                rel = (r.cost.double() - ref[key].cost) / ref[key].cost
                st, cnt = np.unique(r.status.numpy(), return_counts=True)
                counts = str(dict(zip(st.tolist(), cnt.tolist(), strict=True)))
                print(f"{str(dt)[6:]:8} {method:6} {jac:9} {counts:32} "
                      f"{float(r.nfev.double().mean()):9.2f} {int(r.nfev.max()):4d} "
                      f"{float(rel.median()):17.1e} {float(rel.abs().max()):18.1e}")


if __name__ == "__main__":
    main()
