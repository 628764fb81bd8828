"""`rpo-train --from-trl FILE`: TRL 1.16 DPOConfig (JSON / YAML) → rpo_jax config, every supported field; a
field rpo_jax cannot honour is a one-line error naming it; `--config.*` overrides on top; labels vs scores in
a run (`data.pairs_from`)."""

from __future__ import annotations

import json
import logging
import pathlib
import subprocess
import sys

import jax
import pytest
import yaml

from rpo_jax.train.config.from_trl import (
    DEFAULT_ONLY,
    NO_EFFECT,
    TRL_DEFAULTS,
    apply_trl_config,
    config_from_trl,
    trl_to_config,
)
from rpo_jax.train.config.quickstart import get_config
from rpo_jax.train.jobs import preference

from .trainer_testlib import subprocess_env, tiny_config

trl = pytest.importorskip("trl")
ONE = jax.devices()[:1]

#: Every supported field at a value other than TRL's default.
EVERY_FIELD = dict(
    beta=0.25,
    loss_type=["sigmoid", "sft"],
    loss_weights=[0.8, 0.2],
    label_smoothing=0.0,
    discopop_tau=0.05,
    max_length=333,
    truncation_mode="keep_start",
    learning_rate=3e-5,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    per_device_eval_batch_size=6,
    num_train_epochs=2.0,
    max_steps=-1,
    lr_scheduler_type="cosine",
    warmup_steps=0.1,
    weight_decay=0.05,
    max_grad_norm=0.5,
    seed=7,
    precompute_ref_log_probs=True,
    sync_ref_model=False,
    adam_beta1=0.8,
    adam_beta2=0.95,
    adam_epsilon=1e-6,
    optim="adamw_torch",
    bf16=False,
    gradient_checkpointing=False,
    logging_steps=3,
    save_steps=40,
    eval_steps=20,
    save_total_limit=2,
    train_sampling_strategy="sequential",
)


def dumped(**fields) -> dict:
    """`DPOConfig(**fields).to_dict()`: every one of TRL's fields, as TRL itself writes them."""
    return trl.DPOConfig(output_dir="/tmp/trl_out", use_cpu=True, **fields).to_dict()


def check_every_field(cfg) -> None:
    assert cfg.loss.name == "dpo" and cfg.loss.weight == 0.8 and list(cfg.loss.extra) == [["sft", 0.2, {}]]
    assert dict(cfg.loss.hparams) == {"beta": 0.25}
    assert (cfg.data.max_length, cfg.data.truncation, cfg.data.max_prompt_length) == (333, "keep_start", 0)
    assert (cfg.data.batch_size, cfg.data.micro_batches, cfg.data.eval_batch_size) == (8, 2, 6)
    assert cfg.data.shuffle is False
    assert cfg.train.epochs == 2.0
    assert (cfg.optimizer.name, cfg.optimizer.learning_rate, cfg.optimizer.schedule) == ("adamw", 3e-5, "cosine")
    assert (cfg.optimizer.warmup_steps, cfg.optimizer.warmup_ratio, cfg.optimizer.end_lr_factor) == (0, 0.1, 0.0)
    assert (cfg.optimizer.weight_decay, cfg.optimizer.grad_clip_norm) == (0.05, 0.5)
    assert dict(cfg.optimizer.kwargs) == {"b1": 0.8, "b2": 0.95, "eps": 1e-6}
    assert cfg.seed == 7 and cfg.reference_mode == "cache" and list(cfg.references) == []
    assert cfg.model.dtype == "float32" and cfg.model.remat == "none"
    assert (cfg.train.log_every, cfg.train.checkpoint_every, cfg.train.eval_every, cfg.train.keep_checkpoints) == (
        3,
        40,
        20,
        2,
    )


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip_of_every_supported_field(tmp_path, suffix):
    path = tmp_path / f"dpo{suffix}"
    fields = dumped(**EVERY_FIELD)
    path.write_text(json.dumps(fields) if suffix == ".json" else yaml.safe_dump(fields))
    cfg, mapping = config_from_trl(path)
    check_every_field(cfg)
    assert {m.field for m in mapping} == set(fields)  # every field of the file is accounted for
    # the file as a TRL script writes it (only the fields it sets) maps the same
    path.write_text(yaml.safe_dump(EVERY_FIELD) if suffix == ".yaml" else json.dumps(EVERY_FIELD))
    check_every_field(config_from_trl(path)[0])


def test_missing_fields_take_trl_defaults():
    defaults = dumped(bf16=False)
    for key, value in TRL_DEFAULTS.items():
        if key not in ("bf16",):
            assert defaults[key] == value, key  # the table is TRL 1.16's own defaults
    cfg, _ = trl_to_config({})
    assert (cfg.loss.name, cfg.loss.hparams.beta, cfg.data.max_length, cfg.data.batch_size) == ("dpo", 0.1, 1024, 8)
    assert (cfg.optimizer.schedule, cfg.optimizer.learning_rate, cfg.seed, cfg.train.epochs) == (
        "linear",
        1e-6,
        42,
        3.0,
    )
    assert cfg.reference_mode == "in_step" and cfg.data.shuffle is True
    every = set(defaults)
    assert every <= set(TRL_DEFAULTS) | set(DEFAULT_ONLY) | NO_EFFECT  # every TRL 1.16 field is classified


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("ref_model_sync_steps", 64, "ref_model_sync_steps=64: applies only with sync_ref_model=True"),
        ("max_prompt_length", 128, "max_prompt_length=128: not a field of TRL 1.16's DPOConfig"),
        ("truncation_mode", "keep_end", "truncation_mode='keep_end': only 'keep_start'"),
        ("use_weighting", True, "use_weighting=True: rpo_jax honours only TRL's default"),
        ("f_divergence_type", "js_divergence", "f_divergence_type='js_divergence': rpo_jax honours only"),
        ("fp16", True, "fp16=True: rpo_jax has no float16"),
        ("label_smoothing", 0.1, "label_smoothing=0.1: no loss in loss_type=\\['sigmoid'\\] uses it"),
        ("lr_scheduler_type", "polynomial", "lr_scheduler_type='polynomial': one of"),
        ("not_a_field", 1, "not_a_field=1: not a field of TRL 1.16.0's DPOConfig"),
        ("learning_rate", "fast", "learning_rate='fast': expected a number \\(TRL's default: 1e-06\\)"),
        ("max_grad_norm", float("inf"), "max_grad_norm=inf: expected a finite number"),
        ("max_steps", True, "max_steps=True: expected a finite number"),
        ("precompute_ref_log_probs", "yes", "precompute_ref_log_probs='yes': expected true or false"),
        ("truncation_mode", 1, "truncation_mode=1: expected a string"),
    ],
)
def test_unsupported_field_is_a_one_line_error_naming_it(tmp_path, field, value, message):
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump({"beta": 0.1, field: value}))
    with pytest.raises(ValueError, match=f"^{path}: {message}") as info:
        config_from_trl(path)
    assert "\n" not in str(info.value)


def test_numbers_written_as_yaml_strings_are_read_as_numbers(tmp_path):
    """PyYAML reads `5e-7` as a string (YAML 1.1 needs a dot); TRL's argument parser reads it as a float."""
    path = tmp_path / "dpo.yaml"
    path.write_text("learning_rate: 5e-7\nmax_steps: '12'\nbeta: 0.25\n")
    assert yaml.safe_load(path.read_text())["learning_rate"] == "5e-7"
    cfg, _ = config_from_trl(path)
    assert cfg.optimizer.learning_rate == 5e-7 and cfg.train.steps == 12 and cfg.loss.hparams.beta == 0.25


def test_label_smoothing_goes_to_the_losses_that_use_it():
    cfg, _ = trl_to_config({"loss_type": ["robust", "sft"], "label_smoothing": 0.2})
    assert cfg.loss.name == "robust" and dict(cfg.loss.hparams) == {"beta": 0.1, "label_smoothing": 0.2}


def test_overrides_apply_on_top_and_the_mapping_is_printed(tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump({"beta": 0.3, "max_steps": 5, "learning_rate": 2e-5}))
    cfg, text = apply_trl_config(path, get_config(), {"optimizer.learning_rate": 1e-4, "data.train": "x.jsonl"})
    assert cfg.loss.hparams.beta == 0.3 and cfg.train.steps == 5
    assert cfg.optimizer.learning_rate == 1e-4 and cfg.data.train == "x.jsonl"
    assert "beta=0.3 → hyperparameter of dpo" in text and "max_steps=5 → train.steps=5" in text
    assert "then --config overrides: optimizer.learning_rate=0.0001" in text


def test_command_line_error_names_the_field(tmp_path):
    path = tmp_path / "dpo.json"
    path.write_text(json.dumps({"sync_ref_model": True, "precompute_ref_log_probs": True}))
    proc = subprocess.run(
        [sys.executable, "-m", "rpo_jax.train.cli", "--from-trl", str(path), f"--workdir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"rpo-train: error: {path}: sync_ref_model=True: cannot be "
        "combined with precompute_ref_log_probs=True (the reference "
        "moves; TRL refuses it too)"
    )


def test_sync_ref_model_maps_onto_reference_sync(tmp_path):
    """TR-DPO: sync_ref_model / ref_model_sync_steps / ref_model_mixup_alpha → reference_sync.every / .mix (off
    by TRL's default), in-step references; what TRL would refuse or ignore is a one-line error."""
    path = tmp_path / "dpo.json"
    fields = dumped(
        **{
            **EVERY_FIELD,
            "precompute_ref_log_probs": False,
            "sync_ref_model": True,
            "ref_model_sync_steps": 64,
            "ref_model_mixup_alpha": 0.9,
        }
    )
    path.write_text(json.dumps(fields))
    cfg, mapping = config_from_trl(path)
    assert dict(cfg.reference_sync) == {"every": 64, "mix": 0.9} and cfg.reference_mode == "in_step"
    shown = {m.field: m.target for m in mapping}
    assert shown["sync_ref_model"] == "references=[], reference_sync.every=64"
    assert shown["ref_model_mixup_alpha"] == "reference_sync.mix=0.9"
    assert shown["ref_model_sync_steps"] == "reference_sync.every=64"
    assert {m.field for m in mapping} == set(fields)
    assert trl_to_config({})[0].reference_sync.every == 0  # TRL's default: off
    for bad, message in (
        ({"ref_model_mixup_alpha": 0.0}, "ref_model_mixup_alpha=0.0: expected α in \\(0, 1\\]"),
        ({"ref_model_sync_steps": 0}, "ref_model_sync_steps=0: expected a whole number"),
        ({"precompute_ref_log_probs": True}, "sync_ref_model=True: cannot be combined"),
    ):
        with pytest.raises(ValueError, match=f"^<DPOConfig>: {message}"):
            trl_to_config({"sync_ref_model": True, **bad})


# ------------------------------------------------------------------------------------------------ labels vs scores
def scored_pairs(path: pathlib.Path) -> str:
    """8 TRL pairs with scores: 2 ties, 3 disagreeing with their labels."""
    scores = [(2, 1), (1, 1), (0, 3), (5, 2), (4, 4), (1, 2), (0, 1), (3, 0)]
    lines = [
        {
            "prompt": [{"role": "user", "content": f"sort: {i} 1"}],
            "chosen": [{"role": "assistant", "content": f"1 {i} 9"}],
            "rejected": [{"role": "assistant", "content": f"9 {i} 1"}],
            "score_chosen": c,
            "score_rejected": r,
        }
        for i, (c, r) in enumerate(scores)
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


@pytest.mark.parametrize("pairs_from, reaches", [("labels", False), ("rewards", True)])
def test_trainer_counts_ties_and_disagreements_and_follows_pairs_from(tmp_path, caplog, pairs_from, reaches):
    train = scored_pairs(tmp_path / "scored.jsonl")
    cfg = tiny_config(
        tmp_path / "data",
        **{
            "data.train": train,
            "data.eval": "",
            "loss.name": "dpo",
            "loss.hparams": {"beta": 0.1},
            "data.pairs_from": pairs_from,
            "data.batch_size": 4,
        },
    )
    with caplog.at_level(logging.INFO, logger="rpo_jax"):
        run = preference.build_run(cfg, tmp_path / "run", devices=ONE)
    assert run.preference_direction == {
        "pairs_from": pairs_from,
        "rewards_reach_loss": reaches,
        "train": {"scored_pairs": 8, "ties": 2, "disagreements": 3},
    }
    assert "8 labelled pairs carry scores: 2 ties, 3 disagree with their labels" in caplog.text
    batch = run.datasets["train"].collate(list(range(8)))
    assert ("rewards" in batch) is reaches
    task = preference.preference_task(run)
    assert task.identity["objective"]["preference_direction"] == run.preference_direction


def test_reward_model_pairs_follow_labels_unless_pairs_from_rewards(tmp_path):
    from rpo_jax.data import read_records
    from rpo_jax.data.reward_pairs import preference_pairs

    records, _ = read_records(scored_pairs(tmp_path / "scored.jsonl"))
    as_labelled, without = preference_pairs(records)
    assert without == 0 and as_labelled == records  # every pair, in its labelled order
    by_scores, without = preference_pairs(records, pairs_from="rewards")
    assert without == 2 and len(by_scores) == 6  # the two ties give no pair
    flipped = [p for p in by_scores if p.responses[0] == records[2].responses[1]]
    assert len(flipped) == 1 and flipped[0].rewards == (3.0, 0.0)  # a disagreeing pair, turned round


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("dpo.yaml", "beta: [0.1\n", "not a readable DPOConfig \\(ParserError"),
        ("dpo.json", '{"beta": }', "not a readable DPOConfig \\(JSONDecodeError"),
        ("dpo.yaml", "- beta\n", "a DPOConfig file holds a mapping of fields, got list"),
        ("dpo.toml", "beta = 0.1", "--from-trl reads a .json, .yaml or .yml DPOConfig, not '.toml'"),
    ],
)
def test_unreadable_file_is_a_one_line_error_naming_it(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^{path}: {message}") as info:
        config_from_trl(path)
    assert "\n" not in str(info.value)
