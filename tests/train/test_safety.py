"""Nothing lost, nothing silent, on real runs: resuming a directory with another run, divergence, exports into a
run, broken tokenizers and data, one-line errors without shutdown noise, and chaos-tested resume."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rpo_jax.train.build.data import load_tokenizer
from rpo_jax.train.core import export
from rpo_jax.train.core.export import export_workdir
from rpo_jax.train.core.runner import NonFiniteError, ResumeError
from rpo_jax.train.jobs import preference
from rpo_jax.train.step.steps import apply_gradients

from .trainer_testlib import (
    TINY_MODEL,
    final_params,
    read_metrics,
    steps_saved,
    subprocess_env,
    tiny_config,
    train_command,
    write_config,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
ONE = jax.devices()[:1]
#: plain SGD with an absurd step and no clipping: the loss explodes at step 2 and the gradient is inf/NaN from 3 on
DIVERGES = {
    "optimizer.name": "sgd",
    "optimizer.learning_rate": 1e6,
    "optimizer.schedule": "constant",
    "optimizer.warmup_steps": 0,
    "optimizer.grad_clip_norm": 0.0,
    "optimizer.weight_decay": 0.0,
}


def error_lines(stderr: str, program: str = "rpo-train") -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{program}: error:")]


def test_resuming_a_run_with_another_model_is_refused_and_the_run_kept(tmp_path):
    """Today's failure: the old checkpoints fail to restore, the new model trains from scratch and rotates them
    out, exit 0. Now: exit 1, one line naming the differences, checkpoints and config untouched."""
    workdir = tmp_path / "run"
    first = write_config(tiny_config(tmp_path / "data", **{"train.steps": 4}), tmp_path / "first.py")
    subprocess.run(train_command(first, workdir), env=subprocess_env(), check=True, capture_output=True)
    config_before = (workdir / "config.json").read_text()
    changed = write_config(
        tiny_config(tmp_path / "data", **{"train.steps": 6, "model.init": {**TINY_MODEL, "hidden_size": 48}}),
        tmp_path / "changed.py",
    )
    result = subprocess.run(train_command(changed, workdir), env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert "holds checkpoints (steps 2, 4) of another run" in line
    assert "model.architecture.hidden_size: 32 → 48" in line and "model.weights" in line
    assert "Traceback" not in result.stderr + result.stdout
    assert steps_saved(workdir) == [2, 4] and (workdir / "config.json").read_text() == config_before
    assert "ResumeError" in (workdir / "errors.log").read_text()  # the traceback is kept, not shown


def test_a_changed_loss_is_refused_unless_forced(tmp_path):
    cfg = tiny_config(tmp_path / "data", **{"train.steps": 2})
    preference.train(cfg, tmp_path / "run", devices=ONE)
    ipo = tiny_config(tmp_path / "data", **{"train.steps": 4, "loss.name": "ipo", "loss.hparams": {"beta": 0.1}})
    with pytest.raises(ResumeError, match=r'objective.loss.name: "rpo_bwd_kl" → "ipo"'):
        preference.train(ipo, tmp_path / "run", devices=ONE)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loss"]["name"] == "rpo_bwd_kl"
    ipo.train.resume = "force"
    assert preference.train(ipo, tmp_path / "run", devices=ONE)["step"] == 4
    assert json.loads((tmp_path / "run" / "config.json").read_text())["loss"]["name"] == "ipo"


def test_divergence_stops_the_run_nonzero_and_keeps_the_last_good_checkpoint(tmp_path):
    """Today's failure: NaN from step 3 on, NaN checkpoints saved, exit 0."""
    workdir = tmp_path / "run"
    config = write_config(tiny_config(tmp_path / "data", **DIVERGES), tmp_path / "config.py")
    result = subprocess.run(train_command(config, workdir), env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert "step 3: non-finite training values" in line and "the newest checkpoint, step 2, is kept" in line
    assert "Traceback" not in result.stderr + result.stdout  # no shutdown noise after the real error
    assert steps_saved(workdir) == [2]
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(final_params(workdir)))
    assert max(m["step"] for m in read_metrics(workdir)) == 2


def test_skip_step_trains_on_with_the_bad_steps_counted(tmp_path):
    cfg = tiny_config(
        tmp_path / "data", **DIVERGES, **{"train.on_nonfinite": "skip_step", "train.max_skipped_in_a_row": 100}
    )
    result = preference.train(cfg, tmp_path / "run", devices=ONE)
    assert result["step"] == 6 and result["train"]["skipped_steps"] == 4.0  # steps 3-6
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(final_params(tmp_path / "run")))
    cfg.train.max_skipped_in_a_row = 2
    with pytest.raises(NonFiniteError, match=r"step 4: .*\(2 in a row, config.train.max_skipped_in_a_row=2\)"):
        preference.train(cfg, tmp_path / "stops", devices=ONE)


def test_a_skipped_step_leaves_parameters_and_optimizer_state_as_they_were():
    params = {"w": jnp.arange(3.0)}
    tx = optax.adam(0.1)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(5), "rng": jnp.zeros(2, jnp.uint32)}
    bad = {"w": jnp.array([1.0, jnp.nan, 0.0])}
    new, metrics = apply_gradients(state, bad, jnp.float32(0.3), {}, tx, skip_nonfinite=True)
    jax.tree.map(np.testing.assert_array_equal, new["params"], params)
    jax.tree.map(np.testing.assert_array_equal, new["opt_state"], state["opt_state"])
    assert int(new["step"]) == 6 and float(metrics["nonfinite"]) == 1.0
    good, metrics = apply_gradients(state, {"w": jnp.ones(3)}, jnp.float32(0.3), {}, tx, skip_nonfinite=True)
    updates, _ = tx.update({"w": jnp.ones(3)}, state["opt_state"], params)  # a finite step: optax's own update
    np.testing.assert_array_equal(good["params"]["w"], optax.apply_updates(params, updates)["w"])
    assert float(metrics["nonfinite"]) == 0.0
    _, metrics = apply_gradients(state, {"w": jnp.ones(3)}, jnp.float32(jnp.inf), {}, tx)
    assert float(metrics["nonfinite"]) == 1.0


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    preference.train(tiny_config(root / "data", **{"train.steps": 2}), root / "run", devices=ONE)
    return root / "run"


def test_exports_never_write_into_a_run(finished_run, tmp_path):
    config_before = (finished_run / "config.json").read_text()
    for target, how in (
        (finished_run, "is the run directory"),
        (finished_run / "checkpoints" / "mine", "is inside the run directory"),
    ):
        with pytest.raises(ValueError, match=how):
            export_workdir(finished_run, target)
    assert (finished_run / "config.json").read_text() == config_before
    assert not (finished_run / "checkpoints" / "mine").exists()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not an earlier export"):
        export_workdir(finished_run, other)
    assert (other / "todo.txt").read_text() == "keep me"


def test_an_export_is_atomic_and_gets_normal_permissions(finished_run, tmp_path, monkeypatch):
    out = tmp_path / "exported"
    old_umask = os.umask(0o022)
    try:
        export_workdir(finished_run, out)
    finally:
        os.umask(old_umask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o644"}
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(model, config, out_dir, tokenizer=None, **_):
        (pathlib.Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # killed while writing

    monkeypatch.setitem(export.EXPORTERS, "preference", export.Exporter(build=export.load_policy, save=interrupted))
    with pytest.raises(KeyboardInterrupt):
        export_workdir(finished_run, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no partial directory left


def test_a_corrupted_run_exports_with_one_error_line_and_no_shutdown_noise(tmp_path):
    workdir = tmp_path / "run"
    config = write_config(tiny_config(tmp_path / "data", **{"train.steps": 4}), tmp_path / "config.py")
    subprocess.run(train_command(config, workdir), env=subprocess_env(), check=True, capture_output=True)
    for f in (workdir / "checkpoints").rglob("*"):
        if f.is_file() and "params" in f.parts and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from rpo_jax.train.cli.export import export_main; export_main()",
            str(workdir),
            str(tmp_path / "out"),
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    [line] = error_lines(result.stderr, "rpo-export")
    assert "no restorable checkpoint" in line
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model.nope=1", "config.model.nope: no such key (keys of config.model: path, "),
        ("--config.train.stepz=3", "config.train.stepz: no such key; did you mean 'steps'?"),
        ("--config.data.batch_size=-4", "config.data.batch_size=-4: expected ≥ 1"),
        ("--config=no/such/recipe.py", "No such file or directory: 'no/such/recipe.py'"),
    ],
)
def test_a_bad_config_on_the_command_line_is_one_error_line(tmp_path, override, message):
    result = subprocess.run(
        [sys.executable, "-m", "rpo_jax.train.cli", override, f"--workdir={tmp_path / 'run'}"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    [line] = error_lines(result.stderr, "rpo-train")
    assert message in line and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_tokenizer_that_is_missing_or_broken_names_its_directory(tmp_path):
    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=f"{empty}: no tokenizer in this directory"):
        load_tokenizer(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"{broken}: the tokenizer does not load"):
        load_tokenizer(str(broken))


def test_every_record_skipped_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b", "chosen": "x"}\n')
    cfg = tiny_config(tmp_path / "data", **{"data.train": str(bad), "data.eval": "", "data.on_error": "skip"})
    with pytest.raises(ValueError, match=f"{bad}: all 2 records were skipped"):
        preference.train(cfg, tmp_path / "run", devices=ONE)


def test_chaos_three_kills_end_like_an_uninterrupted_run(tmp_path):
    """The short version of benchmarks/chaos_resume.py: kill -9 three times, resume each time; parameters,
    export and every logged value equal the uninterrupted run's, one metrics record per logged step."""
    spec = importlib.util.spec_from_file_location("chaos_resume", REPO / "benchmarks" / "chaos_resume.py")
    chaos_resume = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chaos_resume)
    data = tiny_config(tmp_path / "data")
    report = chaos_resume.chaos(
        tmp_path / "chaos",
        kills=3,
        seed=1,
        overrides={
            "model.init": dict(TINY_MODEL),
            "data.train": data.data.train,
            "data.eval": data.data.eval,
            "data.batch_size": 8,
            "data.eval_batch_size": 8,
            "train.steps": 30,
            "train.log_every": 3,
            "train.eval_every": 10,
            "train.checkpoint_every": 4,
        },
    )
    assert report["ok"], report
