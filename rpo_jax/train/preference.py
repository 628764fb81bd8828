"""Preference training (`config.mode = "preference"`, the default job): records → policy and references →
the loss of `config.loss` on `[B, K]` log-probs, driven by the run skeleton (`rpo_jax.train.runner`).

What is specific to this mode: the references (a frozen copy of the initial policy and any `config.references`,
scored in the step or cached once as `[N, K, R]` under WORKDIR/ref_cache), the score window shared by train,
eval and the cache, iterated training (`config.train.iterations > 1`: the primary reference becomes the previous
iterate), and evaluation over the whole held-out split.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rpo_jax.data import (TokenizedDataset, label_score_counts, make_train_iterator, rewards_reach_loss, storage,
                          tokenize_records)
from rpo_jax.models.sharding import make_mesh
from rpo_jax.train.mesh import local_batch_size, replicated, to_global
from rpo_jax.train.performance import train_flops_per_token
from rpo_jax.train.identity import dataset_fingerprint, run_identity, weights_fingerprint
from rpo_jax.train.reference_cache import Reference, cached_logps, compute_logps
from rpo_jax.train.runner import ResumeError, Task, Unit, run_task, sum_over_eval_batches
from rpo_jax.train.setup import (RunSetup, build_loss, build_setup, compute_dtype, load_model, load_policy,
                                 load_records, load_tokenizer, split_trainable, tokenize_splits, tokenizer_path)
from rpo_jax.train.step import make_eval_step, make_scorer, make_train_step, resolve_score_window
from rpo_jax.train.workdir import REFERENCE_CACHE

log = logging.getLogger(__name__)

MODE = "preference"
INITIAL_POLICY = "initial-policy"
REFERENCE_MODES = ("auto", "cache", "in_step")


@dataclasses.dataclass
class PreferenceRun(RunSetup):
    """Everything preference training builds before the first step (also used by tests and benchmarks)."""

    workdir: storage.PathLike  # a local path or a URL (`rpo_jax.data.storage`)
    loss_fn: Any
    datasets: dict[str, TokenizedDataset]
    references: list[Reference]
    in_step_refs: bool                    # references scored in the step (else their log-probs are cached)
    score_window: int | None              # output-head positions per sequence (config.model.score_window)
    ref_cache: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # split → [N, K, R] (cache mode)
    preference_direction: dict[str, Any] = dataclasses.field(default_factory=dict)  # `preference_direction`


def score_window_of(cfg: ml_collections.ConfigDict, datasets: Mapping[str, TokenizedDataset]) -> int | None:
    """The run's static `score_window` (`config.model.score_window`) for `datasets` (one tokenization: every
    split, so train, eval and the reference cache share one W and one compilation per length bucket)."""
    span = max((ds.max_scored_span for ds in datasets.values()), default=0)
    return resolve_score_window(cfg.model.score_window, span)


def build_references(cfg: ml_collections.ConfigDict, setup: RunSetup, datasets: Mapping[str, TokenizedDataset],
                     loss_fn) -> list[Reference]:
    """The references of `config.references` (index 0 the primary; an empty path, or an empty list, is the
    initial policy), none for a reference-free loss. A reference with its own tokenizer gets the records tokenized
    with it."""
    if not loss_fn.spec.requires_reference:
        return []
    references = []
    for spec in [dict(s) for s in cfg.references] or [{"path": "", "tokenizer": ""}]:
        if not spec.get("path"):
            fingerprint = weights_fingerprint(cfg.model.path, cfg, len(setup.tokenizer))
            references.append(Reference(INITIAL_POLICY, fingerprint, setup.graphdef,
                                        jax.tree.map(jnp.copy, setup.state["params"]), setup.rest, datasets,
                                        tokenizer_path(cfg)))
            continue
        model, _ = load_model(spec["path"], cfg, setup.mesh, setup.dtype)
        graphdef, params, rest = split_trainable(model)
        tokenizer_name = spec.get("tokenizer") or spec["path"]
        own = datasets
        if tokenizer_name != tokenizer_path(cfg):
            tokenizer = load_tokenizer(tokenizer_name)
            own = {split: tokenize_records(ds.records, tokenizer, max_length=cfg.data.max_length,
                                           max_prompt_length=cfg.data.max_prompt_length or None,
                                           truncation=cfg.data.truncation, k_max=ds.k_max, on_error=cfg.data.on_error)
                   for split, ds in datasets.items()}
        references.append(Reference(spec["path"], weights_fingerprint(spec["path"], cfg), graphdef, params, rest,
                                    own, tokenizer_name))
    loss_fn.spec.check_reference_count(len(references), given="config.references")
    return references


def build_run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, devices=None) -> PreferenceRun:
    """Data, policy, references, optimizer and initial state (`devices`: a subset to run on; default all)."""
    mesh = make_mesh(dict(cfg.mesh), devices)
    dtype = compute_dtype(cfg.model.dtype)
    loss_fn = build_loss(cfg)
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    records = load_records(cfg, requires_rewards=loss_fn.spec.requires_rewards)
    rewards_to_loss, direction = preference_direction(cfg, records, loss_fn.spec.requires_rewards)
    datasets = tokenize_splits(cfg, records, tokenizer)
    if not rewards_to_loss:  # labelled pairs train as labelled: their scores stay out of the batch
        datasets = {split: dataclasses.replace(ds, has_rewards=False) for split, ds in datasets.items()}
    resolve_epochs(cfg, len(datasets["train"]))
    model, model_config = load_policy(cfg, tokenizer, mesh, dtype)
    setup = build_setup(cfg, model, model_config, mesh=mesh, dtype=dtype, tokenizer=tokenizer,
                        total_steps=cfg.train.steps * max(1, cfg.train.iterations))
    references = build_references(cfg, setup, datasets, loss_fn)
    if cfg.reference_mode not in REFERENCE_MODES:
        raise ValueError(f"reference_mode={cfg.reference_mode!r}: expected one of {REFERENCE_MODES}")
    in_step = cfg.reference_mode == "in_step" and bool(references)
    if in_step and any(r.datasets is not datasets for r in references):
        raise ValueError("reference_mode='in_step' needs references that share the policy's tokenizer; "
                         "use 'cache' for references with their own tokenizer")
    return PreferenceRun(**vars(setup), workdir=storage.as_path(workdir), loss_fn=loss_fn, datasets=datasets,
                         references=references, in_step_refs=in_step, score_window=score_window_of(cfg, datasets),
                         preference_direction=direction)


def preference_direction(cfg: ml_collections.ConfigDict, records: Mapping[str, list], loss_uses_rewards: bool
                         ) -> tuple[bool, dict[str, Any]]:
    """Whether the records' rewards reach the loss (`rewards_reach_loss` with `config.data.pairs_from`), and
    the run's record of it: `{"pairs_from", "rewards_reach_loss", split: {"scored_pairs", "ties",
    "disagreements"}}`. Ties and label/score disagreements among labelled pairs are logged (a warning when
    there are any), never passed over in silence."""
    pairs_from = cfg.data.get("pairs_from", "labels")
    every = [r for recs in records.values() for r in recs]
    to_loss = rewards_reach_loss(every, loss_uses_rewards=loss_uses_rewards, pairs_from=pairs_from)
    record: dict[str, Any] = {"pairs_from": pairs_from, "rewards_reach_loss": to_loss}
    for split, recs in records.items():
        counts = label_score_counts(recs)
        record[split] = counts.as_dict()
        if not counts.scored_pairs:
            continue
        if to_loss:
            how = ("the scores reach the loss: a tie contributes nothing, a disagreeing pair trains the other way "
                   "round" + ("" if loss_uses_rewards else " (data.pairs_from='rewards')"))
        else:
            how = "trained as labelled (data.pairs_from='labels'; scores reach only reward-aware losses)"
        (log.warning if counts.ties or counts.disagreements else log.info)(
            "%s data, labels vs scores: %s; %s", split, counts.summary(), how)
    return to_loss, record


def resolve_epochs(cfg: ml_collections.ConfigDict, num_train: int) -> None:
    """`config.train.epochs` > 0 sets `config.train.steps` = ceil(epochs · ceil(N / data.batch_size)) for the N
    train examples (TRL's step count for `num_train_epochs`: ceil(ceil(N / per-device batch) / accumulation))."""
    epochs = float(cfg.train.get("epochs", 0.0) or 0.0)
    if epochs <= 0:
        return
    cfg.train.steps = math.ceil(epochs * math.ceil(num_train / cfg.data.batch_size))
    log.info("train.epochs=%g over %d examples: train.steps=%d", epochs, num_train, cfg.train.steps)


# ------------------------------------------------------------------------------------------------ references
def fill_reference_cache(run: PreferenceRun) -> None:
    """Precompute `[N, K, R]` reference log-probs for every split (cached under WORKDIR/ref_cache)."""
    if not run.references or run.in_step_refs:
        return
    cfg = run.config
    per_process = local_batch_size(cfg.data.eval_batch_size, run.mesh)
    cache_dir = storage.as_path(cfg.reference_cache_dir or storage.as_path(run.workdir) / REFERENCE_CACHE)
    scorers = [make_scorer(ref.graphdef, ref.rest, run.mesh, compute_dtype=run.dtype,
                           vocab_chunk_size=cfg.model.vocab_chunk_size or None,
                           score_window=run.score_window if ref.datasets is run.datasets
                           else score_window_of(cfg, ref.datasets))
               for ref in run.references]
    cache = {}
    for split, ds in run.datasets.items():
        columns = []
        for ref, scorer in zip(run.references, scorers):
            compute = lambda ref=ref, scorer=scorer: compute_logps(  # noqa: E731
                scorer, ref.params, ref.datasets[split], per_process, run.mesh)
            columns.append(cached_logps(cache_dir, ref, split, compute))
        values = np.stack(columns, axis=-1)  # [N, K, R]
        check_cache_complete(values, ds, split)
        cache[split] = values
    run.ref_cache = cache


def check_cache_complete(values: np.ndarray, ds: TokenizedDataset, split: str) -> None:
    """A ValueError naming file:line when a reference has no log-prob for a response the policy trains on (its
    own tokenizer dropped the record)."""
    for e in ds.examples:
        k = len(e.sequences)
        if np.isnan(values[e.index, :k]).any():
            file, line = ds.records[e.index].source
            raise ValueError(f"{file}:{line}: a reference tokenizer dropped this record ({split}); raise "
                             "data.max_length or use truncation='truncate_prompt'")


def with_references(run: PreferenceRun, batch: dict[str, np.ndarray], split: str) -> dict[str, np.ndarray]:
    """Add `ref_logps [B, K, R]` from the cache (cache mode), by record index ([B, K] for a single-reference
    loss)."""
    if not run.ref_cache:
        return batch
    index = batch["index"]
    ref = run.ref_cache[split][np.maximum(index, 0)]
    ref = np.where(batch["valid"][..., None], np.nan_to_num(ref), 0.0).astype(np.float32)
    if ref.shape[-1] == 1 and not run.loss_fn.spec.num_references:
        ref = ref[..., 0]
    return {**batch, "ref_logps": ref}


def device_batch(run: PreferenceRun, batch: dict[str, np.ndarray], split: str) -> dict[str, jax.Array]:
    """A host batch of `split` (this process's rows) → the step's global input, cached references added."""
    batch = with_references(run, batch, split)
    batch = {k: v for k, v in batch.items() if k != "index"}
    return to_global(batch, run.mesh)


def in_step_reference_params(run: PreferenceRun) -> tuple:
    """The reference parameters the step scores (in-step mode), else ()."""
    return tuple(r.params for r in run.references) if run.in_step_refs else ()


def reset_reference_to_policy(run: PreferenceRun, params, step: int) -> None:
    """Iterated training: the primary reference becomes the current policy (the previous iterate); its cached
    log-probs are recomputed. Other references (MRPO) stay as they are."""
    primary = run.references[0]
    if primary.datasets is not run.datasets:
        raise ValueError("train.iterations > 1 needs a primary reference with the policy's tokenizer")
    run.references[0] = dataclasses.replace(primary, name=INITIAL_POLICY, graphdef=run.graphdef, rest=run.rest,
                                            params=jax.tree.map(jnp.copy, params),
                                            fingerprint=f"{primary.fingerprint}+iterate@{step}")
    fill_reference_cache(run)


# ------------------------------------------------------------------------------------------------ eval
def evaluate(run: PreferenceRun, params, eval_step) -> dict[str, float]:
    """Loss and metrics over the whole eval split: each batch's means weighted by its examples with a valid
    response (batches of padding only are left out)."""
    if "eval" not in run.datasets:
        return {}

    def sums_of(batch):
        loss, weight, metrics = jax.device_get(
            eval_step(params, device_batch(run, batch, "eval"), in_step_reference_params(run)))
        if weight == 0:
            return {}
        return {"loss": loss, "weight": weight, **{k: float(v) * float(weight) for k, v in metrics.items()}}

    totals = sum_over_eval_batches(run.datasets["eval"], run.config.data.eval_batch_size, run.mesh, sums_of)
    weight = totals.pop("weight", 0.0)
    return {k: v / weight for k, v in totals.items()} if weight else {}


# ------------------------------------------------------------------------------------------------ the job
def jitted_steps(cfg: ml_collections.ConfigDict, setup: RunSetup, loss_fn, ref_graphdefs: tuple,
                 score_window: int | None) -> tuple[Any, Any]:
    """(train step, eval step) of preference training, jitted as the trainer runs them: the train step donates
    the state and keeps its shardings, metrics come back replicated. `setup` is a `RunSetup` (or `rpo-plan`'s
    abstract one); `ref_graphdefs` are the in-step references' `(graphdef, rest)`, empty with cached ones."""
    chunk = cfg.model.vocab_chunk_size or None
    step_fn = make_train_step(setup.graphdef, setup.rest, loss_fn, setup.tx, compute_dtype=setup.dtype,
                              micro_batches=cfg.data.micro_batches, vocab_chunk_size=chunk,
                              ref_graphdefs=ref_graphdefs, lr_schedule=setup.schedule, score_window=score_window,
                              skip_nonfinite=cfg.train.on_nonfinite == "skip_step")
    train_step = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(setup.state_shardings, replicated(setup.mesh)))
    eval_step = jax.jit(make_eval_step(setup.graphdef, setup.rest, loss_fn, compute_dtype=setup.dtype,
                                       vocab_chunk_size=chunk, ref_graphdefs=ref_graphdefs, score_window=score_window),
                        out_shardings=replicated(setup.mesh))
    return train_step, eval_step


def restore_position(run: PreferenceRun, iterator, data_state, step: int) -> None:
    """Put the data iterator back at `step` of a resumed run. Iterated training (`train.iterations > 1`) resumed
    inside an iteration after the first is refused: its primary reference is the policy of the iteration's
    first step, which the checkpoint does not hold (a resume there would train against the initial policy).
    At an iteration boundary the reference is reset from the restored policy as in an uninterrupted run."""
    steps = run.config.train.steps
    if run.config.train.iterations > 1 and run.references and step > steps and step % steps:
        boundary = step - step % steps
        raise ResumeError(f"{run.workdir}: the checkpoint restored is at step {step}, inside iteration "
                          f"{step // steps + 1} of train.iterations={run.config.train.iterations}; its reference (the "
                          f"policy at step {boundary}) is not in the checkpoint, so the run cannot continue exactly. "
                          f"Remove the checkpoints after step {boundary} to resume from there (if it is kept), or "
                          "use another --workdir")
    iterator.set_state(data_state)


def preference_task(run: PreferenceRun) -> Task:
    """The run skeleton's task: one unit is one optimizer step on the next batch of the resumable iterator."""
    cfg = run.config
    per_process = local_batch_size(cfg.data.batch_size, run.mesh)
    iterator = make_train_iterator(run.datasets["train"], per_process, seed=cfg.seed, shuffle=cfg.data.shuffle)
    ref_graphdefs = tuple((r.graphdef, r.rest) for r in run.references) if run.in_step_refs else ()
    train_step, eval_step = jitted_steps(cfg, run, run.loss_fn, ref_graphdefs, run.score_window)
    if run.score_window:
        log.info("output head on %d logit positions per sequence (config.model.score_window)", run.score_window)

    def advance(state, step: int) -> Unit:
        if cfg.train.iterations > 1 and step > 0 and step % cfg.train.steps == 0 and run.references:
            reset_reference_to_policy(run, state["params"], step)
        batch = next(iterator)
        inputs = device_batch(run, batch, "train")
        # FLOPs of the whole step over all processes, from the global batch's shape (the same on every process)
        b, k, t = inputs["tokens"].shape
        flops = b * k * t * train_flops_per_token(
            run.model_config, t, num_references=len(ref_graphdefs), score_window=run.score_window)
        tokens = float(np.sum(batch["attention_mask"])) * jax.process_count()
        state, metrics = train_step(state, inputs, in_step_reference_params(run))
        return Unit(state, metrics, {"tokens": tokens}, flops)

    identity = run_identity(cfg, MODE, run.model_config, run.tokenizer,
                            objective={"loss": cfg.loss, "references": list(cfg.references),
                                       "preference_direction": run.preference_direction,
                                       "iterations": max(1, cfg.train.iterations)},
                            data={split: dataset_fingerprint(ds) for split, ds in run.datasets.items()})
    return Task(mode=MODE, run=run, identity=identity, units=cfg.train.steps * max(1, cfg.train.iterations),
                advance=advance,
                evaluate=lambda params, step: evaluate(run, params, eval_step),
                data_state=lambda step: iterator.get_state(),
                restore_data=lambda data_state, step: restore_position(run, iterator, data_state, step),
                log_every=cfg.train.log_every, eval_every=cfg.train.eval_every, label="rpo-train",
                mfu_dtype=run.dtype)


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, precompute_only: bool = False,
          devices=None) -> dict[str, Any]:
    """Run the configured preference training in `workdir`; returns the final train and eval metrics
    (`rpo_jax.train.runner.run_task`), or with `precompute_only` only the reference cache's shapes (nothing else
    is written to `workdir` then)."""
    run = build_run(cfg, workdir, devices=devices)
    fill_reference_cache(run)
    if precompute_only:
        return {"reference_cache": {k: list(v.shape) for k, v in run.ref_cache.items()}}
    return run_task(preference_task(run), workdir)
