"""The models of a run: policies, references and reward models loaded from Hugging Face checkpoints or
initialized from `config.model.init`, split into what trains and the rest (`trainable_filter`,
`split_trainable`), and their abstract forms for `rpo-plan` (`architecture_of`, `abstract_params`).

One function, `trainable_filter(model)`, decides what the optimizer updates and checkpoints hold: every
`nnx.Param` of a model without adapters; only the adapters (`nnx.LoRAParam`) of a model with them (plus the
score head of a reward model). Every mode, reference and export splits its model with `split_trainable`, so with
LoRA the train state holds the adapters and `RunSetup.rest` the frozen base.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from rpo_jax.models import Decoder, ModelConfig, create_model, create_reward_model, load_hf, load_reward_model
from rpo_jax.models.hf_io import read_config_json, resolve_checkpoint_dir
from rpo_jax.models.lora import adapters_disabled
from rpo_jax.models.reward import REWARD_ARCHITECTURES, RewardModel
from rpo_jax.models.safetensors_io import is_url
from rpo_jax.models.sharding import state_shardings, variable_sharding
from rpo_jax.train.build.lora import add_adapters

#: The variables a run trains without LoRA (`trainable_filter`).
TRAINABLE = nnx.Param


# ------------------------------------------------------------------------------------------------ models
def init_fields(cfg: ml_collections.ConfigDict, vocab_size: int | None) -> dict:
    """`config.model.init` (HF-style fields of a random init), `vocab_size` filled in when it is missing."""
    init = dict(cfg.model.init)
    if vocab_size is not None:
        init.setdefault("vocab_size", vocab_size)
    return init


def load_model(path: str, cfg: ml_collections.ConfigDict, mesh, dtype, vocab_size: int | None = None):
    """(model, model config): the Hugging Face checkpoint `path`, or (empty `path`) a random init from
    `config.model.init` with seed `config.model.init_seed`; parameters placed on `mesh` by the sharding rules."""
    param_dtype = jnp.dtype(cfg.model.param_dtype)
    if path:
        return load_hf(
            path,
            dtype=dtype,
            param_dtype=param_dtype,
            mesh=mesh,
            remat=cfg.model.remat,
            scan_unroll=cfg.model.scan_unroll,
            attention=cfg.model.attention,
        )
    mconfig = ModelConfig.from_hf_dict(
        init_fields(cfg, vocab_size),
        source="config.model.init",
        remat=cfg.model.remat,
        scan_unroll=cfg.model.scan_unroll,
        attention=cfg.model.attention,
    )
    model = create_model(
        mconfig, rngs=nnx.Rngs(params=cfg.model.init_seed), dtype=dtype, param_dtype=param_dtype, mesh=mesh
    )
    return model, mconfig


def load_policy(cfg: ml_collections.ConfigDict, tokenizer, mesh, dtype):
    """(model, model config) of the policy `config.model` describes (`load_model` of `config.model.path`), with
    its LoRA adapters when `config.model.lora` asks for them (`add_adapters`)."""
    model, model_config = load_model(cfg.model.path, cfg, mesh, dtype, vocab_size=len(tokenizer))
    return add_adapters(model, cfg, mesh), model_config


def _check_exportable(mconfig: ModelConfig, source: str) -> None:
    if mconfig.model_type not in REWARD_ARCHITECTURES.values():
        raise ValueError(
            f"{source}: model_type {mconfig.model_type!r} has no Hugging Face sequence-classification "
            f"architecture to export to (supported: {sorted(REWARD_ARCHITECTURES.values())})"
        )


def build_reward_model(cfg: ml_collections.ConfigDict, tokenizer, mesh, dtype) -> tuple[RewardModel, ModelConfig]:
    """`reward_model_without_adapters`, then (with `config.model.lora`) LoRA adapters on its backbone
    (`add_adapters`); the score head stays fully trained (`trainable_filter`)."""
    model, mconfig = reward_model_without_adapters(cfg, tokenizer, mesh, dtype)
    model.backbone = add_adapters(model.backbone, cfg, mesh)
    return model, mconfig


def reward_model_without_adapters(
    cfg: ml_collections.ConfigDict, tokenizer, mesh, dtype
) -> tuple[RewardModel, ModelConfig]:
    """The reward model `config.model` describes, its parameters on `mesh` (float32 master weights by default):

    * `model.path` an `XForSequenceClassification` checkpoint → `load_reward_model` (continue training);
    * `model.path` a causal-LM checkpoint → its decoder (the unembedding is not loaded) + a fresh score head
      N(0, 0.02²) from `model.init_seed`;
    * no `model.path` → a random init from `model.init` (vocab_size, pad/bos/eos ids default to the tokenizer's).

    A checkpoint without `pad_token_id` gets the tokenizer's (transformers pools on it).
    """
    param_dtype = jnp.dtype(cfg.model.param_dtype)
    path = cfg.model.path
    hf = read_config_json(resolve_checkpoint_dir(path))[1] if path else {}
    if path and len(hf.get("architectures") or []) == 1 and hf["architectures"][0] in REWARD_ARCHITECTURES:
        return load_reward_model(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    if path:
        overrides = {
            "tie_word_embeddings": True,
            "remat": cfg.model.remat,
            "scan_unroll": cfg.model.scan_unroll,
            "attention": cfg.model.attention,
        }
        if hf.get("pad_token_id") is None:
            overrides["pad_token_id"] = tokenizer.pad_token_id
        backbone, loaded = load_hf(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **overrides)
        mconfig = dataclasses.replace(loaded, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
        _check_exportable(mconfig, path)
        model = RewardModel(
            mconfig, rngs=nnx.Rngs(params=cfg.model.init_seed), dtype=dtype, param_dtype=param_dtype, backbone=backbone
        )
        if mesh is not None:
            model.score.set_value(jax.device_put(model.score[...], variable_sharding(model.score, mesh)))
        return model, mconfig
    init = init_fields(cfg, len(tokenizer))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if init.get(name) is None and getattr(tokenizer, name, None) is not None:
            init[name] = getattr(tokenizer, name)
    mconfig = ModelConfig.from_hf_dict(
        init,
        source="config.model.init",
        remat=cfg.model.remat,
        scan_unroll=cfg.model.scan_unroll,
        attention=cfg.model.attention,
    )
    _check_exportable(mconfig, "config.model.init")
    model = create_reward_model(
        mconfig, rngs=nnx.Rngs(params=cfg.model.init_seed), dtype=dtype, param_dtype=param_dtype, mesh=mesh
    )
    return model, mconfig


def trainable_filter(model: nnx.Module):
    """The nnx filter of the variables a run trains in `model` (the one place that decides it): `TRAINABLE`
    (every `nnx.Param`) without LoRA adapters; with them (`model.lora`, or a reward model's `backbone.lora`) the
    adapters only (`nnx.LoRAParam`), plus a reward model's score head, which is trained in full (a fresh head has
    nothing to adapt)."""
    reward = isinstance(model, RewardModel)
    decoder = model.backbone if reward else model
    if getattr(decoder, "lora", None) is None:
        return TRAINABLE
    if reward:
        return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.PathContains("score")))
    return nnx.LoRAParam


def split_trainable(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable variables, the rest) of `model` with `trainable_filter(model)`;
    `nnx.merge(graphdef, trainable, rest)` is the model again. With LoRA the rest is the frozen base."""
    return nnx.split(model, trainable_filter(model), ...)


def adapters_off_graphdef(graphdef: nnx.GraphDef, params: Any, rest: Any) -> nnx.GraphDef:
    """The graphdef of the model `(graphdef, params, rest)` with its LoRA adapters switched off
    (`adapters_disabled`): merged with the same `params` and `rest` it runs exactly the base model's program.
    LoRA's base reference; nothing is copied (the values may be abstract)."""
    model = nnx.merge(graphdef, params, rest)
    with adapters_disabled(model):
        return split_trainable(model)[0]


def with_speed_settings(graphdef: nnx.GraphDef, params: Any, rest: Any, **settings) -> nnx.GraphDef:
    """The graphdef of the model `(graphdef, params, rest)` with speed-only `ModelConfig` fields changed
    (`settings`: remat, attention, scan_unroll — `rpo_jax.train.core.identity.SPEED_ONLY`): the same variables
    (merge it with the same `params` and `rest`), the same results, another program. A reward model's backbone
    takes them. Nothing is copied (the values may be abstract)."""
    model = nnx.merge(graphdef, params, rest)
    decoder = model.backbone if isinstance(model, RewardModel) else model
    decoder.config = dataclasses.replace(decoder.config, **settings)
    return nnx.graphdef(model)


# ------------------------------------------------------------------------------------------------ abstract state
def architecture_of(
    cfg: ml_collections.ConfigDict,
    path: str | None = None,
    architecture: str | None = None,
    source: str = "config.model",
) -> ModelConfig:
    """A model's `ModelConfig` without touching its weights (for `rpo-plan`) — by default the policy's:
    `architecture` (default `config.model.architecture`: a Hugging Face config.json) when set, else `path`'s
    (default `config.model.path`) config.json when it is a local directory, else `config.model.init` (which must
    then state vocab_size). A hub id without an architecture file is a ValueError naming `source` (the planner
    downloads nothing; a URL's config.json is read)."""
    if path is None:
        path, architecture = cfg.model.path, cfg.model.architecture
    overrides = {"remat": cfg.model.remat, "scan_unroll": cfg.model.scan_unroll, "attention": cfg.model.attention}
    if architecture:
        file = pathlib.Path(architecture)
        if not file.is_file():
            raise FileNotFoundError(
                f"{source}.architecture={str(file)!r}: no such file (expected a Hugging Face "
                "config.json, e.g. configs/architectures/llama-3.1-8b-instruct.json)"
            )
        try:
            fields = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
        return ModelConfig.from_hf_dict(fields, source=str(file), **overrides)
    if path and is_url(path):  # a bucket: its config.json (small) read, no weight
        config_file, fields = read_config_json(resolve_checkpoint_dir(path))
        return ModelConfig.from_hf_dict(fields, source=str(config_file), **overrides)
    if path:
        directory = pathlib.Path(path).expanduser()
        if not directory.is_dir():
            raise ValueError(
                f"{source}.path={path!r} is not a local directory; name its architecture with "
                f"{source}.architecture=configs/architectures/<name>.json"
            )
        config_file, fields = read_config_json(directory)
        return ModelConfig.from_hf_dict(fields, source=str(config_file), **overrides)
    return ModelConfig.from_hf_dict(init_fields(cfg, None), source="config.model.init", **overrides)


def reward_labels_of(cfg: ml_collections.ConfigDict) -> int:
    """The number of scores a reward model run's model gives (`RewardModel.num_labels`) without reading its
    weights: an `XForSequenceClassification` config.json (`config.model.architecture`, else `model.path`'s) states
    it (`id2label`, else `num_labels`, transformers' default 2); anything else starts a fresh one-label head."""
    file = pathlib.Path(cfg.model.architecture) if cfg.model.architecture else None
    if file is None and cfg.model.path and is_url(cfg.model.path):
        file = read_config_json(resolve_checkpoint_dir(cfg.model.path))[0]
    elif file is None and cfg.model.path and pathlib.Path(cfg.model.path).expanduser().is_dir():
        file = read_config_json(pathlib.Path(cfg.model.path).expanduser())[0]
    if file is None or not file.is_file():
        return 1
    hf = json.loads(file.read_text(encoding="utf-8"))
    if len(hf.get("architectures") or []) != 1 or hf["architectures"][0] not in REWARD_ARCHITECTURES:
        return 1
    return len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 2))


def abstract_params(
    cfg: ml_collections.ConfigDict,
    model_config: ModelConfig,
    *,
    mesh,
    dtype,
    adapters: bool = False,
    reward_labels: int | None = None,
) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, trainable parameters, the rest) of a model built under `nnx.eval_shape` (nothing allocated),
    split with `split_trainable`; every leaf a `jax.ShapeDtypeStruct` (`config.model.param_dtype`) with its
    rule-based sharding on `mesh`. `adapters`: with `config.model.lora`'s adapters (`add_adapters`: the
    parameters are then the adapters, the rest the frozen base). `reward_labels`: a `RewardModel` with that many
    labels (`build_reward_model`'s model: the adapters on its backbone, the score head trained in full)."""
    param_dtype = jnp.dtype(cfg.model.param_dtype)

    def build():
        rngs = nnx.Rngs(params=cfg.model.init_seed)
        if reward_labels is not None:
            model = RewardModel(model_config, num_labels=reward_labels, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            if adapters:
                model.backbone = add_adapters(model.backbone, cfg, None, read_weights=False)
            return model
        model = Decoder(model_config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        return add_adapters(model, cfg, None, read_weights=False) if adapters else model

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(build)
    graphdef, params, rest = split_trainable(abstract)
    return (
        graphdef,
        with_shardings(params, state_shardings(params, mesh)),
        with_shardings(rest, state_shardings(rest, mesh)),
    )


def with_shardings(tree: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of `tree`'s leaves (arrays or abstract values) carrying `shardings`' leaves."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def eos_ids_of(tokenizer, model_config) -> tuple[int, ...]:
    """Every id that ends a sample: the tokenizer's EOS and the model config's (one or several)."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    cfg_eos = model_config.eos_token_id
    if cfg_eos is not None:
        ids |= {int(i) for i in (cfg_eos if isinstance(cfg_eos, tuple) else (cfg_eos,))}
    if not ids:
        raise ValueError("online sampling needs an EOS id: the tokenizer and the model config have none")
    return tuple(sorted(ids))
