"""Sphinx configuration: the API reference is built from the docstrings (autodoc + napoleon for the
numpy style); pages are Markdown (MyST).  Built in CI with warnings as errors:
``python -m sphinx -W --keep-going -b html docs docs/_build/html``."""
import gpuhnsw

project = "gpuhnsw"
release = version = gpuhnsw.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
myst_heading_anchors = 3
# architecture.md names source files (`gpuhnsw/index.py`, ...) as text, not as links
suppress_warnings = ["myst.header"]
html_theme = "alabaster"
