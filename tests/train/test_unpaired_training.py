"""Training on unpaired records (KTO, APO-zero unpaired, BCO) end to end: `rpo-train --from-trl kto.yaml` on an unpaired
file trains and exports; bad unpaired input is one line naming the record (or, for a file of one label, TRL's
warning); BCO's running moments are checkpointed and resumed; the micro-batch order and the metrics' rules."""

from __future__ import annotations

import json
import logging
import math
import pathlib
import shutil
import subprocess

import jax
import numpy as np
import pytest
import yaml

from rpo_jax.data import RecordError
from rpo_jax.train.build.loss_inputs import micro_batch_order
from rpo_jax.train.jobs import preference
from rpo_jax.train.step.unpaired_steps import combine_micro_metrics, drop_empty_labels

from .trainer_testlib import final_params, read_metrics, subprocess_env, tiny_config, train_command, write_config

ONE = jax.devices()[:1]


def unpaired_file(path: pathlib.Path, n: int = 16, labels=None) -> pathlib.Path:
    """`n` unpaired demo-like records (sort the digits), desirable when sorted; `labels` overrides them."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        digits = [str(d) for d in rng.integers(0, 10, size=3)]
        good = i % 3 != 2
        completion = " ".join(sorted(digits) if good else digits[::-1])
        label = good if labels is None else labels[i]
        lines.append({"prompt": f"sort: {' '.join(digits)}", "completion": completion, "label": label})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def unpaired_config(root: pathlib.Path, name: str = "kto", **overrides):
    data = unpaired_file(root / "unpaired.jsonl")
    fields = {
        "loss.name": name,
        "loss.hparams": {"beta": 0.1},
        "data.train": str(data),
        "data.eval": str(data),
        "data.shuffle": False,
        "data.max_length": 32,
        "data.max_prompt_length": 16,
        "train.steps": 2,
        **overrides,
    }
    return tiny_config(root / "demo", **fields)


# ------------------------------------------------------------------------------------------------ end to end
def test_rpo_train_from_trl_kto_yaml_trains_on_an_unpaired_file_and_exports(tmp_path):
    """The command line of a TRL user: a KTOConfig YAML (`trainer: kto`), the model and the data as overrides."""
    recipe = write_config(tiny_config(tmp_path / "demo"), tmp_path / "tiny.py")
    kto = tmp_path / "kto.yaml"
    kto.write_text(
        yaml.safe_dump(
            {
                "trainer": "kto",
                "beta": 0.1,
                "desirable_weight": 1.0,
                "undesirable_weight": 1.2,
                "per_device_train_batch_size": 4,
                "max_steps": 3,
                "max_length": 32,
                "learning_rate": 1e-3,
                "bf16": False,
                "gradient_checkpointing": False,
                "logging_steps": 1,
            }
        )
    )
    data = unpaired_file(tmp_path / "feedback.jsonl")
    command = train_command(recipe, tmp_path / "run") + [
        "--from-trl",
        str(kto),
        f"--config.data.train={data}",
        "--config.data.eval=",
        "--config.train.export_at_end=True",
    ]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(TRL 1.16.0 KTOConfig → rpo_jax config)" in done.stdout
    assert "loss_type='kto' → loss.name='kto'" in done.stdout and "rpo-train: done: step 3 of 3" in done.stdout
    # 16 records: 11 desirable, 5 undesirable — TRL's advice for these weights is logged
    assert "we recommend EITHER desirable_weight in" in done.stderr
    logged = [m for m in read_metrics(tmp_path / "run") if "train/loss" in m]
    assert len(logged) == 3 and all(math.isfinite(m["train/kl"]) for m in logged)
    assert logged[-1]["train/count/chosen"] + logged[-1]["train/count/rejected"] == 4
    export = tmp_path / "run" / "export"
    assert (export / "config.json").exists() and list(export.glob("*.safetensors"))


def test_bco_running_moments_are_checkpointed_and_a_resumed_run_ends_as_an_uninterrupted_one(tmp_path):
    cfg = unpaired_config(tmp_path, "bco", **{"train.steps": 4, "train.checkpoint_every": 2, "data.micro_batches": 2})
    done = preference.train(cfg, tmp_path / "run", devices=ONE)
    import orbax.checkpoint as ocp

    def moments(step):
        state = ocp.StandardCheckpointer().restore(tmp_path / "run" / "checkpoints" / str(step) / "state")
        return {k: float(v) for k, v in state["loss_state"].items()}

    straight, params = moments(4), final_params(tmp_path / "run")
    assert moments(2)["count"] == 16 and straight["count"] == 32  # 8 rows a step, every micro-batch counted
    assert math.isfinite(done["train"]["delta"]) and straight["mean"] != 0.0
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
    preference.train(cfg, tmp_path / "run", devices=ONE)  # resumes at step 2
    assert moments(4) == straight
    resumed = final_params(tmp_path / "run")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed)))


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "sort: 2 1", "completion": "1 2"}, "label: missing field"),
        ({"prompt": "sort: 2 1", "completion": "1 2", "label": "true"}, "label: expected true or false"),
        ({"prompt": "sort: 2 1", "completion": "", "label": True}, "completion: empty"),
    ],
)
def test_a_bad_unpaired_record_is_one_line_naming_file_and_line(tmp_path, record, message):
    data = unpaired_file(tmp_path / "bad.jsonl", n=4)
    with data.open("a") as f:
        f.write(json.dumps(record) + "\n")
    cfg = unpaired_config(tmp_path, **{"data.train": str(data), "data.eval": ""})
    with pytest.raises(RecordError) as info:
        preference.build_run(cfg, tmp_path / "run", devices=ONE)
    assert str(info.value).startswith(f"{data}:5: {message}") and "\n" not in str(info.value)


def test_a_file_of_pairs_needs_data_unpair_and_then_trains_unpaired(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"sort: {i} 1", "chosen": f"1 {i}", "rejected": f"{i} 1"}) + "\n"
                             for i in range(2, 10)))  # fmt: skip
    cfg = unpaired_config(tmp_path, **{"data.train": str(pairs), "data.eval": ""})
    with pytest.raises(ValueError, match=f"^{pairs}: labelled pairs, but loss 'kto' trains on unpaired records"):
        preference.build_run(cfg, tmp_path / "run", devices=ONE)
    cfg = unpaired_config(tmp_path, **{"data.train": str(pairs), "data.eval": "", "data.unpair": True})
    run = preference.build_run(cfg, tmp_path / "run", devices=ONE)
    train = run.datasets["train"]
    assert len(train) == 16 and train.k_max == 2 and (train.balance.desirable, train.balance.undesirable) == (8, 8)
    assert [r.label for r in train.records] == [True] * 8 + [False] * 8  # TRL's unpair order
    blocks = unpaired_config(tmp_path, **{"data.train": str(pairs), "data.eval": "", "data.unpair": True})
    blocks.data.unpair_block = 4  # 4 pairs' desirable completions, then their undesirable ones
    records = preference.build_run(blocks, tmp_path / "blocks", devices=ONE).datasets["train"].records
    assert [r.label for r in records] == ([True] * 4 + [False] * 4) * 2
    assert [r.prompt_text for r in records[:8]] == [f"sort: {i} 1" for i in (2, 3, 4, 5) * 2]


def test_a_file_of_one_label_trains_with_a_warning(tmp_path, caplog):
    data = unpaired_file(tmp_path / "all_good.jsonl", n=8, labels=[True] * 8)
    cfg = unpaired_config(tmp_path, "apo_zero_unpaired", **{"data.train": str(data), "data.eval": ""})
    with caplog.at_level(logging.WARNING):
        run = preference.build_run(cfg, tmp_path / "run", devices=ONE)
    assert "all 8 records are desirable and none is undesirable" in caplog.text
    assert run.datasets["train"].balance.total == 8


# ------------------------------------------------------------------------------------------------ rules
def test_micro_batch_order_gives_micro_batch_m_the_m_th_block_of_consecutive_rows():
    order = micro_batch_order(8, 2)  # the step's micro-batch m takes rows m, m + 2, ...
    assert order.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert [order[m::2].tolist() for m in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert micro_batch_order(6, 4).tolist() == list(range(6))  # not divisible: left as it is


def test_a_labels_metrics_average_over_the_micro_batches_with_rows_of_it_and_are_left_out_without_any():
    stacked = {
        "count/chosen": np.array([3.0, 0.0]),
        "count/rejected": np.array([1.0, 4.0]),
        "rewards/chosen": np.array([0.6, 0.0]),
        "logps/chosen": np.array([-9.0, 0.0]),
        "rewards/rejected": np.array([0.2, -0.4]),
        "logps/rejected": np.array([-5.0, -7.0]),
        "rewards/margins": np.array([0.4, 0.4]),
        "kl": np.array([0.5, 1.5]),
    }
    out = {k: float(v) for k, v in combine_micro_metrics(stacked).items()}
    assert out["rewards/chosen"] == pytest.approx(0.6) and out["logps/chosen"] == pytest.approx(-9.0)
    assert out["rewards/rejected"] == pytest.approx(-0.1) and out["kl"] == pytest.approx(1.0)
    assert out["rewards/margins"] == pytest.approx(0.4)  # only micro-batch 0 has both labels
    assert (out["count/chosen"], out["count/rejected"]) == (3.0, 5.0)
    none = combine_micro_metrics({**stacked, "count/chosen": np.array([0.0, 0.0])})
    logged = drop_empty_labels({k: float(v) for k, v in none.items()})
    assert "rewards/chosen" not in logged and "logps/chosen" not in logged and "rewards/margins" not in logged
    assert "rewards/rejected" in logged and logged["count/chosen"] == 0.0
    paired = drop_empty_labels({"rewards/margins": float("nan"), "loss": 1.0})  # a paired loss's: left as it is
    assert sorted(paired) == ["loss", "rewards/margins"]
