"""Ring attention: exact self-attention with the sequence dimension sharded over a `context` mesh axis.

Each of the C devices of the context axis holds T/C tokens of every row (queries, keys, values and their MaskSpec
pieces) and the *slot* of each of its tokens in the row (its index before any reordering: the mask is causal on
slots). The keys and values travel around the ring (`jax.lax.ppermute` to the next device, C - 1 times); at each
visit a device runs `attention.block_step` — the same online-softmax step as `blockwise_attention` — for its
queries against the visiting keys, blocks of `size` × `size` at a time, with each block pair's mask built from both
sides' MaskSpec pieces (`attention.block_mask`: padding, segments, shared-prompt parents, windows on positions,
soft-caps and grouped-query heads as on one device). Nothing of size T×T or T×(T/C) is ever built: memory per
device is O((T/C)·block).

The backward pass is a custom VJP running a second ring: the keys and values travel again, each with the float32
dK, dV accumulated for it by every device it visits (`attention.block_grads`), and one last hop brings those home
(C hops in all); dQ stays on its device. A block pair whose keys all come after its queries (min key slot > max
query slot) is skipped (`jax.lax.cond`) forward and backward.

Load balancing (`zigzag_slots`): under a causal mask a contiguous split gives the last device all the work (its
queries see every key) and the first almost none. The zig-zag layout cuts a row into 2C chunks and gives device i
chunks i and 2C-1-i: every device then has the same number of visible block pairs, and each ring step skips half of
the visiting blocks. The model reorders the tokens of a row once (embedding input, positions, labels, MaskSpec) and
runs every layer in that order; per-token work (norms, MLPs, RoPE on positions, per-token log-probs summed per
response) does not depend on the order.

Shapes: N batch, T row length (Tl = T/C on a device), H query heads, K key/value heads, hd head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from rpo_jax.models import attention, layers

CONTEXT_AXIS = "context"


# ----------------------------------------------------------------------------------------------- layout
def context_mesh(x: jax.Array):
    """The mesh `x` is computed on when it has a context axis of more than one device (ring attention), else
    None (no mesh, one device, or no sequence split). Read from `jax.typeof(x)` inside a jitted function."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    shape = getattr(mesh, "shape", None) or {}
    return mesh if shape.get(CONTEXT_AXIS, 1) > 1 else None


def zigzag_slots(length: int, shards: int) -> np.ndarray:
    """[length] int32: the slot (index in the row) of each token in the zig-zag layout, device-major.

    The row is cut into 2·shards chunks of length / (2·shards); device i holds chunks i and 2·shards-1-i, so
    positions [i·Tl, (i+1)·Tl) of the reordered row (Tl = length / shards) are its tokens. `row[..., slots]` puts a
    row in this layout; `np.argsort(slots)` undoes it. One shard: the identity.
    """
    if shards < 1 or length % (2 * shards) and shards > 1:
        raise ValueError(f"zig-zag layout: row length {length} is not a multiple of 2 × context ({2 * shards})")
    if shards == 1:
        return np.arange(length, dtype=np.int32)
    chunk = length // (2 * shards)
    pieces = [np.arange(c * chunk, (c + 1) * chunk) for i in range(shards) for c in (i, 2 * shards - 1 - i)]
    return np.concatenate(pieces).astype(np.int32)


# ----------------------------------------------------------------------------------------------- one visit
def _block(x: jax.Array | None, i, size: int, axis: int) -> jax.Array | None:
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _spec_block(spec: attention.MaskSpec, i, size: int) -> attention.MaskSpec:
    return attention.MaskSpec(*(_block(x, i, size, 1) for x in spec))


def _loop(count: int, body, init):
    """`jax.lax.fori_loop(0, count, body, init)` as a `while_loop`. A fori_loop of static length is a scan, and a
    scan inside the decoder's differentiated layer scan gets linearized by JAX even inside a custom VJP's rules,
    stacking every block pair's scores and masks (1.6 GiB for one 8,192-token layer on 4 devices, against 58 MiB
    this way); a while_loop is never linearized (these loops are only run, their gradients are `_ring_bwd`)."""

    def step(state):
        i, value = state
        return i + 1, body(i, value)

    return jax.lax.while_loop(lambda state: state[0] < count, step, (jnp.int32(0), init))[1]


def _live(q_slots: jax.Array, k_slots: jax.Array) -> jax.Array:
    """Whether any key of a key block can be visible to a query block on slots (min k slot ≤ max q slot)."""
    return jnp.min(k_slots) <= jnp.max(q_slots)


def visit_forward(carry: attention.BlockCarry, queries, keys, *, size: int, window, scale, softcap):
    """The queries' online-softmax state after one visiting key/value shard.

    carry: `attention.BlockCarry` (m, l [N,K,G,Tl], acc [N,K,G,Tl,hd]); queries = (q [N,K,G,Tl,hd], MaskSpec
    [N,Tl], slots [Tl]); keys = (k, v [N,K,S,hd], MaskSpec [N,S], slots [S]); Tl and S multiples of `size`.
    Query block i takes key block j by `attention.block_step` unless no key of j comes at or before a query of i.
    """
    q, q_spec, q_slots = queries
    k, v, k_spec, k_slots = keys
    n_q, n_k = q.shape[3] // size, k.shape[2] // size

    def query_block(_, i):
        q_i, spec_i, slots_i = _block(q, i, size, 3), _spec_block(q_spec, i, size), _block(q_slots, i, size, 0)
        state = attention.BlockCarry(*(_block(x, i, size, 3) for x in carry))

        def key_block(j, state):
            slots_j = _block(k_slots, j, size, 0)

            def step(state):
                mask = attention.block_mask(slots_i, slots_j, spec_i, _spec_block(k_spec, j, size), window)
                k_j, v_j = _block(k, j, size, 2), _block(v, j, size, 2)
                return attention.block_step(state, q_i, k_j, v_j, mask, scale=scale, softcap=softcap)

            return jax.lax.cond(_live(slots_i, slots_j), step, lambda s: s, state)

        return None, _loop(n_k, key_block, state)

    _, blocks = jax.lax.scan(query_block, None, jnp.arange(n_q))
    shape = carry.m.shape
    return attention.BlockCarry(*(jnp.moveaxis(x, 0, 3).reshape(*shape, *x.shape[5:]) for x in blocks))


def visit_backward(dq, dkv, queries, dout, stats, keys, *, size: int, window, scale, softcap):
    """One visiting shard's share of the gradients (`attention.block_grads` over its block pairs).

    dq [N,K,G,Tl,hd] float32 (the queries' gradient so far); dkv = (dk, dv) [N,K,S,hd] float32, travelling with
    the keys; queries, keys as in `visit_forward`; dout [N,K,G,Tl,hd]; stats = (m, 1/l, D) [N,K,G,Tl].
    Returns (dq, (dk, dv)) with this visit's contributions added.
    """
    q, q_spec, q_slots = queries
    k, v, k_spec, k_slots = keys
    n_q, n_k = q.shape[3] // size, k.shape[2] // size
    n, kh, g, _, hd = q.shape

    def key_block(dq, j):
        k_j, v_j, spec_j, slots_j = (
            _block(k, j, size, 2),
            _block(v, j, size, 2),
            _spec_block(k_spec, j, size),
            _block(k_slots, j, size, 0),
        )

        def query_block(i, state):
            dq, dk_j, dv_j = state
            slots_i = _block(q_slots, i, size, 0)

            def grads(_):
                spec_i = _spec_block(q_spec, i, size)
                mask = attention.block_mask(slots_i, slots_j, spec_i, spec_j, window)
                stats_i = tuple(_block(x, i, size, 3) for x in stats)
                q_i, dout_i = _block(q, i, size, 3), _block(dout, i, size, 3)
                return attention.block_grads(q_i, k_j, v_j, mask, dout_i, stats_i, scale=scale, softcap=softcap)

            def nothing(_):
                zeros = jnp.zeros((n, kh, size, hd), jnp.float32)
                return jnp.zeros((n, kh, g, size, hd), jnp.float32), zeros, zeros

            dq_i, dk_ij, dv_ij = jax.lax.cond(_live(slots_i, slots_j), grads, nothing, None)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _block(dq, i, size, 3) + dq_i, i * size, axis=3)
            return dq, dk_j + dk_ij, dv_j + dv_ij

        zeros = jnp.zeros((n, kh, size, hd), jnp.float32)
        dq, dk_j, dv_j = _loop(n_q, query_block, (dq, zeros, zeros))
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(key_block, dq, jnp.arange(n_k))
    dk, dv = (jnp.moveaxis(x, 0, 2).reshape(n, kh, n_k * size, hd) for x in (dk, dv))
    return dq, (dkv[0] + dk, dkv[1] + dv)


# ----------------------------------------------------------------------------------------------- the ring
def _next(tree, axis_name: str, shards: int):
    """Every array of `tree` sent to the next device of the ring (device i → i + 1 mod shards)."""
    perm = [(i, (i + 1) % shards) for i in range(shards)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def _ring(axis_name, shards, window, scale, softcap, size, q, k, v, spec, slots):
    return _ring_fwd(axis_name, shards, window, scale, softcap, size, q, k, v, spec, slots)[0]


def _ring_fwd(axis_name, shards, window, scale, softcap, size, q, k, v, spec, slots):
    """Per device: q [N,K,G,Tl,hd], k/v [N,K,Tl,hd], spec [N,Tl], slots [Tl] → (out [N,K,G,Tl,hd] in v's dtype,
    m, l [N,K,G,Tl]) after every device's keys visited."""
    n, kh, g, tl, hd = q.shape
    carry = attention.empty_carry((n, kh, g, tl), hd)
    keys = (k, v, spec, slots)
    options = {"size": size, "window": window, "scale": scale, "softcap": softcap}
    for hop in range(shards):
        carry = visit_forward(carry, (q, spec, slots), keys, **options)
        if hop < shards - 1:
            keys = _next(keys, axis_name, shards)
    out = attention.block_finish(carry).astype(v.dtype)
    return (out, carry.m, carry.l), (q, k, v, spec, slots, out, carry.m, carry.l)


def _ring_bwd(axis_name, shards, window, scale, softcap, size, residuals, cotangents):
    q, k, v, spec, slots, out, m, l = residuals
    dout = cotangents[0]  # m and l are statistics: their cotangents are ignored (the wrapper only compares m)
    d = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    stats = (m, jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0), d)
    options = {"size": size, "window": window, "scale": scale, "softcap": softcap}
    dq = jnp.zeros(q.shape, jnp.float32)
    keys = (k, v, spec, slots)
    dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for hop in range(shards):
        dq, dkv = visit_backward(dq, dkv, (q, spec, slots), dout, stats, keys, **options)
        dkv = _next(dkv, axis_name, shards)  # C hops in all: each key shard's gradient comes home
        if hop < shards - 1:
            keys = _next(keys, axis_name, shards)
    return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_block_size(local_length: int, block_size: int | None = None) -> int:
    """The block of the ring's inner loops: the largest divisor of `local_length` (T/C) not above `block_size`,
    so that blocks never need padding (`block_size` None: the blockwise default, `attention.blockwise_block_size`)."""
    limit = min(block_size or attention.blockwise_block_size(), local_length)
    return max(d for d in range(1, limit + 1) if local_length % d == 0)


def ring_attention(
    q,
    k,
    v,
    spec: attention.MaskSpec,
    slots: jax.Array,
    *,
    axis_name: str = CONTEXT_AXIS,
    window: int | None,
    scale: float,
    softcap: float | None,
    block_size: int | None = None,
) -> jax.Array:
    """Exact attention of this device's queries against every device's keys along `axis_name`; call it inside
    `jax.shard_map` (or use `context_attention`).

    q [N,Tl,H,hd], k/v [N,Tl,K,hd], spec fields [N,Tl], slots [Tl] int32 (the row slot of each local token) →
    [N,Tl,H,hd]: softmax over the visible keys of the whole row, key k visible to query q iff slot[k] ≤ slot[q] ∧
    valid[k] ∧ (seg[k] = seg[q] ∨ seg[k] = parent[q]) [∧ pos[q] - pos[k] < window] — `attention.dense_mask` on
    the row in slot order. A query that sees no key gets the mean of v over the row's T keys, as on the dense path.
    """
    n, tl, h, hd = q.shape
    kh = k.shape[2]
    shards = jax.lax.axis_size(axis_name)
    size = ring_block_size(tl, block_size)
    qg = q.reshape(n, tl, kh, h // kh, hd).transpose(0, 2, 3, 1, 4)  # [N,K,G,Tl,hd]
    kt, vt = (x.transpose(0, 2, 1, 3) for x in (k, v))  # [N,K,Tl,hd]
    slots = slots.astype(jnp.int32)
    out, m, _ = _ring(axis_name, shards, window, scale, softcap, size, qg, kt, vt, spec, slots)
    seen = jax.lax.stop_gradient(m) > layers.MASK_VALUE
    mean_v = jax.lax.pmean(jnp.mean(v, axis=1), axis_name)[:, :, None, None, :]  # [N,K,1,1,hd]
    out = jnp.where(seen[..., None], out, mean_v.astype(out.dtype))
    return out.transpose(0, 3, 1, 2, 4).reshape(n, tl, h, hd)


def _shard_axes(mesh: Mesh, names: tuple[str, ...], size: int):
    """The mesh axes among `names` (present, of size > 1) whose product divides `size`, as a PartitionSpec entry."""
    axes = tuple(a for a in names if mesh.shape.get(a, 1) > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes[0] if len(axes) == 1 else axes


def _grouped(q, k, v):
    """q [N,Tl,H,hd], k/v [N,Tl,K,hd] → q [N,K,G,Tl,hd], k/v [N,K,Tl,hd]."""
    n, tl, h, hd = q.shape
    kh = k.shape[2]
    return q.reshape(n, tl, kh, h // kh, hd).transpose(0, 2, 3, 1, 4), *(x.transpose(0, 2, 1, 3) for x in (k, v))


def _ungrouped(x: jax.Array) -> jax.Array:
    """[N,K,G,Tl,...] → [N,Tl,H,...] (H = K·G)."""
    n, kh, g, tl = x.shape[:4]
    return jnp.moveaxis(x, 3, 1).reshape(n, tl, kh * g, *x.shape[4:])


def _local_forward(q, k, v, spec, slots, *, axis_name, window, scale, softcap, block_size):
    """One device's forward ring: (out [N,Tl,H,hd] in v's dtype, m, l [N,Tl,H] float32)."""
    size = ring_block_size(q.shape[1], block_size)
    shards = jax.lax.axis_size(axis_name)
    (out, m, l), _ = _ring_fwd(axis_name, shards, window, scale, softcap, size, *_grouped(q, k, v), spec, slots)
    return _ungrouped(out), _ungrouped(m), _ungrouped(l)


def _local_backward(q, k, v, spec, slots, out, m, l, dout, *, axis_name, window, scale, softcap, block_size):
    """One device's backward ring: (dq [N,Tl,H,hd], dk, dv [N,Tl,K,hd])."""
    n, tl, h, hd = q.shape
    kh = k.shape[2]
    size = ring_block_size(tl, block_size)
    shards = jax.lax.axis_size(axis_name)
    qg, kt, vt = _grouped(q, k, v)
    group = lambda x: x.reshape(n, tl, kh, h // kh, *x.shape[3:]).transpose(0, 2, 3, 1, *range(4, x.ndim + 1))  # noqa: E731
    residuals = (qg, kt, vt, spec, slots, group(out), group(m), group(l))
    dq, dk, dv, _, _ = _ring_bwd(axis_name, shards, window, scale, softcap, size, residuals, (group(dout), None, None))
    return _ungrouped(dq), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)


def _specs(options, spec):
    """(activation, statistics, MaskSpec, slots) PartitionSpecs of `context_attention`'s shard_maps."""
    rows, heads, axis_name = options["rows"], options["heads"], options["axis_name"]
    row = PartitionSpec(rows, axis_name)
    mask = attention.MaskSpec(*(None if x is None else row for x in spec))
    return (
        PartitionSpec(rows, axis_name, heads, None),
        PartitionSpec(rows, axis_name, heads),
        mask,
        PartitionSpec(axis_name),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _context_ring(options, q, k, v, spec, slots):
    return _context_ring_fwd(options, q, k, v, spec, slots)[0]


def _context_ring_fwd(options, q, k, v, spec, slots):
    """(out [N,T,H,hd], m [N,T,H]) of the ring on global arrays. The custom VJP sits outside the shard_maps: a
    custom VJP inside a shard_map that is itself differentiated inside a `lax.scan` (the decoder's layer scan) is
    linearized by JAX instead, which keeps every block pair's scores for the backward pass (measured: 1.6 GiB
    against 53 MiB for one 8,192-token layer on 4 devices)."""
    options = dict(options)
    act, stat, mask, slot = _specs(options, spec)
    mesh = options.pop("mesh")
    options.pop("rows"), options.pop("heads")
    out, m, l = jax.shard_map(
        functools.partial(_local_forward, **options),
        mesh=mesh,
        in_specs=(act, act, act, mask, slot),
        out_specs=(act, stat, stat),
        check_vma=False,
    )(q, k, v, spec, slots)
    return (out, m), (q, k, v, spec, slots, out, m, l)


def _context_ring_bwd(options, residuals, cotangents):
    options = dict(options)
    spec = residuals[3]
    act, stat, mask, slot = _specs(options, spec)
    mesh = options.pop("mesh")
    options.pop("rows"), options.pop("heads")
    dq, dk, dv = jax.shard_map(
        functools.partial(_local_backward, **options),
        mesh=mesh,
        in_specs=(act, act, act, mask, slot, act, stat, stat, act),
        out_specs=(act, act, act),
        check_vma=False,
    )(*residuals, cotangents[0])
    return dq, dk, dv, None, None


_context_ring.defvjp(_context_ring_fwd, _context_ring_bwd)


def context_attention(
    q,
    k,
    v,
    spec: attention.MaskSpec,
    slots: jax.Array,
    *,
    mesh: Mesh,
    window: int | None,
    scale: float,
    softcap: float | None,
    block_size: int | None = None,
    axis_name: str = CONTEXT_AXIS,
) -> jax.Array:
    """Ring attention on global arrays: the row dimension split over `axis_name` of `mesh` (one `jax.shard_map`
    for the forward ring and one for the backward ring, under one custom VJP), rows over the mesh's data / fsdp
    axes and heads over tensor where they divide. Same results as `ring_attention` inside a shard_map.

    q [N,T,H,hd], k/v [N,T,K,hd], spec fields [N,T], slots [T] (the row in its layout: `zigzag_slots` for causal
    load balance, or any order) → [N,T,H,hd] in the same layout. T must be a multiple of the context size.
    """
    n, t, h, _ = q.shape
    shards = mesh.shape.get(axis_name, 1)
    if t % shards:
        raise ValueError(f"context attention: row length {t} is not a multiple of {axis_name}={shards}")
    options = {
        "mesh": mesh,
        "axis_name": axis_name,
        "window": window,
        "scale": scale,
        "softcap": softcap,
        "block_size": block_size,
        "rows": _shard_axes(mesh, ("data", "fsdp"), n),
        "heads": _shard_axes(mesh, ("tensor",), math.gcd(h, k.shape[2])),
    }
    out, m = _context_ring(_Options(options), q, k, v, spec, slots.astype(jnp.int32))
    seen = jax.lax.stop_gradient(m) > layers.MASK_VALUE  # [N,T,H]
    mean_v = jnp.repeat(jnp.mean(v, axis=1), h // k.shape[2], axis=1)[:, None]  # [N,1,H,hd]: the dense fallback
    return jnp.where(seen[..., None], out, mean_v.astype(out.dtype))


class _Options(dict):
    """The static options of `_context_ring` (a custom VJP's non-differentiable argument must be hashable)."""

    def __hash__(self):
        return hash(tuple(sorted((k, v) for k, v in self.items())))
