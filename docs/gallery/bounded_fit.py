"""Bounded fit: a Michaelis-Menten curve with a parameter pinned at a bound.

Enzyme kinetics ``v = Vmax * s / (Km + s)``: the data only reach half of the
saturation level, so the unconstrained fit extrapolates to a large ``Vmax``.
Physical knowledge (``Vmax <= 1.2``, ``Km >= 0``) enters as ``bounds``; the
solver ('trf', the default) ends on the bound, and ``res.active_mask`` says
which bound is active (+1: upper, -1: lower, 0: free), exactly as in scipy.
"""

import matplotlib.pyplot as plt
import numpy as np
from scipy.optimize import least_squares as scipy_least_squares

from torchimize_scipy import least_squares

rng = np.random.default_rng(1)
s = np.linspace(0.05, 2.0, 25)
v_true = 1.5 * s / (2.0 + s)
v = v_true + 0.01 * rng.standard_normal(s.size)


def residuals(p, s, v):
    vmax, km = p
    return vmax * s / (km + s) - v


x0 = np.array([1.0, 1.0])
free = least_squares(residuals, x0, args=(s, v))
bounded = least_squares(residuals, x0, bounds=([0.0, 0.0], [1.2, np.inf]), args=(s, v))
reference = scipy_least_squares(residuals, x0, bounds=([0.0, 0.0], [1.2, np.inf]),
                                args=(s, v))

s_plot = np.linspace(0, 6, 300)
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
ax.plot(s, v, "o", color="0.3", label="data")
for res, name in ((free, "no bounds"), (bounded, "Vmax <= 1.2")):
    vmax, km = res.x
    ax.plot(s_plot, vmax * s_plot / (km + s_plot), lw=2,
            label=f"{name}: Vmax={vmax:.3f}, Km={km:.3f}, active_mask={res.active_mask}")
ax.axhline(1.2, color="k", ls=":", lw=1)
ax.set_xlabel("substrate s")
ax.set_ylabel("rate v")
ax.legend(fontsize=8, loc="lower right")
ax.set_title("least_squares(..., bounds=([0, 0], [1.2, inf]))")

# The cost landscape, the feasible box and both solutions.
vm, kk = np.meshgrid(np.linspace(0.5, 3.0, 200), np.linspace(0.1, 6.0, 200))
cost = 0.5 * (((vm[..., None] * s / (kk[..., None] + s)) - v) ** 2).sum(-1)
ax2.contourf(vm, kk, np.log10(cost), levels=30, cmap="viridis")
ax2.axvline(1.2, color="w", ls="--")
ax2.plot(*free.x, "r*", ms=12, label="no bounds")
ax2.plot(*bounded.x, "wo", ms=8, label="bounded (ours)")
ax2.plot(*reference.x, "k+", ms=12, mew=2, label="bounded (scipy)")
ax2.set_xlabel("Vmax")
ax2.set_ylabel("Km")
ax2.set_title("log10 cost; feasible region: Vmax <= 1.2")
ax2.legend(fontsize=8)
fig.tight_layout()
