"""The seam between the model and the losses: ``PreferenceLogps`` in, ``LossOutput`` out (both pytrees), and
``LossSpec``, the typed description of what a loss built by ``make_loss`` needs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

__all__ = ["PreferenceLogps", "LossOutput", "LossSpec"]


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

    A NaN or ±inf in a *valid* slot of any field present (any reference included) is never dropped: the loss and
    that example's ``per_example`` are NaN, and so is the gradient w.r.t. that example's policy log-probs.

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
    * ``per_example [B]``: float32, the loss of each example (0 where ``w_b = 0``). An example with a NaN/±inf in
      a valid slot of its inputs has ``per_example`` NaN (whatever ``w_b``), and then ``loss`` is NaN too.
    * ``metrics``: ``dict[str, scalar]`` of global means (TRL names, see ``rpo_jax.losses.metrics``).
    """

    loss: Any
    per_example: Any
    metrics: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What a loss built by ``make_loss`` needs and how it was configured (``loss_fn.spec``).

    * ``name``: the loss name, or ``"<w>*<name>+<w>*<name>..."`` for a weighted combination.
    * ``requires_reference``: whether the batch must carry ``ref_logps`` (False for reference-free losses).
    * ``requires_rewards``: whether the batch must carry explicit ``rewards``.
    * ``requires_lengths``: whether the batch must carry ``lengths`` (length-normalised losses).
    * ``min_references``: the fewest reference models ``R`` it accepts: 0 (reference-free), 1, or 2 (MRPO).
    * ``num_references``: ``None`` when reference-free or when ``R`` is not fixed (ARWC MRPO, ``alpha=None``);
      else the exact ``R`` it needs: ``len(alpha)`` for MRPO with fixed weights, 2 for MRPO with
      ``arwc="authors_code"``, 1 for single-reference losses.
    * ``hparams``: the resolved hyperparameters of every component, ``{component name: {hparam: value}}``.
    """

    name: str
    requires_reference: bool
    requires_rewards: bool
    requires_lengths: bool
    min_references: int
    num_references: int | None
    hparams: Mapping[str, Mapping[str, Any]]

    def check_reference_count(self, count: int, *, given: str) -> None:
        """Raise ``ValueError`` if ``count`` reference models (supplied by ``given``, e.g. ``"config.references"``)
        do not fit this loss: ``count != num_references`` when that is fixed, else ``count < min_references``.
        Reference-free losses accept any count."""
        if not self.requires_reference:
            return
        if self.num_references is not None:
            if count == self.num_references:
                return
            needed: Any = self.num_references
        else:
            if count >= self.min_references:
                return
            needed = f"at least {self.min_references}"
        raise ValueError(f"loss {self.name!r} needs {needed} references; {given} gives {count}")
