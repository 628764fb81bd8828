"""Fails the docs build when a public name of the API is undocumented.

The public API is the `__all__` of each module in `API_MODULES`. For every such name the check asks:

1. Is it on an API page? Some page of the site documents it as a Python object (an `autosummary` / `autofunction`
   / `autoclass` / `autodata` entry, under the package's name or the module that defines it).
2. Does it say what it is? A function or class has a docstring; a constant a `#:` comment in its module (what
   autodoc shows for module data).
3. Does a public function say what it takes and returns? A function with parameters has an `Args:` section and one
   that returns a value a `Returns:` (or `Yields:`) section (Google style, rendered by napoleon). Names listed in
   `docs/ext/docstring_style_pending.txt` are still being converted and are exempt from this rule only; the list
   may only shrink: a listed name that now has both sections fails the check until it is removed from the list.

`undocumented(env=None)` returns the problems as lines (empty when everything is documented); `setup` runs it when
Sphinx has read every page and raises, which fails the build. `python docs/ext/coverage_check.py` runs checks 2
and 3 without Sphinx.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import sys
from typing import Any, Iterable

#: The modules whose `__all__` is the public API documented on the API pages.
API_MODULES = ("rpo_jax.losses", "rpo_jax.models", "rpo_jax.data", "rpo_jax.train")

PENDING = pathlib.Path(__file__).with_name("docstring_style_pending.txt")


def public_names(modules: Iterable[str] = API_MODULES) -> dict[str, Any]:
    """`module.name` → object, for every name of every API module's `__all__`."""
    out = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            out[f"{module_name}.{name}"] = getattr(module, name)
    return out


def pending_style() -> set[str]:
    """Names still exempt from the Args/Returns rule (one per line; `#` comments)."""
    if not PENDING.exists():
        return set()
    lines = (line.split("#", 1)[0].strip() for line in PENDING.read_text().splitlines())
    return {line for line in lines if line}


def _defining_module(obj: Any, fallback: str) -> str:
    return getattr(obj, "__module__", None) or fallback


def _data_doc(full_name: str, obj: Any) -> str:
    """The `#:` doc comment of a module-level constant: in the module that defines it, found by its name."""
    from sphinx.pycode import ModuleAnalyzer

    module_name, name = full_name.rsplit(".", 1)
    module = importlib.import_module(module_name)
    candidates = [module_name]
    for sub in sorted(sys.modules):  # the submodule it was imported from holds the comment
        if sub.startswith(module_name.split(".")[0] + ".") and getattr(sys.modules[sub], name, None) is obj:
            candidates.append(sub)
    del module
    for candidate in candidates:
        try:
            docs = ModuleAnalyzer.for_module(candidate).find_attr_docs()
        except Exception:  # noqa: BLE001 - a module without source (or a namespace) has no comments
            continue
        if ("", name) in docs:
            return "\n".join(docs[("", name)]).strip()
    return ""


def _is_routine(obj: Any) -> bool:
    return inspect.isfunction(obj) or inspect.ismethod(obj)


def _returns_value(obj: Any) -> bool:
    try:
        annotation = inspect.signature(obj).return_annotation
    except (TypeError, ValueError):
        return True
    return annotation not in (None, "None", type(None))


def _takes_arguments(obj: Any) -> bool:
    try:
        parameters = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False
    return any(p.name not in ("self", "cls") for p in parameters.values())


def style_problems(full_name: str, obj: Any) -> list[str]:
    """Why a public function's docstring lacks the Google-style sections it needs (empty: it has them)."""
    doc = inspect.getdoc(obj) or ""
    problems = []
    if _takes_arguments(obj) and "\nArgs:" not in f"\n{doc}":
        problems.append("no `Args:` section")
    if _returns_value(obj) and not any(f"\n{s}:" in f"\n{doc}" for s in ("Returns", "Yields")):
        problems.append("no `Returns:` section")
    return problems


def docstring_problems(names: dict[str, Any] | None = None, pending: set[str] | None = None) -> list[str]:
    """Checks 2 and 3: one line per public name without the documentation it needs."""
    names = public_names() if names is None else names
    pending = pending_style() if pending is None else pending
    out = []
    for full_name, obj in names.items():
        if inspect.isclass(obj) or _is_routine(obj):
            if not (inspect.getdoc(obj) or "").strip() or obj.__doc__ is None:
                out.append(f"{full_name}: no docstring")
                continue
            if _is_routine(obj):
                problems = style_problems(full_name, obj)
                if problems and full_name not in pending:
                    out.append(f"{full_name}: {', '.join(problems)} (Google style: see docs/development.md)")
                elif not problems and full_name in pending:
                    out.append(
                        f"{full_name}: has Args/Returns now; remove it from docs/ext/docstring_style_pending.txt"
                    )
        elif not _data_doc(full_name, obj):
            out.append(f"{full_name}: a constant without a `#:` doc comment where it is defined")
    return out


def documented_objects(env) -> set[str]:
    """Every Python object some page of the site documents (the py domain's inventory)."""
    return set(env.get_domain("py").objects)


def page_problems(documented: set[str], names: dict[str, Any] | None = None) -> list[str]:
    """Check 1: public names that no API page documents."""
    names = public_names() if names is None else names
    out = []
    for full_name, obj in names.items():
        module_name, name = full_name.rsplit(".", 1)
        aliases = {full_name, f"{_defining_module(obj, module_name)}.{name}"}
        # a constant is documented under the submodule that defines it (where its `#:` comment is)
        aliases |= {d for d in documented if d.startswith(f"{module_name}.") and d.endswith(f".{name}")}
        if not aliases & documented:
            out.append(f"{full_name}: on no API page (add it to an autosummary list in docs/api/)")
    return out


def undocumented(env=None, modules: Iterable[str] = API_MODULES, pending: set[str] | None = None) -> list[str]:
    """Every problem of the three checks (check 1 only with a Sphinx environment)."""
    names = public_names(modules)
    problems = docstring_problems(names, pending)
    if env is not None:
        problems += page_problems(documented_objects(env), names)
    return problems


def _check(app, env) -> None:
    from sphinx.errors import ExtensionError

    if app.builder.name not in ("html", "dirhtml", "singlehtml"):
        return
    pending = app.config.coverage_check_pending
    problems = undocumented(env, app.config.coverage_check_modules, None if pending is None else set(pending))
    if problems:
        raise ExtensionError(
            f"{len(problems)} undocumented public name(s) (docs/ext/coverage_check.py):\n  " + "\n  ".join(problems)
        )


def setup(app):
    # which modules' `__all__` is the public API, and the names exempt from the style rule (None: the pending file)
    app.add_config_value("coverage_check_modules", API_MODULES, "env", types=frozenset({list, tuple}))
    app.add_config_value("coverage_check_pending", None, "env", types=frozenset({list, tuple, type(None)}))
    app.connect("env-check-consistency", _check)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


if __name__ == "__main__":
    found = undocumented()
    print("\n".join(found) or "every public name is documented")
    sys.exit(1 if found else 0)
