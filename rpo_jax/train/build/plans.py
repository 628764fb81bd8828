"""The plan of a run: `build_programs(cfg, devices)` — the programs the trainer of `config.mode` compiles, from
the program builder's own functions (`rpo_jax.train.build.programs`), with abstract arguments (every leaf a
`jax.ShapeDtypeStruct` with its `NamedSharding`: nothing loaded or allocated). `rpo-plan` compiles them for a TPU
slice; the tests compare them, argument by argument, with what the trainers compile
(tests/train/test_one_program.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rpo_jax.models.sharding import batch_sharding
from rpo_jax.train.build.lora import lora_enabled
from rpo_jax.train.build.model import abstract_params, adapters_off_graphdef, architecture_of, reward_labels_of
from rpo_jax.train.build.programs import (
    ReferenceLayout,
    RunSetup,
    Scoring,
    Weights,
    batch_responses,
    jitted_steps,
    online_layout,
    online_score_window,
    online_update_step,
    reference_layout,
    reference_sync_of,
    reward_steps,
    sampler,
    scorer,
    state_with_loss_state,
    state_with_reference,
)
from rpo_jax.train.build.state import abstract_setup, build_loss, compute_dtype
from rpo_jax.train.config.validation import validate
from rpo_jax.train.config.values import ONLINE, PREFERENCE, REWARD_MODEL
from rpo_jax.train.runtime.global_batches import config_mesh, replicated
from rpo_jax.train.step.logprobs import resolve_score_window


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs with shardings)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract_batch(
    batch_size: int, responses: int, length: int, mesh, *, rewards: bool, ref_shape=None, labels: bool = False
) -> dict:
    """The step's batch contract (rpo_jax.data.tokenize.collate_examples) as ShapeDtypeStructs sharded on the
    batch axis; `ref_shape` adds cached `ref_logps`, `labels` unpaired records' `labels [B]`."""
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
    if labels:
        spec["labels"] = ((b,), jnp.bool_)
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
    mode: str = PREFERENCE  # config.mode

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
    """(graphdef, rest, abstract parameters) of each reference, as `rpo_jax.train.build.references.build_references`
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
    """The trainer's jitted programs for `cfg` on `devices`, with abstract arguments (nothing loaded or
    allocated): what the trainer of `config.mode` compiles, from the same functions of this module.

    - preference: the same `reference_layout`, `jitted_steps` and `scorer`, with the planned batch
      data.batch_size × K × data.max_length (K = `responses`) and the score window at its worst case;
    - online: the sampler (`sampler`, `online.prompts_per_iteration` × `online.num_samples` prompts; one sample
      per held-out prompt for evaluation), the scorers of the samples (the policy, LoRA's base, the extra
      references) and the update step (`online_update_step`, data.batch_size prompts × num_samples);
    - reward_model: `reward_steps` on data.batch_size (eval: data.eval_batch_size) pairs of data.max_length.

    `rewards`: the preference data carries per-response scores, which reach the step (for its metrics) even when
    the loss does not need them; a reward-aware loss always takes them. The plan's dtype is bfloat16 for
    `model.dtype="auto"` (an accelerator's choice)."""
    cfg = validate(cfg)
    mesh = config_mesh(cfg.mesh, devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % shards:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by data×fsdp={shards}")
    if cfg.data.batch_size % cfg.data.micro_batches:
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by data.micro_batches={cfg.data.micro_batches}"
        )
    dtype = jnp.bfloat16 if cfg.model.dtype == "auto" else compute_dtype(cfg.model.dtype)
    if cfg.mode == ONLINE:
        return online_plan(cfg, mesh, dtype)
    if cfg.mode == REWARD_MODEL:
        return reward_model_plan(cfg, mesh, dtype)
    return preference_plan(cfg, mesh, dtype, responses, rewards=rewards)


def evaluates(cfg) -> bool:
    """Whether a run evaluates on held-out data: `data.eval`, a held-out fraction, or the demo's eval split."""
    return bool(cfg.data.eval) or cfg.data.eval_fraction > 0 or cfg.data.train in ("", "demo")


def preference_plan(cfg, mesh, dtype, responses: int, *, rewards: bool) -> Plan:
    """`build_programs` for `mode="preference"`."""
    loss_fn = build_loss(cfg)
    model_config = architecture_of(cfg)
    setup = abstract_setup(
        cfg, model_config, mesh=mesh, dtype=dtype, total_steps=cfg.train.steps * max(1, cfg.train.iterations)
    )
    state, shardings = state_with_loss_state(setup.state, setup.state_shardings, loss_fn, mesh, abstract=True)
    setup = dataclasses.replace(setup, state=state, state_shardings=shardings)
    layout = reference_layout(cfg, loss_fn.spec.requires_reference, reference_sync_of(cfg))
    refs = ([dict(r) for r in cfg.references] or [{"path": ""}]) if layout.count else []
    if refs:
        loss_fn.spec.check_reference_count(len(refs), given="config.references")
    ref_models = reference_models(cfg, refs, setup, layout)
    ref_params = tuple(params for _, _, params in ref_models)
    step_refs = ref_params
    if layout.in_state:  # the primary's parameters move into the train state, as the trainer holds them
        state, shardings = state_with_reference(setup.state, setup.state_shardings, ref_params[0])
        setup = dataclasses.replace(setup, state=state, state_shardings=shardings)
        ref_models[0] = (ref_models[0][0], ref_models[0][1], None)
        step_refs = ref_params[1:]
    window = None if loss_fn.spec.requires_sequence_logps else plan_score_window(cfg)
    b, t, k = cfg.data.batch_size, cfg.data.max_length, batch_responses(loss_fn.spec, responses)
    unpaired = loss_fn.spec.unpaired
    ref_shape = None
    if layout.scoring is Scoring.CACHED:
        ref_shape = (b, k, len(refs)) if (len(refs) > 1 or loss_fn.spec.num_references) else (b, k)
    batch = abstract_batch(
        b, k, t, mesh, rewards=rewards or loss_fn.spec.requires_rewards, ref_shape=ref_shape, labels=unpaired
    )
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
    eb = cfg.data.eval_batch_size
    if evaluates(cfg):
        eval_ref = None if ref_shape is None else (eb, *ref_shape[1:])
        eval_batch = abstract_batch(
            eb, k, t, mesh, rewards=rewards or loss_fn.spec.requires_rewards, ref_shape=eval_ref, labels=unpaired
        )
        # the eval step scores the primary of the moment first (the state's "reference" when it lives there)
        eval_refs = ref_params if layout.in_step else ()
        programs.append(
            Program(
                "eval step",
                eval_step,
                (setup.state["params"], eval_batch, eval_refs)
                + ((setup.state["loss_state"],) if loss_fn.spec.stateful else ()),
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
        mesh.size,
        (b, k, t),
        PREFERENCE,
    )


def key_struct(mesh) -> jax.ShapeDtypeStruct:
    """A replicated `jax.random.key` as an abstract argument."""
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated(mesh))


def abstract_prompts(rows: int, width: int, mesh) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """The sampler's left-padded prompts (tokens int32, attention mask bool) [rows, width], batch-sharded."""
    return tuple(
        jax.ShapeDtypeStruct((rows, width), dtype, sharding=batch_sharding(mesh, 2)) for dtype in (jnp.int32, jnp.bool_)
    )


def planned_eos_ids(model_config) -> tuple[int, ...]:
    """The EOS ids the planner compiles the sampler with: the model config's (the trainer adds the tokenizer's;
    they are constants of the program, not arguments, and change neither its shapes nor its memory)."""
    eos = model_config.eos_token_id
    return tuple(int(i) for i in (eos if isinstance(eos, tuple) else (() if eos is None else (eos,))))


def online_plan(cfg, mesh, dtype) -> Plan:
    """`build_programs` for `mode="online"`: the sampler of an iteration's prompts (and of the held-out prompts
    when the run evaluates), the scorers of the samples, and the update step on data.batch_size prompts × K
    samples of data.max_prompt_length + online.max_new_tokens tokens (padded; packed rows with packing on)."""
    oc = cfg.online
    loss_fn = build_loss(cfg)
    layout = online_layout(cfg, loss_fn.spec.requires_reference)
    model_config = architecture_of(cfg)
    setup = abstract_setup(
        cfg, model_config, mesh=mesh, dtype=dtype, total_steps=oc.iterations * oc.updates_per_iteration
    )
    params = setup.state["params"]
    extra = []  # (graphdef, params, rest) of config.references[1:]
    if layout.count:
        for i, ref in enumerate(cfg.references[1:], start=1):
            mc = architecture_of(cfg, ref.path, ref.architecture, f"config.references[{i}]")
            extra.append(abstract_params(cfg, mc, mesh=mesh, dtype=dtype))
    extra_bytes = sum(device_bytes(p) for _, p, _ in extra)
    state_bytes = device_bytes(setup.state)
    initial_bytes = device_bytes(params)  # the initial policy's copy, held for the whole run
    k, b, window = int(oc.num_samples), int(cfg.data.batch_size), online_score_window(cfg)
    width = int(cfg.data.max_prompt_length) + int(oc.max_new_tokens)
    p = int(oc.prompts_per_iteration)
    eos = planned_eos_ids(model_config)
    pad = model_config.pad_token_id if model_config.pad_token_id is not None else 0
    sample = sampler(cfg, setup, eos, pad)
    held = state_bytes - device_bytes(params) + initial_bytes + extra_bytes  # beside a program on params
    programs = [
        Program(
            "sampler",
            sample,
            (params, *abstract_prompts(p * k, cfg.data.max_prompt_length, mesh), key_struct(mesh)),
            held,
        )
    ]
    samples = abstract_batch(p, k, width, mesh, rewards=True)
    policy_scorer = scorer(cfg, setup, setup.graphdef, setup.rest, window)
    programs.append(Program("policy scorer (samples)", policy_scorer, (params, samples), held))
    if layout.primary is Weights.POLICY_BASE and layout.count:
        base = adapters_off_graphdef(setup.graphdef, params, setup.rest)
        programs.append(
            Program("base scorer (samples)", scorer(cfg, setup, base, setup.rest, window), (params, samples), held)
        )
    for i, (graphdef, ref_params, rest) in enumerate(extra, start=1):
        programs.append(
            Program(
                f"reference {i} scorer (samples)",
                scorer(cfg, setup, graphdef, rest, window),
                (ref_params, samples),
                state_bytes + initial_bytes + extra_bytes - device_bytes(ref_params),
            )
        )
    ref_shape = None  # the scorers' columns, stacked when there are several (`iteration_batch`)
    if layout.count:
        ref_shape = (b, k, layout.count) if layout.count > 1 else (b, k)
    batch = abstract_batch(b, k, width, mesh, rewards=True, ref_shape=ref_shape)
    update = online_update_step(cfg, setup, loss_fn)
    programs.insert(0, Program("update step", update, (setup.state, batch), initial_bytes + extra_bytes))
    # evaluation samples one response to each of online.eval_prompts held-out prompts (data.eval, or the demo's),
    # as many as divide evenly over the data-parallel shards
    eval_rows = int(oc.eval_prompts) if (cfg.data.eval or cfg.data.train in ("", "demo")) else 0
    eval_rows -= eval_rows % (mesh.shape["data"] * mesh.shape["fsdp"])
    if eval_rows:
        programs.append(
            Program(
                "sampler (eval prompts)",
                sample,
                (params, *abstract_prompts(eval_rows, cfg.data.max_prompt_length, mesh), key_struct(mesh)),
                held,
            )
        )
        programs.append(
            Program(
                "policy scorer (eval samples)",
                policy_scorer,
                (params, abstract_batch(eval_rows, 1, width, mesh, rewards=True)),
                held,
            )
        )
    return Plan(
        programs,
        model_config,
        state_bytes,
        initial_bytes + extra_bytes,
        device_bytes(batch),
        layout,
        window,
        dict(mesh.shape),
        mesh.size,
        (b, k, width),
        ONLINE,
    )


def reward_model_plan(cfg, mesh, dtype) -> Plan:
    """`build_programs` for `mode="reward_model"`: `reward_steps` on pairs of data.max_length tokens."""
    model_config = architecture_of(cfg)
    setup = abstract_setup(
        cfg, model_config, mesh=mesh, dtype=dtype, total_steps=cfg.train.steps, reward_labels=reward_labels_of(cfg)
    )
    train_step, eval_step = reward_steps(cfg, setup)
    b, t = cfg.data.batch_size, cfg.data.max_length
    batch = abstract_pairs(b, t, mesh)
    state_bytes = device_bytes(setup.state)
    programs = [Program("train step", train_step, (setup.state, batch))]
    if evaluates(cfg):
        programs.append(
            Program(
                "eval step",
                eval_step,
                (setup.state["params"], abstract_pairs(cfg.data.eval_batch_size, t, mesh)),
                resident=state_bytes - device_bytes(setup.state["params"]),
            )
        )
    return Plan(
        programs,
        model_config,
        state_bytes,
        0,
        device_bytes(batch),
        ReferenceLayout(Scoring.NONE, Weights.OWN, 0),
        0,
        dict(mesh.shape),
        mesh.size,
        (b, 2, t),
        REWARD_MODEL,
    )


def abstract_pairs(batch_size: int, length: int, mesh) -> dict:
    """The reward-model step's batch (`rpo_jax.data.reward_pairs.pair_batch`) as ShapeDtypeStructs sharded on the
    batch axis: tokens, attention_mask [B, 2, T], weight and margin [B]."""
    spec = {
        "tokens": ((batch_size, 2, length), jnp.int32),
        "attention_mask": ((batch_size, 2, length), jnp.bool_),
        "weight": ((batch_size,), jnp.float32),
        "margin": ((batch_size,), jnp.float32),
    }
    return {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
        for name, (shape, dtype) in spec.items()
    }
