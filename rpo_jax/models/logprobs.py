"""Sequence log-probabilities Σ_t mask[t]·log p(tokens[t] | tokens[<t]), optionally chunked over the vocabulary.

The chunked path scans over vocabulary chunks of the unembedding matrix with a running (max, sum-exp) pair, so
only [N,T,C] logits exist at a time; the scan body is rematerialised (`jax.checkpoint`), so the backward pass
also keeps only O(N·T·C) per chunk instead of the [N,T,V] float32 log-probs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rpo_jax.models import layers as L


def token_logps_from_hidden(
    hidden: jax.Array,
    unembedding: jax.Array,
    targets: jax.Array,
    *,
    final_logit_softcap: float | None = None,
    vocab_chunk_size: int | None = None,
) -> jax.Array:
    """log softmax(softcap(hidden · W))[target] in float32.

    hidden [N,T,D], unembedding W [D,V], targets [N,T] int → [N,T] float32.
    logp = z_target - logsumexp_v z_v with z = softcap(hidden·W) (computed with float32 accumulation).
    With `vocab_chunk_size` = C the logsumexp is accumulated over ⌈V/C⌉ chunks (W zero-padded, padded logits
    excluded), never forming [N,T,V].
    """
    d, v = unembedding.shape
    hidden = hidden.astype(unembedding.dtype)
    w_target = jnp.take(unembedding, targets, axis=1)  # [D,N,T]
    z_target = jnp.einsum("ntd,dnt->nt", hidden, w_target, preferred_element_type=jnp.float32)
    z_target = L.softcap(z_target, final_logit_softcap)
    if vocab_chunk_size is None or vocab_chunk_size >= v:
        z = jnp.einsum("ntd,dv->ntv", hidden, unembedding, preferred_element_type=jnp.float32)
        z = L.softcap(z, final_logit_softcap)
        return z_target - jax.nn.logsumexp(z, axis=-1)

    c = int(vocab_chunk_size)
    num_chunks = -(-v // c)
    pad = num_chunks * c - v
    w = jnp.pad(unembedding, ((0, 0), (0, pad))) if pad else unembedding
    w_chunks = w.reshape(d, num_chunks, c).transpose(1, 0, 2)  # [nc, D, C]
    valid = (jnp.arange(num_chunks * c) < v).reshape(num_chunks, c)

    def body(carry, xs):
        running_max, running_sum = carry
        w_c, valid_c = xs
        z = jnp.einsum("ntd,dc->ntc", hidden, w_c, preferred_element_type=jnp.float32)
        z = L.softcap(z, final_logit_softcap)
        z = jnp.where(valid_c, z, -jnp.inf)
        new_max = jnp.maximum(running_max, jnp.max(z, axis=-1))
        new_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(jnp.exp(z - new_max[..., None]), axis=-1)
        return (new_max, new_sum), None

    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    n, t = targets.shape
    init = (jnp.full((n, t), -jnp.inf, jnp.float32), jnp.zeros((n, t), jnp.float32))
    # The first chunk always holds a valid logit, so running_max is finite after it (no inf - inf).
    (m, s), _ = jax.lax.scan(body, init, (w_chunks, valid))
    return z_target - (m + jnp.log(s))


def sequence_logps(
    model,
    tokens: jax.Array,
    loss_mask: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    vocab_chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(logp_sum [N] float32, count [N] int32) with logp_sum = Σ_{t≥1} loss_mask[t] · log p(tokens[t] | tokens[<t]).

    Token t is scored with the logits at position t-1 (loss_mask[:, 0] is ignored). tokens/loss_mask [N,T].
    `vocab_chunk_size` = C computes the log-softmax normaliser chunk by chunk (see `token_logps_from_hidden`).
    """
    hidden = model.hidden_states(tokens, attention_mask, positions, segment_ids)
    logps = token_logps_from_hidden(
        hidden[:, :-1],
        model.unembedding(),
        tokens[:, 1:],
        final_logit_softcap=model.config.final_logit_softcap,
        vocab_chunk_size=vocab_chunk_size,
    )
    mask = loss_mask[:, 1:].astype(bool)
    logp_sum = jnp.sum(jnp.where(mask, logps, 0.0), axis=-1)
    return logp_sum.astype(jnp.float32), jnp.sum(mask, axis=-1).astype(jnp.int32)


def token_logps(
    model,
    tokens: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    vocab_chunk_size: int | None = None,
) -> jax.Array:
    """Per-token log p(tokens[t] | tokens[<t]) [N,T] float32, with 0 at t = 0."""
    hidden = model.hidden_states(tokens, attention_mask, positions, segment_ids)
    logps = token_logps_from_hidden(
        hidden[:, :-1],
        model.unembedding(),
        tokens[:, 1:],
        final_logit_softcap=model.config.final_logit_softcap,
        vocab_chunk_size=vocab_chunk_size,
    )
    return jnp.pad(logps, ((0, 0), (1, 0)))
