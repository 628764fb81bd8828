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
    return global_batch_size // n_proc


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's local rows into global arrays sharded on the batch axis."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in batch.items()}
