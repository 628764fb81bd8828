"""The seam between the model and the losses: ``PreferenceLogps`` in, ``LossOutput`` out (both pytrees), and
``LossSpec``, the typed description of what a loss built by ``make_loss`` needs; ``UnpairedLogps`` and
``BCOState`` for the losses of single labelled completions (KTO, BCO)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["PreferenceLogps", "UnpairedLogps", "BCOState", "LossOutput", "LossSpec"]


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
    * ``sequence_logps [B, K]`` (optional): ``Σ_t log π_θ`` over *every* predicted token of the prompt + response
      sequence (each non-padding token after the first), and ``sequence_lengths [B, K]`` that token count. Only
      ``orpo`` with ``nll_tokens="sequence"`` (its default, as TRL's ``ORPOTrainer``) reads them, for its NLL term.

    A NaN or ±inf in a *valid* slot of any field present (any reference included) is never dropped: the loss and
    that example's ``per_example`` are NaN, and so is the gradient w.r.t. that example's policy log-probs.

    Any float dtype is accepted; every loss upcasts to float32.
    """

    policy_logps: Any
    ref_logps: Any = None
    lengths: Any = None
    rewards: Any = None
    valid: Any = None
    sequence_logps: Any = None
    sequence_lengths: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UnpairedLogps:
    """Sequence log-probabilities of ``B`` single completions, each labelled desirable or undesirable (TRL's
    *unpaired preference* data: ``{prompt, completion, label}``), for ``kto``, ``apo_zero_unpaired`` and ``bco``.

    Fields (all ``[B]``):

    * ``policy_logps``: ``Σ_t log π_θ(y_t | x, y_<t)`` over the completion's tokens (a sum, as TRL's KTO and BCO).
    * ``labels`` bool: True for a desirable completion (TRL's ``label``), False for an undesirable one.
    * ``ref_logps`` (optional): the same under the reference model; treated as a constant.
    * ``kl_policy_logps``, ``kl_ref_logps`` (optional): ``Σ_t log π(y'_t | x, y'_<t)`` of a *mismatched*
      completion ``y'`` (another example's completion under this example's prompt) under the policy and the
      reference; KTO's KL reference point is estimated from them (TRL pairs prompt ``i`` with completion ``i − 1``
      of the same batch, the first with the last). Constants as well (TRL scores them without gradient).
    * ``valid`` bool (optional): which rows are real (``None``: all). Padding rows contribute exactly zero loss and
      gradient and are left out of the KL estimate and of BCO's running mean, whatever their slots hold.

    A NaN or ±inf in a valid row of any field present makes the loss and that row's ``per_example`` NaN, like
    ``PreferenceLogps``. Any float dtype is accepted; every loss upcasts to float32.
    """

    policy_logps: Any
    labels: Any
    ref_logps: Any = None
    kl_policy_logps: Any = None
    kl_ref_logps: Any = None
    valid: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BCOState:
    """BCO's running moments of the implicit rewards (TRL's ``RunningMoments``), carried from step to step.

    ``mean`` is the reward shift δ of the BCO loss; ``var`` the running (biased) variance; ``count`` the number of
    rewards seen, starting at ``1e-24`` as TRL's (so the first batch's mean replaces the initial 0). Float32
    scalars: ``count`` is exact up to 2**24 rewards, after which the update weights ``n / (count + n)`` round
    (TRL keeps Python floats). ``loss_fn.init_state()`` of a ``bco`` loss gives the initial state.
    """

    mean: Any
    var: Any
    count: Any

    @classmethod
    def initial(cls) -> "BCOState":
        """TRL's initial moments: mean 0, variance 1, count 1e-24."""
        return cls(jnp.float32(0.0), jnp.float32(1.0), jnp.float32(1e-24))

    @property
    def std(self):
        """The running unbiased standard deviation, ``sqrt(var · count / (count − 1))`` (as TRL's ``std``)."""
        return jnp.sqrt(self.var * self.count / (self.count - 1.0))


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
    * ``state``: the loss's new state for a stateful loss (``bco``: a ``BCOState``), else ``None``.

    Unpaired losses (``kto``, ``apo_zero_unpaired``, ``bco``) have one row per completion: ``per_example [B]`` is
    each completion's weighted loss and ``w_b`` is 1 for every valid row.
    """

    loss: Any
    per_example: Any
    metrics: dict[str, Any]
    state: Any = None


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
    * ``requires_sequence_logps``: whether the batch must carry ``sequence_logps`` and ``sequence_lengths``
      (``orpo``'s NLL over prompt + response tokens).
    * ``unpaired``: the loss takes an ``UnpairedLogps`` (single labelled completions), not a ``PreferenceLogps``.
    * ``requires_kl_logps``: whether the (unpaired) batch must carry ``kl_policy_logps`` and ``kl_ref_logps``.
    * ``stateful``: the loss takes a state and returns the next one (``loss_fn(batch, state)``, ``LossOutput.state``;
      ``loss_fn.init_state()`` gives the first).
    """

    name: str
    requires_reference: bool
    requires_rewards: bool
    requires_lengths: bool
    min_references: int
    num_references: int | None
    hparams: Mapping[str, Mapping[str, Any]]
    requires_sequence_logps: bool = False
    unpaired: bool = False
    requires_kl_logps: bool = False
    stateful: bool = False

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
