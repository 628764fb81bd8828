"""`rpo-plan`: compile a recipe's train step for a Cloud TPU slice ahead of time, on a machine without TPUs, and
report per chip what it needs (HBM), computes (FLOPs) and communicates (collectives).

    rpo-plan --config configs/llama3_1_8b_v5p.py --topology v5p-64 [--config.x=y ...] [--responses K]

The slice's devices come from libtpu's topology description (`jax.experimental.topologies.get_topology_desc`,
the megacore chip config on v4/v5p so that one device is one chip); the programs are the trainer's own
(`rpo_jax.train.step`: the train step, the eval step when the config evaluates, the reference scorer when
reference log-probs are cached), lowered with abstract arguments (`jax.ShapeDtypeStruct` with `NamedSharding`,
from `rpo_jax.train.setup.abstract_setup`: nothing is loaded or allocated) and compiled by XLA:TPU.

Shapes: the global batch is data.batch_size × K × data.max_length (K = `--responses`, the responses per
example of the data, default 2; data.max_length is the largest length bucket), eval batches
data.eval_batch_size × K × data.max_length; `model.score_window = "auto"` is planned at its worst case (the
head on every position) since the data's longest response is not known here.

Exit status: 0 when every program fits, 1 when one does not ("does not fit: needs X GiB of Y GiB per chip on
TOPOLOGY"; XLA's compile-time out-of-memory error is the ground truth), 2 for bad usage (an unknown topology, a
bad config) with one line on stderr.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from rpo_jax.models.sharding import batch_sharding, make_mesh
from rpo_jax.train.cli import unknown_field_error
from rpo_jax.train.hlo_analysis import COLLECTIVES, analyze
from rpo_jax.train.performance import train_flops_per_token
from rpo_jax.train.setup import (abstract_params, abstract_setup, adapters_off_graphdef, architecture_of, build_loss,
                                 compute_dtype, lora_enabled, tokenizer_path)
from rpo_jax.train.preference import jitted_steps
from rpo_jax.train.step import make_scorer, resolve_score_window

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one TPU generation (per chip), from the Cloud TPU system-architecture pages (v4:
    also the TPU v4 paper for the ICI links)."""

    generation: str          # libtpu topology prefix: "v4", "v5" (v5p), "v5e", "v6e"
    megacore: bool           # two TensorCores driven as one device (v4, v5p)
    mesh_dims: int           # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    hbm_bytes: float
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float   # all ICI links of a chip together


CHIPS = {
    "v4": Chip("v4", True, 3, 32 * GiB, 275e12, 1200e9, 2400e9 / 8),
    "v5p": Chip("v5", True, 3, 95 * GiB, 459e12, 2765e9, 4800e9 / 8),
    "v5e": Chip("v5e", False, 2, 16 * GiB, 197e12, 819e9, 1600e9 / 8),
    "v6e": Chip("v6e", False, 2, 32 * GiB, 918e12, 1640e9, 3584e9 / 8),
}
#: accelerator-type prefixes → CHIPS key
ALIASES = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}
#: chips → slice shape (the shapes Cloud TPU provisions; larger v4/v5p slices are tori)
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Slice:
    accelerator: str
    chip: Chip
    num_chips: int
    shape: tuple[int, ...]

    @property
    def topology_name(self) -> str:
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Torus links: v4/v5p slices of 64 chips and more wrap in every dimension; 2-D slices wrap along a
        dimension of 16 chips."""
        if self.chip.mesh_dims == 3:
            return (self.num_chips >= 64,) * 3
        return (self.shape[0] >= 16, self.shape[1] >= 16, False)


def parse_slice(name: str) -> Slice:
    """A Cloud TPU accelerator type (`v4-32`, `v5p-64`, `v5litepod-16` / `v5e-16`, `v6e-8`) → its Slice. The
    number counts TensorCores on v4/v5p (2 per chip) and chips on v5e/v6e. ValueError for anything else."""
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name.strip().lower())
    if not m:
        raise ValueError(f"--topology={name!r}: expected a Cloud TPU accelerator type such as v5p-64, v4-32, "
                         "v5litepod-16 (v5e-16) or v6e-8")
    chip = CHIPS[ALIASES[m.group(1)]]
    count = int(m.group(2))
    chips = count // 2 if chip.megacore else count
    shapes = SHAPES_3D if chip.mesh_dims == 3 else SHAPES_2D
    if (chip.megacore and count % 2) or chips not in shapes:
        sizes = sorted(c * (2 if chip.megacore else 1) for c in shapes)
        raise ValueError(f"--topology={name!r}: {m.group(1)} slices come in sizes {', '.join(map(str, sizes))}")
    return Slice(name, chip, chips, shapes[chips])


def slice_devices(slc: Slice) -> list:
    """One device per chip of the slice, from libtpu's topology description (no TPU needed)."""
    from jax.experimental import topologies
    # compiling needs no TPU: let several planners (or a planner beside a TPU job) load libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    bounds = (2, 2, 1) if slc.num_chips >= 4 else (1, 1, 1)
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=slc.topology_name, chip_config_name="megacore" if slc.chip.megacore else
        "default", chips_per_host_bounds=bounds, num_slices=1, wrap=slc.wrap)
    devices = list(topology.devices)
    if len(devices) != slc.num_chips:
        raise RuntimeError(f"{slc.accelerator}: libtpu describes {len(devices)} devices, expected {slc.num_chips}")
    return devices


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
    describes, in `config.model.param_dtype` like `rpo_jax.train.setup.load_model`'s. With LoRA the empty path is
    what `rpo_jax.train.preference.initial_policy_reference` makes it: the base with the adapters off (parameters
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
    `rpo_jax.train.preference.preference_task` builds them)."""
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


# ------------------------------------------------------------------------------------------------ compiling
class DoesNotFit(Exception):
    """XLA:TPU ran out of HBM compiling a program: `needed` and `capacity` in bytes per chip."""

    def __init__(self, program: str, needed: float, capacity: float):
        super().__init__(program)
        self.program, self.needed, self.capacity = program, needed, capacity


_OOM_USED = re.compile(r"Used\s+([\d.]+)([KMGT]?)\s+of\s+([\d.]+)([KMGT]?)\s+hbm", re.IGNORECASE)
_OOM_TEMPS = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)",
                        re.IGNORECASE)
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def oom_bytes(message: str, argument_bytes: int = 0) -> tuple[float, float] | None:
    """(needed, capacity) bytes per chip from XLA:TPU's out-of-memory errors: "Used X of Y hbm" (the whole
    program), or "the total memory required for HLO temporaries (X) exceeds available HBM (Y)" (temporaries
    only: the program's `argument_bytes` are added). None for any other error."""
    for pattern, extra in ((_OOM_USED, 0), (_OOM_TEMPS, argument_bytes)):
        m = pattern.search(message)
        if m:
            return (float(m.group(1)) * _UNIT[m.group(2).upper()] + extra,
                    float(m.group(3)) * _UNIT[m.group(4).upper()])
    return None


@dataclasses.dataclass
class CompiledProgram:
    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    resident: int
    flops: float
    collectives: dict
    unknown_loops: list

    @property
    def total(self) -> int:
        """Peak bytes per chip: arguments + outputs not aliased to arguments + temporaries + code, plus what the
        trainer holds meanwhile outside the program."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code + self.resident


def compile_program(program: Program, num_devices: int, dump_dir: str = "") -> CompiledProgram:
    """Lower and compile `program` for the slice (its HLO text written to `dump_dir` when given); raises
    DoesNotFit on XLA's out-of-memory error."""
    try:
        compiled = program.jitted.lower(*program.args).compile()
    except Exception as e:  # noqa: BLE001 - XLA reports out-of-memory as a runtime error with this text
        found = oom_bytes(str(e), device_bytes(program.args))
        if found is None:
            raise
        raise DoesNotFit(program.name, found[0] + program.resident, found[1]) from None
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, re.sub(r"\W+", "_", program.name).strip("_") + ".hlo.txt"), "w") as f:
            f.write(text)
    stats = analyze(text, num_devices)
    return CompiledProgram(program.name, memory.argument_size_in_bytes, memory.output_size_in_bytes,
                           memory.alias_size_in_bytes, memory.temp_size_in_bytes,
                           memory.generated_code_size_in_bytes, program.resident, stats.flops, stats.collectives,
                           stats.unknown_loops)


# ------------------------------------------------------------------------------------------------ report
def estimate_step(compiled: CompiledProgram, model_flops: float, chip: Chip) -> dict[str, float]:
    """An estimate, not a measurement: every matmul at the chip's peak bf16 FLOP/s plus every collective's
    traffic at the chip's full ICI bandwidth, without overlap; MFU = model FLOPs ÷ (time × peak)."""
    compute_s = compiled.flops / chip.peak_bf16_flops
    comm_s = sum(s.traffic_bytes for s in compiled.collectives.values()) / chip.ici_bytes_per_s
    step_s = compute_s + comm_s
    return {"compute_s": compute_s, "comm_s": comm_s, "step_s": step_s,
            "mfu": model_flops / (step_s * chip.peak_bf16_flops) if step_s else 0.0}


def gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB" if x >= GiB / 10 else f"{x / 2**20:.1f} MiB"


def report(plan: Plan, compiled: list[CompiledProgram], slc: Slice, cfg) -> str:
    """The plan printed per chip."""
    chip, train = slc.chip, compiled[0]  # the train step when it compiled, else the first program that did
    mc = plan.model_config
    lines = [f"rpo-plan: {slc.accelerator} = {slc.num_chips} chips ({slc.topology_name}), mesh "
             f"{plan.mesh_shape}; "
             f"{mc.model_type} {mc.num_params() / 1e9:.2f}B parameters, {mc.num_layers} layers; "
             f"references: {plan.num_references} {'in the step' if plan.in_step else 'cached'}",
             f"per chip: HBM {gib(chip.hbm_bytes)}"]
    for c in compiled:
        lines.append(f"  {c.name}: total {gib(c.total)} = arguments {gib(c.arguments)} + outputs not aliased "
                     f"{gib(c.outputs - c.aliased)} + temporaries {gib(c.temporaries)} + code {gib(c.code)}"
                     + (f" + held outside {gib(c.resident)}" if c.resident else ""))
    lines.append(f"  of which: parameters + optimizer state {gib(plan.state_bytes)}, references "
                 f"{gib(plan.reference_bytes)}{'' if plan.in_step else ' (held by the trainer, not the step)'}, "
                 f"batch {gib(plan.batch_bytes)}, train-step temporaries {gib(train.temporaries)}")
    lines.append(f"step FLOPs per chip: compiled HLO {train.flops:.3e} (matmuls, loops × trip counts); FLOP model "
                 f"{plan.model_flops_per_chip:.3e} (train_flops_per_token); ratio {train.flops / plan.model_flops_per_chip:.2f}"
                 + (f"; loops of unknown trip count counted once: {len(train.unknown_loops)}"
                    if train.unknown_loops else ""))
    lines.append("collectives per train step, per chip (from the compiled HLO):")
    lines.append(f"  {'kind':<20}{'count':>8}{'GiB':>12}{'est. ms':>10}")
    for kind in COLLECTIVES:
        s = train.collectives[kind]
        lines.append(f"  {kind:<20}{s.count:>8}{s.bytes / GiB:>12.3f}{1e3 * s.traffic_bytes / chip.ici_bytes_per_s:>10.2f}")
    est = estimate_step(train, plan.model_flops_per_chip, chip)
    lines.append(f"ESTIMATE (not a measurement; matmuls at the {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 peak, "
                 f"collectives at {chip.ici_bytes_per_s * 8 / 1e9:.0f} Gbps ICI, no overlap): step "
                 f"{est['step_s']:.2f} s (compute {est['compute_s']:.2f} s + communication {est['comm_s']:.2f} s), "
                 f"MFU {100 * est['mfu']:.1f} %")
    worst = max(compiled, key=lambda c: c.total)
    verdict = "fits" if worst.total <= chip.hbm_bytes else "does not fit"
    lines.append(f"{verdict}: needs {gib(worst.total)} of {gib(chip.hbm_bytes)} per chip on {slc.accelerator} "
                 f"({worst.name} of the programs compiled)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ command line
def _flag_values(argv: Sequence[str]) -> flags.FlagValues:
    values = flags.FlagValues()
    # sys_argv: config_flags reads the overrides to register from it (else from sys.argv, which is not `argv`
    # when rpo-plan runs in-process)
    config_flags.DEFINE_config_file("config", None, "Recipe file (configs/NAME.py).", flag_values=values,
                                    lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("topology", None, "Cloud TPU accelerator type: v5p-64, v4-32, v5litepod-16 / v5e-16, "
                        "v6e-8, ...", flag_values=values)
    flags.DEFINE_integer("responses", 2, "K: responses per example in the data (2 for pairs).", flag_values=values)
    flags.DEFINE_string("dump_hlo", "", "A directory: write each program's compiled HLO text there.",
                        flag_values=values)
    try:
        values(list(argv))
    except (KeyError, AttributeError) as e:  # an override naming no field of the config
        raise unknown_field_error(e) from e
    if values.config is None or not values.topology:
        raise ValueError("--config and --topology are required (rpo-plan --config CONFIG --topology v5p-64)")
    if values.responses < 1:
        raise ValueError(f"--responses={values.responses}: expected a positive number")
    return values


def run(argv: Sequence[str]) -> int:
    """rpo-plan's body: the exit status (0 fits, 1 does not fit, 2 bad usage)."""
    try:
        values = _flag_values(argv)
        cfg, slc = values.config, parse_slice(values.topology)
        devices = slice_devices(slc)
        plan = build_programs(cfg, devices, values.responses)
    except (ValueError, OSError, KeyError, AttributeError, TypeError, flags.Error) as e:
        print(f"rpo-plan: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    compiled, failures = [], []
    for program in plan.programs:
        try:
            c = compile_program(program, slc.num_chips, values.dump_hlo)
        except DoesNotFit as e:
            failures.append(e)
            continue
        compiled.append(c)
        if c.total > slc.chip.hbm_bytes:
            failures.append(DoesNotFit(c.name, c.total, slc.chip.hbm_bytes))
    if compiled:
        print(report(plan, compiled, slc, cfg))
    for e in failures:
        print(f"rpo-plan: {e.program}: does not fit: needs {e.needed / GiB:.1f} GiB of {e.capacity / GiB:.1f} "
              f"GiB per chip on {slc.accelerator}")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(sys.argv if argv is None else argv))
