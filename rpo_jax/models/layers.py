"""Shared decoder building blocks as pure functions: RMSNorm, RoPE, masks, attention, gated MLPs.

Shapes: N batch, T query length, S key length, D hidden, H query heads, K key/value heads (H = K·G),
hd head dim, F MLP width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rpo_jax.models.config import RopeSpec
from rpo_jax.models.sharding import constrain, sequence_is_split

# Large finite negative used for masked attention logits (finite so fully masked rows give no NaN).
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, *, plus_one: bool) -> jax.Array:
    """RMSNorm over the last axis, computed in float32.

    y = x / sqrt(mean(x²) + eps), then
      Llama (plus_one=False): w · y.astype(dtype)        (transformers LlamaRMSNorm)
      Gemma (plus_one=True):  (y · (1 + w)).astype(dtype) (transformers GemmaRMSNorm, all in float32)
    """
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    if plus_one:
        return (y * (1.0 + weight.astype(jnp.float32))).astype(dtype)
    return weight.astype(dtype) * y.astype(dtype)


def rope_inv_freq(spec: RopeSpec, head_dim: int) -> np.ndarray:
    """Inverse frequencies [hd/2] float32, as transformers' `modeling_rope_utils` computes them.

    default: inv_freq_i = 1 / theta^(2i/hd)
    linear:  inv_freq_i / factor
    llama3:  wavelen = 2π/inv_freq; wavelen > L/low → /factor; wavelen < L/high → unchanged; in between
             (1 - s)·inv/factor + s·inv with s = (L/wavelen - low) / (high - low), L = original max positions.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(spec.theta) ** exponents)).astype(np.float32)
    if spec.rope_type == "linear":
        inv_freq = (inv_freq / np.float32(spec.factor)).astype(np.float32)
    elif spec.rope_type == "llama3":
        factor, low, high = np.float32(spec.factor), spec.low_freq_factor, spec.high_freq_factor
        old_len = spec.original_max_position_embeddings
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
        smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif spec.rope_type != "default":
        raise ValueError(f"unsupported rope_type {spec.rope_type!r}")
    return inv_freq


def rope_tables(positions: jax.Array, inv_freq: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., T, hd] (split-half layout: the hd/2 frequencies repeated twice), cast to `dtype`.

    angle[t, i] = positions[t] · inv_freq[i mod hd/2], computed in float32.
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [N,T,heads,hd] rotated: x·cos + rotate_half(x)·sin, rotate_half([a, b]) = [-b, a]; cos/sin [N,T,hd]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def default_positions(attention_mask: jax.Array | None, segment_ids: jax.Array | None, shape) -> jax.Array:
    """Positions [N,T] int32: count of real tokens before t within t's segment.

    positions = cumsum(mask) - 1 - (real tokens before the start of t's segment), clipped at 0 for pads. With no
    mask and no segments this is arange(T); with a left-padded mask the first real token gets position 0.
    """
    n, t = shape
    mask = jnp.ones((n, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    counts = jnp.cumsum(mask, axis=1)
    if segment_ids is None:
        return jnp.maximum(counts - 1, 0).astype(jnp.int32)
    before = counts - mask  # real tokens strictly before t
    starts = jnp.concatenate([jnp.ones((n, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    offset = jax.lax.cummax(jnp.where(starts, before, 0), axis=1)
    return jnp.maximum(counts - 1 - offset, 0).astype(jnp.int32)


def attention_mask_bool(
    q_index: jax.Array,
    kv_index: jax.Array,
    kv_valid: jax.Array | None,
    q_segment: jax.Array | None,
    kv_segment: jax.Array | None,
    q_parent: jax.Array | None = None,
) -> jax.Array:
    """Boolean [N,T,S] mask: causal (kv_index ≤ q_index), key not padding, same segment or the query's parent.

    q_index [N,T] / kv_index [N,S] are token slots (array indices, or cache slots when decoding). With segments,
    key k is visible to query q iff kv_segment[k] == q_segment[q] ∨ kv_segment[k] == q_parent[q] (`q_parent`
    [N,T]: the segment id of the prompt that q's segment continues — shared prompts; its own segment id
    otherwise; None: no parents).
    """
    mask = kv_index[:, None, :] <= q_index[:, :, None]
    if kv_valid is not None:
        mask = mask & kv_valid[:, None, :].astype(bool)
    if q_segment is not None and kv_segment is not None:
        same = q_segment[:, :, None] == kv_segment[:, None, :]
        if q_parent is not None:
            same = same | (q_parent[:, :, None] == kv_segment[:, None, :])
        mask = mask & same
    return mask


def sliding_window_mask(q_position: jax.Array, kv_position: jax.Array, window: int) -> jax.Array:
    """[N,T,S] bool: q_position - kv_position < window (transformers' sliding_window_overlay).

    Given token positions this is the window on positions (equal to the slot distance when every segment's
    positions count its slots, i.e. nothing is shared); given slots (decoding caches) it is the slot window.
    """
    return (q_position[:, :, None] - kv_position[:, None, :]) < window


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float, softcap: float | None
) -> jax.Array:
    """Grouped-query attention. q [N,T,H,hd], k/v [N,S,K,hd], mask [N,T,S] bool → [N,T,H,hd].

    scores = (q·k)·scale, optionally softcap·tanh(scores/softcap), masked, softmax in float32 over S.
    Query head h uses key/value head h // (H/K) (transformers' repeat_kv order).
    """
    n, t, h, hd = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    groups = h // kv_heads
    # [N,K,G·T,hd]: one batched matmul per key/value head with all its query heads stacked along rows
    qb = q.reshape(n, t, kv_heads, groups, hd).transpose(0, 2, 3, 1, 4).reshape(n, kv_heads, groups * t, hd)
    kb, vb = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("nkqd,nksd->nkqs", qb, kb, preferred_element_type=jnp.float32) * scale
    scores = constrain(scores, ("batch", "kv_heads", None, None))  # no-op without a mesh
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = scores.reshape(n, kv_heads, groups, t, s)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(n, kv_heads, groups * t, s)
    out = jnp.einsum("nkqs,nksd->nkqd", probs, vb)
    return out.reshape(n, kv_heads, groups, t, hd).transpose(0, 3, 1, 2, 4).reshape(n, t, h, hd)


@jax.custom_vjp
def swiglu(g: jax.Array, u: jax.Array) -> jax.Array:
    """silu(g) ⊙ u = g·σ(g)·u, with a backward pass that keeps only g and u.

    Plain autodiff keeps σ(g), silu(g) and u besides g (per layer, [N·T, F] each); this VJP recomputes σ(g):
    ∂/∂u = dy·g·σ(g),  ∂/∂g = dy·u·σ(g)·(1 + g·(1 - σ(g))).
    """
    return jax.nn.silu(g) * u


def _swiglu_fwd(g, u):
    return swiglu(g, u), (g, u)


def _swiglu_bwd(res, dy):
    g, u = res
    sig = jax.nn.sigmoid(g)
    return dy * u * (sig * (1 + g * (1 - sig))), dy * (g * sig)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def gated_mlp(
    x: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    activation: str,
    adapters: dict[str, tuple[jax.Array, jax.Array]] | None = None,
) -> jax.Array:
    """down(act(x·gate) ⊙ (x·up)); SwiGLU (silu) for Llama, GeGLU with tanh-approximated gelu for Gemma.

    x [..., D], gate/up [D,F], down [F,D]. The leading axes are flattened so every product (and its two
    gradients) is a plain 2-D matmul, which XLA:CPU runs markedly faster than 3-D einsums. `adapters`: LoRA
    factors (A, B) by projection name ("gate_proj", "up_proj", "down_proj"); each adds `lora_delta` to its product.
    """
    lead, d = x.shape[:-1], x.shape[-1]
    split = sequence_is_split(x)  # a context mesh: keep [N,T] (merged rows would lose the sequence's sharding)
    x2 = x if split else x.reshape(-1, d)
    rows = ("batch", "sequence") if split else ("batch",)
    adapters = adapters or {}

    def matmul(y, w, name):
        return y @ w if name not in adapters else y @ w + lora_delta(y, *adapters[name])

    g = constrain(matmul(x2, gate, "gate_proj"), (*rows, "mlp"))  # activation shardings: no-ops without a mesh
    u = constrain(matmul(x2, up, "up_proj"), (*rows, "mlp"))
    if activation == "silu":
        h = swiglu(g, u)  # fewer saved activations for the backward pass (see `swiglu`)
    elif activation == "gelu_tanh":
        h = jax.nn.gelu(g, approximate=True) * u
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return constrain(matmul(h, down, "down_proj"), (*rows, None)).reshape(*lead, down.shape[-1])


def lora_delta(
    x: jax.Array, a: jax.Array, b: jax.Array, dropout: tuple[jax.Array, jax.Array] | None = None
) -> jax.Array:
    """The low-rank path of a LoRA-adapted projection: (x·A)·B, as two 2-D matmuls.

    x [..., *in], a [*in, r], b [r, *out] → [..., *out] (the caller folds the scale alpha/rank into b).
    `dropout` = (raw key data, keep probability q): inverted dropout on the adapter's input only,
    x ← x ⊙ m / q with m ~ Bernoulli(q) drawn from that key (`rpo_jax.models.lora.lora_dropout`).
    """
    if dropout is not None:
        key_data, keep = dropout
        mask = jax.random.bernoulli(jax.random.wrap_key_data(key_data), keep, x.shape)
        x = jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))
    n_in = a.ndim - 1
    lead = x.shape[: x.ndim - n_in]
    rank, out = a.shape[-1], b.shape[1:]
    rows = lead if sequence_is_split(x) else (-1,)  # a context mesh: leading axes kept (see `gated_mlp`)
    low = x.reshape(*rows, a.size // rank) @ a.reshape(-1, rank)
    return (low @ b.reshape(rank, -1)).reshape(*lead, *out)


def project_in(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [N,T,D] · w [D,heads,hd] → [N,T,heads,hd], as one 2-D matmul."""
    n, t, d = x.shape
    _, heads, hd = w.shape
    if sequence_is_split(x):  # a context mesh: no [N·T] rows (see `gated_mlp`)
        return jnp.einsum("ntd,dhk->nthk", x, w)
    return (x.reshape(n * t, d) @ w.reshape(d, heads * hd)).reshape(n, t, heads, hd)


def project_out(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [N,T,heads,hd] · w [heads,hd,D] → [N,T,D], as one 2-D matmul."""
    n, t, heads, hd = x.shape
    d = w.shape[-1]
    if sequence_is_split(x):  # a context mesh: no [N·T] rows (see `gated_mlp`)
        return jnp.einsum("nthk,hkd->ntd", x, w)
    return (x.reshape(n * t, heads * hd) @ w.reshape(heads * hd, d)).reshape(n, t, d)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap · tanh(x / cap) (identity when cap is None)."""
    return x if cap is None else cap * jnp.tanh(x / cap)
