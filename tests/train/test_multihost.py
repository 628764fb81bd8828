"""Several processes through `rpo-train` itself on one machine (2 processes × 4 CPU devices, Gloo collectives):
FSDP and tensor parallelism with parameters sharded across processes equal one process with 8 devices, and a
preemption (SIGTERM to one process) of a run whose work directory is in a (locally emulated) GCS bucket saves
on both processes and resumes to the parameters of an uninterrupted run. And MFU per chip: FLOP/s ÷ (one chip's
peak × chips)."""

from __future__ import annotations

import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rpo_jax.data import make_train_iterator
from rpo_jax.train.jobs import preference
from rpo_jax.train.runtime import performance
from rpo_jax.train.runtime.performance import Throughput, train_flops_per_token

from .test_gcs import assert_same_params, bucket_final_params, bucket_metrics, bucket_steps, logged_steps
from .trainer_testlib import final_params, read_metrics, subprocess_env, tiny_config, train_command, write_config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def start_processes(config_file, workdir, n: int = 2, devices: int = 4) -> list[subprocess.Popen]:
    """`n` rpo-train processes of one run, `devices` CPU devices each, coordinated on a free localhost port."""
    return start_workers(train_command(config_file, workdir)[1:], n, devices)


def start_workers(args: list[str], n: int = 2, devices: int = 4) -> list[subprocess.Popen]:
    """`n` processes `python ARGS...` (from the repository root) of one jax.distributed group, `devices` CPU
    devices each, coordinated on a free localhost port (`rpo_jax.train.runtime.processes`' variables)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    return [
        subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(
                devices=devices,
                RPO_JAX_COORDINATOR=f"localhost:{port}",
                RPO_JAX_NUM_PROCESSES=str(n),
                RPO_JAX_PROCESS_ID=str(i),
            ),
        )
        for i in range(n)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return outs


@pytest.mark.parametrize(
    "mesh",
    [{"data": 1, "fsdp": 4, "tensor": 2}, pytest.param({"data": 1, "fsdp": 8, "tensor": 1}, marks=pytest.mark.slow)],
    ids=["fsdp4_tensor2", "fsdp8"],
)
def test_fsdp_and_tensor_across_two_processes_match_one_process(tmp_path, mesh):
    """Parameters and optimizer state sharded over devices of both processes (fsdp spans the processes; tensor
    inside each): losses and parameters after 3 steps equal 1 process × 8 devices with the same mesh. The
    processes' batches have different bucketed lengths at step 2 (T = 64 and 32), which `to_global` pads to one
    shape — without that, each process compiled a different program and their collectives did not match."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    cfg = tiny_config(tmp_path / "data", **{"train.steps": 3, "mesh": mesh, "train.async_checkpointing": False})
    config_file = write_config(cfg, tmp_path / "config.py")
    preference.train(cfg, tmp_path / "single")  # 1 process × the test process's 8 devices
    finish(start_processes(config_file, tmp_path / "multi"))
    single = [m["train/loss"] for m in read_metrics(tmp_path / "single") if "train/loss" in m]
    multi = [m["train/loss"] for m in read_metrics(tmp_path / "multi") if "train/loss" in m]
    assert len(single) == 3
    np.testing.assert_allclose(multi, single, rtol=1e-6, atol=1e-6)
    for a, b in zip(
        jax.tree.leaves(final_params(tmp_path / "single")),
        jax.tree.leaves(final_params(tmp_path / "multi")),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_sigterm_to_one_process_saves_on_both_in_the_bucket_and_resumes_identically(gcs_bucket, tmp_path):
    """A preemption of one host: SIGTERM to process 1 only; both processes agree at the next step, save that step
    to the bucket and exit 0; the same command resumes both to the final parameters of an uninterrupted run."""
    cfg = tiny_config(
        tmp_path / "data",
        **{"train.steps": 12, "train.checkpoint_every": 4, "mesh": {"data": 1, "fsdp": 4, "tensor": 2}},
    )
    config_file = write_config(cfg, tmp_path / "config.py")
    finish(start_processes(config_file, f"{gcs_bucket}/whole"))

    workdir = f"{gcs_bucket}/preempted"
    procs = start_processes(config_file, workdir)
    deadline = time.time() + 300
    while time.time() < deadline and procs[1].poll() is None and not bucket_steps(workdir):
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outs = finish(procs)
    stopped_at = max(bucket_steps(workdir))
    assert 4 <= stopped_at < 12, bucket_steps(workdir)
    assert stopped_at % 4 != 0 or "preemption requested" in outs[0]
    assert "preemption requested" in outs[0] and "preemption requested" in outs[1]

    finish(start_processes(config_file, workdir))
    assert_same_params(bucket_final_params(workdir), bucket_final_params(f"{gcs_bucket}/whole"))
    assert logged_steps(bucket_metrics(workdir)) == list(range(1, 13))


def test_mfu_is_flops_per_second_over_the_peak_of_every_chip(monkeypatch):
    """8·10¹² FLOPs in 2 s on 8 chips of 10¹² FLOP/s each: MFU 0.5 (not 4, the sum over chips ÷ one chip)."""
    clock = iter([10.0, 12.0, 12.0])  # restart at construction, read, restart after the read
    monkeypatch.setattr(performance.time, "perf_counter", lambda: next(clock))
    throughput = Throughput(peak_flops=1e12, chips=8)
    throughput.add({"tokens": 100.0}, flops=8e12)
    read = throughput.read()
    assert read["perf/mfu"] == 0.5
    assert read["perf/tokens_per_s"] == 50.0 and read["perf/step_time_s"] == 2.0
    with pytest.raises(ValueError, match="chips=0"):
        Throughput(peak_flops=1e12, chips=0)


def test_a_run_on_8_devices_reports_mfu_per_chip(tmp_path):
    """On 8 (fake) devices each logged step's MFU × step time × one chip's peak × 8 chips is the step's FLOPs,
    B·K·T·flops_per_token(T) of the global (padded) batch it trained on; packed rows' FLOPs:
    test_packed_training.test_flops_count_the_packed_rows."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    peak, chips = 1e11, 8
    cfg = tiny_config(
        tmp_path / "data",
        **{
            "mesh": {"data": chips, "fsdp": 1, "tensor": 1},
            "train.steps": 3,
            "metrics.peak_flops": peak,
            "data.packing": False,
        },
    )
    preference.train(cfg, tmp_path / "run")
    run = preference.build_run(cfg, tmp_path / "other")
    batches = make_train_iterator(run.datasets["train"], cfg.data.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle)
    expected = {}
    for step in range(1, 4):
        b, k, t = next(batches)["tokens"].shape
        expected[step] = b * k * t * train_flops_per_token(run.model_config, t, score_window=run.score_window)
    logged = {m["step"]: m for m in read_metrics(tmp_path / "run") if "train/perf/mfu" in m}
    assert sorted(logged) == [2, 3]  # the first, compiling step is left out of the throughput
    for step, m in logged.items():
        flops = m["train/perf/mfu"] * m["train/perf/step_time_s"] * peak * chips
        np.testing.assert_allclose(flops, expected[step], rtol=1e-9)
