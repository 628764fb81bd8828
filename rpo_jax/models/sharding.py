"""Logical axis names → mesh axes: one rules table (MaxText style) and the helpers that apply it.

Every parameter carries logical axis names in its nnx metadata (`out_sharding`), e.g. the query projection is
("layers", "embed", "heads", "head_dim"). `DEFAULT_RULES` maps each logical name to mesh axes of a mesh made
with `make_mesh((data, fsdp, tensor))`. A dimension whose size is not divisible by the product of its mesh axes
sizes is replicated instead (e.g. 3 key/value heads on tensor=2): it never crashes, it only shards less.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context")

#: logical axis → mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", ("fsdp", "context")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("sequence", "context"),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, int, int, int]:
    """Sizes for (data, fsdp, tensor, context) from `{axis: size}` (a missing axis is 1); at most one size may be -1,
    filled so that the product is `num_devices`."""
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
            raise ValueError(
                f"mesh: {num_devices} devices are not divisible by {known} ({dict(zip(MESH_AXES, sizes))})"
            )
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh: sizes {dict(zip(MESH_AXES, sizes))} multiply to {math.prod(sizes)}, "
            f"but there are {num_devices} devices"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(
    shape: Sequence[int] | Mapping[str, int] = (-1, 1, 1), devices=None, processes: Mapping[str, int] | None = None
) -> Mesh:
    """A (data, fsdp, tensor[, context]) mesh with Auto axis types (sharding propagated by XLA).

    Args:
        shape: the sizes in `MESH_AXES` order (three or four), or `{axis: size}` as in `config.mesh` (a missing
            axis is 1); one size may be -1, the rest of the devices (see `resolve_mesh_shape`).
        devices: the devices to lay out (default: every device of every process).
        processes: `{axis: n}`, how many processes each axis spans (a missing axis: 1; the n multiply to the
            number of processes the devices belong to, and each divides its axis's size), e.g. `{"context": 2}`
            on 2 processes puts the two context shards of every row in different processes and every other axis
            inside one process (`process_mesh`). None: `jax.make_mesh`'s order, in which the first axes (data,
            then fsdp, ...) span the processes and `context`, the last, stays inside one process when it can.

    Returns:
        A `jax.sharding.Mesh` with axes `("data", "fsdp", "tensor")`, and `"context"` last when its size is more
        than 1 (the sequence split of ring attention; without it every mesh is as before the context axis).
    """
    devices = jax.devices() if devices is None else list(devices)
    named = shape if isinstance(shape, Mapping) else dict(zip(MESH_AXES[: len(shape)], shape, strict=True))
    sizes = resolve_mesh_shape(named, len(devices))
    axes = MESH_AXES if sizes[3] > 1 else MESH_AXES[:3]
    types = (AxisType.Auto,) * len(axes)
    if processes is None:
        return jax.make_mesh(sizes[: len(axes)], axes, axis_types=types, devices=devices)
    return Mesh(process_mesh(sizes, processes, devices).reshape(sizes[: len(axes)]), axes, axis_types=types)


def process_mesh(sizes: Sequence[int], processes: Mapping[str, int], devices: Sequence) -> np.ndarray:
    """The `[data, fsdp, tensor, context]` array of `devices` in which axis a spans `processes[a]` processes:
    every axis of size s is split s = n·m, n across processes (outer) × m inside one (inner), laid out by
    `jax.experimental.mesh_utils.create_hybrid_device_mesh` with processes as its granules (each process's own
    devices in `jax.make_mesh`'s order inside it).

    Args:
        sizes: the four axis sizes (`resolve_mesh_shape`).
        processes: `{axis: n}` (a missing axis is 1).
        devices: the devices, of `prod(n)` processes with the same number of devices each.
    """
    from jax.experimental import mesh_utils

    unknown = set(processes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh processes: unknown axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    outer = [int(processes.get(axis, 1)) for axis in MESH_AXES]
    wanted = dict(zip(MESH_AXES, outer))
    count = len({d.process_index for d in devices})
    if any(n < 1 for n in outer) or math.prod(outer) != count:
        raise ValueError(f"mesh processes {wanted}: sizes ≥ 1 multiplying to the {count} processes of the devices")
    for axis, size, n in zip(MESH_AXES, sizes, outer):
        if size % n:
            raise ValueError(f"mesh processes: {axis}={size} cannot span {n} processes (not a multiple)")
    inner = [size // n for size, n in zip(sizes, outer)]
    if len(devices) != count * math.prod(inner):
        raise ValueError(
            f"mesh processes {wanted}: every one of the {count} processes needs {math.prod(inner)} devices"
        )
    return mesh_utils.create_hybrid_device_mesh(inner, outer, devices, process_is_granule=True)


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules | None = None
) -> PartitionSpec:
    """The `PartitionSpec` of one array from its logical axis names.

    Each logical axis is mapped by `rules`; mesh axes already used by an earlier dimension, missing from the mesh,
    or not dividing the dimension are dropped (that dimension is replicated).

    Args:
        logical_axes: one logical name (or `None`) per dimension, e.g. `("embed", "mlp")`.
        shape: the array's shape.
        mesh: the device mesh.
        rules: logical axis → mesh axis (or axes, or `None`); default `DEFAULT_RULES`.

    Returns:
        The `PartitionSpec`.
    """
    return mapped_spec(logical_axes, shape, mesh, rules, indivisible=None)


def mapped_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh, rules: Rules | None, *, indivisible
) -> PartitionSpec:
    """The one mapping of logical axes to mesh axes by `rules` (mesh axes already used by an earlier dimension,
    missing from the mesh or of size 1 are dropped; a dimension left with none is replicated); a dimension whose
    mesh axes do not divide it gets `indivisible` (None: replicated; `PartitionSpec.UNCONSTRAINED`: left to XLA)."""
    table = dict(DEFAULT_RULES if rules is None else rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape, strict=True):
        target = table.get(name) if name is not None else None
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if a in mesh.shape and a not in used and mesh.shape[a] > 1)
        if not axes:
            spec.append(None)
        elif size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(indivisible)
    return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    """NamedSharding of one nnx Variable from its `out_sharding` logical names (replicated when it has none)."""
    logical = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
    return NamedSharding(mesh, logical_to_spec(logical, variable.shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | None = None):
    """The rule-given sharding of every variable of a model state.

    Args:
        state: an `nnx.State` of Variables, concrete or abstract.
        mesh: the device mesh.
        rules: logical axis → mesh axis; default `DEFAULT_RULES`.

    Returns:
        A pytree like `state` with a `NamedSharding` as each value.
    """
    return jax.tree.map(
        lambda v: v.replace(variable_sharding(v, mesh, rules)), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules | None = None) -> nnx.Module:
    """Moves every variable of `model` to its rule-given sharding on `mesh`, in place.

    Args:
        model: an nnx module whose parameters carry logical axis names.
        mesh: the device mesh.
        rules: logical axis → mesh axis; default `DEFAULT_RULES`.

    Returns:
        The same model, sharded.
    """
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def activation_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh, rules: Rules | None = None
) -> PartitionSpec:
    """PartitionSpec of an activation: like `logical_to_spec`, except that a dimension whose rule names mesh
    axes that do not divide it is left to XLA (`PartitionSpec.UNCONSTRAINED`) rather than replicated."""
    return mapped_spec(logical_axes, shape, mesh, rules, indivisible=PartitionSpec.UNCONSTRAINED)


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules: Rules | None = None) -> jax.Array:
    """`x` constrained to the sharding its logical axes give on the mesh its computation runs on (the mesh of
    the jitted function's inputs, read from `jax.typeof(x)`), e.g. attention queries ("batch", None, "heads",
    None): batch rows over data×fsdp, heads over tensor. Without a mesh of more than one device (plain CPU or one
    device, eager code) it returns `x` unchanged; it never changes values, only where they live."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or getattr(mesh, "empty", True) or math.prod(mesh.shape.values()) == 1:
        return x
    spec = activation_spec(logical_axes, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_shard_count(x: jax.Array) -> int:
    """How many devices' shares the first dimension of `x` ("batch": rows over data×fsdp) is split into on the
    mesh its computation runs on (read from `jax.typeof(x)`, as `constrain`); 1 without such a mesh or when the
    batch axes do not divide it."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    if mesh is None or getattr(mesh, "empty", True):
        return 1
    axes = activation_spec(("batch",), x.shape[:1], mesh)[0]
    if axes is None or axes is PartitionSpec.UNCONSTRAINED:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def sequence_is_split(x: jax.Array) -> bool:
    """Whether `x` is computed on a mesh with a context axis of more than one device (the sequence dimension of
    activations split over it: ring attention). Then [N,T] must not be merged into one row dimension (its
    sharding would be lost: XLA would gather the whole sequence on every device)."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    shape = getattr(mesh, "shape", None) or {}
    return shape.get("context", 1) > 1


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Rules | None = None) -> NamedSharding:
    """Sharding of a [N, ...] batch array: the leading axis over the mesh axes of the `batch` rule."""
    target = dict(DEFAULT_RULES if rules is None else rules).get("batch")
    return NamedSharding(mesh, PartitionSpec(target, *([None] * (ndim - 1))))
