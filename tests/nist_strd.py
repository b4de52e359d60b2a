"""NIST StRD nonlinear regression datasets: loader, models and accuracy measures.

The NIST/ITL Statistical Reference Datasets (StRD) for nonlinear regression are
27 small least-squares problems, each with two starting points and parameter
values certified to 11 significant digits (computed by NIST in 128-bit
arithmetic).  The unmodified ``.dat`` files live in ``tests/data/nist/``.

This module reads those files, supplies each dataset's model ``f(b, x)`` with a
hand-written analytic Jacobian ``df/db`` (numpy, float64), and defines the log
relative error (LRE) used to count correct significant digits.

The residual convention is ``r(b) = f(b, x) - y``; for Nelson, whose model is
written for ``log(y)``, it is ``r(b) = f(b, x) - log(y)``.

Also provided is a parser for ``tests/data/nist/scipy_baseline.txt``, the LRE
that ``scipy.optimize.least_squares`` (scipy 1.17.1) reaches on every dataset,
start and solver configuration.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "BASELINE_PATH",
    "DATA_DIR",
    "DATASET_NAMES",
    "SOLVER_CONFIGS",
    "BaselineEntry",
    "NistProblem",
    "SolverConfig",
    "find_baseline_config",
    "load_all",
    "load_baseline",
    "load_problem",
    "lre",
]

DATA_DIR = Path(__file__).resolve().parent / "data" / "nist"
"""Directory holding the NIST ``.dat`` files and ``scipy_baseline.txt``."""

BASELINE_PATH = DATA_DIR / "scipy_baseline.txt"
"""Recorded LREs of ``scipy.optimize.least_squares`` on the datasets."""

DATASET_NAMES: tuple[str, ...] = (
    # lower difficulty
    "Misra1a", "Chwirut2", "Chwirut1", "Lanczos3", "Gauss1", "Gauss2", "DanWood", "Misra1b",
    # average difficulty
    "Kirby2", "Hahn1", "Nelson", "MGH17", "Lanczos1", "Lanczos2", "Gauss3", "Misra1c",
    "Misra1d", "Roszman1", "ENSO",
    # higher difficulty
    "MGH09", "Thurber", "BoxBOD", "Rat42", "MGH10", "Eckerle4", "Rat43", "Bennett5",
)  # fmt: skip
"""The 27 dataset names, in NIST's order (by difficulty)."""

LRE_MAX = 11.0
"""Upper clip of :func:`lre`: NIST certifies 11 significant digits."""

Array = NDArray[np.float64]
Model = Callable[[Array, Array], Array]


# ---------------------------------------------------------------------------
# Models and their analytic Jacobians.
#
# Every model takes ``b`` of shape (p,) and ``x`` of shape (m,) (Nelson:
# (m, 2)) and returns f of shape (m,); every Jacobian returns df/db of shape
# (m, p).  Formulas are transcribed from the ``Model:`` block of each file.
# ---------------------------------------------------------------------------


def _stack(*columns: Array) -> Array:
    """Stack Jacobian columns into an ``(m, p)`` float64 array."""
    m = max(np.shape(c)[0] for c in columns if np.ndim(c) > 0)
    return np.column_stack([np.broadcast_to(c, (m,)) for c in columns]).astype(np.float64)


# y = b1*(1-exp[-b2*x])                       (Misra1a, BoxBOD)
def _exp_rise(b: Array, x: Array) -> Array:
    return b[0] * (1.0 - np.exp(-b[1] * x))


def _exp_rise_jac(b: Array, x: Array) -> Array:
    e = np.exp(-b[1] * x)
    return _stack(1.0 - e, b[0] * x * e)


# y = exp[-b1*x]/(b2+b3*x)                    (Chwirut1, Chwirut2)
def _chwirut(b: Array, x: Array) -> Array:
    return np.exp(-b[0] * x) / (b[1] + b[2] * x)


def _chwirut_jac(b: Array, x: Array) -> Array:
    e = np.exp(-b[0] * x)
    d = b[1] + b[2] * x
    return _stack(-x * e / d, -e / d**2, -x * e / d**2)


# y = b1*exp(-b2*x) + b3*exp(-b4*x) + b5*exp(-b6*x)   (Lanczos1-3)
def _lanczos(b: Array, x: Array) -> Array:
    return b[0] * np.exp(-b[1] * x) + b[2] * np.exp(-b[3] * x) + b[4] * np.exp(-b[5] * x)


def _lanczos_jac(b: Array, x: Array) -> Array:
    e1, e2, e3 = np.exp(-b[1] * x), np.exp(-b[3] * x), np.exp(-b[5] * x)
    return _stack(e1, -b[0] * x * e1, e2, -b[2] * x * e2, e3, -b[4] * x * e3)


# y = b1*exp( -b2*x ) + b3*exp( -(x-b4)**2 / b5**2 ) + b6*exp( -(x-b7)**2 / b8**2 )
#                                             (Gauss1-3)
def _gauss(b: Array, x: Array) -> Array:
    return (
        b[0] * np.exp(-b[1] * x)
        + b[2] * np.exp(-((x - b[3]) ** 2) / b[4] ** 2)
        + b[5] * np.exp(-((x - b[6]) ** 2) / b[7] ** 2)
    )


def _gauss_jac(b: Array, x: Array) -> Array:
    e0 = np.exp(-b[1] * x)
    u1, u2 = x - b[3], x - b[6]
    g1 = np.exp(-(u1**2) / b[4] ** 2)
    g2 = np.exp(-(u2**2) / b[7] ** 2)
    return _stack(
        e0,
        -b[0] * x * e0,
        g1,
        b[2] * g1 * 2.0 * u1 / b[4] ** 2,
        b[2] * g1 * 2.0 * u1**2 / b[4] ** 3,
        g2,
        b[5] * g2 * 2.0 * u2 / b[7] ** 2,
        b[5] * g2 * 2.0 * u2**2 / b[7] ** 3,
    )


# y = b1*x**b2                                (DanWood)
def _danwood(b: Array, x: Array) -> Array:
    return b[0] * x ** b[1]


def _danwood_jac(b: Array, x: Array) -> Array:
    p = x ** b[1]
    return _stack(p, b[0] * p * np.log(x))


# y = b1 * (1-(1+b2*x/2)**(-2))               (Misra1b)
def _misra1b(b: Array, x: Array) -> Array:
    return b[0] * (1.0 - (1.0 + b[1] * x / 2.0) ** (-2))


def _misra1b_jac(b: Array, x: Array) -> Array:
    t = 1.0 + b[1] * x / 2.0
    return _stack(1.0 - t ** (-2), b[0] * x * t ** (-3))


# y = b1 * (1-(1+2*b2*x)**(-.5))              (Misra1c)
def _misra1c(b: Array, x: Array) -> Array:
    return b[0] * (1.0 - (1.0 + 2.0 * b[1] * x) ** (-0.5))


def _misra1c_jac(b: Array, x: Array) -> Array:
    t = 1.0 + 2.0 * b[1] * x
    return _stack(1.0 - t ** (-0.5), b[0] * x * t ** (-1.5))


# y = b1*b2*x*((1+b2*x)**(-1))                (Misra1d)
def _misra1d(b: Array, x: Array) -> Array:
    return b[0] * b[1] * x * (1.0 + b[1] * x) ** (-1)


def _misra1d_jac(b: Array, x: Array) -> Array:
    t = 1.0 + b[1] * x
    return _stack(b[1] * x / t, b[0] * x / t**2)


# y = (b1 + b2*x + b3*x**2) / (1 + b4*x + b5*x**2)          (Kirby2)
def _kirby2(b: Array, x: Array) -> Array:
    return (b[0] + b[1] * x + b[2] * x**2) / (1.0 + b[3] * x + b[4] * x**2)


def _kirby2_jac(b: Array, x: Array) -> Array:
    num = b[0] + b[1] * x + b[2] * x**2
    den = 1.0 + b[3] * x + b[4] * x**2
    return _stack(1.0 / den, x / den, x**2 / den, -x * num / den**2, -(x**2) * num / den**2)


# y = (b1+b2*x+b3*x**2+b4*x**3) / (1+b5*x+b6*x**2+b7*x**3)  (Hahn1, Thurber)
def _cubic_rational(b: Array, x: Array) -> Array:
    num = b[0] + b[1] * x + b[2] * x**2 + b[3] * x**3
    den = 1.0 + b[4] * x + b[5] * x**2 + b[6] * x**3
    return num / den


def _cubic_rational_jac(b: Array, x: Array) -> Array:
    num = b[0] + b[1] * x + b[2] * x**2 + b[3] * x**3
    den = 1.0 + b[4] * x + b[5] * x**2 + b[6] * x**3
    q = num / den**2
    return _stack(1.0 / den, x / den, x**2 / den, x**3 / den, -x * q, -(x**2) * q, -(x**3) * q)


# log[y] = b1 - b2*x1 * exp[-b3*x2]           (Nelson; x[:, 0] = x1, x[:, 1] = x2)
def _nelson(b: Array, x: Array) -> Array:
    x1, x2 = x[:, 0], x[:, 1]
    return b[0] - b[1] * x1 * np.exp(-b[2] * x2)


def _nelson_jac(b: Array, x: Array) -> Array:
    x1, x2 = x[:, 0], x[:, 1]
    e = np.exp(-b[2] * x2)
    return _stack(np.ones_like(x1), -x1 * e, b[1] * x1 * x2 * e)


# y = b1 + b2*exp[-x*b4] + b3*exp[-x*b5]      (MGH17)
def _mgh17(b: Array, x: Array) -> Array:
    return b[0] + b[1] * np.exp(-x * b[3]) + b[2] * np.exp(-x * b[4])


def _mgh17_jac(b: Array, x: Array) -> Array:
    e4, e5 = np.exp(-x * b[3]), np.exp(-x * b[4])
    return _stack(np.ones_like(x), e4, e5, -x * b[1] * e4, -x * b[2] * e5)


# y = b1 - b2*x - arctan[b3/(x-b4)]/pi        (Roszman1)
def _roszman1(b: Array, x: Array) -> Array:
    return b[0] - b[1] * x - np.arctan(b[2] / (x - b[3])) / np.pi


def _roszman1_jac(b: Array, x: Array) -> Array:
    u = x - b[3]
    d = u**2 + b[2] ** 2
    return _stack(np.ones_like(x), -x, -u / d / np.pi, -b[2] / d / np.pi)


# y = b1 + b2*cos( 2*pi*x/12 ) + b3*sin( 2*pi*x/12 )
#        + b5*cos( 2*pi*x/b4 ) + b6*sin( 2*pi*x/b4 )
#        + b8*cos( 2*pi*x/b7 ) + b9*sin( 2*pi*x/b7 )        (ENSO)
def _enso(b: Array, x: Array) -> Array:
    t0 = 2.0 * np.pi * x / 12.0
    t1 = 2.0 * np.pi * x / b[3]
    t2 = 2.0 * np.pi * x / b[6]
    return (
        b[0]
        + b[1] * np.cos(t0)
        + b[2] * np.sin(t0)
        + b[4] * np.cos(t1)
        + b[5] * np.sin(t1)
        + b[7] * np.cos(t2)
        + b[8] * np.sin(t2)
    )


def _enso_jac(b: Array, x: Array) -> Array:
    t0 = 2.0 * np.pi * x / 12.0
    t1 = 2.0 * np.pi * x / b[3]
    t2 = 2.0 * np.pi * x / b[6]
    c1, s1, c2, s2 = np.cos(t1), np.sin(t1), np.cos(t2), np.sin(t2)
    # d t1 / d b4 = -2*pi*x / b4**2, d t2 / d b7 = -2*pi*x / b7**2
    dt1 = 2.0 * np.pi * x / b[3] ** 2
    dt2 = 2.0 * np.pi * x / b[6] ** 2
    return _stack(
        np.ones_like(x),
        np.cos(t0),
        np.sin(t0),
        (b[4] * s1 - b[5] * c1) * dt1,
        c1,
        s1,
        (b[7] * s2 - b[8] * c2) * dt2,
        c2,
        s2,
    )


# y = b1*(x**2+x*b2) / (x**2+x*b3+b4)         (MGH09)
def _mgh09(b: Array, x: Array) -> Array:
    return b[0] * (x**2 + x * b[1]) / (x**2 + x * b[2] + b[3])


def _mgh09_jac(b: Array, x: Array) -> Array:
    num = x**2 + x * b[1]
    den = x**2 + x * b[2] + b[3]
    return _stack(num / den, b[0] * x / den, -b[0] * num * x / den**2, -b[0] * num / den**2)


# y = b1 / (1+exp[b2-b3*x])                   (Rat42)
def _rat42(b: Array, x: Array) -> Array:
    return b[0] / (1.0 + np.exp(b[1] - b[2] * x))


def _rat42_jac(b: Array, x: Array) -> Array:
    e = np.exp(b[1] - b[2] * x)
    return _stack(1.0 / (1.0 + e), -b[0] * e / (1.0 + e) ** 2, b[0] * x * e / (1.0 + e) ** 2)


# y = b1 * exp[b2/(x+b3)]                     (MGH10)
def _mgh10(b: Array, x: Array) -> Array:
    return b[0] * np.exp(b[1] / (x + b[2]))


def _mgh10_jac(b: Array, x: Array) -> Array:
    t = x + b[2]
    e = np.exp(b[1] / t)
    f = b[0] * e
    return _stack(e, f / t, -f * b[1] / t**2)


# y = (b1/b2) * exp[-0.5*((x-b3)/b2)**2]      (Eckerle4)
def _eckerle4(b: Array, x: Array) -> Array:
    return (b[0] / b[1]) * np.exp(-0.5 * ((x - b[2]) / b[1]) ** 2)


def _eckerle4_jac(b: Array, x: Array) -> Array:
    u = (x - b[2]) / b[1]
    e = np.exp(-0.5 * u**2)
    f = (b[0] / b[1]) * e
    return _stack(e / b[1], f * (u**2 - 1.0) / b[1], f * u / b[1])


# y = b1 / ((1+exp[b2-b3*x])**(1/b4))         (Rat43)
def _rat43(b: Array, x: Array) -> Array:
    return b[0] / (1.0 + np.exp(b[1] - b[2] * x)) ** (1.0 / b[3])


def _rat43_jac(b: Array, x: Array) -> Array:
    e = np.exp(b[1] - b[2] * x)
    s = 1.0 + e
    p = s ** (-1.0 / b[3])
    f = b[0] * p
    # d/db2 = -b1 * e * s**(-1/b4 - 1) / b4
    return _stack(p, -f * e / (b[3] * s), f * x * e / (b[3] * s), f * np.log(s) / b[3] ** 2)


# y = b1 * (b2+x)**(-1/b3)                    (Bennett5)
def _bennett5(b: Array, x: Array) -> Array:
    return b[0] * (b[1] + x) ** (-1.0 / b[2])


def _bennett5_jac(b: Array, x: Array) -> Array:
    t = b[1] + x
    p = t ** (-1.0 / b[2])
    f = b[0] * p
    return _stack(p, -f / (b[2] * t), f * np.log(t) / b[2] ** 2)


_MODELS: dict[str, tuple[Model, Model]] = {
    "Misra1a": (_exp_rise, _exp_rise_jac),
    "Chwirut2": (_chwirut, _chwirut_jac),
    "Chwirut1": (_chwirut, _chwirut_jac),
    "Lanczos3": (_lanczos, _lanczos_jac),
    "Gauss1": (_gauss, _gauss_jac),
    "Gauss2": (_gauss, _gauss_jac),
    "DanWood": (_danwood, _danwood_jac),
    "Misra1b": (_misra1b, _misra1b_jac),
    "Kirby2": (_kirby2, _kirby2_jac),
    "Hahn1": (_cubic_rational, _cubic_rational_jac),
    "Nelson": (_nelson, _nelson_jac),
    "MGH17": (_mgh17, _mgh17_jac),
    "Lanczos1": (_lanczos, _lanczos_jac),
    "Lanczos2": (_lanczos, _lanczos_jac),
    "Gauss3": (_gauss, _gauss_jac),
    "Misra1c": (_misra1c, _misra1c_jac),
    "Misra1d": (_misra1d, _misra1d_jac),
    "Roszman1": (_roszman1, _roszman1_jac),
    "ENSO": (_enso, _enso_jac),
    "MGH09": (_mgh09, _mgh09_jac),
    "Thurber": (_cubic_rational, _cubic_rational_jac),
    "BoxBOD": (_exp_rise, _exp_rise_jac),
    "Rat42": (_rat42, _rat42_jac),
    "MGH10": (_mgh10, _mgh10_jac),
    "Eckerle4": (_eckerle4, _eckerle4_jac),
    "Rat43": (_rat43, _rat43_jac),
    "Bennett5": (_bennett5, _bennett5_jac),
}


# ---------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NistProblem:
    """One NIST StRD nonlinear regression dataset.

    Attributes
    ----------
    name : str
        Dataset name, e.g. ``"Misra1a"``.
    difficulty : str
        NIST's level of difficulty: ``"lower"``, ``"average"`` or ``"higher"``.
    formula : str
        The model formula as printed in the file's header.
    x : ndarray
        Predictor values, shape ``(m,)``; shape ``(m, 2)`` (columns ``x1``,
        ``x2``) for Nelson.
    y : ndarray
        Observed response, shape ``(m,)``, as stored in the file.
    response : ndarray
        What the model fits, shape ``(m,)``: ``y``, or ``log(y)`` for Nelson.
    start1, start2 : ndarray
        NIST's two starting points, shape ``(p,)``.
    certified_params : ndarray
        Certified parameter values, shape ``(p,)``.
    certified_stddev : ndarray
        Certified standard deviations of the parameters, shape ``(p,)``.
    certified_rss : float
        Certified residual sum of squares.
    model : callable
        ``model(b, x) -> f``, shape ``(m,)``.
    model_jac : callable
        ``model_jac(b, x) -> df/db``, shape ``(m, p)``, written by hand.
    """

    name: str
    difficulty: str
    formula: str
    x: Array
    y: Array
    response: Array
    start1: Array
    start2: Array
    certified_params: Array
    certified_stddev: Array
    certified_rss: float
    model: Model
    model_jac: Model

    @property
    def n_params(self) -> int:
        """Number of parameters ``p``."""
        return self.certified_params.shape[0]

    @property
    def n_obs(self) -> int:
        """Number of observations ``m``."""
        return self.response.shape[0]

    def start(self, which: int) -> Array:
        """Return a copy of NIST starting point ``which`` (1 or 2)."""
        if which == 1:
            return self.start1.copy()
        if which == 2:
            return self.start2.copy()
        raise ValueError(f"`which` must be 1 or 2, got {which!r}.")

    def residual(self, b: ArrayLike) -> Array:
        """Residuals ``r(b) = f(b, x) - response``, shape ``(m,)``."""
        return self.model(np.asarray(b, dtype=np.float64), self.x) - self.response

    def jac(self, b: ArrayLike) -> Array:
        """Analytic Jacobian ``dr/db = df/db`` of :meth:`residual`, shape ``(m, p)``."""
        return self.model_jac(np.asarray(b, dtype=np.float64), self.x)

    def rss(self, b: ArrayLike) -> float:
        """Residual sum of squares ``sum(r(b)**2)``."""
        r = self.residual(b)
        return float(r @ r)


def _header_range(lines: list[str], label: str) -> tuple[int, int]:
    """Return the 1-based inclusive line range ``label (lines a to b)`` in the header."""
    pattern = re.compile(re.escape(label) + r"\s*\(lines\s+(\d+)\s+to\s+(\d+)\)")
    for line in lines[:40]:
        match = pattern.search(line)
        if match:
            return int(match.group(1)), int(match.group(2))
    raise ValueError(f"no {label!r} line range in header")


def _model_formula(lines: list[str]) -> str:
    """Return the formula text of the ``Model:`` block, joined to one line."""
    start = next(i for i, line in enumerate(lines) if line.startswith("Model:"))
    parts: list[str] = []
    # Skip the class line and the "N Parameters" line; stop at the table header.
    for line in lines[start + 2 : 40]:
        if "Starting" in line:
            break
        if line.strip():
            parts.append(line.strip())
    return " ".join(" ".join(parts).split())


@cache
def load_problem(name: str) -> NistProblem:
    """Load dataset ``name`` from ``tests/data/nist/<name>.dat``.

    Parameters
    ----------
    name : str
        One of :data:`DATASET_NAMES`.

    Returns
    -------
    NistProblem
        The parsed dataset with its model and analytic Jacobian.  Cached: the
        arrays are shared between calls and are read-only; :meth:`NistProblem.start`
        returns writable copies.
    """
    if name not in _MODELS:
        raise ValueError(f"`name` must be one of {DATASET_NAMES}, got {name!r}.")
    text = (DATA_DIR / f"{name}.dat").read_text(encoding="ascii")
    lines = text.splitlines()  # handles the files' CRLF line endings

    dataset_line = next(line for line in lines[:5] if line.startswith("Dataset Name:"))
    if dataset_line.split()[2] != name:
        raise ValueError(f"{name}.dat names dataset {dataset_line.split()[2]!r}")

    p_first, p_last = _header_range(lines, "Starting Values")
    d_first, d_last = _header_range(lines, "Data")
    level_line = next(line for line in lines[:40] if "Level of Difficulty" in line)
    difficulty = level_line.split()[0].lower()

    table = []
    for k, line in enumerate(lines[p_first - 1 : p_last], start=1):
        lhs, rhs = line.split("=")
        if lhs.strip() != f"b{k}":
            raise ValueError(f"{name}.dat: expected b{k} on line {p_first + k - 1}")
        table.append([float(v) for v in rhs.split()])
    params = np.array(table, dtype=np.float64)  # columns: start1 start2 certified stddev

    rss_line = next(line for line in lines if line.startswith("Residual Sum of Squares:"))
    certified_rss = float(rss_line.split(":")[1])
    nobs_line = next(line for line in lines if line.startswith("Number of Observations:"))
    n_obs = int(nobs_line.split(":")[1])

    data = np.array(
        [[float(v) for v in line.split()] for line in lines[d_first - 1 : d_last]],
        dtype=np.float64,
    )
    if data.shape[0] != n_obs:
        raise ValueError(f"{name}.dat: {data.shape[0]} data rows, header says {n_obs}")
    y = data[:, 0].copy()
    x = data[:, 1:].copy() if data.shape[1] > 2 else data[:, 1].copy()
    response = np.log(y) if name == "Nelson" else y

    model, model_jac = _MODELS[name]
    start1, start2, certified, stddev = (params[:, k].copy() for k in range(4))
    for arr in (x, y, response, start1, start2, certified, stddev):
        arr.flags.writeable = False  # shared through the cache
    return NistProblem(
        name=name,
        difficulty=difficulty,
        formula=_model_formula(lines),
        x=x,
        y=y,
        response=response,
        start1=start1,
        start2=start2,
        certified_params=certified,
        certified_stddev=stddev,
        certified_rss=certified_rss,
        model=model,
        model_jac=model_jac,
    )


def load_all() -> list[NistProblem]:
    """Load all 27 datasets, in the order of :data:`DATASET_NAMES`."""
    return [load_problem(name) for name in DATASET_NAMES]


# ---------------------------------------------------------------------------
# Log relative error
# ---------------------------------------------------------------------------


def lre(value: ArrayLike, certified: ArrayLike) -> float:
    """Log relative error: the number of significant digits of ``value`` that agree.

    ``LRE = -log10(|value - certified| / |certified|)``, clipped to ``[0, 11]``
    (NIST certifies 11 digits).  An exact match gives 11; a non-finite value
    gives 0.  For arrays, the minimum over elements (the least accurate
    parameter) is returned.

    Parameters
    ----------
    value : array_like
        Computed value(s).
    certified : array_like
        Certified value(s), same shape as ``value``.  A zero certified value
        falls back to the absolute error.

    Returns
    -------
    float
        The (minimum) LRE, in ``[0, 11]``.
    """
    v = np.asarray(value, dtype=np.float64).ravel()
    c = np.asarray(certified, dtype=np.float64).ravel()
    if v.shape != c.shape:
        raise ValueError(f"`value` has shape {v.shape}, `certified` has {c.shape}.")
    result = LRE_MAX
    for vi, ci in zip(v.tolist(), c.tolist(), strict=True):
        if not math.isfinite(vi):
            return 0.0
        err = abs(vi - ci)
        if err == 0.0:
            continue
        rel = err / abs(ci) if ci != 0.0 else err
        result = min(result, -math.log10(rel))
    return float(min(max(result, 0.0), LRE_MAX))


# ---------------------------------------------------------------------------
# scipy baseline
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BaselineEntry:
    """One recorded scipy result (one config, dataset and start).

    Attributes
    ----------
    lre_params : float
        LREb: minimum LRE over the parameters.
    lre_rss : float
        LREs: LRE of the residual sum of squares.
    status : int
        scipy's ``status``.
    max_nfev_hit : bool
        True where the file marks the status with ``*`` (stopped by ``max_nfev``).
    nfev : int
        Number of function evaluations.
    solved : bool
        The file's ``ok`` column: LREb >= 4 before rounding to one decimal.
    """

    lre_params: float
    lre_rss: float
    status: int
    max_nfev_hit: bool
    nfev: int
    solved: bool


_CELL = r"\s*([\d.]+)\s+([\d.]+)\s+(-?\d+)(\*?)\s+(\d+)\s+([YN])\s*"
_ROW = re.compile(r"^(\w+)\s+\w+\s*\|\s*" + _CELL + r"\|" + _CELL + r"$")


def _normalize(label: str) -> str:
    return " ".join(label.split())


@cache
def load_baseline(path: Path = BASELINE_PATH) -> dict[str, dict[tuple[str, int], BaselineEntry]]:
    """Parse ``scipy_baseline.txt``.

    Parameters
    ----------
    path : Path, optional
        The baseline file; defaults to :data:`BASELINE_PATH`.

    Returns
    -------
    dict
        ``{config label: {(dataset, start): BaselineEntry}}``.  Config labels
        are the text after ``Config:`` with runs of whitespace collapsed, e.g.
        ``"lm analytic J, x_scale=default('jac' for lm), ftol=xtol=gtol=1e-15,
        max_nfev=10000"``.
    """
    configs: dict[str, dict[tuple[str, int], BaselineEntry]] = {}
    current: dict[tuple[str, int], BaselineEntry] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("Config:"):
            current = configs.setdefault(_normalize(line[len("Config:") :]), {})
            continue
        if line.startswith("Summary") or line.startswith("Run-to-run"):
            current = None
            continue
        match = _ROW.match(line) if current is not None else None
        if match is None or current is None:
            continue
        name, *cells = match.groups()
        for start, g in ((1, cells[:6]), (2, cells[6:])):
            current[(name, start)] = BaselineEntry(
                lre_params=float(g[0]),
                lre_rss=float(g[1]),
                status=int(g[2]),
                max_nfev_hit=g[3] == "*",
                nfev=int(g[4]),
                solved=g[5] == "Y",
            )
    return configs


def find_baseline_config(prefix: str) -> dict[tuple[str, int], BaselineEntry]:
    """Return the one baseline config whose label starts with ``prefix``.

    Whitespace in ``prefix`` is collapsed as in :func:`load_baseline`.
    """
    prefix = _normalize(prefix)
    hits = [label for label in load_baseline() if label.startswith(prefix)]
    if len(hits) != 1:
        raise KeyError(f"{len(hits)} baseline configs start with {prefix!r}: {hits}")
    return load_baseline()[hits[0]]


# ---------------------------------------------------------------------------
# Solver configurations shared by the tests and ``benchmarks/nist_table.py``
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SolverConfig:
    """A ``least_squares`` configuration that has a scipy baseline.

    Attributes
    ----------
    method : str
        ``least_squares`` ``method``.
    baseline_prefix : str
        Start of the config label in ``scipy_baseline.txt``.
    options : dict
        Keyword arguments for ``least_squares`` besides ``fun``, ``x0`` and
        ``jac`` (the analytic Jacobian is always passed as ``jac``).
    """

    method: str
    baseline_prefix: str
    options: dict[str, object]

    def baseline(self) -> dict[tuple[str, int], BaselineEntry]:
        """The baseline entries of this config, keyed by ``(dataset, start)``."""
        return find_baseline_config(self.baseline_prefix)


_TIGHT: dict[str, object] = {"ftol": 1e-15, "xtol": 1e-15, "gtol": 1e-15, "max_nfev": 10000}

SOLVER_CONFIGS: dict[str, SolverConfig] = {
    # ``x_scale`` is left at its default, as in the baseline ("x_scale=default").
    "trf": SolverConfig(
        method="trf",
        baseline_prefix="trf analytic J, x_scale=default(1.0), ftol=xtol=gtol=1e-15",
        options={"method": "trf", **_TIGHT},
    ),
    "lm": SolverConfig(
        method="lm",
        baseline_prefix="lm analytic J, x_scale=default('jac' for lm), ftol=xtol=gtol=1e-15",
        options={"method": "lm", **_TIGHT},
    ),
}
"""The analytic-Jacobian, tight-tolerance configs, by method."""
