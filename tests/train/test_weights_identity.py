"""The run identity's name for a checkpoint's weights (`rpo_jax.train.build.checkpoint_digest`,
`config.train.verify_weights`): on a 2 GB checkpoint a tensor rewritten in place detected by the default, and
exactly the blind spot the docs name (an element edited in the middle of a tensor) caught only by "full"."""

from __future__ import annotations

import json

import ml_collections
import numpy as np

from rpo_jax.train.build.checkpoint_digest import SAMPLE_BYTES, digest, sample_ranges
from rpo_jax.train.build.fingerprints import weights_fingerprint

TENSORS, SHAPE = 256, (1024, 2048)  # 256 float32 tensors of 8 MiB: 2 GiB


def make_sparse_checkpoint(root) -> tuple[int, int]:
    """A 2 GiB safetensors checkpoint written sparse (header, then the file extended: zeros), with config.json;
    (data start, bytes per tensor)."""
    from rpo_jax.models.hf_export import ExportTensor, safetensors_header

    tensors = [ExportTensor(f"t{i:03d}", SHAPE, np.dtype(np.float32)) for i in range(TENSORS)]
    header = safetensors_header(tensors, {"format": "pt"})
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with open(root / "model.safetensors", "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(t.nbytes for t in tensors))
    return len(header), tensors[0].nbytes


def test_sample_ranges_closed_form():
    assert sample_ranges(100, 100 + 1000) == [(100, 164), (412, 476), (724, 788), (1036, 1100)]
    assert sample_ranges(0, 10) == [(0, 10)]
    assert sample_ranges(5, 5) == []


def test_the_default_fingerprint_sees_a_tensor_rewritten_and_misses_one_element(tmp_path):
    """2 GiB checkpoint: one tensor rewritten in place changes the default fingerprint; one float edited in the
    middle of a tensor, away from the sampled bytes, leaves it as it was — the documented blind spot — and changes
    the full hash. (Its time beside the full hash's: `python benchmarks/model_files.py identity`.)"""
    root = tmp_path / "ckpt"
    data_start, per_tensor = make_sparse_checkpoint(root)
    before = digest(root)
    full_before = digest(root, "full")
    assert before.startswith("fingerprint:") and not full_before.startswith("fingerprint:")

    tensor = 100
    offset = data_start + tensor * per_tensor
    with open(root / "model.safetensors", "r+b") as f:  # one element, between two sampled ranges
        f.seek(offset + per_tensor // 2 + 4 * SAMPLE_BYTES)
        f.write(np.float32(1.5).tobytes())
    assert digest(root) == before
    assert digest(root, "full") != full_before

    with open(root / "model.safetensors", "r+b") as f:  # the whole tensor rewritten in place
        f.seek(offset)
        f.write(np.full(SHAPE, 0.25, np.float32).tobytes())
    assert digest(root) != before


def test_weights_fingerprint_follows_verify_weights(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "config.json").write_text("{}")
    from safetensors.numpy import save_file

    save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(root / "model.safetensors"))
    cfg = ml_collections.ConfigDict({"train": {"verify_weights": "full"}})
    assert weights_fingerprint(str(root), cfg) == digest(root, "full")
    cfg.train.verify_weights = "fingerprint"
    assert weights_fingerprint(str(root), cfg) == digest(root) != digest(root, "full")
