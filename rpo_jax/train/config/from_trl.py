"""`rpo-train --from-trl FILE`: a TRL 1.16 `DPOConfig` (JSON or YAML) as the rpo_jax run configuration.

    rpo-train --from-trl dpo.yaml --config.model.path=HuggingFaceTB/SmolLM2-135M-Instruct \\
              --config.data.train=prefs.jsonl --workdir runs/from_trl

The file holds `DPOConfig` fields (what a TRL script passes to `DPOConfig(...)`, a `TrlParser` YAML, or
`DPOConfig.to_dict()` as JSON). Fields the file leaves out take TRL 1.16's defaults (`TRL_DEFAULTS`), as they
would in TRL, so the mapped run is the run TRL would do. Every field is one of:

* mapped onto config fields (`format_mapping` prints each: `max_length=1024 → data.max_length=1024`;
  `sync_ref_model=True` with `ref_model_sync_steps` / `ref_model_mixup_alpha` → `reference_sync.every` / `.mix`,
  TR-DPO at TRL's steps);
* without effect on what is trained (logging, saving, hub, data-loader workers ...: `NO_EFFECT`), listed as such;
* honoured only at TRL's default (`DEFAULT_ONLY`: `use_weighting`, `ld_alpha`, `f_divergence_type` ...), or
  never (`max_prompt_length`, `truncation_mode="keep_end"`, `fp16=True` ...): a one-line
  ValueError naming the file and the field;
* unknown (not a TRL 1.16 `DPOConfig` field): a ValueError naming it.

`--config.*` overrides apply on top of the mapped config (the model and the data come from them: a
`DPOConfig` names neither). The differences rpo_jax keeps from TRL are listed in
docs/guides/migrating_from_trl.md: the order of shuffled batches, and the rows of a gradient-accumulation micro-batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from rpo_jax.losses import loss_hyperparameters
from rpo_jax.train.config.defaults import base_config
from rpo_jax.train.config.from_trl_trainers import DPO_ONLY, TRAINER_KEY, TRAINER_NAMES, TRAINERS, TrainerFields

TRL_VERSION = "1.16.0"

#: TRL `loss_type` → rpo_jax loss name (TRL's formulas; `tests/losses/test_losses_trl.py` checks each).
LOSS_NAMES = {
    "sigmoid": "dpo",
    "hinge": "hinge",
    "ipo": "ipo",
    "exo_pair": "exo_pair",
    "nca_pair": "nca_pair",
    "robust": "robust",
    "bco_pair": "bco_pair",
    "sppo_hard": "sppo_hard",
    "aot": "aot",
    "aot_unpaired": "aot_unpaired",
    "apo_zero": "apo_zero",
    "apo_down": "apo_down",
    "discopop": "discopop",
    "sft": "sft",
    "sigmoid_norm": "sigmoid_norm",
}

#: TRL 1.16 (with transformers 5) defaults of every field `trl_to_config` maps.
TRL_DEFAULTS: dict[str, Any] = {
    "beta": 0.1,
    "loss_type": ["sigmoid"],
    "loss_weights": None,
    "label_smoothing": 0.0,
    "discopop_tau": 0.05,
    "max_length": 1024,
    "truncation_mode": "keep_start",
    "learning_rate": 1e-6,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "num_train_epochs": 3.0,
    "max_steps": -1,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "seed": 42,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "optim": "adamw_torch_fused",
    "precompute_ref_log_probs": False,
    "sync_ref_model": False,
    "ref_model_mixup_alpha": 0.6,
    "ref_model_sync_steps": 512,
    "bf16": True,
    "fp16": False,
    "gradient_checkpointing": True,
    "disable_dropout": True,
    "logging_steps": 10,
    "save_steps": 500,
    "eval_steps": None,
    "save_total_limit": None,
    "train_sampling_strategy": "random",
}

#: Fields honoured only at TRL's default (None, "", [] and {} count as the same empty default).
DEFAULT_ONLY: dict[str, Any] = {
    "ld_alpha": None,
    "f_divergence_type": "reverse_kl",
    "use_weighting": False,
    "router_aux_loss_coef": None,
    "label_smoothing_factor": 0.0,
    "neftune_noise_alpha": None,
    "data_seed": None,
    "dataloader_drop_last": False,
    "lr_scheduler_kwargs": None,
    "optim_args": None,
    "optim_target_modules": None,
    "auto_find_batch_size": False,
    "fsdp": None,
    "fsdp_config": None,
    "deepspeed": None,
    "model_init_kwargs": None,
    "use_liger_kernel": False,
    "liger_kernel_config": None,
    "activation_checkpointing": False,
    "activation_checkpointing_kwargs": None,
}

#: Fields that change nothing rpo_jax trains (logging, saving, hub, workers, speed-only switches).
NO_EFFECT = frozenset(
    """
output_dir run_name project report_to logging_dir logging_strategy logging_first_step logging_nan_inf_filter
log_level log_level_replica log_on_each_node disable_tqdm save_strategy save_on_each_node save_only_model
eval_strategy eval_delay eval_on_start eval_accumulation_steps eval_do_concat_batches eval_use_gather_object
prediction_loss_only batch_eval_metrics include_for_metrics include_num_input_tokens_seen push_to_hub hub_token
hub_model_id hub_private_repo hub_strategy hub_always_push hub_revision dataloader_num_workers dataloader_pin_memory
dataloader_persistent_workers dataloader_prefetch_factor dataloader_multiprocessing_context dataloader_in_order
dataset_num_proc remove_unused_columns label_names length_column_name ddp_backend ddp_broadcast_buffers
ddp_bucket_cap_mb ddp_find_unused_parameters ddp_static_graph ddp_timeout local_rank debug skip_memory_metrics
do_train do_eval do_predict resume_from_checkpoint restore_callback_states_from_checkpoint ignore_data_skip
enable_jit_checkpoint load_best_model_at_end metric_for_best_model greater_is_better trackio_space_id
trackio_bucket_id trackio_static_space_id use_cpu tf32 torch_compile torch_compile_backend torch_compile_mode
torch_empty_cache_steps padding_free pad_to_multiple_of precompute_ref_batch_size activation_offloading use_cache
accelerator_config parallelism_config full_determinism trust_remote_code gradient_checkpointing_kwargs
bf16_full_eval fp16_full_eval average_tokens_across_devices f_alpha_divergence_coef pad_token
""".split()
)

#: Fields a TRL 1.16 DPOConfig does not have, with what to do instead.
REMOVED = {
    "max_prompt_length": "not a field of TRL 1.16's DPOConfig (removed: TRL truncates prompt + completion to "
    "max_length only); drop it, or set --config.data.max_prompt_length yourself",
    "max_completion_length": "not a field of TRL 1.16's DPOConfig (removed); drop it",
}

SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_hf")


@dataclasses.dataclass(frozen=True)
class MappedField:
    """One line of the printed mapping: a TRL field, its value, and what it became in rpo_jax."""

    field: str
    value: Any
    target: str  # "loss.hparams.beta=0.1", or why nothing ("no effect: ...")

    def __str__(self) -> str:
        return f"  {self.field}={self.value!r} → {self.target}"


class TrlConfigError(ValueError):
    """A field rpo_jax cannot honour: `FILE: FIELD=VALUE: why`."""


# ------------------------------------------------------------------------------------------------ reading
def read_trl_config(path: str | pathlib.Path) -> dict[str, Any]:
    """The fields of a DPOConfig file: `.json`, or `.yaml` / `.yml` (a mapping at the top). ValueError naming the
    file when it is missing, does not parse, or is not a mapping."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: --from-trl: no such file")
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"{path}: --from-trl reads a .json, .yaml or .yml DPOConfig, not {path.suffix!r}")
    import yaml

    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())  # one line
        raise ValueError(f"{path}: not a readable DPOConfig ({type(e).__name__}: {reason})") from e
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: a DPOConfig file holds a mapping of fields, got {type(data).__name__}")
    return dict(data)


# ------------------------------------------------------------------------------------------------ mapping
def _coerce(value: Any, default: Any) -> Any:
    """A DPOConfig value as the kind of its default, as TRL's argument parser reads it: a number (not a bool; a
    numeric string such as YAML's `5e-7`, which PyYAML reads as a string, is converted) for a number, a bool for
    a bool, a string for a string. None, and fields whose default is None or a list (`loss_type`, ...), pass as
    they are (checked where they are mapped). ValueError saying what was expected."""
    if value is None or default is None or isinstance(default, (list, tuple, dict)):
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, str):
            try:
                integral = isinstance(default, int) and value.strip().lstrip("+-").isdigit()
                value = int(value) if integral else float(value)
            except ValueError:
                raise ValueError("expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError("expected a finite number")
        return value
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _is_default(value: Any, default: Any) -> bool:
    empty = (None, "", [], {}, ())
    return value == default or (value in empty and default in empty)


def _losses(fields: Mapping[str, Any], fail: Callable[[str, str], None]) -> list[tuple[str, float, dict]]:
    """`[(rpo_jax loss, weight, hparams)]` from loss_type, loss_weights, beta, label_smoothing, discopop_tau."""
    types = fields["loss_type"]
    types = [types] if isinstance(types, str) else list(types)
    if not types:
        fail("loss_type", "empty")
    weights = fields["loss_weights"]
    weights = [1.0] * len(types) if weights is None else list(weights)
    if len(weights) != len(types):
        fail("loss_weights", f"{len(weights)} weights for {len(types)} loss types")
    shared = {
        "beta": fields["beta"],
        "label_smoothing": fields["label_smoothing"],
        "discopop_tau": fields["discopop_tau"],
    }
    out = []
    for loss_type, weight in zip(types, weights):
        if loss_type not in LOSS_NAMES:
            fail("loss_type", f"{loss_type!r} is not a TRL 1.16 loss type ({', '.join(LOSS_NAMES)})")
        name = LOSS_NAMES[loss_type]
        accepted = loss_hyperparameters(name)
        out.append((name, float(weight), {k: v for k, v in shared.items() if k in accepted}))
    for key in ("label_smoothing", "discopop_tau"):
        if not _is_default(fields[key], TRL_DEFAULTS[key]) and not any(key in hp for _, _, hp in out):
            fail(
                key,
                f"no loss in loss_type={types} uses it (TRL 1.16 ignores it there; rpo_jax refuses a "
                "setting that does nothing; for conservative DPO use --config.loss.name=cdpo)",
            )
    return out


def _dpo_losses(given: Mapping[str, Any], fail: Callable[[str, str], None]):
    """DPOConfig's `LossMapping` (`rpo_jax.train.config.from_trl_trainers`): `_losses` and the lines of
    loss_type, loss_weights and the hyperparameters."""
    losses = _losses(given, fail)
    (main, weight, _), extra = losses[0], losses[1:]
    lines = [
        ("loss_type", f"loss.name={main!r}, loss.extra={[[n, w, hp] for n, w, hp in extra]!r}"),
        ("loss_weights", f"loss.weight={weight!r}"),
    ]
    for key in ("beta", "label_smoothing", "discopop_tau"):
        users = [n for n, _, hp in losses if key in hp]
        lines.append(
            (key, f"hyperparameter of {', '.join(users)}" if users else "unused by these losses (TRL's default)")
        )
    return losses, lines


DPO = TrainerFields(
    config="DPOConfig",
    defaults=TRL_DEFAULTS,
    default_only=DEFAULT_ONLY,
    no_effect=NO_EFFECT,
    losses=_dpo_losses,
    references=True,
    truncation={"keep_start": "data.truncation='keep_start', data.max_prompt_length=0"},
)


def trainer_fields(trainer: str) -> TrainerFields:
    """The `TrainerFields` of a trainer name (`TRAINER_NAMES`): DPOConfig's tables as they are; another trainer's
    own fields over the TrainingArguments part of DPOConfig's (`DPO_ONLY` left out)."""
    if trainer == "dpo":
        return DPO
    spec = TRAINERS[trainer]
    return dataclasses.replace(
        spec,
        defaults={**{k: v for k, v in TRL_DEFAULTS.items() if k not in DPO_ONLY}, **spec.defaults},
        default_only={**{k: v for k, v in DEFAULT_ONLY.items() if k not in DPO_ONLY}, **spec.default_only},
        no_effect=(NO_EFFECT - DPO_ONLY) | spec.no_effect,
    )


def _check_references(fields: Mapping[str, Any], fail: Callable[[str, str], None]) -> None:
    """`precompute_ref_log_probs` / `sync_ref_model` / `ref_model_*` (a trainer with a reference)."""
    if not fields.get("sync_ref_model", False):
        for key in ("ref_model_mixup_alpha", "ref_model_sync_steps"):
            if key in fields and not _is_default(fields[key], TRL_DEFAULTS[key]):
                fail(
                    key,
                    "applies only with sync_ref_model=True (TRL 1.16 ignores it otherwise; rpo_jax refuses a "
                    "setting that does nothing)",
                )
        return
    if fields["sync_ref_model"]:
        if fields["precompute_ref_log_probs"]:
            fail(
                "sync_ref_model",
                "cannot be combined with precompute_ref_log_probs=True (the reference moves; TRL refuses it too)",
            )
        if isinstance(fields["ref_model_sync_steps"], float) or fields["ref_model_sync_steps"] < 1:
            fail("ref_model_sync_steps", "expected a whole number of steps ≥ 1")
        if not 0 < fields["ref_model_mixup_alpha"] <= 1:
            fail("ref_model_mixup_alpha", "expected α in (0, 1] (α = 0 would leave the reference where it is)")


def _check_training(fields: Mapping[str, Any], fail: Callable[[str, str], None], spec: TrainerFields) -> None:
    """The TrainingArguments fields, `max_length`, `truncation_mode` and `disable_dropout` of every trainer."""
    if "truncation_mode" in fields and fields["truncation_mode"] not in spec.truncation:
        fail(
            "truncation_mode",
            f"only {' or '.join(repr(m) for m in spec.truncation)}"
            + (" (TRL 1.16 deprecates 'keep_end')" if spec is DPO else "")
            + "; rpo_jax's left truncation is --config.data.truncation=truncate_prompt",
        )
    if fields["max_length"] is None:
        fail("max_length", "None (no truncation): rpo_jax needs a longest sequence length; set it")
    if fields["fp16"]:
        fail("fp16", "rpo_jax has no float16 loss scaling; use bf16")
    if not fields["disable_dropout"]:
        fail("disable_dropout", "rpo_jax models have no dropout")
    if fields["optim"] not in ADAMW:
        fail("optim", f"only AdamW ({', '.join(ADAMW)}); other optax optimizers: --config.optimizer.name")
    if fields["train_sampling_strategy"] not in ("random", "sequential"):
        fail("train_sampling_strategy", "'random' or 'sequential' (rpo_jax has no length grouping)")
    if fields["lr_scheduler_type"] not in SCHEDULES:
        fail("lr_scheduler_type", f"one of {', '.join(SCHEDULES)}")
    if fields["lr_scheduler_type"] == "constant" and fields["warmup_steps"]:
        fail("warmup_steps", "transformers' 'constant' schedule ignores warm-up; use constant_with_warmup")


def _set(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    node = cfg
    *path, last = dotted.split(".")
    for key in path:
        node = node[key]
    node[last] = value


def trl_to_config(
    fields: Mapping[str, Any], *, source: str = "<DPOConfig>", cfg: ml_collections.ConfigDict | None = None
) -> tuple[ml_collections.ConfigDict, list[MappedField]]:
    """Map a TRL trainer config's `fields` (missing ones at TRL's defaults) onto `cfg` (default `base_config()`).

    The trainer is `fields["trainer"]` (`kto | orpo | cpo | bco | dpo`, default `dpo`: a DPOConfig, fields at
    `TRL_DEFAULTS`; the others: `rpo_jax.train.config.from_trl_trainers`). Returns `(config, mapping)`: the config
    with every mapped field set, and one `MappedField` per TRL field (mapped ones first, then the file's fields
    without effect).

    Raises:
      TrlConfigError: `source: FIELD=VALUE: why` for the first field rpo_jax cannot honour or does not know.
    """
    cfg = base_config() if cfg is None else cfg
    fields = dict(fields)  # values are coerced below; the caller's mapping stays as it was
    named = TRAINER_KEY in fields
    trainer = fields.pop(TRAINER_KEY, "dpo")

    def fail(field: str, why: str) -> None:
        shown = f"={fields[field]!r}" if field in fields else ""
        raise TrlConfigError(f"{source}: {field}{shown}: {why}")

    if trainer not in TRAINER_NAMES:
        raise TrlConfigError(f"{source}: {TRAINER_KEY}={trainer!r}: expected one of {', '.join(TRAINER_NAMES)}")
    spec = trainer_fields(trainer)
    defaults, default_only = spec.defaults, spec.default_only
    # transformers 5 writes gradient_checkpointing's value under its new name too (`to_dict()` of any TRL config)
    mirrored = fields.get("activation_checkpointing") == fields.get("gradient_checkpointing", True) is True
    for key, value in fields.items():
        if key == "activation_checkpointing" and mirrored:
            continue
        if key in REMOVED and spec is DPO:
            fail(key, REMOVED[key])
        if key in default_only and not _is_default(value, default_only[key]):
            fail(key, f"rpo_jax honours only TRL's default ({default_only[key]!r})")
        if key not in defaults and key not in default_only and key not in spec.no_effect and key != "warmup_ratio":
            fail(key, f"not a field of {spec.origin or f'TRL {TRL_VERSION}'}'s {spec.config}")
        if key in defaults:
            try:
                fields[key] = _coerce(value, defaults[key])
            except ValueError as e:
                fail(key, f"{e} (TRL's default: {defaults[key]!r})")
    given = {**defaults, **{k: v for k, v in fields.items() if k in defaults}}
    if spec.references:
        _check_references(given, fail)
    _check_training(given, fail, spec)
    losses, loss_lines = spec.losses(given, fail)
    mapping: list[MappedField] = []

    def put(field: str, **targets: Any) -> None:
        for dotted, value in targets.items():
            _set(cfg, dotted.replace("__", "."), value)
        text = ", ".join(f"{k.replace('__', '.')}={v!r}" for k, v in targets.items())
        mapping.append(MappedField(field, given.get(field, fields.get(field)), text))

    (main, main_weight, main_hp), extra = losses[0], losses[1:]
    cfg.loss.name, cfg.loss.weight, cfg.loss.extra = main, main_weight, [[n, w, hp] for n, w, hp in extra]
    cfg.loss.hparams = ml_collections.ConfigDict(main_hp)
    if named:
        mapping.append(MappedField(TRAINER_KEY, trainer, f"{spec.config} fields: loss.name={main!r}"))
    mapping += [MappedField(field, given[field], text) for field, text in loss_lines]
    truncation = {"data__truncation": "keep_start", "data__max_prompt_length": 0}
    if "truncation_mode" in defaults:
        put("max_length", data__max_length=int(given["max_length"]))
        for dotted, value in truncation.items():
            _set(cfg, dotted.replace("__", "."), value)
        mapping.append(
            MappedField("truncation_mode", given["truncation_mode"], spec.truncation[given["truncation_mode"]])
        )
    else:  # the trainer keeps the start of prompt + completion (no truncation_mode field)
        put("max_length", data__max_length=int(given["max_length"]), **truncation)
    put("learning_rate", optimizer__learning_rate=float(given["learning_rate"]))
    accumulation = int(given["gradient_accumulation_steps"])
    # one TRL process; for a run on N GPUs, --config.data.batch_size=N × this
    put("per_device_train_batch_size", data__batch_size=int(given["per_device_train_batch_size"]) * accumulation)
    put("gradient_accumulation_steps", data__micro_batches=accumulation)
    put("train_sampling_strategy", data__shuffle=given["train_sampling_strategy"] == "random")
    put("per_device_eval_batch_size", data__eval_batch_size=int(given["per_device_eval_batch_size"]))
    if int(given["max_steps"]) > 0:
        put("max_steps", train__steps=int(given["max_steps"]), train__epochs=0.0)
        mapping.append(MappedField("num_train_epochs", given["num_train_epochs"], "unused: max_steps > 0"))
    else:
        put("num_train_epochs", train__epochs=float(given["num_train_epochs"]))
        mapping.append(MappedField("max_steps", given["max_steps"], "unused: num_train_epochs decides"))
    put("lr_scheduler_type", optimizer__schedule=SCHEDULES[given["lr_scheduler_type"]], optimizer__end_lr_factor=0.0)
    warmup = given["warmup_steps"]
    ratio = float(fields.get("warmup_ratio") or 0.0)
    if 0 < float(warmup) < 1:  # transformers 5: a warmup_steps below 1 is a fraction of the steps
        ratio, warmup = float(warmup), 0
    if ratio and warmup:
        fail("warmup_ratio", "set together with warmup_steps; give one")
    put("warmup_steps", optimizer__warmup_steps=int(warmup), optimizer__warmup_ratio=ratio)
    if "warmup_ratio" in fields:  # transformers < 5's field (5 reads a warmup_steps below 1 as the ratio)
        mapping.append(MappedField("warmup_ratio", fields["warmup_ratio"], f"optimizer.warmup_ratio={ratio!r}"))
    put("weight_decay", optimizer__weight_decay=float(given["weight_decay"]), optimizer__weight_decay_mask="matrices")
    put("max_grad_norm", optimizer__grad_clip_norm=float(given["max_grad_norm"] or 0.0))
    put("optim", optimizer__name="adamw")
    put("adam_beta1", optimizer__kwargs__b1=float(given["adam_beta1"]))
    put("adam_beta2", optimizer__kwargs__b2=float(given["adam_beta2"]))
    put("adam_epsilon", optimizer__kwargs__eps=float(given["adam_epsilon"]))
    put("seed", seed=int(given["seed"]))
    syncs = "sync_ref_model" in defaults and given["sync_ref_model"]
    if spec.references:
        mode = "cache" if given["precompute_ref_log_probs"] else "in_step"
        if "sync_ref_model" in defaults:
            put("precompute_ref_log_probs", reference_mode=mode)
            sync_every = int(given["ref_model_sync_steps"]) if syncs else 0
            put("sync_ref_model", references=[], reference_sync__every=sync_every)
        else:
            put("precompute_ref_log_probs", reference_mode=mode, references=[])
    if syncs:  # TR-DPO: the same update at the same steps (rpo_jax.train.step.steps.sync_reference)
        put("ref_model_mixup_alpha", reference_sync__mix=float(given["ref_model_mixup_alpha"]))
        mapping.append(
            MappedField(
                "ref_model_sync_steps",
                given["ref_model_sync_steps"],
                f"reference_sync.every={int(given['ref_model_sync_steps'])}",
            )
        )
    put("bf16", model__dtype="auto" if given["bf16"] else "float32")  # auto: bfloat16 on TPU/GPU, f32 on CPU
    put("gradient_checkpointing", model__remat="full" if given["gradient_checkpointing"] else "none")
    put("logging_steps", train__log_every=max(1, math.ceil(float(given["logging_steps"]))))
    put("save_steps", train__checkpoint_every=max(1, math.ceil(float(given["save_steps"]))))
    if given["eval_steps"]:
        put("eval_steps", train__eval_every=max(1, math.ceil(float(given["eval_steps"]))))
    elif "eval_steps" in fields:
        mapping.append(MappedField("eval_steps", fields["eval_steps"], "unset: the recipe's train.eval_every"))
    if given["save_total_limit"]:
        put("save_total_limit", train__keep_checkpoints=int(given["save_total_limit"]))
    elif "save_total_limit" in fields:
        mapping.append(
            MappedField("save_total_limit", fields["save_total_limit"], "unset: the recipe's keep_checkpoints")
        )
    unsynced = ("ref_model_mixup_alpha", "ref_model_sync_steps") if "sync_ref_model" in defaults and not syncs else ()
    for key in ("fp16", "disable_dropout") + unsynced:
        mapping.append(MappedField(key, given[key], "TRL's default: nothing to change"))
    if mirrored:
        mapping.append(
            MappedField("activation_checkpointing", True, "gradient_checkpointing's (transformers 5's name)")
        )
    for key in sorted(
        set(fields) & (spec.no_effect | set(default_only)) - ({"activation_checkpointing"} if mirrored else set())
    ):
        mapping.append(
            MappedField(
                key,
                fields[key],
                "no effect on what rpo_jax trains" if key in spec.no_effect else "TRL's default: nothing to change",
            )
        )
    return cfg, mapping


def format_mapping(source: str, mapping: list[MappedField]) -> str:
    """The mapping as printed by `rpo-train --from-trl` (one header line, one line per field)."""
    trainer = next((m.value for m in mapping if m.field == TRAINER_KEY), "dpo")
    config = trainer_fields(trainer).config
    return "\n".join(
        [f"rpo-train --from-trl {source} (TRL {TRL_VERSION} {config} → rpo_jax config):"] + [str(m) for m in mapping]
    )


def config_from_trl(path: str | pathlib.Path) -> tuple[ml_collections.ConfigDict, list[MappedField]]:
    """`trl_to_config(read_trl_config(path), source=path)`."""
    return trl_to_config(read_trl_config(path), source=str(path))


def apply_trl_config(
    path: str | pathlib.Path, cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> tuple[ml_collections.ConfigDict, str]:
    """`rpo-train --from-trl`: a copy of `cfg` (the `--config` recipe) with the DPOConfig at `path` mapped onto
    it, then the command line's `--config.*` `overrides` (flat dotted keys) set again on top. Returns the config
    and the text to print (the mapping, then the overrides)."""
    cfg = cfg.copy_and_resolve_references()
    cfg.unlock()
    cfg, mapping = trl_to_config(read_trl_config(path), source=str(path), cfg=cfg)
    for dotted, value in overrides.items():
        _set(cfg, dotted, value)
    lines = [format_mapping(str(path), mapping)]
    if overrides:
        lines.append("then --config overrides: " + ", ".join(f"{k}={v!r}" for k, v in overrides.items()))
    return cfg, "\n".join(lines)
