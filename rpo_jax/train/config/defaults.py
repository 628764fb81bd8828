"""The run configuration as an `ml_collections.ConfigDict` (`base_config`), generated from the schema's defaults
(`rpo_jax.train.config.schema`, where every field is typed, ranged and described: one source of truth).

Recipes in `configs/NAME.py` start from `base_config()` and override fields; the command line overrides any
field: `rpo-train --config configs/smollm2.py --config.loss.name=rpo_bwd_kl --config.loss.hparams.eta=2`.
`rpo_jax.train.config.validation.validate` checks the result and turns it into the frozen `RunConfig`.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import ml_collections
from pydantic import BaseModel

from rpo_jax.train.config.schema import RunConfig


def _several_kinds(annotation: Any) -> bool:
    """Whether a field takes values of more than one Python type (True / False / "auto"; "auto" / "off" / 64)."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return False
    return len([a for a in typing.get_args(annotation) if a is not type(None)]) > 1


def _placeholder_type(annotation: Any) -> type:
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    return members[0] if members and isinstance(members[0], type) else object


def config_dict(section: BaseModel) -> ml_collections.ConfigDict:
    """`section`'s values as a ConfigDict whose fields take what the schema takes: a field of several kinds of
    value is an `object` field, an optional one a placeholder, a mapping a ConfigDict, a tuple a list."""
    c = ml_collections.ConfigDict()
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            c[name] = config_dict(value)
        elif isinstance(value, dict):
            c[name] = ml_collections.ConfigDict(value)
        elif isinstance(value, (tuple, list)):
            c[name] = [v.model_dump() if isinstance(v, BaseModel) else v for v in value]
        elif value is None:
            c[name] = ml_collections.config_dict.placeholder(_placeholder_type(field.annotation))
        elif _several_kinds(field.annotation):
            c[name] = ml_collections.FieldReference(value, field_type=object)
        else:
            c[name] = value
    return c


def base_config() -> ml_collections.ConfigDict:
    """Every field of the run configuration at its default (`RunConfig()`).

    Returns:
        An `ml_collections.ConfigDict` that recipes (`configs/NAME.py`) start from and override.
    """
    return config_dict(RunConfig())
