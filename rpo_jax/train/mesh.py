"""The run's device mesh (sizes from the config, one may be -1) and how host batches become global arrays.

Parameter and batch shardings come from the models' rules table (`rpo_jax.models.sharding`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rpo_jax.models.sharding import MESH_AXES, batch_sharding
from rpo_jax.models.sharding import make_mesh as _mesh_of_shape


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Sizes for (data, fsdp, tensor); at most one size may be -1, filled so the product is `num_devices`."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh: unknown axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by {known} ({dict(zip(MESH_AXES, sizes))})")
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: sizes {dict(zip(MESH_AXES, sizes))} multiply to {math.prod(sizes)}, "
                         f"but there are {num_devices} devices")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(shape: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A GSPMD-style (Auto axes) mesh over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return _mesh_of_shape(resolve_mesh_shape(shape or {"data": -1}, len(devices)), devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


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
