"""`rpo-plan`'s report: per-chip memory of every compiled program, FLOPs, collectives, an estimated step
time and MFU, and the verdict (fits / does not fit).
"""

from __future__ import annotations

import numpy as np

from rpo_jax.models.hf_export import abstract_tensors, export_memory, parse_size, piece_size, shard_plan
from rpo_jax.models.reward import SCORE_TENSOR
from rpo_jax.train.build.fit import Capacity
from rpo_jax.train.build.model import reward_labels_of
from rpo_jax.train.build.plans import Plan
from rpo_jax.train.build.programs import Weights
from rpo_jax.train.config.values import ONLINE, REWARD_MODEL
from rpo_jax.train.plan.compile import CompiledProgram
from rpo_jax.train.plan.hlo_analysis import COLLECTIVES
from rpo_jax.train.plan.slices import Chip, GiB, Slice
from rpo_jax.train.runtime.performance import train_flops_per_token


# ------------------------------------------------------------------------------------------------ report
def estimate_step(compiled: CompiledProgram, model_flops: float, chip: Chip) -> dict[str, float]:
    """An estimate, not a measurement: every matmul at the chip's peak bf16 FLOP/s plus every collective's
    traffic at the chip's full ICI bandwidth, without overlap; MFU = model FLOPs ÷ (time × peak)."""
    compute_s = compiled.flops / chip.peak_bf16_flops
    comm_s = sum(s.traffic_bytes for s in compiled.collectives.values()) / chip.ici_bytes_per_s
    step_s = compute_s + comm_s
    return {
        "compute_s": compute_s,
        "comm_s": comm_s,
        "step_s": step_s,
        "mfu": model_flops / (step_s * chip.peak_bf16_flops) if step_s else 0.0,
    }


def model_flops_per_chip(plan: Plan) -> float:
    """The FLOP model's count (`train_flops_per_token`) for the planned train batch, per chip (a reward model has
    no output head over the vocabulary: window 0)."""
    b, k, t = plan.batch_shape
    refs = plan.layout.count if plan.layout.in_step else 0
    window = 0 if plan.mode == REWARD_MODEL else plan.score_window
    return (
        b * k * t * train_flops_per_token(plan.model_config, t, num_references=refs, score_window=window)
    ) / plan.num_devices


def where_references_live(plan: Plan, cfg) -> str:
    """The reference layout in words: how many, when scored, where the primary's weights are."""
    layout = plan.layout
    if plan.mode == REWARD_MODEL:
        return "none (a reward model)"
    if not layout.count:
        if plan.mode == ONLINE and cfg.online.reference == "current":
            return "none (online.reference='current': the stop-gradient of the policy being updated)"
        return "none (a reference-free loss)"
    if plan.mode == ONLINE:
        primary = {
            Weights.OWN: "the initial policy's copy",
            Weights.POLICY: "the policy's parameters at the iteration's start",
            Weights.POLICY_BASE: "the policy's base, adapters off",
        }[layout.primary]
        return f"{layout.count} scored per iteration, between sampling and the updates; the primary: {primary}"
    scored = "scored in the step" if layout.in_step else "cached (scored once before step 1)"
    if layout.primary is Weights.TRAIN_STATE:
        moves = (
            f"moving: reference_sync every {layout.sync.every} steps" if layout.sync.every else "reset per iteration"
        )
        primary = f"in the train state ({moves})"
    else:
        primary = {Weights.OWN: "its own frozen weights", Weights.POLICY_BASE: "the policy's base, adapters off"}[
            layout.primary
        ]
    return f"{layout.count} {scored}; the primary's weights: {primary}"


def where_held(plan: Plan) -> str:
    if plan.mode == ONLINE and plan.reference_bytes:
        return " (the initial policy's copy and the extra references, held beside the train state)"
    if plan.layout.in_state:
        return " (the primary's in the train state: counted in both)"
    return "" if plan.layout.in_step else " (held by the trainer, not the step)"


def gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB" if x >= GiB / 10 else f"{x / 2**20:.1f} MiB"


def export_needs(plan: Plan, cfg, local_cpu_devices: int = 0) -> dict[str, int]:
    """What the run's export writes and needs (`rpo_jax.models.hf_export`, streamed): {"files" (safetensors files
    at `config.export.max_shard_size`), "bytes" (weights, in `config.model.param_dtype`), "largest" (the largest
    tensor), "piece" (the largest piece gathered at once), "host" (extra host memory of the writing process:
    `export_memory`, the piece once on the host and once per local CPU device)}. A reward model's export has its
    score head [labels, hidden] after the decoder; a LoRA run's is merged, of the base's shapes."""
    dtype = np.dtype(cfg.model.param_dtype)
    mc = plan.model_config
    extra = {SCORE_TENSOR: (reward_labels_of(cfg), mc.hidden_size)} if plan.mode == REWARD_MODEL else None
    tensors = abstract_tensors(mc, dtype, extra)
    return {
        "files": len(shard_plan(tensors, cfg.export.max_shard_size)),
        "bytes": sum(t.nbytes for t in tensors),
        "largest": max(t.nbytes for t in tensors),
        "piece": max(piece_size(t) for t in tensors),
        "host": export_memory(tensors, local_cpu_devices),
    }


def export_line(plan: Plan, cfg, local_cpu_devices: int = 0) -> str:
    """The export in one line (`export_needs`)."""
    e = export_needs(plan, cfg, local_cpu_devices)
    files = "1 model.safetensors" if e["files"] == 1 else f"{e['files']} shards + index"
    per_device = f" + once per local CPU device ({local_cpu_devices})" if local_cpu_devices else ""
    return (
        f"export: {gib(e['bytes'])} of weights ({cfg.model.param_dtype}) in {files} "
        f"(export.max_shard_size={cfg.export.max_shard_size}, {parse_size(cfg.export.max_shard_size)} bytes); "
        f"host memory: the writing process (process 0) needs {gib(e['host'])} beyond what it holds (the largest "
        f"piece gathered, {gib(e['piece'])}, once in host memory{per_device}; largest tensor {gib(e['largest'])}), "
        "the other processes none"
    )


def report(plan: Plan, compiled: list[CompiledProgram], slc: Slice, cfg) -> str:
    """The plan printed per chip."""
    chip, train = slc.chip, compiled[0]  # the train step when it compiled, else the first program that did
    model_flops = model_flops_per_chip(plan)
    mc = plan.model_config
    lines = [
        f"rpo-plan: {slc.accelerator} = {slc.num_chips} chips ({slc.topology_name}), mesh "
        f"{plan.mesh_shape}; "
        f"{mc.model_type} {mc.num_params() / 1e9:.2f}B parameters, {mc.num_layers} layers; "
        f"mode {plan.mode}; references: {where_references_live(plan, cfg)}",
        f"per chip: HBM {gib(chip.hbm_bytes)}",
    ]
    for c in compiled:
        lines.append(
            f"  {c.name}: total {gib(c.total)} = arguments {gib(c.arguments)} + outputs not aliased "
            f"{gib(c.outputs - c.aliased)} + temporaries {gib(c.temporaries)} + code {gib(c.code)}"
            + (f" + held outside {gib(c.resident)}" if c.resident else "")
        )
    lines.append(
        f"  of which: parameters + optimizer state {gib(plan.state_bytes)}, references "
        f"{gib(plan.reference_bytes)}{where_held(plan)}, "
        f"batch {gib(plan.batch_bytes)}, {train.name} temporaries {gib(train.temporaries)}"
    )
    lines.append(
        f"step FLOPs per chip: compiled HLO {train.flops:.3e} (matmuls, loops × trip counts); FLOP model "
        f"{model_flops:.3e} (train_flops_per_token); ratio {train.flops / model_flops:.2f}"
        + (f"; loops of unknown trip count counted once: {len(train.unknown_loops)}" if train.unknown_loops else "")
    )
    lines.append("collectives per train step, per chip (from the compiled HLO):")
    lines.append(f"  {'kind':<20}{'count':>8}{'GiB':>12}{'est. ms':>10}")
    for kind in COLLECTIVES:
        s = train.collectives[kind]
        lines.append(
            f"  {kind:<20}{s.count:>8}{s.bytes / GiB:>12.3f}{1e3 * s.traffic_bytes / chip.ici_bytes_per_s:>10.2f}"
        )
    est = estimate_step(train, model_flops, chip)
    lines.append(
        f"ESTIMATE (not a measurement; matmuls at the {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 peak, "
        f"collectives at {chip.ici_bytes_per_s * 8 / 1e9:.0f} Gbps ICI, no overlap): step "
        f"{est['step_s']:.2f} s (compute {est['compute_s']:.2f} s + communication {est['comm_s']:.2f} s), "
        f"MFU {100 * est['mfu']:.1f} %"
    )
    worst = max(compiled, key=lambda c: c.total)
    verdict = "fits" if worst.total <= chip.hbm_bytes else "does not fit"
    lines.append(
        f"{verdict}: needs {gib(worst.total)} of {gib(chip.hbm_bytes)} per chip on {slc.accelerator} "
        f"({worst.name} of the programs compiled)"
    )
    lines.append(export_line(plan, cfg))
    return "\n".join(lines)


def report_local(
    plan: Plan, compiled: list[CompiledProgram], capacity: Capacity, need: int, budget, target: str, cfg
) -> str:
    """The plan for this machine's devices (`rpo-plan --topology cpu|gpu`): each program's memory, the run's need
    against the budget of `config.train.memory_budget`, the verdict, the export's host memory."""
    mc = plan.model_config
    lines = [
        f"rpo-plan: this machine's {target.upper()} ({plan.num_devices} device(s)), mesh {plan.mesh_shape}; "
        f"{mc.model_type} {mc.num_params() / 1e9:.2f}B parameters, {mc.num_layers} layers; mode {plan.mode}",
        f"memory: {capacity.what}",
    ]
    for c in compiled:
        lines.append(
            f"  {c.name}: total {gib(c.total)} = arguments {gib(c.arguments)} + outputs not aliased "
            f"{gib(c.outputs - c.aliased)} + temporaries {gib(c.temporaries)} + code {gib(c.code)}"
            + (f" + held outside {gib(c.resident)}" if c.resident else "")
        )
    per = "for the process (its memory now + the largest program's total)" if capacity.host else "per device"
    if budget is None:
        lines.append(f"needs {gib(need)} {per}; config.train.memory_budget=0: not checked")
    else:
        verdict = "fits" if need <= budget else "does not fit"
        lines.append(f"{verdict}: needs {gib(need)} {per} of a budget of {gib(budget)}")
    lines.append(export_line(plan, cfg, plan.num_devices if capacity.host else 0))
    return "\n".join(lines)
