"""What every training mode builds before its first step: dtype, tokenizer, data paths and records, the model
(a policy, or a reward model), and the train state with its optimizer.

One trainable-variable filter (`TRAINABLE`) decides what the optimizer updates and checkpoints hold; every
mode, reference and export splits its model with `split_trainable`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
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
from rpo_jax.models.reward import REWARD_ARCHITECTURES, RewardModel
from rpo_jax.models.sharding import state_shardings, variable_sharding
from rpo_jax.train.mesh import replicated
from rpo_jax.train.optim import make_optimizer

log = logging.getLogger(__name__)

#: The variables a run trains: `nnx.split(model, TRAINABLE, ...)` gives (graphdef, trainable, the rest).
TRAINABLE = nnx.Param

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
                       scan_unroll=cfg.model.scan_unroll)
    mconfig = ModelConfig.from_hf_dict(init_fields(cfg, vocab_size), source="config.model.init",
                                       remat=cfg.model.remat, scan_unroll=cfg.model.scan_unroll)
    model = create_model(mconfig, rngs=nnx.Rngs(params=cfg.model.init_seed), dtype=dtype, param_dtype=param_dtype,
                         mesh=mesh)
    return model, mconfig


def load_policy(cfg: ml_collections.ConfigDict, tokenizer, mesh, dtype):
    """(model, model config) of the policy `config.model` describes (`load_model` of `config.model.path`)."""
    return load_model(cfg.model.path, cfg, mesh, dtype, vocab_size=len(tokenizer))


def _check_exportable(mconfig: ModelConfig, source: str) -> None:
    if mconfig.model_type not in REWARD_ARCHITECTURES.values():
        raise ValueError(f"{source}: model_type {mconfig.model_type!r} has no Hugging Face sequence-classification "
                         f"architecture to export to (supported: {sorted(REWARD_ARCHITECTURES.values())})")


def build_reward_model(cfg: ml_collections.ConfigDict, tokenizer, mesh, dtype) -> tuple[RewardModel, ModelConfig]:
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
        overrides = {"tie_word_embeddings": True, "remat": cfg.model.remat, "scan_unroll": cfg.model.scan_unroll}
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
                                       scan_unroll=cfg.model.scan_unroll)
    _check_exportable(mconfig, "config.model.init")
    model = create_reward_model(mconfig, rngs=nnx.Rngs(params=cfg.model.init_seed), dtype=dtype,
                                param_dtype=param_dtype, mesh=mesh)
    return model, mconfig


def split_trainable(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable variables, the rest) of `model`: the filter is `TRAINABLE`;
    `nnx.merge(graphdef, trainable, rest)` is the model again."""
    return nnx.split(model, TRAINABLE, ...)


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
    overrides = {"remat": cfg.model.remat, "scan_unroll": cfg.model.scan_unroll}
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


def abstract_params(cfg: ml_collections.ConfigDict, model_config: ModelConfig, *, mesh, dtype
                    ) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, trainable parameters, the rest) of a model built under `nnx.eval_shape` (nothing allocated),
    split with `split_trainable`; the parameters are `jax.ShapeDtypeStruct`s (`config.model.param_dtype`) with
    their rule-based shardings on `mesh`."""
    param_dtype = jnp.dtype(cfg.model.param_dtype)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Decoder(model_config, rngs=nnx.Rngs(params=cfg.model.init_seed),
                                                  dtype=dtype, param_dtype=param_dtype))
    graphdef, params, rest = split_trainable(abstract)
    if jax.tree.leaves(rest):
        raise ValueError("abstract_params: the model has non-trainable arrays; they would need values")
    return graphdef, with_shardings(params, state_shardings(params, mesh)), rest


def abstract_setup(cfg: ml_collections.ConfigDict, model_config: ModelConfig, *, mesh, dtype,
                   total_steps: int) -> RunSetup:
    """`build_setup`'s RunSetup with abstract values (`abstract_params` of the policy, the optimizer state's
    shapes with `optimizer_state_shardings`, the step and RNG replicated): every leaf of `state` a
    `jax.ShapeDtypeStruct` with a `NamedSharding`."""
    graphdef, params, rest = abstract_params(cfg, model_config, mesh=mesh, dtype=dtype)
    tx, schedule = make_optimizer(cfg.optimizer, total_steps)
    opt_state = with_shardings(jax.eval_shape(tx.init, params), optimizer_state_shardings(tx, params, mesh))
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(cfg.seed)))
    state = {"params": params, "opt_state": opt_state,
             "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh)),
             "rng": jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=replicated(mesh))}
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return RunSetup(cfg, mesh, dtype, None, model_config, graphdef, rest, state, shardings, tx, schedule)
