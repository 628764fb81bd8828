"""Autoregressive sampling with a KV cache: `generate(model, tokens, attention_mask, *, max_new_tokens, ...)`.

Prompts are left-padded [N,T]. One prefill writes the prompt's keys/values into a cache of S = T + max_new_tokens
slots per layer ([L,N,S,K,hd]); then a `lax.scan` decodes one token per step. Attention sees cache slot j from
step slot i when j ≤ i, slot j holds a real token, and (sliding layers) i - j < window — exactly the masks of the
full forward pass, so decoding equals re-running the model on the growing sequence. Positions continue the
prompt's `cumsum(mask) - 1`. The whole function is jit-compiled (static: lengths and sampling settings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rpo_jax.models import layers as L
from rpo_jax.models.config import SLIDING_ATTENTION


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GenerateOutput:
    """Result of `generate` (N prompts, M = max_new_tokens).

    tokens [N,M] int32: sampled tokens, `pad_token_id` after the first EOS.
    mask [N,M] bool: True on generated tokens up to and including the first EOS.
    logps [N,M] float32: log p(token) under the model's unmodified distribution (temperature 1, no top-k/top-p),
      0 where mask is False — the policy log-probs of the samples.
    lengths [N] int32: mask.sum(-1).
    """

    tokens: jax.Array
    mask: jax.Array
    logps: jax.Array
    lengths: jax.Array


def filter_logits(logits: jax.Array, *, top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Sets logits outside the top-k / nucleus (top-p) set to -inf. logits [..., V] float32.

    top_k: keep the k largest (ties with the k-th kept). top_p: keep the smallest prefix of tokens sorted by
    probability whose mass reaches top_p, i.e. token i is kept iff the mass strictly before it is < top_p
    (the most likely token is always kept). Applied in that order, as transformers does.
    """
    if top_k is not None:
        k = min(int(top_k), logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _sample(logits, key, temperature, top_k, top_p):
    """Next tokens [N] from logits [N,V] float32: argmax when temperature == 0."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def _generate(model, tokens, attention_mask, key, *, max_new_tokens, temperature, top_k, top_p, eos_ids, pad_id):
    config = model.config
    n, t = tokens.shape
    s = t + max_new_tokens
    attention_mask = attention_mask.astype(bool)
    cache_valid = jnp.concatenate([attention_mask, jnp.zeros((n, max_new_tokens), bool)], axis=1)
    shape = (config.num_layers, n, s, config.num_kv_heads, config.head_dim)
    caches = (jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))
    kv_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (n, s))
    sliding = SLIDING_ATTENTION in config.layer_types

    def masks(q_index, valid):
        mask = L.attention_mask_bool(q_index, kv_index, valid, None, None)
        window = mask & L.sliding_window_mask(q_index, kv_index, config.sliding_window) if sliding else None
        return mask, window

    # prefill
    positions = L.default_positions(attention_mask, None, (n, t))
    q_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
    mask, window = masks(q_index, cache_valid)
    hidden, caches = model.run_layers(model.embed_tokens(tokens), positions, mask, window, caches, jnp.int32(0))
    logits = model.unembed(hidden[:, -1])
    next_position = jnp.sum(attention_mask, axis=1).astype(jnp.int32)  # [N]

    def step(carry, step_key):
        caches, cache_valid, logits, position, done, i = carry
        token = _sample(logits, step_key, temperature, top_k, top_p)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
        live = ~done
        is_eos = jnp.isin(token, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else jnp.zeros_like(live)
        out = (jnp.where(live, token, pad_id), live, jnp.where(live, logp, 0.0))
        done = done | is_eos
        # feed the token at cache slot t + i
        slot = t + i
        cache_valid = jax.lax.dynamic_update_slice_in_dim(cache_valid, jnp.ones((n, 1), bool), slot, axis=1)
        q_index = jnp.full((n, 1), slot, jnp.int32)
        mask, window = masks(q_index, cache_valid)
        hidden, caches = model.run_layers(
            model.embed_tokens(token[:, None]), position[:, None], mask, window, caches, slot
        )
        logits = model.unembed(hidden[:, 0])
        return (caches, cache_valid, logits, position + 1, done, i + 1), out

    keys = jax.random.split(key, max_new_tokens)
    init = (caches, cache_valid, logits, next_position, jnp.zeros((n,), bool), jnp.int32(0))
    _, (new_tokens, live, logps) = jax.lax.scan(step, init, keys)
    new_tokens, live, logps = new_tokens.T, live.T, logps.T
    return GenerateOutput(
        tokens=new_tokens.astype(jnp.int32),
        mask=live,
        logps=logps.astype(jnp.float32),
        lengths=jnp.sum(live, axis=1).astype(jnp.int32),
    )


_generate_jit = nnx.jit(
    _generate, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p", "eos_ids", "pad_id")
)


def generate(
    model,
    tokens: jax.Array,
    attention_mask: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    rng: jax.Array | None = None,
    pad_token_id: int | None = None,
) -> GenerateOutput:
    """Samples `max_new_tokens` continuations of left-padded prompts with a KV cache.

    tokens [N,T] int32 left-padded, attention_mask [N,T] (True on real tokens). temperature = 0 is greedy
    (argmax); otherwise logits / temperature, then top-k, then top-p filtering, then a categorical draw with
    `rng` (required). Sequences stop at `eos_token_id` (an id or a list of ids; the EOS itself is kept and
    marked in `mask`); later slots hold `pad_token_id` (default: the config's pad id, else 0).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be ≥ 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    tokens = jnp.asarray(tokens, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, bool)
    if tokens.ndim != 2 or attention_mask.shape != tokens.shape:
        raise ValueError(f"tokens {tokens.shape} and attention_mask {attention_mask.shape} must both be [N, T]")
    eos_ids = () if eos_token_id is None else tuple(
        int(i) for i in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
    )
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    key = jax.random.key(0) if rng is None else rng  # unused when greedy
    return _generate_jit(
        model, tokens, attention_mask, key,
        max_new_tokens=int(max_new_tokens), temperature=float(temperature),
        top_k=None if top_k is None else int(top_k), top_p=None if top_p is None else float(top_p),
        eos_ids=eos_ids, pad_id=int(pad_token_id),
    )
