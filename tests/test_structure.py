"""The package's structure: the import graph of `rpo_jax` has no cycle (imports inside functions count), no module
(and no test) uses another module's private names, no source file passes 600 lines, only the trainer combines the
layers, and the trainer splits models in one place.

`python tests/test_structure.py` prints the graph: one line per module with the rpo_jax modules it imports.
"""

from __future__ import annotations

import ast
import pathlib
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rpo_jax"
TESTS = pathlib.Path(__file__).resolve().parent
MAX_LINES = 600


def modules() -> dict[str, pathlib.Path]:
    """Dotted module name → file, for every .py file of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imported(module: str, path: pathlib.Path, node: ast.AST, known: dict) -> list[tuple[str, str | None]]:
    """(imported rpo_jax module, imported name or None) pairs of one import statement."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names if a.name in known]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        keep = len(parts) - node.level + (1 if path.name == "__init__.py" else 0)
        base = ".".join(parts[:keep] + ([base] if base else []))
    out = []
    for alias in node.names:
        if f"{base}.{alias.name}" in known:
            out.append((f"{base}.{alias.name}", None))
        elif base in known:
            out.append((base, alias.name))
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def scan(module: str, path: pathlib.Path, known: dict[str, pathlib.Path]) -> tuple[set[str], list[str]]:
    """(the rpo_jax modules `path` imports, anywhere in the file; its uses of other modules' private names).
    `module` is the file's dotted name (tests: a name outside the package)."""
    tree = ast.parse(path.read_text())
    targets, private, aliases = set(), [], {}
    for node in ast.walk(tree):
        for target, name in _imported(module, path, node, known):
            if target == module:
                continue
            targets.add(target)
            if name and _is_private(name):
                private.append(f"{module} imports {target}.{name}")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                full = alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"
                if full in known:
                    aliases[alias.asname or alias.name.split(".")[-1]] = full
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _is_private(node.attr)
            and aliases[node.value.id] != module
        ):
            private.append(f"{module} uses {aliases[node.value.id]}.{node.attr}")
    return targets, private


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """(module → the rpo_jax modules it imports, anywhere in the file; private-name uses across modules).

    A package's `__init__` re-exporting from its submodules is an edge to the package, not from the importer to
    the submodule, as Python resolves it."""
    known = modules()
    graph, private = {}, []
    for module, path in known.items():
        graph[module], found = scan(module, path, known)
        private += found
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()[0]) == []


def test_no_private_name_used_across_modules():
    assert import_graph()[1] == []


def test_tests_use_only_public_names():
    known = modules()
    found = [use for path in sorted(TESTS.rglob("*.py")) for use in scan(f"tests.{path.stem}", path, known)[1]]
    assert found == []


def test_no_source_file_over_the_limit():
    long = {
        str(p.relative_to(PACKAGE)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_only_the_trainer_combines_the_layers():
    """`data`, `models` and `losses` are independent of one another; `train` builds on all three."""
    allowed = {
        "data": {"data"},
        "models": {"models"},
        "losses": {"losses"},
        "train": {"train", "data", "models", "losses"},
    }
    graph, _ = import_graph()
    wrong = [
        (m, t)
        for m, targets in graph.items()
        for t in targets
        if m.count(".") >= 1 and t.count(".") >= 1 and t.split(".")[1] not in allowed[m.split(".")[1]]
    ]
    assert wrong == []


#: The trainer's rooms (sub-packages of rpo_jax.train), lowest first: a room imports only itself and rooms before it.
TRAIN_ROOMS = ("config", "runtime", "step", "build", "core", "jobs", "plan", "cli")


def test_the_trainer_rooms_are_layered():
    """`rpo_jax.train` is sub-packages only (no flat module beside them), and each imports only rooms below it."""
    flat = sorted(p.name for p in (PACKAGE / "train").glob("*.py") if p.name != "__init__.py")
    assert flat == []
    rooms = sorted(p.name for p in (PACKAGE / "train").iterdir() if (p / "__init__.py").is_file())
    assert rooms == sorted(TRAIN_ROOMS)
    rank = {room: i for i, room in enumerate(TRAIN_ROOMS)}
    graph, _ = import_graph()
    upward = [
        (m, t)
        for m, targets in graph.items()
        if m.startswith("rpo_jax.train.")
        for t in targets
        if t.startswith("rpo_jax.train.") and rank[t.split(".")[2]] > rank[m.split(".")[2]]
    ]
    assert upward == []


def test_the_trainer_splits_models_with_one_filter():
    """Every `nnx.split` of a model in rpo_jax/train goes through `build.model.split_trainable` (TRAINABLE)."""
    train = PACKAGE / "train"
    users = [str(p.relative_to(train)) for p in train.rglob("*.py") if "nnx.split(" in p.read_text()]
    assert users == ["build/model.py"]


def test_the_trainer_exports_one_entry_per_job():
    """`rpo_jax.train` names one public entry per job (imported on first use: importing the package imports no
    job), each the function the CLI runs for that `config.mode`."""
    import subprocess

    code = (
        "import sys, rpo_jax.train as t; assert not any(m.startswith('rpo_jax.train.jobs') for m in sys.modules);"
        "from rpo_jax.train.cli.train import JOBS; import importlib;"
        "jobs = {m: getattr(importlib.import_module(mod), fn) for m, (mod, fn) in JOBS.items()};"
        "assert jobs == {'preference': t.train_preference, 'online': t.train_online,"
        " 'reward_model': t.train_reward_model}, jobs;"
        "assert t.base_config().mode == 'preference' and callable(t.build_programs) and callable(t.export_workdir)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


if __name__ == "__main__":
    graph, private = import_graph()
    for module in sorted(graph):
        print(f"{module:36s} → {', '.join(sorted(graph[module])) or '-'}")
    print(f"cycles: {cycles(graph) or 'none'}; private names across modules: {private or 'none'}", file=sys.stderr)
