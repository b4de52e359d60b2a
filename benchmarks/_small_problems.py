"""The small single problems shared by ``ab_small.py``, ``bench_busy.py`` and ``ops_small.py``.

Rosenbrock from (-1.2, 1) (numpy, with its analytic Jacobian) and scipy's
``curve_fit`` documentation example (``a exp(-b x) + c`` on 50 points with
noise of standard deviation 0.2, seed 0).
"""

from __future__ import annotations

import numpy as np


def rosenbrock(x):
    return np.array([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def rosenbrock_jac(x):
    return np.array([[-20 * x[0], 10.0], [-1.0, 0.0]])


def decay(x, a, b, c):
    return a * np.exp(-b * x) + c


def decay_data() -> tuple[np.ndarray, np.ndarray]:
    """``xdata, ydata`` of scipy's ``curve_fit`` example (truth 2.5, 1.3, 0.5)."""
    xd = np.linspace(0, 4, 50)
    yd = decay(xd, 2.5, 1.3, 0.5) + 0.2 * np.random.default_rng(0).normal(size=xd.size)
    return xd, yd
