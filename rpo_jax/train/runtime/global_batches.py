"""How host data meets the run's device mesh: the mesh of `config.mesh` (`config_mesh`), which rows of a global batch
each process feeds (`process_rows`: processes holding the same batch shards feed the same rows), host rows →
global arrays sharded on the batch axis, and global arrays → a copy on every device.

The mesh itself (`make_mesh(config.mesh, devices)`) and every parameter and batch sharding come from the models'
rules table (`rpo_jax.models.sharding`).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rpo_jax.models.sharding import batch_sharding, make_mesh


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that puts a whole copy of an array on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


@functools.cache
def _replicator(mesh: Mesh):
    return jax.jit(lambda tree: tree, out_shardings=replicated(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """`tree` (arrays sharded over `mesh`) with every leaf gathered whole onto every device, so that every
    process can read every element (one compiled identity per mesh and tree structure)."""
    return _replicator(mesh)(tree)


def config_mesh(mesh: Mapping[str, Any], devices=None) -> Mesh:
    """The run's mesh from `config.mesh`: the axis sizes (a missing axis is 1, one may be -1) and `processes`, how
    many processes each axis spans (`rpo_jax.models.sharding.make_mesh(processes=...)`; all 1 or absent:
    `jax.make_mesh`'s order, the first axes spanning the processes). `devices`: default every device."""
    fields = dict(mesh)
    spans = {str(k): int(v) for k, v in dict(fields.pop("processes", None) or {}).items()}
    processes = spans if any(n != 1 for n in spans.values()) else None
    try:
        return make_mesh(fields, devices, processes=processes)
    except ValueError as e:
        if processes is None:
            raise
        raise ValueError(f"config.mesh.processes={processes}: {e}") from None


class RowGroup(NamedTuple):
    """Which rows of every global batch a process feeds: processes whose devices hold the same batch shards (they
    differ only along `tensor` / `context`) form one group and feed the same examples; group `index` of `count`
    feeds rows `[index·B/count, (index+1)·B/count)` of a `[B, ...]` batch (`process_rows`)."""

    index: int
    count: int

    def iterator_args(self) -> dict[str, int]:
        """`process_index` / `process_count` for `rpo_jax.data.make_train_iterator` / `make_eval_batches`: the
        group reads as process `index` of `count`."""
        return {"process_index": self.index, "process_count": self.count}


def row_groups(shards_of_process: Sequence[Collection[int]], shards: int) -> list[RowGroup]:
    """Every process's `RowGroup` from the batch shards its devices hold.

    Args:
        shards_of_process: for process p, the indices (0 ≤ i < `shards`) of the batch shards — the data×fsdp
            blocks of the batch axis, in the batch's order — that its devices hold.
        shards: data×fsdp, the number of batch shards.

    Returns:
        One `RowGroup` per process: processes holding the same shards share a group; groups are numbered by their
        first shard, so group g holds the g-th block of `shards / count` consecutive shards.

    Raises:
        ValueError: (one line) when the distinct shard sets are not equal, consecutive blocks covering every shard
            once (a process would then need rows that are not one block of the batch).
    """
    held = [frozenset(int(i) for i in s) for s in shards_of_process]
    distinct = sorted(set(held), key=min)
    count, size = len(distinct), shards // max(len(distinct), 1)
    blocks = [frozenset(range(g * size, (g + 1) * size)) for g in range(count)]
    if count * size != shards or distinct != blocks:
        raise ValueError(
            f"config.mesh: the processes' devices hold batch shards {[sorted(s) for s in held]} of the data×fsdp="
            f"{shards}; each process must hold one block of consecutive shards, the same size on every process "
            "(processes holding the same block feed the same rows): choose the axes that span processes with "
            "config.mesh.processes"
        )
    return [RowGroup(distinct.index(s), count) for s in held]


@functools.cache
def process_rows(mesh: Mesh, process: int | None = None) -> RowGroup:
    """The `RowGroup` of `process` (default: this one) on `mesh`: the one place that says which rows of a global
    batch (sharded on the batch axes: `batch_sharding`) a process feeds. With `jax.make_mesh`'s order on P
    processes and data×fsdp a multiple of P, process p feeds block p of P; with `config.mesh.processes`
    {"context": 2} on 2 processes both feed the whole batch (group 0 of 1)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    indices = batch_sharding(mesh, 1).devices_indices_map((shards,))
    processes = sorted({d.process_index for d in mesh.devices.flat})
    held = {p: set() for p in processes}
    for device, index in indices.items():
        held[device.process_index].update(range(*index[0].indices(shards)))
    groups = row_groups([held[p] for p in processes], shards)
    return groups[processes.index(jax.process_index() if process is None else process)]


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Examples this process feeds per step: its group's share of the global batch (`process_rows`)."""
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % batch_shards:
        raise ValueError(f"data.batch_size={global_batch_size} must be divisible by data×fsdp={batch_shards}")
    return global_batch_size // process_rows(mesh).count


def local_rows(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, np.ndarray]:
    """This process's rows of a batch every process holds whole (`[N, ...]` arrays, N divisible by data×fsdp):
    the block of its row group (`process_rows`), ready for `to_global`."""
    n = local_batch_size(next(iter(batch.values())).shape[0], mesh)
    g = process_rows(mesh).index
    return {k: np.asarray(v)[g * n : (g + 1) * n] for k, v in batch.items()}


def batch_multiple(mesh: Mesh) -> int:
    """The smallest row count a global batch on `mesh` can have: data×fsdp (a multiple of the row groups)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def common_local_shapes(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`batch` with every array zero-padded at the end of each dimension to the largest size any process has.

    Each process collates its own rows, so a bucketed length (T of `[B, K, T]`) is the smallest bucket that fits
    *its* longest sequence and can differ between processes. Global arrays built from such rows would have a
    different shape on each process: each process would compile a different program, and their collectives
    would not match (on CPU, Gloo then waits for a sub-group set-up or a message size that never comes). The
    padded positions are masked (attention_mask / loss_mask False, tokens 0), so values do not change: the
    batch is what one process collating every row would have built. One small all-gather of the shapes per
    batch; nothing is done with one process.
    """
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    if jax.process_count() == 1:
        return arrays
    shapes = np.concatenate([np.asarray(a.shape, np.int64) for a in arrays.values()] or [np.zeros(0, np.int64)])
    largest = np.max(multihost_utils.process_allgather(shapes), axis=0)
    out, at = {}, 0
    for k, a in arrays.items():
        target = largest[at : at + a.ndim]
        at += a.ndim
        out[k] = np.pad(a, [(0, int(t) - n) for n, t in zip(a.shape, target)]) if tuple(target) != a.shape else a
    return out


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's local rows (its row group's block: `process_rows`) into global arrays sharded on the
    batch axis, `[local rows × groups, ...]` (every process's rows padded to common shapes first:
    `common_local_shapes`; processes of one group feed the same rows)."""
    groups = process_rows(mesh).count
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v, (v.shape[0] * groups, *v.shape[1:]))
        for k, v in common_local_shapes(batch).items()
    }
