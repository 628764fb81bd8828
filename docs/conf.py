"""Sphinx configuration of the rpo_jax documentation (MyST Markdown pages, myst-nb executed notebooks,
autosummary + napoleon API pages).

Build: `pip install -e ".[docs]" && sphinx-build -W docs docs/_build/html` (warnings are errors). The config, CLI
and loss reference pages are generated from the code when the build starts (`docs/ext/generated_pages.py`), the
quickstart notebook is copied from `colabs/` and every page with code cells is executed, with the test suite's
reduced settings (`RPO_JAX_SMOKE=1`). Environment knobs:

- `RPO_JAX_DOCS_EXECUTE=off`: do not execute notebooks (a quick look at the prose; not what CI builds);
- `RPO_JAX_DOCS_MATHJAX=URL`: load MathJax from there instead of its CDN (an offline preview);
- `READTHEDOCS` / `RPO_JAX_DOCS_INTERSPHINX=1`: link to the JAX / Flax / optax / NumPy docs (needs the network).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "ext"))
sys.path.insert(0, str(ROOT))

# Executed pages run in fresh kernels that inherit this environment: the suite's reduced settings, one CPU device.
os.environ.setdefault("RPO_JAX_SMOKE", "1")
os.environ.setdefault("RPO_JAX_SMOKE_DIR", tempfile.mkdtemp(prefix="rpo_jax_docs_"))
# figures shown inline on the page (the test suite runs the same notebooks with MPLBACKEND=Agg)
os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = ""
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The quickstart notebook lives in colabs/ (Colab opens it there); the site executes a copy.
_QUICKSTART = DOCS / "getting_started" / "quickstart.ipynb"
if not _QUICKSTART.exists() or _QUICKSTART.read_bytes() != (ROOT / "colabs" / "quickstart.ipynb").read_bytes():
    shutil.copyfile(ROOT / "colabs" / "quickstart.ipynb", _QUICKSTART)

import rpo_jax  # noqa: E402

project = "rpo_jax"
author = "the rpo_jax authors"
copyright = "the rpo_jax authors, Apache-2.0"  # noqa: A001 - Sphinx's name
release = version = rpo_jax.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
    "sphinxcontrib.bibtex",
    "generated_pages",
    "coverage_check",
]
if os.environ.get("READTHEDOCS") or os.environ.get("RPO_JAX_DOCS_INTERSPHINX"):
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "jax": ("https://docs.jax.dev/en/latest/", None),
        "flax": ("https://flax.readthedocs.io/en/latest/", None),
        "optax": ("https://optax.readthedocs.io/en/latest/", None),
    }

# .rst first: autosummary writes its API stubs in reStructuredText
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
# generated pages are included by the reference pages, not pages of their own
exclude_patterns = ["_build", "ext", "**/.ipynb_checkpoints", "README.md", "reference/generated"]
templates_path = ["_templates"]
html_static_path = ["_static"]
html_css_files = ["custom.css"]

# -- MyST / myst-nb ---------------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "attrs_inline"]
myst_heading_anchors = 3
nb_execution_mode = "off" if os.environ.get("RPO_JAX_DOCS_EXECUTE") == "off" else "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
# stderr of the executed cells is library noise (progress-bar and backend warnings), not part of the examples
nb_output_stderr = "remove"
nb_execution_excludepatterns: list[str] = []

bibtex_bibfiles = ["references.bib"]
bibtex_default_style = "plain"
bibtex_reference_style = "label"

# -- API pages --------------------------------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
# Docstrings write code in Markdown's single backticks; in reStructuredText (what autodoc reads) that is the
# default role, rendered here as inline code.
default_role = "code"
add_module_names = False
python_use_unqualified_type_names = True

# -- HTML -------------------------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"rpo_jax {release}"
html_theme_options = {
    "repository_url": "https://github.com/rpo-jax/rpo_jax",
    "path_to_docs": "docs",
    "use_repository_button": True,
    "use_source_button": True,
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
if os.environ.get("RPO_JAX_DOCS_MATHJAX"):
    mathjax_path = os.environ["RPO_JAX_DOCS_MATHJAX"]
