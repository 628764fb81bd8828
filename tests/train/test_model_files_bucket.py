"""Model files in a bucket (the session's GCS emulator, `gcs_bucket`): an export streamed to gs:// in shards is byte
for byte the local export, and one killed half-way (kill -9) leaves a directory that does not look complete (no
config.json, its `INCOMPLETE` marker), which the next export replaces; a tokenizer, a base checkpoint and a LoRA
`init_from` adapter read from gs:// give the model read from the local disk."""

from __future__ import annotations

import copy
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from rpo_jax.models import load_hf
from rpo_jax.models.lora import save_peft_adapter
from rpo_jax.train.core.export import INCOMPLETE
from rpo_jax.train.runtime.global_batches import config_mesh

from .trainer_testlib import save_tiny_base, set_fields, subprocess_env, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[2]

#: `python -c EXPORT OUT MODE [LOCAL_OUT]`: a random 8 MiB Llama (seed 0) exported by `save_model` into 1 MB
#: shards; MODE "pause": the third shard is never opened — "paused" is printed and the process waits to be
#: killed; MODE "run": the export completes, then the same model is exported to LOCAL_OUT too.
EXPORT = r"""
import sys, time
import jax, numpy as np
from flax import nnx
from rpo_jax.models import ModelConfig, create_model, hf_export
from rpo_jax.train.build.model import split_trainable
from rpo_jax.train.core.export import save_model

fields = dict(model_type="llama", vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
config = ModelConfig.from_hf_dict(fields, source="test")
graphdef, params, rest = split_trainable(create_model(config, rngs=nnx.Rngs(0)))
mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
out, mode = sys.argv[1], sys.argv[2]
opened = []
real_open = hf_export.Target.open

def open_pausing(self, name):
    if name.endswith(".safetensors"):
        opened.append(name)
        if mode == "pause" and len(opened) == 3:
            print("paused", flush=True)
            time.sleep(600)
    return real_open(self, name)

hf_export.Target.open = open_pausing
save_model("preference", graphdef, params, rest, config, out, None, mesh, max_shard_size="1MB")
if mode == "run":
    save_model("preference", graphdef, params, rest, config, sys.argv[3], None, mesh, max_shard_size="1MB")
print("done", flush=True)
"""


def export(out: str, mode: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", EXPORT, out, mode, *extra],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow  # 45 s on 2 busy cores: two exporting processes
def test_an_export_to_a_bucket_killed_half_way_does_not_look_complete_and_the_next_one_replaces_it(
    gcs_bucket, tmp_path
):
    """kill -9 while the third of 7 shards is about to be written: the bucket directory holds the two shards
    written and `INCOMPLETE`, no config.json and no index — load_hf refuses it in one line; the same export run
    again replaces it and completes: the files (index included) are byte for byte the local export of the same
    model, `INCOMPLETE` is gone, and load_hf reads it back equal to the local export."""
    out = f"{gcs_bucket}/exports/m"
    proc = export(out, "pause")
    line = proc.stdout.readline()
    while line and line.strip() != "paused":
        line = proc.stdout.readline()
    proc.kill()
    rest = proc.communicate(timeout=60)[0]
    assert line.strip() == "paused", rest[-3000:]
    left = sorted(p.name for p in epath.Path(out).iterdir())
    assert left == [INCOMPLETE, "model-00001-of-00007.safetensors", "model-00002-of-00007.safetensors"], left
    with pytest.raises(FileNotFoundError, match=rf"^{out}: config.json is missing") as refused:
        load_hf(out)
    assert "\n" not in str(refused.value)

    local = tmp_path / "local"
    done = export(out, "run", str(local))
    output = done.communicate(timeout=600)[0]
    assert done.returncode == 0 and "done" in output, output[-3000:]
    names = sorted(p.name for p in local.iterdir())
    assert sorted(p.name for p in epath.Path(out).iterdir()) == names
    assert "model.safetensors.index.json" in names and len(names) == 9  # 7 shards, the index, config.json
    for name in names:
        assert (epath.Path(out) / name).read_bytes() == (local / name).read_bytes(), name
    remote, _ = load_hf(out)
    here, _ = load_hf(local)
    from flax import nnx

    for a, b in zip(jax.tree.leaves(nnx.state(remote)), jax.tree.leaves(nnx.state(here)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_tokenizer_a_base_and_a_lora_adapter_are_read_from_a_bucket(gcs_bucket, tmp_path):
    """config.model.path, config.model.tokenizer and config.model.lora.init_from in the bucket: the base's weights
    fingerprint and full hash are the local checkpoint's; the tokenizer
    encodes as the local one (same vocabulary, chat template), the policy (base + adapter) has the local policy's
    parameters bit for bit and the same logits; a missing adapter directory is a one-line error naming the field;
    the adapters exported back to the bucket are the files written locally."""
    from flax import nnx

    from rpo_jax.data import storage
    from rpo_jax.train.build.data import load_tokenizer
    from rpo_jax.train.build.model import load_policy

    root = save_tiny_base(tmp_path / "base")
    base = root / "base"
    cfg = tiny_config(root / "data", **{"model.path": str(base), "model.lora.rank": 4, "model.lora.alpha": 8.0})
    mesh = config_mesh(cfg.mesh, jax.devices()[:1])
    tok = load_tokenizer(str(base))
    model, _ = load_policy(cfg, tok, mesh, jnp.float32)
    for name in model.lora.targets:  # adapters that change the logits
        b = model.lora.factors(name)[1]
        b[...] = 0.05 * jax.random.normal(jax.random.key(3), b.shape)
    save_peft_adapter(model, tmp_path / "adapter", str(base))
    storage.copy_tree(base, f"{gcs_bucket}/base")
    storage.copy_tree(tmp_path / "adapter", f"{gcs_bucket}/adapter")

    from rpo_jax.train.build.checkpoint_digest import digest

    for method in ("fingerprint", "full"):  # the run identity names the copy in the bucket as the local checkpoint
        assert digest(f"{gcs_bucket}/base", method) == digest(base, method)
    remote_tok = load_tokenizer(f"{gcs_bucket}/base")
    text = [{"role": "user", "content": "sort: 7 2 9 4"}]
    assert remote_tok.get_vocab() == tok.get_vocab() and remote_tok.chat_template == tok.chat_template
    assert remote_tok.apply_chat_template(text) == tok.apply_chat_template(text)

    fields = {"model.lora.rank": 0, "model.tokenizer": f"{gcs_bucket}/base"}
    here_cfg = set_fields(copy.deepcopy(cfg), {**fields, "model.lora.init_from": str(tmp_path / "adapter")})
    there_cfg = set_fields(
        copy.deepcopy(cfg),
        {**fields, "model.path": f"{gcs_bucket}/base", "model.lora.init_from": f"{gcs_bucket}/adapter"},
    )
    here, _ = load_policy(here_cfg, tok, mesh, jnp.float32)
    there, _ = load_policy(there_cfg, remote_tok, mesh, jnp.float32)
    for a, b in zip(jax.tree.leaves(nnx.state(there)), jax.tree.leaves(nnx.state(here)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = np.random.default_rng(0).integers(3, 30, size=(2, 12)).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(there(tokens)), np.asarray(model(tokens)))

    missing = set_fields(copy.deepcopy(there_cfg), {"model.lora.init_from": f"{gcs_bucket}/no-adapter"})
    with pytest.raises(FileNotFoundError, match=rf"^config.model.lora.init_from: {gcs_bucket}/no-adapter: ") as e:
        load_policy(missing, remote_tok, mesh, jnp.float32)
    assert "\n" not in str(e.value)

    # and back: the adapters exported to the bucket (`save_model(adapter_base=...)`: written locally, uploaded with
    # adapter_config.json last, `INCOMPLETE` gone) are the files save_peft_adapter writes
    from rpo_jax.train.build.model import split_trainable
    from rpo_jax.train.core.export import save_model

    save_model("preference", *split_trainable(there), None, f"{gcs_bucket}/out", None, mesh, adapter_base=str(base))
    names = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert sorted(p.name for p in (epath.Path(gcs_bucket) / "out").iterdir()) == names
    for name in names:
        assert (epath.Path(gcs_bucket) / "out" / name).read_bytes() == (tmp_path / "adapter" / name).read_bytes()
    assert json.loads((epath.Path(gcs_bucket) / "out" / "adapter_config.json").read_text())["r"] == 4
