"""Model files at pod scale, against a local GCS emulator (tests/gcs_emulator.py, `start_counting_emulator`):
checkpoints read from gs:// by byte range (each process its slices and the headers, counted by the emulator per
process), transient errors retried, a missing object named in one line; exports streamed into Hugging Face's
sharded layout (bit for bit the single-process export, loadable by transformers, save_pretrained's file layout),
with bounded host memory, never half-written; tokenizers and LoRA adapters from gs://."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rpo_jax.models import load_hf, make_mesh, save_hf
from rpo_jax.models.safetensors_io import RangeReader, byte_runs, headers_of, merge_runs
from tests.gcs_emulator import restore_environment, served_bytes, start_counting_emulator, use_in_this_process
from tests.hf_fixtures import load_torch_model, make_tiny_llama

from .trainer_testlib import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def counting_emulator(tmp_path, processes: int = 1, fail_every: int = 0):
    """(environments, counts file) of an emulator serving one store on `processes` ports (the first one used by
    this process, as in `use_in_this_process`); fsspec's cached gs:// filesystems are dropped on entry and exit."""
    counts = str(tmp_path / "served.json")
    proc, envs = start_counting_emulator(processes, counts, fail_every)
    saved = {k: os.environ.get(k) for k in envs[0]}
    try:
        use_in_this_process(envs[0])  # before gcsfs is imported: it reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT then
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()
        yield envs, counts
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        restore_environment(saved)
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()


def upload(local: pathlib.Path, env: dict[str, str], name: str = "ckpt") -> str:
    """A new bucket holding the files of `local` under `name`/; its gs:// URL."""
    from rpo_jax.data import storage
    from tests.gcs_emulator import create_bucket

    url = f"gs://{create_bucket(env)}/{name}"
    storage.copy_tree(local, url)
    return url


def test_byte_runs_are_the_block_in_row_major_order():
    """The runs `byte_runs` names, read from the tensor's bytes, are the block itself (numpy's slicing), for
    every block of a [4, 6, 5] tensor with 1–2 entries cut away on each side, and merged runs lose no byte."""
    shape, itemsize = (4, 6, 5), 4
    tensor = np.arange(np.prod(shape), dtype=np.int32).reshape(shape)
    raw = tensor.tobytes()
    for a0, b0 in ((0, 4), (1, 3)):
        for a1, b1 in ((0, 6), (2, 5)):
            for a2, b2 in ((0, 5), (1, 4)):
                starts, length = byte_runs(shape, itemsize, [(a0, b0), (a1, b1), (a2, b2)])
                got = b"".join(raw[s : s + length] for s in starts.tolist())
                assert got == tensor[a0:b0, a1:b1, a2:b2].tobytes()
                spans = merge_runs(starts, length)
                assert sum(e - s for s, e in spans) == len(got)
    starts, length = byte_runs(shape, itemsize, [(1, 3), (0, 6), (0, 5)])  # whole trailing axes: one run
    assert starts.tolist() == [1 * 6 * 5 * 4] and length == 2 * 6 * 5 * 4


def test_a_reader_retries_failed_ranges_and_names_a_missing_object(tmp_path, monkeypatch):
    """A filesystem failing the first read of each range: every range read on the second attempt (retried 3);
    one that always fails: an OSError naming the object after the attempts; a missing object: one line."""
    import fsspec

    data = bytes(range(256)) * 4
    (tmp_path / "f").write_bytes(data)
    fs = fsspec.filesystem("file")
    seen = set()
    real = fs.cat_file

    def flaky(path, start=None, end=None, **kw):
        if (start, end) not in seen:
            seen.add((start, end))
            raise ConnectionResetError("transient")
        return real(path, start, end, **kw)

    monkeypatch.setattr(fs, "cat_file", flaky)
    reader = RangeReader(attempts=3, backoff=0.0)
    url = f"file://{tmp_path / 'f'}"
    assert reader.read(url, [0, 10, 1000], [4, 30, 1024]) == [data[0:4], data[10:30], data[1000:1024]]
    assert reader.retried == 3
    monkeypatch.setattr(fs, "cat_file", lambda *a, **k: (_ for _ in ()).throw(TimeoutError("slow")))
    with pytest.raises(OSError, match=rf"^{url}: 1 byte range\(s\) still failed after 3 attempts .*TimeoutError"):
        reader.read(url, [0], [4])
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match=rf"^file://{tmp_path}/missing: no such object$"):
        RangeReader().read(f"file://{tmp_path}/missing", [0], [4])


def test_transient_bucket_errors_are_retried_and_a_missing_object_is_one_line(tmp_path):
    """The emulator answers every 5th ranged read 503 once: the checkpoint still loads, equal to the local load
    bit for bit, the emulator having failed some reads; a shard deleted from the bucket, a missing directory: one
    line naming the object."""
    local = make_tiny_llama(tmp_path / "ckpt", max_shard_size="40KB")
    with counting_emulator(tmp_path, fail_every=5) as (envs, counts):
        url = upload(local, envs[0])
        mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
        remote, _ = load_hf(url, mesh=mesh)
        here, _ = load_hf(local, mesh=mesh)
        from flax import nnx

        for a, b in zip(jax.tree.leaves(nnx.state(remote)), jax.tree.leaves(nnx.state(here)), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert served_bytes(counts, envs[0])["failed"] >= 3
        from rpo_jax.data import storage

        shard = sorted(p.name for p in local.glob("*.safetensors"))[1]
        storage.as_path(f"{url}/{shard}").unlink()
        with pytest.raises(FileNotFoundError) as missing:
            load_hf(url)
        assert str(missing.value).startswith(f"{url}/model.safetensors.index.json: shard {shard} is missing")
        assert "\n" not in str(missing.value)
        with pytest.raises(FileNotFoundError, match=rf"^{url}x: config.json is missing"):
            load_hf(url + "x")
        with pytest.raises(FileNotFoundError, match=rf"^{url}/{shard}: no such object$"):
            headers_of([f"{url}/{shard}"])


def test_the_export_layout_is_save_pretrained_s(tmp_path):
    """A transformers checkpoint saved with max_shard_size="40KB", loaded and exported with the same size: the
    same shard files holding the same tensors (index weight_map and metadata equal), every tensor equal bit for
    bit; with the default size one model.safetensors, as save_pretrained writes it."""
    from safetensors.numpy import load_file

    local = make_tiny_llama(tmp_path / "hf", max_shard_size="40KB")
    model, config = load_hf(local)
    out = save_hf(model, config, tmp_path / "ours", max_shard_size="40KB")
    theirs = json.loads((local / "model.safetensors.index.json").read_text())
    ours = json.loads((out / "model.safetensors.index.json").read_text())
    assert ours == theirs
    for shard in sorted(set(theirs["weight_map"].values())):
        a, b = load_file(str(local / shard)), load_file(str(out / shard))
        assert list(a) == list(b) or sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    single = save_hf(model, config, tmp_path / "single")
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "model.safetensors"]


def test_a_reward_model_s_sharded_export_is_save_pretrained_s(tmp_path):
    """A LlamaForSequenceClassification saved by transformers with max_shard_size="10KB", loaded as a reward model
    and exported with the same size: the same index (weight_map with score.weight, metadata) and every tensor bit
    for bit."""
    import torch
    import transformers
    from safetensors.numpy import load_file

    from rpo_jax.models import load_reward_model, save_reward_model

    torch.manual_seed(0)
    hf = transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(
            vocab_size=52,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            pad_token_id=0,
            num_labels=1,
            tie_word_embeddings=False,
        )
    ).to(torch.float32)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="10KB")
    model, config = load_reward_model(tmp_path / "hf")
    out = save_reward_model(model, config, tmp_path / "ours", max_shard_size="10KB")
    theirs = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert json.loads((out / "model.safetensors.index.json").read_text()) == theirs
    assert "score.weight" in theirs["weight_map"] and len(set(theirs["weight_map"].values())) > 4
    for shard in sorted(set(theirs["weight_map"].values())):
        a, b = load_file(str(tmp_path / "hf" / shard)), load_file(str(out / shard))
        assert sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_a_merged_lora_export_is_sharded_with_peft_s_merged_weights(tmp_path):
    """A PEFT LoRA adapter (peft, real) on a transformers checkpoint, merged by peft (merge_and_unload) and by our
    export (`save_policy`: load_hf + load_peft_adapter, streamed with max_shard_size="40KB"): our shards and index
    hold every tensor of peft's merged model (the merge's float32 arithmetic within 1e-6), the index's total_size
    their bytes, and transformers loads our shards to the same weights."""
    peft = pytest.importorskip("peft")
    import torch
    from safetensors.numpy import load_file

    from rpo_jax.models.lora import load_peft_adapter
    from rpo_jax.train.core.export import save_policy

    base = make_tiny_llama(tmp_path / "base")
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    peft.get_peft_model(load_torch_model(base), lora).save_pretrained(str(tmp_path / "adapter"))
    merged = peft.PeftModel.from_pretrained(load_torch_model(base), str(tmp_path / "adapter")).merge_and_unload()
    theirs = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    model, config = load_hf(base)
    load_peft_adapter(model, tmp_path / "adapter")
    out = save_policy(model, config, tmp_path / "ours", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(theirs) and len(set(index["weight_map"].values())) > 4
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in theirs.values())
    ours = {}
    for shard in sorted(set(index["weight_map"].values())):
        ours |= load_file(str(out / shard))
    loaded = load_torch_model(out).state_dict()
    for name, value in theirs.items():
        np.testing.assert_allclose(ours[name], value, atol=1e-6, rtol=0, err_msg=name)
        np.testing.assert_array_equal(loaded[name].numpy(), ours[name])
    assert not np.array_equal(
        ours["model.layers.0.self_attn.q_proj.weight"],
        load_file(str(base / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"],
    )


def test_max_shard_size_default_and_units_are_transformers():
    import inspect

    from huggingface_hub.serialization._base import parse_size_to_int
    from transformers import PreTrainedModel

    from rpo_jax.models.hf_export import DEFAULT_MAX_SHARD_SIZE, parse_size

    assert (
        DEFAULT_MAX_SHARD_SIZE
        == inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    )
    for text in ("5GB", "40KB", "500MB", "1TB"):
        assert parse_size(text) == parse_size_to_int(text)
    assert parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError, match=r"^max_shard_size='5 parsecs': expected a size"):
        parse_size("5 parsecs")


def _start_workers(url_envs, args, n=2, devices=4):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "tests.train.pod_files_worker", *args(i)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(
                devices=devices,
                RPO_JAX_COORDINATOR=f"localhost:{port}",
                RPO_JAX_NUM_PROCESSES=str(n),
                RPO_JAX_PROCESS_ID=str(i),
                **url_envs[i],
            ),
        )
        for i in range(n)
    ]


def finish(procs, timeout: float = 500) -> list[str]:
    """The processes' outputs once they exit (killed after `timeout` s, their outputs then in the failure)."""
    deadline, outs = time.time() + timeout, []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            outs = [q.communicate()[0] for q in procs]
            raise AssertionError("timed out:\n" + "\n".join(o[-3000:] for o in outs)) from None
    return outs


@pytest.mark.slow  # 80 s on 2 cores
def test_two_processes_read_their_slices_from_a_bucket_and_export_shards(tmp_path):
    """2 processes × 4 CPU devices, mesh (data 1, fsdp 4, tensor 2), a sharded checkpoint (12 safetensors files and
    an index) in the bucket: each process's load equals the local load bit for bit, and the object bytes the
    emulator served each process are exactly its distinct local shards (file dtype) + the safetensors headers +
    config.json and the index — about half the checkpoint each. Then both export it (streamed, process 0 writing)
    to the bucket in 40 KB shards: byte for byte the single-process export (no INCOMPLETE marker left), and
    transformers loads it equal to the original."""
    local = make_tiny_llama(tmp_path / "ckpt", max_shard_size="40KB")
    files = sorted(local.glob("*.safetensors"))
    assert len(files) > 4
    with counting_emulator(tmp_path, processes=3) as (envs, counts):
        url = upload(local, envs[0])
        target = url.rsplit("/", 1)[0] + "/export"
        procs = _start_workers(envs[1:], lambda i: [url, str(local), target, str(tmp_path / f"result{i}.json"), "40KB"])
        outs = finish(procs)
        assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
        served = [served_bytes(counts, env)["bytes"] for env in envs[1:]]
        from rpo_jax.data import storage

        storage.copy_tree(target, tmp_path / "export")  # what the two processes exported to the bucket
    headers = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in files)
    small = (local / "config.json").stat().st_size + (local / "model.safetensors.index.json").stat().st_size
    total = sum(f.stat().st_size for f in files)
    for i, got in enumerate(served):
        elements = json.loads((tmp_path / f"result{i}.json").read_text())["elements"]
        slices = 4 * sum(elements.values())  # float32 checkpoint
        assert got == slices + headers + small, (i, got, slices, headers, small)
        assert got < 0.75 * total
    print(f"bytes served per process: {served} of a {total}-byte checkpoint (headers {headers}, json {small})")

    single = tmp_path / "single"
    model, config = load_hf(local, mesh=make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]))
    save_hf(model, config, single, max_shard_size="40KB")
    exported = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert exported == sorted(p.name for p in single.iterdir())
    assert "model.safetensors.index.json" in exported and len(exported) > 4
    for name in exported:
        assert (tmp_path / "export" / name).read_bytes() == (single / name).read_bytes(), name
    ours, original = load_torch_model(tmp_path / "export"), load_torch_model(local)
    a, b = ours.state_dict(), original.state_dict()
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and bool((a[name] == b[name]).all()), name


# ------------------------------------------------------------------------------------------------ export memory
EXPORT_SCRIPT = r"""
import json, os, sys, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from rpo_jax.models import ModelConfig, create_model
from rpo_jax.models.hf_export import abstract_tensors
from rpo_jax.train.build.model import split_trainable
from rpo_jax.train.core.export import save_model
from rpo_jax.train.runtime.cpu_memory import release_free_memory

fields = dict(model_type="llama", vocab_size=32768, hidden_size=512, intermediate_size=4096, num_hidden_layers=6,
              num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
config = ModelConfig.from_hf_dict(fields, source="test")
model = create_model(config, rngs=nnx.Rngs(0))
tensors = abstract_tensors(config, jnp.float32)
largest, total = max(t.nbytes for t in tensors), sum(t.nbytes for t in tensors)
graphdef, params, rest = split_trainable(model)
mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

out, mode = sys.argv[1], sys.argv[2]
if mode == "measure":
    save_model("preference", graphdef, params, rest, config, out + "-warm", None, mesh, max_shard_size="20MB")
    release_free_memory()  # what the allocator kept of the first export's pieces goes back: not in the baseline
    rss = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS (VmHWM) := current RSS
    start = time.perf_counter()
    save_model("preference", graphdef, params, rest, config, out, None, mesh, max_shard_size="20MB")
    print(json.dumps({"extra": status("VmHWM:") - rss, "largest": largest, "total": total,
                      "seconds": time.perf_counter() - start}))
else:
    print("ready", flush=True)
    save_model("preference", graphdef, params, rest, config, out, None, mesh, max_shard_size="20MB")
    print("done", flush=True)
"""


def test_an_export_streams_with_less_than_two_largest_tensors_of_extra_memory(tmp_path):
    """A 296 MiB model whose largest tensor is 64 MiB (total ≥ 4× largest), exported by `save_model` (streamed into
    20 MB shards) in a fresh process: the writing process's peak RSS during the export (VmHWM reset just before it,
    after a first export compiled the gathering programs) exceeds its RSS before by less than 2× the largest
    tensor; what it wrote loads as the model."""
    out = tmp_path / "export"
    result = subprocess.run(
        [sys.executable, "-c", EXPORT_SCRIPT, str(out), "measure"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"export: extra peak RSS {figures}")
    assert figures["total"] >= 4 * figures["largest"]
    assert figures["extra"] < 2 * figures["largest"], figures
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == figures["total"]
    from safetensors import safe_open

    names = sorted(set(index["weight_map"].values()))
    assert len(names) > 10
    with safe_open(str(out / names[0]), "np") as f:
        assert sorted(f.keys()) == sorted(k for k, v in index["weight_map"].items() if v == names[0])


def test_an_export_killed_half_way_leaves_no_directory_that_looks_complete(tmp_path):
    """kill -9 once the export's hidden temporary directory holds two shards: no directory under the target's
    parent has config.json (the target does not exist; the temporary one is not loadable); the next export
    removes the remains and completes."""
    import time

    out = tmp_path / "export"
    proc = subprocess.Popen(
        [sys.executable, "-c", EXPORT_SCRIPT, str(out), "kill"],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    partial = []
    while time.time() < deadline and proc.poll() is None:
        partial = list(tmp_path.glob(".export.partial-*"))
        if partial and len(list(partial[0].glob("*.safetensors"))) >= 2:
            break
        time.sleep(0.005)
    proc.kill()
    output = proc.communicate(timeout=60)[0]
    assert partial and "done" not in output, output[-3000:]
    assert not out.exists()
    assert [p for p in tmp_path.rglob("config.json")] == []
    with pytest.raises((FileNotFoundError, ValueError)):
        load_hf(partial[0])
    finished = subprocess.run(
        [sys.executable, "-c", EXPORT_SCRIPT, str(out), "kill"], cwd=ROOT, env=subprocess_env(), capture_output=True
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (out / "config.json").exists()
