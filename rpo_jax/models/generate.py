"""Autoregressive sampling with a KV cache: `generate(model, tokens, attention_mask, *, max_new_tokens, ...)`.

Prompts are left-padded [N,T]; token slot i is i for the prompt and T + step for generated tokens. One prefill
runs the prompt through the model (the masks of the full forward pass) and writes its keys/values into the caches;
then a `lax.scan` decodes one token per step. Caches (`init_caches`):

  full-attention layers: S = T + max_new_tokens slots [L_full,N,S,K,hd]; slot i holds token slot i. The query at
    slot i sees slot j when j ≤ i and slot j holds a real token.
  sliding-window layers: a ring buffer of W = min(window, S) slots [L_sliding,N,W,K,hd]; token slot i is written
    at ring slot i mod W, overwriting slot i - W, which the window no longer shows (i - (i - W) = W ≥ window).
    After writing slot i, ring slot r holds token slot j_r = i - ((i - r) mod W) ∈ (i - W, i], so the query sees
    exactly the real tokens among j_r ≥ 0 — the keys with i - j < window of the full forward pass.

Decoding therefore equals re-running the model on the growing sequence, with O(window) memory on sliding layers.
Positions continue the prompt's `cumsum(mask) - 1`. The whole function is jit-compiled (static: lengths and
sampling settings).

Stopping: a row ends at its first EOS id or at the first generated token that completes a token stop sequence
(checked in the graph on a rolling window of the last generated tokens), and — after generation, on the host — at
the first token whose decoded text completes a stop string (`truncate_at_stop_strings`). Whichever comes first
ends the row; the stopping token itself is kept.

Sharding: nothing to set up. With a model loaded or created with `mesh=` and prompts placed with the batch
sharding (`jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"))))`), XLA propagates the shardings
(Auto mesh axes): the KV cache is split over the batch like the activations, and the result equals the
unsharded one (sampling included: the per-step keys do not depend on the layout). `jax.set_mesh` is not needed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rpo_jax.models import layers
from rpo_jax.models.config import FULL_ATTENTION, SLIDING_ATTENTION


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GenerateOutput:
    """Result of `generate` (N prompts, M = max_new_tokens).

    Attributes:
        tokens: `[N, M]` int32 sampled tokens, `pad_token_id` after the row's stop (EOS, stop sequence or stop
            string).
        mask: `[N, M]` bool, True on generated tokens up to and including the stopping token.
        logps: `[N, M]` float32 log p(token) under the model's unmodified distribution (temperature 1, no
            top-k / top-p), 0 where `mask` is False — the policy log-probs of the samples.
        lengths: `[N]` int32, `mask.sum(-1)`.
    """

    tokens: jax.Array
    mask: jax.Array
    logps: jax.Array
    lengths: jax.Array


def filter_logits(logits: jax.Array, *, top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Sets logits outside the top-k / nucleus (top-p) set to -inf (top-k first, then top-p, as transformers).

    Args:
        logits: `[..., V]` float32.
        top_k: keep the k largest (ties with the k-th kept); `None`: no top-k.
        top_p: keep the smallest prefix of tokens sorted by probability whose mass reaches `top_p`, i.e. token i
            is kept iff the mass strictly before it is < `top_p` (the most likely token is always kept); `None`
            or 1: no nucleus filtering.

    Returns:
        `[..., V]` logits with the filtered-out entries at -inf.
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


def _stop_sequence_hit(recent: jax.Array, stop_sequences: tuple[tuple[int, ...], ...]) -> jax.Array:
    """[N] bool: whether the rolling window recent [N,W] of the last W generated tokens (oldest first, -1 where
    fewer than W were generated) ends with any of the stop sequences (each of length ≤ W)."""
    width = recent.shape[1]
    hit = jnp.zeros(recent.shape[:1], bool)
    for seq in stop_sequences:
        tail = recent[:, width - len(seq) :]
        hit = hit | jnp.all(tail == jnp.asarray(seq, jnp.int32)[None, :], axis=1)
    return hit


def ring_slots(last_slot: jax.Array, ring_size: int) -> jax.Array:
    """[W] int32: the token slot held by each ring slot r once token slot `last_slot` is written,
    j_r = last_slot - ((last_slot - r) mod W) (negative: never written)."""
    r = jnp.arange(ring_size, dtype=jnp.int32)
    return last_slot - jnp.mod(last_slot - r, ring_size)


def init_caches(config, prompt_kv, attention_mask, max_new_tokens: int):
    """The decoding caches after a prefill of T prompt tokens (module docstring for the layouts).

    prompt_kv: every layer's keys/values (k, v) [L,N,T,K,hd]; attention_mask [N,T] bool.
    Returns (caches, valid): per layer type present, caches[type] = (k, v) [L_type,N,S_type,K,hd] and
    valid[type] [N,S_type] bool (the slot holds a real token).
    """
    k_all, v_all = prompt_kv
    n, t = attention_mask.shape
    s = t + max_new_tokens
    caches, valid = {}, {}
    for kind in sorted(set(config.layer_types)):
        ids = np.asarray([i for i, lt in enumerate(config.layer_types) if lt == kind])
        k, v = k_all[ids], v_all[ids]
        if kind == FULL_ATTENTION:
            pad = ((0, 0), (0, 0), (0, max_new_tokens), (0, 0), (0, 0))
            caches[kind] = (jnp.pad(k, pad), jnp.pad(v, pad))
            valid[kind] = jnp.concatenate([attention_mask, jnp.zeros((n, max_new_tokens), bool)], axis=1)
        else:
            held = ring_slots(jnp.int32(t - 1), min(config.sliding_window, s))
            source = jnp.maximum(held, 0)
            caches[kind] = (jnp.take(k, source, axis=2), jnp.take(v, source, axis=2))
            valid[kind] = (held >= 0)[None, :] & jnp.take(attention_mask, source, axis=1)
    return caches, valid


def kv_cache_generate(
    model, tokens, attention_mask, key, *, max_new_tokens, temperature, top_k, top_p, eos_ids, pad_id, stop_sequences=()
) -> GenerateOutput:
    """`generate`'s traceable body, for a caller that jits it with more around it (the trainer's sampler,
    `rpo_jax.train.build.programs.sampler`): a prefill over the left-padded prompts `tokens`/`attention_mask`
    [N, T], then a `lax.scan` of `max_new_tokens` decode steps on the KV cache. Arguments as `generate`'s, already
    validated: `eos_ids` a tuple of ids, `pad_id` an int, `stop_sequences` a tuple of token-id tuples; no stop
    strings (applied afterwards on the host, `truncate_at_stop_strings`)."""
    config = model.config
    n, t = tokens.shape
    attention_mask = attention_mask.astype(bool)

    # prefill: the forward pass's own masks over the prompt, keeping every layer's keys/values
    positions = layers.default_positions(attention_mask, None, (n, t))
    index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
    mask = layers.attention_mask_bool(index, index, attention_mask, None, None)
    window = None
    if SLIDING_ATTENTION in config.layer_types:
        window = mask & layers.sliding_window_mask(index, index, config.sliding_window)
    hidden, prompt_kv = model.run_layers(model.embed_tokens(tokens), positions, mask, window, return_kv=True)
    caches, cache_valid = init_caches(config, prompt_kv, attention_mask, max_new_tokens)
    del prompt_kv
    logits = model.unembed(hidden[:, -1])
    next_position = jnp.sum(attention_mask, axis=1).astype(jnp.int32)  # [N]

    def step(carry, step_key):
        caches, cache_valid, logits, position, done, i, recent = carry
        token = _sample(logits, step_key, temperature, top_k, top_p)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
        live = ~done
        is_eos = jnp.isin(token, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else jnp.zeros_like(live)
        out = (jnp.where(live, token, pad_id), live, jnp.where(live, logp, 0.0))
        done = done | is_eos
        if stop_sequences:  # rolling window of the last W generated tokens; the token that completes one is kept
            recent = jnp.concatenate([recent[:, 1:], token[:, None]], axis=1)
            done = done | _stop_sequence_hit(recent, stop_sequences)
        # feed the token at token slot t + i: cache slot t + i (full layers), (t + i) mod W (ring buffers)
        slot = t + i
        where = {
            kind: slot if kind == FULL_ATTENTION else jnp.mod(slot, valid.shape[1])
            for kind, valid in cache_valid.items()
        }
        cache_valid = {
            kind: jax.lax.dynamic_update_slice_in_dim(valid, jnp.ones((n, 1), bool), where[kind], axis=1)
            for kind, valid in cache_valid.items()
        }
        # full caches: causal (slots after `slot` are not yet valid) + real tokens; ring: every held slot is in
        # the window (module docstring), so validity alone decides
        masks = {kind: valid[:, None, :] for kind, valid in cache_valid.items()}
        hidden, caches = model.run_layers(
            model.embed_tokens(token[:, None]),
            position[:, None],
            masks.get(FULL_ATTENTION),
            masks.get(SLIDING_ATTENTION),
            caches,
            where,
        )
        logits = model.unembed(hidden[:, 0])
        return (caches, cache_valid, logits, position + 1, done, i + 1, recent), out

    keys = jax.random.split(key, max_new_tokens)
    width = max((len(seq) for seq in stop_sequences), default=0)
    recent = jnp.full((n, width), -1, jnp.int32)  # -1 matches no token id: only generated tokens can match
    init = (caches, cache_valid, logits, next_position, jnp.zeros((n,), bool), jnp.int32(0), recent)
    _, (new_tokens, live, logps) = jax.lax.scan(step, init, keys)
    new_tokens, live, logps = new_tokens.T, live.T, logps.T
    return GenerateOutput(
        tokens=new_tokens.astype(jnp.int32),
        mask=live,
        logps=logps.astype(jnp.float32),
        lengths=jnp.sum(live, axis=1).astype(jnp.int32),
    )


_generate_jit = nnx.jit(
    kv_cache_generate,
    static_argnames=("max_new_tokens", "temperature", "top_k", "top_p", "eos_ids", "pad_id", "stop_sequences"),
)


def _stop_sequences_arg(stop_sequences, vocab_size: int) -> tuple[tuple[int, ...], ...]:
    """Validates `stop_sequences` (a list of non-empty token-id lists) into the static tuple of tuples."""
    if stop_sequences is None:
        return ()
    if isinstance(stop_sequences, (str, bytes)) or not isinstance(stop_sequences, (Sequence, np.ndarray)):
        raise ValueError(f"stop_sequences must be a list of token-id lists, got {type(stop_sequences).__name__}")
    result = []
    for k, seq in enumerate(stop_sequences):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, (Sequence, np.ndarray)):
            raise ValueError(
                f"stop_sequences[{k}] must be a list of token ids, got {seq!r} "
                "(a flat list of ids is not accepted: wrap each sequence, e.g. [[13, 13]])"
            )
        if len(seq) == 0:
            raise ValueError(f"stop_sequences[{k}] is empty")
        ids = []
        for j, tok in enumerate(seq):
            if isinstance(tok, (bool, np.bool_)) or not isinstance(tok, (int, np.integer)):
                raise ValueError(f"stop_sequences[{k}][{j}] must be an int token id, got {tok!r}")
            if not 0 <= int(tok) < vocab_size:
                raise ValueError(f"stop_sequences[{k}][{j}] = {int(tok)} is outside the vocabulary [0, {vocab_size})")
            ids.append(int(tok))
        result.append(tuple(ids))
    return tuple(result)


def _stop_strings_arg(stop_strings, tokenizer) -> tuple[str, ...]:
    """Validates `stop_strings` (a list of non-empty str) and that a tokenizer with `decode` comes with them."""
    if stop_strings is None:
        return ()
    if isinstance(stop_strings, (str, bytes)) or not isinstance(stop_strings, Sequence):
        raise ValueError(f"stop_strings must be a list of str (e.g. [{stop_strings!r}]), got {stop_strings!r}")
    for k, text in enumerate(stop_strings):
        if not isinstance(text, str) or not text:
            raise ValueError(f"stop_strings[{k}] must be a non-empty str, got {text!r}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs tokenizer= (any object with decode(list[int]) -> str)")
    if stop_strings and not callable(getattr(tokenizer, "decode", None)):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no decode(list[int]) -> str method")
    return tuple(stop_strings)


def _first_stop_index(ids: Sequence[int], decode, stop_strings: Sequence[str]) -> int | None:
    """The first j such that decode(ids[:j+1]) contains a stop string, or None."""
    for j in range(len(ids)):
        text = decode(list(ids[: j + 1]))
        if any(stop in text for stop in stop_strings):
            return j
    return None


def truncate_at_stop_strings(
    output: GenerateOutput, tokenizer, stop_strings: Sequence[str], *, pad_token_id: int
) -> GenerateOutput:
    """Ends each row at the first generated token whose text completes a stop string (host-side, numpy).

    For row i with n = lengths[i] kept tokens, j is the first index < n at which
    `tokenizer.decode(tokens[i, :j+1])` (the generated tokens only, with the tokenizer's decode defaults)
    contains any stop string. Token j is kept: mask[i, :j+1] True, tokens[i, j+1:] = pad_token_id,
    mask False and logps 0 there, lengths[i] = j + 1. Rows without a match are unchanged. The decoded text is
    searched, not single tokens, so a stop string may straddle token boundaries ("st" + "op" completes "stop"),
    and a token that runs past the stop string ends the row too ("las" + "topper"), as in transformers'
    `StopStringCriteria`; unlike it, a stop string that starts in the prompt does not count.

    EOS: a row already ended at EOS has n up to and including it, so only tokens before the EOS are searched:
    whichever of EOS, stop sequence and stop string comes first ends the row.

    Exactness (why truncating afterwards equals stopping during generation): `generate`'s scan runs all
    max_new_tokens steps for every row; token t of a row is drawn from logits that depend only on that row's
    prompt and its tokens < t (rows never attend to each other) and on step t's key, which is split from `rng`
    before the scan. Cutting a row after token j therefore leaves exactly the tokens, masks and log-probs a
    generation that stopped at j would have produced, for that row and every other one. The extra steps cost
    nothing more: a fixed-length scan runs them anyway.

    Cost: n decodes of up to n tokens per row (prefix by prefix, since decoding is not in general additive over
    tokens).

    Args:
        output: a `GenerateOutput` with `[N, M]` fields whose mask is a prefix (True then False).
        tokenizer: anything with `decode(list[int]) -> str` (a transformers tokenizer, a `tokenizers.Tokenizer`).
        stop_strings: non-empty strings.
        pad_token_id: what fills the slots after a row's new end.

    Returns:
        A new `GenerateOutput`; each field keeps its sharding when it is a `jax.Array`.
    """
    strings = _stop_strings_arg(stop_strings, tokenizer)
    tokens = np.array(jax.device_get(output.tokens), np.int32)
    mask = np.array(jax.device_get(output.mask), bool)
    logps = np.array(jax.device_get(output.logps), np.float32)
    if tokens.ndim != 2 or mask.shape != tokens.shape or logps.shape != tokens.shape:
        raise ValueError(
            f"output fields must all be [N, M]: tokens {tokens.shape}, mask {mask.shape}, logps {logps.shape}"
        )
    lengths = mask.sum(axis=1).astype(np.int32)
    for i, n in enumerate(lengths):
        if not mask[i, :n].all():
            raise ValueError(f"output.mask row {i} is not a prefix (True then False): {mask[i].astype(int)}")
        j = _first_stop_index(tokens[i, :n].tolist(), tokenizer.decode, strings) if strings else None
        if j is not None:
            tokens[i, j + 1 :], mask[i, j + 1 :], logps[i, j + 1 :] = pad_token_id, False, 0.0
            lengths[i] = j + 1

    def like(new, old):
        return jax.device_put(new, old.sharding) if isinstance(old, jax.Array) else new

    return GenerateOutput(
        tokens=like(tokens, output.tokens),
        mask=like(mask, output.mask),
        logps=like(logps, output.logps),
        lengths=like(lengths, output.lengths),
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
    stop_sequences: Sequence[Sequence[int]] | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
) -> GenerateOutput:
    """Samples `max_new_tokens` continuations of left-padded prompts with a KV cache.

    `temperature = 0` is greedy (argmax); otherwise logits / temperature, then top-k, then top-p filtering, then a
    categorical draw with `rng`. Whichever of EOS, stop sequence and stop string comes first ends a row; the
    stopping token is kept (marked in `mask`) and later slots hold `pad_token_id`.

    Args:
        model: a `Decoder` (sharded or not: XLA propagates the prompts' batch sharding to the KV cache).
        tokens: `[N, T]` int32 prompts, left-padded.
        attention_mask: `[N, T]` bool, True on real tokens.
        max_new_tokens: M, the tokens generated per row (the scan always runs M steps).
        temperature: 0 for greedy decoding.
        top_k: keep the k most likely tokens (`None`: all).
        top_p: nucleus filtering (`None` or 1: none).
        eos_token_id: an id or a list of ids that end a row (`None`: none).
        rng: a `jax.random` key; required when `temperature > 0`.
        pad_token_id: fills the slots after a row's end (default: the config's pad id, else 0).
        stop_sequences: token-id sequences, e.g. `[[13, 13], [50256]]`; a row stops once its generated tokens end
            with one (checked in the graph). Only generated tokens count, not the prompt.
        stop_strings: strings, e.g. ``["\\n\\n", "User:"]``, with `tokenizer`; a row stops at the first token whose
            decoded generated text contains one, even across token boundaries (applied after the scan by
            `truncate_at_stop_strings`, which is exact — see there; the returned arrays are then rebuilt from
            host copies, keeping their shardings).
        tokenizer: anything with `decode(list[int]) -> str`; needed with `stop_strings`.

    Returns:
        A `GenerateOutput`: `tokens`, `mask`, `logps` `[N, M]` and `lengths` `[N]`.
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
    stop_sequences = _stop_sequences_arg(stop_sequences, model.config.vocab_size)
    stop_strings = _stop_strings_arg(stop_strings, tokenizer)
    tokens = jnp.asarray(tokens, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, bool)
    if tokens.ndim != 2 or attention_mask.shape != tokens.shape:
        raise ValueError(f"tokens {tokens.shape} and attention_mask {attention_mask.shape} must both be [N, T]")
    eos_ids = (
        ()
        if eos_token_id is None
        else tuple(int(i) for i in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]))
    )
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    key = jax.random.key(0) if rng is None else rng  # unused when greedy
    output = _generate_jit(
        model,
        tokens,
        attention_mask,
        key,
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=None if top_k is None else int(top_k),
        top_p=None if top_p is None else float(top_p),
        eos_ids=eos_ids,
        pad_id=int(pad_token_id),
        stop_sequences=stop_sequences,
    )
    if stop_strings:
        output = truncate_at_stop_strings(output, tokenizer, stop_strings, pad_token_id=int(pad_token_id))
    return output
