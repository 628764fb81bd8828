"""The run skeleton (rpo_jax.train.runner) on a toy task: cadence, checkpoints and resume in units of
`steps_per_unit` optimizer steps, evaluation at start / every N / at the end, SIGTERM, and the throughput window."""

from __future__ import annotations

import json
import os
import signal

import jax
import jax.numpy as jnp

from rpo_jax.models.sharding import make_mesh
from rpo_jax.train import performance
from rpo_jax.train.config import base_config
from rpo_jax.train.performance import Throughput
from rpo_jax.train.runner import Task, Unit, run_task
from rpo_jax.train.setup import RunSetup, on_mesh


def toy_config():
    c = base_config()
    c.train.checkpoint_every = 2
    c.train.keep_checkpoints = 10
    c.train.async_checkpointing = False
    c.train.progress_bar = False
    c.train.export_at_end = False
    c.metrics.tensorboard = False
    return c


def toy_task(units: int, log, *, stop_after: int | None = None) -> Task:
    """Each unit adds 1 to w and takes 2 optimizer steps; `log` records every call the skeleton makes."""
    mesh = make_mesh({"data": -1}, jax.devices()[:1])
    state = on_mesh({"params": {"w": jnp.zeros((), jnp.float32)}, "step": jnp.zeros((), jnp.int32)}, mesh)
    run = RunSetup(toy_config(), mesh, jnp.float32, None, None, None, None, state, None, None, None)

    def advance(state, unit):
        log.append(("advance", unit))
        if unit == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        w = state["params"]["w"] + 1.0
        return Unit({"params": {"w": w}, "step": state["step"] + 2}, {"w": w}, {"items": 3.0})

    def evaluate(params, unit):
        log.append(("evaluate", unit))
        return {"w": float(params["w"])}

    return Task(mode="preference", run=run, units=units, advance=advance, evaluate=evaluate,
                data_state=lambda unit: {"position": unit},
                restore_data=lambda data_state, unit: log.append(("restore", data_state["position"], unit)),
                steps_per_unit=2, unit_name="iteration", metrics_prefix="toy", log_every=2, eval_every=3,
                eval_at_start=True)


def records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def steps_saved(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_cadence_checkpoints_and_result(tmp_path):
    log = []
    result = run_task(toy_task(6, log), tmp_path)
    assert [c for c in log if c[0] == "evaluate"] == [("evaluate", 0), ("evaluate", 3), ("evaluate", 6)]
    assert [c[1] for c in log if c[0] == "advance"] == [0, 1, 2, 3, 4, 5]
    lines = records(tmp_path)
    assert [(r["step"], r.get("toy/w"), r.get("eval/w")) for r in lines] == [
        (0, None, 0.0), (2, 2.0, None), (3, None, 3.0), (4, 4.0, None), (6, 6.0, None), (6, None, 6.0)]
    assert all(r["toy/perf/step_time_s"] > 0 and r["toy/perf/items_per_s"] > 0 for r in lines if "toy/w" in r)
    assert steps_saved(tmp_path) == [4, 8, 12]  # every 2 units of 2 optimizer steps, and the last
    assert result["iteration"] == 6 and result["eval"] == {"w": 6.0} and result["export"] is None
    assert result["toy"]["w"] == 6.0


def test_resume_continues_at_the_unit_of_the_newest_checkpoint(tmp_path):
    run_task(toy_task(4, []), tmp_path)
    log = []
    result = run_task(toy_task(6, log), tmp_path)
    assert log[0] == ("restore", 4, 4)  # step 8 // 2 steps per unit; the recorded data position given back
    assert [c[1] for c in log if c[0] == "advance"] == [4, 5]
    assert ("evaluate", 0) not in log  # no evaluation "at start" when resuming
    assert result["eval"] == {"w": 6.0} and steps_saved(tmp_path) == [4, 8, 12]


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
