"""Learn a shared calibration by gradient descent through a batch of fits.

An instrument records B = 32 spectra on a pixel axis ``t``; each holds one
emission line whose true position ``mu_ref`` (in physical units) is known
from a line list. Physical positions are ``kappa * t`` with an unknown gain
``kappa``. For a trial ``kappa``, every spectrum is fitted by a Gaussian peak
in physical units with ``batch_least_squares``; the training loss is the mean
squared difference between the fitted line positions and ``mu_ref``.
``kappa`` is a tensor that requires grad and is captured by the model, so the
fitted positions ``res.x[:, 1]`` are differentiable with respect to it
(implicit differentiation at each solution, with the full Hessian of every
fit) and an ordinary torch optimiser learns ``kappa``.

The left panel shows the loss over the training steps (log scale), the right
one the learned gain approaching the true one.
"""

import matplotlib.pyplot as plt
import torch

from torchimize_scipy import batch_least_squares

torch.manual_seed(0)
dt = torch.float64
B, M = 32, 40
t = torch.linspace(-3, 3, M, dtype=dt)  # pixel axis
kappa_true = 1.25

mu_ref = torch.empty(B, dtype=dt).uniform_(-2.5, 2.5)  # line list (physical units)
amp = torch.empty(B, dtype=dt).uniform_(1.0, 3.0)
width = torch.empty(B, dtype=dt).uniform_(0.4, 0.8)
y = amp[:, None] * torch.exp(-0.5 * ((kappa_true * t - mu_ref[:, None]) / width[:, None]) ** 2)
y = y + 0.02 * torch.randn(B, M, dtype=dt)  # measured spectra

kappa = torch.tensor(1.0, dtype=dt, requires_grad=True)  # initial calibration


def residuals(p, y):  # p (b, 3) = amplitude, position, width; uses the captured kappa
    a, mu, s = p[:, :1], p[:, 1:2], p[:, 2:3]
    return a * torch.exp(-0.5 * ((kappa * t - mu) / s) ** 2) - y


# start each fit at the brightest pixel of its spectrum, in the current calibration
x_peak = t[y.argmax(1)]
opt = torch.optim.SGD([kappa], lr=0.3)
losses, gains = [], []
for _ in range(12):
    with torch.no_grad():
        p0 = torch.stack([y.amax(1), kappa * x_peak, torch.full((B,), 0.6, dtype=dt)], -1)
    res = batch_least_squares(residuals, p0, args=(y,), jac="autograd", method="trf")
    loss = ((res.x[:, 1] - mu_ref) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    gains.append(kappa.item())

print(f"learned gain {gains[-1]:.5f} (true {kappa_true}), final loss {losses[-1]:.2e}")

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 3.4))
ax0.semilogy(losses, marker="o", ms=3)
ax0.set_xlabel("training step")
ax0.set_ylabel("mean squared line-position error")
ax0.set_title(f"loss through {B} fits per step")
ax1.plot(gains, marker="o", ms=3, label="learned gain")
ax1.axhline(kappa_true, color="k", ls="--", lw=1, label="true gain")
ax1.set_xlabel("training step")
ax1.set_ylabel("kappa")
ax1.legend()
fig.tight_layout()
