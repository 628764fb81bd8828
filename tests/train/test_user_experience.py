"""What a new user sees: progress and timing of the long passes (reference cache fill, evaluations, export), the
wall clock in metrics.jsonl, the summary that ends a run, rpo-export's last line, a start-up free of libtpu
noise on a machine without a TPU, the SmolLM2 parity tests on the suite's fixture, and a SmolLM2 recipe for a
user's own file (the demo form in configs/smollm2_demo.py)."""

from __future__ import annotations

import ast
import datetime
import logging
import pathlib
import subprocess

import jax
import pytest

from rpo_jax.train.config.defaults import base_config
from rpo_jax.train.core.export import export_kind
from rpo_jax.train.core.metrics import MetricWriter
from rpo_jax.train.core.runner import run_task
from rpo_jax.train.jobs import preference
from rpo_jax.train.runtime.processes import cpu_without_tpu_probe, tpu_may_be_present

from .test_runner import toy_task
from .trainer_testlib import load_recipe, read_metrics, subprocess_env, tiny_config, train_command, write_config

ONE = jax.devices()[:1]
ROOT = pathlib.Path(__file__).resolve().parents[2]
#: what libtpu prints when JAX probes for a TPU on a machine without one
LIBTPU_NOISE = (
    "libtpu",
    "Failed to find host bounds",
    "Source Location Trace",
    "INVALID_ARGUMENT",
    "TPU_WORKER",
    "TPU_ACCELERATOR_TYPE",
)


def test_a_run_shows_its_progress_times_its_passes_and_ends_with_a_summary(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="rpo_jax")
    cfg = tiny_config(
        tmp_path / "data",
        **{
            "train.steps": 2,
            "train.eval_every": 1,
            "train.progress_bar": True,
            "train.export_at_end": True,
            "metrics.tensorboard": True,
        },
    )
    workdir = tmp_path / "run"
    result = preference.train(cfg, workdir, devices=ONE)
    out, err = capsys.readouterr()
    logged = caplog.text

    # the reference pre-pass: a progress bar saying what it computes (stderr, tqdm) and its time in the log
    assert "reference 0 log-probs (train split)" in err and "reference 0 log-probs (eval split)" in err
    assert "reference 0 log-probs (train split): scoring 96 records" in logged
    assert "reference 0 log-probs (train split): done in" in logged
    # every evaluation, and the export
    assert "evaluating at step 1" in logged and "evaluation at step 1 done in" in logged
    assert "evaluation at step 2 done in" in logged
    assert f"exporting the Hugging Face model to {workdir / 'export'}" in logged
    assert f"wrote the Hugging Face model to {workdir / 'export'} in" in logged

    # the summary: where everything is, and the key final eval metrics
    summary = out[out.index("rpo-train: done: step 2 of 2 in") :]
    for line in (
        f"  export:      {workdir / 'export'}",
        f"  metrics:     {workdir / 'metrics.jsonl'}",
        f"  TensorBoard: {workdir / 'tensorboard'}",
        f"  checkpoint:  {workdir / 'checkpoints' / '2'}",
    ):
        assert line in summary
    assert result["export"] == str(workdir / "export") and (workdir / "checkpoints" / "2").is_dir()
    eval_line = next(line for line in summary.splitlines() if line.startswith("  eval:"))
    assert eval_line.split()[1:] == [
        f"{k}={result['eval'][k]:.4g}" for k in ("loss", "rewards/accuracies", "rewards/margins")
    ]

    # metrics.jsonl: every record carries its wall clock (ISO 8601, UTC, seconds) and seconds since the start
    records = read_metrics(workdir)
    assert records and all({"time", "elapsed_s"} <= set(r) for r in records)
    now = datetime.datetime.now(datetime.timezone.utc)
    for r in records:
        when = datetime.datetime.fromisoformat(r["time"])
        assert when.utcoffset() == datetime.timedelta(0) and when.microsecond == 0
        assert datetime.timedelta(0) <= now - when < datetime.timedelta(minutes=10)
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0

    # rpo-export ends with one line saying what it wrote where
    from rpo_jax.train.cli.export import export_main

    export_main([str(workdir), str(tmp_path / "exported")])
    assert (
        capsys.readouterr().out.strip().splitlines()[-1]
        == f"rpo-export: wrote Hugging Face model to {tmp_path / 'exported'}"
    )


def test_the_metric_writer_stamps_every_record(tmp_path):
    started = datetime.datetime.now(datetime.timezone.utc).timestamp() - 5.0
    writer = MetricWriter(tmp_path, tensorboard=False, console=False, enabled=True, started=started)
    writer.write(3, {"loss": 0.5}, prefix="train/")
    writer.close()
    [record] = read_metrics(tmp_path)
    assert list(record)[:3] == ["step", "time", "elapsed_s"] and record["train/loss"] == 0.5
    assert 5.0 <= record["elapsed_s"] < 600
    assert record["time"].endswith("+00:00") and len(record["time"]) == len("2026-01-01T00:00:00+00:00")


def test_the_summary_of_a_preempted_and_of_a_finished_toy_run(tmp_path, capsys):
    run_task(toy_task(6, [], stop_after=2), tmp_path)  # SIGTERM during unit 3: saved after it
    out = capsys.readouterr().out
    assert "rpo-train: preempted at iteration 3 of 6 after" in out and "run the same command again" in out
    assert f"checkpoint:  {tmp_path / 'checkpoints' / '6'}" in out and "export:" not in out
    run_task(toy_task(6, []), tmp_path)  # resumes and finishes
    out = capsys.readouterr().out
    assert "rpo-train: done: iteration 6 of 6 in" in out and f"checkpoint:  {tmp_path / 'checkpoints' / '12'}" in out
    assert "  eval:        w=6" in out  # no key metric of preference training: the evaluation's first ones


def test_export_kinds_name_what_was_written():
    assert export_kind("preference") == export_kind("online") == "Hugging Face model"
    assert export_kind("reward_model") == "reward model"
    assert export_kind("preference", adapter=True) == "PEFT adapter"


# ------------------------------------------------------------------------------------------------ libtpu noise
def test_the_tpu_probe_is_skipped_only_where_no_tpu_or_gpu_can_be(monkeypatch):
    from jax._src import hardware_utils

    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (0, None))
    nothing = lambda pattern: False  # noqa: E731
    assert not tpu_may_be_present({}, nothing) and cpu_without_tpu_probe({}, nothing)
    # the user chose (JAX_PLATFORMS, even empty), or a TPU / GPU may be here: JAX decides as it always did
    assert not cpu_without_tpu_probe({"JAX_PLATFORMS": ""}, nothing)
    for environ in ({"TPU_ACCELERATOR_TYPE": "v5p-8"}, {"TPU_WORKER_HOSTNAMES": "h0,h1"}, {"JAX_FORCE_TPU_INIT": "1"}):
        assert tpu_may_be_present(environ, nothing) and not cpu_without_tpu_probe(environ, nothing)
    for device in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia*", "/dev/kfd"):
        assert not cpu_without_tpu_probe({}, lambda pattern, device=device: pattern == device), device
    monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id", lambda: (4, 5))  # a TPU on PCI
    assert tpu_may_be_present({}, nothing) and not cpu_without_tpu_probe({}, nothing)


def test_rpo_train_prints_no_libtpu_errors_on_a_machine_without_a_tpu(tmp_path):
    """A tiny run in its own process, JAX_PLATFORMS unset as a user's shell has it (libtpu allowed to load beside
    other processes, so that a probe would print what it prints on a fresh machine)."""
    env = {k: v for k, v in subprocess_env().items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    if not cpu_without_tpu_probe(env):
        pytest.skip("this machine may have a TPU or a GPU: JAX's own choice applies there")
    cfg = tiny_config(tmp_path / "data", **{"train.steps": 1, "train.checkpoint_every": 1})
    done = subprocess.run(
        train_command(write_config(cfg, tmp_path / "tiny.py"), tmp_path / "run"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [n for n in LIBTPU_NOISE if n.lower() in done.stderr.lower()] == [], done.stderr[-3000:]
    assert "rpo-train: done: step 1 of 1" in done.stdout


# ------------------------------------------------------------------------------------------------ tests, recipes
def test_the_smollm2_parity_tests_take_the_suites_checkpoint_fixture():
    source = (ROOT / "tests" / "train" / "test_trl_parity.py").read_text()
    tests = [
        f for f in ast.walk(ast.parse(source)) if isinstance(f, ast.FunctionDef) and f.name.startswith("test_smollm2")
    ]
    assert len(tests) == 2
    for test in tests:
        assert "smollm2_dir" in [a.arg for a in test.args.args], test.name
        assert "skipif" not in ast.unparse(test), test.name
    assert "~/.cache/rpo_jax" not in source


def test_the_smollm2_recipe_trains_on_a_users_file_and_the_demo_form_keeps_the_demo():
    recipe, demo, default = load_recipe("smollm2"), load_recipe("smollm2_demo"), base_config()
    assert recipe.data.train not in ("", "demo") and recipe.data.eval != "demo" and recipe.data.pairs == ""
    assert recipe.reference_mode == default.reference_mode
    assert (recipe.data.max_length, recipe.data.max_prompt_length) == (1024, 512)  # TRL's DPOConfig defaults
    assert recipe.train.epochs > 0 and recipe.data.eval_fraction > 0  # any file size; held out unless data.eval
    assert (demo.data.train, demo.data.eval, demo.data.pairs, demo.reference_mode) == (
        "demo",
        "demo",
        "best_worst",
        "in_step",
    )
    assert (demo.data.max_length, demo.data.max_prompt_length, demo.train.steps) == (128, 64, 30)
