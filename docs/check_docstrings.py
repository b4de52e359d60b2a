"""Validate the public docstrings with numpydoc and list what it finds.

Usage (from the repository root, with the ``docs`` extra installed)::

    python docs/check_docstrings.py          # report; exit status 0
    python docs/check_docstrings.py --strict # exit status 1 when something is found

The Sphinx build does not run these checks (``numpydoc_validation_checks`` is
empty in ``docs/conf.py``), so a missing type or a parameter out of order does
not fail ``sphinx-build -W``; this script reports them with file and line.
Style-only checks (no "See Also" or "Examples" section, summary wording) are
skipped.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys

from numpydoc.validate import validate

SKIPPED = {"ES01", "EX01", "GL01", "GL02", "RT02", "SA01", "SS06"}
MODULES = ("torchimize_scipy", "torchimize_scipy.functions", "torchimize_scipy.dask",
           "torchimize_scipy.xarray")


def public_names() -> list[str]:
    names = []
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        exported = getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")])
        names += [f"{module_name}.{n}" for n in exported if hasattr(module, n)]
    return names


def where(name: str) -> str:
    module_name, attr = name.rsplit(".", 1)
    obj = inspect.unwrap(getattr(importlib.import_module(module_name), attr))
    try:
        path = inspect.getsourcefile(obj) or "?"
        line = inspect.getsourcelines(obj)[1]
    except (TypeError, OSError):
        return "?"
    return f"{path}:{line}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strict", action="store_true", help="exit 1 on any finding")
    args = parser.parse_args(argv)
    found = 0
    for name in public_names():
        errors = [(code, msg) for code, msg in validate(name)["errors"] if code not in SKIPPED]
        if errors:
            print(f"{name}  ({where(name)})")
            for code, msg in errors:
                print(f"    {code} {msg}")
            found += len(errors)
    print(f"{found} finding(s)")
    return 1 if (found and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
