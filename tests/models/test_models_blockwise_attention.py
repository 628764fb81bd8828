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

T = 48
SCALE = 0.3
TOL = 1e-5  # max |blockwise - dense| ≤ TOL · max(1, max |dense|)


def _spec(kind: str, t: int = T) -> attention.MaskSpec:
    """Two rows per mask kind; "left_pad" has fully masked queries (the padding before the first real token) and
    a row that is all padding; "parents" shares a prompt between two responses (positions continue the prompt)."""
    slots = np.arange(t)[None, :]
    valid = seg = parent = pos = None
    if kind == "right_pad":
        valid = slots < np.array([[30], [t]])
    elif kind == "left_pad":
        valid = slots >= np.array([[11], [t]])
    elif kind == "segments":  # three / two packed sequences, then padding
        valid = slots < np.array([[44], [37]])
        seg = (slots >= np.array([[9], [20]])).astype(np.int32) + (slots >= np.array([[25], [t]]))
    elif kind == "parents":  # prompt 10, response A 14, response B 12 (both continue the prompt), padding
        seg = np.array([[0] * 10 + [1] * 14 + [2] * 12 + [3] * 12, [0] * 15 + [1] * 25 + [2] * 8])
        parent = np.array([[0] * 10 + [0] * 14 + [0] * 12 + [3] * 12, [0] * 15 + [0] * 25 + [2] * 8])
        pos = np.array([list(range(24)) + list(range(10, 22)) + [0] * 12, list(range(40)) + [0] * 8])
        valid = np.array([[True] * 36 + [False] * 12, [True] * 40 + [False] * 8])
    elif kind != "causal":
        raise ValueError(kind)
    as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)  # noqa: E731
    valid = None if valid is None else jnp.asarray(valid)
    positions = layers.default_positions(valid, as_int(seg), (2, t)) if pos is None else as_int(pos)
    return attention.MaskSpec(positions, valid, as_int(seg), as_int(parent))


def _qkv(seed, heads, kv_heads, hd=8, t=T):
    rng = np.random.default_rng(seed)
    draw = lambda h: jnp.asarray(rng.normal(size=(2, t, h, hd)), jnp.float32)  # noqa: E731
    return draw(heads), draw(kv_heads), draw(kv_heads), draw(heads)


def _values_and_grads(fn, q, k, v, probe):
    """(fn(q, k, v), ∂/∂(q, k, v) of Σ fn(q, k, v) ⊙ probe), jitted."""

    def run(q, k, v, probe):
        out, pull = jax.vjp(fn, q, k, v)
        return out, pull(probe)

    return jax.jit(run)(q, k, v, probe)


def _assert_close(got, want, what):
    err = float(jnp.max(jnp.abs(got - want)))
    bound = TOL * max(1.0, float(jnp.max(jnp.abs(want))))
    assert err <= bound and not bool(jnp.isnan(got).any()), f"{what}: max |blockwise - xla| = {err:.3g} > {bound:.3g}"


CASES = [  # (name, mask kind, H, K, window, soft-cap, block): every mask piece, GQA and MQA, blocks ∤ T
    ("plain causal, H=K=4, block 16 | 48", "causal", 4, 4, None, None, 16),
    ("padding + soft-cap 2, GQA K=2, block 20 ∤ 48", "right_pad", 4, 2, None, 2.0, 20),
    ("fully masked rows + window 9 + soft-cap 3, MQA K=1", "left_pad", 4, 1, 9, 3.0, 16),
    ("packed segments + sliding window 7, block 13", "segments", 4, 2, 7, None, 13),
    ("shared-prompt parents, K=2", "parents", 4, 2, None, None, 16),
    ("parents + window 5 on positions, K=1, block 64 > T", "parents", 4, 1, 5, None, 64),
]


def test_blockwise_equals_xla_on_every_mask_in_values_and_gradients():
    for seed, (name, kind, heads, kv_heads, window, softcap, block) in enumerate(CASES):
        spec = _spec(kind)
        q, k, v, probe = _qkv(seed, heads, kv_heads)
        dense = lambda q, k, v: layers.dot_product_attention(  # noqa: E731
            q, k, v, attention.dense_mask(spec, window), scale=SCALE, softcap=softcap
        )
        blockwise = lambda q, k, v: attention.blockwise_attention(  # noqa: E731
            q, k, v, spec, window=window, scale=SCALE, softcap=softcap, block_size=block
        )
        want, want_grads = _values_and_grads(dense, q, k, v, probe)
        got, got_grads = _values_and_grads(blockwise, q, k, v, probe)
        _assert_close(got, want, f"{name}: values")
        for arg, g, w in zip("qkv", got_grads, want_grads):
            _assert_close(g, w, f"{name}: ∂/∂{arg}")


def test_block_step_in_any_key_order_gives_the_same_state():
    """Masked keys add nothing and each step rescales what came before: key blocks taken in reverse order (as a
    ring's shards may arrive) give the same output as in order, and as the dense path."""
    spec = _spec("segments")
    q, k, v, _ = _qkv(7, 4, 2)
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
    _assert_close(jnp.where(real, forward, 0), jnp.where(real, dense, 0), "key blocks in order")
    _assert_close(jnp.where(real, backward, 0), jnp.where(real, dense, 0), "key blocks in reverse")


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
    _assert_close(got, want, "logits")
    want_leaves = jax.tree.leaves(want_grads)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), want_leaves, strict=True):
        _assert_close(g, w, f"gradient {jax.tree_util.keystr(path)}")
