"""Model files at pod scale: what a run's start-up identity costs on a 2 GiB checkpoint, and what an export costs
the writing process in host memory.

    python benchmarks/model_files.py identity [--gib 2] [--sparse] [--dir DIR]
    python benchmarks/model_files.py export [--vocab 32768] [--hidden 512] [--intermediate 4096] [--layers 6]

`identity`: a safetensors checkpoint of `--gib` GiB (float32 tensors of 8 MiB, random bytes; `--sparse`: zeros
written as a sparse file, no disk writes) with config.json, named by `rpo_jax.train.build.checkpoint_digest.digest`
— the default `config.train.verify_weights = "fingerprint"` (headers, sizes, 4 × 64 sampled bytes per tensor: the
first call and the best of 5) and `"full"` (sha256 of every byte). The files were just written, so they are in the
page cache: the full hash's time is a lower bound (no disk or network reads); the fingerprint reads a few KB per
tensor either way.

`export`: a random Llama of the given shape (float32) exported by `rpo_jax.train.core.export.save_model` into
20 MB shards on one CPU device, after a first export into another directory (its gathering programs compiled);
the process's peak RSS during the second export (VmHWM, reset through /proc/self/clear_refs just before it) minus
its RSS before it, beside the largest tensor and `hf_export.export_memory`'s prediction. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

import numpy as np

MiB = 2**20


def write_checkpoint(root: pathlib.Path, gib: float, sparse: bool) -> int:
    """A checkpoint of `gib` GiB of [1024, 2048] float32 tensors (8 MiB each) in `root`; its size in bytes."""
    from rpo_jax.models.hf_export import ExportTensor, safetensors_header

    shape = (1024, 2048)
    tensors = [ExportTensor(f"t{i:04d}", shape, np.dtype(np.float32)) for i in range(int(gib * 1024 / 8))]
    header = safetensors_header(tensors, {"format": "pt"})
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rng = np.random.default_rng(0)
    with open(root / "model.safetensors", "wb") as f:
        f.write(header)
        if sparse:
            f.truncate(len(header) + sum(t.nbytes for t in tensors))
        else:
            for t in tensors:
                f.write(rng.integers(0, 256, t.nbytes, np.uint8).tobytes())
    return (root / "model.safetensors").stat().st_size


def identity(args) -> None:
    from rpo_jax.train.build.checkpoint_digest import digest

    with tempfile.TemporaryDirectory(prefix="rpo_jax_identity_", dir=args.dir) as tmp:
        root = pathlib.Path(tmp) / "ckpt"
        size = write_checkpoint(root, args.gib, args.sparse)
        start = time.perf_counter()
        digest(root)
        first = time.perf_counter() - start
        best = []
        for _ in range(5):
            start = time.perf_counter()
            digest(root)
            best.append(time.perf_counter() - start)
        start = time.perf_counter()
        digest(root, "full")
        full = time.perf_counter() - start
    kind = "sparse (zeros)" if args.sparse else "random bytes, in the page cache"
    print(
        f"identity of a {size / 2**30:.2f} GiB checkpoint ({kind}): fingerprint {first:.3f} s (first call), "
        f"{min(best):.3f} s (best of 5); full sha256 {full:.2f} s"
    )


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def export(args) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from rpo_jax.models import ModelConfig, create_model
    from rpo_jax.models.hf_export import abstract_tensors, export_memory
    from rpo_jax.train.build.model import split_trainable
    from rpo_jax.train.core.export import save_model
    from rpo_jax.train.runtime.cpu_memory import release_free_memory

    fields = dict(
        model_type="llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    config = ModelConfig.from_hf_dict(fields, source="benchmark")
    tensors = abstract_tensors(config, jnp.float32)
    largest, total = max(t.nbytes for t in tensors), sum(t.nbytes for t in tensors)
    graphdef, params, rest = split_trainable(create_model(config, rngs=nnx.Rngs(0)))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    with tempfile.TemporaryDirectory(prefix="rpo_jax_export_", dir=args.dir) as tmp:
        save_model("preference", graphdef, params, rest, config, f"{tmp}/warm", None, mesh, max_shard_size="20MB")
        release_free_memory()  # what the allocator kept of the first export's pieces: not in the baseline
        before = status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        start = time.perf_counter()
        save_model("preference", graphdef, params, rest, config, f"{tmp}/out", None, mesh, max_shard_size="20MB")
        seconds = time.perf_counter() - start
        extra = status("VmHWM:") - before
        files = len(os.listdir(f"{tmp}/out"))
    print(
        f"export of a {total / MiB:.0f} MiB model (largest tensor {largest / MiB:.0f} MiB, total/largest "
        f"{total / largest:.1f}) into {files} files in {seconds:.1f} s: extra peak RSS of the writing process "
        f"{extra / MiB:.1f} MiB = {extra / largest:.2f} x the largest tensor (export_memory predicts "
        f"{export_memory(tensors, local_cpu_devices=1) / MiB:.1f} MiB)"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    i = sub.add_parser("identity", help="fingerprint vs full hash of a checkpoint")
    i.add_argument("--gib", type=float, default=2.0)
    i.add_argument("--sparse", action="store_true", help="zeros in a sparse file instead of random bytes")
    i.add_argument("--dir", default=None, help="where the checkpoint is written (default: the temporary dir)")
    e = sub.add_parser("export", help="extra peak RSS of a streamed export")
    e.add_argument("--vocab", type=int, default=32768)
    e.add_argument("--hidden", type=int, default=512)
    e.add_argument("--intermediate", type=int, default=4096)
    e.add_argument("--layers", type=int, default=6)
    e.add_argument("--dir", default=None)
    args = p.parse_args(argv)
    identity(args) if args.what == "identity" else export(args)


if __name__ == "__main__":
    main()
