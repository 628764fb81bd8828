"""The docs' Python examples that the site cannot execute (they need a hub checkpoint, a pod or a bucket) still
parse, and every rpo_jax name they import exists — so a rename breaks a test, not a reader. The executed cells
(`{code-cell}`) run when the site is built."""

from __future__ import annotations

import ast
import importlib
import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"
FENCE = re.compile(r"^```python\n(.*?)^```", flags=re.M | re.S)


def _blocks() -> list[tuple[str, int, str]]:
    out = []
    for page in sorted(DOCS.rglob("*.md")):
        if "_build" in page.parts or "generated" in page.parts:
            continue
        text = page.read_text()
        for m in FENCE.finditer(text):
            out.append((str(page.relative_to(DOCS)), text[: m.start()].count("\n") + 1, m.group(1)))
    return out


BLOCKS = _blocks()


def test_the_docs_have_static_python_examples():
    assert len(BLOCKS) > 10


@pytest.mark.parametrize("page, line, code", BLOCKS, ids=[f"{p}:{n}" for p, n, _ in BLOCKS])
def test_a_static_example_parses_and_imports_what_exists(page, line, code):
    tree = ast.parse(code, filename=f"{page}:{line}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rpo_jax"):
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"{page}:{line}: {node.module} has no {missing}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rpo_jax"):
                    importlib.import_module(alias.name)
