"""What a loss component reports (``ComponentResult``) and its reduction to global-mean metrics (TRL names).

Metric names and meanings (all means over the global batch under ``axis_name``):

* ``rewards/chosen``, ``rewards/rejected``: implicit rewards ``r_θ`` (β-scaled, as the loss defines them) of the
  preferred / dispreferred response, averaged over the example's preference pairs, then over examples.
* ``rewards/margins``: ``rewards/chosen − rewards/rejected``.
* ``rewards/accuracies``: K = 2: fraction of pairs with ``r_θ(chosen) > r_θ(rejected)`` (TRL); K > 2: fraction of
  examples whose argmax implicit reward is the argmax explicit reward (over valid responses).
* ``logps/chosen``, ``logps/rejected``: policy sequence log-probs of the preferred / dispreferred responses (the
  summed log-probs, or the log-probs the loss compares when it says so: ``orpo``'s and length-normalised ``cpo``'s
  per-token averages, as TRL logs them).
* ``rewards/gap_correlation`` (reward-aware losses only): Pearson correlation between implicit gaps
  ``r_θ(y_i) − r_θ(y_j)`` and explicit gaps ``r*(y_i) − r*(y_j)`` over all valid ordered pairs in the global batch
  (ordered pairs make both gap distributions symmetric, so their means are exactly 0 and the correlation is
  ``Σxy / √(Σx² Σy²)``; 0 when undefined).

Preference pairs: ``r*_i > r*_j`` with rewards, ``(0, 1)`` without. Examples without a preference pair are left out
of these means.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from rpo_jax.losses.batch import PreparedBatch, all_pairs_mask
from rpo_jax.losses.rpo import pair_mean, pairwise_differences

__all__ = ["ComponentResult", "global_mean", "global_sum", "preference_metrics"]


@dataclasses.dataclass(frozen=True)
class ComponentResult:
    """One loss's raw output before the batch reduction.

    * ``per_example [B]`` and ``weight [B]`` (0/1): the loss is ``Σ w·per_example / max(Σ w, 1)``.
    * ``implicit [B, K]`` or ``None``: implicit rewards for the ``rewards/*`` metrics (``None``: not reported).
    * ``pair_mask [B, K, K]``: the preference pairs the chosen/rejected metrics average over.
    * ``reward_aware``: also report ``rewards/gap_correlation``.
    * ``extra``: more metrics, ``name → (values [B], weights [B])``.
    * ``logps [B, K]`` or ``None``: the log-probs the ``logps/*`` metrics report (``None``: the summed policy
      log-probs ``prep.policy``).
    """

    per_example: jax.Array
    weight: jax.Array
    implicit: jax.Array | None
    pair_mask: jax.Array
    reward_aware: bool = False
    extra: dict[str, tuple[jax.Array, jax.Array]] = dataclasses.field(default_factory=dict)
    logps: jax.Array | None = None


def global_sum(value: Any, axis_name: str | None) -> Any:
    """``value`` summed over the named axis (a no-op without ``axis_name``)."""
    return value if axis_name is None else jax.lax.psum(value, axis_name)


def global_mean(values: jax.Array, weights: jax.Array, axis_name: str | None) -> jax.Array:
    """``Σ w·v / max(Σ w, 1)`` with both sums ``psum``-ed over ``axis_name`` (a true global weighted mean)."""
    numerator = jnp.sum(jnp.where(weights > 0, values * weights, 0.0))
    denominator = jnp.sum(weights)
    numerator, denominator = global_sum((numerator, denominator), axis_name)
    return numerator / jnp.maximum(denominator, 1.0)


def _argmax_valid(values: jax.Array, valid: jax.Array) -> jax.Array:
    return jnp.argmax(jnp.where(valid, values, -jnp.finfo(jnp.float32).max), axis=-1)


def preference_metrics(result: ComponentResult, prep: PreparedBatch, axis_name: str | None) -> dict[str, jax.Array]:
    """The TRL-named metrics (see the module docstring) of one component, as global means."""
    sg = jax.lax.stop_gradient
    implicit = None if result.implicit is None else sg(result.implicit)
    policy = sg(prep.policy if result.logps is None else result.logps)
    rewards = None if prep.rewards is None else sg(prep.rewards)
    mask = result.pair_mask
    ones = jnp.ones_like(mask, jnp.float32)
    metrics: dict[str, jax.Array] = {}

    def chosen_rejected(values: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        chosen, has_pair = pair_mean(values[:, :, None] * ones, mask)
        rejected, _ = pair_mean(values[:, None, :] * ones, mask)
        return chosen, rejected, has_pair

    if implicit is not None:
        chosen, rejected, has_pair = chosen_rejected(implicit)
        metrics["rewards/chosen"] = global_mean(chosen, has_pair, axis_name)
        metrics["rewards/rejected"] = global_mean(rejected, has_pair, axis_name)
        metrics["rewards/margins"] = global_mean(chosen - rejected, has_pair, axis_name)
        if prep.num_responses == 2:
            correct = (pairwise_differences(implicit) > 0).astype(jnp.float32)
            accuracy, _ = pair_mean(correct, mask)
        else:
            same = _argmax_valid(implicit, prep.valid) == _argmax_valid(rewards, prep.valid)
            accuracy = same.astype(jnp.float32)
        metrics["rewards/accuracies"] = global_mean(accuracy, has_pair, axis_name)
        if result.reward_aware and rewards is not None:
            pairs = all_pairs_mask(prep.valid)
            implicit_gaps = jnp.where(pairs, pairwise_differences(implicit), 0.0)
            explicit_gaps = jnp.where(pairs, pairwise_differences(rewards), 0.0)
            sums = (jnp.sum(implicit_gaps * explicit_gaps), jnp.sum(implicit_gaps**2), jnp.sum(explicit_gaps**2))
            cross, implicit_sq, explicit_sq = global_sum(sums, axis_name)
            denominator = jnp.sqrt(implicit_sq) * jnp.sqrt(explicit_sq)
            metrics["rewards/gap_correlation"] = jnp.where(
                denominator > 0, cross / jnp.where(denominator > 0, denominator, 1.0), 0.0
            )

    chosen_logps, rejected_logps, has_pair = chosen_rejected(policy)
    metrics["logps/chosen"] = global_mean(chosen_logps, has_pair, axis_name)
    metrics["logps/rejected"] = global_mean(rejected_logps, has_pair, axis_name)
    for name, (values, weights) in result.extra.items():
        metrics[name] = global_mean(sg(values), weights, axis_name)
    return metrics
