"""A/B record of ``curve_fit``/``batch_curve_fit`` outputs over the test suite's problems.

Used as a pytest plugin, it wraps both functions and stores, per test and call,
``popt``, ``pcov``, ``nfev``, ``njev`` and ``ier`` (numpy) in a pickle; run once
before and once after a change, then compare the two pickles::

    python -m pytest -q -p no:xdist -p benchmarks.curve_fit_ab tests/test_curve_fit.py \
        --ab-out before.pkl
    python benchmarks/curve_fit_ab.py before.pkl after.pkl
"""

from __future__ import annotations

import functools
import pickle
import sys
from typing import Any

import numpy as np

RECORDS: dict[str, list] = {}
_CURRENT = {"test": ""}


def _host(a: Any) -> Any:
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    if isinstance(a, list | tuple):
        return [_host(e) for e in a]
    return np.asarray(a) if a is not None else None


def _wrap(fn: Any) -> Any:
    @functools.wraps(fn)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        rec = {"popt": _host(out[0]), "pcov": _host(out[1])}
        if len(out) == 5:
            info = out[2]
            rec.update(nfev=_host(info.get("nfev")), njev=_host(info.get("njev")),
                       ier=_host(out[4]), fvec=_host(info.get("fvec")))
        RECORDS.setdefault(_CURRENT["test"], []).append((fn.__name__, rec))
        return out
    return recorded


def pytest_addoption(parser: Any) -> None:
    parser.addoption("--ab-out", default="curve_fit_ab.pkl")


def pytest_configure(config: Any) -> None:
    import torchimize_scipy
    import torchimize_scipy._curve_fit as cf

    for name in ("curve_fit", "batch_curve_fit"):
        wrapped = _wrap(getattr(cf, name))
        setattr(cf, name, wrapped)
        setattr(torchimize_scipy, name, wrapped)


def pytest_runtest_setup(item: Any) -> None:
    _CURRENT["test"] = item.nodeid


def pytest_unconfigure(config: Any) -> None:
    with open(config.getoption("--ab-out"), "wb") as fh:
        pickle.dump(RECORDS, fh)


def _same(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def compare(before: str, after: str) -> None:
    """Print, per field, how many recorded calls differ bitwise (and the worst ratio)."""
    with open(before, "rb") as fh:
        a = pickle.load(fh)
    with open(after, "rb") as fh:
        b = pickle.load(fh)
    counts: dict[str, list[int]] = {}
    worst: dict[str, float] = {}
    calls = missing = 0
    for test, recs in a.items():
        other = b.get(test)
        if other is None or len(other) != len(recs):
            missing += 1
            continue
        for (name, r1), (_, r2) in zip(recs, other, strict=True):
            calls += 1
            for key in r1:
                c = counts.setdefault(f"{name}.{key}", [0, 0])
                c[1] += 1
                if not _same(r1[key], r2.get(key)):
                    c[0] += 1
                    try:
                        x, y = np.asarray(r1[key], float), np.asarray(r2[key], float)
                        fin = np.isfinite(x) & np.isfinite(y)
                        rel = np.max(np.abs(x - y)[fin] / np.maximum(np.abs(x[fin]), 1e-300),
                                     initial=0.0)
                        worst[f"{name}.{key}"] = max(worst.get(f"{name}.{key}", 0.0), rel)
                    except (TypeError, ValueError):
                        pass
    print(f"{calls} calls compared; {missing} tests recorded differently")
    for key, (d, t) in sorted(counts.items()):
        print(f"{key:28s} bitwise different: {d:4d} of {t:4d}"
              + (f"   max rel diff {worst[key]:.2e}" if key in worst else ""))


if __name__ == "__main__":
    compare(sys.argv[1], sys.argv[2])
