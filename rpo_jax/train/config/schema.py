"""The run configuration as typed, validated pydantic models: one section per config group, `RunConfig` on top.

Why pydantic v2 (the choice MaxText's `configs/types.py` makes): every option has one declared type, a default and
a description next to each other, so the schema is the documentation (`RunConfig.model_json_schema()` gives the
JSON schema for free, descriptions included); the models are frozen (a run cannot change its own config behind
the identity it recorded) and `extra="forbid"` (a misspelt key is an error with a suggestion, never a silent
default); ranges and enumerations are in the types (`Literal[...]`, `Field(ge=...)`), and the rules that relate
several fields are `model_validator`s beside those fields. Strict types: an integer field takes an int (not
True, not 3.0), a float field a number, a flag a bool (the command line's strings are parsed by
`ml_collections` per field type first). Nothing here reads a file, builds a model or looks at
the devices: those checks stay where the data, models and mesh are (the tokenizer, mesh sizes against the device
count, a LoRA adapter directory, the score window against the data).

`rpo_jax.train.config.validation.validate` turns an `ml_collections.ConfigDict` (a recipe, `--config.*`
overrides, `--from-trl`, a run's config.json) into a `RunConfig` and every refusal into one line naming the key
path, the value and what is allowed. `rpo_jax.train.config.defaults.base_config()` is generated from these
defaults. The meaning of 0 for a count is stated in its description.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import optax
from pydantic import BeforeValidator, ConfigDict, Field, model_serializer, model_validator

from rpo_jax.data.tokenize import TRUNCATION_POLICIES
from rpo_jax.models.config import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from rpo_jax.train.config.context_checks import check_context
from rpo_jax.train.config.eval_section import EvalSection
from rpo_jax.train.config.loss_terms import check_loss_inputs, loss_spec, loss_terms
from rpo_jax.train.config.sections import (
    ExportSection,
    MeshSection,
    MetricsSection,
    OnlineSection,
    RewardModelSection,
    Section,
    TrainSection,
)
from rpo_jax.train.config.values import (
    MODES,
    ConfigError,
    Packing,
    parse_packing,
    parse_pairs,
    parse_score_window,
    parse_vocab_chunk,
)

#: optax optimizers that take a decoupled weight decay (`config.optimizer.weight_decay`).
WEIGHT_DECAY_OPTIMIZERS = ("adamw", "lion", "adafactor", "lamb", "novograd", "adamaxw", "nadamw")

PairsOrKeep = Annotated[Literal["", "best_vs_worst", "all_pairs"], BeforeValidator(parse_pairs)]
PackingSetting = Annotated[Packing, BeforeValidator(parse_packing)]
ScoreWindow = Annotated[Literal["auto", "off"] | Annotated[int, Field(ge=1)], BeforeValidator(parse_score_window)]
VocabChunk = Annotated[Literal["auto"] | Annotated[int, Field(ge=0)], BeforeValidator(parse_vocab_chunk)]


# ------------------------------------------------------------------------------------------------ model
class LoraSection(Section):
    """LoRA (rpo_jax.models.lora; README "LoRA"): rank > 0 trains low-rank adapters y = x·W + (alpha/rank)·(x·A)·B
    on the frozen base; the train state, optimizer and checkpoints hold the adapters only. The primary reference
    (config.references empty, or entry 0 with an empty path) is then the base with the adapters switched off."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    rank: int = Field(0, ge=0, description="0: LoRA off (full fine-tuning); > 0: the adapters' rank r")
    alpha: float = Field(16.0, gt=0, description="the adapters' scale s = alpha / rank")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="inverted dropout on each adapter's input during training steps, in [0, 1) (0: none)",
    )
    targets: str = Field(
        "all-linear",
        min_length=1,
        description='"all-linear" (q,k,v,o,gate,up,down_proj) | '
        'comma-separated module names ("q_proj,v_proj", PEFT\'s target_modules list) | a regex '
        'fully matched against "model.layers.{i}.self_attn.q_proj"-style paths',
    )
    init_from: str = Field(
        "",
        description="a PEFT adapter directory (adapter_config.json + "
        "adapter_model.safetensors, e.g. TRL SFT output) to start from (turns LoRA on): rank, "
        "alpha and targets come from it; any of them set here to other than its default must "
        "agree with the adapter's (else a one-line error). dropout stays this config's. "
        "Empty: fresh adapters",
    )
    reference: Literal["base", "initial"] = Field(
        "base",
        description='the primary reference with LoRA: "base" '
        "(adapters off; TRL's choice for a PEFT model without ref_model)"
        ' | "initial" (base + the adapters the run starts from, e.g. '
        "init_from's SFT adapter; a copy of the adapters only)",
    )
    base_dtype: Literal["", "int8", "int4"] = Field(
        "",
        description='"" (model.param_dtype) | "int8" | "int4": the '
        "frozen base stored quantized (QLoRA, rpo_jax.models.quantize)",
    )

    @model_validator(mode="after")
    def _quantized_base_needs_lora(self):
        if self.base_dtype and not (self.rank or self.init_from):
            raise ConfigError(
                f"config.model.lora.base_dtype={self.base_dtype!r} quantizes the frozen base of LoRA "
                "training; set config.model.lora.rank > 0 (or init_from)"
            )
        return self


class ModelSection(Section):
    """The policy: a Hugging Face checkpoint directory (or hub id), or a random init from `init`."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    path: str = Field(
        "", description="Hugging Face directory / hub id; empty: random init from model.init (quickstart)"
    )
    architecture: str | None = Field(
        None,
        description="None, or the path of a Hugging Face config.json "
        "describing model.path's architecture, used when model.path cannot be read (a "
        "hub id on a machine without the hub, e.g. `rpo-plan`): "
        "configs/architectures/<name>.json",
    )
    init: dict[str, Any] = Field(
        default_factory=lambda: {"model_type": "llama"},
        description="Hugging Face-style config fields of a random init (free-form; "
        "checked by rpo_jax.models when the model is built)",
    )
    init_seed: int = Field(0, ge=0, description="seed of the random init (0 is a seed like any other)")
    tokenizer: str = Field(
        "", description="tokenizer directory / hub id; empty: model.path (or the demo's character tokenizer)"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description='compute dtype: "auto" = float32 on CPU, bfloat16 on GPU/TPU'
    )
    param_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="master weights (and optimizer state) dtype"
    )
    remat: Literal[REMAT_POLICIES] = Field(
        "none", description="rematerialisation policy of the layers (rpo_jax.models.config.REMAT_POLICIES)"
    )
    scan_unroll: int = Field(1, ge=1, description="layers per scan iteration (speed only, same results; 1 with remat)")
    attention: Literal[ATTENTION_IMPLEMENTATIONS] = Field(
        "auto",
        description='attention implementation (speed only; README "Attention implementations"): "xla" '
        '(dense masks), "blockwise" (online softmax over key blocks: memory linear in the row length), "cudnn" '
        '(NVIDIA GPUs), "splash" (TPUs); "auto" is the backend\'s fused kernel when it supports the model and '
        "batch, else (CPU, GPU) blockwise for rows of 512 tokens or more, else XLA",
    )
    vocab_chunk_size: VocabChunk = Field(
        "auto",
        description="log-softmax over the vocabulary in chunks of this many rows of the head (≥ V: one); 0: off "
        '(one log-softmax); "auto": chunks of 8192 where a head\'s float32 logits pass 256 MiB '
        "(rpo_jax.models.logprobs.auto_vocab_chunk)",
    )
    score_window: ScoreWindow = Field(
        "auto",
        description="logit positions per sequence given to the output head: "
        '"auto" (the longest response of the data, rounded up to 16), "off" (every '
        'position; also "", 0), or a number ≥ 1 that must cover the longest '
        "response (checked against the data)",
    )
    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA adapters (config.model.lora)")


class ReferenceSpec(Section):
    """One entry of `config.references`. Serialised with the keys it was given (the run identity hashes the
    entries as they were written)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    path: str = Field("", description='Hugging Face directory / hub id of the reference; "" = the initial policy')
    tokenizer: str = Field("", description='its tokenizer; "" = the policy\'s when path is empty, else its path')
    architecture: str | None = Field(
        None,
        description="None, or a Hugging Face config.json of path's architecture (rpo-plan, when path cannot be read)",
    )

    @model_serializer(mode="wrap")
    def _as_given(self, handler):
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


class ReferenceSyncSection(Section):
    """References that move (TR-DPO, Gorbatovski et al. 2024; TRL's sync_ref_model / ref_model_sync_steps /
    ref_model_mixup_alpha): after every `every`-th optimizer step (global step s = N, 2N, ...) the primary
    reference becomes mix·θ + (1 − mix)·θ_ref with θ the parameters after that step; step s+1 scores with it.
    Preference training only; needs in-step references and a primary reference of the policy's tokenizer and
    parameter shapes; the reference's weights are checkpointed. rpo_jax.train.step.steps.sync_reference"""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    every: int = Field(0, ge=0, description="optimizer steps between syncs; 0: off (the reference stays)")
    mix: float = Field(1.0, gt=0, le=1, description="α in (0, 1]: θ_ref ← α·θ + (1 − α)·θ_ref (1: a hard copy)")


# ------------------------------------------------------------------------------------------------ data
class DataSection(Section):
    """The records, how they are paired, tokenized, batched and packed."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    train: str = Field("", description='file(s)/dir, comma-separated; "demo" (or ""): the bundled demo task')
    eval: str = Field(
        "",
        description='held-out file(s); empty: the demo test split when train is "demo", else '
        "eval_fraction of train (split by seed), else no evaluation",
    )
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="the fraction of train held out for evaluation when data.eval is empty; 0: none"
    )
    format: str = Field(
        "",
        description='record format of every file; "" = detected per file (names: '
        "rpo_jax.data.FORMATS, checked when the files are read)",
    )
    pairs: PairsOrKeep = Field(
        "",
        description='"" keeps the K responses | "best_vs_worst" | "all_pairs": derive '
        'pairs from K rewarded responses (rpo_jax.data.to_pairs; aliases "best_worst", '
        '"all"; a record whose rewards all tie gives none: counted, logged)',
    )
    max_length: int = Field(512, ge=1, description="longest prompt + response in tokens")
    max_prompt_length: int = Field(
        256, ge=0, description="longest prompt in tokens; 0: no limit of its own (prompt + response ≤ max_length only)"
    )
    truncation: Literal[TRUNCATION_POLICIES] = Field(
        "drop",
        description='what a too long record becomes: "drop" | "truncate_prompt" | "truncate_response" | '
        '"keep_start" (TRL 1.16\'s: each prompt + response keeps its first max_length tokens; a prompt that fills '
        "max_length drops the record, counted)",
    )
    pairs_from: Literal["labels", "rewards"] = Field(
        "labels",
        description="what orders a labelled pair (TRL / NeMo formats) for a preference-only loss: "
        '"labels" (chosen over rejected, as TRL trains it; its scores only reach reward-aware losses) | "rewards" '
        "(the scores decide; ties contribute 0). K-response records have no labels: rewards rank them either way "
        "(rpo_jax.data.selection.rewards_reach_loss)",
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise", description='a bad record: "raise" | "skip" (counted and reported)'
    )
    batch_size: int = Field(8, ge=1, description="global batch (prompts; pairs for a reward model) per optimizer step")
    micro_batches: int = Field(
        1,
        ge=1,
        description="gradient accumulation inside the step: the batch in this many "
        "micro-batches (1: none); divides batch_size",
    )
    packing: PackingSetting = Field(
        "auto",
        description="rpo_jax.data.packing (docs: concepts/packing): "
        '"auto" packs a batch when that saves ≥ 5 % of its cost — slots, attention and the output head\'s '
        "positions (padded on a CPU mesh of several devices), True packs every batch, False never; the "
        "same log-probs as padded batches; micro-batches are packed each in their own "
        'rows. Command-line strings "true" / "false" / "auto" are accepted',
    )
    share_prompt: PackingSetting = Field(
        "auto",
        description="one copy of an example's prompt before its K "
        'responses in packed rows: "auto" (unless a reference has its own '
        "tokenizer), True (such a reference is refused; needs packing), False",
    )
    pack_length: int = Field(
        0,
        ge=0,
        description="slots per packed row; 0: a length chosen per batch; else ≥ the "
        "longest sequence (data.max_length; online: max_prompt_length + "
        "online.max_new_tokens)",
    )
    unpair: bool = Field(
        False,
        description="unpaired losses (kto, apo_zero_unpaired, bco): read labelled pairs as two unpaired records "
        "each, the chosen desirable and the rejected undesirable (TRL's unpair_preference_dataset, which KTOTrainer "
        "applies to paired data); False: a file of pairs is refused",
    )
    unpair_block: int = Field(
        1000,
        ge=1,
        description="with data.unpair: pairs per block of the unpaired order, each block's desirable records then "
        "its undesirable ones (1000: TRL's, datasets.map's batch; batch_size / 2 mixes the labels in every batch of "
        "a file-order run)",
    )
    eval_batch_size: int = Field(16, ge=1, description="examples per evaluation (and reference-cache) batch")
    shuffle: bool = Field(True, description="shuffle the train examples (per epoch, from seed); False: file order")

    @model_validator(mode="after")
    def _batches(self):
        if self.batch_size % self.micro_batches:
            raise ConfigError(
                f"config.data.batch_size={self.batch_size} is not divisible by "
                f"config.data.micro_batches={self.micro_batches} (each micro-batch takes "
                "batch_size / micro_batches examples)"
            )
        if self.share_prompt is True and self.packing is False:
            raise ConfigError(
                "config.data.share_prompt=True needs config.data.packing=True or 'auto' (the prompt "
                "is shared inside a packed row)"
            )
        return self


# ------------------------------------------------------------------------------------------------ loss, optimizer
class LossSection(Section):
    """The objective: any loss of rpo_jax.losses by name, its hyperparameters, weighted extra terms."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    name: str = Field("dpo", description="any name of rpo_jax.losses.available_losses()")
    hparams: dict[str, Any] = Field(
        default_factory=lambda: {"beta": 0.1},
        description="the loss's hyperparameters (rpo_jax.losses.loss_hyperparameters"
        "(name) lists them; each checked by the loss registry, e.g. beta > 0)",
    )
    extra: list[Any] = Field(
        default_factory=list,
        strict=False,
        description='weighted extra terms: [["sft", 0.05, {}], ...] ([name, weight] or [name, weight, {hparams}])',
    )
    weight: float = Field(1.0, description="the main term's weight (TRL's loss_weights[0])")

    @model_validator(mode="after")
    def _known_losses(self):
        loss_spec(self.terms())
        return self

    def terms(self) -> list[tuple[str, float, dict]]:
        """The weighted terms `make_loss` takes, the main term first."""
        return loss_terms(self.name, self.weight, self.hparams, self.extra)


class OptimizerSection(Section):
    """Optimizer and learning-rate schedule (rpo_jax.train.build.optim, optax)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    name: str = Field(
        "adamw", description='"adamw", or any optax optimizer by name ("adam", "sgd", "lion", "adafactor", ...)'
    )
    learning_rate: float = Field(1e-6, ge=0, description="peak learning rate")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine",
        description="after a linear warm-up from 0: cosine or linear decay to "
        "learning_rate·end_lr_factor, or constant (transformers' schedules of the same names)",
    )
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up; 0: none")
    warmup_ratio: float = Field(
        0.0,
        ge=0,
        le=1,
        description="> 0: warm up over ceil(warmup_ratio · total steps) "
        "instead of warmup_steps (TRL's warmup_ratio); 0: off",
    )
    end_lr_factor: float = Field(
        0.0, ge=0, description="final learning rate as a fraction of the peak (cosine / linear)"
    )
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="decoupled weight decay (adamw, lion, ...), applied where weight_decay_mask allows; 0: none",
    )
    weight_decay_mask: Literal["matrices", "all", "none"] = Field(
        "matrices", description='"matrices": decay ≥2-D weights, not norms/biases/scalars | "all" | "none"'
    )
    grad_clip_norm: float | None = Field(1.0, ge=0, description="global-norm clipping threshold; 0 or None: off")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments of the optax optimizer (b1, b2, eps, momentum, ...)"
    )

    @model_validator(mode="after")
    def _an_optax_optimizer(self):
        if not callable(getattr(optax, self.name, None)):
            raise ConfigError(f"config.optimizer.name={self.name!r}: not an optax optimizer")
        if self.weight_decay and self.name not in WEIGHT_DECAY_OPTIMIZERS:
            raise ConfigError(
                f"config.optimizer.weight_decay={self.weight_decay} is not supported by "
                f"optax.{self.name}; use one of {', '.join(WEIGHT_DECAY_OPTIMIZERS)} or set 0"
            )
        return self


# ------------------------------------------------------------------------------------------------ the run
class RunConfig(Section):
    """A run's whole configuration: recipes (configs/NAME.py) start from these defaults, `--config.*` overrides
    any field."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    seed: int = Field(
        0, ge=0, description="seed of data order, held-out split, dropout and sampling (0 is a seed like any other)"
    )
    mode: Literal[MODES] = Field(
        "preference",
        description='"preference": offline preference training; "online": '
        'sample K per prompt, score, update (config.online); "reward_model": Bradley–Terry '
        "reward model on pairs (config.reward_model)",
    )
    model: ModelSection = Field(default_factory=ModelSection, description="the policy (config.model)")
    references: tuple[ReferenceSpec, ...] = Field(
        (),
        strict=False,
        description="empty: one reference, a frozen copy of the initial policy; else R entries "
        '{path, tokenizer, architecture}, index 0 the primary ("" path = the initial policy)',
    )
    reference_mode: Literal["auto", "cache", "in_step"] = Field(
        "auto",
        description='"cache" (precompute [N,K,R] once) | "in_step" | "auto" (cache; in_step when '
        "reference_sync.every > 0)",
    )
    reference_cache_dir: str = Field("", description="where cached reference log-probs live; empty: WORKDIR/ref_cache")
    reference_sync: ReferenceSyncSection = Field(
        default_factory=ReferenceSyncSection, description="references that move (TR-DPO)"
    )
    data: DataSection = Field(default_factory=DataSection, description="records, pairs, lengths, batches, packing")
    loss: LossSection = Field(default_factory=LossSection, description="the loss and its hyperparameters")
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection, description="optimizer and schedule")
    train: TrainSection = Field(default_factory=TrainSection, description="length, cadence, resume, divergence")
    online: OnlineSection = Field(default_factory=OnlineSection, description='mode="online" settings')
    reward_model: RewardModelSection = Field(
        default_factory=RewardModelSection, description='mode="reward_model" settings'
    )
    mesh: MeshSection = Field(default_factory=MeshSection, description="the device mesh")
    cpu_reuse_memory: bool = Field(
        True,
        description="CPU only: keep XLA:CPU's per-step temporary buffer mapped "
        "between steps (rpo_jax.train.runtime.cpu_memory): 13-23 % faster steps here, "
        "for a process that keeps its peak heap; rpo-train applies it at start-up",
    )
    metrics: MetricsSection = Field(default_factory=MetricsSection, description="MFU peak, TensorBoard")
    eval: EvalSection = Field(default_factory=EvalSection, description="generation-based evaluation (win rates)")
    export: ExportSection = Field(default_factory=ExportSection, description="how exports are written (shards)")

    @model_validator(mode="after")
    def _reference_sync(self):
        every, mix = self.reference_sync.every, self.reference_sync.mix
        if not every:
            return self
        where = f"config.reference_sync.every={every}"
        if self.mode != "preference":
            raise ConfigError(
                f"{where}: reference sync (TR-DPO) is a setting of preference training; "
                f"config.mode={self.mode!r} does not use it (set it to 0)"
            )
        if self.reference_mode == "cache":
            raise ConfigError(
                f"{where} needs references scored in the step: reference_mode='cache' would keep the "
                "log-probs of a reference that moves (stale); use reference_mode='in_step' or 'auto'"
            )
        if (self.model.lora.rank or self.model.lora.init_from) and mix != 1.0:
            raise ConfigError(
                f"config.reference_sync.mix={mix} with LoRA (config.model.lora): only mix=1 is exact "
                "(the reference's adapters become a copy of the policy's); α·θ + (1 − α)·θ_ref of "
                "adapter factors is not the weight mix (B_mix·A_mix ≠ α·B·A + (1 − α)·B_ref·A_ref)"
            )
        if not loss_spec(self.loss.terms()).requires_reference:
            raise ConfigError(
                f"{where}: loss {self.loss.name!r} uses no reference, so there is none to move; set "
                "reference_sync.every=0"
            )
        return self

    @model_validator(mode="after")
    def _loss_inputs(self):
        check_loss_inputs(self)
        return self

    @model_validator(mode="after")
    def _context(self):
        check_context(self)
        return self

    @model_validator(mode="after")
    def _pack_length(self):
        data = self.data
        if not data.pack_length or data.packing is False or self.mode == "reward_model":
            return self
        if self.mode == "online":
            longest = data.max_prompt_length + self.online.max_new_tokens
            what = "config.data.max_prompt_length + config.online.max_new_tokens"
        else:
            longest, what = data.max_length, "config.data.max_length"
        if data.pack_length < longest:
            raise ConfigError(
                f"config.data.pack_length={data.pack_length} is shorter than the longest sequence "
                f"({longest} tokens: {what}); use 0 (rows sized per batch) or more"
            )
        return self

    @model_validator(mode="after")
    def _context_rows(self):
        """mesh.context = C > 1 cuts every row into 2C chunks (the zig-zag layout of ring attention): the row
        lengths set here (data.max_length; data.pack_length when set) must be multiples of 2C. Checked here, before
        anything is built; context = -1 is known only with the devices (the layout's error). Online mode does not
        compose with a context axis at all (`context_checks`)."""
        shards = self.mesh.context
        if shards <= 1 or self.mode == "online":
            return self
        rows = [(self.data.max_length, "config.data.max_length")]
        if self.data.pack_length and self.data.packing is not False:
            rows.append((self.data.pack_length, "config.data.pack_length"))
        for length, what in rows:
            if length % (2 * shards):
                raise ConfigError(
                    f"{what}={length} is not a multiple of 2 × config.mesh.context = {2 * shards} (ring attention "
                    "cuts every row into 2 × context chunks)"
                )
        return self

    @model_validator(mode="after")
    def _online(self):
        if self.mode != "online":
            return self
        oc = self.online
        if bool(oc.reward_judge) == bool(oc.reward_model):
            raise ConfigError(
                "config.online: set exactly one of reward_judge ('module:function') and reward_model "
                f"(a reward-model directory); got reward_judge={oc.reward_judge!r}, "
                f"reward_model={oc.reward_model!r}"
            )
        if oc.prompts_per_iteration % self.data.batch_size:
            raise ConfigError(
                f"config.online.prompts_per_iteration={oc.prompts_per_iteration}: expected a multiple "
                f"of data.batch_size={self.data.batch_size} (the mini-batch of an update)"
            )
        spec = loss_spec(self.loss.terms())
        if oc.num_samples < 2 and (spec.requires_rewards or spec.requires_reference):
            raise ConfigError(
                f"config.online.num_samples={oc.num_samples}: expected ≥ 2 for a preference loss "
                f"({self.loss.name!r} compares samples)"
            )
        if self.references and self.references[0].path:
            raise ConfigError(
                f"config.references[0] must have an empty path in online mode (path="
                f"{self.references[0].path!r}): the primary reference is config.online.reference; "
                "list fixed extra references (MRPO) after it"
            )
        policy_tokenizer = self.model.tokenizer or self.model.path
        for i, ref in enumerate(self.references[1:], start=1):
            if ref.tokenizer and ref.tokenizer != policy_tokenizer:
                raise ConfigError(
                    f"config.references[{i}].tokenizer={ref.tokenizer!r}: online mode scores the samples as the "
                    f"policy's token ids, so a reference shares the policy's tokenizer "
                    f"({policy_tokenizer or 'the demo tokenizer'}); leave it empty"
                )
        return self

    @model_validator(mode="after")
    def _generation_eval(self):
        if self.eval.generation.every and self.mode not in ("preference", "online"):
            raise ConfigError(
                f"config.eval.generation.every={self.eval.generation.every}: generation-based evaluation runs in "
                f"preference and online training; config.mode={self.mode!r} trains no policy that writes"
            )
        return self

    @model_validator(mode="after")
    def _reward_model(self):
        if self.mode == "reward_model" and self.data.truncation not in ("drop", "truncate_prompt"):
            raise ConfigError(
                f"config.data.truncation={self.data.truncation!r}: reward-model training supports "
                "'drop' and 'truncate_prompt' (keep the last max_length tokens); 'truncate_response' "
                "would drop the token whose hidden state is scored"
            )
        return self
