"""`rpo-train --from-trl` for TRL's other preference trainers (`trainer: kto | orpo | cpo | bco`): every field of
TRL 1.16's `KTOConfig`, `ORPOConfig`, `CPOConfig` (and the last `BCOConfig`) mapped, without effect, honoured at its
default only, or refused in one line naming the file and the field; the mapped configs validate."""

from __future__ import annotations

import json

import pytest
import yaml

from rpo_jax.train.config.from_trl import config_from_trl, format_mapping, trainer_fields, trl_to_config
from rpo_jax.train.config.validation import validate

trl = pytest.importorskip("trl")


def trl_class(trainer: str):
    if trainer == "kto":
        return trl.KTOConfig
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    return {"orpo": ORPOConfig, "cpo": CPOConfig}[trainer]


def dumped(trainer: str, **fields) -> dict:
    """`XConfig(**fields).to_dict()`: every field of TRL's config, as TRL itself writes them."""
    return trl_class(trainer)(output_dir="/tmp/trl_out", use_cpu=True, **fields).to_dict()


@pytest.mark.parametrize("trainer", ["kto", "orpo", "cpo"])
def test_every_field_of_a_dumped_config_is_accounted_for_and_the_defaults_are_trls(trainer, tmp_path):
    fields = dumped(trainer)
    spec = trainer_fields(trainer)
    for key, value in spec.defaults.items():
        if key != "bf16":  # TRL's bf16 default is resolved by the machine (True unless fp16)
            assert fields[key] == value, key  # the table is TRL 1.16's own defaults
    for key, value in spec.default_only.items():
        if key != "activation_checkpointing":  # transformers 5 writes gradient_checkpointing's value there too
            assert fields[key] == value, key
    path = tmp_path / f"{trainer}.yaml"
    path.write_text(yaml.safe_dump({"trainer": trainer, **fields}))
    cfg, mapping = config_from_trl(path)
    assert {m.field for m in mapping} == set(fields) | {"trainer"}
    assert validate(cfg).loss.name == {"kto": "kto", "orpo": "orpo", "cpo": "cpo"}[trainer]
    assert format_mapping(str(path), mapping).startswith(f"rpo-train --from-trl {path} (TRL 1.16.0 {spec.config} →")


def test_kto_fields_map_onto_the_loss_and_file_order():
    cfg, mapping = trl_to_config(
        {
            "trainer": "kto",
            "loss_type": "apo_zero_unpaired",
            "beta": 0.2,
            "desirable_weight": 1.3,
            "undesirable_weight": 0.7,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "precompute_ref_log_probs": True,
        }
    )
    assert cfg.loss.name == "apo_zero_unpaired" and cfg.loss.weight == 1.0 and list(cfg.loss.extra) == []
    assert dict(cfg.loss.hparams) == {"beta": 0.2, "desirable_weight": 1.3, "undesirable_weight": 0.7}
    assert (cfg.data.batch_size, cfg.data.micro_batches, cfg.data.shuffle) == (8, 2, False)  # sequential: TRL's
    assert cfg.reference_mode == "cache" and cfg.data.truncation == "keep_start" and cfg.optimizer.learning_rate == 1e-6
    shown = {m.field: m.target for m in mapping}
    assert shown["loss_type"].startswith("loss.name='apo_zero_unpaired'")
    assert shown["max_length"] == "data.max_length=1024, data.truncation='keep_start', data.max_prompt_length=0"
    synced, _ = trl_to_config({"trainer": "kto", "sync_ref_model": True, "ref_model_sync_steps": 8})
    assert dict(synced.reference_sync) == {"every": 8, "mix": 0.6} and synced.reference_mode == "in_step"


def test_orpo_and_cpo_fields_map_onto_their_losses():
    orpo, _ = trl_to_config({"trainer": "orpo", "beta": 0.25})
    assert orpo.loss.name == "orpo" and dict(orpo.loss.hparams) == {"beta": 0.25, "nll_tokens": "sequence"}
    assert orpo.data.shuffle is True and validate(orpo).loss.name == "orpo"
    simpo, _ = trl_to_config({"trainer": "cpo", "loss_type": "simpo", "simpo_gamma": 0.8, "beta": 2.0})
    assert dict(simpo.loss.hparams) == {
        "beta": 2.0,
        "loss_type": "simpo",
        "label_smoothing": 0.0,
        "cpo_alpha": 1.0,
        "alpha": 0.0,
        "simpo_gamma": 0.8,
    }
    alphapo, mapping = trl_to_config({"trainer": "cpo", "loss_type": "alphapo", "alpha": 0.25})
    hparams = dict(alphapo.loss.hparams)
    assert (hparams["loss_type"], hparams["cpo_alpha"], hparams["alpha"]) == ("simpo", 0.0, 0.25)  # CPOConfig's own
    assert "(loss_type='alphapo' sets 0)" in {m.field: m.target for m in mapping}["cpo_alpha"]
    sigmoid, _ = trl_to_config({"trainer": "cpo"})
    assert "simpo_gamma" not in sigmoid.loss.hparams and validate(sigmoid).loss.hparams["loss_type"] == "sigmoid"


def test_bco_config_of_the_last_bco_trainer():
    cfg, mapping = trl_to_config({"trainer": "bco", "beta": 0.3, "precompute_ref_log_probs": True})
    assert cfg.loss.name == "bco" and dict(cfg.loss.hparams) == {"beta": 0.3}
    assert cfg.optimizer.learning_rate == 5e-5 and cfg.reference_mode == "cache" and list(cfg.references) == []
    assert "cuts the completion" in {m.field: m.target for m in mapping}["truncation_mode"]
    assert cfg.data.truncation == "keep_start"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"trainer": "ppo"}, "trainer='ppo': expected one of dpo, kto, orpo, cpo, bco"),
        ({"trainer": "kto", "loss_type": "sigmoid"}, "loss_type='sigmoid': one of 'kto', 'apo_zero_unpaired'"),
        ({"trainer": "kto", "label_smoothing": 0.1}, "label_smoothing=0.1: not a field of TRL 1.16.0's KTOConfig"),
        ({"trainer": "kto", "desirable_weight": -1.0}, "desirable_weight=-1.0: expected a weight ≥ 0"),
        ({"trainer": "kto", "router_aux_loss_coef": 0.1}, "router_aux_loss_coef=0.1: rpo_jax honours only TRL's"),
        ({"trainer": "kto", "ref_model_sync_steps": 4}, "ref_model_sync_steps=4: applies only with sync_ref_model"),
        ({"trainer": "orpo", "is_encoder_decoder": True}, "is_encoder_decoder=True: rpo_jax honours only TRL's"),
        ({"trainer": "orpo", "precompute_ref_log_probs": True}, "precompute_ref_log_probs=True: not a field of"),
        ({"trainer": "cpo", "loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing=0.1: does not apply"),
        ({"trainer": "cpo", "simpo_gamma": 1.0}, "simpo_gamma=1.0: applies only with loss_type='simpo'"),
        ({"trainer": "cpo", "loss_type": "kto"}, "loss_type='kto': one of 'sigmoid', 'hinge', 'ipo', 'simpo'"),
        ({"trainer": "bco", "min_density_ratio": 0.3}, "min_density_ratio=0.3: rpo_jax honours only TRL's"),
        ({"trainer": "bco", "sync_ref_model": True}, "sync_ref_model=True: not a field of the last BCOTrainer"),
        ({"trainer": "bco", "truncation_mode": "middle"}, "truncation_mode='middle': only 'keep_end' or 'keep_start'"),
    ],
)
def test_a_field_rpo_jax_cannot_honour_is_one_line_naming_the_file_and_field(tmp_path, fields, message):
    path = tmp_path / "trainer.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(ValueError) as info:
        config_from_trl(path)
    assert str(info.value).startswith(f"{path}: {message}"), str(info.value)
    assert "\n" not in str(info.value)


def test_every_trainer_shares_the_training_arguments_mapping():
    """A TrainingArguments field maps the same whatever the trainer (DPOConfig's table)."""
    fields = {"learning_rate": 3e-5, "lr_scheduler_type": "cosine", "warmup_steps": 0.1, "max_steps": 12, "seed": 3}
    configs = {t: trl_to_config({"trainer": t, **fields})[0] for t in ("dpo", "kto", "orpo", "cpo", "bco")}
    for trainer, cfg in configs.items():
        shown = (cfg.optimizer.learning_rate, cfg.optimizer.schedule, cfg.optimizer.warmup_ratio, cfg.train.steps)
        assert shown + (cfg.seed,) == (3e-5, "cosine", 0.1, 12, 3), trainer
