"""`rpo-train --from-trl` for TRL's other preference trainers: `KTOConfig`, `ORPOConfig`, `CPOConfig` and
`BCOConfig`, named by the file's top-level `trainer: kto | orpo | cpo | bco | dpo` key (default `dpo`:
`rpo_jax.train.config.from_trl`'s DPOConfig).

Each trainer is a `TrainerFields`: the fields of its config class that are not `transformers.TrainingArguments`'
(and the TrainingArguments defaults it overrides), with TRL's defaults; which of them are honoured only at their
default or change nothing here; and how its loss fields become `config.loss` (`losses`: the weighted terms and one
printed line per loss field). `from_trl.trl_to_config` maps the TrainingArguments fields of every trainer the same
way (`DPOConfig`'s table). Sources: TRL 1.16.0's `trl.KTOConfig`, `trl.experimental.orpo.ORPOConfig`,
`trl.experimental.cpo.CPOConfig`; TRL 1.16 ships no BCO trainer: `BCOConfig` is the last one TRL shipped
(`trl/experimental/bco/bco_config.py`, 2026, the trainer `rpo_jax.losses`' `bco` transcribes), a subclass of
`TrainingArguments` itself (its learning rate default is TrainingArguments' 5e-5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

#: the file's key naming its trainer, and the trainers it may name
TRAINER_KEY = "trainer"
TRAINER_NAMES = ("dpo", "kto", "orpo", "cpo", "bco")

#: DPOConfig's fields that are not TrainingArguments' (`from_trl`'s tables hold both; the other trainers take
#: the TrainingArguments part of them)
DPO_ONLY = frozenset(
    """
activation_offloading beta dataset_num_proc disable_dropout discopop_tau f_alpha_divergence_coef f_divergence_type
label_smoothing ld_alpha loss_type loss_weights max_length model_init_kwargs pad_to_multiple_of pad_token padding_free
precompute_ref_batch_size precompute_ref_log_probs ref_model_mixup_alpha ref_model_sync_steps router_aux_loss_coef
sync_ref_model truncation_mode trust_remote_code use_weighting
""".split()
)

Fail = Callable[[str, str], None]
#: (config.loss terms [(name, weight, hparams)], printed lines [(field, what it became)])
LossMapping = tuple[list[tuple[str, float, dict]], list[tuple[str, str]]]


@dataclasses.dataclass(frozen=True)
class TrainerFields:
    """One TRL trainer config's own fields (beside TrainingArguments').

    * `config`: the class name (messages); `defaults`: every own field `trl_to_config` maps, and the
      TrainingArguments defaults the class overrides, at TRL's default;
    * `default_only`: fields honoured only at that default (a one-line error otherwise); `no_effect`: fields that
      change nothing rpo_jax trains;
    * `losses(given, fail)`: `LossMapping` of the fields given (defaults filled in); `fail(field, why)` refuses;
    * `references`: the trainer has a reference model (`precompute_ref_log_probs`, and `sync_ref_model` where
      `defaults` has it); `truncation`: the `truncation_mode` values accepted (none: the trainer keeps the start of
      prompt + completion, as `data.truncation="keep_start"`), with the text of its printed line; `origin`:
      whose config class it is, for messages (empty: TRL 1.16.0's).
    """

    config: str
    defaults: Mapping[str, Any]
    default_only: Mapping[str, Any]
    no_effect: frozenset
    losses: Callable[[Mapping[str, Any], Fail], LossMapping]
    references: bool
    truncation: Mapping[str, str] = dataclasses.field(default_factory=dict)
    origin: str = ""  # whose config it is, for messages ("" : TRL 1.16.0's)


def _is_default(value: Any, default: Any) -> bool:
    empty = (None, "", [], {}, ())
    return value == default or (value in empty and default in empty)


def _lines(name: str, hparams: Mapping[str, Any], fields: tuple[str, ...]) -> list[tuple[str, str]]:
    return [(f, f"loss.hparams.{f}={hparams[f]!r}" if f in hparams else f"hyperparameter of {name}") for f in fields]


# ------------------------------------------------------------------------------------------------ KTO
def kto_losses(given: Mapping[str, Any], fail: Fail) -> LossMapping:
    """`loss_type` "kto" | "apo_zero_unpaired" → that loss, with beta, desirable_weight, undesirable_weight."""
    loss_type = given["loss_type"]
    if loss_type not in ("kto", "apo_zero_unpaired"):
        fail("loss_type", "one of 'kto', 'apo_zero_unpaired' (TRL 1.16's KTOTrainer loss types)")
    for key in ("desirable_weight", "undesirable_weight"):
        if given[key] < 0:
            fail(key, "expected a weight ≥ 0")
    hparams = {key: given[key] for key in ("beta", "desirable_weight", "undesirable_weight")}
    lines = [("loss_type", f"loss.name={loss_type!r} (unpaired records; data.shuffle=False for 'kto')")]
    return [(loss_type, 1.0, hparams)], lines + _lines(loss_type, hparams, tuple(hparams))


KTO = TrainerFields(
    config="KTOConfig",
    defaults={
        "learning_rate": 1e-6,
        "train_sampling_strategy": "sequential",
        "max_length": 1024,
        "loss_type": "kto",
        "beta": 0.1,
        "desirable_weight": 1.0,
        "undesirable_weight": 1.0,
        "precompute_ref_log_probs": False,
        "sync_ref_model": False,
        "ref_model_mixup_alpha": 0.6,
        "ref_model_sync_steps": 512,
        "disable_dropout": True,
    },
    default_only={"router_aux_loss_coef": None, "model_init_kwargs": None},
    no_effect=frozenset(
        "activation_offloading dataset_num_proc pad_to_multiple_of precompute_ref_batch_size trust_remote_code".split()
    ),
    losses=kto_losses,
    references=True,
)


# ------------------------------------------------------------------------------------------------ ORPO, CPO
def orpo_losses(given: Mapping[str, Any], fail: Fail) -> LossMapping:
    """`orpo` with beta (TRL's λ) and the NLL over prompt + response tokens (`nll_tokens="sequence"`)."""
    hparams = {"beta": given["beta"], "nll_tokens": "sequence"}
    return [("orpo", 1.0, hparams)], [("beta", f"loss.hparams.beta={given['beta']!r}")]


ENCODER_DECODER = {
    "max_completion_length": None,  # encoder-decoder models only
    "is_encoder_decoder": None,
    "generate_during_eval": False,  # W&B / Comet samples during evaluation
    "model_init_kwargs": None,
}

ORPO = TrainerFields(
    config="ORPOConfig",
    defaults={"learning_rate": 1e-6, "max_length": 1024, "beta": 0.1, "disable_dropout": True},
    default_only=ENCODER_DECODER,
    no_effect=frozenset("padding_value dataset_num_proc trust_remote_code".split()),
    losses=orpo_losses,
    references=False,
)

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


def cpo_losses(given: Mapping[str, Any], fail: Fail) -> LossMapping:
    """`cpo` with loss_type (TRL's `"alphapo"` is `"simpo"` with `cpo_alpha=0`, as CPOConfig's __post_init__ sets
    it), beta, label_smoothing (sigmoid / simpo only), cpo_alpha, simpo_gamma (simpo only) and alpha."""
    loss_type, cpo_alpha = given["loss_type"], given["cpo_alpha"]
    if loss_type not in CPO_LOSS_TYPES:
        fail("loss_type", f"one of {', '.join(repr(t) for t in CPO_LOSS_TYPES)} (TRL 1.16's CPOTrainer loss types)")
    if loss_type == "alphapo":
        loss_type, cpo_alpha = "simpo", 0.0
    if loss_type in ("hinge", "ipo") and given["label_smoothing"] > 0:
        fail("label_smoothing", f"does not apply to loss_type={loss_type!r} (TRL ignores it); 'sigmoid' or 'simpo'")
    if loss_type != "simpo" and not _is_default(given["simpo_gamma"], 0.5):
        fail("simpo_gamma", "applies only with loss_type='simpo' (TRL ignores it otherwise; rpo_jax refuses a "
             "setting that does nothing)")  # fmt: skip
    hparams = {
        "beta": given["beta"],
        "loss_type": loss_type,
        "label_smoothing": given["label_smoothing"],
        "cpo_alpha": cpo_alpha,
        "alpha": given["alpha"],
    }
    if loss_type == "simpo":
        hparams["simpo_gamma"] = given["simpo_gamma"]
    lines = _lines("cpo", hparams, ("beta", "label_smoothing", "alpha", "simpo_gamma"))
    if "simpo_gamma" not in hparams:
        lines[-1] = ("simpo_gamma", "unused: loss_type is not 'simpo' (TRL's default)")
    alphapo = given["loss_type"] == "alphapo"
    shown = f"loss.hparams.loss_type={loss_type!r}" + (", loss.hparams.cpo_alpha=0.0" if alphapo else "")
    lines += [
        ("loss_type", shown),
        ("cpo_alpha", f"loss.hparams.cpo_alpha={cpo_alpha!r}" + (" (loss_type='alphapo' sets 0)" if alphapo else "")),
    ]
    return [("cpo", 1.0, hparams)], lines


CPO = TrainerFields(
    config="CPOConfig",
    defaults={
        "learning_rate": 1e-6,
        "max_length": 1024,
        "beta": 0.1,
        "label_smoothing": 0.0,
        "loss_type": "sigmoid",
        "cpo_alpha": 1.0,
        "simpo_gamma": 0.5,
        "alpha": 0.0,
        "disable_dropout": True,
    },
    default_only=ENCODER_DECODER,
    no_effect=frozenset("dataset_num_proc trust_remote_code".split()),
    losses=cpo_losses,
    references=False,
)


# ------------------------------------------------------------------------------------------------ BCO
def bco_losses(given: Mapping[str, Any], fail: Fail) -> LossMapping:
    """`bco` (without UDM) with beta."""
    return [("bco", 1.0, {"beta": given["beta"]})], [("beta", f"loss.hparams.beta={given['beta']!r}")]


BCO = TrainerFields(
    config="BCOConfig",
    defaults={
        "learning_rate": 5e-5,  # BCOConfig subclasses TrainingArguments without overriding it
        "max_length": 1024,
        "beta": 0.1,
        "truncation_mode": "keep_end",
        "precompute_ref_log_probs": False,
        "disable_dropout": True,
    },
    default_only={
        **ENCODER_DECODER,
        # UDM's density-ratio classifier (an `embedding_func` given to the trainer): not implemented
        "prompt_sample_size": 1024,
        "min_density_ratio": 0.5,
        "max_density_ratio": 10.0,
    },
    no_effect=frozenset({"dataset_num_proc"}),
    losses=bco_losses,
    references=True,
    origin="the last BCOTrainer (huggingface/trl 3b0ecdf8)",
    truncation={
        "keep_end": "data.truncation='keep_start' (the last BCOTrainer cuts the completion whatever the mode)",
        "keep_start": "data.truncation='keep_start'",
    },
)

#: the trainers other than DPO, by the file's `trainer` value
TRAINERS: dict[str, TrainerFields] = {"kto": KTO, "orpo": ORPO, "cpo": CPO, "bco": BCO}
