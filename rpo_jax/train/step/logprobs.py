"""Sequence log-probs inside the jitted steps: the policy's and the in-step references' per-response
sums for padded and packed batches, the score window, and `PreferenceLogps` for the loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rpo_jax.losses import PreferenceLogps
from rpo_jax.models import ring_attention, sequence_logps
from rpo_jax.models.logprobs import (
    packed_token_logps,
    scored_token_logps,
    segment_logp_sums,
    token_logps,
    unembeds_scored_slots,
)
from rpo_jax.models.lora import lora_dropout
from rpo_jax.train.config.values import parse_score_window

Batch = Mapping[str, jax.Array]


def cast_floating(tree: Any, dtype) -> Any:
    """Cast every floating-point leaf of `tree` to `dtype` (integer leaves untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def resolve_score_window(setting: str | int | None, max_span: int, *, multiple: int = 16) -> int | None:
    """`config.model.score_window` → the static W for a run whose longest scored span is `max_span`.

    "auto": `max_span` rounded up to a multiple of `multiple` (None when nothing is scored); "off", "", 0 or
    None: None (the head runs on every position); a number: that W, which must cover `max_span` (a smaller
    window would leave scored tokens outside it). A W ≥ T-1 for a batch of length T means every position.
    """
    try:
        width = parse_score_window(setting)  # the schema's parser (`rpo_jax.train.config.values`)
    except ValueError as e:
        raise ValueError(f"config.model.score_window={setting!r}: {e}") from None
    if width == "off":
        return None
    if width == "auto":
        return -(-max_span // multiple) * multiple if max_span > 0 else None
    if width < max(max_span, 1):
        raise ValueError(
            f"config.model.score_window={width} is shorter than the longest response in the data "
            f"({max_span} scored tokens); use 'auto' or at least {max_span}"
        )
    return width


def training_dropout(model: nnx.Module, key: jax.Array | None):
    """LoRA dropout with masks from `key` for the block (`rpo_jax.models.lora.lora_dropout`) when `model` has
    adapters and `key` is given; otherwise nothing changes (evaluation, references, models without LoRA)."""
    if key is None or getattr(model, "lora", None) is None:
        return contextlib.nullcontext(model)
    return lora_dropout(model, key)


def response_logps(
    graphdef: nnx.GraphDef,
    params: Any,
    rest: Any,
    batch: Batch,
    *,
    compute_dtype,
    vocab_chunk_size: int | None = None,
    score_window: int | None = None,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Σ log π over the response tokens of every response: `[B, K]` float32 (0 on invalid slots).

    `dropout_rng`: a training step's key for LoRA dropout (`training_dropout`); None everywhere else.

    `score_window` (static): unembed only that many positions per response (see `sequence_logps`); a response
    with a scored token outside its window gets NaN. A packed batch (`rpo_jax.data.packing`, it has
    `response_id`) goes through `packed_response_logps` (`score_window` does not apply there).
    """
    if "response_id" in batch:
        return packed_response_logps(
            graphdef,
            params,
            rest,
            batch,
            compute_dtype=compute_dtype,
            vocab_chunk_size=vocab_chunk_size,
            dropout_rng=dropout_rng,
        )
    model = nnx.merge(graphdef, cast_floating(params, compute_dtype), rest)
    tokens = batch["tokens"]
    b, k, t = tokens.shape
    flat = lambda x: x.reshape(b * k, t)  # noqa: E731
    # Empty response slots are all padding: let their first token attend to itself so no softmax row is empty.
    attention_mask = flat(batch["attention_mask"]).at[:, 0].set(True)
    with training_dropout(model, dropout_rng):
        logp, _ = sequence_logps(
            model,
            flat(tokens),
            flat(batch["loss_mask"]),
            attention_mask=attention_mask,
            vocab_chunk_size=vocab_chunk_size,
            score_window=score_window or None,
        )
    return jnp.where(batch["valid"], logp.reshape(b, k), 0.0)


def packed_response_logps(
    graphdef: nnx.GraphDef,
    params: Any,
    rest: Any,
    batch: Batch,
    *,
    compute_dtype,
    vocab_chunk_size: int | None = None,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """`response_logps` of a packed batch: rows tokens/positions/segment_ids/source/response_id (+ parent_ids
    with shared prompts) [R,T], valid [B,K]. policy[b, k] = Σ_{slots with response_id = 1 + b·K + k} log p, the
    per-slot log-probs of `scored_token_logps` (the output head on the scored slots only), or of
    `packed_token_logps` for a model whose head is small (`unembeds_scored_slots`) or on a context mesh; 0 on
    invalid slots, as in the padded path."""
    model = nnx.merge(graphdef, cast_floating(params, compute_dtype), rest)
    rows = dict(
        attention_mask=batch["attention_mask"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        parent_ids=batch.get("parent_ids"),
        vocab_chunk_size=vocab_chunk_size,
    )
    with training_dropout(model, dropout_rng):
        if ring_attention.context_mesh(batch["tokens"]) is None and unembeds_scored_slots(model.config):
            logps, ids = scored_token_logps(model, batch["tokens"], batch["source"], batch["response_id"], **rows)
        else:  # a small head, or the rows split over the context devices: the head on every slot
            logps = packed_token_logps(model, batch["tokens"], batch["source"], **rows)
            ids = batch["response_id"]
    b, k = batch["valid"].shape
    sums = segment_logp_sums(logps, ids, b * k, width=batch["tokens"].shape[1]).reshape(b, k)
    return jnp.where(batch["valid"], sums, 0.0)


def response_and_sequence_logps(
    graphdef: nnx.GraphDef,
    params: Any,
    rest: Any,
    batch: Batch,
    *,
    compute_dtype,
    vocab_chunk_size: int | None = None,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(response sums `[B, K]`, sequence sums `[B, K]`, sequence token counts `[B, K]`) of a padded batch from one
    forward over every position (no score window): the per-token log-probs Σ'd over the loss mask (as
    `response_logps`) and over every non-padding token after the first — the prompt's too, TRL's `ORPOTrainer`
    NLL tokens (`PreferenceLogps.sequence_logps` / `sequence_lengths`). Invalid slots are 0."""
    model = nnx.merge(graphdef, cast_floating(params, compute_dtype), rest)
    tokens = batch["tokens"]
    b, k, t = tokens.shape
    flat = lambda x: x.reshape(b * k, t)  # noqa: E731
    attention = flat(batch["attention_mask"])
    with training_dropout(model, dropout_rng):
        per_token = token_logps(
            model, flat(tokens), attention_mask=attention.at[:, 0].set(True), vocab_chunk_size=vocab_chunk_size
        )
    first = jnp.arange(t)[None, :] > 0  # token 0 is never predicted
    response = flat(batch["loss_mask"]).astype(bool) & first
    sequence = attention.astype(bool) & first
    sums = lambda mask: jnp.sum(jnp.where(mask, per_token, 0.0), axis=-1).reshape(b, k)  # noqa: E731
    valid = batch["valid"]
    counts = jnp.sum(sequence, axis=-1).reshape(b, k).astype(jnp.float32)
    return tuple(jnp.where(valid, x, 0.0) for x in (sums(response), sums(sequence), counts))


def preference_inputs(
    policy_logps: jax.Array, batch: Batch, ref_logps: jax.Array | None, sequence: tuple | None = None
) -> PreferenceLogps:
    """The loss's `PreferenceLogps` of a batch; `sequence`: `(sequence_logps, sequence_lengths)` `[B, K]` of
    `response_and_sequence_logps`, for ORPO's NLL over prompt + response tokens."""
    return PreferenceLogps(
        policy_logps=policy_logps,
        ref_logps=ref_logps,
        lengths=batch["lengths"],
        rewards=batch.get("rewards"),
        valid=batch["valid"],
        sequence_logps=None if sequence is None else sequence[0],
        sequence_lengths=None if sequence is None else sequence[1],
    )


def step_reference_logps(
    logps: Callable, ref_graphdefs: tuple, ref_params: tuple, batch: Batch, policy: tuple[Any, Any] | None = None
) -> jax.Array | None:
    """`[B,K,R]` log-probs of the in-step references, `logps(graphdef, params, rest, batch)` each (a forward
    only, under stop_gradient), or the cached `batch["ref_logps"]` (None if absent) when `ref_params` is empty.

    A reference whose parameters (or rest) are None shares the policy's, `policy = (params, rest)` of this
    step: LoRA's base reference is the policy's own weights under a graphdef with the adapters switched off
    (`rpo_jax.models.lora.adapters_disabled`), so nothing is copied."""
    if not ref_params:
        return batch.get("ref_logps")
    own = lambda x, i: policy[i] if x is None else x  # noqa: E731
    return jax.lax.stop_gradient(
        jnp.stack([logps(gd, own(p, 0), own(r, 1), batch) for (gd, r), p in zip(ref_graphdefs, ref_params)], axis=-1)
    )
