"""Logical axis names → mesh axes: one rules table (MaxText style) and the helpers that apply it.

Every parameter carries logical axis names in its nnx metadata (`out_sharding`), e.g. the query projection is
("layers", "embed", "heads", "head_dim"). `DEFAULT_RULES` maps each logical name to mesh axes of a mesh made
with `make_mesh((data, fsdp, tensor))`. A dimension whose size is not divisible by the product of its mesh axes
sizes is replicated instead (e.g. 3 key/value heads on tensor=2): it never crashes, it only shards less.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

#: logical axis → mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def make_mesh(shape: tuple[int, int, int], devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (sharding propagated by XLA)."""
    kwargs = {} if devices is None else {"devices": devices}
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, **kwargs)


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules | None = None
) -> PartitionSpec:
    """PartitionSpec for one array: each logical axis mapped by `rules`; mesh axes already used by an earlier
    dimension, missing from the mesh, or not dividing the dimension are dropped (that dimension is replicated)."""
    table = dict(DEFAULT_RULES if rules is None else rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape, strict=True):
        target = table.get(name) if name is not None else None
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if a in mesh.shape and a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    """NamedSharding of one nnx Variable from its `out_sharding` logical names (replicated when it has none)."""
    logical = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
    return NamedSharding(mesh, logical_to_spec(logical, variable.shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | None = None):
    """A pytree like `state` (of nnx Variables, concrete or abstract) with NamedShardings as values."""
    return jax.tree.map(
        lambda v: v.replace(variable_sharding(v, mesh, rules)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | None = None) -> nnx.Module:
    """Moves every variable of `model` to its rule-given sharding on `mesh` (in place); returns the model."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Rules | None = None) -> NamedSharding:
    """Sharding of a [N, ...] batch array: the leading axis over the mesh axes of the `batch` rule."""
    target = dict(DEFAULT_RULES if rules is None else rules).get("batch")
    return NamedSharding(mesh, PartitionSpec(target, *([None] * (ndim - 1))))
