"""Checking a ``PreferenceLogps`` against what a loss needs, and preparing it (float32, masked, pair masks).

The checks use only static shapes and dtypes, so they run identically on concrete arrays (first call, outside
``jit``) and on tracers (at trace time): bad input always raises a ``ValueError`` naming the field.

Values are not checked (they are traced), but they are never silently dropped either: ``prepare_batch`` zeroes
every *invalid* slot, and flags every example with a non-finite value (NaN, ±inf) in a *valid* slot of any field
(``PreparedBatch.nonfinite``); ``poison_nonfinite`` then makes that example's loss — and the batch loss — NaN.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rpo_jax.losses.types import PreferenceLogps

__all__ = [
    "Requirements",
    "PreparedBatch",
    "check_batch",
    "prepare_batch",
    "preference_pair_mask",
    "all_pairs_mask",
    "best_worst_pair_mask",
    "chosen_slot_mask",
    "nonfinite_examples",
    "poison_nonfinite",
]


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What a loss needs from the batch (derived from its name and hyperparameters)."""

    loss_name: str
    reference: bool = False
    rewards: bool = False
    lengths: bool = False
    min_references: int = 1  # R the reference axis must at least have (2 for MRPO)
    num_references: int | None = None  # exact R when known (e.g. len(alpha))
    num_references_reason: str | None = None  # why R is fixed, for the error message (default: the alpha weights)
    sequence: bool = False  # sequence_logps and sequence_lengths (ORPO's NLL over prompt + response tokens)


@dataclasses.dataclass(frozen=True)
class PreparedBatch:
    """A validated batch: float32 arrays, invalid slots zeroed (so they cannot leak NaN), references constant.

    ``ref`` keeps the reference axis when the input had one: ``[B, K]`` or ``[B, K, R]``. ``nonfinite [B]`` bool:
    the examples with a NaN/±inf in a valid slot of any field (``None`` only when built by hand). ``sequence`` and
    ``sequence_lengths``: ``PreferenceLogps.sequence_logps`` / ``sequence_lengths`` (``None`` when absent).
    """

    policy: jax.Array
    ref: jax.Array | None
    lengths: jax.Array | None
    rewards: jax.Array | None
    valid: jax.Array
    num_responses: int
    nonfinite: jax.Array | None = None
    sequence: jax.Array | None = None
    sequence_lengths: jax.Array | None = None


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def check_batch(batch: PreferenceLogps, req: Requirements) -> None:
    """Raise ``ValueError`` (naming the ``PreferenceLogps`` field) if ``batch`` does not fit ``req``."""
    name = req.loss_name
    if not isinstance(batch, PreferenceLogps):
        raise ValueError(f"loss {name!r} expects a PreferenceLogps, got {type(batch).__name__}")
    if batch.policy_logps is None:
        raise ValueError(f"PreferenceLogps.policy_logps is None; loss {name!r} needs policy log-probs [B, K]")
    shape = _shape(batch.policy_logps)
    if len(shape) != 2:
        raise ValueError(f"PreferenceLogps.policy_logps must have shape [B, K], got shape {shape}")
    if not _is_float(batch.policy_logps):
        raise ValueError(
            f"PreferenceLogps.policy_logps must be floating point, got {jnp.result_type(batch.policy_logps)}"
        )
    num_b, num_k = shape
    if num_k < 2:
        raise ValueError(f"PreferenceLogps.policy_logps has K = {num_k} responses per prompt; every loss needs K >= 2")

    for field in ("lengths", "rewards", "valid", "sequence_logps", "sequence_lengths"):
        value = getattr(batch, field)
        if value is not None and _shape(value) != (num_b, num_k):
            raise ValueError(
                f"PreferenceLogps.{field} has shape {_shape(value)}, expected [B, K] = {(num_b, num_k)} "
                "like policy_logps"
            )
    if batch.valid is not None and jnp.result_type(batch.valid) != jnp.bool_:
        raise ValueError(f"PreferenceLogps.valid must be a bool array, got dtype {jnp.result_type(batch.valid)}")
    if batch.rewards is not None and not _is_float(batch.rewards):
        raise ValueError(f"PreferenceLogps.rewards must be floating point, got {jnp.result_type(batch.rewards)}")
    if batch.sequence_logps is not None and not _is_float(batch.sequence_logps):
        raise ValueError(
            f"PreferenceLogps.sequence_logps must be floating point, got {jnp.result_type(batch.sequence_logps)}"
        )

    if batch.ref_logps is not None:
        ref_shape = _shape(batch.ref_logps)
        if ref_shape[:2] != (num_b, num_k) or len(ref_shape) not in (2, 3):
            raise ValueError(
                f"PreferenceLogps.ref_logps has shape {ref_shape}, expected [B, K] = {(num_b, num_k)} or "
                f"[B, K, R] = {(num_b, num_k, 'R')} like policy_logps"
            )
        if not _is_float(batch.ref_logps):
            raise ValueError(
                f"PreferenceLogps.ref_logps must be floating point, got {jnp.result_type(batch.ref_logps)}"
            )

    if req.reference:
        if batch.ref_logps is None:
            raise ValueError(
                f"PreferenceLogps.ref_logps is None, but loss {name!r} compares against a reference model: "
                "pass reference log-probs [B, K] (or [B, K, R]), or use a reference-free setting"
            )
        ref_shape = _shape(batch.ref_logps)
        num_r = ref_shape[2] if len(ref_shape) == 3 else 1
        if num_r < req.min_references:
            raise ValueError(
                f"PreferenceLogps.ref_logps has shape {ref_shape} (R = {num_r} reference models), but loss "
                f"{name!r} combines several references and needs a reference axis [B, K, R] with R >= "
                f"{req.min_references}"
            )
        if req.num_references is not None and num_r != req.num_references:
            reason = req.num_references_reason or f"was given {req.num_references} weights (alpha)"
            raise ValueError(f"PreferenceLogps.ref_logps has R = {num_r} reference models, but loss {name!r} {reason}")
    if req.rewards and batch.rewards is None:
        raise ValueError(
            f"PreferenceLogps.rewards is None, but loss {name!r} is reward-aware and needs explicit rewards [B, K]"
        )
    if batch.rewards is None and num_k != 2:
        raise ValueError(
            f"PreferenceLogps.rewards is None with K = {num_k} responses: without rewards only K = 2 "
            "(response 0 chosen, 1 rejected) has a preference direction; pass rewards [B, K]"
        )
    if req.lengths and batch.lengths is None:
        raise ValueError(
            f"PreferenceLogps.lengths is None, but loss {name!r} normalises by response length; pass lengths [B, K]"
        )
    if req.sequence:
        for field in ("sequence_logps", "sequence_lengths"):
            if getattr(batch, field) is None:
                raise ValueError(
                    f"PreferenceLogps.{field} is None, but loss {name!r} takes its NLL over the prompt + response "
                    "tokens (as TRL's ORPOTrainer); pass sequence_logps and sequence_lengths [B, K], or use "
                    "nll_tokens='response'"
                )


def nonfinite_examples(batch: PreferenceLogps, valid: jax.Array) -> jax.Array:
    """``[B]`` bool: examples with a NaN/±inf (after the float32 upcast) in a *valid* slot of ``policy_logps``,
    ``ref_logps`` (any reference), ``lengths``, ``rewards``, ``sequence_logps`` or ``sequence_lengths`` — every
    field present, used by the loss or not."""
    flags = jnp.zeros(valid.shape[:1], bool)
    fields = (batch.policy_logps, batch.ref_logps, batch.lengths, batch.rewards)
    for x in fields + (batch.sequence_logps, batch.sequence_lengths):
        if x is None:
            continue
        bad = ~jnp.isfinite(jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)))
        if bad.ndim == 3:
            bad = jnp.any(bad, axis=-1)
        flags = flags | jnp.any(bad & valid, axis=-1)
    return flags


def prepare_batch(batch: PreferenceLogps) -> PreparedBatch:
    """Upcast to float32, zero every invalid slot (``jnp.where`` on the inputs themselves, so NaN/inf there cannot
    leak into values or gradients), ``stop_gradient`` the reference log-probs (references are frozen models), and
    flag the examples with a non-finite value in a valid slot (``nonfinite``; see ``poison_nonfinite``)."""
    num_b, num_k = _shape(batch.policy_logps)
    valid = jnp.ones((num_b, num_k), bool) if batch.valid is None else jnp.asarray(batch.valid, bool)

    def clean(x: Any) -> jax.Array | None:
        if x is None:
            return None
        x = jnp.asarray(x, jnp.float32)
        mask = valid if x.ndim == 2 else valid[..., None]
        return jnp.where(mask, x, 0.0)

    ref = clean(batch.ref_logps)
    return PreparedBatch(
        policy=clean(batch.policy_logps),
        ref=None if ref is None else jax.lax.stop_gradient(ref),
        lengths=clean(batch.lengths),
        rewards=clean(batch.rewards),
        valid=valid,
        num_responses=num_k,
        nonfinite=nonfinite_examples(batch, valid),
        sequence=clean(batch.sequence_logps),
        sequence_lengths=clean(batch.sequence_lengths),
    )


def poison_nonfinite(prep: PreparedBatch) -> jax.Array:
    """``[B]``: exactly 0 for an example whose valid slots are all finite, NaN for a ``nonfinite`` one — in value
    *and* in the gradient w.r.t. that example's valid policy log-probs.

    Adding it to ``per_example`` (and its sum to the loss) is what keeps a non-finite input from being silently
    dropped: pair masks built from a NaN reward, ``0·log 0`` conventions, argmax/sort and weight-0 examples could
    otherwise hide it behind a plausible finite loss. It is ``Σ_k nan_b · policy_bk`` with ``nan_b ∈ {0, NaN}``
    (invalid slots of ``policy`` are already 0): for a clean example every product is ``0 · finite = 0`` and its
    gradient ``0``, so values and gradients of clean batches are unchanged bit for bit.
    """
    if prep.nonfinite is None:
        return jnp.zeros(prep.policy.shape[:1], jnp.float32)
    scale = jnp.where(prep.nonfinite, jnp.nan, 0.0).astype(jnp.float32)
    return jnp.sum(scale[:, None] * prep.policy, axis=-1)


def _both_valid(valid: jax.Array) -> jax.Array:
    return valid[:, :, None] & valid[:, None, :]


def all_pairs_mask(valid: jax.Array) -> jax.Array:
    """``[B, K, K]``: every ordered pair ``(i, j)``, ``i ≠ j``, of valid responses (reward-aware losses)."""
    num_k = valid.shape[-1]
    return _both_valid(valid) & ~jnp.eye(num_k, dtype=bool)[None]


def preference_pair_mask(prep: PreparedBatch) -> jax.Array:
    """``[B, K, K]``: ordered pairs ``(i, j)`` of valid responses with ``i`` preferred to ``j``.

    With rewards: ``r_i > r_j`` (ties give no pair). Without rewards (K = 2): only ``(0, 1)``.
    """
    if prep.rewards is None:
        num_b = prep.valid.shape[0]
        first = jnp.zeros((num_b, 2, 2), bool).at[:, 0, 1].set(True)
        return first & _both_valid(prep.valid)
    better = prep.rewards[:, :, None] > prep.rewards[:, None, :]
    return better & _both_valid(prep.valid)


def best_worst_pair_mask(prep: PreparedBatch) -> jax.Array:
    """``[B, K, K]``: one pair per example, the best (highest reward) against the worst valid response.

    Ties on the best (or worst) reward go to the lowest index. Without rewards (K = 2) it is ``(0, 1)``. An
    example whose valid responses all have the same reward has no pair.
    """
    if prep.rewards is None:
        return preference_pair_mask(prep)
    num_k = prep.num_responses
    big = jnp.finfo(jnp.float32).max
    best = jnp.argmax(jnp.where(prep.valid, prep.rewards, -big), axis=-1)
    worst = jnp.argmin(jnp.where(prep.valid, prep.rewards, big), axis=-1)
    slots = jnp.arange(num_k)
    mask = (slots == best[:, None])[:, :, None] & (slots == worst[:, None])[:, None, :]
    return mask & preference_pair_mask(prep)


def chosen_slot_mask(prep: PreparedBatch) -> jax.Array:
    """``[B, K]``: each example's chosen response, the one an NLL term trains on (``sft``, ``orpo``, ``cpo``).

    Response 0 without rewards; with rewards the valid response with the highest reward (ties to the lowest index;
    also when it is the only valid one). Examples without a valid response have none.
    """
    num_k = prep.num_responses
    if prep.rewards is None:
        return prep.valid & (jnp.arange(num_k) == 0)[None, :]
    best = jnp.argmax(jnp.where(prep.valid, prep.rewards, -jnp.finfo(jnp.float32).max), axis=-1)
    return prep.valid & (jnp.arange(num_k)[None, :] == best[:, None])
