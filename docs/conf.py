"""Sphinx configuration of the lipjax documentation.

Build (from the repository root)::

  python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

# The API pages import lipjax (and so JAX); keep that import quiet and on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import lipjax  # noqa: E402  pylint: disable=wrong-import-position

project = "lipjax"
author = "the lipjax authors"
copyright = "the lipjax authors"  # pylint: disable=redefined-builtin
release = lipjax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "requirements.txt", "Thumbs.db", ".DS_Store"]

# MyST: $...$ maths, ::: fences, heading anchors for [text](page.md#anchor) links.
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# Google-style docstrings.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_default_options = {"exclude-members": "parent, name"}

html_theme = "furo"
html_title = f"lipjax {release}"
html_static_path = []
pygments_style = "sphinx"


def _drop_flax_module_fields(app, what, name, obj, options, signature, return_annotation):
  """Hides the ``parent`` and ``name`` fields every Flax module has in its signature."""
  del app, what, name, obj, options
  if signature and "parent=" in signature:
    signature = re.sub(r"(,\s*)?parent=<[^>]*>", "", signature)
    signature = re.sub(r"(,\s*)?name=None", "", signature)
    signature = signature.replace("(, ", "(")
  return signature, return_annotation


def setup(app):
  app.connect("autodoc-process-signature", _drop_flax_module_fields)
