"""The seam between the model and the losses: ``PreferenceLogps`` in, ``LossOutput`` out (both pytrees)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

__all__ = ["PreferenceLogps", "LossOutput"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PreferenceLogps:
    """Sequence log-probabilities of ``K`` responses to each of ``B`` prompts (a frozen pytree dataclass).

    Fields (``B`` prompts, ``K`` responses, ``R`` reference models):

    * ``policy_logps [B, K]``: ``Σ_t log π_θ(y_t | x, y_<t)`` over the response tokens.
    * ``ref_logps [B, K]`` or ``[B, K, R]`` (optional): the same under the reference model(s); index 0 of ``R``
      is the primary reference (the policy's initial model). Treated as constants (``stop_gradient``).
    * ``lengths [B, K]`` (optional): number of scored response tokens; needed only by length-normalised losses
      (``ipo``, ``simpo``, ``sigmoid_norm``, ``sft``, ``length_normalize=True``).
    * ``rewards [B, K]`` (optional): explicit rewards ``r*``. When present they decide the preference direction
      (response ``i`` is preferred to ``j`` iff ``r_i > r_j``); when absent ``K`` must be 2 and response 0 is
      the chosen one. Required by reward-aware losses (``rpo_*``, ``rpo_listwise``, ``distill_dpo``, ``rloo``).
    * ``valid [B, K]`` bool (optional): which responses exist. ``None`` means every response exists. Invalid
      responses contribute exactly zero loss and zero gradient, whatever values their slots hold.

    Any float dtype is accepted; every loss upcasts to float32.
    """

    policy_logps: Any
    ref_logps: Any = None
    lengths: Any = None
    rewards: Any = None
    valid: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossOutput:
    """What every loss returns (a pytree, so it can leave ``jit``/``pmap``/``shard_map``).

    * ``loss``: float32 scalar, ``Σ_b w_b·per_example_b / max(Σ_b w_b, 1)``; with ``axis_name`` both sums are
      ``psum``-ed, so it is the mean over the global batch. ``w_b`` is 1 for examples with at least one usable
      pair of responses (at least one valid response for ``sft``), else 0.
    * ``per_example [B]``: float32, the loss of each example (0 where ``w_b = 0``).
    * ``metrics``: ``dict[str, scalar]`` of global means (TRL names, see ``rpo_jax.losses.metrics``).
    """

    loss: Any
    per_example: Any
    metrics: dict[str, Any]
