"""curve_fit for a numpy user, then 10,000 datasets with batch_curve_fit.

Left: one noisy exponential decay fitted with ``curve_fit`` exactly as with
``scipy.optimize.curve_fit``, with the 1-sigma uncertainty band of the model
obtained from ``pcov`` (linear error propagation through the model's
gradient). Right: the same model fitted to 10,000 simulated datasets in one
``batch_curve_fit`` call (each parameter reaches the model as a ``(b, 1)``
column, so the numpy expression broadcasts unchanged); the histogram of the
fitted decay rates is compared with the spread predicted by each fit's own
``pcov``.
"""

import matplotlib.pyplot as plt
import numpy as np

from torchimize_scipy import batch_curve_fit, curve_fit


def model(x, a, b, c):
    return a * np.exp(-b * x) + c


truth = (2.5, 1.3, 0.5)
sigma = 0.2
rng = np.random.default_rng(0)
x = np.linspace(0, 4, 50)
y = model(x, *truth) + sigma * rng.normal(size=x.size)

popt, pcov = curve_fit(model, x, y, sigma=np.full(x.size, sigma), absolute_sigma=True)

# uncertainty band: gradient of the model with respect to the parameters
xs = np.linspace(0, 4, 200)
a, b, c = popt
grad = np.stack([np.exp(-b * xs), -a * xs * np.exp(-b * xs), np.ones_like(xs)], axis=1)
band = np.sqrt(np.einsum("ij,jk,ik->i", grad, pcov, grad))

# 10,000 datasets in one call
B = 10_000
Y = model(x, *truth) + sigma * rng.normal(size=(B, x.size))
popts, pcovs = batch_curve_fit(model, x, Y, p0=np.ones((B, 3)),
                               sigma=np.full(x.size, sigma), absolute_sigma=True)
rates = popts[:, 1]
predicted = np.sqrt(np.median(pcovs[:, 1, 1]))

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
ax1.errorbar(x, y, yerr=sigma, fmt=".", color="0.4", label="data")
ax1.plot(xs, model(xs, *popt), "C0", label="curve_fit")
ax1.fill_between(xs, model(xs, *popt) - band, model(xs, *popt) + band, color="C0",
                 alpha=0.3, label="1-sigma band")
ax1.set_xlabel("x")
ax1.set_ylabel("y")
ax1.legend()
ax1.set_title(f"b = {popt[1]:.3f} ± {np.sqrt(pcov[1, 1]):.3f}")

ax2.hist(rates, bins=60, density=True, color="C1", alpha=0.7,
         label=f"{B:,} fits, std {rates.std():.4f}")
grid = np.linspace(rates.min(), rates.max(), 200)
ax2.plot(grid, np.exp(-0.5 * ((grid - truth[1]) / predicted) ** 2)
         / (predicted * np.sqrt(2 * np.pi)), "k", label=f"pcov predicts {predicted:.4f}")
ax2.axvline(truth[1], color="k", ls=":")
ax2.set_xlabel("fitted decay rate b")
ax2.legend()
ax2.set_title("batch_curve_fit")
fig.tight_layout()
