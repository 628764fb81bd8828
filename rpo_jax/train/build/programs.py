"""The one program builder: a run's jitted programs with their abstract arguments.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rpo_jax.models.sharding import batch_sharding, make_mesh
from rpo_jax.train.build.data import tokenizer_path
from rpo_jax.train.build.lora import lora_enabled
from rpo_jax.train.build.model import abstract_params, adapters_off_graphdef, architecture_of
from rpo_jax.train.build.state import abstract_setup, build_loss, compute_dtype
from rpo_jax.train.core.performance import train_flops_per_token
from rpo_jax.train.jobs.preference import jitted_steps
from rpo_jax.train.step.logprobs import resolve_score_window
from rpo_jax.train.step.steps import make_scorer


# ------------------------------------------------------------------------------------------------ programs
def device_bytes(tree: Any) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs with shardings)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract_batch(batch_size: int, responses: int, length: int, mesh, *, rewards: bool, ref_shape=None) -> dict:
    """The step's batch contract (rpo_jax.data.tokenize.collate_examples) as ShapeDtypeStructs sharded on the
    batch axis; `ref_shape` adds cached `ref_logps`."""
    b, k, t = batch_size, responses, length
    spec = {"tokens": ((b, k, t), jnp.int32), "attention_mask": ((b, k, t), jnp.bool_),
            "loss_mask": ((b, k, t), jnp.bool_), "lengths": ((b, k), jnp.int32), "valid": ((b, k), jnp.bool_)}
    if rewards:
        spec["rewards"] = ((b, k), jnp.float32)
    if ref_shape is not None:
        spec["ref_logps"] = (ref_shape, jnp.float32)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
            for name, (shape, dtype) in spec.items()}


@dataclasses.dataclass
class Program:
    name: str
    jitted: Any
    args: tuple
    resident: int = 0        # bytes per chip held by the trainer meanwhile but not an argument of this program


@dataclasses.dataclass
class Plan:
    """What `build_programs` derives from a config: the programs and the figures of the FLOP model."""

    programs: list[Program]
    model_config: Any
    state_bytes: int
    reference_bytes: int
    batch_bytes: int
    model_flops_per_chip: float
    in_step: bool
    num_references: int
    score_window: int | None
    mesh_shape: dict


def plan_score_window(cfg) -> int | None:
    """The score window planned: a number as configured, "auto" at its worst case (every position)."""
    setting = cfg.model.score_window
    if str(setting).strip().lower() == "auto":
        return resolve_score_window("auto", cfg.data.max_length - 1)
    return resolve_score_window(setting, 1)


def reference_models(cfg, refs: list[dict], setup, mesh, dtype) -> list[tuple[Any, Any, Any]]:
    """(graphdef, rest, abstract parameters) of each reference: the initial policy's (a copy of its parameters,
    as the trainer keeps) for an empty path, else the model its `architecture` file (or local config.json)
    describes, in `config.model.param_dtype` like `rpo_jax.train.build.model.load_model`'s. With LoRA the empty path is
    what `rpo_jax.train.jobs.preference.initial_policy_reference` makes it: the base with the adapters off (parameters
    and rest None: the policy's own, nothing copied) or, for `lora.reference = "initial"`, a copy of the adapters
    on the policy's base (rest None)."""
    out = []
    for i, ref in enumerate(refs):
        if not ref.get("path"):
            params = setup.state["params"]
            if not lora_enabled(cfg):
                out.append((setup.graphdef, setup.rest, params))
            elif cfg.model.lora.get("reference", "base") == "initial":
                out.append((setup.graphdef, None, params))
            else:
                out.append((adapters_off_graphdef(setup.graphdef, params, setup.rest), None, None))
            continue
        mc = architecture_of(cfg, ref["path"], ref.get("architecture"), f"config.references[{i}]")
        graphdef, params, rest = abstract_params(cfg, mc, mesh=mesh, dtype=dtype)
        out.append((graphdef, rest, params))
    return out


def build_programs(cfg, devices: Sequence, responses: int = 2) -> Plan:
    """The trainer's jitted programs for `cfg` on `devices`, with abstract arguments (as
    `rpo_jax.train.jobs.preference.preference_task` builds them)."""
    if cfg.mode != "preference":
        raise ValueError(f"mode={cfg.mode!r}: rpo-plan plans preference training (mode='preference')")
    mesh = make_mesh(dict(cfg.mesh), devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % shards:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by data×fsdp={shards}")
    if cfg.data.batch_size % cfg.data.micro_batches:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by "
                         f"data.micro_batches={cfg.data.micro_batches}")
    dtype = jnp.bfloat16 if cfg.model.dtype == "auto" else compute_dtype(cfg.model.dtype)
    loss_fn = build_loss(cfg)
    model_config = architecture_of(cfg)
    setup = abstract_setup(cfg, model_config, mesh=mesh, dtype=dtype,
                           total_steps=cfg.train.steps * max(1, cfg.train.iterations))
    refs = [dict(r) for r in cfg.references] or [{"path": ""}] if loss_fn.spec.requires_reference else []
    if refs:
        loss_fn.spec.check_reference_count(len(refs), given="config.references")
    if cfg.reference_mode not in ("auto", "cache", "in_step"):
        raise ValueError(f"reference_mode={cfg.reference_mode!r}: expected one of ('auto', 'cache', 'in_step')")
    in_step = cfg.reference_mode == "in_step" and bool(refs)
    if in_step and any(r.get("path") and (r.get("tokenizer") or r["path"]) != tokenizer_path(cfg) for r in refs):
        raise ValueError("reference_mode='in_step' needs references that share the policy's tokenizer; "
                         "use 'cache' for references with their own tokenizer")
    ref_models = reference_models(cfg, refs, setup, mesh, dtype)
    ref_params = tuple(params for _, _, params in ref_models)
    window = plan_score_window(cfg)
    chunk = cfg.model.vocab_chunk_size or None
    b, t, k = cfg.data.batch_size, cfg.data.max_length, responses
    ref_shape = None
    if refs and not in_step:
        ref_shape = (b, k, len(refs)) if (len(refs) > 1 or loss_fn.spec.num_references) else (b, k)
    batch = abstract_batch(b, k, t, mesh, rewards=loss_fn.spec.requires_rewards, ref_shape=ref_shape)
    ref_graphdefs = tuple((graphdef, rest) for graphdef, rest, _ in ref_models) if in_step else ()
    train_step, eval_step = jitted_steps(cfg, setup, loss_fn, ref_graphdefs, window)
    state_bytes, reference_bytes = device_bytes(setup.state), device_bytes(ref_params)
    programs = [Program("train step", train_step, (setup.state, batch, ref_params if in_step else ()),
                        resident=0 if in_step else reference_bytes)]
    evaluates = bool(cfg.data.eval) or cfg.data.eval_fraction > 0 or cfg.data.train in ("", "demo")
    eb = cfg.data.eval_batch_size
    if evaluates:
        eval_ref = None if ref_shape is None else (eb, *ref_shape[1:])
        eval_batch = abstract_batch(eb, k, t, mesh, rewards=loss_fn.spec.requires_rewards, ref_shape=eval_ref)
        programs.append(Program("eval step", eval_step,
                                (setup.state["params"], eval_batch, ref_params if in_step else ()),
                                resident=state_bytes - device_bytes(setup.state["params"])
                                + (0 if in_step else reference_bytes)))
    score_batch = abstract_batch(eb, k, t, mesh, rewards=False)
    for i, (graphdef, rest, params) in enumerate(ref_models if not in_step else []):
        # a reference sharing the policy's base (LoRA) is scored with it
        rest = setup.rest if rest is None else rest
        params = setup.state["params"] if params is None else params
        scorer = make_scorer(graphdef, rest, mesh, compute_dtype=dtype, vocab_chunk_size=chunk, score_window=window)
        programs.append(Program(f"reference {i} scorer (cache fill)", scorer, (params, score_batch),
                                resident=state_bytes + reference_bytes - device_bytes(params)))
    flops = b * k * t * train_flops_per_token(model_config, t, num_references=len(ref_graphdefs),
                                              score_window=window) / len(devices)
    return Plan(programs, model_config, state_bytes, reference_bytes, device_bytes(batch), flops, in_step,
                len(refs), window, dict(mesh.shape))
