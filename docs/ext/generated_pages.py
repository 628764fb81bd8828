"""Reference pages generated from the code at build time, so that they cannot drift from it.

- `config_reference()`: every key of the run configuration, from the pydantic schema
  (`rpo_jax.train.config.schema.RunConfig`): type, default, allowed values, description.
- `cli_reference()`: the `--help` of every console script named in setup.cfg (`[options.entry_points]`), run in a
  subprocess exactly as a user would see it.
- `loss_table()`: the loss registry (`rpo_jax.losses.registry.LOSSES`): name, formula, hyperparameters with their
  defaults, what the loss needs, paper.

`write_generated(docs_dir)` writes them as MyST pages under `docs/reference/generated/` (not committed); the
reference pages include them one heading level down (their sections are H1 here, H2 on the page). Sphinx calls it
when the build starts (`setup`).
"""

from __future__ import annotations

import configparser
import json
import pathlib
import re
import subprocess
import sys
import types
import typing
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
GENERATED = "reference/generated"


# --------------------------------------------------------------------------------------------- config reference
def _strip_annotated(annotation: Any) -> tuple[Any, list]:
    metadata = []
    while typing.get_origin(annotation) is typing.Annotated:
        args = typing.get_args(annotation)
        annotation, metadata = args[0], metadata + list(args[1:])
    return annotation, metadata


def _section_type(annotation: Any):
    """The pydantic section class a field holds (directly, or as the items of a tuple), else None."""
    from pydantic import BaseModel

    annotation, _ = _strip_annotated(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item, True
    return None, False


def _constraints(metadata: list) -> list[str]:
    out = []
    for m in metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"), ("min_length", "length ≥")):
            value = getattr(m, attr, None)
            if value is not None and type(m).__name__ in ("Ge", "Gt", "Le", "Lt", "MinLen", "FieldInfo"):
                out.append(f"{sign} {value}")
        if type(m).__name__ == "FieldInfo":  # a nested Field(...) inside Annotated
            out += _constraints(m.metadata)
    return out


def _type_and_allowed(annotation: Any, metadata: list) -> tuple[str, str]:
    """(a readable type, the allowed values / range) of one schema field."""
    annotation, inner = _strip_annotated(annotation)
    metadata = list(metadata) + inner
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        values = typing.get_args(annotation)
        kinds = sorted({type(v).__name__ for v in values})
        return " | ".join(kinds), ", ".join(f"`{v!r}`" for v in values)
    if origin in (typing.Union, types.UnionType):
        kinds, allowed = [], []
        for member in typing.get_args(annotation):
            kind, allow = _type_and_allowed(member, [])
            kinds.append(kind)
            if allow:
                allowed.append(allow)
            elif kind not in ("None",):
                allowed.append(f"any {kind}")
        listed = any("`" in a or "≥" in a for a in allowed)
        return " | ".join(dict.fromkeys(kinds)), "; ".join(allowed) if listed else ""
    if annotation is type(None):
        return "None", ""
    if origin in (dict, typing.Dict):
        return "dict", ""
    if origin in (tuple, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        item = _type_and_allowed(args[0], [])[0] if args else "any"
        return f"list of {item}", ""
    if origin is not None:
        return str(annotation).replace("typing.", ""), ""
    name = getattr(annotation, "__name__", str(annotation))
    if name == "Any":
        return "any", ""
    return name, ", ".join(_constraints(metadata))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if hasattr(value, "model_dump"):
        return ""
    return f"`{json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list, tuple)) else repr(value)}`"


def config_rows(model=None, prefix: str = "config") -> list[dict]:
    """One row per key of the run configuration: {key, section, type, default, allowed, description}; nested
    sections are walked (their own keys, not the section itself), tuple-of-section fields as `key[i].field`."""
    if model is None:
        from rpo_jax.train.config.schema import RunConfig

        model = RunConfig
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        section, repeated = _section_type(field.annotation)
        if section is not None and not repeated:
            rows += config_rows(section, key)
            continue
        if section is not None and repeated:
            rows.append(
                dict(
                    key=key,
                    section=prefix,
                    type=f"list of {{{', '.join(section.model_fields)}}}",
                    default=_default(field),
                    allowed="",
                    description=field.description or "",
                )
            )
            rows += config_rows(section, f"{key}[i]")
            continue
        kind, allowed = _type_and_allowed(field.annotation, field.metadata)
        rows.append(
            dict(
                key=key,
                section=prefix,
                type=kind,
                default=_default(field),
                allowed=allowed,
                description=field.description or "",
            )
        )
    return rows


def schema_keys() -> list[str]:
    """Every leaf key path of the schema (what the reference page must list)."""
    return [r["key"] for r in config_rows()]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _section_doc(model) -> str:
    doc = (model.__doc__ or "").strip()
    return " ".join(doc.split())


def _prose(text: str) -> str:
    """A schema description as one Markdown line: what Markdown would read as markup (`*`, `$`, `<tag>`) escaped,
    backquoted spans kept."""
    parts = re.split(r"(`[^`]*`)", " ".join(text.split()))
    escaped = [p if p.startswith("`") else re.sub(r"([\\*$<_\[\]])", r"\\\1", p) for p in parts]
    return "".join(escaped)


def _anchor(key: str) -> str:
    """The link target of a key: `config.data.share_prompt` → `#config-data-share-prompt`."""
    return re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")


def config_reference() -> str:
    from rpo_jax.train.config.schema import RunConfig

    rows = config_rows()
    sections: dict[str, list[dict]] = {}
    for row in rows:
        top = row["key"].split(".")[1] if row["key"].count(".") > 1 else ""
        sections.setdefault(top, []).append(row)
    out = [
        "<!-- generated from rpo_jax/train/config/schema.py by docs/ext/generated_pages.py: do not edit -->",
        "",
        f"{len(rows)} keys. Set any of them in a recipe (`configs/NAME.py`) or on the command line as "
        "`--config.KEY=VALUE`; each key links here as `#config-section-key` "
        "(e.g. [`config.data.share_prompt`](#config-data-share-prompt)).",
        "",
    ]
    models = {name: _section_type(f.annotation)[0] for name, f in RunConfig.model_fields.items()}
    for top, items in sections.items():
        title = "Top-level keys" if not top else f"`config.{top}`"
        out += [f"# {title}", ""]
        if top and models.get(top) is not None:
            out += [_prose(_section_doc(models[top])), ""]
        for r in items:
            facts = [f"*{r['type']}*", f"default {r['default']}" if r["default"] else ""]
            if r["allowed"]:
                facts.append(f"allowed: {r['allowed']}")
            out += [
                f"({_anchor(r['key'])})=",
                f"`{r['key']}`",
                f": {', '.join(f for f in facts if f)}",
                "",
                f"  {_prose(r['description'])}",
                "",
            ]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------- CLIs
def console_scripts() -> dict[str, str]:
    """name → "module:function" of every console script in setup.cfg."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    scripts = {}
    for line in parser["options.entry_points"]["console_scripts"].strip().splitlines():
        name, target = (s.strip() for s in line.split("=", 1))
        scripts[name] = target
    return scripts


def _help(name: str, target: str, args: list[str]) -> str:
    module, function = target.split(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {module} import {function} as f; f()"
    env_python = sys.executable
    result = subprocess.run(
        [env_python, "-c", code, *args, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    text = result.stdout if result.stdout.strip() else result.stderr
    if result.returncode not in (0,) or not text.strip():
        raise RuntimeError(f"{name} {' '.join(args)} --help failed ({result.returncode}): {result.stderr[-2000:]}")
    return text.replace(str(ROOT) + "/", "")


def cli_reference() -> str:
    out = [
        "<!-- generated from the console scripts' own --help (setup.cfg entry points) by "
        "docs/ext/generated_pages.py: do not edit -->",
        "",
    ]
    for name, target in console_scripts().items():
        text = _help(name, target, [])
        out += [f"# `{name}`", "", f"Entry point: `{target}`.", "", "```text", text.rstrip(), "```", ""]
        sub = re.search(r"usage: \S+ \[-h\] \{([\w,-]+)\}", text)
        for command in sub.group(1).split(",") if sub else []:
            out += [f"## `{name} {command}`", "", "```text", _help(name, target, [command]).rstrip(), "```", ""]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- losses
def _needs(name: str) -> str:
    from rpo_jax.losses import make_loss

    try:
        spec = make_loss(name).spec
    except ValueError:  # a loss that cannot be built without choosing hyperparameters
        return ""
    needs = []
    if getattr(spec, "unpaired", False):
        needs.append("`UnpairedLogps`")
    if spec.requires_reference:
        refs = spec.min_references
        needs.append("ref_logps" + (f" (R ≥ {refs})" if refs and refs > 1 else ""))
    if spec.requires_rewards:
        needs.append("rewards")
    if spec.requires_lengths:
        needs.append("lengths")
    if getattr(spec, "requires_sequence_logps", False):
        needs.append("sequence_logps")
    if getattr(spec, "requires_kl_logps", False):
        needs.append("kl_policy_logps, kl_ref_logps (mismatched completions)")
    if getattr(spec, "stateful", False):
        needs.append("a state (`loss_fn.init_state()`)")
    return ", ".join(needs) or "policy_logps only"


def loss_rows() -> list[dict]:
    from rpo_jax.losses.registry import LOSSES

    rows = []
    for name, d in LOSSES.items():
        hparams = ", ".join(f"`{k}={default!r}`" for k, (default, _) in d.hparams.items()) or "—"
        rows.append(dict(name=name, formula=d.formula, hparams=hparams, needs=_needs(name), paper=d.paper))
    return rows


def loss_table() -> str:
    rows = loss_rows()
    out = [
        "<!-- generated from rpo_jax/losses/registry.py (LOSSES) by docs/ext/generated_pages.py: do not edit -->",
        "",
        f"{len(rows)} losses, every name `make_loss` accepts (`rpo_jax.losses.available_losses()`).",
        "",
        "| name | formula (per example) | hyperparameters (defaults) | needs | paper |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| `{r['name']}` | {_cell(r['formula'])} | {_cell(r['hparams'])} | {_cell(r['needs'])} | "
            f"{_cell(r['paper'])} |"
        )
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------- writing
PAGES = {"config.md": config_reference, "cli.md": cli_reference, "losses.md": loss_table}


def write_generated(docs_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write every generated page under `docs_dir/reference/generated/`; a page is rewritten only when its text
    changed (so Sphinx does not rebuild what did not change)."""
    target = docs_dir / GENERATED
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in PAGES.items():
        path = target / name
        text = make()
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    return written


def setup(app):
    app.connect("builder-inited", lambda app: write_generated(pathlib.Path(app.srcdir)))
    return {"parallel_read_safe": True, "parallel_write_safe": True}
