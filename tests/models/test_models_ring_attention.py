"""Ring attention (rpo_jax.models.ring_attention) on 8 simulated CPU devices against the dense XLA path.

Values and ∂/∂q, ∂/∂k, ∂/∂v for context ∈ {2, 4, 8} on every mask of the blockwise tests (padding, fully masked
rows, packed segments, shared-prompt parents, sliding windows on positions, soft-caps, GQA and MQA), in the zig-zag
layout and in the plain one, with heads also split over a tensor axis; and the zig-zag layout's balance.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from rpo_jax.models import ModelConfig, RopeSpec, attention, create_model, layers, make_mesh
from rpo_jax.models import ring_attention as ra
from tests.models.attention_testlib import CASES, SCALE, T, assert_close, make_spec, random_qkv, values_and_grads

BLOCK = 4  # the ring's inner blocks: several per shard at every context size (T/C = 24, 12, 6)


def _mesh(context: int, tensor: int = 1):
    sizes = (8 // (context * tensor), context, tensor)
    return jax.make_mesh(sizes, ("data", "context", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _check(case, context, *, tensor=1, zigzag=True):
    seed, (name, kind, heads, kv_heads, window, softcap, _) = case
    spec = make_spec(kind)
    q, k, v, probe = random_qkv(seed, heads, kv_heads)
    order = ra.zigzag_slots(T, context) if zigzag else np.arange(T, dtype=np.int32)
    back = np.argsort(order)
    laid = attention.MaskSpec(*(None if x is None else x[:, order] for x in spec))
    mesh = _mesh(context, tensor)

    def dense(q, k, v):
        return layers.dot_product_attention(q, k, v, attention.dense_mask(spec, window), scale=SCALE, softcap=softcap)

    def ring(q, k, v):
        q, k, v = (x[:, order] for x in (q, k, v))
        out = ra.context_attention(
            q, k, v, laid, jnp.asarray(order), mesh=mesh, window=window, scale=SCALE, softcap=softcap, block_size=BLOCK
        )
        return out[:, back]

    want, want_grads = values_and_grads(dense, q, k, v, probe)
    got, got_grads = values_and_grads(ring, q, k, v, probe)
    what = f"context={context} tensor={tensor} {'zig-zag' if zigzag else 'contiguous'}: {name}"
    assert_close(got, want, f"{what}: values")
    for arg, g, w in zip("qkv", got_grads, want_grads):
        assert_close(g, w, f"{what}: ∂/∂{arg}")


def test_ring_equals_dense_on_three_masks_and_context_sizes():
    """One case per context size (the full matrix: the slow test below)."""
    cases = list(enumerate(CASES))
    _check(cases[5], 2, tensor=2)  # parents + window on positions, MQA; heads over tensor=2 as well
    _check(cases[1], 4)  # padding + soft-cap, GQA
    _check(cases[3], 8, zigzag=False)  # packed segments + sliding window, contiguous shards


@pytest.mark.slow
@pytest.mark.parametrize("context", [2, 4, 8])
def test_ring_equals_dense_on_every_mask(context):
    for case in enumerate(CASES):
        _check(case, context)


def test_zigzag_layout_is_a_permutation_that_balances_causal_work():
    """Every device holds T/C tokens; the number of (query, key) slot pairs with key ≤ query is the same on every
    device in the zig-zag layout, and grows from the first to the last device when the row is split contiguously."""
    t, c = 64, 4
    slots = ra.zigzag_slots(t, c)
    assert sorted(slots.tolist()) == list(range(t))
    shards = slots.reshape(c, t // c)
    work = [int(np.sum(s[:, None] >= np.arange(t)[None, :])) for s in shards]
    assert work == [t * (t + 1) // 2 // c] * c, work
    contiguous = [int(np.sum(s[:, None] >= np.arange(t)[None, :])) for s in np.arange(t).reshape(c, t // c)]
    assert contiguous == sorted(contiguous) and contiguous[0] < contiguous[-1]
    assert ra.zigzag_slots(10, 1).tolist() == list(range(10))
    with pytest.raises(ValueError, match="not a multiple of 2 × context"):
        ra.zigzag_slots(12, 4)


def test_ring_block_size_divides_the_shard():
    assert ra.ring_block_size(24, 16) == 12
    assert ra.ring_block_size(4096, 512) == 512
    assert ra.ring_block_size(7, 4) == 1


GEMMA2_STYLE = ModelConfig(
    model_type="gemma2",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    sliding_window=16,
    attn_logit_softcap=5.0,
    final_logit_softcap=3.0,
    norm_plus_one=True,
    sandwich_norms=True,
    layer_types=("sliding_attention", "full_attention"),
    rope=(("full_attention", RopeSpec()), ("sliding_attention", RopeSpec(theta=100.0))),
)


def _model_logits_and_grads(mesh):
    """A Gemma-2-style decoder (sliding + global layers, soft-caps, GQA) on 2 rows of 160 tokens with a shared
    prompt, packing and padding: logits and parameter gradients of a fixed linear function of the logits."""
    t = 160
    seg = np.array([[0] * 40 + [1] * 50 + [2] * 50 + [3] * 20, [0] * 100 + [1] * 45 + [2] * 15])
    parent = np.array([[0] * 40 + [0] * 50 + [0] * 50 + [3] * 20, [0] * 100 + [1] * 45 + [2] * 15])
    pos = np.array([list(range(90)) + list(range(40, 90)) + [0] * 20, list(range(100)) + list(range(45)) + [0] * 15])
    valid = np.array([[True] * 140 + [False] * 20, [True] * 145 + [False] * 15])
    tokens = np.random.default_rng(3).integers(1, 64, size=(2, t))
    weights = jnp.asarray(np.random.default_rng(4).normal(size=(2, t, 64)), jnp.float32)
    model = create_model(GEMMA2_STYLE, rngs=nnx.Rngs(5), mesh=mesh)
    args = [jnp.asarray(x, jnp.int32) for x in (tokens, pos, seg, parent)] + [jnp.asarray(valid)]
    if mesh is not None:
        args = jax.device_put(args, NamedSharding(mesh, PartitionSpec()))

    def loss(m, tokens, positions, segment_ids, parent_ids, valid):
        out = m(tokens, attention_mask=valid, positions=positions, segment_ids=segment_ids, parent_ids=parent_ids)
        return jnp.sum(jnp.where(valid[..., None], out, 0) * weights) / t, out

    (_, out), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model, *args)
    return out, jax.tree.leaves(grads)


@pytest.mark.slow
def test_model_on_a_context_mesh_equals_one_device():
    """mesh {data: 2, context: 4}: the decoder puts the rows in the zig-zag layout and runs ring attention in every
    layer; logits and parameter gradients equal the one-device model's (train-step parity: tests/train/
    test_context_parallel.py)."""
    want, want_grads = _model_logits_and_grads(None)
    got, got_grads = _model_logits_and_grads(make_mesh({"data": 2, "context": 4}))
    assert_close(got, want, "logits")
    for g, w in zip(got_grads, want_grads, strict=True):
        assert_close(g, w, "parameter gradient")


def test_context_mesh_refuses_what_does_not_compose():
    mesh = make_mesh({"data": 2, "context": 4})
    splash = dataclasses.replace(GEMMA2_STYLE, attention="splash")
    model = create_model(splash, rngs=nnx.Rngs(0), mesh=mesh)
    tokens = jax.device_put(jnp.ones((2, 16), jnp.int32), NamedSharding(mesh, PartitionSpec()))
    with pytest.raises(ValueError, match="does not compose with mesh.context > 1 yet"):
        nnx.jit(lambda m, x: m(x))(model, tokens)
    odd = jax.device_put(jnp.ones((2, 12), jnp.int32), NamedSharding(mesh, PartitionSpec()))
    model = create_model(GEMMA2_STYLE, rngs=nnx.Rngs(0), mesh=mesh)
    with pytest.raises(ValueError, match=r"row length 12 is not a multiple of 2 × context \(8\)"):
        nnx.jit(lambda m, x: m(x))(model, odd)


def test_make_mesh_processes_lays_axes_over_processes():
    """`make_mesh(processes=...)` on one process: every axis inside it (the order of `jax.make_mesh`), and the
    settings it cannot honour are one-line errors naming them (the 2-process layout, context shard c on process c:
    tests/train/test_context_parallel.py::test_context_across_two_processes_equals_one_device)."""
    mesh = make_mesh({"data": 4, "context": 2}, processes={"context": 1})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 1, "context": 2}
    assert [d.id for d in mesh.devices.flat] == [d.id for d in make_mesh({"data": 4, "context": 2}).devices.flat]
    assert dict(make_mesh({"data": 8}, processes={}).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    for processes, match in (
        ({"context": 2}, r"^mesh processes \{.*'context': 2\}: sizes ≥ 1 multiplying to the 1 processes"),
        ({"sequence": 1}, r"^mesh processes: unknown axes \['sequence'\]"),
        ({"context": 0}, r"sizes ≥ 1 multiplying to the 1 processes"),
    ):
        with pytest.raises(ValueError, match=match):
            make_mesh({"data": 4, "context": 2}, processes=processes)
    with pytest.raises(ValueError, match=r"^mesh processes: data=3 cannot span 2 processes"):
        from rpo_jax.models.sharding import process_mesh

        fake = [type("Device", (), {"process_index": i // 3, "id": i})() for i in range(6)]
        process_mesh((3, 2, 1, 1), {"data": 2}, fake)
