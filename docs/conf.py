"""Sphinx configuration: the API reference is built from the docstrings (autodoc + napoleon for the
numpy style); pages are Markdown (MyST).  Built in CI with warnings as errors:
``python -m sphinx -W --keep-going -b html docs docs/_build/html``."""
import argparse
import pathlib

import gpuhnsw
from gpuhnsw import cli

project = "gpuhnsw"
release = version = gpuhnsw.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_generated"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Annotations are strings (``from __future__ import annotations``): shown by these names instead of
# NumPy's ArrayLike expanded into its eight-member union.  Each alias is described in the API page.
autodoc_type_aliases = {"ArrayLike": "numpy.typing.ArrayLike", "Filter": "gpuhnsw.index.Filter",
                        "IndexFile": "gpuhnsw.index.IndexFile", "Array": "gpuhnsw.index.Array"}
napoleon_numpy_docstring = True
napoleon_google_docstring = False
myst_heading_anchors = 3
# architecture.md names source files (`gpuhnsw/index.py`, ...) as text, not as links
suppress_warnings = ["myst.header"]
html_theme = "alabaster"


def _cli_help():
    """cli.md's reference: the help of ``gpuhnsw`` and of each subcommand, from the parser itself,
    so the page cannot drift from the command."""
    parser = cli._build_parser()
    parts = ["## gpuhnsw", "", "```text", parser.format_help().rstrip(), "```", ""]
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        parts += [f"## gpuhnsw {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    out = pathlib.Path(__file__).parent / "_generated" / "cli_help.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(parts))


_cli_help()
