"""Running on the GPU, with a fallback to the CPU.

Nothing in the call changes between devices: the tensors decide. Put the data
and ``x0`` on the GPU and ``fun`` receives (and must return) tensors there;
the result comes back on the same device and in the same dtype (float32 works
too, at float32 accuracy). ``device=`` and ``dtype=`` override ``x0``'s. With
a numpy ``x0``, ``device="cuda"`` moves only the solver's linear algebra to the
GPU: ``fun`` still receives numpy arrays on the host, so write ``fun`` in torch
to keep everything on the device.

Without a GPU the script falls back to the CPU with a smaller batch (2,000
decays); on a GPU it fits 200,000. The title of the figure says which ran.
"""

import time

import matplotlib.pyplot as plt
import torch

from torchimize_scipy import batch_least_squares

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dtype = torch.float64  # torch.float32 is faster on most GPUs
B = 200_000 if device.type == "cuda" else 2_000

gen = torch.Generator(device=device).manual_seed(0)
t = torch.linspace(0, 5, 40, device=device, dtype=dtype)


def decay(p):  # p (b, 3): amplitude, rate, offset
    return p[:, :1] * torch.exp(-p[:, 1:2] * t) + p[:, 2:]


def residuals(p, y):
    return decay(p) - y


def jacobian(p, y):  # analytic (b, 40, 3): cheaper than finite differences
    e = torch.exp(-p[:, 1:2] * t)
    return torch.stack([e, -p[:, :1] * t * e, torch.ones_like(e)], dim=-1)


# True amplitude in [0.5, 2.5], rate in [0.2, 2.2], offset in [0, 0.5].
low = torch.tensor([0.5, 0.2, 0.0], device=device, dtype=dtype)
width = torch.tensor([2.0, 2.0, 0.5], device=device, dtype=dtype)
true = low + width * torch.rand(B, 3, generator=gen, device=device, dtype=dtype)
y = decay(true) + 0.02 * torch.randn(B, t.numel(), generator=gen, device=device, dtype=dtype)
# Starting points from the data: amplitude y[0] - y[-1], rate 1, offset y[-1].
x0 = torch.stack([y[:, 0] - y[:, -1], torch.ones_like(y[:, 0]), y[:, -1]], dim=-1)

if device.type == "cuda":
    torch.cuda.synchronize()
start = time.perf_counter()
res = batch_least_squares(residuals, x0, jac=jacobian, args=(y,), method="lm")
if device.type == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
print(res.x.device, res.x.dtype, res)

# Back to the host for plotting.
x, y_host, t_host = res.x.cpu(), y.cpu(), t.cpu()
fig, axes = plt.subplots(2, 3, figsize=(11, 5), sharex=True)
for i, ax in enumerate(axes.flat):
    ax.plot(t_host, y_host[i], ".", color="0.4")
    ax.plot(t_host, x[i, 0] * torch.exp(-x[i, 1] * t_host) + x[i, 2], "C1", lw=2)
    ax.set_title(f"problem {i}: rate {x[i, 1]:.3f} (true {true[i, 1].item():.3f})", fontsize=9)
fig.suptitle(f"device={device.type}: {B:,} fits in {seconds:.2f} s "
             f"({B / seconds:,.0f} fits/s), {int(res.success.sum()):,} successful")
fig.tight_layout()
