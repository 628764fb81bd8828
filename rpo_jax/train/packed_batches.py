"""`config.data.packing` / `config.data.share_prompt` in the trainer: the run's `Packing` (row length, rows a
multiple of the batch shards each process feeds) and packing of a process's own rows (response ids made global
by the process's offset). The packer itself is `rpo_jax.data.packing`; the packed step is
`rpo_jax.train.step.packed_response_logps`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from rpo_jax.data import TokenizedDataset
from rpo_jax.data.packing import Packing, is_packed, pack_batch
from rpo_jax.models.sharding import batch_sharding


def packing_of(cfg: ml_collections.ConfigDict, mesh: Mesh, *, row_length: int) -> Packing | None:
    """The run's `Packing` (None when `config.data.packing` is off).

    Rows are as long as each batch's padded length (its length bucket: one compiled step per bucket and row
    count, as padded batches compile per bucket) unless `config.data.pack_length` > 0 fixes them, to at least
    `row_length`, the mode's longest sequence (preference: data.max_length; online: prompt width + new tokens).
    Raises ValueError for `share_prompt` without `packing`, for a `pack_length` below `row_length`, for
    `data.micro_batches` > 1 (packed rows and their examples cannot be sliced into micro-batches), and for several
    processes with a persistent compilation cache (a known hang, README "Packing and shared prompts").
    """
    data = cfg.data
    if not data.get("packing", False):
        if data.get("share_prompt", False):
            raise ValueError("config.data.share_prompt=True needs config.data.packing=True (the prompt is shared "
                             "inside a packed row)")
        return None
    if int(data.micro_batches) > 1:
        raise ValueError(f"config.data.micro_batches={data.micro_batches} does not combine with "
                         "config.data.packing=True: use micro_batches=1 (packing already drops the padding)")
    length = int(data.get("pack_length", 0) or 0)
    if 0 < length < row_length:
        raise ValueError(f"config.data.pack_length={length} is shorter than the longest sequence ({row_length} "
                         "tokens); use 0 (that length) or more")
    if jax.process_count() > 1 and jax.config.jax_compilation_cache_dir:
        raise ValueError("config.data.packing=True with several processes and JAX's persistent compilation cache "
                         f"({jax.config.jax_compilation_cache_dir}): such a run hangs in its first step when its "
                         "programs come from the cache (seen on CPU with Gloo, not yet diagnosed); unset "
                         "JAX_COMPILATION_CACHE_DIR for multi-process packed runs, or use data.packing=False")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return Packing(row_length=length, share_prompt=bool(data.get("share_prompt", False)),
                   row_multiple=max(1, shards // jax.process_count()))


def pack_local(batch: Mapping[str, np.ndarray], packing: Packing | None, mesh: Mesh) -> dict[str, np.ndarray]:
    """This process's rows of a contract batch packed, response ids offset by K × the global index of its first
    example (`first_local_example`), or the batch as it is when `packing` is None or it is already packed."""
    if packing is None or is_packed(batch):
        return dict(batch)
    b, k = np.asarray(batch["valid"]).shape
    return pack_batch(batch, packing, response_offset=first_local_example(b, mesh) * k)


def first_local_example(local_batch: int, mesh: Mesh) -> int:
    """The global index of this process's first example when every process feeds `local_batch` rows of a batch
    sharded on the batch axes (`to_global`): the lowest row its devices hold."""
    global_batch = local_batch * jax.process_count()
    indices = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch,)).values()
    return min(index[0].indices(global_batch)[0] for index in indices)


def check_packable_references(packing: Packing | None, references: Sequence, datasets: Mapping[str, TokenizedDataset]
                              ) -> None:
    """A ValueError for `share_prompt` with a reference that has its own tokenizer (it scores its own
    tokenization of the records, with other prompt tokens; references are scored in the policy's packed layout).
    `references`: the run's `Reference`s (`datasets` is the split → data of each); `datasets`: the policy's."""
    if packing is None or not packing.share_prompt:
        return
    for r in references:
        if r.datasets is not datasets:
            raise ValueError(f"config.data.share_prompt=True with reference {r.name!r}, which has its own tokenizer "
                             f"({r.tokenizer_name}): it scores its own tokenization, not the policy's shared-prompt "
                             "layout; use share_prompt=False (packing alone works with it) or the policy's tokenizer")
