"""The one program builder: which programs a run compiles, with their arguments, shardings and donation.

Every decision about a preference run's compiled programs is taken here, once, and read by the trainer
(`rpo_jax.train.jobs.preference`), `rpo-plan` (`build_programs`, abstract arguments) and the benchmarks:

- where the references live and when they are scored (`reference_layout` → `ReferenceLayout`):

  - scoring: `Scoring.CACHED` — log-probs `[N, K, R]` computed once before step 1 by one scorer per
    reference, then a batch input; `Scoring.IN_STEP` — scored inside every train / eval step; `Scoring.NONE` — a
    reference-free loss;
  - the primary reference's weights: `Weights.OWN` — a frozen copy (or another checkpoint), held beside the train
    state; `Weights.TRAIN_STATE` — in the train state as `"reference"` (checkpointed, donated), moving with
    `config.reference_sync` (TR-DPO) or reset per iteration (`train.iterations > 1`); `Weights.POLICY_BASE` — the
    policy's own weights with its LoRA adapters switched off (nothing copied).

- the train step (`jitted_steps`: the state donated, its shardings kept, metrics replicated), the eval step,
  the cache-fill scorers (`make_scorer`), the frozen rest (with LoRA the base) as an argument of every program,
  never a constant baked into it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rpo_jax.models.sharding import batch_sharding, make_mesh
from rpo_jax.train.build.data import tokenizer_path
from rpo_jax.train.build.lora import lora_enabled, lora_reference_is_base
from rpo_jax.train.build.model import abstract_params, adapters_off_graphdef, architecture_of
from rpo_jax.train.build.state import RunSetup, abstract_setup, build_loss, compute_dtype
from rpo_jax.train.config.validation import validate
from rpo_jax.train.runtime.global_batches import replicated
from rpo_jax.train.step.logprobs import resolve_score_window
from rpo_jax.train.step.steps import ReferenceSync, WithFrozen, make_eval_step, make_scorer, make_train_step


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
    cached. The primary's weights: in the train state when they move, or when iterated training
    (`train.iterations > 1`) scores in the step (so a checkpoint holds the reference of the moment); else the
    policy's base with adapters off for LoRA with `lora.reference="base"`; else its own."""
    cfg = validate(cfg)  # reference_mode is one of the schema's values
    if not requires_reference:
        return ReferenceLayout(Scoring.NONE, Weights.OWN, 0)
    count = max(1, len(cfg.references))
    in_step = cfg.reference_mode == "in_step" or (sync is not None and cfg.reference_mode == "auto")
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
    `reference_sync`: the primary reference is the state's `"reference"` (`ReferenceLayout.sync`)."""
    chunk = cfg.model.vocab_chunk_size or None
    step_fn = make_train_step(
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
    )
    # the frozen rest (with LoRA: the base) is an argument of both programs, never a constant baked into them
    train_step = WithFrozen(
        jax.jit(step_fn, donate_argnums=(0,), out_shardings=(setup.state_shardings, replicated(setup.mesh))), setup.rest
    )
    eval_step = WithFrozen(
        jax.jit(
            make_eval_step(
                setup.graphdef,
                setup.rest,
                loss_fn,
                compute_dtype=setup.dtype,
                vocab_chunk_size=chunk,
                ref_graphdefs=ref_graphdefs,
                score_window=score_window,
            ),
            out_shardings=replicated(setup.mesh),
        ),
        setup.rest,
    )
    return train_step, eval_step


def scorer(cfg, setup: RunSetup, graphdef, rest, score_window: int | None) -> WithFrozen:
    """The cache fill's program for one reference (`Scoring.CACHED`): its `[B, K]` log-probs replicated; `rest`
    None is the policy's (a reference sharing the policy's base, LoRA)."""
    return make_scorer(
        graphdef,
        setup.rest if rest is None else rest,
        setup.mesh,
        compute_dtype=setup.dtype,
        vocab_chunk_size=cfg.model.vocab_chunk_size or None,
        score_window=score_window,
    )


# ------------------------------------------------------------------------------------------------ programs
def device_bytes(tree: Any) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs with shardings)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract_batch(batch_size: int, responses: int, length: int, mesh, *, rewards: bool, ref_shape=None) -> dict:
    """The step's batch contract (rpo_jax.data.tokenize.collate_examples) as ShapeDtypeStructs sharded on the
    batch axis; `ref_shape` adds cached `ref_logps`."""
    b, k, t = batch_size, responses, length
    spec = {
        "tokens": ((b, k, t), jnp.int32),
        "attention_mask": ((b, k, t), jnp.bool_),
        "loss_mask": ((b, k, t), jnp.bool_),
        "lengths": ((b, k), jnp.int32),
        "valid": ((b, k), jnp.bool_),
    }
    if rewards:
        spec["rewards"] = ((b, k), jnp.float32)
    if ref_shape is not None:
        spec["ref_logps"] = (ref_shape, jnp.float32)
    return {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
        for name, (shape, dtype) in spec.items()
    }


@dataclasses.dataclass
class Program:
    name: str
    jitted: Any
    args: tuple
    resident: int = 0  # bytes per chip held by the trainer meanwhile but not an argument of this program


@dataclasses.dataclass
class Plan:
    """What `build_programs` derives from a config: the programs, their arguments' sizes, the reference layout."""

    programs: list[Program]
    model_config: Any
    state_bytes: int
    reference_bytes: int
    batch_bytes: int
    layout: ReferenceLayout
    score_window: int | None
    mesh_shape: dict
    num_devices: int
    batch_shape: tuple[int, int, int]  # (B, K, T) of the planned train batch

    @property
    def in_step(self) -> bool:
        return self.layout.in_step

    @property
    def num_references(self) -> int:
        return self.layout.count


def plan_score_window(cfg) -> int | None:
    """The score window planned: a number as configured, "auto" at its worst case (every position)."""
    setting = cfg.model.score_window
    if str(setting).strip().lower() == "auto":
        return resolve_score_window("auto", cfg.data.max_length - 1)
    return resolve_score_window(setting, 1)


def reference_models(cfg, refs: list[dict], setup: RunSetup, layout: ReferenceLayout) -> list[tuple[Any, Any, Any]]:
    """(graphdef, rest, abstract parameters) of each reference, as `rpo_jax.train.jobs.preference.build_references`
    makes them: for an empty path the initial policy (a copy of its parameters; with LoRA a copy of the adapters
    on the policy's base, rest None), or with `Weights.POLICY_BASE` the base with the adapters off (parameters and
    rest None: the policy's own); else the model its `architecture` file (or local config.json) describes, in
    `config.model.param_dtype` like `rpo_jax.train.build.model.load_model`'s."""
    out = []
    for i, ref in enumerate(refs):
        if not ref.get("path"):
            params = setup.state["params"]
            if i == 0 and layout.primary is Weights.POLICY_BASE:
                out.append((adapters_off_graphdef(setup.graphdef, params, setup.rest), None, None))
            else:
                out.append((setup.graphdef, None if lora_enabled(cfg) else setup.rest, params))
            continue
        mc = architecture_of(cfg, ref["path"], ref.get("architecture"), f"config.references[{i}]")
        graphdef, params, rest = abstract_params(cfg, mc, mesh=setup.mesh, dtype=setup.dtype)
        out.append((graphdef, rest, params))
    return out


def build_programs(cfg, devices: Sequence, responses: int = 2, *, rewards: bool = False) -> Plan:
    """The trainer's jitted programs for `cfg` on `devices`, with abstract arguments: the same `reference_layout`,
    `jitted_steps` and `scorer` the trainer (`rpo_jax.train.jobs.preference`) compiles, with the planned batch
    data.batch_size × K × data.max_length (K = `responses`) and the score window at its worst case. `rewards`: the
    data carries per-response scores, which reach the step (for its metrics) even when the loss does not need
    them; a reward-aware loss always takes them."""
    cfg = validate(cfg)
    if cfg.mode != "preference":
        raise ValueError(f"mode={cfg.mode!r}: rpo-plan plans preference training (mode='preference')")
    mesh = make_mesh(dict(cfg.mesh), devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % shards:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by data×fsdp={shards}")
    if cfg.data.batch_size % cfg.data.micro_batches:
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by data.micro_batches={cfg.data.micro_batches}"
        )
    dtype = jnp.bfloat16 if cfg.model.dtype == "auto" else compute_dtype(cfg.model.dtype)
    loss_fn = build_loss(cfg)
    model_config = architecture_of(cfg)
    setup = abstract_setup(
        cfg, model_config, mesh=mesh, dtype=dtype, total_steps=cfg.train.steps * max(1, cfg.train.iterations)
    )
    layout = reference_layout(cfg, loss_fn.spec.requires_reference, reference_sync_of(cfg))
    refs = ([dict(r) for r in cfg.references] or [{"path": ""}]) if layout.count else []
    if refs:
        loss_fn.spec.check_reference_count(len(refs), given="config.references")
    if layout.in_step and any(r.get("path") and (r.get("tokenizer") or r["path"]) != tokenizer_path(cfg) for r in refs):
        raise ValueError(
            "reference_mode='in_step' needs references that share the policy's tokenizer; "
            "use 'cache' for references with their own tokenizer"
        )
    ref_models = reference_models(cfg, refs, setup, layout)
    ref_params = tuple(params for _, _, params in ref_models)
    step_refs = ref_params
    if layout.in_state:  # the primary's parameters move into the train state, as the trainer holds them
        state, shardings = state_with_reference(setup.state, setup.state_shardings, ref_params[0])
        setup = dataclasses.replace(setup, state=state, state_shardings=shardings)
        ref_models[0] = (ref_models[0][0], ref_models[0][1], None)
        step_refs = ref_params[1:]
    window = plan_score_window(cfg)
    b, t, k = cfg.data.batch_size, cfg.data.max_length, responses
    ref_shape = None
    if layout.scoring is Scoring.CACHED:
        ref_shape = (b, k, len(refs)) if (len(refs) > 1 or loss_fn.spec.num_references) else (b, k)
    batch = abstract_batch(b, k, t, mesh, rewards=rewards or loss_fn.spec.requires_rewards, ref_shape=ref_shape)
    ref_graphdefs = tuple((graphdef, rest) for graphdef, rest, _ in ref_models) if layout.in_step else ()
    train_step, eval_step = jitted_steps(cfg, setup, loss_fn, ref_graphdefs, window, layout.sync)
    state_bytes = device_bytes(setup.state)
    held_outside = 0 if layout.in_step else device_bytes(ref_params)  # frozen references beside the state
    reference_bytes = device_bytes(ref_params)
    programs = [
        Program(
            "train step", train_step, (setup.state, batch, step_refs if layout.in_step else ()), resident=held_outside
        )
    ]
    evaluates = bool(cfg.data.eval) or cfg.data.eval_fraction > 0 or cfg.data.train in ("", "demo")
    eb = cfg.data.eval_batch_size
    if evaluates:
        eval_ref = None if ref_shape is None else (eb, *ref_shape[1:])
        eval_batch = abstract_batch(
            eb, k, t, mesh, rewards=rewards or loss_fn.spec.requires_rewards, ref_shape=eval_ref
        )
        # the eval step scores the primary of the moment first (the state's "reference" when it lives there)
        eval_refs = ref_params if layout.in_step else ()
        programs.append(
            Program(
                "eval step",
                eval_step,
                (setup.state["params"], eval_batch, eval_refs),
                resident=state_bytes
                - device_bytes(setup.state["params"])
                - (device_bytes(ref_params[0]) if layout.in_state else 0)
                + held_outside,
            )
        )
    if layout.scoring is Scoring.CACHED:
        score_batch = abstract_batch(eb, k, t, mesh, rewards=False)
        for i, (graphdef, rest, params) in enumerate(ref_models):
            params = setup.state["params"] if params is None else params  # LoRA's base reference: the policy's
            programs.append(
                Program(
                    f"reference {i} scorer (cache fill)",
                    scorer(cfg, setup, graphdef, rest, window),
                    (params, score_batch),
                    resident=state_bytes + held_outside - device_bytes(params),
                )
            )
    return Plan(
        programs,
        model_config,
        state_bytes,
        reference_bytes,
        device_bytes(batch),
        layout,
        window,
        dict(mesh.shape),
        len(devices),
        (b, k, t),
    )
