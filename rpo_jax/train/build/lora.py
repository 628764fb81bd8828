"""LoRA in a run (`config.model.lora`): its settings validated, a PEFT adapter read (`init_from`), the
adapters attached to a policy, and the frozen base quantized for QLoRA (`base_dtype`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from rpo_jax.data import storage
from rpo_jax.models import Decoder
from rpo_jax.models.lora import (
    ADAPTER_CONFIG,
    ALL_LINEAR,
    LoraConfig,
    attach_lora,
    load_peft_adapter,
    read_peft_config,
    resolve_targets,
)
from rpo_jax.train.config.schema import LoraSection
from rpo_jax.train.config.validation import validate

#: `config.model.lora`'s defaults for rank, alpha and targets (with `init_from`, values left at them are taken
#: from the adapter): the schema's.
LORA_DEFAULTS = {key: getattr(LoraSection(), key) for key in ("rank", "alpha", "targets")}


# ------------------------------------------------------------------------------------------------ LoRA
def lora_enabled(cfg: ml_collections.ConfigDict) -> bool:
    """Whether `config.model.lora` turns LoRA on (rank > 0 or an `init_from` adapter)."""
    lora = cfg.model.lora
    return lora.rank != 0 or bool(lora.init_from)


def lora_reference_is_base(cfg) -> bool:
    """Whether the primary reference of an empty path is the policy's base with its adapters off (LoRA with
    `config.model.lora.reference = "base"`, TRL's choice for a PEFT model without ref_model), rather than a copy
    of the initial policy (with LoRA: base + the adapters the run starts from, `"initial"`)."""
    return lora_enabled(cfg) and cfg.model.lora.reference == "base"


def lora_targets(value) -> str | tuple[str, ...]:
    """`config.model.lora.targets` → `LoraConfig.targets`: "all-linear"; a comma-separated list of module names
    ("q_proj,v_proj") or a list → a tuple of names; any other string → a regular expression."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    text = str(value).strip()
    if text != ALL_LINEAR and re.fullmatch(r"[A-Za-z_]\w*(\s*,\s*[A-Za-z_]\w*)*", text):
        return tuple(t.strip() for t in text.split(","))
    return text


def lora_settings(cfg) -> LoraConfig | None:
    """`config.model.lora` → the `LoraConfig` of fresh adapters (None when LoRA is off). Its values are checked
    by the schema (`validate`: one line naming the field); here what needs the file system (`init_from` is a
    directory) and the targets' form; with `init_from` the adapter's own settings are checked against these by
    `adapter_settings`."""
    cfg = validate(cfg)
    lora = cfg.model.lora
    if lora.init_from and not storage.is_url(lora.init_from) and not pathlib.Path(lora.init_from).is_dir():
        raise ValueError(
            f"config.model.lora.init_from: {lora.init_from!r} is not a directory (expected a PEFT "
            f"adapter directory with {ADAPTER_CONFIG})"
        )
    if not lora_enabled(cfg):
        return None
    fields = {
        "rank": lora.rank or 1,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "targets": lora_targets(lora.targets),
    }
    try:
        return LoraConfig(**fields)
    except ValueError as e:  # LoraConfig says "lora.<field> ..."; name the config field
        field = next((f for f in fields if f"lora.{f}" in str(e)), "targets")
        raise ValueError(f"config.model.lora.{field}: {str(e).split(': ', 1)[-1] if ': ' in str(e) else e}") from None


def adapter_directory(init_from: str) -> str:
    """`config.model.lora.init_from` as a local directory: a URL's adapter (adapter_config.json and
    adapter_model.safetensors, small) read whole once per process (`storage.cached_copy`); a local one as is."""
    try:
        return storage.cached_copy(init_from, skip_suffixes=())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config.model.lora.init_from: {e}") from None


def adapter_settings(cfg: ml_collections.ConfigDict, num_layers: int) -> LoraConfig:
    """The `LoraConfig` of `config.model.lora.init_from`'s adapter (its rank, alpha and targets, this config's
    dropout). A field of `config.model.lora` set to other than its default that disagrees with the adapter is a
    one-line ValueError naming both."""
    lora = cfg.model.lora
    adapter = read_peft_config(pathlib.Path(adapter_directory(lora.init_from)))
    where = f"config.model.lora.init_from={lora.init_from!r} ({ADAPTER_CONFIG})"
    if lora.rank not in (LORA_DEFAULTS["rank"], adapter.rank):
        raise ValueError(
            f"config.model.lora.rank={lora.rank} disagrees with {where}: r={adapter.rank}; set it to "
            f"{adapter.rank} or leave it at 0"
        )
    if float(lora.alpha) not in (LORA_DEFAULTS["alpha"], float(adapter.alpha)):
        raise ValueError(f"config.model.lora.alpha={lora.alpha} disagrees with {where}: lora_alpha={adapter.alpha}")
    if lora.targets != LORA_DEFAULTS["targets"]:
        mine = resolve_targets(lora_targets(lora.targets), num_layers)
        theirs = resolve_targets(adapter.targets, num_layers)
        if mine != theirs:
            raise ValueError(
                f"config.model.lora.targets={lora.targets!r} selects {list(mine)} but {where} adapts {list(theirs)}"
            )
    return dataclasses.replace(adapter, dropout=lora_settings(cfg).dropout)


def quantized_base(model: Decoder, dtype: str) -> Decoder:
    """`rpo_jax.models.quantize.quantize_base(model, dtype)` (QLoRA), or a ValueError when this installation has
    no quantizer."""
    try:
        from rpo_jax.models.quantize import quantize_base
    except ImportError as e:
        raise ValueError(
            f"config.model.lora.base_dtype={dtype!r}: QLoRA needs rpo_jax.models.quantize, which is not available ({e})"
        ) from None
    return quantize_base(model, dtype)


def add_adapters(model: Decoder, cfg: ml_collections.ConfigDict, mesh, *, read_weights: bool = True) -> Decoder:
    """The policy (or a reward model's backbone) `model` with LoRA adapters when `config.model.lora` turns LoRA
    on, else `model` unchanged: the base quantized first when `base_dtype` is set (`quantized_base`), then
    `load_peft_adapter(init_from)` or fresh adapters `attach_lora` (A from `config.seed`, B = 0), in
    `config.model.param_dtype` and placed on `mesh` by the sharding rules. Errors name the config field.
    `read_weights=False` (shapes only, e.g. under `nnx.eval_shape`): init_from's adapter is attached fresh with
    its settings, its tensors are not read."""
    settings = lora_settings(cfg)
    if settings is None:
        return model
    lora = cfg.model.lora
    if lora.base_dtype:
        model = quantized_base(model, lora.base_dtype)
    param_dtype = jnp.dtype(cfg.model.param_dtype)
    if lora.init_from:
        settings = adapter_settings(cfg, model.config.num_layers)
    if lora.init_from and read_weights:
        load_peft_adapter(model, adapter_directory(lora.init_from), param_dtype=param_dtype, mesh=mesh)
        model.lora.config = settings  # the adapter's rank, alpha and targets; this run's dropout
        return model
    try:
        return attach_lora(
            model,
            settings,
            rngs=nnx.Rngs(params=jax.random.fold_in(jax.random.key(cfg.seed), 1)),
            param_dtype=param_dtype,
            mesh=mesh,
        )
    except ValueError as e:
        raise ValueError(f"config.model.lora.targets: {e}") from None
