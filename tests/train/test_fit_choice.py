"""A run that does not fit picks lighter settings before it gives up (`rpo_jax.train.build.fit.lighter_settings`,
`fitting_run`): the ladder of result-preserving settings, the choice logged, and on long rows a trainer that
switches to blockwise attention inside a budget the dense step misses — with the dense run's results."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from rpo_jax.train.build.fit import DoesNotFit, fitting_run, lighter_settings, settings_flags
from rpo_jax.train.config.validation import validate, with_settings

from .trainer_testlib import read_metrics, tiny_config

GiB = 2**30


def _config(tmp_path, **overrides):
    return validate(tiny_config(tmp_path / "data", **overrides))


def test_the_ladder_adds_one_result_preserving_setting_per_rung(tmp_path):
    cfg = _config(tmp_path)  # attention "auto", remat "none", batch 8, one micro-batch
    assert lighter_settings(cfg, shards=1, backend="cpu") == [
        {"model.attention": "blockwise"},
        {"model.attention": "blockwise", "model.remat": "full"},
        {"model.attention": "blockwise", "model.remat": "full", "data.micro_batches": 2},
        {"model.attention": "blockwise", "model.remat": "full", "data.micro_batches": 4},
        {"model.attention": "blockwise", "model.remat": "full", "data.micro_batches": 8},
    ]
    # a GPU keeps its kernel ("auto" → cuDNN where it applies); 2 data shards: micro-batches of ≥ 1 per shard
    assert lighter_settings(cfg, shards=2, backend="gpu") == [
        {"model.remat": "full"},
        {"model.remat": "full", "data.micro_batches": 2},
        {"model.remat": "full", "data.micro_batches": 4},
    ]
    set_already = with_settings(cfg, {"model.attention": "blockwise", "model.remat": "dots", "data.micro_batches": 8})
    assert lighter_settings(set_already, shards=1, backend="cpu") == []
    assert settings_flags({"model.remat": "full", "data.micro_batches": 2}) == (
        "--config.model.remat=full --config.data.micro_batches=2"
    )


def _needs(table: dict[str, float], held: float = 2.0):
    """A check that raises `DoesNotFit` for a candidate (a settings dict) needing more than 10 GiB, `held` GiB of
    it outside the step."""

    def check(settings):
        need = table[settings_flags(settings)] * GiB
        if need > 10 * GiB:
            message = f"the run does not fit in memory: it needs {need / GiB:.2f} GiB"
            raise DoesNotFit(message, int(need), 10 * GiB, int(held * GiB))

    return check


def test_the_first_rung_that_fits_is_chosen_and_logged(tmp_path, caplog):
    cfg = _config(tmp_path)
    ladder = [settings_flags(s) for s in lighter_settings(cfg, 1, "cpu")]
    check = _needs({"": 30.0, ladder[0]: 20.0, ladder[1]: 9.0, ladder[2]: 5.0, ladder[3]: 4.0, ladder[4]: 3.0})
    tried = []

    def lighten(settings):
        tried.append(settings)
        return settings

    with caplog.at_level(logging.INFO):
        chosen = fitting_run({}, check, lighten, cfg, 1)
    assert chosen == {"model.attention": "blockwise", "model.remat": "full"}
    assert tried == lighter_settings(cfg, 1)[:2]  # nothing lighter (slower) than needed is tried
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert warning == (
        "fit check: the configured settings need 30.00 GiB, over the budget of 10.00 GiB; running with "
        "--config.model.attention=blockwise --config.model.remat=full instead (the same results; put them in "
        "the config to skip this search)"
    )
    # the configured settings fit: nothing else is tried
    assert fitting_run({}, _needs({"": 1.0}), lighten, cfg, 1) == {} and len(tried) == 2


def test_when_nothing_fits_the_configured_error_says_what_the_lightest_still_needs(tmp_path):
    cfg = _config(tmp_path)
    ladder = [settings_flags(s) for s in lighter_settings(cfg, 1, "cpu")]
    check = _needs({"": 30.0, **{flags: 20.0 - i for i, flags in enumerate(ladder)}})
    with pytest.raises(DoesNotFit) as e:
        fitting_run({}, check, lambda s: s, cfg, 1)
    assert (
        str(e.value)
        == f"the run does not fit in memory: it needs 30.00 GiB (tried: {ladder[-1]} still needs 16.00 GiB)"
    )
    assert (e.value.need, e.value.budget) == (30 * GiB, 10 * GiB)
    # what the run holds outside the step passes the budget already: nothing is tried
    tried = []
    with pytest.raises(DoesNotFit) as e:
        fitting_run({}, _needs({"": 30.0}, held=12.0), tried.append, cfg, 1)
    assert str(e.value) == (
        "the run does not fit in memory: it needs 30.00 GiB (what the run holds outside the step, 12.00 GiB, "
        "passes the budget already: no lighter setting of the step can fit)"
    )
    assert tried == []


def _long_rows(directory, n: int = 8, length: int = 1000):
    """`n` prompt/chosen/rejected records of ~`length` demo characters each (one token per character)."""
    rng = np.random.default_rng(0)
    chars = list("0123456789 abcdefghij")
    text = lambda m: "".join(rng.choice(chars, size=m))  # noqa: E731
    path = directory / "long.jsonl"
    directory.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": text(200), "chosen": text(length), "rejected": text(length)}) + "\n")
    return str(path)


@pytest.mark.slow
def budget_between_dense_and_blockwise(train, margin: float) -> dict:
    """`{"train.memory_budget": ...}` halfway between what `train(overrides)` needs as configured and with
    blockwise attention, each read from its refusal of a budget of 1 byte; the two must differ by `margin`."""

    def need(**more):
        with pytest.raises(DoesNotFit) as e:
            train({"train.memory_budget": "1B", **more})
        return e.value.need

    dense, blockwise = need(), need(**{"model.attention": "blockwise"})
    assert dense - blockwise > margin, (dense / GiB, blockwise / GiB)
    return {"train.memory_budget": f"{(dense + blockwise) // 2}B"}


def assert_chose_blockwise(caplog) -> None:
    """The fit check's warning says the run took blockwise attention instead of the configured one."""
    warning = next(
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "fit check" in r.getMessage()
    )
    assert "running with --config.model.attention=blockwise instead" in warning


def test_a_long_row_run_switches_to_blockwise_attention_and_trains_as_the_dense_run(tmp_path, caplog):
    """Rows of ~1,200 tokens: the dense step's [N, H, T, T] scores make its need ≥ 0.5 GiB more than the blockwise
    step's; a budget halfway between makes the trainer choose blockwise attention (logged), and the run's losses
    equal the dense run's (budget off) to float32 rounding."""
    from rpo_jax.train.jobs.preference import build_run, check_memory, lighter_run, run_steps, train

    data = _long_rows(tmp_path / "long")
    overrides = {
        "data.train": data,
        "loss.name": "dpo",
        "loss.hparams": {"beta": 0.1},
        "data.eval": "",
        "data.eval_fraction": 0.0,
        "data.max_length": 1280,
        "data.max_prompt_length": 256,
        "data.batch_size": 8,
        "data.packing": False,
        "model.score_window": "off",
        "model.attention": "xla",  # dense; "auto" would already take blockwise for rows this long on the CPU
        "model.init.max_position_embeddings": 2048,
        "model.init.num_attention_heads": 4,
        "model.init.num_key_value_heads": 2,
        "model.init.head_dim": 8,
        "train.steps": 2,
        "train.checkpoint_every": 0,
    }
    cfg = tiny_config(tmp_path / "data", **overrides, **{"train.memory_budget": "1B"})
    run = build_run(cfg, tmp_path / "probe")
    needs = []
    for candidate in (run, lighter_run(run, {"model.attention": "blockwise"})):
        with pytest.raises(DoesNotFit) as e:
            check_memory(candidate, run_steps(candidate))
        needs.append(e.value.need)
    dense, blockwise = needs
    assert dense - blockwise > 0.5 * GiB, (dense / GiB, blockwise / GiB)
    budget = (dense + blockwise) // 2  # the same process: its resident set is part of both needs
    del run

    cfg = tiny_config(
        tmp_path / "data", **overrides, **{"train.memory_budget": f"{budget}B", "train.export_at_end": True}
    )
    with caplog.at_level(logging.INFO):
        train(cfg, tmp_path / "chosen")  # the export checks the model's config against the run's
    assert_chose_blockwise(caplog)
    train(tiny_config(tmp_path / "data", **overrides, **{"train.memory_budget": "0"}), tmp_path / "dense")
    chosen = [m["train/loss"] for m in read_metrics(tmp_path / "chosen") if "train/loss" in m]
    reference = [m["train/loss"] for m in read_metrics(tmp_path / "dense") if "train/loss" in m]
    assert len(chosen) == 2
    np.testing.assert_allclose(chosen, reference, rtol=1e-5)


@pytest.mark.slow
def test_a_long_row_reward_model_run_switches_to_blockwise_attention_and_trains_as_the_dense_run(tmp_path, caplog):
    """The same ladder in reward-model training: a budget between the dense and the blockwise step's needs (each
    read from the one-line refusal of a budget of 1 byte) makes the run choose blockwise, with the dense run's
    losses."""
    from rpo_jax.train.jobs import reward_model

    from .test_reward_model_training import tiny_config as reward_config

    data = _long_rows(tmp_path / "long")
    overrides = {
        "data.train": data,
        "data.eval": "",
        "data.eval_fraction": 0.0,
        "data.max_length": 1280,
        "data.max_prompt_length": 256,
        "data.truncation": "drop",
        "model.attention": "xla",
        "model.init.max_position_embeddings": 2048,
        "model.init.num_attention_heads": 4,
        "model.init.num_key_value_heads": 2,
        "model.init.head_dim": 8,
        "train.steps": 2,
        "train.checkpoint_every": 0,
    }

    def train(more, workdir="probe"):
        reward_model.train_reward_model(reward_config(tmp_path / "data", **{**overrides, **more}), tmp_path / workdir)

    budget = budget_between_dense_and_blockwise(train, 0.5 * GiB)
    with caplog.at_level(logging.INFO):
        train(budget, "chosen")
    assert_chose_blockwise(caplog)
    train({"train.memory_budget": "0"}, "dense")
    chosen = [m["train/loss"] for m in read_metrics(tmp_path / "chosen") if "train/loss" in m]
    reference = [m["train/loss"] for m in read_metrics(tmp_path / "dense") if "train/loss" in m]
    assert len(chosen) == 2
    np.testing.assert_allclose(chosen, reference, rtol=1e-5)


def distinct_characters(prompt: str, response: str) -> float:
    """A reward that varies between a random model's samples: the response's distinct characters / 10."""
    return len(set(response)) / 10


@pytest.mark.slow
def test_an_online_run_over_its_budget_switches_to_blockwise_attention_and_trains_as_the_dense_run(tmp_path, caplog):
    """The ladder in online training: prompts left-padded to 1,000 tokens make the dense update step and sampler
    large; a budget between the configured and the blockwise run's needs (each read from the refusal of a budget
    of 1 byte) makes the run choose blockwise attention for its update step and its sampler — with the
    configured run's samples, rewards and losses."""
    from rpo_jax.train.jobs import online

    from .test_online import online_config

    overrides = {
        "model.path": "",
        "model.init": {
            "model_type": "llama",
            "vocab_size": 128,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 2048,
        },
        "model.attention": "xla",
        "data.max_prompt_length": 1000,
        "data.max_length": 1020,
        "online.iterations": 1,
        "online.prompts_per_iteration": 8,
        "data.batch_size": 8,
        "online.updates_per_iteration": 1,
        "train.checkpoint_every": 0,
        "online.reward_judge": f"{__name__}:distinct_characters",
    }

    def train(more, workdir="probe"):
        online.train_online(online_config("", **{**overrides, **more}), tmp_path / workdir)

    budget = budget_between_dense_and_blockwise(train, 0.3 * GiB)
    with caplog.at_level(logging.INFO):
        train(budget, "chosen")
    assert_chose_blockwise(caplog)
    train({"train.memory_budget": "0"}, "dense")
    keys = ("online/loss", "online/reward", "online/response_length")
    chosen = [[m[k] for k in keys] for m in read_metrics(tmp_path / "chosen") if "online/loss" in m]
    reference = [[m[k] for k in keys] for m in read_metrics(tmp_path / "dense") if "online/loss" in m]
    assert len(chosen) == 1 and chosen[0][1] > 0 and abs(chosen[0][0]) > 1e-3  # samples that differ in reward
    np.testing.assert_allclose(chosen, reference, rtol=1e-5)
