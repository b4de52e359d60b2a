"""scipy's own ``test_least_squares.py``, rebound to ``torchimize_scipy.least_squares``.

The installed scipy's test module is imported and its module-global
``least_squares`` is replaced by ours, so every test of it
(the mixins per method, the module-level tests) calls this package. Its test
classes and functions are re-exported here and collected by pytest as ours.
Tests that still fail are listed in :data:`KNOWN_FAILURES` with the reason and
marked ``xfail(strict=True)``: one that starts passing fails the suite, so the
list stays exact. :func:`test_pass_count` states issue 13's goal: at least 122
of scipy 1.17's 126 tests pass.

scipy wheels ship their tests (``scipy/optimize/tests``); where an install
lacks them, the whole module is skipped and says so.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

import torchimize_scipy

_NAME = "scipy.optimize.tests.test_least_squares"


def _load_scipy_suite():
    """scipy's ``test_least_squares`` module with ``least_squares`` rebound to ours.

    It is imported under its own name (``scipy.optimize.tests.test_least_squares``)
    so that its functions pickle by reference: ``test_workers`` sends them to a
    process pool, whose spawned workers import that module again.
    """
    try:
        mod = importlib.import_module(_NAME)
    except ImportError:  # pragma: no cover - a scipy install without its tests
        return None
    mod.least_squares = torchimize_scipy.least_squares
    return mod


_SUITE = _load_scipy_suite()
if _SUITE is None:  # pragma: no cover
    pytest.skip("this scipy install has no scipy/optimize/tests/test_least_squares.py",
                allow_module_level=True)

#: ``"Class::test"`` or ``"test"`` (module level) -> why it fails with this package.
KNOWN_FAILURES: dict[str, str] = {}

#: scipy 1.17's count of tests in the file (the classes' methods, parametrised
#: cases counted once each as pytest collects them) and the issue's goal.
SCIPY_TEST_COUNT = 126
GOAL_PASSING = 122


def _xfail(func, reason: str):
    return pytest.mark.xfail(reason=reason, strict=True)(func)


def _export() -> list[str]:
    """Re-export scipy's test classes (as subclasses carrying the xfail marks) and functions."""
    names = []
    for name, obj in vars(_SUITE).items():
        if not name.startswith("Test") and not name.startswith("test_"):
            continue
        if inspect.isclass(obj) and name.startswith("Test"):
            body = {"__module__": __name__, "__qualname__": name}
            for attr in dir(obj):
                key = f"{name}::{attr}"
                if attr.startswith("test_") and key in KNOWN_FAILURES:
                    body[attr] = _xfail(getattr(obj, attr), KNOWN_FAILURES[key])
            globals()[name] = type(name, (obj,), body)
            names.append(name)
        elif inspect.isfunction(obj) and name.startswith("test_"):
            wrapped = _xfail(obj, KNOWN_FAILURES[name]) if name in KNOWN_FAILURES else obj
            globals()[f"test_scipy_{name[5:]}"] = wrapped
            names.append(name)
    return names


_EXPORTED = _export()


def test_known_failures_exist() -> None:
    """Every entry of :data:`KNOWN_FAILURES` names a test of scipy's file (no stale entries)."""
    for key in KNOWN_FAILURES:
        if "::" in key:
            cls, attr = key.split("::")
            assert hasattr(getattr(_SUITE, cls), attr), key
        else:
            assert inspect.isfunction(getattr(_SUITE, key, None)), key


def test_pass_count() -> None:
    """Issue 13's goal: at least 122 of the file's 126 tests pass with this package."""
    assert SCIPY_TEST_COUNT - len(KNOWN_FAILURES) >= GOAL_PASSING, sorted(KNOWN_FAILURES)
