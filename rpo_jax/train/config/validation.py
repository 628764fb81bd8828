"""`validate`: a config (an `ml_collections.ConfigDict`, a mapping, or a `RunConfig`) → the frozen, typed
`RunConfig` of `rpo_jax.train.config.schema`, every refusal one `ValueError` line naming the key path, the value and
what is allowed:

    config.data.pairs='bestworst': expected one of '', 'best_vs_worst', 'all_pairs' (aliases 'best_worst', 'all')
    config.loss.hparams.beta=-1: expected > 0
    config.train.stepz: no such key; did you mean 'steps'? (keys of config.train: steps, epochs, ...)

and the way back: `to_config_dict` (what WORKDIR/config.json records and `validate` reads again) and
`unknown_key_message` (a `--config.*` override naming no key).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from pydantic import BaseModel, ValidationError

from rpo_jax.train.config.loss_terms import did_you_mean
from rpo_jax.train.config.schema import RunConfig
from rpo_jax.train.config.values import ConfigError

#: pydantic error types → what was expected (`ctx` filled in).
EXPECTED = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a finite number",
    "bool_type": "expected True or False",
    "bool_parsing": "expected True or False",
    "string_type": "expected a string",
    "string_too_short": "expected a non-empty string",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping of its keys",
    "model_attributes_type": "expected a mapping of its keys",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "greater_than": "expected > {gt}",
    "greater_than_equal": "expected ≥ {ge}",
    "less_than": "expected < {lt}",
    "less_than_equal": "expected ≤ {le}",
}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _inner(annotation: Any) -> Any:
    """The model class, `dict`, or ("list", item) an annotation holds (Annotated / Optional stripped)."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _inner(members[0]) if len(members) == 1 else annotation
    if origin in (tuple, list):
        return ("list", _inner(typing.get_args(annotation)[0]))
    if origin is dict:
        return dict
    return annotation


def _walk(loc: tuple, root: type[BaseModel] = RunConfig) -> tuple[str, type[BaseModel] | None]:
    """(".a.b[0]" path of a pydantic error location, the model the last key belongs to). Union members'
    tags in `loc` are skipped."""
    path, current, owner = "", root, root
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            owner = current
            if part in current.model_fields:
                path += f".{part}"
                current = _inner(current.model_fields[part].annotation)
            else:
                path += f".{part}"  # an unknown key (extra_forbidden)
                current = None
        elif isinstance(current, tuple) and isinstance(part, int):
            path += f"[{part}]"
            current = current[1]
        elif current is dict:
            path += f".{part}"
            current = None
    return path, owner


def error_line(error: Mapping[str, Any], root: type[BaseModel] = RunConfig, prefix: str = "config") -> str:
    """One pydantic error (of `root`'s validation) as `prefix.key.path=value: what is allowed`."""
    ctx = error.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, ConfigError):
        return " ".join(str(cause).split())
    path, owner = _walk(tuple(error["loc"]), root)
    where = prefix + path
    if error["type"] == "extra_forbidden":
        return unknown_key_line(where, owner)
    if isinstance(cause, Exception):
        text = " ".join(str(cause).split())
    elif error["type"] == "literal_error":
        text = f"expected one of {ctx.get('expected', '').replace(' or ', ', ')}"
    elif error["type"] in EXPECTED:
        text = EXPECTED[error["type"]].format(**ctx)
    else:
        text = " ".join(str(error.get("msg", "invalid")).split())
    return f"{where}={_show(error.get('input'))}: {text}"


def unknown_key_line(where: str, owner: type[BaseModel] | None) -> str:
    """`config.a.stepz: no such key; did you mean 'steps'? (keys of config.a: ...)` for the key path `where`."""
    parent, _, key = where.rpartition(".")
    if owner is None:
        return f"{where}: no such key"
    keys = list(owner.model_fields)
    return f"{where}: no such key{did_you_mean(key, keys)} (keys of {parent}: {', '.join(keys)})"


def one_line(error: ValidationError, root: type[BaseModel] = RunConfig, prefix: str = "config") -> str:
    """The first error of a pydantic `ValidationError` as one line (no pydantic boilerplate, no URL)."""
    return error_line(error.errors(include_url=False)[0], root, prefix)


def plain(cfg: Any) -> Any:
    """A config's plain-Python form (nested dicts and lists): ConfigDicts resolved, models dumped."""
    if isinstance(cfg, BaseModel):
        return cfg.model_dump(mode="json")
    if isinstance(cfg, ml_collections.ConfigDict):
        return cfg.to_dict()
    if isinstance(cfg, ml_collections.FieldReference):
        return plain(cfg.get())
    if isinstance(cfg, Mapping):
        return {k: plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [plain(v) for v in cfg]
    return cfg


def validate(cfg: Any) -> RunConfig:
    """The frozen, typed `RunConfig` of `cfg` (an `ml_collections.ConfigDict`, a mapping of its keys, or a
    `RunConfig`, returned as it is): every field checked, defaults filled in, aliases normalised. Raises a
    one-line `ValueError` naming the key path, the value and what is allowed."""
    if isinstance(cfg, RunConfig):
        return cfg
    if not isinstance(cfg, (ml_collections.ConfigDict, Mapping)):
        # a config flag whose recipe failed to load raises its error (a missing file, ...) on first use
        to_dict = getattr(cfg, "to_dict", None)
        if to_dict is None:
            raise ValueError(f"config: expected an ml_collections.ConfigDict or a mapping, got {type(cfg).__name__}")
        cfg = to_dict()
    try:
        return RunConfig.model_validate(plain(cfg))
    except ValidationError as e:
        raise ValueError(one_line(e)) from None


def with_settings(cfg: RunConfig, settings: Mapping[str, Any]) -> RunConfig:
    """`cfg` with the dotted keys of `settings` replaced ({"model.remat": "full", "data.micro_batches": 2}),
    validated as `validate` validates a config (a bad value is the same one-line `ValueError`)."""
    values = cfg.model_dump(mode="json")
    for key, value in settings.items():
        *sections, name = key.split(".")
        owner = values
        for section in sections:
            owner = owner[section]
        if name not in owner:
            raise ValueError(f"config.{key}: no such key")
        owner[name] = value
    return validate(values)


def validate_section(section: type[BaseModel], values: Any, prefix: str) -> BaseModel:
    """One section of the config (`prefix`: its key path, "config.optimizer") from a mapping, checked as
    `validate` checks it."""
    if isinstance(values, section):
        return values
    try:
        return section.model_validate(plain(values))
    except ValidationError as e:
        raise ValueError(one_line(e, section, prefix)) from None


def to_config_dict(cfg: Any) -> ml_collections.ConfigDict:
    """`cfg` (a `RunConfig` or a ConfigDict) as a new, unlocked `ml_collections.ConfigDict` of plain values (what
    WORKDIR/config.json records; `validate` takes it back)."""
    return ml_collections.ConfigDict(plain(cfg))


def unknown_key_message(path: str, suggestion: str | None = None) -> str:
    """The one-line message for a `--config.PATH=…` override whose key the config does not have (`path` dotted,
    without "config."): the closest key of the section it names, and that section's keys (`suggestion`: the
    closest key of a free-form mapping, which only the recipe knows)."""
    parts = path.split(".")
    current: Any = RunConfig
    for i, part in enumerate(parts):
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            # inside a free-form mapping (model.init, loss.hparams, optimizer.kwargs): the recipe decides its keys
            where = "config." + ".".join(parts[:i])
            hint = f"; did you mean {suggestion!r}?" if suggestion else ""
            return (
                f"config.{path}: no such key in this recipe's {where}{hint} (a --config override sets a key "
                "the recipe has; set the whole mapping in the recipe to add one)"
            )
        if part not in current.model_fields:
            return unknown_key_line("config." + ".".join(parts[: i + 1]), current)
        current = _inner(current.model_fields[part].annotation)
    return f"config.{path}: no such key"
