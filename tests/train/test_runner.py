"""The run skeleton (rpo_jax.train.core.runner) on a toy task: cadence, checkpoints and resume in units of
`steps_per_unit` optimizer steps, evaluation at start / every N / at the end, SIGTERM, the throughput window,
the run identity on resume, the divergence guard and metrics that stay one record per logged step."""

from __future__ import annotations

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import pytest

from rpo_jax.models.sharding import make_mesh
from rpo_jax.train.build.state import RunSetup, on_mesh
from rpo_jax.train.config.defaults import base_config
from rpo_jax.train.core.checkpoint import Checkpointer
from rpo_jax.train.core.runner import NonFiniteError, ResumeError, Task, Unit, run_task
from rpo_jax.train.runtime import performance
from rpo_jax.train.runtime.performance import Throughput

IDENTITY = {"mode": "preference", "model": {"architecture": {"hidden_size": 4}}, "objective": {"loss": "dpo"}}


def toy_config(**train):
    c = base_config()
    c.train.checkpoint_every = 2
    c.train.keep_checkpoints = 10
    c.train.async_checkpointing = False
    c.train.progress_bar = False
    c.train.export_at_end = False
    c.metrics.tensorboard = False
    c.train.update(train)
    return c


def toy_task(units: int, log, *, stop_after: int | None = None, identity=IDENTITY, nonfinite=(), **train) -> Task:
    """Each unit adds 1 to w and takes 2 optimizer steps; `log` records every call the skeleton makes; the units
    in `nonfinite` report a NaN loss."""
    mesh = make_mesh({"data": -1}, jax.devices()[:1])
    state = on_mesh({"params": {"w": jnp.zeros((), jnp.float32)}, "step": jnp.zeros((), jnp.int32)}, mesh)
    run = RunSetup(toy_config(**train), mesh, jnp.float32, None, None, None, None, state, None, None, None)

    def advance(state, unit):
        log.append(("advance", unit))
        if unit == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        w = state["params"]["w"] + 1.0
        bad = unit + 1 in nonfinite
        metrics = {
            "w": w,
            "loss": jnp.float32(jnp.nan if bad else 0.5),
            "grad_norm": jnp.float32(1.0),
            "nonfinite": jnp.float32(bad),
        }
        return Unit({"params": {"w": w}, "step": state["step"] + 2}, metrics, {"items": 3.0})

    def evaluate(params, unit):
        log.append(("evaluate", unit))
        return {"w": float(params["w"])}

    return Task(
        mode="preference",
        run=run,
        identity=identity,
        units=units,
        advance=advance,
        evaluate=evaluate,
        data_state=lambda unit: {"position": unit},
        restore_data=lambda data_state, unit: log.append(("restore", data_state["position"], unit)),
        steps_per_unit=2,
        unit_name="iteration",
        metrics_prefix="toy",
        log_every=2,
        eval_every=3,
        eval_at_start=True,
    )


def records(workdir, name="metrics.jsonl"):
    return [json.loads(line) for line in (workdir / name).read_text().splitlines()]


def values(workdir):
    """metrics.jsonl without the timing fields (and the wall clock of each record: `time`, `elapsed_s`)."""
    return [
        {k: v for k, v in r.items() if "/perf/" not in k and "/memory/" not in k and k not in ("time", "elapsed_s")}
        for r in records(workdir)
    ]


def steps_saved(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_cadence_checkpoints_and_result(tmp_path):
    log = []
    result = run_task(toy_task(6, log), tmp_path)
    assert [c for c in log if c[0] == "evaluate"] == [("evaluate", 0), ("evaluate", 3), ("evaluate", 6)]
    assert [c[1] for c in log if c[0] == "advance"] == [0, 1, 2, 3, 4, 5]
    lines = records(tmp_path)
    assert [(r["step"], r.get("toy/w"), r.get("eval/w")) for r in lines] == [
        (0, None, 0.0),
        (2, 2.0, None),
        (3, None, 3.0),
        (4, 4.0, None),
        (6, 6.0, None),
        (6, None, 6.0),
    ]
    assert all(r["toy/perf/step_time_s"] > 0 and r["toy/perf/items_per_s"] > 0 for r in lines if "toy/w" in r)
    assert not any("toy/nonfinite" in r for r in lines)  # the guard's flag is read, not logged
    assert steps_saved(tmp_path) == [4, 8, 12]  # every 2 units of 2 optimizer steps, and the last
    assert result["iteration"] == 6 and result["eval"] == {"w": 6.0} and result["export"] is None
    assert result["toy"]["w"] == 6.0
    assert json.loads((tmp_path / "run_identity.json").read_text()) == IDENTITY


def test_resume_continues_at_the_unit_of_the_newest_checkpoint(tmp_path):
    run_task(toy_task(4, []), tmp_path)
    log = []
    result = run_task(toy_task(6, log), tmp_path)
    assert log[0] == ("restore", 4, 4)  # step 8 // 2 steps per unit; the recorded data position given back
    assert [c[1] for c in log if c[0] == "advance"] == [4, 5]
    assert ("evaluate", 0) not in log  # no evaluation "at start" when resuming
    assert result["eval"] == {"w": 6.0} and steps_saved(tmp_path) == [4, 8, 12]


def test_each_process_resumes_its_own_data_position_and_another_process_count_is_refused(tmp_path, monkeypatch):
    """A checkpoint of a 2-process run holds both processes' positions (`data_of_processes`): resumed by one
    process it is refused, naming both counts, and the checkpoints are kept."""
    from rpo_jax.train.core import runner

    def two_processes(data_state, metrics_lines):
        return {
            "data": data_state,
            "metrics_lines": metrics_lines,
            "data_of_processes": [data_state, {"position": -data_state["position"]}],
        }

    monkeypatch.setattr(runner, "checkpointed_position", two_processes)
    run_task(toy_task(4, []), tmp_path)
    with pytest.raises(ResumeError, match=r"written by 2 process\(es\), this run has 1"):
        run_task(toy_task(6, []), tmp_path)
    assert steps_saved(tmp_path) == [4, 8]


def test_a_replayed_stretch_leaves_one_metrics_record_per_logged_step(tmp_path):
    """Killed after its last checkpoint (simulated: the final checkpoint removed), a run replays the units after
    the one before; the records those units wrote move to metrics.replayed.jsonl and are written again once."""
    straight = tmp_path / "straight"
    run_task(toy_task(6, []), straight)
    interrupted = tmp_path / "interrupted"
    run_task(toy_task(6, []), interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "12")
    log = []
    run_task(toy_task(6, log), interrupted)
    assert [c[1] for c in log if c[0] == "advance"] == [4, 5]
    assert values(interrupted) == values(straight)
    assert [r["step"] for r in records(interrupted, "metrics.replayed.jsonl")] == [6, 6]  # toy/ and eval/ at 6
    # a finished run started again evaluates again, and still keeps one final record
    run_task(toy_task(6, []), straight)
    assert values(straight) == values(interrupted)


def test_a_different_run_is_refused_and_its_checkpoints_are_kept(tmp_path):
    run_task(toy_task(4, []), tmp_path)
    other = {**IDENTITY, "objective": {"loss": "ipo"}}
    with pytest.raises(
        ResumeError,
        match=r"holds checkpoints \(steps 4, 8\) of another run: "
        r'objective.loss: "dpo" → "ipo"',
    ):
        run_task(toy_task(6, [], identity=other), tmp_path)
    assert steps_saved(tmp_path) == [4, 8]
    assert json.loads((tmp_path / "run_identity.json").read_text()) == IDENTITY  # config and identity untouched
    log = []
    result = run_task(toy_task(6, log, identity=other, resume="force"), tmp_path)  # said explicitly: continue
    assert log[0] == ("restore", 4, 4) and result["iteration"] == 6
    assert json.loads((tmp_path / "run_identity.json").read_text()) == other


def test_a_checkpoint_from_before_identities_resumes_only_when_forced_and_keeps_its_metrics(tmp_path):
    task = toy_task(6, [])
    ckpt = Checkpointer(tmp_path / "checkpoints", every_steps=1, asynchronous=False)
    old_state = {**task.run.state, "step": jnp.int32(4)}
    ckpt.save(4, old_state, {"position": 2}, force=True)  # the data item as it was: the task's state alone
    ckpt.close()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "toy/w": 1.0}\n{"step": 2, "toy/w": 2.0}\n')
    with pytest.raises(ResumeError, match="run_identity.json is missing"):
        run_task(toy_task(6, []), tmp_path)
    log = []
    run_task(toy_task(6, log, resume="force"), tmp_path)
    assert log[0] == ("restore", 2, 2)
    # the old records kept, the resumed units appended: eval at 3, logs at 4 and 6, the final eval at 6
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4, 6, 6]
    assert not (tmp_path / "metrics.1.jsonl").exists()


def test_resume_modes_never_and_must(tmp_path):
    with pytest.raises(ResumeError, match="no checkpoint to resume"):
        run_task(toy_task(2, [], resume="must"), tmp_path / "empty")
    run_task(toy_task(2, [], resume="never"), tmp_path / "run")
    with pytest.raises(ResumeError, match=r"already holds checkpoints \(steps 4\); config.train.resume='never'"):
        run_task(toy_task(4, [], resume="never"), tmp_path / "run")
    assert run_task(toy_task(4, [], resume="must"), tmp_path / "run")["iteration"] == 4
    with pytest.raises(ValueError, match="config.train.resume='sometimes': expected one of"):
        run_task(toy_task(4, [], resume="sometimes"), tmp_path / "run")


def test_checkpoints_that_all_fail_to_restore_are_an_error_not_a_fresh_start(tmp_path):
    run_task(toy_task(4, []), tmp_path)
    for f in (tmp_path / "checkpoints").rglob("*"):
        if f.is_file() and "params" in f.parts and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    with pytest.raises(ResumeError, match=r"none of the checkpoints \(steps 4, 8\) restores .*they are kept"):
        run_task(toy_task(6, []), tmp_path)
    assert steps_saved(tmp_path) == [4, 8]


def test_a_nonfinite_step_stops_the_run_and_nothing_after_it_is_saved(tmp_path):
    log = []
    with pytest.raises(
        NonFiniteError,
        match=r"iteration 3: non-finite training values \(loss=nan, grad_norm=1.0\); "
        r"stopped \(config.train.on_nonfinite='stop'\); the newest checkpoint, "
        r"step 4, is kept",
    ):
        run_task(toy_task(6, log, nonfinite={3}), tmp_path)
    assert steps_saved(tmp_path) == [4]  # unit 4's checkpoint (step 8) would hold the diverged state
    assert [r["step"] for r in records(tmp_path)] == [0, 2]  # the guard stopped it before unit 3's evaluation


def test_skip_step_counts_and_stops_after_too_many_in_a_row(tmp_path):
    result = run_task(
        toy_task(6, [], nonfinite={2, 3}, on_nonfinite="skip_step", max_skipped_in_a_row=3), tmp_path / "a"
    )
    assert [r["toy/skipped_steps"] for r in records(tmp_path / "a") if "toy/w" in r] == [1.0, 2.0, 2.0]
    assert result["iteration"] == 6
    with pytest.raises(
        NonFiniteError,
        match=r"iteration 4: .*stopped \(3 in a row, "
        r"config.train.max_skipped_in_a_row=3\)",
    ):
        run_task(toy_task(6, [], nonfinite={2, 3, 4}, on_nonfinite="skip_step", max_skipped_in_a_row=3), tmp_path / "b")


def test_sigterm_saves_the_unit_and_returns(tmp_path):
    log = []
    result = run_task(toy_task(6, log, stop_after=2), tmp_path)
    assert set(result) == {"toy", "preempted_at"} and result["preempted_at"] == 3
    assert result["toy"]["w"] == 2.0  # the last logged unit
    assert steps_saved(tmp_path) == [4, 6]  # the regular checkpoint at unit 2, the forced one at unit 3
    assert [c[1] for c in log if c[0] == "advance"] == [0, 1, 2]


def test_throughput_reads_rates_since_the_last_read(monkeypatch):
    now = [10.0]
    monkeypatch.setattr(performance.time, "perf_counter", lambda: now[0])
    window = Throughput(peak_flops=100.0)
    assert window.read() == {}  # no unit since the start
    window.add({"tokens": 30.0}, flops=400.0)
    window.add({"tokens": 10.0}, flops=400.0)
    now[0] = 14.0
    assert window.read() == {"perf/step_time_s": 2.0, "perf/tokens_per_s": 10.0, "perf/mfu": 2.0}
    window.add({"pairs": 8.0})
    now[0] = 16.0
    assert window.read() == {"perf/step_time_s": 2.0, "perf/pairs_per_s": 4.0}  # no FLOPs counted: no MFU
    assert Throughput().read() == {}
