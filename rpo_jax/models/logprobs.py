"""Sequence log-probabilities Σ_t mask[t]·log p(tokens[t] | tokens[<t]), optionally chunked over the vocabulary.

With `score_window` = W only W logit positions per row are unembedded: the window starting just before the
row's first scored token (the data layer right-pads prompt + response, so a row's scored tokens are contiguous
and at most max-response-length apart). The output head and its log-softmax over V are then computed for
[N,W] positions instead of [N,T-1] (prompt positions are never scored), with results equal to the full path.

The chunked path scans over vocabulary chunks (row slices) of the unembedding matrix with a running (max, sum-exp)
pair, so only [N,T,C] logits exist at a time; the scan body is rematerialised (`jax.checkpoint`), so the backward pass
also keeps only O(N·T·C) per chunk instead of the [N,T,V] float32 log-probs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rpo_jax.models import layers, ring_attention
from rpo_jax.models.sharding import batch_shard_count, constrain

#: `vocab_chunk_size=None` chunks the vocabulary when one head's float32 logits [N,T,V] would take more than this
#: many bytes: unchunked, the log-softmax and its gradient keep about two such arrays (SmolLM2-135M's packed step of
#: 4,096 slots: 1.5 of its 3.0 GiB of temporaries with remat="full"), chunked only [N,T,C] ones.
AUTO_CHUNK_LOGITS_BYTES = 256 * 2**20
AUTO_VOCAB_CHUNK = 8192  # the chunk (rows of the unembedding) of the automatic chunking


def auto_vocab_chunk(positions: int, vocab: int) -> int | None:
    """The vocabulary chunk that `vocab_chunk_size=None` means for `positions` (N·T) logit rows over `vocab`:
    `AUTO_VOCAB_CHUNK` when their float32 logits pass `AUTO_CHUNK_LOGITS_BYTES` and the vocabulary is larger than
    a chunk, else None (one log-softmax over V, as every head below the limit computes it)."""
    if positions * vocab * 4 > AUTO_CHUNK_LOGITS_BYTES and vocab > AUTO_VOCAB_CHUNK:
        return AUTO_VOCAB_CHUNK
    return None


def token_logps_from_hidden(
    hidden: jax.Array,
    unembedding: jax.Array,
    targets: jax.Array,
    *,
    final_logit_softcap: float | None = None,
    vocab_chunk_size: int | None = None,
) -> jax.Array:
    """`log softmax(softcap(hidden · Wᵀ))[target]` in float32 (float64 for float64 inputs).

    `logp = z_target − logsumexp_v z_v` with `z = softcap(hidden · Wᵀ)`, accumulated in float32. With
    `vocab_chunk_size` = C the logsumexp is accumulated over ⌊V/C⌋ row slices of W (`lax.scan` with a running max
    and sum of exponentials; the body is rematerialised in the backward pass) plus one remainder slice, so at most
    `[N, T, C]` logits exist at a time and W is never copied or padded.

    Args:
        hidden: `[N, T, D]` final-normed hidden states.
        unembedding: `[V, D]` rows W of the output head.
        targets: `[N, T]` int token ids to score.
        final_logit_softcap: Gemma 2's soft-cap of the logits (`None`: none).
        vocab_chunk_size: C > 0 for the chunked log-softmax; 0 (or C ≥ V): one log-softmax over V; `None`:
            `auto_vocab_chunk` (chunked only where the logits would pass `AUTO_CHUNK_LOGITS_BYTES`).

    Returns:
        `[N, T]` log-probabilities of `targets`.
    """
    v, d = unembedding.shape
    if vocab_chunk_size is None:
        vocab_chunk_size = auto_vocab_chunk(targets.size, v)
    hidden = hidden.astype(unembedding.dtype)
    acc = jnp.promote_types(unembedding.dtype, jnp.float32)  # float32 (float64 when given float64)

    def logits(w_rows):
        z = jnp.einsum("ntd,cd->ntc", hidden, w_rows, preferred_element_type=acc)
        return layers.softcap(z, final_logit_softcap)

    w_target = jnp.take(unembedding, targets, axis=0)  # [N,T,D]
    z_target = layers.softcap(
        jnp.einsum("ntd,ntd->nt", hidden, w_target, preferred_element_type=acc), final_logit_softcap
    )
    if not vocab_chunk_size or vocab_chunk_size >= v:
        return z_target - jax.nn.logsumexp(logits(unembedding), axis=-1)

    c = int(vocab_chunk_size)
    num_full, rem = divmod(v, c)

    def combine(carry, z):
        running_max, running_sum = carry
        new_max = jnp.maximum(running_max, jnp.max(z, axis=-1))
        new_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(jnp.exp(z - new_max[..., None]), axis=-1)
        return new_max, new_sum

    def body(carry, i):
        w_rows = jax.lax.dynamic_slice_in_dim(unembedding, i * c, c, axis=0)
        return combine(carry, logits(w_rows)), None

    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    n, t = targets.shape
    init = (jnp.full((n, t), -jnp.inf, acc), jnp.zeros((n, t), acc))
    # After the first chunk running_max is finite, so exp(running_max - new_max) never sees inf - inf.
    carry, _ = jax.lax.scan(body, init, jnp.arange(num_full))
    if rem:
        carry = jax.checkpoint(lambda cr: combine(cr, logits(unembedding[num_full * c :])))(carry)
    m, s = carry
    return z_target - (m + jnp.log(s))


def score_window_start(loss_mask: jax.Array, width: int) -> jax.Array:
    """First logit position [N] int32 of each row's scored window of `width` logit positions.

    loss_mask [N,T] (loss_mask[:, 0] ignored); logit position p scores token p+1, so the window covers tokens
    start+1 .. start+width. start = (first scored token) - 1, moved left where needed so that the window ends by
    logit position T-2 (start ≤ T-1-width); rows with nothing scored start at 0. Needs 1 ≤ width ≤ T-1.
    """
    t = loss_mask.shape[1]
    if not 1 <= width <= t - 1:
        raise ValueError(f"score_window={width} must be in [1, T-1={t - 1}]")
    scored = loss_mask.astype(bool)[:, 1:]  # scored[:, p] ⇔ token p+1 is scored by logit position p
    first = jnp.where(jnp.any(scored, axis=-1), jnp.argmax(scored, axis=-1), 0)
    return jnp.minimum(first, t - 1 - width).astype(jnp.int32)


def windowed_token_logps(
    hidden: jax.Array,
    unembedding: jax.Array,
    tokens: jax.Array,
    loss_mask: jax.Array,
    width: int,
    *,
    final_logit_softcap: float | None = None,
    vocab_chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Log-probs of the tokens in each row's scored window: (logps [N,W], mask [N,W] bool).

    hidden [N,T,D] (final-normed), unembedding rows [V,D], tokens/loss_mask [N,T], W = `width`. With s =
    `score_window_start(loss_mask, W)`, entry j is log p(tokens[s+j+1] | tokens[≤s+j]) computed from
    hidden[s+j], and mask[j] = loss_mask[s+j+1]. The output head runs on [N,W,D] instead of [N,T-1,D].
    """
    start = score_window_start(loss_mask, width)
    logit_pos = start[:, None] + jnp.arange(width, dtype=jnp.int32)  # [N,W]
    hidden_w = jnp.take_along_axis(hidden, logit_pos[:, :, None], axis=1)
    targets_w = jnp.take_along_axis(tokens, logit_pos + 1, axis=1)
    mask_w = jnp.take_along_axis(loss_mask.astype(bool), logit_pos + 1, axis=1)
    logps = token_logps_from_hidden(
        hidden_w, unembedding, targets_w, final_logit_softcap=final_logit_softcap, vocab_chunk_size=vocab_chunk_size
    )
    return logps, mask_w


def sequence_logps(
    model,
    tokens: jax.Array,
    loss_mask: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    parent_ids: jax.Array | None = None,
    vocab_chunk_size: int | None = None,
    score_window: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sequence log-probabilities: `Σ_{t≥1} loss_mask[t] · log p(tokens[t] | tokens[<t])` per row.

    Token t is scored with the logits at position t − 1 (`loss_mask[:, 0]` is ignored).

    Args:
        model: a `Decoder`.
        tokens: `[N, T]` int32 token ids.
        loss_mask: `[N, T]` bool, the tokens to score (a response's tokens).
        attention_mask: `[N, T]` bool, real tokens (`None`: all); padding is masked as keys.
        positions: `[N, T]` int32 positions (`None`: `cumsum(attention_mask) − 1` within each segment).
        segment_ids: `[N, T]` int32 packed-sequence ids (`None`: one sequence per row).
        parent_ids: `[N, T]` int32 shared-prompt parents (see `Decoder.hidden_states`).
        vocab_chunk_size: C > 0 computes the log-softmax normaliser chunk by chunk (see
            `token_logps_from_hidden`).
        score_window: W (static, 1 ≤ W < T − 1; `None` or ≥ T − 1: every position) unembeds only W positions per
            row, from just before the row's first scored token (`windowed_token_logps`); same values as the full
            path when every row's scored tokens lie within W consecutive positions. A row with a scored token
            outside its window gets `logp_sum = NaN` (loudly wrong, never silently truncated).

    Returns:
        `(logp_sum, count)`: `[N]` float32 sums and `[N]` int32 numbers of scored tokens.
    """
    mask = loss_mask.astype(bool).at[:, 0].set(False)
    count = jnp.sum(mask, axis=-1).astype(jnp.int32)
    t = tokens.shape[1]
    # on a context mesh the head runs on every position, one shard per device (`context_token_logps`)
    if score_window is None or score_window >= t - 1 or ring_attention.context_mesh(tokens) is not None:
        logps = token_logps(
            model,
            tokens,
            attention_mask=attention_mask,
            positions=positions,
            segment_ids=segment_ids,
            parent_ids=parent_ids,
            vocab_chunk_size=vocab_chunk_size,
        )
        return jnp.sum(jnp.where(mask, logps, 0.0), axis=-1).astype(jnp.float32), count
    hidden = model.hidden_states(tokens, attention_mask, positions, segment_ids, parent_ids)
    logps, mask_w = windowed_token_logps(
        hidden,
        model.unembedding(),
        tokens,
        mask,
        int(score_window),
        final_logit_softcap=model.config.final_logit_softcap,
        vocab_chunk_size=vocab_chunk_size,
    )
    logp_sum = jnp.sum(jnp.where(mask_w, logps, 0.0), axis=-1).astype(jnp.float32)
    covered = jnp.sum(mask_w, axis=-1) == count
    return jnp.where(covered, logp_sum, jnp.nan), count


def token_logps(
    model,
    tokens: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    parent_ids: jax.Array | None = None,
    vocab_chunk_size: int | None = None,
) -> jax.Array:
    """Per-token `log p(tokens[t] | tokens[<t])`, with 0 at t = 0.

    Args:
        model: a `Decoder`.
        tokens: `[N, T]` int32 token ids.
        attention_mask: `[N, T]` bool, real tokens (`None`: all).
        positions: `[N, T]` int32 positions (`None`: from the attention mask and segments).
        segment_ids: `[N, T]` int32 packed-sequence ids.
        parent_ids: `[N, T]` int32 shared-prompt parents (see `Decoder.hidden_states`).
        vocab_chunk_size: C > 0 for the chunked log-softmax (see `token_logps_from_hidden`).

    Returns:
        `[N, T]` float32 log-probabilities.
    """
    if ring_attention.context_mesh(tokens) is not None:
        n, t = tokens.shape
        source = jnp.broadcast_to(jnp.maximum(jnp.arange(t, dtype=jnp.int32) - 1, 0), (n, t))
        logps = context_token_logps(
            model, tokens, source, (attention_mask, positions, segment_ids, parent_ids), vocab_chunk_size
        )
        return logps.at[:, 0].set(0.0)
    hidden = model.hidden_states(tokens, attention_mask, positions, segment_ids, parent_ids)
    logps = token_logps_from_hidden(
        hidden[:, :-1],
        model.unembedding(),
        tokens[:, 1:],
        final_logit_softcap=model.config.final_logit_softcap,
        vocab_chunk_size=vocab_chunk_size,
    )
    return jnp.pad(logps, ((0, 0), (1, 0)))


def packed_token_logps(
    model,
    tokens: jax.Array,
    source: jax.Array,
    *,
    attention_mask: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    parent_ids: jax.Array | None = None,
    vocab_chunk_size: int | None = None,
) -> jax.Array:
    """Per-slot log-probs of packed rows (`rpo_jax.data.packing`): [N,T] float32.

    Entry (n, t) is log softmax(unembed(hidden[n, source[n, t]]))[tokens[n, t]]: the token at slot t predicted
    from the slot holding the previous token of its own sequence (`source`: t-1, or a shared prompt's last slot
    for a response's first token). Slots that score nothing carry any value; `segment_logp_sums` drops them.
    The output head runs on every slot of the rows; `scored_token_logps` runs it on the scored slots only (the
    trainer's packed steps, except on a context mesh, where this function splits the rows over the devices).
    """
    if ring_attention.context_mesh(tokens) is not None:
        mask = (attention_mask, positions, segment_ids, parent_ids)
        return context_token_logps(model, tokens, source, mask, vocab_chunk_size)
    hidden = model.hidden_states(tokens, attention_mask, positions, segment_ids, parent_ids)
    hidden = jnp.take_along_axis(hidden, source[:, :, None].astype(jnp.int32), axis=1)
    return token_logps_from_hidden(
        hidden,
        model.unembedding(),
        tokens,
        final_logit_softcap=model.config.final_logit_softcap,
        vocab_chunk_size=vocab_chunk_size,
    )


#: `scored_token_logps` pays when the output head is at least this share of a slot's decoder FLOPs (V·D / P',
#: `head_share`): SmolLM2-135M 0.27, Llama 3 8B 0.08; below it (the quickstart's tiny model: 0.008) its sort,
#: gathers and loop cost more than the head they skip, and `packed_token_logps` runs the head on every slot
SCORED_HEAD_MIN_SHARE = 0.05


def head_share(config) -> float:
    """V·D / P': the output head's FLOPs at one position over a slot's decoder FLOPs at no keys (P' the parameters
    of every matmul but the head; the same with in-step references, which add a forward of both); the packing
    cost `rpo_jax.data.packing.Packing.head_cost`."""
    return config.vocab_size * config.hidden_size / config.num_params(include_embeddings=False)


def unembeds_scored_slots(config) -> bool:
    """Whether the packed steps run the output head on the scored slots only (`scored_token_logps`): when
    `head_share(config)` ≥ `SCORED_HEAD_MIN_SHARE`."""
    return head_share(config) >= SCORED_HEAD_MIN_SHARE


#: positions of the output head per step of `scored_token_logps`' loop: the loop stops after the chunk holding a
#: group's last scored slot, so at most SCORED_CHUNK − 1 positions per group are unembedded for nothing
SCORED_CHUNK = 256


def scored_token_logps(
    model,
    tokens: jax.Array,
    source: jax.Array,
    response_id: jax.Array,
    *,
    attention_mask: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    parent_ids: jax.Array | None = None,
    vocab_chunk_size: int | None = None,
    groups: int | None = None,
    chunk: int = SCORED_CHUNK,
) -> tuple[jax.Array, jax.Array]:
    """Log-probs of the scored slots of packed rows (`rpo_jax.data.packing`), the output head run on those only:
    `(logps, ids)`, both `[G, L']`, for `segment_logp_sums(logps, ids, ...)`.

    The R rows are taken as G groups of L = R/G·T slots (group g: rows g·R/G .. (g+1)·R/G − 1; G = `groups`,
    default `batch_shard_count(tokens)`, so a group is one device's rows and nothing below leaves its device).
    Each group's scored slots (`response_id` > 0) are moved to its front in slot order (a stable sort; a
    response's slots stay consecutive), with the hidden state that predicts each (`source`, as
    `packed_token_logps`) and its token. The output head then runs chunk by chunk (`chunk` positions of every
    group at a time, L' = L rounded up to a chunk) in a `lax.scan` whose steps after the last chunk holding a
    scored slot of any group are skipped (`lax.cond`; rematerialised in the backward pass): the head's FLOPs
    follow the scored slots, ⌈max_g scored_g / chunk⌉·chunk per group, not the R·T slots, and no shape depends
    on how many slots are scored, so nothing is compiled per batch. Entries past a group's scored slots have
    id 0 (their log-probs, 0 or not, are never added up).
    """
    hidden = model.hidden_states(tokens, attention_mask, positions, segment_ids, parent_ids)
    r, t, d = hidden.shape
    groups = groups or batch_shard_count(tokens)
    groups = groups if r % groups == 0 else 1
    length = r // groups * t
    padded = -(-length // chunk) * chunk

    def grouped(x):  # [R, T] → [G, L'], a group's rows one after another, padding at the end
        return jnp.pad(x.reshape(groups, length), ((0, 0), (0, padded - length)))

    row_start = (jnp.arange(r, dtype=jnp.int32) % (r // groups) * t)[:, None]  # the group slot of each row's slot 0
    ids = grouped(response_id.astype(jnp.int32))
    order = jnp.argsort(ids == 0, axis=-1, stable=True)  # scored slots first, in slot order
    pick = lambda x: jnp.take_along_axis(x, order, axis=1)  # noqa: E731
    ids, targets, at = pick(ids), pick(grouped(tokens)), pick(grouped(row_start + source.astype(jnp.int32)))
    hidden = constrain(hidden.reshape(groups, length, d), ("batch", None, None))
    hidden = jnp.take_along_axis(hidden, at[:, :, None], axis=1)  # [G, L', D]: the predicting hidden states
    chunks = padded // chunk
    needed = -(-jnp.max(jnp.sum(ids > 0, axis=1)) // chunk)  # chunks holding a scored slot of some group
    unembedding = model.unembedding()

    def head(h, tgt):
        return token_logps_from_hidden(
            h, unembedding, tgt, final_logit_softcap=model.config.final_logit_softcap, vocab_chunk_size=vocab_chunk_size
        ).astype(jnp.float32)

    def body(_, x):
        i, h, tgt = x
        skip = lambda h, tgt: jnp.zeros(tgt.shape, jnp.float32)  # noqa: E731
        return None, jax.lax.cond(i < needed, head, skip, h, tgt)

    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    split = lambda x: x.reshape(groups, chunks, chunk, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731
    _, logps = jax.lax.scan(body, None, (jnp.arange(chunks), split(hidden), split(targets)))
    return logps.swapaxes(0, 1).reshape(groups, padded), ids


def context_token_logps(model, tokens: jax.Array, source: jax.Array, mask: tuple, vocab_chunk_size) -> jax.Array:
    """[N,T] float32 log p(tokens[n, t] | hidden[n, source[n, t]]) on a mesh with a context axis: the hidden
    states stay in the zig-zag layout split over the context devices (`Decoder.context_hidden_states`), each
    device gathers the source hidden state of its own tokens and runs the output head on its T/C positions
    (vocabulary chunking as on one device); only the [N,T] log-probs are put back in the row's order.

    mask = (attention_mask, positions, segment_ids, parent_ids) as in `Decoder.hidden_states`.
    """
    hidden, slots = model.context_hidden_states(tokens, *mask)
    back = np.argsort(slots)
    at = jnp.asarray(back, jnp.int32)[source[:, slots].astype(jnp.int32)]  # layout position of each source slot
    hidden = constrain(jnp.take_along_axis(hidden, at[:, :, None], axis=1), ("batch", "sequence", None))
    logps = token_logps_from_hidden(
        hidden,
        model.unembedding(),
        tokens[:, slots],
        final_logit_softcap=model.config.final_logit_softcap,
        vocab_chunk_size=vocab_chunk_size,
    )
    return logps[:, back]


def segment_logp_sums(
    token_logps: jax.Array, response_id: jax.Array, num_responses: int, *, width: int | None = None
) -> jax.Array:
    """[num_responses] float32: out[i] = Σ_{slots with response_id = i + 1} token_logps (id 0: not scored).

    token_logps/response_id [N,T] (`packed_token_logps` with the packer's `response_id`, or `scored_token_logps`'
    groups); a response's slots are consecutive, within `width` (default T) of its first one. Summed as the
    padded path sums a sequence: each response's `width`-slot window from its first slot (`segment_min` of the
    slot index) is gathered into a row [num_responses, width] and reduced with `jnp.sum` over it (a tree
    reduction; a scatter-add would accumulate ~10³ terms one by one, with rounding errors growing with the
    length: several × the padded path's on long responses).
    """
    n, t = token_logps.shape
    width = min(width or t, t)
    values, ids = token_logps.reshape(-1).astype(jnp.float32), response_id.reshape(-1)
    first = jax.ops.segment_min(jnp.arange(n * t), ids, num_segments=num_responses + 1)[1:]
    window = jnp.minimum(first, n * t - 1)[:, None] + jnp.arange(width)  # [num_responses, width] flat slots
    inside = jnp.minimum(window, n * t - 1)
    member = (window < n * t) & (ids[inside] == jnp.arange(1, num_responses + 1)[:, None])
    return jnp.sum(jnp.where(member, values[inside], 0.0), axis=-1)
