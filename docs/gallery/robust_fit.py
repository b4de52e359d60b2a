"""Robust fit with outliers: ``loss='linear'`` against ``loss='soft_l1'``.

The example of scipy's ``least_squares`` documentation: an exponential decay
with noise and a few gross outliers. The ordinary least-squares fit
(``loss='linear'``) is pulled towards the outliers; the robust loss
``'soft_l1'`` with ``f_scale=0.1`` (residuals above about 0.1 count as
outliers) recovers the true curve.
"""

import matplotlib.pyplot as plt
import numpy as np
import scipy.optimize

from torchimize_scipy import least_squares


def gen_data(t, a, b, c, noise=0.0, n_outliers=0, seed=None):
    rng = np.random.default_rng(seed)
    y = a + b * np.exp(t * c)
    error = noise * rng.standard_normal(t.size)
    outliers = rng.integers(0, t.size, n_outliers)
    error[outliers] *= 10
    return y + error


def residuals(x, t, y):
    return x[0] + x[1] * np.exp(x[2] * t) - y


a, b, c = 0.5, 2.0, -1.0
t_train = np.linspace(0, 10, 15)
y_train = gen_data(t_train, a, b, c, noise=0.1, n_outliers=3, seed=2)
x0 = np.array([1.0, 1.0, 0.0])

res_lsq = least_squares(residuals, x0, args=(t_train, y_train))
res_soft_l1 = least_squares(residuals, x0, loss="soft_l1", f_scale=0.1,
                            args=(t_train, y_train))

# The same two calls with scipy, for comparison.
ref_lsq = scipy.optimize.least_squares(residuals, x0, args=(t_train, y_train))
ref_soft_l1 = scipy.optimize.least_squares(residuals, x0, loss="soft_l1", f_scale=0.1,
                                           args=(t_train, y_train))
diff = max(np.abs(res_lsq.x - ref_lsq.x).max(), np.abs(res_soft_l1.x - ref_soft_l1.x).max())

t_test = np.linspace(0, 10, 300)
fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(t_train, y_train, "o", color="0.3", label="data (3 outliers)")
ax.plot(t_test, gen_data(t_test, a, b, c), "k--", lw=1, label="true curve")
ax.plot(t_test, gen_data(t_test, *res_lsq.x), lw=2,
        label=f"loss='linear'   x = {np.round(res_lsq.x, 3)}")
ax.plot(t_test, gen_data(t_test, *res_soft_l1.x), lw=2,
        label=f"loss='soft_l1'  x = {np.round(res_soft_l1.x, 3)}")
ax.set_xlabel("t")
ax.set_ylabel("y")
ax.set_title("least_squares with a robust loss (true x = [0.5, 2.0, -1.0])")
ax.text(0.98, 0.1, f"max |x - x_scipy| = {diff:.1e}", transform=ax.transAxes, ha="right")
ax.legend()
fig.tight_layout()
