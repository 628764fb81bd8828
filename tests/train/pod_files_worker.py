"""One process of the 2-process model-file test (tests/train/test_model_files.py), run as
`python -m tests.train.pod_files_worker CHECKPOINT_URL LOCAL_CHECKPOINT EXPORT_DIR RESULT_JSON MAX_SHARD_SIZE`:

1. loads the checkpoint from the bucket on a (data 1, fsdp 4, tensor 2) mesh over both processes' devices, then the
   same checkpoint from the local disk, and checks every local shard of every parameter equal bit for bit;
2. writes, per parameter, the bytes its distinct local shards hold (what this process must read at least);
3. exports the model loaded from the bucket (`save_model`, streamed, process 0 writing) into EXPORT_DIR.

The byte counts the emulator served to this process are read by the test, which started the emulator.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np


def main(url: str, local: str, export_dir: str, result_file: str, max_shard_size: str) -> None:
    from rpo_jax.train.runtime.processes import initialize_from_environment

    initialize_from_environment()
    from flax import nnx

    from rpo_jax.models import load_hf, make_mesh
    from rpo_jax.train.build.model import split_trainable
    from rpo_jax.train.core.export import save_model

    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    remote, config = load_hf(url, mesh=mesh)
    here, _ = load_hf(local, mesh=mesh)
    shard_bytes, itemsize = {}, {}
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(remote)), nnx.to_flat_state(nnx.state(here)), strict=True):
        a, b = a.get_value(), b.get_value()
        distinct = {}
        for sa, sb in zip(a.addressable_shards, b.addressable_shards, strict=True):
            assert sa.index == sb.index
            np.testing.assert_array_equal(np.asarray(sa.data), np.asarray(sb.data))
            distinct[tuple((s.start, s.stop) for s in sa.index)] = int(np.prod(sa.data.shape))
        shard_bytes["/".join(map(str, path))] = sum(distinct.values())
        itemsize["/".join(map(str, path))] = a.dtype.itemsize
    graphdef, params, rest = split_trainable(remote)
    # the processes meet before the export's first collective (Gloo gives a late peer 30 s, loads differ in time)
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier("rpo_jax_loaded", 300_000)
    save_model("preference", graphdef, params, rest, config, export_dir, None, mesh, max_shard_size=max_shard_size)
    with open(result_file, "w") as f:
        json.dump({"elements": shard_bytes, "process": jax.process_index()}, f)


if __name__ == "__main__":
    main(*sys.argv[1:6])
