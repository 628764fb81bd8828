"""Ring attention (rpo_jax.models.ring_attention) on 8 simulated CPU devices against the dense XLA path.

Values and ∂/∂q, ∂/∂k, ∂/∂v for context ∈ {2, 4, 8} on every mask of the blockwise tests (padding, fully masked
rows, packed segments, shared-prompt parents, sliding windows on positions, soft-caps, GQA and MQA), in the zig-zag
layout and in the plain one, with heads also split over a tensor axis; and the zig-zag layout's balance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from rpo_jax.models import attention, layers
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
