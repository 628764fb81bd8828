"""The typed sections of the jobs other than preference training and of the run's surroundings: online RPO
(`config.online`), reward models (`config.reward_model`), the device mesh (`config.mesh`) and metrics
(`config.metrics`); the rest of the schema is `rpo_jax.train.config.schema`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from rpo_jax.models.hf_export import DEFAULT_MAX_SHARD_SIZE, parse_size
from rpo_jax.train.config.values import AUTO_MEMORY_FRACTION, PAIR_MODES, ConfigError, parse_memory_budget, parse_pairs

MESH_AXES = ("data", "fsdp", "tensor", "context")
Pairs = Annotated[Literal[PAIR_MODES], BeforeValidator(lambda v: parse_pairs(v, allow_keep=False))]


class Section(BaseModel):
    """A config group: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class OnlineSection(Section):
    """mode="online": each iteration samples `num_samples` responses to `prompts_per_iteration` prompts of
    data.train with the current policy, scores them with the reward source, and takes `updates_per_iteration`
    optimizer steps of `loss` on them (mini-batches of data.batch_size prompts, cycled). train.steps is unused."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    iterations: int = Field(20, ge=1, description="online iterations (sample, score, update)")
    prompts_per_iteration: int = Field(
        16, ge=1, description="prompts sampled per iteration; a multiple of data.batch_size"
    )
    num_samples: int = Field(4, ge=1, description="K responses per prompt (≥ 2 for a preference loss)")
    updates_per_iteration: int = Field(4, ge=1, description="optimizer steps per iteration")
    max_new_tokens: int = Field(32, ge=1, description="longest sampled response in tokens")
    temperature: float = Field(1.0, ge=0, description="sampling temperature; 0: greedy")
    top_k: int = Field(0, ge=0, description="top-k filtering; 0: none")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus filtering; 1.0: none")
    stop_strings: tuple[str, ...] = Field(
        (), strict=False, description="besides EOS: stop a response at any of these strings"
    )
    reference: Literal["initial", "previous_iterate", "current"] = Field(
        "initial",
        description='"initial" | "previous_iterate" (reset every iteration) | "current" (the '
        "stop-gradient of the policy)",
    )
    sampler: Literal["policy", "initial"] = Field(
        "policy", description='"policy": online; "initial": every sample from the initial policy (offline)'
    )
    reward_judge: str = Field(
        "",
        description='"module:function" judge(prompt_text, response_text) -> float, e.g. '
        '"rpo_jax.data.demo:judge" (exactly one of reward_judge and reward_model)',
    )
    reward_model: str = Field("", description="or: a Hugging Face sequence-classification reward model directory")
    eval_judge: str = Field(
        "",
        description='ground-truth judge logged at eval ("" = reward_judge); may differ '
        "from the training reward (a learned reward model)",
    )
    eval_prompts: int = Field(
        64, ge=0, description="held-out prompts (data.eval) sampled once each at eval; 0: no sampling at eval"
    )
    eval_every: int = Field(
        5, ge=0, description="iterations between evaluations; 0: only before the first and after the last"
    )


class RewardModelSection(Section):
    """mode="reward_model" (rpo_jax.train.jobs.reward_model): a Bradley–Terry reward model on pairs from
    config.data, exported as a Hugging Face XForSequenceClassification checkpoint. loss.*, references*,
    reference_mode and data.max_prompt_length do not apply; data.truncation is "drop" or "truncate_prompt"."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    pairs: Pairs = Field(
        "all_pairs",
        description='with rewards: "all_pairs" (i, j) with r_i > r_j | '
        '"best_vs_worst" (aliases "all", "best_worst"); ties give none. K = 2 without rewards: '
        "response 0 chosen; K > 2 without: an error",
    )
    center_coefficient: float = Field(
        0.0, ge=0, description="TRL's center_rewards_coefficient: + λ·(s_chosen + s_rejected)²; 0: off"
    )
    margin_scale: float = Field(
        0.0, ge=0, description="> 0: margin m = margin_scale·(r_chosen − r_rejected) in −log σ(Δs − m); 0: no margin"
    )
    label: int = Field(0, ge=0, description="the score column trained, counted from 0 (a fresh head has one label, 0)")


class MeshProcesses(Section):
    """How many processes (hosts) each mesh axis spans, `rpo_jax.models.sharding.make_mesh(processes=...)`: axis a
    of size s is split into `processes.a` processes × s / `processes.a` devices inside each. All 1 (the default):
    `jax.make_mesh`'s order, in which the first axes (data, then fsdp, ...) span the processes; otherwise the counts
    multiply to the number of processes."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    data: int = Field(1, ge=1, description="processes the data axis spans")
    fsdp: int = Field(1, ge=1, description="processes the fsdp axis spans")
    tensor: int = Field(1, ge=1, description="processes the tensor axis spans")
    context: int = Field(1, ge=1, description="processes the context axis spans (its ring's hops then cross hosts)")


class MeshSection(Section):
    """The device mesh: sizes of the (data, fsdp, tensor, context) axes multiplying to the device count, one of
    them may be -1 (filled in), and which axes span processes. A mesh given without an axis has size 1 there (as
    `rpo_jax.models.sharding.make_mesh` reads it); no mesh at all is the default, {data: -1, fsdp: 1, tensor: 1}."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    data: int = Field(-1, description="data-parallel axis size (batches split over data × fsdp); -1: the rest")
    fsdp: int = Field(1, description="fully sharded axis (parameters' embed dimension); -1: the rest")
    tensor: int = Field(1, description="tensor-parallel axis (heads, mlp, vocab); -1: the rest")
    context: int = Field(
        1,
        description="context-parallel axis: every row's tokens split over this many devices, attention across them "
        "by ring attention (row lengths a multiple of 2 × context); 1: off; -1: the rest",
    )
    processes: MeshProcesses = Field(
        default_factory=MeshProcesses,
        description="how many processes each mesh axis spans (e.g. processes.context=2 on 2 hosts: the two context "
        "shards of every row on different hosts, which then feed the same rows); all 1: jax.make_mesh's order",
    )

    @model_validator(mode="before")
    @classmethod
    def _missing_axis_is_one(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data:  # MeshSection(): the defaults
            return {**{axis: 1 for axis in MESH_AXES}, **data}
        return data

    @model_validator(mode="after")
    def _sizes(self):
        sizes = {axis: getattr(self, axis) for axis in MESH_AXES}
        for axis, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(f"config.mesh.{axis}={size}: expected a size ≥ 1 or -1 (the rest)")
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"config.mesh={sizes}: only one axis may be -1")
        for axis in MESH_AXES:
            n, size = getattr(self.processes, axis), sizes[axis]
            if size != -1 and size % n:
                raise ConfigError(
                    f"config.mesh.processes.{axis}={n}: config.mesh.{axis}={size} is not a multiple of {n}"
                )
        return self


class MetricsSection(Section):
    """What is measured and where it is written."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    peak_flops: float = Field(
        0.0, ge=0, description="one chip's peak FLOP/s (MFU = FLOP/s ÷ (peak × chips)); 0: measure a matmul at start-up"
    )
    tensorboard: bool = Field(True, description="also write TensorBoard files (WORKDIR/tensorboard)")


def parse_shard_size(value: Any) -> str:
    """`config.export.max_shard_size`: a size string ("5GB", "500MB", "2GiB") kept as written, or a byte count
    (a positive int, kept as its decimal string); a ConfigError naming the key otherwise."""
    try:
        parse_size(value, "config.export.max_shard_size")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return str(value).strip()


class ExportSection(Section):
    """How exports are written (rpo_jax.train.core.export; rpo_jax.models.hf_export streams them tensor by tensor
    into Hugging Face's sharded safetensors layout)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    max_shard_size: Annotated[str, BeforeValidator(parse_shard_size)] = Field(
        DEFAULT_MAX_SHARD_SIZE,
        description='largest safetensors shard of an export, a size string ("5GB", "500MB": powers of 10, as '
        'transformers reads it; "2GiB": powers of 2) or bytes; more weights than this are split into '
        "model-0000i-of-0000n.safetensors + model.safetensors.index.json; default save_pretrained's",
    )


# ------------------------------------------------------------------------------------------------ training
def checked_memory_budget(value: Any) -> str:
    """`config.train.memory_budget` (`parse_memory_budget`), its refusal a ConfigError naming the key."""
    try:
        return parse_memory_budget(value)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class TrainSection(Section):
    """Length and cadence of a run, and its safety settings (rpo_jax.train.core.runner)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    steps: int = Field(
        100,
        ge=0,
        description='optimizer steps (per iteration; unused by mode="online"); 0: none '
        "(the initial model is evaluated, checkpointed and exported)",
    )
    epochs: float = Field(
        0.0,
        ge=0,
        description="> 0: train.steps = ceil(epochs · ceil(N / data.batch_size)) for "
        "the N train examples left after tokenization (TRL's count of num_train_epochs); 0: "
        "train.steps decides",
    )
    iterations: int = Field(
        1,
        ge=1,
        description="> 1: iterated training, the reference reset to the previous "
        "iterate every train.steps steps; 1: one pass",
    )
    log_every: int = Field(
        10, ge=1, description="units (steps; online: iterations) between metric records, and the last"
    )
    eval_every: int = Field(50, ge=0, description="units between evaluations; 0: only at the end")
    checkpoint_every: int = Field(
        50,
        ge=0,
        description="units between checkpoints (and at the end); 0: no "
        "periodic checkpoint — a run that exports at its end (export_at_end) keeps none, "
        "one that does not is checkpointed at its end for rpo-export; SIGTERM still "
        "saves",
    )
    keep_checkpoints: int = Field(3, ge=1, description="the newest checkpoints kept")
    async_checkpointing: bool = Field(True, description="save checkpoints in the background")
    export_at_end: bool = Field(
        True, description="write WORKDIR/export (Hugging Face directory with tokenizer) at the end"
    )
    progress_bar: bool = Field(True, description="a progress bar on the main process")
    resume: Literal["auto", "must", "never", "force"] = Field(
        "auto",
        description='a work directory with checkpoints of the same run (run_identity.json): "auto" resumes '
        'it, or starts fresh when there is none; "must" refuses to start fresh; "never" refuses a directory that '
        'has checkpoints; "force" resumes even when the run\'s identity changed (the differences are logged). A '
        "different run's checkpoints are never resumed silently nor deleted",
    )
    on_nonfinite: Literal["stop", "skip_step"] = Field(
        "stop",
        description='a NaN/inf loss or gradient norm: "stop" (exit non-zero, keep the last good '
        'checkpoint, never save the bad state) | "skip_step" (no update, counted)',
    )
    max_skipped_in_a_row: int = Field(
        10, ge=1, description='"skip_step": stop after this many non-finite steps (units) in a row'
    )
    memory_budget: Annotated[str, BeforeValidator(checked_memory_budget)] = Field(
        "auto",
        description="memory the run may use, checked before step 1 against XLA's memory analysis of its compiled "
        "programs (rpo_jax.train.build.fit; per device on an accelerator, for the process on the CPU): "
        f'"auto" ({AUTO_MEMORY_FRACTION:.0%} of what the machine has), a fraction of it ("0.8"), a size ("12GB": '
        'powers of 10; "12GiB": powers of 2), or 0: no check',
    )
    verify_weights: Literal["fingerprint", "full"] = Field(
        "fingerprint",
        description='how the run identity names the starting weights: "fingerprint" (config.json, safetensors '
        "headers, file sizes and sampled bytes of every tensor: milliseconds, and what it misses is in the README) "
        '| "full" (sha256 of every byte: reads the whole checkpoint on every process at every start)',
    )


#: Mesh axes of `config.mesh` (`rpo_jax.models.sharding.MESH_AXES`).
