"""Sphinx configuration: Markdown pages (MyST) and the API reference from the docstrings.

Build: ``sphinx-build -W -b html docs docs/_build/html`` (the nox ``docs`` session).
Everything needed is local: no intersphinx, no network.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sphinx.application import Sphinx

# Document the source tree, also when the package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import graceful_restart_trio

project = "graceful-restart-trio"
author = "graceful-restart-trio developers"
copyright = "graceful-restart-trio developers"
release = graceful_restart_trio.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "README.md"]

# MyST: ``{eval-rst}`` blocks for autodoc, anchors on headings for cross-page links.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# benchmarks.md (written with the benchmarks) links to ../benchmarks/README.md, a file
# outside the documentation. MyST renders that one link as plain text; ignore only it.
nitpick_ignore_regex = [("myst", r".*/benchmarks/README")]

# autodoc: members in source order, type hints in the signature.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Keep the ASGI alias's name in signatures instead of its three-line expansion.
autodoc_type_aliases = {"ASGIApp": "graceful_restart_trio.asgi.ASGIApp"}

# napoleon: Google style ("Args:", "Raises:", "Attributes:").
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_attr_annotations = False  # types would name private modules (_state.State)

html_theme = "furo"
html_title = f"graceful-restart-trio {release}"
html_static_path: list[str] = []


def _hide_class_signature(  # noqa: PLR0917 - the arguments of autodoc-process-signature
    app: Sphinx,
    what: str,
    name: str,
    obj: object,
    options: object,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str, str | None] | None:
    """No constructor signature on class headers.

    The library makes these objects itself (GracefulRestart, Statistics, LeaseCounter)
    or documents them field by field (Options); the attrs-generated ``__init__`` would
    show private fields and converter types instead.
    """
    if what == "class" and name.startswith("graceful_restart_trio."):
        return "", None
    return None


def setup(app: Sphinx) -> None:
    app.connect("autodoc-process-signature", _hide_class_signature)
