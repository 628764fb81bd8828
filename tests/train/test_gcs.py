"""`gs://` end to end against a local GCS emulator (the `gcs_bucket` fixture): data read from the bucket, the work
directory, checkpoints, metrics, TensorBoard, the reference cache and the export written there, `kill -9` and
resume from the bucket, `rpo-export` from and to the bucket."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from rpo_jax.train.cli.export import export_main
from rpo_jax.train.core.metrics import MetricWriter
from rpo_jax.train.core.workdir import continue_metrics

from .trainer_testlib import final_params, read_metrics, subprocess_env, tiny_config, train_command, write_config


def upload_demo_slice(bucket: str, local_dir: pathlib.Path) -> dict[str, str]:
    """The tiny config's demo slice (K = 4 responses with rewards) copied to gs://BUCKET/data/; split → URL."""
    cfg = tiny_config(local_dir)
    urls = {}
    for split, local in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        url = f"{bucket}/data/{pathlib.Path(local).name}"
        epath.Path(url).write_bytes(pathlib.Path(local).read_bytes())
        urls[split] = url
    return urls


def bucket_metrics(workdir: str) -> list[dict]:
    return [json.loads(line) for line in (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def bucket_steps(workdir: str) -> list[int]:
    d = epath.Path(workdir) / "checkpoints"
    if not d.exists():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


def bucket_final_params(workdir: str):
    """The newest checkpoint's parameters in the bucket, as numpy arrays."""
    path = epath.Path(workdir) / "checkpoints" / str(max(bucket_steps(workdir))) / "params"
    checkpointer = ocp.StandardCheckpointer()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), checkpointer.metadata(path).item_metadata.tree
    )
    return jax.tree.map(np.asarray, checkpointer.restore(path, target))


def assert_same_params(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def logged_steps(records: list[dict], prefix: str = "train/loss") -> list[int]:
    return [r["step"] for r in records if prefix in r]


def test_metric_writer_keeps_every_record_in_the_bucket_and_resume_rewinds_it(gcs_bucket):
    """No append on an object store: each upload holds every record; a resume moves the records after the
    checkpoint to metrics.replayed.jsonl exactly as on a local disk."""
    workdir = f"{gcs_bucket}/writer"
    writer = MetricWriter(workdir, tensorboard=False, console=False, upload_every_s=3600)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)}, prefix="train/")
        if step == 2:
            writer.flush()  # what the run skeleton does before a checkpoint
            assert [r["step"] for r in bucket_metrics(workdir)] == [1, 2]
    writer.close()
    assert [r["train/loss"] for r in bucket_metrics(workdir)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    continue_metrics(workdir, keep_lines=3)  # resumed from a checkpoint that had 3 records
    assert [r["step"] for r in bucket_metrics(workdir)] == [1, 2, 3]
    replayed = (epath.Path(workdir) / "metrics.replayed.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in replayed] == [4, 5]
    writer = MetricWriter(workdir, tensorboard=False, console=False, upload_every_s=3600)
    assert writer.lines == 3
    writer.write(4, {"loss": 4.5}, prefix="train/")
    writer.close()
    assert [r["train/loss"] for r in bucket_metrics(workdir)] == [1.0, 2.0, 3.0, 4.5]
    continue_metrics(workdir, keep_lines=None)  # a fresh start keeps the old file under another name
    assert not (epath.Path(workdir) / "metrics.jsonl").exists()
    assert len((epath.Path(workdir) / "metrics.1.jsonl").read_text().splitlines()) == 4


def test_shard_directories_gz_and_parquet_files_in_a_bucket_read_like_local_ones(gcs_bucket, tmp_path):
    """A directory of .jsonl / .jsonl.gz / .parquet shards (nested) read from gs:// gives the records read from the
    same directory on disk, each naming its gs:// file and line; a bad line names its gs:// file and line."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rpo_jax.data import read_records, storage

    lines = pathlib.Path(tiny_config(tmp_path / "demo").data.train).read_text().splitlines()
    local = tmp_path / "shards"
    (local / "b").mkdir(parents=True)
    (local / "a.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (local / "b" / "c.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines[3:5]) + "\n").encode()))
    pq.write_table(pa.Table.from_pylist([json.loads(line) for line in lines[5:8]]), local / "b" / "d.parquet")
    url = f"{gcs_bucket}/shards"
    storage.copy_tree(local, url)
    (here, _), (there, _) = read_records(str(local)), read_records(url)
    assert [(r.prompt, r.responses, r.rewards) for r in there] == [(r.prompt, r.responses, r.rewards) for r in here]
    assert len(there) == 8
    assert [r.source for r in there] == [(f"{url}/{os.path.relpath(f, local)}", n) for f, n in (r.source for r in here)]
    epath.Path(f"{url}/bad.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=f"{url}/bad.jsonl:2"):
        read_records(f"{url}/bad.jsonl")


def test_arrow_files_and_save_to_disk_directories_in_a_bucket_read_like_local_ones(gcs_bucket, tmp_path):
    """A save_to_disk Dataset, a DatasetDict's split and an .arrow file read from gs:// (through a local copy,
    since pyarrow memory-maps them) give the records read from disk, each naming its gs:// source."""
    import datasets

    from rpo_jax.data import read_records, storage

    rows = [
        json.loads(line)
        for line in pathlib.Path(tiny_config(tmp_path / "demo").data.train).read_text().splitlines()[:6]
    ]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dd"))
    for name in ("single", "dd"):
        storage.copy_tree(tmp_path / name, f"{gcs_bucket}/{name}")
    arrow = "single/data-00000-of-00001.arrow"
    for local, url in (
        (tmp_path / "single", f"{gcs_bucket}/single"),
        (tmp_path / "dd" / "test", f"{gcs_bucket}/dd/test"),
        (tmp_path / arrow, f"{gcs_bucket}/{arrow}"),
    ):
        (here, _), (there, _) = read_records(str(local)), read_records(url)
        assert [(r.prompt, r.responses, r.rewards) for r in there] == [(r.prompt, r.responses, r.rewards) for r in here]
        assert len(there) == (2 if local.name == "test" else 6) and there[-1].source == (url, len(there))
    with pytest.raises(ValueError, match=f"{gcs_bucket}/dd: a DatasetDict saved with save_to_disk; choose a split"):
        read_records(f"{gcs_bucket}/dd")


def test_a_run_in_a_bucket_trains_evaluates_checkpoints_and_exports_like_a_local_run(gcs_bucket, tmp_path, capsys):
    """Data from gs://, work directory in gs://: the same losses and parameters as the same run on local disk;
    metrics (every step), TensorBoard, checkpoints, the reference cache and the export are in the bucket, and a
    second run reuses the cache from the bucket."""
    urls = upload_demo_slice(gcs_bucket, tmp_path / "data")
    overrides = {
        "train.steps": 4,
        "train.eval_every": 2,
        "train.export_at_end": True,
        "metrics.tensorboard": True,
        "train.async_checkpointing": False,
    }
    local_cfg = tiny_config(tmp_path / "data", **overrides)  # the same run on local disk, in the same kind of process
    subprocess.run(
        train_command(write_config(local_cfg, tmp_path / "local.py"), tmp_path / "local"),
        env=subprocess_env(),
        check=True,
        capture_output=True,
    )
    gs_cfg = tiny_config(tmp_path / "data", **overrides, **{"data.train": urls["train"], "data.eval": urls["eval"]})
    workdir = f"{gcs_bucket}/run"
    done = subprocess.run(
        train_command(write_config(gs_cfg, tmp_path / "gs.py"), workdir),
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    local, remote = read_metrics(tmp_path / "local"), bucket_metrics(workdir)
    assert logged_steps(remote) == [1, 2, 3, 4]
    assert logged_steps(remote, "eval/loss") == [2, 4]
    for key in ("train/loss", "eval/loss", "eval/rewards/accuracies"):
        assert [r[key] for r in remote if key in r] == [r[key] for r in local if key in r]
    assert_same_params(bucket_final_params(workdir), final_params(tmp_path / "local"))
    assert bucket_steps(workdir) == [2, 4]

    root = epath.Path(workdir)
    assert json.loads((root / "config.json").read_text())["mode"] == "preference"
    assert json.loads((root / "run_identity.json").read_text())["data"]
    assert any(p.name.startswith("events.out.tfevents") for p in (root / "tensorboard").iterdir())
    assert sorted(p.name for p in (root / "ref_cache").iterdir() if p.name.endswith(".npy"))
    exported = {p.name for p in (root / "export").iterdir()}
    assert {"config.json", "model.safetensors"} <= exported
    local_export = tmp_path / "local" / "export"
    for name in ("config.json", "model.safetensors"):
        assert (root / "export" / name).read_bytes() == (local_export / name).read_bytes()

    # a second run with the reference cache of the first, read from the bucket
    again = tiny_config(
        tmp_path / "data",
        **{
            **overrides,
            "data.train": urls["train"],
            "data.eval": urls["eval"],
            "train.export_at_end": False,
            "reference_cache_dir": f"{workdir}/ref_cache",
        },
    )
    second = subprocess.run(
        train_command(write_config(again, tmp_path / "again.py"), f"{gcs_bucket}/run2"),
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("reference cache hit") + second.stderr.count("reference cache hit") == 2
    assert [r["train/loss"] for r in bucket_metrics(f"{gcs_bucket}/run2") if "train/loss" in r] == [
        r["train/loss"] for r in remote if "train/loss" in r
    ]
    assert not (epath.Path(f"{gcs_bucket}/run2") / "ref_cache").exists()

    # rpo-export from the bucket run to the bucket: the bytes of the run's own export
    out = f"{gcs_bucket}/exports/m"
    export_main([workdir, out])
    for name in ("config.json", "model.safetensors"):
        assert (epath.Path(out) / name).read_bytes() == (local_export / name).read_bytes()
    with pytest.raises(SystemExit) as refused:
        export_main([workdir, f"{workdir}/checkpoints"])
    assert refused.value.code == 1 and "is inside the run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_from_the_bucket_bit_identically(gcs_bucket, tmp_path):
    """kill -9 once the step-4 checkpoint is in the bucket; the same command finishes the run with the
    parameters of an uninterrupted run, and metrics.jsonl in the bucket has one record per step."""
    cfg = tiny_config(tmp_path / "data", **{"train.steps": 10, "train.checkpoint_every": 2})
    config_file = write_config(cfg, tmp_path / "c.py")
    subprocess.run(
        train_command(config_file, f"{gcs_bucket}/whole"), env=subprocess_env(), check=True, capture_output=True
    )
    workdir = f"{gcs_bucket}/killed"
    proc = subprocess.Popen(
        train_command(config_file, workdir),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not any(s >= 4 for s in bucket_steps(workdir)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    assert 4 <= max(bucket_steps(workdir)) < 10
    subprocess.run(train_command(config_file, workdir), env=subprocess_env(), check=True, capture_output=True)
    assert_same_params(bucket_final_params(workdir), bucket_final_params(f"{gcs_bucket}/whole"))
    assert logged_steps(bucket_metrics(workdir)) == list(range(1, 11))
    assert [r["train/loss"] for r in bucket_metrics(workdir) if "train/loss" in r] == [
        r["train/loss"] for r in bucket_metrics(f"{gcs_bucket}/whole") if "train/loss" in r
    ]
