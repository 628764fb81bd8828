"""attention="blockwise" (rpo_jax.models.attention.blockwise_attention) against the dense XLA path.

Values and ∂/∂q, ∂/∂k, ∂/∂v on every row (fully masked ones included) for every mask the MaskSpec describes,
grouped-query heads and block sizes that do and do not divide T; its compiled forward + backward temporaries on an
8,192-token row against the dense path's; and a whole model with attention="blockwise" against attention="xla".
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rpo_jax.models import ModelConfig, attention, create_model, layers
from tests.models.attention_testlib import CASES, SCALE, T, assert_close, make_spec, random_qkv, values_and_grads


def test_blockwise_equals_xla_on_every_mask_in_values_and_gradients():
    for seed, (name, kind, heads, kv_heads, window, softcap, block) in enumerate(CASES):
        spec = make_spec(kind)
        q, k, v, probe = random_qkv(seed, heads, kv_heads)
        dense = lambda q, k, v: layers.dot_product_attention(  # noqa: E731
            q, k, v, attention.dense_mask(spec, window), scale=SCALE, softcap=softcap
        )
        blockwise = lambda q, k, v: attention.blockwise_attention(  # noqa: E731
            q, k, v, spec, window=window, scale=SCALE, softcap=softcap, block_size=block
        )
        want, want_grads = values_and_grads(dense, q, k, v, probe)
        got, got_grads = values_and_grads(blockwise, q, k, v, probe)
        assert_close(got, want, f"{name}: values")
        for arg, g, w in zip("qkv", got_grads, want_grads):
            assert_close(g, w, f"{name}: ∂/∂{arg}")


def test_block_step_in_any_key_order_gives_the_same_state():
    """Masked keys add nothing and each step rescales what came before: key blocks taken in reverse order (as a
    ring's shards may arrive) give the same output as in order, and as the dense path."""
    spec = make_spec("segments")
    q, k, v, _ = random_qkv(7, 4, 2)
    qg = q.reshape(2, T, 2, 2, 8).transpose(0, 2, 3, 1, 4)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    slots = jnp.arange(T, dtype=jnp.int32)

    def run(order):
        carry = attention.empty_carry((2, 2, 2, T), 8)
        for j in order:
            block = slice(16 * j, 16 * (j + 1))
            key_spec = attention.MaskSpec(*(None if x is None else x[:, block] for x in spec))
            mask = attention.block_mask(slots, slots[block], spec, key_spec, None)
            carry = attention.block_step(carry, qg, kt[:, :, block], vt[:, :, block], mask, scale=SCALE, softcap=None)
        return attention.block_finish(carry).transpose(0, 3, 1, 2, 4).reshape(2, T, 4, 8)

    forward, backward = jax.jit(lambda: (run([0, 1, 2]), run([2, 1, 0])))()
    dense = layers.dot_product_attention(q, k, v, attention.dense_mask(spec), scale=SCALE, softcap=None)
    real = spec.valid[:, :, None, None]  # (padding queries see no key here: 0, not the dense path's fallback)
    assert_close(jnp.where(real, forward, 0), jnp.where(real, dense, 0), "key blocks in order")
    assert_close(jnp.where(real, backward, 0), jnp.where(real, dense, 0), "key blocks in reverse")


def test_blockwise_temporaries_are_linear_in_the_row_length():
    """One 8,192-token row (H=2, hd=32): the compiled forward + backward of blockwise attention needs at most 1/8
    of the dense path's temporaries (docs/guides/models.md quotes the figures)."""
    n, t, heads, hd = 1, 8192, 2, 32
    spec = attention.MaskSpec(jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t)))
    shape = jax.ShapeDtypeStruct((n, t, heads, hd), jnp.float32)

    def temporaries(fn):
        step = jax.value_and_grad(lambda q, k, v, probe: jnp.sum(fn(q, k, v) * probe), argnums=(0, 1, 2))
        return jax.jit(step).lower(shape, shape, shape, shape).compile().memory_analysis().temp_size_in_bytes

    dense = temporaries(
        lambda q, k, v: layers.dot_product_attention(q, k, v, attention.dense_mask(spec), scale=SCALE, softcap=None)
    )
    blockwise = temporaries(
        lambda q, k, v: attention.blockwise_attention(q, k, v, spec, window=None, scale=SCALE, softcap=None)
    )
    assert dense >= t * t * heads * 4, f"dense temporaries {dense} B: less than its [H,T,T] float32 scores?"
    assert blockwise * 8 <= dense, f"blockwise temporaries {blockwise} B > 1/8 of dense {dense} B"


def test_auto_picks_blockwise_for_long_rows_where_no_kernel_applies():
    facts = {"dtype": jnp.float32, "has_parents": False, "softcap": None}
    long, short = attention.BLOCKWISE_MIN_SEQ_LEN, attention.BLOCKWISE_MIN_SEQ_LEN - 1
    assert attention.resolve("auto", backend="cpu", seq_len=long, **facts) == "blockwise"
    assert attention.resolve("auto", backend="cpu", seq_len=short, **facts) == "xla"
    assert attention.resolve("auto", backend="gpu", seq_len=long, **facts) == "blockwise"  # float32: no cuDNN
    assert attention.resolve("auto", backend="gpu", seq_len=long, **{**facts, "dtype": jnp.bfloat16}) == "cudnn"
    assert (
        attention.resolve("auto", backend="gpu", seq_len=long, **{**facts, "dtype": jnp.bfloat16, "softcap": 50.0})
        == "blockwise"
    )
    # a TPU call splash cannot run stays on XLA (blockwise is not measured on a TPU; asked for, it runs)
    assert attention.resolve("auto", backend="tpu", seq_len=long, **{**facts, "has_parents": True}) == "xla"
    assert attention.resolve("blockwise", backend="tpu", seq_len=long, **{**facts, "has_parents": True}) == "blockwise"
    assert attention.resolve("blockwise", backend="cpu", seq_len=3, **{**facts, "has_parents": True}) == "blockwise"


def test_model_with_blockwise_equals_the_xla_model():
    """A tiny grouped-query Llama, rows of 160 tokens (blocks of 128: one partial block) with a shared prompt,
    packing and padding: attention="blockwise" gives the logits and the parameter gradients of attention="xla"."""
    t = 160
    seg = np.array([[0] * 40 + [1] * 50 + [2] * 50 + [3] * 20, [0] * 100 + [1] * 45 + [2] * 15])
    parent = np.array([[0] * 40 + [0] * 50 + [0] * 50 + [3] * 20, [0] * 100 + [1] * 45 + [2] * 15])
    pos = np.array([list(range(90)) + list(range(40, 90)) + [0] * 20, list(range(100)) + list(range(45)) + [0] * 15])
    valid = np.array([[True] * 140 + [False] * 20, [True] * 145 + [False] * 15])
    tokens = np.random.default_rng(3).integers(1, 64, size=(2, t))
    args = [jnp.asarray(x, jnp.int32) for x in (tokens, pos, seg, parent)]
    weights = jnp.asarray(np.random.default_rng(4).normal(size=(2, t, 64)), jnp.float32)

    def logits_and_grads(impl):
        config = ModelConfig(
            model_type="llama",
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            attention=impl,
        )
        model = create_model(config, rngs=nnx.Rngs(5))

        def loss(m):
            out = m(
                args[0], attention_mask=jnp.asarray(valid), positions=args[1], segment_ids=args[2], parent_ids=args[3]
            )
            return jnp.sum(jnp.where(jnp.asarray(valid)[..., None], out, 0) * weights) / t, out

        (_, out), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
        return out, grads

    got, got_grads = logits_and_grads("blockwise")
    want, want_grads = logits_and_grads("xla")
    assert_close(got, want, "logits")
    want_leaves = jax.tree.leaves(want_grads)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), want_leaves, strict=True):
        assert_close(g, w, f"gradient {jax.tree_util.keystr(path)}")
