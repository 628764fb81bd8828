"""The docs' coverage check (docs/ext/coverage_check.py): every public name is documented today, and the check —
alone and inside a real Sphinx build — fails when a public function's docstring is removed."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"
sys.path.insert(0, str(DOCS / "ext"))

import coverage_check  # noqa: E402

pytest.importorskip("sphinx")


def test_every_public_name_has_its_documentation():
    assert coverage_check.docstring_problems() == []


def test_the_pending_list_names_only_public_functions():
    public = coverage_check.public_names()
    assert sorted(coverage_check.pending_style() - set(public)) == []


def test_removing_a_public_functions_docstring_is_reported(monkeypatch):
    import rpo_jax.losses

    monkeypatch.setattr(rpo_jax.losses.make_loss, "__doc__", None)
    assert "rpo_jax.losses.make_loss: no docstring" in coverage_check.docstring_problems()


def test_a_public_function_without_args_or_returns_is_reported(monkeypatch):
    import rpo_jax.models

    monkeypatch.setattr(rpo_jax.models.generate, "__doc__", "Samples continuations.")
    problems = coverage_check.docstring_problems()
    assert "rpo_jax.models.generate: no `Args:` section, no `Returns:` section" in "\n".join(problems)


def test_a_public_name_on_no_api_page_is_reported():
    names = coverage_check.public_names()
    documented = set(names) - {"rpo_jax.losses.make_loss", "rpo_jax.data.FORMATS"}
    documented -= {"rpo_jax.losses.registry.make_loss"}
    problems = coverage_check.page_problems(documented, names)
    assert [p.split(":")[0] for p in problems] == ["rpo_jax.losses.make_loss", "rpo_jax.data.FORMATS"]


PACKAGE = '''
"""A package for the coverage check's test."""

__all__ = ["documented", "undocumented"]

#: A documented constant.
LIMIT = 3


def documented(x: int) -> int:
    """Doubles.

    Args:
        x: a number.

    Returns:
        2·x.
    """
    return 2 * x


def undocumented(x: int) -> int:
    DOCSTRING
    return x
'''


def _build(tmp_path: pathlib.Path, docstring: str) -> subprocess.CompletedProcess:
    src = tmp_path / "src"
    (src / "covpkg").mkdir(parents=True)
    (src / "covpkg" / "__init__.py").write_text(PACKAGE.replace("DOCSTRING", docstring))
    (src / "conf.py").write_text(
        textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(src)!r}, {str(DOCS / "ext")!r}]
        extensions = ["sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.napoleon", "coverage_check"]
        autosummary_generate = True
        coverage_check_modules = ["covpkg"]
        coverage_check_pending = []
        """)
    )
    listing = "   documented\n   undocumented\n"
    (src / "index.rst").write_text(
        "API\n===\n\n.. currentmodule:: covpkg\n\n.. autosummary::\n   :toctree: _api\n\n" + listing
    )
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_sphinx_build_fails_when_a_public_functions_docstring_is_removed(tmp_path):
    full = '"""Returns x.\n\n    Args:\n        x: a number.\n\n    Returns:\n        x.\n    """'
    ok = _build(tmp_path / "with", full)
    assert ok.returncode == 0, ok.stderr
    broken = _build(tmp_path / "without", "")
    assert broken.returncode != 0
    assert "covpkg.undocumented: no docstring" in broken.stderr
