"""The general RPO form (Sun et al., arXiv:2502.00203): implicit reward gap ``a``, target gap ``b``, distance D.

    r_θ(x, y) = β · (ℓ_θ(y|x) − ℓ_ref(y|x))          implicit reward (÷|y| when length-normalised;
                                                      ℓ_ref = 0 when reference-free)
    a_ij = r_θ(x, y_i) − r_θ(x, y_j) − γ              implicit gap (γ: optional margin, SimPO)
    b_ij = η · (r*(x, y_i) − r*(x, y_j))              target gap (or a constant, e.g. +∞ for DPO)
    L    = mean over the pairs (i, j) of D(a_ij ‖ b_ij)

Pairwise losses take a ``[B, K, K]`` pair mask: all valid ordered pairs ``i ≠ j`` for reward-aware losses (every
distance here is symmetric, ``D(a‖b) = D(−a‖−b)``, so this equals the mean over unordered pairs), or the
preferred pairs for preference-only losses. The listwise loss is ``KL(softmax(η r*) ‖ softmax(r_θ))`` over the
valid responses; at ``K = 2`` it equals pairwise ``bwd_kl`` exactly.

Every function is elementwise-safe: masked pairs/responses contribute exactly zero value and zero gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rpo_jax.losses.distances import Distance

__all__ = [
    "implicit_rewards",
    "pairwise_differences",
    "pair_mean",
    "rpo_pairwise",
    "masked_log_softmax",
    "rpo_listwise",
]


def implicit_rewards(
    policy_logps: jax.Array,
    ref_logps: jax.Array | None,
    lengths: jax.Array | None,
    *,
    beta: float,
    length_normalize: bool = False,
) -> jax.Array:
    """Implicit rewards `r_θ = β · (ℓ_θ − ℓ_ref) / (|y| if length_normalize else 1)`.

    Lengths are clamped at 1 (as TRL does), so empty responses give a finite reward.

    Args:
        policy_logps: `[B, K]` sequence log-probs `ℓ_θ` of the policy.
        ref_logps: `[B, K]` sequence log-probs `ℓ_ref` of the reference; `None`: reference-free.
        lengths: `[B, K]` response token counts `|y|` (needed with `length_normalize`).
        beta: β > 0.
        length_normalize: divide by `|y|`.

    Returns:
        `[B, K]` float32 implicit rewards.
    """
    log_ratio = policy_logps if ref_logps is None else policy_logps - ref_logps
    if length_normalize:
        log_ratio = log_ratio / jnp.maximum(lengths, 1.0)
    return beta * log_ratio


def pairwise_differences(values: jax.Array) -> jax.Array:
    """``[B, K] → [B, K, K]`` with entry ``(i, j) = values_i − values_j``."""
    return values[:, :, None] - values[:, None, :]


def pair_mean(pair_values: jax.Array, pair_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean of ``pair_values [B, K, K]`` over ``pair_mask``: ``(per_example [B], weight [B])``.

    ``weight`` is 1.0 for examples with at least one pair, else 0.0 (their ``per_example`` is exactly 0).
    """
    num_pairs = jnp.sum(pair_mask, axis=(1, 2)).astype(jnp.float32)
    total = jnp.sum(jnp.where(pair_mask, pair_values, 0.0), axis=(1, 2))
    return total / jnp.maximum(num_pairs, 1.0), (num_pairs > 0).astype(jnp.float32)


def rpo_pairwise(
    implicit: jax.Array, target_gap: jax.Array, pair_mask: jax.Array, distance: Distance, *, margin: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Pairwise RPO: `mean_{(i,j) ∈ mask} D(r_i − r_j − margin ‖ b_ij)`.

    Args:
        implicit: `[B, K]` implicit rewards `r_θ`.
        target_gap: `[B, K, K]` targets `b_ij` (or anything broadcastable to it, e.g. a scalar `+∞`).
        pair_mask: `[B, K, K]` bool, the pairs to average over.
        distance: one of `rpo_jax.losses.distances`.
        margin: `γ` subtracted from every gap (SimPO's target margin).

    Returns:
        `(per_example [B], weight [B])`.
    """
    gaps = pairwise_differences(implicit) - margin
    target = jnp.broadcast_to(jnp.asarray(target_gap, jnp.float32), gaps.shape)
    safe_gaps = jnp.where(pair_mask, gaps, 0.0)
    safe_target = jnp.where(pair_mask, target, 0.0)
    return pair_mean(distance(safe_gaps, safe_target), pair_mask)


def masked_log_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """``log_softmax`` over the last axis restricted to ``mask``; exactly 0 (not −∞) at masked entries.

    Finite in value and gradient for any mask, including an all-False row.
    """
    safe = jnp.where(mask, logits, 0.0)
    shift = jax.lax.stop_gradient(jnp.max(jnp.where(mask, safe, -jnp.inf), axis=-1, keepdims=True))
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
    total = jnp.sum(jnp.where(mask, jnp.exp(safe - shift), 0.0), axis=-1, keepdims=True)
    log_norm = jnp.log(jnp.where(total > 0, total, 1.0)) + shift
    return jnp.where(mask, safe - log_norm, 0.0)


def rpo_listwise(implicit: jax.Array, target_logits: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Listwise RPO: `KL(p* ‖ q)` with `p* = softmax_k(target_logits)`, `q = softmax_k(implicit)`.

    Both softmaxes run over the valid responses only (NeMo-Aligner PR #311).

    Args:
        implicit: `[B, K]` implicit rewards `r_θ`.
        target_logits: `[B, K]`, `η r*`.
        valid: `[B, K]` bool, which responses exist.

    Returns:
        `(per_example [B], weight [B])`; weight is 1 where at least two responses are valid.
    """
    log_q = masked_log_softmax(implicit, valid)
    log_p = masked_log_softmax(target_logits, valid)
    p = jnp.where(valid, jnp.exp(log_p), 0.0)
    kl = jnp.sum(jnp.where(valid, p * (log_p - log_q), 0.0), axis=-1)
    has_pair = jnp.sum(valid, axis=-1) >= 2
    return jnp.where(has_pair, kl, 0.0), has_pair.astype(jnp.float32)
