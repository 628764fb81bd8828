"""`rpo-train` with `config.mode = "reward_model"`: a Bradley–Terry reward model on preference pairs, exported as
a Hugging Face `XForSequenceClassification` checkpoint.

    rpo-train --config configs/reward_model_demo.py --workdir runs/rm_demo
    rpo-export runs/rm_demo exported/rm        # the newest checkpoint (dispatched here by config.json's mode)

Pipeline (every step reuses the trainer's parts):

1. **Records**: `config.data` read by the trainer's readers (`rpo_jax.train.build.data.load_records`: all five
   formats, demo data, held-out split), then turned into pairs by `preference_pairs` (`config.reward_model.pairs`).
2. **Sequences**: each (prompt, response) is the chat template of prompt + response tokenized without extra
   special tokens — exactly `rpo_jax.models.encode_conversation`, i.e. what `reward_model_fn` scores —
   right-padded with the model's `pad_token_id` into `[B, 2, T]` batches (index 0 chosen, 1 rejected) by the
   data pipeline (`TokenizedDataset`, resumable grain iterator, bucketed T).
3. **Scores**: `RewardModel(tokens, attention_mask)[:, label]`, i.e. `score · h` at transformers' pooling index
   (the rightmost token that is not `pad_token_id`). Training, `reward_model_fn` and the exported checkpoint in
   transformers therefore score every sequence the same way — including tokenizers whose pad id equals the EOS
   id, where a trailing EOS is skipped by all three.
4. **Loss** (`rpo_jax.losses.bradley_terry_loss`): the steps of `rpo_jax.train.step.reward_steps`, jitted on the
   mesh by the program builder (`rpo_jax.train.build.programs.reward_steps`, which `rpo-plan` compiles too) with
   float32 master weights cast to the compute dtype, gradient accumulation and the optax update shared with
   preference training; the run skeleton (`rpo_jax.train.core.runner`) does eval, checkpoints / resume and export.

LoRA (`config.model.lora`): adapters on the backbone's projections, and the score head trained in full (a fresh
head has nothing to adapt, and TRL/PEFT train a SEQ_CLS model's `score` as a module to save the same way); the
train state holds adapters + head, the frozen base is the rest. The export merges the adapters into the backbone
(`rpo_jax.train.core.export`; no PEFT adapter export for reward models).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from rpo_jax.data import PreferenceRecord, TokenizedDataset, label_score_counts, make_train_iterator
from rpo_jax.data.reward_pairs import pair_batch, preference_pairs, tokenize_pairs
from rpo_jax.models import RewardModel
from rpo_jax.train.build.data import largest_batch, load_records, load_tokenizer, tokenizer_path
from rpo_jax.train.build.fingerprints import dataset_fingerprint
from rpo_jax.train.build.fit import check_programs_fit, fitting_run, local_devices, log_fit
from rpo_jax.train.build.model import build_reward_model
from rpo_jax.train.build.programs import reward_steps
from rpo_jax.train.build.state import RunSetup, build_setup, compute_dtype, lighter_setup
from rpo_jax.train.config.schema import RunConfig
from rpo_jax.train.config.validation import validate
from rpo_jax.train.config.values import REWARD_MODEL, memory_budget_bytes
from rpo_jax.train.core.identity import run_identity
from rpo_jax.train.core.runner import Task, Unit, run_task, sum_over_eval_batches
from rpo_jax.train.runtime.global_batches import config_mesh, local_batch_size, process_rows, to_global

log = logging.getLogger(__name__)
#: `config.reward_model.pairs` as run identities recorded it before the schema normalised its spelling (so that
#: the identities of existing run directories stay as they were).
IDENTITY_PAIRS = {"all_pairs": "all", "best_vs_worst": "best_worst"}


# ------------------------------------------------------------------------------------------------- the model
def pad_id_of(model: RewardModel, tokenizer) -> int:
    """The id sequences are right-padded with: the model's `pad_token_id` (what `reward_model_fn` and
    transformers use), else the tokenizer's (the pooling then follows the attention mask)."""
    pad = model.pad_token_id if model.pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        raise ValueError("neither the reward model nor the tokenizer has a pad_token_id")
    return int(pad)


# ------------------------------------------------------------------------------------------------- the run
@dataclasses.dataclass
class RewardRun(RunSetup):
    """What reward-model training builds before the first step (tests use it too)."""

    datasets: dict[str, TokenizedDataset]
    pad_id: int


def load_pair_records(cfg: ml_collections.ConfigDict) -> dict[str, list[PreferenceRecord]]:
    """`config.data` read with the trainer's readers (`rpo_jax.train.build.data.load_records`) and paired
    (`preference_pairs`).

    Raises before anything is built: a K > 2 record without rewards (file:line), `margin_scale` without rewards.
    """
    rm = cfg.reward_model
    records = load_records(cfg)
    out = {}
    for split, recs in records.items():
        pairs_from = cfg.data.pairs_from
        pairs, without = preference_pairs(recs, mode=rm.pairs, pairs_from=pairs_from)
        counts = label_score_counts(recs)
        if counts.scored_pairs:
            (log.warning if counts.ties or counts.disagreements else log.info)(
                "%s data, labels vs scores: %s; %s",
                split,
                counts.summary(),
                "trained as labelled (data.pairs_from='labels')"
                if pairs_from == "labels"
                else "the scores decide: a tie gives no pair, a disagreeing pair trains the other way round",
            )
        if without:
            log.info("%s: %d of %d records give no pair (tied rewards)", split, without, len(recs))
        if rm.margin_scale and any(p.rewards is None for p in pairs):
            first = next(p for p in pairs if p.rewards is None)
            raise ValueError(
                f"{first.source[0]}:{first.source[1]}: reward_model.margin_scale="
                f"{rm.margin_scale} needs rewards, and this record has none"
            )
        if not pairs:
            raise ValueError(f"data.{split}: {len(recs)} records give no pair (every record's rewards are tied)")
        out[split] = pairs
    if "train" not in out:
        raise ValueError("data.train: no records")
    return out


def tokenize_pair_splits(
    cfg: ml_collections.ConfigDict, pairs: Mapping[str, Sequence[PreferenceRecord]], tokenizer, pad_id: int
) -> dict[str, TokenizedDataset]:
    """`tokenize_pairs` of every split (`data.max_length`, `data.truncation`); a split left empty is an error."""
    out = {}
    for split, recs in pairs.items():
        ds = tokenize_pairs(
            recs, tokenizer, max_length=cfg.data.max_length, pad_id=pad_id, truncation=cfg.data.truncation
        )
        log.info("%s: %d pairs; %s", split, len(recs), ds.report.summary())
        if len(ds) == 0:
            raise ValueError(f"data.{split}: no pair left after tokenization ({ds.report.summary()})")
        out[split] = ds
    return out


def build_reward_run(cfg: RunConfig | ml_collections.ConfigDict, *, devices=None) -> RewardRun:
    """Mesh, tokenizer, reward model, pair datasets, optimizer and initial train state. `cfg` is validated first
    (`rpo_jax.train.config.validation.validate`)."""
    cfg = validate(cfg)
    rm = cfg.reward_model
    mesh = config_mesh(cfg.mesh, devices)
    dtype = compute_dtype(cfg.model.dtype)
    pairs = load_pair_records(cfg)
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    model, model_config = build_reward_model(cfg, tokenizer, mesh, dtype)
    if not 0 <= rm.label < model.num_labels:
        raise ValueError(f"reward_model.label={rm.label} but the model has {model.num_labels} label(s)")
    if len(tokenizer) > model_config.vocab_size:
        raise ValueError(
            f"the tokenizer ({tokenizer_path(cfg)}) has {len(tokenizer)} tokens but the model's "
            f"vocab_size is {model_config.vocab_size}"
        )
    pad_id = pad_id_of(model, tokenizer)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != pad_id:
        log.warning(
            "the model pads (and pools) with pad_token_id=%d but the tokenizer's pad id is %d: score with "
            "reward_model_fn, or pad with the model's pad_token_id in transformers",
            pad_id,
            tokenizer.pad_token_id,
        )
    datasets = tokenize_pair_splits(cfg, pairs, tokenizer, pad_id)
    setup = build_setup(
        cfg, model, model_config, mesh=mesh, dtype=dtype, tokenizer=tokenizer, total_steps=cfg.train.steps
    )
    return RewardRun(**vars(setup), datasets=datasets, pad_id=pad_id)


def evaluate_pairs(run: RewardRun, params, eval_step) -> dict[str, float]:
    """Weighted means over every held-out pair: loss, accuracy, margin, chosen/rejected score; `pairs` counts."""
    if "eval" not in run.datasets:
        return {}
    margin_scale = run.config.reward_model.margin_scale
    totals = sum_over_eval_batches(
        run.datasets["eval"],
        run.config.data.eval_batch_size,
        run.mesh,
        lambda batch: jax.device_get(eval_step(params, to_global(pair_batch(batch, margin_scale), run.mesh))),
    )
    n = totals.pop("pairs", 0.0)
    if n == 0:
        return {}
    return {**{k: v / n for k, v in totals.items()}, "pairs": n}


def fitting_reward_run(run: RewardRun, per_process: int) -> tuple[RewardRun, tuple]:
    """`(run, (train step, eval step))` that pass the fit check (`rpo_jax.train.build.fit`): the train step
    compiled for the largest pairs and the eval step for the eval split's against `config.train.memory_budget` —
    the configured settings, else the first rung of `lighter_settings` that fits (`fitting_run`, logged), else
    `DoesNotFit`."""
    cfg = run.config
    if memory_budget_bytes(cfg.train.memory_budget, 1) is None:
        return run, reward_steps(cfg, run)
    sizes = {"train": per_process, "eval": local_batch_size(cfg.data.eval_batch_size, run.mesh)}
    largest = {
        split: to_global(pair_batch(largest_batch(run.datasets[split], size), cfg.reward_model.margin_scale), run.mesh)
        for split, size in sizes.items()
        if split in run.datasets
    }

    def check(candidate):
        (setup, (train_step, eval_step)) = candidate
        programs = [("train step", train_step, (setup.state, largest["train"]), 0)]
        if "eval" in largest:
            programs.append(("eval step", eval_step, (setup.state["params"], largest["eval"]), 0))
        log_fit(log, *check_programs_fit(programs, setup.config, local_devices(run.mesh)))

    def lighten(settings):
        lighter = lighter_setup(run, settings)
        return lighter, reward_steps(lighter.config, lighter)

    shards = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
    return fitting_run((run, reward_steps(cfg, run)), check, lighten, cfg, shards)


def reward_model_task(run: RewardRun) -> Task:
    """The run skeleton's task: one unit is one optimizer step on the next batch of pairs."""
    cfg, rm = run.config, run.config.reward_model
    per_process, rows = local_batch_size(cfg.data.batch_size, run.mesh), process_rows(run.mesh)
    iterator = make_train_iterator(
        run.datasets["train"], per_process, seed=cfg.seed, shuffle=cfg.data.shuffle, **rows.iterator_args()
    )
    run, (train_step, eval_step) = fitting_reward_run(run, per_process)
    cfg = run.config

    def advance(state, step: int) -> Unit:
        batch = pair_batch(next(iterator), rm.margin_scale)
        state, metrics = train_step(state, to_global(batch, run.mesh))
        return Unit(state, metrics, {"pairs": float(batch["weight"].sum()) * rows.count})

    identity = run_identity(
        cfg,
        REWARD_MODEL,
        run.model_config,
        run.tokenizer,
        objective=identity_objective(rm),
        data={split: dataset_fingerprint(ds) for split, ds in run.datasets.items()},
    )
    return Task(
        mode=REWARD_MODEL,
        run=run,
        identity=identity,
        units=cfg.train.steps,
        advance=advance,
        evaluate=lambda params, step: evaluate_pairs(run, params, eval_step),
        data_state=lambda step: iterator.get_state(),
        restore_data=lambda data_state, step: iterator.set_state(data_state),
        log_every=cfg.train.log_every,
        eval_every=cfg.train.eval_every,
        label="rpo-train reward model",
    )


def identity_objective(rm) -> dict[str, Any]:
    """The run identity's objective of a reward model: `config.reward_model`, its `pairs` spelt as identities
    recorded it before the schema (`IDENTITY_PAIRS`)."""
    return {"reward_model": {**dict(rm), "pairs": IDENTITY_PAIRS[rm.pairs]}}


def train_reward_model(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, devices=None) -> dict[str, Any]:
    """Train a Bradley–Terry reward model (`config.mode = "reward_model"`).

    Writes WORKDIR/config.json (with mode "reward_model", so `rpo-export` exports a reward model),
    metrics.jsonl (+ TensorBoard), checkpoints/ (params, optimizer state, step, RNG, data iterator position;
    resumed from the newest that restores) and, with `train.export_at_end`, WORKDIR/export (a Hugging Face
    sequence-classification checkpoint with the tokenizer).

    Args:
        cfg: the run configuration (a recipe's ConfigDict or a `RunConfig`; validated here).
        workdir: the run directory (a local path or a `gs://` URL): resumed when it holds this run's checkpoints.
        devices: the devices of the mesh (default: every device).

    Returns:
        `{"train": last logged train metrics, "eval": final held-out metrics (loss, accuracy, margin,
        chosen_score, rejected_score, pairs), "step": steps done, "export": the export directory or None}`.
    """
    return run_task(reward_model_task(build_reward_run(cfg, devices=devices)), workdir)
