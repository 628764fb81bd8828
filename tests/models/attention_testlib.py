"""Shared by the blockwise and ring attention tests: mask descriptions of every kind, random q/k/v, values and
gradients of an attention function, and the float32 closeness check against the dense path."""

import jax
import jax.numpy as jnp
import numpy as np

from rpo_jax.models import attention, layers

T = 48
SCALE = 0.3
TOL = 1e-5  # max |got - dense| ≤ TOL · max(1, max |dense|)


def make_spec(kind: str, t: int = T) -> attention.MaskSpec:
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


def random_qkv(seed, heads, kv_heads, hd=8, t=T):
    rng = np.random.default_rng(seed)
    draw = lambda h: jnp.asarray(rng.normal(size=(2, t, h, hd)), jnp.float32)  # noqa: E731
    return draw(heads), draw(kv_heads), draw(kv_heads), draw(heads)


def values_and_grads(fn, q, k, v, probe):
    """(fn(q, k, v), ∂/∂(q, k, v) of Σ fn(q, k, v) ⊙ probe), jitted."""

    def run(q, k, v, probe):
        out, pull = jax.vjp(fn, q, k, v)
        return out, pull(probe)

    return jax.jit(run)(q, k, v, probe)


def assert_close(got, want, what):
    err = float(jnp.max(jnp.abs(got - want)))
    bound = TOL * max(1.0, float(jnp.max(jnp.abs(want))))
    assert err <= bound and not bool(jnp.isnan(got).any()), f"{what}: max |got - dense| = {err:.3g} > {bound:.3g}"


CASES = [  # (name, mask kind, H, K, window, soft-cap, block): every mask piece, GQA and MQA, blocks ∤ T
    ("plain causal, H=K=4, block 16 | 48", "causal", 4, 4, None, None, 16),
    ("padding + soft-cap 2, GQA K=2, block 20 ∤ 48", "right_pad", 4, 2, None, 2.0, 20),
    ("fully masked rows + window 9 + soft-cap 3, MQA K=1", "left_pad", 4, 1, 9, 3.0, 16),
    ("packed segments + sliding window 7, block 13", "segments", 4, 2, 7, None, 13),
    ("shared-prompt parents, K=2", "parents", 4, 2, None, None, 16),
    ("parents + window 5 on positions, K=1, block 64 > T", "parents", 4, 1, 5, None, 64),
]
