"""`rpo-train` with `config.mode = "reward_model"`: a Bradley–Terry reward model on preference pairs, exported as
a Hugging Face `XForSequenceClassification` checkpoint.

    rpo-train --config configs/reward_model_demo.py --workdir runs/rm_demo
    rpo-export runs/rm_demo exported/rm        # the newest checkpoint (dispatched here by config.json's mode)

Pipeline (every step reuses the trainer's parts):

1. **Records**: `config.data` read by the trainer's readers (`loop.load_records`: all five formats, demo data,
   held-out split), then turned into pairs by `preference_pairs` (`config.reward_model.pairs`).
2. **Sequences**: each (prompt, response) is the chat template of prompt + response tokenized without extra
   special tokens — exactly `rpo_jax.models.reward.encode_conversation`, i.e. what `reward_model_fn` scores —
   right-padded with the model's `pad_token_id` into `[B, 2, T]` batches (index 0 chosen, 1 rejected) by the
   data pipeline (`TokenizedDataset`, resumable grain iterator, bucketed T).
3. **Scores**: `RewardModel(tokens, attention_mask)[:, label]`, i.e. `score · h` at transformers' pooling index
   (the rightmost token that is not `pad_token_id`). Training, `reward_model_fn` and the exported checkpoint in
   transformers therefore score every sequence the same way — including tokenizers whose pad id equals the EOS
   id, where a trailing EOS is skipped by all three.
4. **Loss** (`bradley_terry_loss`), sharded jit step on the trainer's mesh with float32 master weights cast to
   the compute dtype, optax optimizer from `config.optimizer`, eval, checkpoints / resume, export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
import types
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from rpo_jax import data as D
from rpo_jax.data.records import PreferenceRecord, Problem, RecordError
from rpo_jax.models import ModelConfig, load_hf
from rpo_jax.models.hf_io import resolve_checkpoint_dir
from rpo_jax.models.reward import (
    REWARD_ARCHITECTURES,
    RewardModel,
    create_reward_model,
    load_reward_model,
    save_reward_model,
)
from rpo_jax.models.sharding import variable_sharding
from rpo_jax.train import loop
from rpo_jax.train.checkpoint import Checkpointer, abstract_like
from rpo_jax.train.mesh import local_batch_size, make_mesh, replicated, to_global
from rpo_jax.train.metrics import MetricWriter, device_memory
from rpo_jax.train.optim import make_optimizer
from rpo_jax.train.step import cast_floating

log = logging.getLogger(__name__)

PairMode = Literal["all", "best_worst"]
PAIR_MODES = ("all", "best_worst")
MODE = "reward_model"


# ------------------------------------------------------------------------------------------------- the loss
def bradley_terry_per_pair(
    chosen: jax.Array, rejected: jax.Array, *, center_coefficient: float = 0.0, margin: jax.Array | float | None = None
) -> jax.Array:
    """[P] float32: ℓ_p = −log σ(s_c,p − s_r,p − m_p) + λ·(s_c,p + s_r,p)²  (λ = center_coefficient, m = margin,
    0 when None; `margin` is a scalar or [P])."""
    chosen = jnp.asarray(chosen, jnp.float32)
    rejected = jnp.asarray(rejected, jnp.float32)
    diff = chosen - rejected
    if margin is not None:
        diff = diff - jnp.asarray(margin, jnp.float32)
    loss = -jax.nn.log_sigmoid(diff)
    if center_coefficient:
        loss = loss + center_coefficient * jnp.square(chosen + rejected)
    return loss


def bradley_terry_loss(
    chosen: jax.Array,
    rejected: jax.Array,
    weight: jax.Array,
    *,
    center_coefficient: float = 0.0,
    margin: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The Bradley–Terry reward-model loss over P pairs (scores s_c = chosen [P], s_r = rejected [P]).

        ℓ_p  = −log σ(s_c,p − s_r,p − m_p) + λ·(s_c,p + s_r,p)²
        loss = Σ_p w_p ℓ_p / Σ_p w_p                   (0 when Σ_p w_p = 0)

    `weight [P]` ≥ 0 (0 for padding pairs); `margin` m (scalar or [P]; None = 0) is the optional margin of Llama 2's
    reward models; λ = `center_coefficient` is TRL's `center_rewards_coefficient` (keeps scores centred at 0).
    Returns (loss, metrics) with the same weighted means of: `accuracy` [s_c > s_r] (ties count as wrong),
    `margin` s_c − s_r, `chosen_score` s_c, `rejected_score` s_r, and `pairs` Σ w.
    """
    chosen = jnp.asarray(chosen, jnp.float32)
    rejected = jnp.asarray(rejected, jnp.float32)
    weight = jnp.asarray(weight, jnp.float32)
    total = jnp.sum(weight)
    denom = jnp.where(total > 0, total, 1.0)

    def mean(x):
        return jnp.sum(weight * x) / denom

    per_pair = bradley_terry_per_pair(chosen, rejected, center_coefficient=center_coefficient, margin=margin)
    metrics = {"accuracy": mean((chosen > rejected).astype(jnp.float32)), "margin": mean(chosen - rejected),
               "chosen_score": mean(chosen), "rejected_score": mean(rejected), "pairs": total}
    return mean(per_pair), metrics


# ------------------------------------------------------------------------------------------------- pairs
def preference_pairs(records: Sequence[PreferenceRecord], *, mode: PairMode = "all"
                     ) -> tuple[list[PreferenceRecord], int]:
    """K-response records → pair records (response 0 chosen, 1 rejected) and the number of records giving no pair.

    * with rewards: the pairs (i, j) with r_i > r_j — all of them (`mode="all"`) or best vs worst
      (`"best_worst"`, first index wins ties); equal rewards give no pair (so an all-tied record gives none);
    * K = 2 without rewards: (0, 1), response 0 chosen (the formats' convention);
    * K > 2 without rewards: a `RecordError` (ValueError) naming file:line — a preference is never invented.
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"reward_model.pairs={mode!r}: expected one of {PAIR_MODES}")
    out: list[PreferenceRecord] = []
    without_pair = 0
    for r in records:
        if r.rewards is None:
            if r.num_responses != 2:
                raise RecordError(Problem(*r.source, "rewards", f"{r.num_responses} responses without rewards: a "
                                          "reward model needs a preference, which only K = 2 records (response 0 "
                                          "chosen) or explicit rewards give"))
            out.append(r)
            continue
        pairs = D.to_pairs([r], mode="all_pairs" if mode == "all" else "best_vs_worst")
        without_pair += not pairs
        out.extend(pairs)
    return out, without_pair


# ------------------------------------------------------------------------------------------------- tokens
def _conversation(record: PreferenceRecord, k: int) -> list[dict[str, str]]:
    return [dict(m) for m in record.prompt] + [dict(m) for m in record.responses[k]]


def conversation_ids(records: Sequence[PreferenceRecord], tokenizer) -> list[list[list[int]]]:
    """Token ids of every (record, response): the chat template of prompt + response messages, tokenized without
    extra special tokens. For a response that is one assistant message this is `encode_conversation(tokenizer,
    prompt, response_text)` — the text `reward_model_fn` scores. Identical conversations are encoded once."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("reward-model training scores the chat template of prompt + response (as reward_model_fn "
                         "does), but the tokenizer has no chat_template; set config.model.tokenizer to one that has")
    texts: dict[str, int] = {}
    where: list[list[int]] = []
    for r in records:
        row = []
        for k in range(r.num_responses):
            text = tokenizer.apply_chat_template(_conversation(r, k), tokenize=False)
            row.append(texts.setdefault(text, len(texts)))
        where.append(row)
    unique = list(texts)
    ids = tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
    return [[list(ids[i]) for i in row] for row in where]


def check_truncation(truncation: str) -> None:
    """ValueError unless `truncation` is "drop" or "truncate_prompt" (the policies that keep the scored token)."""
    if truncation not in ("drop", "truncate_prompt"):
        raise ValueError(f"data.truncation={truncation!r}: reward-model training supports 'drop' and "
                         "'truncate_prompt' (keep the last max_length tokens); 'truncate_response' would drop the "
                         "token whose hidden state is scored")


def tokenize_pairs(pairs: Sequence[PreferenceRecord], tokenizer, *, max_length: int, pad_id: int,
                   truncation: str = "drop") -> D.TokenizedDataset:
    """Pair records → a `TokenizedDataset` of K = 2 full conversations (see `conversation_ids`), padded with
    `pad_id` (the reward model's `pad_token_id`) into buckets up to `max_length`.

    `truncation`: "drop" leaves out a pair when either conversation exceeds `max_length` tokens (counted);
    "truncate_prompt" keeps the last `max_length` tokens (the scored end survives; `reward_model_fn(...,
    truncation="left")`). "truncate_response" would cut off the scored last token: a ValueError.
    The batch's `loss_mask` is empty (no token is scored by a language-model loss).
    """
    check_truncation(truncation)
    report = D.TokenizeReport(num_records=len(pairs))
    examples = []
    for index, (record, ids) in enumerate(zip(pairs, conversation_ids(pairs, tokenizer))):
        report.sequence_lengths += [len(s) for s in ids]
        if any(len(s) > max_length for s in ids):
            if truncation == "drop":
                report.num_dropped += 1
                continue
            report.num_prompts_truncated += 1
            ids = [s[-max_length:] for s in ids]
        sequences = tuple(np.asarray(s, np.int32) for s in ids)
        examples.append(D.TokenizedExample(index=index, sequences=sequences,
                                           prompt_lengths=tuple(len(s) for s in sequences), rewards=record.rewards))
    report.num_examples = len(examples)
    has_rewards = bool(examples) and all(e.rewards is not None for e in examples)
    return D.TokenizedDataset(records=list(pairs), examples=examples, k_max=2, buckets=D.default_buckets(max_length),
                              pad_id=int(pad_id), max_length=max_length, has_rewards=has_rewards, report=report)


# ------------------------------------------------------------------------------------------------- the model
def _hf_architecture(path: str) -> str:
    config_file = resolve_checkpoint_dir(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file.parent}: config.json is missing")
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    return architectures[0] if len(architectures) == 1 else ""


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
    if path and _hf_architecture(path) in REWARD_ARCHITECTURES:
        return load_reward_model(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    if path:
        hf = json.loads((resolve_checkpoint_dir(path) / "config.json").read_text())
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
    init = dict(cfg.model.init)
    init.setdefault("vocab_size", len(tokenizer))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if init.get(name) is None and getattr(tokenizer, name, None) is not None:
            init[name] = getattr(tokenizer, name)
    mconfig = ModelConfig.from_hf_dict(init, source="config.model.init", remat=cfg.model.remat,
                                       scan_unroll=cfg.model.scan_unroll)
    _check_exportable(mconfig, "config.model.init")
    model = create_reward_model(mconfig, rngs=nnx.Rngs(params=cfg.model.init_seed), dtype=dtype,
                                param_dtype=param_dtype, mesh=mesh)
    return model, mconfig


def _check_exportable(mconfig: ModelConfig, source: str) -> None:
    if mconfig.model_type not in REWARD_ARCHITECTURES.values():
        raise ValueError(f"{source}: model_type {mconfig.model_type!r} has no Hugging Face sequence-classification "
                         f"architecture to export to (supported: {sorted(REWARD_ARCHITECTURES.values())})")


def pad_id_of(model: RewardModel, tokenizer) -> int:
    """The id sequences are right-padded with: the model's `pad_token_id` (what `reward_model_fn` and
    transformers use), else the tokenizer's (the pooling then follows the attention mask)."""
    pad = model.pad_token_id if model.pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        raise ValueError("neither the reward model nor the tokenizer has a pad_token_id")
    return int(pad)


# ------------------------------------------------------------------------------------------------- steps
def pair_scores(model: RewardModel, tokens: jax.Array, attention_mask: jax.Array, label: int = 0
                ) -> tuple[jax.Array, jax.Array]:
    """tokens, attention_mask [B, 2, T] (index 0 chosen, 1 rejected) → (chosen [B], rejected [B]) float32:
    `model(tokens, attention_mask)[:, label]` of each conversation (the scores `reward_model_fn` gives)."""
    b, k, t = tokens.shape
    flat_mask = attention_mask.reshape(b * k, t)
    flat_mask = flat_mask.at[:, 0].set(True)  # all-padding slots: no empty attention row (their weight is 0)
    scores = model(tokens.reshape(b * k, t), flat_mask)[:, label].reshape(b, k)
    return scores[:, 0], scores[:, 1]


def _loss_inputs(graphdef, params, rest, batch, *, compute_dtype, label):
    model = nnx.merge(graphdef, cast_floating(params, compute_dtype), rest)
    return pair_scores(model, batch["tokens"], batch["attention_mask"], label)


def make_reward_train_step(graphdef, rest, tx: optax.GradientTransformation, *, compute_dtype, label: int = 0,
                           center_coefficient: float = 0.0, micro_batches: int = 1, lr_schedule=None):
    """`train_step(state, batch) -> (state, metrics)`: Bradley–Terry loss on `batch` (tokens, attention_mask
    [B,2,T], weight [B], margin [B]), gradients accumulated over `micro_batches` slices, one optax update."""

    def micro_loss(params, mb):
        chosen, rejected = _loss_inputs(graphdef, params, rest, mb, compute_dtype=compute_dtype, label=label)
        return bradley_terry_loss(chosen, rejected, mb["weight"], center_coefficient=center_coefficient,
                                  margin=mb["margin"])

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, batch):
        params = state["params"]
        if micro_batches == 1:
            (loss, metrics), grads = grad_fn(params, batch)
        else:
            def split(x):
                if x.shape[0] % micro_batches:
                    raise ValueError(f"batch size {x.shape[0]} is not divisible by data.micro_batches={micro_batches}")
                return x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)

            def body(carry, mb):
                (l, m), g = grad_fn(params, mb)
                return (jax.tree.map(jnp.add, carry[0], g), carry[1] + l), m

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss), metrics = jax.lax.scan(body, (zeros, jnp.float32(0)), jax.tree.map(split, dict(batch)))
            grads = jax.tree.map(lambda g: g / micro_batches, grads)
            loss = loss / micro_batches
            metrics = {k: (jnp.sum(v) if k == "pairs" else jnp.mean(v)) for k, v in metrics.items()}
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                     "step": state["step"] + 1, "rng": jax.random.fold_in(state["rng"], state["step"])}
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
        if lr_schedule is not None:
            metrics["learning_rate"] = lr_schedule(state["step"])
        return new_state, metrics

    return train_step


def make_reward_eval_step(graphdef, rest, *, compute_dtype, label: int = 0, center_coefficient: float = 0.0):
    """`eval_step(params, batch) -> sums`: Σ w·ℓ, Σ w, Σ w·[s_c > s_r], Σ w·(s_c − s_r), Σ w·s_c, Σ w·s_r."""

    def eval_step(params, batch):
        chosen, rejected = _loss_inputs(graphdef, params, rest, batch, compute_dtype=compute_dtype, label=label)
        w = batch["weight"]
        per_pair = bradley_terry_per_pair(chosen, rejected, center_coefficient=center_coefficient,
                                          margin=batch["margin"])
        return {"loss": jnp.sum(w * per_pair), "pairs": jnp.sum(w),
                "accuracy": jnp.sum(w * (chosen > rejected)), "margin": jnp.sum(w * (chosen - rejected)),
                "chosen_score": jnp.sum(w * chosen), "rejected_score": jnp.sum(w * rejected)}

    return eval_step


# ------------------------------------------------------------------------------------------------- the run
@dataclasses.dataclass
class RewardRun:
    """What `train_reward_model` builds before the first step (tests use it too)."""

    config: ml_collections.ConfigDict
    mesh: Any
    tokenizer: Any
    datasets: dict[str, D.TokenizedDataset]
    model_config: ModelConfig
    graphdef: Any
    rest: Any
    state: dict[str, Any]
    state_shardings: Any
    tx: Any
    schedule: Any
    dtype: Any
    pad_id: int


def _rm_settings(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    rm = cfg.get("reward_model")
    if rm is None:
        raise ValueError("config.reward_model is missing (start from rpo_jax.train.config.base_config())")
    return rm


def load_pair_records(cfg: ml_collections.ConfigDict) -> dict[str, list[PreferenceRecord]]:
    """`config.data` read with the trainer's readers (`loop.load_records`) and paired (`preference_pairs`).

    Raises before anything is built: a K > 2 record without rewards (file:line), `margin_scale` without rewards.
    """
    rm = _rm_settings(cfg)
    records = loop.load_records(cfg, types.SimpleNamespace(requires_rewards=False))
    out = {}
    for split, recs in records.items():
        pairs, without = preference_pairs(recs, mode=rm.pairs)
        if without:
            log.info("%s: %d of %d records give no pair (tied rewards)", split, without, len(recs))
        if rm.margin_scale and any(p.rewards is None for p in pairs):
            first = next(p for p in pairs if p.rewards is None)
            raise ValueError(f"{first.source[0]}:{first.source[1]}: reward_model.margin_scale="
                             f"{rm.margin_scale} needs rewards, and this record has none")
        if not pairs:
            raise ValueError(f"data.{split}: {len(recs)} records give no pair (every record's rewards are tied)")
        out[split] = pairs
    if "train" not in out:
        raise ValueError("data.train: no records")
    return out


def tokenize_pair_splits(cfg: ml_collections.ConfigDict, pairs: Mapping[str, Sequence[PreferenceRecord]], tokenizer,
                         pad_id: int) -> dict[str, D.TokenizedDataset]:
    """`tokenize_pairs` of every split (`data.max_length`, `data.truncation`); a split left empty is an error."""
    out = {}
    for split, recs in pairs.items():
        ds = tokenize_pairs(recs, tokenizer, max_length=cfg.data.max_length, pad_id=pad_id,
                            truncation=cfg.data.truncation)
        log.info("%s: %d pairs; %s", split, len(recs), ds.report.summary())
        if len(ds) == 0:
            raise ValueError(f"data.{split}: no pair left after tokenization ({ds.report.summary()})")
        out[split] = ds
    return out


def build_reward_run(cfg: ml_collections.ConfigDict, *, devices=None) -> RewardRun:
    """Mesh, tokenizer, reward model, pair datasets, optimizer and initial train state."""
    rm = _rm_settings(cfg)
    mesh = make_mesh(dict(cfg.mesh), devices)
    dtype = loop.compute_dtype(cfg.model.dtype)
    check_truncation(cfg.data.truncation)
    pairs = load_pair_records(cfg)
    tokenizer = loop.load_tokenizer(loop.tokenizer_path(cfg))
    model, mconfig = build_reward_model(cfg, tokenizer, mesh, dtype)
    if not 0 <= rm.label < model.num_labels:
        raise ValueError(f"reward_model.label={rm.label} but the model has {model.num_labels} label(s)")
    if len(tokenizer) > mconfig.vocab_size:
        raise ValueError(f"the tokenizer ({loop.tokenizer_path(cfg)}) has {len(tokenizer)} tokens but the model's "
                         f"vocab_size is {mconfig.vocab_size}")
    pad_id = pad_id_of(model, tokenizer)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != pad_id:
        log.warning("the model pads (and pools) with pad_token_id=%d but the tokenizer's pad id is %d: score with "
                    "reward_model_fn, or pad with the model's pad_token_id in transformers", pad_id,
                    tokenizer.pad_token_id)
    datasets = tokenize_pair_splits(cfg, pairs, tokenizer, pad_id)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    state = {"params": params, "opt_state": jax.jit(tx.init)(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(cfg.seed))}
    state = loop.on_mesh(state, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return RewardRun(cfg, mesh, tokenizer, datasets, mconfig, graphdef, rest, state, shardings, tx, schedule, dtype,
                     pad_id)


def pair_batch(batch: Mapping[str, np.ndarray], margin_scale: float = 0.0) -> dict[str, np.ndarray]:
    """A `[B, 2, T]` pipeline batch → the step's inputs: tokens, attention_mask, weight [B] (1 for a real pair,
    0 for eval padding) and margin [B] = margin_scale · (r_chosen − r_rejected) (0 without a margin)."""
    weight = (batch["valid"][:, 0] & batch["valid"][:, 1]).astype(np.float32)
    margin = np.zeros_like(weight)
    if margin_scale:
        margin = (margin_scale * (batch["rewards"][:, 0] - batch["rewards"][:, 1]) * weight).astype(np.float32)
    return {"tokens": batch["tokens"], "attention_mask": batch["attention_mask"], "weight": weight, "margin": margin}


def evaluate_pairs(run: RewardRun, params, eval_step) -> dict[str, float]:
    """Weighted means over every held-out pair: loss, accuracy, margin, chosen/rejected score; `pairs` counts."""
    ds = run.datasets.get("eval")
    if ds is None:
        return {}
    per_process = local_batch_size(run.config.data.eval_batch_size, run.mesh)
    totals: dict[str, float] = {}
    for batch in D.make_eval_batches(ds, per_process):
        sums = jax.device_get(eval_step(params, to_global(pair_batch(batch, run.config.reward_model.margin_scale),
                                                          run.mesh)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    n = totals.pop("pairs", 0.0)
    if n == 0:
        return {}
    return {**{k: v / n for k, v in totals.items()}, "pairs": n}


def _recorded_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`cfg` with mode "reward_model" (what config.json records, so `rpo-export` dispatches here)."""
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.mode = MODE
    return out


def train_reward_model(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, devices=None
                       ) -> dict[str, Any]:
    """Train a Bradley–Terry reward model (`config.mode = "reward_model"`); returns `{"train": last logged train
    metrics, "eval": final held-out metrics (loss, accuracy, margin, chosen_score, rejected_score, pairs),
    "step": steps done, "export": the export directory or None}`.

    Writes WORKDIR/config.json, metrics.jsonl (+ TensorBoard), checkpoints/ (params, optimizer state, step, RNG,
    data iterator position; resumed from the newest that restores) and, with `train.export_at_end`,
    WORKDIR/export (a Hugging Face sequence-classification checkpoint with the tokenizer).
    """
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(_recorded_config(cfg).to_json_best_effort(indent=1))
    rm = _rm_settings(cfg)
    run = build_reward_run(cfg, devices=devices)
    writer = MetricWriter(workdir, tensorboard=cfg.metrics.tensorboard)
    ckpt = Checkpointer(workdir / "checkpoints", every_steps=cfg.train.checkpoint_every,
                        keep=cfg.train.keep_checkpoints, asynchronous=cfg.train.async_checkpointing)
    per_process = local_batch_size(cfg.data.batch_size, run.mesh)
    iterator = D.make_train_iterator(run.datasets["train"], per_process, seed=cfg.seed, shuffle=cfg.data.shuffle)

    step_fn = make_reward_train_step(run.graphdef, run.rest, run.tx, compute_dtype=run.dtype, label=rm.label,
                                     center_coefficient=rm.center_coefficient, micro_batches=cfg.data.micro_batches,
                                     lr_schedule=run.schedule)
    train_step = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(run.state_shardings, replicated(run.mesh)))
    eval_step = jax.jit(make_reward_eval_step(run.graphdef, run.rest, compute_dtype=run.dtype, label=rm.label,
                                              center_coefficient=rm.center_coefficient),
                        out_shardings=replicated(run.mesh))

    state = run.state
    restored = ckpt.restore_latest(abstract_like(state))
    if restored is not None:
        _, state, data_state = restored
        iterator.set_state(data_state)
        log.info("resumed from step %d", int(state["step"]))
    total_steps = cfg.train.steps
    step = int(state["step"])

    progress = None
    if cfg.train.progress_bar and jax.process_index() == 0 and step < total_steps:
        from tqdm.auto import tqdm
        progress = tqdm(total=total_steps, initial=step, desc="rpo-train reward model", dynamic_ncols=True)

    last: dict[str, float] = {}
    window_start, window_pairs, window_steps, compiled = time.perf_counter(), 0.0, 0, False
    with loop._Preemption() as preemption:
        while step < total_steps:
            batch = pair_batch(next(iterator), rm.margin_scale)
            state, metrics = train_step(state, to_global(batch, run.mesh))
            step += 1
            window_pairs += float(batch["weight"].sum()) * jax.process_count()
            window_steps += 1
            if not compiled:  # keep the first step's compilation out of the throughput
                jax.block_until_ready(metrics)
                window_start, window_pairs, window_steps, compiled = time.perf_counter(), 0.0, 0, True
            if step % cfg.train.log_every == 0 or step == total_steps:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                if window_steps:
                    last.update({"perf/step_time_s": elapsed / window_steps,
                                 "perf/pairs_per_s": window_pairs / elapsed})
                last.update(device_memory())
                writer.write(step, last, prefix="train/")
                window_start, window_pairs, window_steps = time.perf_counter(), 0.0, 0
            if progress is not None:
                progress.update(1)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total_steps:
                writer.write(step, evaluate_pairs(run, state["params"], eval_step), prefix="eval/")
                window_start, window_pairs, window_steps = time.perf_counter(), 0.0, 0
            ckpt.save(step, state, iterator.get_state())
            if preemption.should_stop(step):
                log.warning("preemption requested: saving step %d and exiting", step)
                loop.close_run(ckpt, writer, step, state, iterator.get_state())
                return {"train": last, "preempted_at": step}
    if progress is not None:
        progress.close()
    eval_metrics = evaluate_pairs(run, state["params"], eval_step)
    if eval_metrics:
        writer.write(step, eval_metrics, prefix="eval/")
    loop.close_run(ckpt, writer, step, state, iterator.get_state())
    exported = None
    if cfg.train.export_at_end:
        exported = export_reward_model(run.graphdef, state["params"], run.rest, run.model_config,
                                       workdir / "export", run.tokenizer, run.mesh)
    return {"train": last, "eval": eval_metrics, "step": step, "export": None if exported is None else str(exported)}


# ------------------------------------------------------------------------------------------------- export
def export_reward_model(graphdef, params, rest, model_config: ModelConfig, out_dir: str | os.PathLike, tokenizer,
                        mesh) -> pathlib.Path:
    """`save_reward_model` of the merged model (parameters gathered to every process; process 0 writes)."""
    return loop.save_replicated(graphdef, params, rest, model_config, out_dir, tokenizer, mesh, save=save_reward_model)


def export_reward_model_workdir(workdir: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """`rpo-export` of a reward-model run: the newest restorable checkpoint of `workdir` as a Hugging Face
    sequence-classification directory with the tokenizer (`loop.export_workdir`, after checking the mode)."""
    workdir = pathlib.Path(workdir)
    cfg = loop.read_run_config(workdir)
    if cfg.get("mode") != MODE:
        raise ValueError(f"{workdir / 'config.json'}: mode={cfg.get('mode')!r} is not {MODE!r}")
    return loop.export_workdir(workdir, out_dir)
