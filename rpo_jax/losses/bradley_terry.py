"""The Bradley–Terry reward-model loss on pairs of scalar scores (pure JAX; used by `config.mode = "reward_model"`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["bradley_terry_per_pair", "bradley_terry_loss"]


def bradley_terry_per_pair(
    chosen: jax.Array, rejected: jax.Array, *, center_coefficient: float = 0.0, margin: jax.Array | float | None = None
) -> jax.Array:
    """Per-pair Bradley–Terry losses `ℓ_p = −log σ(s_c,p − s_r,p − m_p) + λ·(s_c,p + s_r,p)²`.

    Args:
        chosen: `[P]` scores `s_c` of the chosen responses.
        rejected: `[P]` scores `s_r` of the rejected responses.
        center_coefficient: λ, TRL's `center_rewards_coefficient`.
        margin: m, a scalar or `[P]`; `None`: 0.

    Returns:
        `[P]` float32 losses.
    """
    chosen = jnp.asarray(chosen, jnp.float32)
    rejected = jnp.asarray(rejected, jnp.float32)
    diff = chosen - rejected
    if margin is not None:
        diff = diff - jnp.asarray(margin, jnp.float32)
    loss = -jax.nn.log_sigmoid(diff)
    if center_coefficient:
        loss = loss + center_coefficient * jnp.square(chosen + rejected)
    return loss


def bradley_terry_loss(
    chosen: jax.Array,
    rejected: jax.Array,
    weight: jax.Array,
    *,
    center_coefficient: float = 0.0,
    margin: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The Bradley–Terry reward-model loss over P pairs (scores s_c = chosen [P], s_r = rejected [P]).

        ℓ_p  = −log σ(s_c,p − s_r,p − m_p) + λ·(s_c,p + s_r,p)²
        loss = Σ_p w_p ℓ_p / Σ_p w_p                   (0 when Σ_p w_p = 0)

    Args:
        chosen: `[P]` scores `s_c` of the chosen responses.
        rejected: `[P]` scores `s_r` of the rejected responses.
        weight: `[P]` ≥ 0 (0 for padding pairs).
        center_coefficient: λ, TRL's `center_rewards_coefficient` (keeps scores centred at 0).
        margin: m, a scalar or `[P]` (`None`: 0), the optional margin of Llama 2's reward models.

    Returns:
        `(loss, metrics)`: the scalar loss and the same weighted means of `accuracy` `[s_c > s_r]` (ties count as
        wrong), `margin` `s_c − s_r`, `chosen_score` `s_c`, `rejected_score` `s_r`, and `pairs` `Σ w`.
    """
    chosen = jnp.asarray(chosen, jnp.float32)
    rejected = jnp.asarray(rejected, jnp.float32)
    weight = jnp.asarray(weight, jnp.float32)
    total = jnp.sum(weight)
    denom = jnp.where(total > 0, total, 1.0)

    def mean(x):
        return jnp.sum(weight * x) / denom

    per_pair = bradley_terry_per_pair(chosen, rejected, center_coefficient=center_coefficient, margin=margin)
    metrics = {
        "accuracy": mean((chosen > rejected).astype(jnp.float32)),
        "margin": mean(chosen - rejected),
        "chosen_score": mean(chosen),
        "rejected_score": mean(rejected),
        "pairs": total,
    }
    return mean(per_pair), metrics
