"""Thousands of Gaussian-peak fits in one call with ``batch_least_squares``.

Each of B noisy spectra (64 samples) holds one Gaussian peak on a constant
background with its own amplitude, position and width. One vectorised model
``fun(p (b, 4), y (b, 64)) -> (b, 64)`` describes them all: ``y`` is passed
in ``args`` and, since its leading dimension is B, it is sliced together with
the parameters, so ``fun`` only ever sees the rows still running (finished
fits are frozen and no longer evaluated). ``jac='autograd'`` gives the exact
Jacobian through :mod:`torch.func`.

The histograms compare the fitted parameters with the true ones, and the
last panel shows the spread of the position estimates against the noise
level predicted by the fitted Jacobians.
"""

import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from torchimize_scipy import batch_least_squares

B, M = 2000, 64
gen = torch.Generator().manual_seed(0)
t = torch.linspace(-3, 3, M, dtype=torch.float64)


def peak(p, t=t):
    a, mu, s, c = p.unbind(-1)
    return a[:, None] * torch.exp(-0.5 * ((t - mu[:, None]) / s[:, None]) ** 2) + c[:, None]


def residuals(p, y):  # p (b, 4), y (b, 64): only the rows still running
    return peak(p) - y


def uniform(lo, hi):
    return lo + (hi - lo) * torch.rand(B, generator=gen, dtype=torch.float64)


true = torch.stack([uniform(0.5, 2.0), uniform(-1.0, 1.0), uniform(0.3, 0.8),
                    uniform(-0.2, 0.2)], dim=-1)
noise = 0.05
y = peak(true) + noise * torch.randn(B, M, generator=gen, dtype=torch.float64)

# A crude starting point from the data themselves: the maximum of each spectrum.
x0 = torch.stack([y.max(1).values, t[y.argmax(1)], torch.full((B,), 0.5, dtype=torch.float64),
                  y.median(1).values], dim=-1)

start = time.perf_counter()
res = batch_least_squares(residuals, x0, args=(y,), jac="autograd", method="trf")
seconds = time.perf_counter() - start
print(res)  # BatchOptimizeResult(problems=2000, success=..., status counts ..., cost ...)
print(res[0].message, res[0].x)  # problem 0 as a scipy OptimizeResult

ok = res.success
err = (res.x - true)[ok].numpy()

# Predicted standard deviation of mu from each fit: sqrt(diag((J^T J)^-1)) * noise.
cov = torch.linalg.inv(res.jac.transpose(1, 2) @ res.jac)
sd_mu = (noise * cov[:, 1, 1].sqrt())[ok].numpy()

names = ["amplitude a", "position mu", "width s", "background c"]
fig, axes = plt.subplots(1, 5, figsize=(16, 3.4))
for k, ax in enumerate(axes[:4]):
    ax.hist(err[:, k], bins=60, color=f"C{k}")
    ax.set_title(f"fitted - true: {names[k]}", fontsize=10)
    ax.set_xlabel(f"std {err[:, k].std():.4f}")
axes[4].hist(err[:, 1] / sd_mu, bins=60, density=True, color="0.5", label="fits")
z = np.linspace(-4, 4, 200)
axes[4].plot(z, np.exp(-0.5 * z**2) / np.sqrt(2 * np.pi), "k", label="N(0, 1)")
axes[4].set_title("(mu - mu_true) / predicted sd", fontsize=10)
axes[4].legend(fontsize=8)
fig.suptitle(f"batch_least_squares: {B} fits (m={M}, n=4, trf, jac='autograd') in "
             f"{seconds:.1f} s on the CPU, {int(ok.sum())} successful", fontsize=11)
fig.tight_layout()
