"""The one program builder: which programs a run compiles, with their arguments, shardings and donation.

Every decision about a run's compiled programs is taken here, once, and read by the trainers
(`rpo_jax.train.jobs.preference`, `online`, `reward_model`), `rpo-plan` (`rpo_jax.train.build.plans.build_programs`:
the same programs with abstract arguments) and the benchmarks:

- where the references live and when they are scored (`reference_layout` for preference training,
  `online_layout` for online RPO → `ReferenceLayout`):

  - scoring: `Scoring.CACHED` — log-probs `[N, K, R]` computed outside the step by one scorer per reference (once
    before step 1; online: once per iteration, between sampling and the updates), then a batch input;
    `Scoring.IN_STEP` — scored inside every train / eval step; `Scoring.NONE` — no reference (a reference-free
    loss, online `current`);
  - the primary reference's weights: `Weights.OWN` — a frozen copy (or another checkpoint), held beside the train
    state; `Weights.TRAIN_STATE` — in the train state as `"reference"` (checkpointed, donated), moving with
    `config.reference_sync` (TR-DPO) or reset per iteration (`train.iterations > 1`); `Weights.POLICY_BASE` — the
    policy's own weights with its LoRA adapters switched off (nothing copied); `Weights.POLICY` — the policy's
    parameters at an online iteration's start (`previous_iterate`).

- the programs: the train step (`jitted_train_step`: the state donated, its shardings kept, metrics replicated)
  and eval step of each mode (`jitted_steps`, `online_update_step`, `reward_steps`), the scorers (`scorer`), the
  online sampler (`sampler`: the KV-cache generation loop), the frozen rest (with LoRA the base) an argument of
  every program, never a constant baked into it.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rpo_jax.models.generate import kv_cache_generate
from rpo_jax.train.build.data import tokenizer_path
from rpo_jax.train.build.lora import lora_enabled, lora_reference_is_base
from rpo_jax.train.build.state import RunSetup
from rpo_jax.train.config.validation import validate
from rpo_jax.train.config.values import vocab_chunk_argument
from rpo_jax.train.runtime.global_batches import replicated
from rpo_jax.train.step.logprobs import cast_floating, resolve_score_window
from rpo_jax.train.step.reward_steps import make_reward_eval_step, make_reward_train_step
from rpo_jax.train.step.steps import ReferenceSync, WithFrozen, make_eval_step, make_scorer, make_train_step
from rpo_jax.train.step.unpaired_steps import make_unpaired_eval_step, make_unpaired_train_step, state_dict


class Scoring(enum.Enum):
    """When the references are scored."""

    NONE = "none"  # a reference-free loss: no reference
    CACHED = "cached"  # once, before step 1 (scorers); the step reads `ref_logps` from its batch
    IN_STEP = "in_step"  # inside every train and eval step


class Weights(enum.Enum):
    """Where the primary reference's parameters live."""

    OWN = "own"  # its own frozen parameters (a copy of the initial policy, or a checkpoint)
    TRAIN_STATE = "train_state"  # the train state's "reference": moves (TR-DPO) or is reset per iteration
    POLICY_BASE = "policy_base"  # the policy's weights with the LoRA adapters off: no parameters of its own
    POLICY = "policy"  # online `previous_iterate`: the policy's own parameters at the iteration's start


class ReferenceLayout(NamedTuple):
    """Where a run's R references live and when they are scored (`reference_layout`); index 0 is the primary."""

    scoring: Scoring
    primary: Weights
    count: int  # R (0 with Scoring.NONE)
    sync: ReferenceSync | None = None  # the primary's movement with Weights.TRAIN_STATE (every = 0: reset only)

    @property
    def in_step(self) -> bool:
        return self.scoring is Scoring.IN_STEP

    @property
    def in_state(self) -> bool:
        return self.primary is Weights.TRAIN_STATE


def reference_sync_of(cfg) -> ReferenceSync | None:
    """`config.reference_sync` as a `ReferenceSync`, or None when it is off (`every = 0`). Its values and what it
    cannot run with (a loss without a reference, `reference_mode="cache"`, LoRA with `mix < 1`, another mode) are
    the schema's rules (`rpo_jax.train.config.schema`), checked by `validate`."""
    sync = validate(cfg).reference_sync
    return ReferenceSync(every=sync.every, mix=float(sync.mix)) if sync.every else None


def reference_layout(cfg, requires_reference: bool, sync: ReferenceSync | None) -> ReferenceLayout:
    """The one decision of where a preference run's references live (`ReferenceLayout`).

    Scoring: none for a reference-free loss; in the step with `reference_mode="in_step"`, or with "auto" when the
    reference moves (`sync`: `config.reference_sync.every > 0`, whose cached log-probs would go stale); else
    cached; in the step, every reference shares the policy's tokenizer (the step scores the policy's token ids),
    else a ValueError. The primary's weights: in the train state when they move, or when iterated training
    (`train.iterations > 1`) scores in the step (so a checkpoint holds the reference of the moment); else the
    policy's base with adapters off for LoRA with `lora.reference="base"`; else its own."""
    cfg = validate(cfg)  # reference_mode is one of the schema's values
    if not requires_reference:
        return ReferenceLayout(Scoring.NONE, Weights.OWN, 0)
    count = max(1, len(cfg.references))
    in_step = cfg.reference_mode == "in_step" or (sync is not None and cfg.reference_mode == "auto")
    if in_step and any(r.path and (r.tokenizer or r.path) != tokenizer_path(cfg) for r in cfg.references):
        raise ValueError(
            "reference_mode='in_step' needs references that share the policy's tokenizer; "
            "use 'cache' for references with their own tokenizer"
            + (" (config.reference_sync needs in-step references)" if sync is not None else "")
        )
    scoring = Scoring.IN_STEP if in_step else Scoring.CACHED
    if sync is not None or (in_step and cfg.train.iterations > 1):
        return ReferenceLayout(scoring, Weights.TRAIN_STATE, count, sync or ReferenceSync())
    own_base = lora_reference_is_base(cfg) and not (cfg.references and dict(cfg.references[0]).get("path"))
    return ReferenceLayout(scoring, Weights.POLICY_BASE if own_base else Weights.OWN, count)


def state_with_reference(state: dict, shardings: dict, reference: Any) -> tuple[dict, dict]:
    """The train state (and its shardings) with the primary reference's parameters as `"reference"`
    (`Weights.TRAIN_STATE`), kept in `reference`'s shardings."""
    return (
        {**state, "reference": reference},
        {**shardings, "reference": jax.tree.map(lambda x: x.sharding, reference)},
    )


def batch_responses(spec, responses: int) -> int:
    """K of a preference run's batches: for an unpaired loss 2 (own and mismatched completion, `kto`) or 1, else
    `responses` (the data's)."""
    if spec.unpaired:
        return 2 if spec.requires_kl_logps else 1
    return responses


def state_with_loss_state(state: dict, shardings: dict, loss_fn, mesh, *, abstract: bool = False) -> tuple[dict, dict]:
    """The train state (and its shardings) with a stateful loss's initial state as `"loss_state"` (`bco`: its
    `BCOState` fields, float32 scalars replicated on `mesh`; `abstract`: ShapeDtypeStructs, for `rpo-plan`);
    unchanged for a stateless loss."""
    if not loss_fn.spec.stateful:
        return state, shardings
    sharding = replicated(mesh)
    initial = state_dict(loss_fn.init_state())
    if abstract:
        loss_state = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding) for k in initial}
    else:
        loss_state = {k: jax.device_put(v, sharding) for k, v in initial.items()}
    return {**state, "loss_state": loss_state}, {**shardings, "loss_state": {k: sharding for k in initial}}


def jitted_steps(
    cfg,
    setup: RunSetup,
    loss_fn,
    ref_graphdefs: tuple,
    score_window: int | None,
    reference_sync: ReferenceSync | None = None,
) -> tuple[WithFrozen, WithFrozen]:
    """(train step, eval step) of preference training, jitted as the trainer runs them: the train step donates
    the state and keeps its shardings, metrics come back replicated. `setup` is a `RunSetup` (or `rpo-plan`'s
    abstract one); `ref_graphdefs` are the in-step references' `(graphdef, rest)`, empty with cached ones;
    `reference_sync`: the primary reference is the state's `"reference"` (`ReferenceLayout.sync`).

    The loss decides the step: an unpaired loss's (`rpo_jax.train.step.unpaired_steps`: one labelled completion
    per row, `state["loss_state"]` for a stateful loss), or the preference step, with each sequence's prompt +
    response log-probs for `orpo`'s NLL (`spec.requires_sequence_logps`: every position, no score window)."""
    chunk = vocab_chunk_argument(cfg.model.vocab_chunk_size)
    make_train, make_eval, extra = make_train_step, make_eval_step, {}
    if loss_fn.spec.unpaired:
        make_train, make_eval = make_unpaired_train_step, make_unpaired_eval_step
    elif loss_fn.spec.requires_sequence_logps:
        extra, score_window = {"sequence_nll": True}, None
    step_fn = make_train(
        setup.graphdef,
        setup.rest,
        loss_fn,
        setup.tx,
        compute_dtype=setup.dtype,
        micro_batches=cfg.data.micro_batches,
        vocab_chunk_size=chunk,
        ref_graphdefs=ref_graphdefs,
        lr_schedule=setup.schedule,
        score_window=score_window,
        skip_nonfinite=cfg.train.on_nonfinite == "skip_step",
        reference_sync=reference_sync,
        **extra,
    )
    eval_fn = make_eval(
        setup.graphdef,
        setup.rest,
        loss_fn,
        compute_dtype=setup.dtype,
        vocab_chunk_size=chunk,
        ref_graphdefs=ref_graphdefs,
        score_window=score_window,
        **extra,
    )
    return jitted_train_step(setup, step_fn), jitted_eval_step(setup, eval_fn)


def jitted_train_step(setup: RunSetup, step_fn) -> WithFrozen:
    """`step_fn(state, batch, ..., frozen) -> (state, metrics)` as every mode's trainer runs it: the state donated
    and kept in its shardings, the metrics replicated, the frozen rest (with LoRA: the base) an argument of the
    program, never a constant baked into it."""
    return WithFrozen(
        jax.jit(step_fn, donate_argnums=(0,), out_shardings=(setup.state_shardings, replicated(setup.mesh))), setup.rest
    )


def jitted_eval_step(setup: RunSetup, eval_fn) -> WithFrozen:
    """`eval_fn(params, batch, ..., frozen) -> sums` jitted: nothing donated, the sums replicated."""
    return WithFrozen(jax.jit(eval_fn, out_shardings=replicated(setup.mesh)), setup.rest)


def scorer(cfg, setup: RunSetup, graphdef, rest, score_window: int | None) -> WithFrozen:
    """The cache fill's program for one reference (`Scoring.CACHED`): its `[B, K]` log-probs replicated; `rest`
    None is the policy's (a reference sharing the policy's base, LoRA)."""
    return make_scorer(
        graphdef,
        setup.rest if rest is None else rest,
        setup.mesh,
        compute_dtype=setup.dtype,
        vocab_chunk_size=vocab_chunk_argument(cfg.model.vocab_chunk_size),
        score_window=score_window,
    )


# ------------------------------------------------------------------------------------------------ online
def online_score_window(cfg) -> int | None:
    """Output-head positions per sample in online mode (`config.model.score_window`; a response has at most
    `online.max_new_tokens` tokens)."""
    return resolve_score_window(cfg.model.score_window, int(cfg.online.max_new_tokens))


def online_layout(cfg, requires_reference: bool) -> ReferenceLayout:
    """Where an online run's references live (`config.online.reference` + `config.references[1:]`): scored by the
    scorers once per iteration, between sampling and the updates, and read by the update step from its batch
    (`Scoring.CACHED`). The primary: the initial policy — its own copy (`Weights.OWN`, held anyway for
    `kl_to_initial` and `online.sampler="initial"`), or with LoRA and `lora.reference="base"` the policy's base
    with adapters off; `previous_iterate` — the policy's parameters at the iteration's start (`Weights.POLICY`);
    `current` (the stop-gradient of the policy being updated) or a reference-free loss — none."""
    cfg = validate(cfg)
    if not requires_reference or cfg.online.reference == "current":
        return ReferenceLayout(Scoring.NONE, Weights.OWN, 0)
    count = 1 + len(cfg.references[1:])
    if cfg.online.reference == "previous_iterate":
        return ReferenceLayout(Scoring.CACHED, Weights.POLICY, count)
    base = lora_enabled(cfg) and cfg.model.lora.reference == "base"
    return ReferenceLayout(Scoring.CACHED, Weights.POLICY_BASE if base else Weights.OWN, count)


def online_update_step(cfg, setup: RunSetup, loss_fn) -> WithFrozen:
    """The online update (the preference train step with the references' log-probs in the batch), jitted as
    `jitted_train_step`."""
    step_fn = make_train_step(
        setup.graphdef,
        setup.rest,
        loss_fn,
        setup.tx,
        compute_dtype=setup.dtype,
        micro_batches=cfg.data.micro_batches,
        vocab_chunk_size=vocab_chunk_argument(cfg.model.vocab_chunk_size),
        lr_schedule=setup.schedule,
        score_window=online_score_window(cfg),
        skip_nonfinite=cfg.train.on_nonfinite == "skip_step",
    )
    return jitted_train_step(setup, step_fn)


def sampler(cfg, setup: RunSetup, eos_ids: tuple[int, ...], pad_id: int, sampling=None) -> WithFrozen:
    """The online sampler: `sample(params, tokens, attention_mask, key) -> GenerateOutput` (tokens, mask, logps
    [N, online.max_new_tokens], lengths [N], replicated) — the policy merged from `params` (cast to the compute
    dtype inside the program) and the frozen rest, then `kv_cache_generate` with `config.online`'s temperature,
    top-k, top-p and `max_new_tokens` (or those of `sampling`, a section with the same keys:
    `config.eval.generation`). Stop strings are applied afterwards on the host."""
    oc = cfg.online if sampling is None else sampling
    graphdef, dtype = setup.graphdef, setup.dtype
    settings = {
        "max_new_tokens": int(oc.max_new_tokens),
        "temperature": float(oc.temperature),
        "top_k": int(oc.top_k) or None,
        "top_p": float(oc.top_p) if oc.top_p < 1 else None,
        "eos_ids": tuple(int(i) for i in eos_ids),
        "pad_id": int(pad_id),
    }

    def sample(params, tokens, attention_mask, key, frozen):
        model = nnx.merge(graphdef, cast_floating(params, dtype), frozen)
        return kv_cache_generate(model, tokens, attention_mask, key, **settings)

    return WithFrozen(jax.jit(sample, out_shardings=replicated(setup.mesh)), setup.rest)


# ------------------------------------------------------------------------------------------------ reward models
def reward_steps(cfg, setup: RunSetup) -> tuple[WithFrozen, WithFrozen]:
    """(train step, eval step) of reward-model training (`rpo_jax.train.step.reward_steps`) on `setup`'s
    `RewardModel`, jitted as `jitted_train_step` / `jitted_eval_step`."""
    rm = cfg.reward_model
    step_fn = make_reward_train_step(
        setup.graphdef,
        setup.rest,
        setup.tx,
        compute_dtype=setup.dtype,
        label=rm.label,
        center_coefficient=rm.center_coefficient,
        micro_batches=cfg.data.micro_batches,
        lr_schedule=setup.schedule,
        skip_nonfinite=cfg.train.on_nonfinite == "skip_step",
    )
    eval_fn = make_reward_eval_step(
        setup.graphdef, setup.rest, compute_dtype=setup.dtype, label=rm.label, center_coefficient=rm.center_coefficient
    )
    return jitted_train_step(setup, step_fn), jitted_eval_step(setup, eval_fn)
