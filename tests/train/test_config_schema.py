"""The typed run configuration (`rpo_jax.train.config.schema`, `validation.validate`): every field typed, defaulted
and described; `base_config()` is its defaults; every recipe validates; refusals are one line naming the key, the
value and what is allowed; aliases are normalised; `checkpoint_every = 0` means no periodic checkpoint; the run
identity of a config is the same whether it is read as a ConfigDict or as the validated RunConfig; and
`rpo-train --config.train.stepz=3` says which key it meant."""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib
import re
import typing

import jax
import jax.numpy as jnp
import pydantic
import pytest

from rpo_jax.models import ModelConfig
from rpo_jax.models.sharding import make_mesh
from rpo_jax.train.build.state import RunSetup, on_mesh
from rpo_jax.train.config.defaults import base_config
from rpo_jax.train.config.quickstart import get_config
from rpo_jax.train.config.schema import RunConfig
from rpo_jax.train.config.validation import plain, to_config_dict, validate
from rpo_jax.train.core import runner
from rpo_jax.train.core.identity import run_identity
from rpo_jax.train.core.runner import Task, Unit, run_task
from rpo_jax.train.core.workdir import read_run_config, record_run
from rpo_jax.train.jobs.reward_model import identity_objective

RECIPES = sorted((pathlib.Path(__file__).resolve().parents[2] / "configs").glob("*.py"))


def sections(model: type[pydantic.BaseModel], prefix: str = "config"):
    """(key path, model class) of every section, recursively (tuple-of-section fields included)."""
    yield prefix, model
    for name, field in model.model_fields.items():
        for inner in [field.annotation, *typing.get_args(field.annotation)]:
            if isinstance(inner, type) and issubclass(inner, pydantic.BaseModel):
                yield from sections(inner, f"{prefix}.{name}")


def with_values(**values) -> dict:
    """base_config() as a plain dict with dotted keys (`data__pairs`) set: values a ConfigDict would refuse too."""
    c = base_config().to_dict()
    for key, value in values.items():
        node = c
        *path, last = key.split("__")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def refusal(**values) -> str:
    with pytest.raises(ValueError) as info:
        validate(with_values(**values))
    message = str(info.value)
    assert "\n" not in message and "pydantic" not in message.lower() and "http" not in message, message
    return message


# ------------------------------------------------------------------------------------------------ the schema
def test_every_field_has_a_type_a_default_and_a_description():
    missing = []
    for where, model in sections(RunConfig):
        assert model.model_config.get("frozen") and model.model_config.get("extra") == "forbid", where
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                missing.append(f"{where}.{name}: description")
            if field.annotation is None or field.annotation is typing.Any:
                missing.append(f"{where}.{name}: type")
            if field.is_required():
                missing.append(f"{where}.{name}: default")
    assert missing == []
    assert "description" in json.dumps(RunConfig.model_json_schema())  # the JSON schema comes for free


def test_base_config_is_the_schema_defaults():
    assert validate(base_config()) == RunConfig()
    assert base_config().to_dict() == RunConfig().model_dump(mode="json")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_validates_and_round_trips_through_config_json(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = validate(module.get_config())  # no file is read: recipes name checkpoints that are not here
    assert validate(json.loads(to_config_dict(cfg).to_json_best_effort())) == cfg


def test_validate_is_idempotent_and_the_config_frozen():
    cfg = validate(get_config())
    assert validate(cfg) is cfg
    with pytest.raises(pydantic.ValidationError):
        cfg.train.steps = 3
    assert dict(cfg.data)["batch_size"] == cfg.data.batch_size == 16  # dict(section) and attribute access
    steps = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 7})})
    assert (steps.train.steps, cfg.train.steps) == (7, 200)


def test_the_run_config_json_reads_back(tmp_path):
    cfg = validate(
        with_values(data__pairs="best_worst", references=[{"path": "", "tokenizer": ""}], model__score_window="64")
    )
    record_run(cfg, tmp_path, "preference", {})
    again = validate(read_run_config(tmp_path))
    assert again == cfg and again.data.pairs == "best_vs_worst" and again.model.score_window == 64
    # entries keep the keys they were given (the run identity hashes them as written)
    assert json.loads((tmp_path / "config.json").read_text())["references"] == [{"path": "", "tokenizer": ""}]


# ------------------------------------------------------------------------------------------------ one-line errors
@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"data__pairs": "bestworst"},
            "config.data.pairs='bestworst': expected one of '', 'best_vs_worst', 'all_pairs' "
            "(aliases 'best_worst', 'all')",
        ),
        ({"loss__hparams": {"beta": -1}}, "config.loss.hparams.beta=-1: expected > 0"),
        ({"train__stepz": 3}, "config.train.stepz: no such key; did you mean 'steps'? (keys of config.train: steps, "),
        ({"data__batch_size": -4}, "config.data.batch_size=-4: expected ≥ 1"),
        ({"train__steps": "ten"}, "config.train.steps='ten': expected an integer"),
        ({"seed": True}, "config.seed=True: expected an integer"),
        ({"train__resume": "sometimes"}, "config.train.resume='sometimes': expected one of 'auto', 'must', 'never', "),
        (
            {"loss__name": "dpoo"},
            "config.loss.name='dpoo': expected a loss of rpo_jax.losses.available_losses(); did you mean 'dpo'?",
        ),
        (
            {"loss__hparams": {"betta": 0.1}},
            "config.loss.hparams.betta: no such hyperparameter of loss 'dpo'; did you mean 'beta'?",
        ),
        ({"loss__extra": [["sft", 0.05, {"beta": 1.0}]]}, "config.loss.extra[0].hparams.beta: no such hyperparameter"),
        ({"loss__extra": ["sft"]}, "config.loss.extra[0]='sft': expected [name, weight] or [name, weight, {hparams}]"),
        ({"reward_model__pairs": "both"}, "config.reward_model.pairs='both': expected one of 'best_vs_worst', "),
        ({"data__packing": "sometimes"}, "config.data.packing='sometimes': expected True, False or 'auto'"),
        (
            {"data__packing": False, "data__share_prompt": True},
            "config.data.share_prompt=True needs config.data.packing=True or 'auto'",
        ),
        (
            {"data__batch_size": 10, "data__micro_batches": 4},
            "config.data.batch_size=10 is not divisible by config.data.micro_batches=4",
        ),
        ({"data__pack_length": 64, "data__max_length": 128}, "config.data.pack_length=64 is shorter than the longest"),
        ({"model__score_window": "wide"}, "config.model.score_window='wide': expected 'auto', 'off' or a number"),
        ({"model__lora__rank": -1}, "config.model.lora.rank=-1: expected ≥ 0"),
        ({"model__lora__base_dtype": "int8"}, "config.model.lora.base_dtype='int8' quantizes the frozen base of LoRA"),
        ({"model__lora__reference": "sft"}, "config.model.lora.reference='sft': expected one of 'base', 'initial'"),
        (
            {"mode": "online", "reference_sync__every": 4},
            "config.reference_sync.every=4: reference sync (TR-DPO) is a setting of preference training; "
            "config.mode='online'",
        ),
        (
            {"reference_sync__every": 2, "reference_mode": "cache"},
            "config.reference_sync.every=2 needs references scored in the step: reference_mode='cache'",
        ),
        (
            {"reference_sync__every": 2, "reference_sync__mix": 0.6, "model__lora__rank": 8},
            "config.reference_sync.mix=0.6 with LoRA (config.model.lora): only mix=1 is exact",
        ),
        (
            {"reference_sync__every": 2, "loss__name": "simpo", "loss__hparams": {"beta": 2.0, "gamma": 0.5}},
            "config.reference_sync.every=2: loss 'simpo' uses no reference",
        ),
        ({"reference_sync__mix": 0.0}, "config.reference_sync.mix=0.0: expected > 0"),
        (
            {"mesh": {"data": -1, "fsdp": -1, "tensor": 1}},
            "config.mesh={'data': -1, 'fsdp': -1, 'tensor': 1, 'context': 1}: only one",
        ),
        (
            {"mesh": {"context": 4}, "data__max_length": 100},
            "config.data.max_length=100 is not a multiple of 2 × config.mesh.context = 8",
        ),
        (
            {"mesh": {"context": 2}, "data__max_length": 64, "data__pack_length": 66},
            "config.data.pack_length=66 is not a multiple of 2 × config.mesh.context = 4",
        ),
        (
            {
                "mode": "online",
                "online__reward_judge": "m:f",
                "mesh": {"context": 2},
                "data__max_prompt_length": 30,
                "online__max_new_tokens": 4,
            },
            "config.mode='online' does not compose with config.mesh.context=2",
        ),
        (
            {"references": [{"path": "x", "toknizer": ""}]},
            "config.references[0].toknizer: no such key; did you mean 'tokenizer'?",
        ),
        ({"optimizer__name": "nope"}, "config.optimizer.name='nope': not an optax optimizer"),
        ({"mode": "online", "online__reward_judge": ""}, "config.online: set exactly one of reward_judge"),
        (
            {"mode": "online", "online__reward_judge": "m:f", "online__num_samples": 1},
            "config.online.num_samples=1: expected ≥ 2 for a preference loss",
        ),
        (
            {
                "mode": "online",
                "online__reward_judge": "m:f",
                "model__path": "policy",
                "loss__name": "mrpo",
                "loss__hparams": {"beta": 0.1},
                "references": [{"path": ""}, {"path": "other", "tokenizer": "other"}],
            },
            "config.references[1].tokenizer='other': online mode scores the samples as the policy's token ids",
        ),
        (
            {"mode": "reward_model", "data__truncation": "truncate_response"},
            "config.data.truncation='truncate_response': reward-model training supports 'drop' and 'truncate_prompt'",
        ),
    ],
)
def test_a_refused_value_is_one_line_naming_the_key_and_what_is_allowed(values, message):
    assert refusal(**values).startswith(message)


def test_a_config_that_is_not_a_mapping_is_refused():
    with pytest.raises(ValueError, match="^config: expected an ml_collections.ConfigDict or a mapping, got int"):
        validate(3)


# ------------------------------------------------------------------------------------------------ one spelling
@pytest.mark.parametrize(
    "values, key, expected",
    [
        ({"data__pairs": "best_worst"}, "data.pairs", "best_vs_worst"),
        ({"data__pairs": "all"}, "data.pairs", "all_pairs"),
        ({"data__pairs": "all_pairs"}, "data.pairs", "all_pairs"),
        ({"reward_model__pairs": "all"}, "reward_model.pairs", "all_pairs"),
        ({"reward_model__pairs": "best_worst"}, "reward_model.pairs", "best_vs_worst"),
        ({"data__packing": "true"}, "data.packing", True),
        ({"data__packing": "auto"}, "data.packing", "auto"),
        ({"data__packing": False}, "data.packing", False),
        ({"data__packing": "false", "data__share_prompt": "False"}, "data.share_prompt", False),
        ({"model__score_window": "64"}, "model.score_window", 64),
        ({"model__score_window": ""}, "model.score_window", "off"),
        ({"mesh": {"fsdp": -1}}, "mesh.data", 1),  # an axis a mesh leaves out has size 1 (make_mesh's reading)
    ],
)
def test_aliases_and_command_line_strings_are_normalised(values, key, expected):
    value = validate(with_values(**values))
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected and type(value) is type(expected)


# ------------------------------------------------------------------------------------------------ identity
class _Tokenizer:
    special_tokens_map = {"eos_token": "z"}

    def get_vocab(self):
        return {chr(97 + i): i for i in range(26)}

    def __len__(self):
        return 26


def _identity(cfg, mode: str, *, before: bool = False) -> dict:
    """run_identity of `cfg` as the jobs build it (a stub tokenizer and the quickstart's architecture); `before`:
    as the reward-model job built it from its ConfigDict before the schema."""
    model_config = ModelConfig.from_hf_dict({**get_config().model.init, "vocab_size": 26}, source="test")
    if mode == "reward_model":
        objective = {"reward_model": cfg.reward_model} if before else identity_objective(cfg.reward_model)
    else:
        objective = {"loss": cfg.loss, "references": list(cfg.references), "iterations": max(1, cfg.train.iterations)}
    return run_identity(cfg, mode, model_config, _Tokenizer(), objective=objective, data={"train": "fingerprint"})


@pytest.mark.parametrize(
    "recipe, mode",
    [
        ("quickstart", "preference"),
        ("mrpo", "preference"),
        ("online_demo", "online"),
        ("reward_model_demo", "reward_model"),
        ("llama3_1_8b_v5p", "preference"),
    ],
)
def test_the_run_identity_is_the_same_from_the_config_dict_and_the_validated_config(recipe, mode):
    """The identity the jobs computed from a ConfigDict before the schema, byte for byte from the RunConfig
    (the config.json written by the preference job goes through `to_config_dict` too): work directories
    recorded before keep resuming."""
    spec = importlib.util.spec_from_file_location(recipe, RECIPES[0].parent / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    raw = module.get_config()
    before = json.dumps(_identity(copy.deepcopy(raw), mode, before=True), sort_keys=True)
    assert json.dumps(_identity(validate(raw), mode), sort_keys=True) == before
    if mode == "preference":  # what `preference.train` hands `build_run` today
        assert json.dumps(_identity(to_config_dict(validate(raw)), mode), sort_keys=True) == before


def test_the_default_identity_settings_are_as_recorded_before_the_schema():
    identity = _identity(validate(get_config()), "preference")
    assert identity["settings"] == {
        "seed": 0,
        "batch_size": 16,
        "param_dtype": "float32",
        "optimizer": {
            "name": "adamw",
            "learning_rate": 1e-3,
            "schedule": "cosine",
            "warmup_steps": 20,
            "warmup_ratio": 0.0,
            "end_lr_factor": 0.0,
            "weight_decay": 0.0,
            "weight_decay_mask": "matrices",
            "grad_clip_norm": 1.0,
            "kwargs": {},
        },
    }
    assert identity["objective"] == {
        "loss": {"name": "rpo_bwd_kl", "hparams": {"beta": 0.1, "eta": 10.0}, "extra": [], "weight": 1.0},
        "references": [],
        "iterations": 1,
    }


# ------------------------------------------------------------------------------------------------ meaning of 0
def _toy_task(units: int, **train) -> Task:
    cfg = base_config()
    cfg.train.update({"keep_checkpoints": 10, "async_checkpointing": False, "progress_bar": False, **train})
    cfg.metrics.tensorboard = False
    mesh = make_mesh({"data": -1}, jax.devices()[:1])
    state = on_mesh({"params": {"w": jnp.zeros((), jnp.float32)}, "step": jnp.zeros((), jnp.int32)}, mesh)
    run = RunSetup(validate(cfg), mesh, jnp.float32, None, None, None, None, state, None, None, None)

    def advance(state, unit):
        return Unit({"params": {"w": state["params"]["w"] + 1.0}, "step": state["step"] + 1}, {"loss": 0.5})

    return Task(
        mode="preference", run=run, identity={"toy": 1}, units=units, advance=advance, evaluate=lambda params, unit: {}
    )


def _saved(workdir: pathlib.Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def test_checkpoint_every_zero_means_no_periodic_checkpoint(tmp_path, monkeypatch):
    run_task(_toy_task(6, checkpoint_every=2, export_at_end=False), tmp_path / "every2")
    assert _saved(tmp_path / "every2") == [2, 4, 6]
    # 0: none on the way; the end is checkpointed only for rpo-export, when the run does not export itself
    run_task(_toy_task(6, checkpoint_every=0, export_at_end=False), tmp_path / "zero")
    assert _saved(tmp_path / "zero") == [6]
    monkeypatch.setattr(runner, "save_model", lambda *args, **kwargs: "exported")
    monkeypatch.setattr(runner, "save_adapter_at_end", lambda *args, **kwargs: None)
    result = run_task(_toy_task(6, checkpoint_every=0, export_at_end=True), tmp_path / "exported")
    assert result["export"] == "exported" and _saved(tmp_path / "exported") == []


def test_every_count_that_takes_zero_says_what_zero_means():
    silent = []
    for where, model in sections(RunConfig):
        if where.startswith("config.references"):
            continue
        for name, field in model.model_fields.items():
            if field.annotation is not int:
                continue
            key = (where.removeprefix("config").lstrip(".") + "." + name).lstrip(".").replace(".", "__")
            try:
                validate(with_values(**{key: 0}))
            except ValueError:
                continue  # 0 is refused
            if not re.search(r"(^|[^.\d])0([^.\d]|$)", field.description):
                silent.append(f"{where}.{name}")
    assert silent == []


# ------------------------------------------------------------------------------------------------ command line
def test_rpo_train_names_a_misspelt_override_in_one_line(tmp_path, capsys):
    from rpo_jax.train.cli.train import main

    with pytest.raises(SystemExit) as info:
        main(["--config.train.stepz=3", f"--workdir={tmp_path / 'run'}"])
    assert info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "rpo-train: error: config.train.stepz: no such key; did you mean 'steps'? (keys of config.train: steps, "
    )
    assert not (tmp_path / "run").exists()


def test_plain_resolves_config_dicts_and_sections():
    cfg = get_config()
    assert plain(cfg) == cfg.to_dict()
    assert plain(validate(cfg).data) == validate(cfg).data.model_dump(mode="json")
