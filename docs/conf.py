"""Sphinx configuration of the torchimize_scipy documentation.

Build (from the repository root, no network needed at build time)::

    pip install -e ".[docs]" && sphinx-build -W --keep-going -b html docs docs/_build/html

The gallery scripts (``docs/gallery/*.py``) run through matplotlib's ``plot``
directive and the notebook (``docs/notebooks/*.ipynb``) through myst-nb, both
at build time. Pages that depend on parts of the package or of the docs
written elsewhere (``curve_fit``, ``torchimize_scipy.functions``,
``docs/torchimize_migration.md``, ``docs/examples/curve_fit_numpy.py``)
are filled in by :func:`_fill_optional` with what exists when the docs are
built, so the build passes whether or not those parts are there yet.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# Use the checkout's package even when it is not installed (it normally is: -e).
sys.path.insert(0, str(ROOT))

os.environ.setdefault("MPLBACKEND", "Agg")  # the plot directive and notebooks run headless

import torchimize_scipy  # noqa: E402

# -- Project -----------------------------------------------------------------
project = "torchimize_scipy"
author = "torchimize_scipy developers"
copyright = "torchimize_scipy developers, BSD-3-Clause"  # noqa: A001
release = torchimize_scipy.__version__
version = ".".join(release.split(".")[:2])

# -- Extensions --------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",  # MathJax is loaded by the reader's browser, not at build time
    "numpydoc",
    "myst_nb",  # Markdown pages (it activates myst-parser) and executed notebooks
    "matplotlib.sphinxext.plot_directive",
]
# No sphinx.ext.intersphinx: the build must not need the network.

root_doc = "index"
exclude_patterns = [
    "_build",
    "README.md",  # how to build the docs; not a page
    "**.ipynb_checkpoints",
    "examples/*.md",
]
templates_path: list[str] = []

# -- Autodoc / numpydoc ------------------------------------------------------
autodoc_typehints = "none"  # the numpydoc "Parameters" sections give the types
autodoc_member_order = "bysource"
numpydoc_show_class_members = False  # BatchOptimizeResult is a dict: no member tables
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()  # see docs/README.md for a validation run

# -- MyST / myst-nb ----------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "force"  # always run the notebooks: outputs are never stored
nb_execution_timeout = 300
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# -- Plot directive (gallery) -----------------------------------------------
plot_include_source = True
plot_html_show_source_link = True
plot_html_show_formats = False
plot_formats = [("png", 100)]
plot_rcparams = {"figure.dpi": 100}
plot_apply_rcparams = True

# -- HTML ---------------------------------------------------------------------
html_theme = "furo"
html_title = f"torchimize_scipy {release}"
html_static_path: list[str] = []
html_theme_options = {
    "source_repository": "https://github.com/torchimize-scipy/torchimize-scipy/",
    "source_branch": "main",
    "source_directory": "docs/",
}
html_show_sourcelink = False

# Nothing is suppressed: a Markdown link that resolves to no page or file
# (e.g. ``../README.md``, outside docs/) fails the -W build. Link to files
# outside docs/ by their repository URL instead.
suppress_warnings: list[str] = []


# -- Optional content --------------------------------------------------------
def _exported(module: object) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in dir(module) if not n.startswith("_")]
    return [n for n in names if hasattr(module, n)]


def _functions_module() -> object | None:
    try:
        return importlib.import_module("torchimize_scipy.functions")
    except ImportError:
        return None


def _autodoc_block(module_name: str, names: list[str]) -> str:
    module = importlib.import_module(module_name)
    lines = []
    for name in names:
        obj = getattr(module, name)
        directive = "autoclass" if inspect.isclass(obj) else "autofunction"
        if not (inspect.isclass(obj) or callable(obj)):
            directive = "autodata"
        lines += [f".. {directive}:: {module_name}.{name}", ""]
    return "\n".join(lines)


CORE = ["least_squares", "batch_least_squares", "BatchOptimizeResult"]
CURVE_FIT = ["curve_fit", "batch_curve_fit"]


def _api_reference() -> str:
    """The body of api.rst: whatever the package exports when the docs are built."""
    exported = _exported(torchimize_scipy)
    parts = []
    core = [n for n in CORE if n in exported]
    parts += ["Least squares", "-------------", "", _autodoc_block("torchimize_scipy", core)]
    fits = [n for n in CURVE_FIT if n in exported]
    if fits:
        parts += ["Curve fitting", "-------------", "", _autodoc_block("torchimize_scipy", fits)]
    other = [n for n in exported if n not in CORE + CURVE_FIT]
    if other:
        parts += ["Other", "-----", "", _autodoc_block("torchimize_scipy", other)]
    functions = _functions_module()
    if functions is not None:
        names = _exported(functions)
        parts += [
            "torchimize-compatible API: ``torchimize_scipy.functions``",
            "---------------------------------------------------------",
            "",
            ".. automodule:: torchimize_scipy.functions",
            "   :no-members:",
            "   :no-index:",
            "",
            _autodoc_block("torchimize_scipy.functions", names),
        ]
    return "\n".join(parts)


def _optional_blocks() -> dict[str, str]:
    """Marker -> replacement text, for the MyST/rst pages that use the marker."""
    has_curve_fit = all(hasattr(torchimize_scipy, n) for n in CURVE_FIT)
    blocks = {"api-reference": _api_reference()}

    blocks["torchimize-migration"] = (
        "The full guide, with worked examples: {doc}`torchimize_migration`.\n\n"
        "```{toctree}\n:hidden:\n\ntorchimize_migration\n```\n"
        if (DOCS / "torchimize_migration.md").exists()
        else ""
    )
    functions = _functions_module()
    blocks["functions-status"] = (
        "`torchimize_scipy.functions` is installed with this version: see its "
        "[API reference](api.rst)."
        if functions is not None
        else "`torchimize_scipy.functions` is not part of this build of the package yet; "
        "until it is, use the scipy-style calls of the last column."
    )
    if has_curve_fit:
        blocks["curve-fit-scipy"] = (
            "`curve_fit` and `batch_curve_fit` are built on these solvers in the same way: "
            "scipy 1.17's signature and return values (`popt, pcov`, and "
            "`infodict, mesg, ier` with `full_output=True`), computed as scipy computes them. "
            "`batch_curve_fit` fits one model to B data sets in one call."
        )
    else:
        blocks["curve-fit-scipy"] = ""
    example = DOCS / "examples" / "curve_fit_numpy.py"
    blocks["curve-fit-example"] = (
        "For example, `docs/examples/curve_fit_numpy.py`:\n\n"
        "```{literalinclude} examples/curve_fit_numpy.py\n:language: python\n```\n"
        if has_curve_fit and example.exists()
        else ""
    )
    return blocks


def _fill_optional(app, docname: str, source: list[str]) -> None:
    """Replace ``<!-- optional: NAME -->`` / ``.. optional: NAME`` markers."""
    text = source[0]
    if "optional:" not in text:
        return
    for name, block in _optional_blocks().items():
        text = text.replace(f"<!-- optional: {name} -->", block)
        text = text.replace(f".. optional: {name}", block)
    source[0] = text


def setup(app):
    app.connect("source-read", _fill_optional)
    return {"parallel_read_safe": True}
