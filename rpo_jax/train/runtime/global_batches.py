"""How host data meets the run's device mesh: each process's share of a global batch, host rows → global
arrays sharded on the batch axis, and global arrays → a copy on every device.

The mesh itself (`make_mesh(config.mesh, devices)`) and every parameter and batch sharding come from the models'
rules table (`rpo_jax.models.sharding`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rpo_jax.models.sharding import batch_sharding


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


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Examples this process feeds per step: its share of the global batch."""
    n_proc = jax.process_count()
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % batch_shards:
        raise ValueError(f"data.batch_size={global_batch_size} must be divisible by data×fsdp={batch_shards}")
    if global_batch_size % n_proc:
        raise ValueError(f"data.batch_size={global_batch_size} must be divisible by the {n_proc} processes")
    rows = rows_on_this_process(global_batch_size, mesh)
    if rows != global_batch_size // n_proc:
        raise ValueError(
            f"config.mesh={dict(mesh.shape)}: the batch axes data×fsdp={batch_shards} must split the "
            f"batch over the {n_proc} processes (this process's devices hold {rows} of its "
            f"{global_batch_size} rows, not {global_batch_size // n_proc}); make data×fsdp a multiple "
            "of the number of processes, with `tensor` and `context` inside one process (every process reads rows of "
            "its own: rows split over processes by their context shards would need the same rows on each)"
        )
    return global_batch_size // n_proc


def rows_on_this_process(global_batch_size: int, mesh: Mesh) -> int:
    """How many distinct rows of a `[global_batch_size, ...]` batch (sharded on the batch axes) this process's
    devices hold."""
    indices = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch_size,)).values()
    return len({i for index in indices for i in range(*index[0].indices(global_batch_size))})


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
    """Assemble each process's local rows into global arrays sharded on the batch axis (every process's rows
    padded to common shapes first: `common_local_shapes`)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
        for k, v in common_local_shapes(batch).items()
    }
