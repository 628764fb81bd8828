"""What every training mode builds before its first step: dtype, tokenizer, data paths and records, the model
(a policy, or a reward model; with `config.model.lora` its LoRA adapters), and the train state with its optimizer.

One function, `trainable_filter(model)`, decides what the optimizer updates and checkpoints hold: every
`nnx.Param` of a model without adapters; only the adapters (`nnx.LoRAParam`) of a model with them (plus the
score head of a reward model). Every mode, reference and export splits its model with `split_trainable`, so with
LoRA the train state holds the adapters and `RunSetup.rest` the frozen base.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from rpo_jax.data import (TokenizedDataset, demo_paths, holdout_split, read_records, require_rewards, to_pairs,
                          tokenize_records)
from rpo_jax.losses import make_loss
from rpo_jax.models import Decoder, ModelConfig, create_model, create_reward_model, load_hf, load_reward_model
from rpo_jax.models.hf_io import read_config_json, resolve_checkpoint_dir
from rpo_jax.models.lora import (ADAPTER_CONFIG, ALL_LINEAR, LoraConfig, adapters_disabled, attach_lora,
                                 load_peft_adapter, read_peft_config, resolve_targets)
from rpo_jax.models.reward import REWARD_ARCHITECTURES, RewardModel
from rpo_jax.models.sharding import state_shardings, variable_sharding
from rpo_jax.train.mesh import replicated
from rpo_jax.train.optim import make_optimizer

log = logging.getLogger(__name__)

#: The variables a run trains without LoRA (`trainable_filter`).
TRAINABLE = nnx.Param
#: `config.model.lora.base_dtype` values (QLoRA) and `config.model.lora.reference` values.
LORA_BASE_DTYPES = ("", "int8", "int4")
LORA_REFERENCES = ("base", "initial")
#: `config.model.lora`'s defaults for rank, alpha and targets (with `init_from`, values left at them are taken
#: from the adapter).
LORA_DEFAULTS = {"rank": 0, "alpha": 16.0, "targets": ALL_LINEAR}

#: Files of which a tokenizer directory has at least one (fast; SentencePiece; BPE or WordPiece vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")

#: `config.data.pairs` → the `to_pairs` mode.
PAIR_MODES = {"best_worst": "best_vs_worst", "all": "all_pairs"}


# ------------------------------------------------------------------------------------------------ basics
def compute_dtype(name: str):
    """"auto" → float32 on CPU, bfloat16 on GPU/TPU; otherwise the named dtype."""
    if name == "auto":
        return jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def build_loss(cfg: ml_collections.ConfigDict):
    """`make_loss` from `config.loss`: the main term (weight `loss.weight`, default 1) plus weighted `extra`
    terms."""
    main = (cfg.loss.name, float(cfg.loss.get("weight", 1.0)), dict(cfg.loss.hparams))
    extra = [tuple(e) if len(e) == 3 else (e[0], e[1], {}) for e in cfg.loss.extra]
    if not extra and main[1] == 1.0:
        return make_loss(main[0], **main[2])
    return make_loss([main, *extra])


def tokenizer_path(cfg: ml_collections.ConfigDict) -> str:
    """`config.model.tokenizer`, else `config.model.path`, else the demo's character tokenizer."""
    if cfg.model.tokenizer:
        return cfg.model.tokenizer
    if cfg.model.path:
        return cfg.model.path
    return demo_paths()["tokenizer"]


def load_tokenizer(path: str):
    """A transformers tokenizer (one without a pad token pads with its EOS token). A directory without tokenizer
    files, or one transformers cannot load, is an error naming the directory and what is wrong."""
    from transformers import AutoTokenizer
    directory = pathlib.Path(path)
    if directory.is_dir() and not any((directory / name).exists() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path}: no tokenizer in this directory (none of {', '.join(TOKENIZER_FILES)}); "
                                "set config.model.tokenizer to a directory that has one")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; name the directory and the reason
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: the tokenizer does not load ({type(e).__name__}: {reason})") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# ------------------------------------------------------------------------------------------------ data
def data_paths(spec: str, split: str) -> list[str]:
    """`config.data.train` / `.eval` → files: comma-separated paths, or "" / "demo" for the bundled demo task
    (its train file for `split="train"`, its test file otherwise)."""
    if spec in ("", "demo"):
        return [demo_paths()["train" if split == "train" else "test"]]
    return [p for p in spec.split(",") if p]


def load_records(cfg: ml_collections.ConfigDict, *, requires_rewards: bool = False) -> dict[str, list]:
    """The train and eval records of `config.data`, read and validated; `requires_rewards` checks that every
    record has rewards before anything trains. Splits left empty are omitted."""
    dc = cfg.data
    fmt = dc.format or None
    train, report = read_records(data_paths(dc.train, "train"), format=fmt, on_error=dc.on_error)
    if report.num_skipped:
        log.warning("train data: %s", report.summary())
    if dc.eval or dc.train in ("", "demo"):
        evaluation, ereport = read_records(data_paths(dc.eval or dc.train, "eval"), format=fmt, on_error=dc.on_error)
        if ereport.num_skipped:
            log.warning("eval data: %s", ereport.summary())
    elif dc.eval_fraction > 0:
        parts = holdout_split(train, dc.eval_fraction, seed=cfg.seed)
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = []
    splits = {"train": train, "eval": evaluation}
    if dc.pairs:
        mode = PAIR_MODES.get(dc.pairs, dc.pairs)
        for split, recs in list(splits.items()):
            per_record = [to_pairs([r], mode=mode) for r in recs]
            splits[split] = [pair for pairs in per_record for pair in pairs]
            tied = sum(not pairs for pairs in per_record)
            if tied:
                log.warning("%s data: %d of %d records give no pair under data.pairs=%r (all their rewards "
                            "tie); they are left out", split, tied, len(recs), dc.pairs)
    if requires_rewards:
        for recs in splits.values():
            if recs:
                require_rewards(recs)
    if not splits["train"]:
        raise ValueError(f"data.train={dc.train!r}: no training records left"
                         + (f" after data.pairs={dc.pairs!r}" if dc.pairs else ""))
    return {k: v for k, v in splits.items() if v}


def tokenize_splits(cfg: ml_collections.ConfigDict, records: Mapping[str, list], tokenizer
                    ) -> dict[str, TokenizedDataset]:
    """`tokenize_records` of every split with `config.data`'s lengths and truncation; a split left empty is a
    ValueError."""
    dc = cfg.data
    out = {}
    for split, recs in records.items():
        ds = tokenize_records(recs, tokenizer, max_length=dc.max_length, max_prompt_length=dc.max_prompt_length or None,
                              truncation=dc.truncation, on_error=dc.on_error)
        log.info("%s: %s", split, ds.report.summary())
        if len(ds) == 0:
            raise ValueError(f"data.{split}: no example left after tokenization ({ds.report.summary()})")
        out[split] = ds
    return out


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
        return load_hf(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, remat=cfg.model.remat,
                       scan_unroll=cfg.model.scan_unroll, attention=cfg.model.attention)
    mconfig = ModelConfig.from_hf_dict(init_fields(cfg, vocab_size), source="config.model.init",
                                       remat=cfg.model.remat, scan_unroll=cfg.model.scan_unroll,
                                       attention=cfg.model.attention)
    model = create_model(mconfig, rngs=nnx.Rngs(params=cfg.model.init_seed), dtype=dtype, param_dtype=param_dtype,
                         mesh=mesh)
    return model, mconfig


def load_policy(cfg: ml_collections.ConfigDict, tokenizer, mesh, dtype):
    """(model, model config) of the policy `config.model` describes (`load_model` of `config.model.path`), with
    its LoRA adapters when `config.model.lora` asks for them (`add_adapters`)."""
    model, model_config = load_model(cfg.model.path, cfg, mesh, dtype, vocab_size=len(tokenizer))
    return add_adapters(model, cfg, mesh), model_config


# ------------------------------------------------------------------------------------------------ LoRA
def lora_enabled(cfg: ml_collections.ConfigDict) -> bool:
    """Whether `config.model.lora` turns LoRA on (rank > 0 or an `init_from` adapter)."""
    lora = cfg.model.get("lora")
    return lora is not None and (lora.rank != 0 or bool(lora.init_from))


def lora_targets(value) -> str | tuple[str, ...]:
    """`config.model.lora.targets` → `LoraConfig.targets`: "all-linear"; a comma-separated list of module names
    ("q_proj,v_proj") or a list → a tuple of names; any other string → a regular expression."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    text = str(value).strip()
    if text != ALL_LINEAR and re.fullmatch(r"[A-Za-z_]\w*(\s*,\s*[A-Za-z_]\w*)*", text):
        return tuple(t.strip() for t in text.split(","))
    return text


def lora_settings(cfg: ml_collections.ConfigDict) -> LoraConfig | None:
    """`config.model.lora` checked → the `LoraConfig` of fresh adapters (None when LoRA is off). Each bad value is
    a ValueError naming its field (`config.model.lora.rank: ...`); with `init_from` the adapter's own settings
    are checked against these by `adapter_settings`."""
    lora = cfg.model.get("lora")
    if lora is None:
        return None
    rank = lora.rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"config.model.lora.rank: must be an integer >= 0 (0 = LoRA off), got {rank!r}")
    if lora.base_dtype not in LORA_BASE_DTYPES:
        raise ValueError(f"config.model.lora.base_dtype: must be one of {LORA_BASE_DTYPES}, got {lora.base_dtype!r}")
    if lora.get("reference", "base") not in LORA_REFERENCES:
        raise ValueError(f"config.model.lora.reference: must be one of {LORA_REFERENCES}, got {lora.reference!r}")
    if lora.init_from and not pathlib.Path(lora.init_from).is_dir():
        raise ValueError(f"config.model.lora.init_from: {lora.init_from!r} is not a directory (expected a PEFT "
                         f"adapter directory with {ADAPTER_CONFIG})")
    if not lora_enabled(cfg):
        if lora.base_dtype:
            raise ValueError(f"config.model.lora.base_dtype={lora.base_dtype!r} quantizes the frozen base of LoRA "
                             "training; set config.model.lora.rank > 0 (or init_from)")
        return None
    fields = {"rank": rank or 1, "alpha": lora.alpha, "dropout": lora.dropout, "targets": lora_targets(lora.targets)}
    try:
        return LoraConfig(**fields)
    except ValueError as e:  # LoraConfig says "lora.<field> ..."; name the config field
        field = next((f for f in fields if f"lora.{f}" in str(e)), "targets")
        raise ValueError(f"config.model.lora.{field}: {str(e).split(': ', 1)[-1] if ': ' in str(e) else e}") from None


def adapter_settings(cfg: ml_collections.ConfigDict, num_layers: int) -> LoraConfig:
    """The `LoraConfig` of `config.model.lora.init_from`'s adapter (its rank, alpha and targets, this config's
    dropout). A field of `config.model.lora` set to other than its default that disagrees with the adapter is a
    one-line ValueError naming both."""
    lora = cfg.model.lora
    directory = pathlib.Path(lora.init_from)
    adapter = read_peft_config(directory)
    where = f"config.model.lora.init_from={str(directory)!r} ({ADAPTER_CONFIG})"
    if lora.rank not in (LORA_DEFAULTS["rank"], adapter.rank):
        raise ValueError(f"config.model.lora.rank={lora.rank} disagrees with {where}: r={adapter.rank}; set it to "
                         f"{adapter.rank} or leave it at 0")
    if float(lora.alpha) not in (LORA_DEFAULTS["alpha"], float(adapter.alpha)):
        raise ValueError(f"config.model.lora.alpha={lora.alpha} disagrees with {where}: lora_alpha={adapter.alpha}")
    if lora.targets != LORA_DEFAULTS["targets"]:
        mine = resolve_targets(lora_targets(lora.targets), num_layers)
        theirs = resolve_targets(adapter.targets, num_layers)
        if mine != theirs:
            raise ValueError(f"config.model.lora.targets={lora.targets!r} selects {list(mine)} but {where} adapts "
                             f"{list(theirs)}")
    return dataclasses.replace(adapter, dropout=lora_settings(cfg).dropout)


def quantized_base(model: Decoder, dtype: str) -> Decoder:
    """`rpo_jax.models.quantize.quantize_base(model, dtype)` (QLoRA), or a ValueError when this installation has
    no quantizer."""
    try:
        from rpo_jax.models.quantize import quantize_base
    except ImportError as e:
        raise ValueError(f"config.model.lora.base_dtype={dtype!r}: QLoRA needs rpo_jax.models.quantize, which is "
                         f"not available ({e})") from None
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
        load_peft_adapter(model, lora.init_from, param_dtype=param_dtype, mesh=mesh)
        model.lora.config = settings  # the adapter's rank, alpha and targets; this run's dropout
        return model
    try:
        return attach_lora(model, settings, rngs=nnx.Rngs(params=jax.random.fold_in(jax.random.key(cfg.seed), 1)),
                           param_dtype=param_dtype, mesh=mesh)
    except ValueError as e:
        raise ValueError(f"config.model.lora.targets: {e}") from None


def _check_exportable(mconfig: ModelConfig, source: str) -> None:
    if mconfig.model_type not in REWARD_ARCHITECTURES.values():
        raise ValueError(f"{source}: model_type {mconfig.model_type!r} has no Hugging Face sequence-classification "
                         f"architecture to export to (supported: {sorted(REWARD_ARCHITECTURES.values())})")


def build_reward_model(cfg: ml_collections.ConfigDict, tokenizer, mesh, dtype) -> tuple[RewardModel, ModelConfig]:
    """`reward_model_without_adapters`, then (with `config.model.lora`) LoRA adapters on its backbone
    (`add_adapters`); the score head stays fully trained (`trainable_filter`)."""
    model, mconfig = reward_model_without_adapters(cfg, tokenizer, mesh, dtype)
    model.backbone = add_adapters(model.backbone, cfg, mesh)
    return model, mconfig


def reward_model_without_adapters(cfg: ml_collections.ConfigDict, tokenizer, mesh, dtype
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
        overrides = {"tie_word_embeddings": True, "remat": cfg.model.remat, "scan_unroll": cfg.model.scan_unroll,
                     "attention": cfg.model.attention}
        if hf.get("pad_token_id") is None:
            overrides["pad_token_id"] = tokenizer.pad_token_id
        backbone, loaded = load_hf(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, **overrides)
        mconfig = dataclasses.replace(loaded, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
        _check_exportable(mconfig, path)
        model = RewardModel(mconfig, rngs=nnx.Rngs(params=cfg.model.init_seed), dtype=dtype,
                            param_dtype=param_dtype, backbone=backbone)
        if mesh is not None:
            model.score.set_value(jax.device_put(model.score[...], variable_sharding(model.score, mesh)))
        return model, mconfig
    init = init_fields(cfg, len(tokenizer))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if init.get(name) is None and getattr(tokenizer, name, None) is not None:
            init[name] = getattr(tokenizer, name)
    mconfig = ModelConfig.from_hf_dict(init, source="config.model.init", remat=cfg.model.remat,
                                       scan_unroll=cfg.model.scan_unroll, attention=cfg.model.attention)
    _check_exportable(mconfig, "config.model.init")
    model = create_reward_model(mconfig, rngs=nnx.Rngs(params=cfg.model.init_seed), dtype=dtype,
                                param_dtype=param_dtype, mesh=mesh)
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


# ------------------------------------------------------------------------------------------------ state
def on_mesh(tree: Any, mesh) -> Any:
    """Leaves already spread over `mesh` keep their sharding (parameters, moments that follow them); any other
    leaf (scalars such as the step or Adam's count) is replicated over the mesh. Every leaf comes back committed
    to its devices, as the jitted step's outputs are, so the step compiles once rather than twice."""
    devices = set(mesh.devices.flat)
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding)
                        if getattr(x, "sharding", None) is not None and x.sharding.device_set == devices
                        else jax.device_put(x, replicated(mesh)), tree)


@dataclasses.dataclass
class RunSetup:
    """What every mode builds before its first step; each mode's run adds what is specific to it.

    The train state is `{"params": trainable variables, "opt_state", "step": int32, "rng": key data}` on the
    mesh (`state_shardings` its shardings); `graphdef` and `rest` complete the trained model."""

    config: ml_collections.ConfigDict
    mesh: Any
    dtype: Any                      # compute dtype of the step
    tokenizer: Any
    model_config: ModelConfig
    graphdef: Any
    rest: Any
    state: dict[str, Any]
    state_shardings: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule


def optimizer_state_shardings(tx: optax.GradientTransformation, params: Any, mesh) -> Any:
    """Shardings of `tx.init(params)`: every leaf that mirrors a parameter (Adam's moments, ...) takes that
    parameter's sharding, anything else (counts) is replicated. (Left to itself, `jit(tx.init)` replicates the
    moments: zeros depend on no input, and XLA gives them no sharding — 8 bytes per parameter on every chip.)"""
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    return optax.tree_map_params(tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params), param_shardings,
                                 transform_non_params=lambda _: replicated(mesh))


def build_setup(cfg: ml_collections.ConfigDict, model: nnx.Module, model_config: ModelConfig, *, mesh, dtype,
                tokenizer, total_steps: int) -> RunSetup:
    """Split `model` into trainable parameters and the rest, build `config.optimizer` for `total_steps`, and place
    the initial train state (RNG from `config.seed`) on `mesh`."""
    graphdef, params, rest = split_trainable(model)
    tx, schedule = make_optimizer(cfg.optimizer, total_steps)
    opt_state = jax.jit(tx.init, out_shardings=optimizer_state_shardings(tx, params, mesh))(params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(cfg.seed))}
    state = on_mesh(state, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return RunSetup(cfg, mesh, dtype, tokenizer, model_config, graphdef, rest, state, shardings, tx, schedule)


# ------------------------------------------------------------------------------------------------ abstract state
def architecture_of(cfg: ml_collections.ConfigDict, path: str | None = None, architecture: str | None = None,
                    source: str = "config.model") -> ModelConfig:
    """A model's `ModelConfig` without touching its weights (for `rpo-plan`) — by default the policy's:
    `architecture` (default `config.model.architecture`: a Hugging Face config.json) when set, else `path`'s
    (default `config.model.path`) config.json when it is a local directory, else `config.model.init` (which must
    then state vocab_size). A hub id without an architecture file is a ValueError naming `source` (the planner
    downloads nothing)."""
    if path is None:
        path, architecture = cfg.model.path, cfg.model.architecture
    overrides = {"remat": cfg.model.remat, "scan_unroll": cfg.model.scan_unroll, "attention": cfg.model.attention}
    if architecture:
        file = pathlib.Path(architecture)
        if not file.is_file():
            raise FileNotFoundError(f"{source}.architecture={str(file)!r}: no such file (expected a Hugging Face "
                                    "config.json, e.g. configs/architectures/llama-3.1-8b-instruct.json)")
        try:
            fields = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
        return ModelConfig.from_hf_dict(fields, source=str(file), **overrides)
    if path:
        directory = pathlib.Path(path).expanduser()
        if not directory.is_dir():
            raise ValueError(f"{source}.path={path!r} is not a local directory; name its architecture with "
                             f"{source}.architecture=configs/architectures/<name>.json")
        config_file, fields = read_config_json(directory)
        return ModelConfig.from_hf_dict(fields, source=str(config_file), **overrides)
    return ModelConfig.from_hf_dict(init_fields(cfg, None), source="config.model.init", **overrides)


def with_shardings(tree: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of `tree`'s leaves (arrays or abstract values) carrying `shardings`' leaves."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_params(cfg: ml_collections.ConfigDict, model_config: ModelConfig, *, mesh, dtype,
                    adapters: bool = False) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, trainable parameters, the rest) of a model built under `nnx.eval_shape` (nothing allocated),
    split with `split_trainable`; every leaf a `jax.ShapeDtypeStruct` (`config.model.param_dtype`) with its
    rule-based sharding on `mesh`. `adapters`: the policy with `config.model.lora`'s adapters (`add_adapters`:
    the parameters are then the adapters, the rest the frozen base)."""
    param_dtype = jnp.dtype(cfg.model.param_dtype)

    def build():
        model = Decoder(model_config, rngs=nnx.Rngs(params=cfg.model.init_seed), dtype=dtype, param_dtype=param_dtype)
        return add_adapters(model, cfg, None, read_weights=False) if adapters else model

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(build)
    graphdef, params, rest = split_trainable(abstract)
    return (graphdef, with_shardings(params, state_shardings(params, mesh)),
            with_shardings(rest, state_shardings(rest, mesh)))


def abstract_setup(cfg: ml_collections.ConfigDict, model_config: ModelConfig, *, mesh, dtype,
                   total_steps: int) -> RunSetup:
    """`build_setup`'s RunSetup with abstract values (`abstract_params` of the policy, with its LoRA adapters when
    `config.model.lora` asks for them; the optimizer state's shapes with `optimizer_state_shardings`, the step and
    RNG replicated): every leaf of `state` (and of `rest`) a `jax.ShapeDtypeStruct` with a `NamedSharding`."""
    graphdef, params, rest = abstract_params(cfg, model_config, mesh=mesh, dtype=dtype, adapters=True)
    tx, schedule = make_optimizer(cfg.optimizer, total_steps)
    opt_state = with_shardings(jax.eval_shape(tx.init, params), optimizer_state_shardings(tx, params, mesh))
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(cfg.seed)))
    state = {"params": params, "opt_state": opt_state,
             "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh)),
             "rng": jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=replicated(mesh))}
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return RunSetup(cfg, mesh, dtype, None, model_config, graphdef, rest, state, shardings, tx, schedule)
