"""Online RPO (`config.mode = "online"`): sample K responses per prompt, score them, update with any loss.

Iteration i (i = 0 … online.iterations − 1):

1. **Prompts**: `online.prompts_per_iteration` prompts P of `data.train` (positions i·P … (i+1)·P − 1 of a
   per-epoch permutation drawn from `seed`; any preference or prompt-only file, see `rpo_jax.data.read_prompts`).
2. **Samples**: K = `online.num_samples` responses per prompt from the sampler — the current policy (online), or
   the initial policy for every iteration when `online.sampler = "initial"` (offline data, same prompts and
   updates) — with the program builder's sampler (`rpo_jax.train.build.programs.sampler`: `generate`'s KV-cache
   loop), ending at EOS, a stop string or `max_new_tokens`.
3. **Rewards** r* [P, K] from the reward source: a judge function `online.reward_judge` or a Hugging Face reward
   model `online.reward_model`, on the decoded texts.
4. **Reference** (index 0 of R): `initial` (the initial policy), `previous_iterate` (the policy at the start of
   iteration i; iterative RPO / DNO) or `current` (the stop-gradient of the policy being updated:
   ℓ_ref = sg(ℓ_θ); with `rloo` this is REINFORCE leave-one-out). `config.references[1:]` add fixed references
   (MRPO) that share the policy's tokenizer.
5. **Updates**: `online.updates_per_iteration` = M optimizer steps of the configured loss on the samples, in
   mini-batches of `data.batch_size` prompts taken in turn (P / batch_size of them, cycled).

Logged per iteration (`online/…`, written at step i for iteration i − 1, whose samples come from the policy
after i − 1 iterations; `eval/…` at step i describes the policy after i iterations): `reward` (mean training
reward of the samples), `judge_reward` (the ground truth `online.eval_judge`, when it differs from the training
reward), `kl_to_initial` = mean over samples of log π_i(y) − log π_0(y) (an unbiased estimate of KL(π_i ‖ π_0)
when the samples come from π_i at temperature 1 without top-k/top-p; not logged for offline runs),
`response_length`, and the loss metrics averaged over the M updates. `config.eval.generation` (every `every`
iterations and after the last) adds judged win rates against a baseline (`eval/generation/…`,
WORKDIR/generations/step_N.jsonl; `rpo_jax.train.jobs.generation_eval`). Evaluation before the first iteration,
every `online.eval_every` iterations and after the last samples one response to each of `online.eval_prompts`
held-out prompts from the current policy and logs the same quantities (`eval/…`).

Checkpoints are taken at iteration boundaries (every `train.checkpoint_every` iterations, at the end, and when
SIGTERM arrived during the iteration). Resuming restores the policy, optimizer state and iteration; prompts
and samples are functions of (seed, iteration, policy), so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rpo_jax.data import PromptRecord, read_prompts
from rpo_jax.data.online_batches import encode_prompts, left_pad, prompt_for_reward, prompt_order, sample_batch
from rpo_jax.data.packing import Packing
from rpo_jax.models import RewardFn, judge_fn, load_reward_model, reward_model_fn, truncate_at_stop_strings
from rpo_jax.train.build.data import data_paths, import_object, load_tokenizer, tokenizer_path
from rpo_jax.train.build.fingerprints import token_lists_fingerprint
from rpo_jax.train.build.fit import check_programs_fit, fitting_run, local_devices, log_fit
from rpo_jax.train.build.model import adapters_off_graphdef, eos_ids_of, load_model, load_policy, split_trainable
from rpo_jax.train.build.programs import (
    ReferenceLayout,
    Weights,
    online_layout,
    online_score_window,
    online_update_step,
    sampler,
    scorer,
)
from rpo_jax.train.build.state import RunSetup, build_loss, build_setup, compute_dtype, lighter_setup
from rpo_jax.train.config.schema import RunConfig
from rpo_jax.train.config.validation import validate
from rpo_jax.train.config.values import ONLINE, memory_budget_bytes
from rpo_jax.train.core.identity import run_identity
from rpo_jax.train.core.runner import Task, Unit, run_task
from rpo_jax.train.runtime.global_batches import batch_multiple, config_mesh, local_rows, to_global
from rpo_jax.train.runtime.packed_rows import pack_local, packing_of
from rpo_jax.train.step.steps import WithFrozen

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- reward sources
def make_reward_fn(cfg: ml_collections.ConfigDict, *, mesh=None, dtype=jnp.float32) -> RewardFn:
    """The training reward of `config.online`: the judge `reward_judge`, else the reward model `reward_model`
    (the schema requires exactly one of them in online mode)."""
    oc = cfg.online
    if oc.reward_judge:
        return judge_fn(import_object(oc.reward_judge))
    model, _ = load_reward_model(oc.reward_model, dtype=dtype, mesh=mesh)
    tokenizer = load_tokenizer(oc.reward_model)
    return reward_model_fn(
        model, tokenizer, max_length=cfg.data.max_length, batch_size=cfg.data.eval_batch_size, truncation="left"
    )


def make_judge_fn(cfg: ml_collections.ConfigDict) -> RewardFn | None:
    """The ground-truth judge logged beside the training reward (`online.eval_judge`), or None (= the reward)."""
    spec = cfg.online.eval_judge
    if not spec or spec == cfg.online.reward_judge:
        return None
    return judge_fn(import_object(spec))


# --------------------------------------------------------------------------------------------- the run
Scorer = Callable[[Any, dict], jax.Array]  # (params, global batch) -> [P, K] response log-probs, replicated


@dataclasses.dataclass
class OnlineRun(RunSetup):
    """Everything online training builds before the first iteration (also used by tests and the ablation)."""

    loss_fn: Any
    initial_params: Any
    policy_scorer: Scorer  # response log-probs under the policy's graph
    extra_references: list[tuple[Scorer, Any]]  # (scorer, params) of config.references[1:]
    prompts: dict[str, list[PromptRecord]]
    prompt_ids: dict[str, list[list[int]]]
    reward_fn: Callable
    judge_fn: Callable | None
    eos_ids: tuple[int, ...]
    pad_id: int
    layout: ReferenceLayout  # where the references live (`rpo_jax.train.build.programs.online_layout`)
    sampler: WithFrozen  # `rpo_jax.train.build.programs.sampler`: (params, tokens, mask, key) -> GenerateOutput
    packing: Packing | None = None  # config.data.packing: updates and scoring on packed rows
    # Weights.POLICY_BASE (LoRA, lora.reference = "base"): the scorer of the base (adapters off; any adapter
    # values, the policy's are passed), the reference of online.reference = "initial"; else None
    base_scorer: Scorer | None = None

    @property
    def prompt_width(self) -> int:
        return int(self.config.data.max_prompt_length)

    @property
    def width(self) -> int:
        return self.prompt_width + int(self.config.online.max_new_tokens)


def with_current_reference(loss_fn):
    """`loss_fn` with ℓ_ref = stop_gradient(ℓ_θ) (the `current` reference); its spec needs no reference model."""

    def wrapped(x):
        return loss_fn(dataclasses.replace(x, ref_logps=jax.lax.stop_gradient(x.policy_logps)))

    wrapped.spec = dataclasses.replace(loss_fn.spec, requires_reference=False)
    return wrapped


def split_spec(cfg, split: str) -> str:
    """The data spec of `split` ("train" or "eval"): `data.train`, or `data.eval` — the demo's held-out split
    when training on the demo — ("" when there is none)."""
    if split == "train":
        return cfg.data.train
    return cfg.data.eval or (cfg.data.train if cfg.data.train in ("", "demo") else "")


def read_prompt_split(cfg, split: str, tokenizer) -> tuple[list[PromptRecord], list[list[int]]]:
    """The prompts of `split` ("train" or "eval") and their token ids (`encode_prompts`); no eval prompts when
    neither `data.eval` nor the demo gives any."""
    spec = split_spec(cfg, split)
    if split == "eval" and not spec:
        return [], []
    prompts, report = read_prompts(data_paths(spec, split), on_error=cfg.data.on_error)
    if report.num_skipped:
        log.warning("%s prompts: %s", split, report.summary())
    kept, ids, dropped = encode_prompts(
        prompts, tokenizer, max_prompt_length=cfg.data.max_prompt_length, truncation=cfg.data.truncation
    )
    if dropped:
        log.warning(
            "%s prompts: dropped %d longer than data.max_prompt_length=%d", split, dropped, cfg.data.max_prompt_length
        )
    if split == "train" and not kept:
        raise ValueError(
            f"data.train={spec!r}: no prompt left (dropped {dropped} longer than "
            f"data.max_prompt_length={cfg.data.max_prompt_length})"
        )
    return kept, ids


def build_online_run(cfg: RunConfig | ml_collections.ConfigDict, *, devices=None) -> OnlineRun:
    """Prompts, policy, references, reward source, optimizer and initial state of an online run. `cfg` is
    validated first (`rpo_jax.train.config.validation.validate`; the online settings' rules are the schema's)."""
    cfg = validate(cfg)
    mesh = config_mesh(cfg.mesh, devices)
    dtype = compute_dtype(cfg.model.dtype)
    loss_fn = build_loss(cfg)
    if cfg.online.reference == "current":
        if (loss_fn.spec.num_references or 1) > 1:
            raise ValueError("config.online.reference='current' cannot be combined with several references")
        if loss_fn.spec.requires_reference:
            loss_fn = with_current_reference(loss_fn)
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    prompts, prompt_ids = {}, {}
    for split in ("train", "eval"):
        prompts[split], prompt_ids[split] = read_prompt_split(cfg, split, tokenizer)

    model, model_config = load_policy(cfg, tokenizer, mesh, dtype)
    setup = build_setup(
        cfg,
        model,
        model_config,
        mesh=mesh,
        dtype=dtype,
        tokenizer=tokenizer,
        total_steps=cfg.online.iterations * cfg.online.updates_per_iteration,
    )

    layout = online_layout(cfg, loss_fn.spec.requires_reference)
    window = online_score_window(cfg)
    extra = []
    if layout.count:
        for spec in cfg.references[1:]:  # sharing the policy's tokenizer (the schema's rule)
            graphdef, params, rest = split_trainable(load_model(spec.path, cfg, mesh, dtype)[0])
            extra.append((scorer(cfg, setup, graphdef, rest, window), params))
        loss_fn.spec.check_reference_count(
            1 + len(extra), given="online mode (online.reference + config.references[1:])"
        )
    base_scorer = None
    if layout.count and layout.primary is Weights.POLICY_BASE:
        base = adapters_off_graphdef(setup.graphdef, setup.state["params"], setup.rest)
        base_scorer = scorer(cfg, setup, base, setup.rest, window)
    eos_ids, pad_id = eos_ids_of(tokenizer, model_config), int(tokenizer.pad_token_id)
    return OnlineRun(
        **vars(setup),
        loss_fn=loss_fn,
        initial_params=jax.tree.map(jnp.copy, setup.state["params"]),
        policy_scorer=scorer(cfg, setup, setup.graphdef, setup.rest, window),
        extra_references=extra,
        prompts=prompts,
        prompt_ids=prompt_ids,
        reward_fn=make_reward_fn(cfg, mesh=mesh, dtype=dtype),
        judge_fn=make_judge_fn(cfg),
        eos_ids=eos_ids,
        pad_id=pad_id,
        layout=layout,
        sampler=sampler(cfg, setup, eos_ids, pad_id),
        base_scorer=base_scorer,
        packing=packing_of(
            cfg,
            mesh,
            row_length=int(cfg.data.max_prompt_length) + int(cfg.online.max_new_tokens),
            model_config=setup.model_config,
            score_window=online_score_window(cfg),
        ),
    )


# --------------------------------------------------------------------------------------------- pieces
def global_batch(run: OnlineRun, batch: dict[str, np.ndarray], *, micro_batches: int = 1) -> dict[str, jax.Array]:
    """A batch every process holds whole ([P, ...] rows) → global arrays, each process feeding its share (a
    training batch — it has a loss_mask — packed with `config.data.packing`: the updates and the log-probs of
    the samples are computed on packed rows; `micro_batches`: the update step's, which splits the batch)."""
    local = local_rows(batch, run.mesh)  # the divisibility check with a clear error first
    if "loss_mask" in local:
        local = pack_local(local, run.packing, run.mesh, micro_batches=micro_batches)
    return to_global(local, run.mesh)


def sample(
    run: OnlineRun, params, prompt_ids: Sequence[Sequence[int]], num_samples: int, key: jax.Array
) -> tuple[np.ndarray, np.ndarray]:
    """K samples for each prompt from the policy with `params` (`run.sampler`, then `online.stop_strings` on the
    host): `(tokens, mask)` [P, K, max_new_tokens]."""
    flat = [p for p in prompt_ids for _ in range(num_samples)]
    tokens, mask = left_pad(flat, run.prompt_width, run.pad_id)
    inputs = global_batch(run, {"tokens": tokens, "mask": mask})
    out = run.sampler(params, inputs["tokens"], inputs["mask"], key)
    if list(run.config.online.stop_strings):
        out = truncate_at_stop_strings(
            out, run.tokenizer, tuple(run.config.online.stop_strings), pad_token_id=run.pad_id
        )
    gen_tokens, gen_mask = jax.device_get((out.tokens, out.mask))
    m = gen_tokens.shape[-1]
    return (
        np.asarray(gen_tokens).reshape(len(prompt_ids), num_samples, m),
        np.asarray(gen_mask).reshape(len(prompt_ids), num_samples, m),
    )


def decode_responses(run: OnlineRun, tokens: np.ndarray, mask: np.ndarray) -> list[list[str]]:
    """[P, K, M] generated tokens → response texts (special tokens such as EOS removed)."""
    return [
        [
            run.tokenizer.decode(tokens[p, k][mask[p, k]].tolist(), skip_special_tokens=True)
            for k in range(tokens.shape[1])
        ]
        for p in range(tokens.shape[0])
    ]


def sample_logps(scorer: Scorer, params, batch: dict[str, jax.Array]) -> np.ndarray:
    """Σ log-probs of every sample's response under a model: `scorer` is `run.policy_scorer` (the policy's graph,
    with `params` the policy's at some point) or the scorer of an extra reference. Returns [P, K] float32 (0 on
    invalid slots)."""
    return np.asarray(jax.device_get(scorer(params, batch)))


def score(run: OnlineRun, prompts: Sequence[PromptRecord], texts: list[list[str]], fn: Callable) -> np.ndarray:
    """Rewards [P, K] of the texts from a RewardFn."""
    rewards = np.asarray(fn([prompt_for_reward(p) for p in prompts], texts), np.float32)
    if rewards.shape != (len(texts), len(texts[0])) or not np.all(np.isfinite(rewards)):
        raise ValueError(
            f"the reward function returned {rewards.shape} (finite: {np.all(np.isfinite(rewards))}); "
            f"expected finite [{len(texts)}, {len(texts[0])}]"
        )
    return rewards


def _kl_estimate(policy: np.ndarray, initial: np.ndarray, valid: np.ndarray) -> float:
    return float(np.sum((policy - initial) * valid) / max(np.sum(valid), 1))


def collect(
    run: OnlineRun,
    params,
    prompt_index: np.ndarray,
    split: str,
    num_samples: int,
    key: jax.Array,
    *,
    sampler_params=None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Sample, decode, score: (batch with rewards [P, K], statistics). `sampler_params` defaults to `params`."""
    prompts = [run.prompts[split][i] for i in prompt_index]
    ids = [run.prompt_ids[split][i] for i in prompt_index]
    tokens, mask = sample(run, params if sampler_params is None else sampler_params, ids, num_samples, key)
    texts = decode_responses(run, tokens, mask)
    rewards = score(run, prompts, texts, run.reward_fn)
    batch = sample_batch(ids, tokens, mask, rewards, width=run.width, pad_id=run.pad_id)
    stats = {"reward": float(rewards.mean()), "response_length": float(batch["lengths"].mean())}
    if run.judge_fn is not None:
        stats["judge_reward"] = float(score(run, prompts, texts, run.judge_fn).mean())
    return batch, stats


def eval_prompt_count(run: OnlineRun) -> int:
    """The held-out prompts `evaluate_online` samples: `online.eval_prompts` (at most the split's), rounded down to
    a multiple of the data×fsdp shards (`batch_multiple`; 0: no evaluation)."""
    n = min(int(run.config.online.eval_prompts), len(run.prompts["eval"]))
    shards = batch_multiple(run.mesh)
    return int(n - n % shards)


def evaluate_online(run: OnlineRun, params, iteration: int) -> dict[str, float]:
    """Judge reward, training reward, KL to the initial policy and length of one sample per held-out prompt."""
    n = eval_prompt_count(run)
    if n == 0:
        return {}
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(run.config.seed), 1), iteration)
    batch, stats = collect(run, params, np.arange(n), "eval", 1, key)
    device_batch = global_batch(run, batch)
    kl = _kl_estimate(
        sample_logps(run.policy_scorer, params, device_batch),
        sample_logps(run.policy_scorer, run.initial_params, device_batch),
        batch["valid"],
    )
    if "judge_reward" not in stats:
        stats["judge_reward"] = stats["reward"]
    return {**stats, "kl_to_initial": kl}


def iteration_key(run: OnlineRun, iteration: int) -> jax.Array:
    """The sampling key of `iteration` (a function of `config.seed` and the iteration alone: resumable)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(run.config.seed), 0), iteration)


def iteration_batch(run: OnlineRun, params, iteration: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The samples of `iteration` with rewards and reference log-probs, and their statistics."""
    oc = run.config.online
    index = prompt_order(len(run.prompts["train"]), iteration, oc.prompts_per_iteration, run.config.seed)
    sampler = run.initial_params if oc.sampler == "initial" else params
    batch, stats = collect(
        run, params, index, "train", oc.num_samples, iteration_key(run, iteration), sampler_params=sampler
    )
    device_batch = global_batch(run, batch)
    start = sample_logps(run.policy_scorer, params, device_batch)
    initial = sample_logps(run.policy_scorer, run.initial_params, device_batch)
    if oc.sampler == "policy":
        stats["kl_to_initial"] = _kl_estimate(start, initial, batch["valid"])
    if run.layout.count:
        primary = {
            Weights.OWN: lambda: initial,
            Weights.POLICY: lambda: start,  # previous_iterate
            Weights.POLICY_BASE: lambda: sample_logps(run.base_scorer, params, device_batch),  # adapters off
        }[run.layout.primary]()
        columns = [primary]
        columns += [sample_logps(scorer, params_r, device_batch) for scorer, params_r in run.extra_references]
        ref = np.stack(columns, -1) if len(columns) > 1 else columns[0]
        batch["ref_logps"] = ref.astype(np.float32)
    return batch, stats


def minibatches(batch: dict[str, np.ndarray], size: int, count: int):
    """`count` mini-batches of `size` prompts, taken in turn from the batch (cycling)."""
    n = next(iter(batch.values())).shape[0]
    for m in range(count):
        start = (m * size) % n
        yield {k: v[start : start + size] for k, v in batch.items()}


# --------------------------------------------------------------------------------------------- train
def largest_samples(run: OnlineRun, prompts: int) -> dict[str, np.ndarray]:
    """`prompts` × K samples as long as an iteration can make them (prompts of data.max_prompt_length tokens,
    responses of online.max_new_tokens), with rewards and zero reference log-probs: the largest update batch."""
    k, width, start = int(run.config.online.num_samples), run.width, run.prompt_width
    loss_mask = np.zeros((prompts, k, width), bool)
    loss_mask[..., start:] = True
    batch = {
        "tokens": np.full((prompts, k, width), run.pad_id, np.int32),
        "attention_mask": np.ones((prompts, k, width), bool),
        "loss_mask": loss_mask,
        "lengths": np.full((prompts, k), width - start, np.int32),
        "valid": np.ones((prompts, k), bool),
        "rewards": np.zeros((prompts, k), np.float32),
    }
    if run.layout.count:
        batch["ref_logps"] = np.zeros((prompts, k, run.layout.count) if run.layout.count > 1 else (prompts, k))
        batch["ref_logps"] = batch["ref_logps"].astype(np.float32)
    return batch


def check_memory(run: OnlineRun, update_step) -> None:
    """The fit check before the first iteration (`rpo_jax.train.build.fit`): the sampler on an iteration's
    prompts (and on the evaluation's, `evaluate_online`, when they are more rows) and the update step on its
    largest mini-batch, compiled, against `config.train.memory_budget`."""
    cfg, oc = run.config, run.config.online
    update = global_batch(run, largest_samples(run, cfg.data.batch_size), micro_batches=int(cfg.data.micro_batches))
    programs = [("update step", update_step, (run.state, update), 0)]
    rows = {"sampler": int(oc.prompts_per_iteration) * int(oc.num_samples), "eval sampler": eval_prompt_count(run)}
    for name, n in rows.items():
        if n and (name == "sampler" or n > rows["sampler"]):
            tokens, mask = left_pad([[run.pad_id] * run.prompt_width] * n, run.prompt_width, run.pad_id)
            inputs = global_batch(run, {"tokens": tokens, "mask": mask})
            args = (run.state["params"], inputs["tokens"], inputs["mask"], iteration_key(run, 0))
            programs.append((name, run.sampler, args, 0))
    log_fit(log, *check_programs_fit(programs, cfg, local_devices(run.mesh)))


def fitting_online_run(run: OnlineRun) -> tuple[OnlineRun, WithFrozen]:
    """`(run, update step)` that pass the fit check (`check_memory`): the configured ones, else the first rung of
    `rpo_jax.train.build.fit.lighter_settings` that fits (`fitting_run`: logged), else `DoesNotFit`. With
    `train.memory_budget` off, the configured ones unchecked."""
    steps = (run, online_update_step(run.config, run, run.loss_fn))
    if memory_budget_bytes(run.config.train.memory_budget, 1) is None:
        return steps

    def lighten(settings):
        lighter = lighter_online_run(run, settings)
        return lighter, online_update_step(lighter.config, lighter, lighter.loss_fn)

    shards = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
    return fitting_run(steps, lambda candidate: check_memory(*candidate), lighten, run.config, shards)


def lighter_online_run(run: OnlineRun, settings: dict[str, Any]) -> OnlineRun:
    """`run` with result-preserving `settings` (`rpo_jax.train.build.fit.lighter_settings`): `lighter_setup`, and
    the programs built from the policy's graphdef again — the sampler, the policy's scorer and, with LoRA, the
    base's. The other references' scorers keep their settings (forward passes outside the fit check)."""
    lighter = lighter_setup(run, settings)
    cfg, window = lighter.config, online_score_window(lighter.config)
    base_scorer = None
    if run.base_scorer is not None:
        base = adapters_off_graphdef(lighter.graphdef, lighter.state["params"], lighter.rest)
        base_scorer = scorer(cfg, lighter, base, lighter.rest, window)
    return dataclasses.replace(
        lighter,
        policy_scorer=scorer(cfg, lighter, lighter.graphdef, lighter.rest, window),
        sampler=sampler(cfg, lighter, run.eos_ids, run.pad_id),
        base_scorer=base_scorer,
    )


def generation_eval(run: OnlineRun, workdir):
    """`config.eval.generation` of an online run (`rpo_jax.train.jobs.generation_eval.TrainingEval`; None when
    `every` = 0): its prompts are `eval.generation.prompts`, else the held-out split's (preference records when
    the baseline is the data's chosen response), π_ref of its KL the initial policy."""
    from rpo_jax.train.jobs.generation_eval import read_eval_records, training_eval

    cfg = run.config
    if not cfg.eval.generation.every:
        return None
    held_out = None
    if cfg.eval.generation.baseline == "chosen" and split_spec(cfg, "eval"):
        records = read_eval_records(split_spec(cfg, "eval"), want_chosen=True, on_error=cfg.data.on_error)
        held_out = records, "the held-out split"
    elif run.prompts["eval"]:
        held_out = run.prompts["eval"], "the held-out split"
    return training_eval(run, workdir, run.eos_ids, run.initial_params, held_out)


def online_task(run: OnlineRun, generation_eval=None, update_step: WithFrozen | None = None) -> Task:
    """The run skeleton's task: one unit is one iteration (sample, score, `updates_per_iteration` updates);
    checkpoints record the iteration, and a resumed run recomputes everything else from (seed, iteration,
    policy). `generation_eval` (a `rpo_jax.train.jobs.generation_eval.TrainingEval`) runs every
    `config.eval.generation.every` iterations and after the last. `update_step`: the run's, when the fit check
    (`fitting_online_run`) built it already; else built here."""
    step_fn = update_step or online_update_step(run.config, run, run.loss_fn)
    cfg, oc = run.config, run.config.online
    updates = int(oc.updates_per_iteration)

    def advance(state, iteration: int) -> Unit:
        t0 = time.perf_counter()
        batch, stats = iteration_batch(run, state["params"], iteration)
        t1 = time.perf_counter()
        sums: dict[str, float] = {}
        for mb in minibatches(batch, cfg.data.batch_size, updates):
            state, metrics = step_fn(state, global_batch(run, mb, micro_batches=int(cfg.data.micro_batches)))
            for k, v in jax.device_get(metrics).items():
                sums[k] = sums.get(k, 0.0) + float(v) / updates
        return Unit(
            state, {**stats, **sums, "perf/sample_time_s": t1 - t0, "perf/update_time_s": time.perf_counter() - t1}
        )

    def restore_data(data_state, iteration: int) -> None:
        if int(data_state["iteration"]) != iteration:
            raise ValueError(
                f"checkpoint at optimizer step {iteration * updates} records iteration "
                f"{data_state['iteration']}, not {iteration}: online.updates_per_iteration changed?"
            )

    not_identity = ("iterations", "eval_prompts", "eval_every", "eval_judge")
    identity = run_identity(
        cfg,
        ONLINE,
        run.model_config,
        run.tokenizer,
        objective={
            "loss": cfg.loss,
            "references": list(cfg.references),
            "online": {k: v for k, v in dict(oc).items() if k not in not_identity},
        },
        data={split: token_lists_fingerprint(ids) for split, ids in run.prompt_ids.items()},
    )
    return Task(
        mode=ONLINE,
        run=run,
        identity=identity,
        units=int(oc.iterations),
        advance=advance,
        evaluate=lambda params, iteration: evaluate_online(run, params, iteration),
        data_state=lambda iteration: {"iteration": iteration},
        restore_data=restore_data,
        steps_per_unit=updates,
        unit_name="iteration",
        metrics_prefix="online",
        eval_every=oc.eval_every,
        eval_at_start=True,
        label="rpo-train online",
        progress_metric="reward",
        side_eval=generation_eval,
        side_eval_every=int(cfg.eval.generation.every) if generation_eval is not None else 0,
        side_eval_done=generation_eval.done if generation_eval is not None else lambda: None,
    )


def train_online(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, devices=None) -> dict[str, Any]:
    """Online RPO (`config.mode = "online"`): sample, score and update for `config.online.iterations` iterations.

    Args:
        cfg: the run configuration (a recipe's ConfigDict or a `RunConfig`; validated here).
        workdir: the run directory (a local path or a `gs://` URL): resumed when it holds this run's checkpoints.
        devices: the devices of the mesh (default: every device).

    Returns:
        `{"online": the last iteration's metrics, "eval": the final evaluation, "iteration": iterations done,
        "export": the export directory}`.
    """
    run = build_online_run(cfg, devices=devices)
    run, update_step = fitting_online_run(run)  # the evaluation's sampler is built from the run that fits
    return run_task(online_task(run, generation_eval(run, workdir), update_step), workdir)
