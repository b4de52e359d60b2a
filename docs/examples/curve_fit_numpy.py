"""curve_fit with numpy, as with scipy, then many fits at once with batch_curve_fit.

Run with ``python docs/examples/curve_fit_numpy.py``.
"""

import numpy as np
import scipy.optimize

from torchimize_scipy import batch_curve_fit, curve_fit


def func(x, a, b, c):
    return a * np.exp(-b * x) + c


rng = np.random.default_rng(0)
xdata = np.linspace(0, 4, 50)
ydata = func(xdata, 2.5, 1.3, 0.5) + 0.2 * rng.normal(size=xdata.size)

# one fit: same call, same results as scipy.optimize.curve_fit
popt, pcov = curve_fit(func, xdata, ydata)
ref, ref_cov = scipy.optimize.curve_fit(func, xdata, ydata)
print("popt         ", popt)
print("scipy popt   ", ref)
print("perr         ", np.sqrt(np.diag(pcov)))
print("scipy perr   ", np.sqrt(np.diag(ref_cov)))

popt, pcov = curve_fit(func, xdata, ydata, bounds=(0, [3.0, 1.0, 0.5]))
print("bounded popt ", popt)

# 1000 data sets, one call: f receives each parameter as a (b, 1) column
B = 1000
true = np.column_stack([2 + rng.random(B), 1 + rng.random(B), rng.random(B)])
Y = func(xdata, true[:, :1], true[:, 1:2], true[:, 2:]) + 0.05 * rng.normal(size=(B, 50))
popt, pcov = batch_curve_fit(func, xdata, Y, p0=np.ones((B, 3)))
print("batch: max |popt - true| =", np.abs(popt - true).max())
print("batch: median standard errors", np.median(np.sqrt(np.diagonal(pcov, axis1=1, axis2=2)),
                                                 axis=0))
