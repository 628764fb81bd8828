"""TRL's other ``DPOTrainer`` loss types, on the same ``PreferenceLogps``.

Semantics and hyperparameter names mirror ``trl.DPOTrainer._compute_loss`` of TRL's current (1.x) trainer — the
one with ``loss_type`` lists, ``loss_weights``, ``completion_mask``, ``ld_alpha`` and ``f_divergence_type`` — as
read in November 2026 (through a vendored copy of that file; ``sigmoid_norm`` from TRL main-branch code quoted for
TRL 1.7.0), with ``f_divergence_type="reverse_kl"``, no WPO weighting and no ``ld_alpha``. In TRL's notation, with
``c = ℓ_θ(y_w) − ℓ_ref(y_w)`` (``chosen_scores``), ``r = ℓ_θ(y_l) − ℓ_ref(y_l)`` and ``δ = c − r``:

================  ===========================================================================  ======================
name              per-pair loss                                                                hyperparameters
================  ===========================================================================  ======================
``hinge``         ``relu(1 − β δ)``                                                            beta
``robust``        ``(−(1−ε) log σ(βδ) + ε log σ(−βδ)) / (1 − 2ε)``                            beta, label_smoothing
``exo_pair``      ``σ(βδ)(log σ(βδ) − log(1−ε)) + σ(−βδ)(log σ(−βδ) − log ε)``                 beta, label_smoothing
``nca_pair``      ``−log σ(βc) − ½ log σ(−βc) − ½ log σ(−βr)``                                 beta
``bco_pair``      ``−log σ(βc) − log σ(−βr)``                                                  beta
``sppo_hard``     ``(c − 1/(2β))² + (r + 1/(2β))²``                                            beta
``aot``           ``−(1−ε) log σ(β Δ_s) − ε log σ(−β Δ_s)``, Δ_s = sort(ℓ_θ(y_w)−ℓ_θ(y_l)) −
                  sort(ℓ_ref(y_w)−ℓ_ref(y_l)) over the batch                                   beta, label_smoothing
``aot_unpaired``  same with Δ_s = sort(c) − sort(r) over the batch                             beta, label_smoothing
``apo_zero``      ``1 − σ(βc) + σ(βr)``                                                        beta
``apo_down``      ``σ(βc) + 1 − σ(βδ)``                                                        beta
``discopop``      ``−log σ(βδ)·(1 − σ(βδ/τ)) + exp(−βδ)·σ(βδ/τ)``                              beta, discopop_tau
``sft``           ``−Σ_b ℓ_θ(y_w) / Σ_b |y_w|`` (token-mean NLL of the chosen responses)        —
``sigmoid_norm``  ``−log σ(β (c/|y_w| − r/|y_l|))`` (lengths clamped at 1)                     beta
================  ===========================================================================  ======================

Differences from TRL, all deliberate: ``discopop``'s ``exp(−βδ)·σ(βδ/τ)`` is evaluated as
``exp(log σ(βδ/τ) − βδ)`` so that large negative δ stays finite; ``aot``/``aot_unpaired`` sort over the *global*
batch under ``axis_name`` (TRL sorts per device), and their ``per_example`` entries are indexed by sorted rank;
``sft`` is the token-mean over the global batch, reported as the same scalar for every example (as TRL does).
For ``K > 2`` (with rewards) every loss averages over the preferred pairs ``r*_i > r*_j``; ``aot``,
``aot_unpaired`` and ``sft`` use one pair per example, the best against the worst valid response.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from rpo_jax.losses.batch import PreparedBatch, best_worst_pair_mask, chosen_slot_mask, preference_pair_mask
from rpo_jax.losses.metrics import ComponentResult, global_sum
from rpo_jax.losses.references import primary_reference
from rpo_jax.losses.rpo import pair_mean

__all__ = ["PAIR_LOSSES", "pair_loss", "aot_loss", "sft_loss", "sigmoid_norm_loss"]

log_sigmoid = jax.nn.log_sigmoid
sigmoid = jax.nn.sigmoid

# (chosen_scores, rejected_scores, hparams) -> per-pair loss; broadcasting arrays.
PairFn = Callable[[jax.Array, jax.Array, dict], jax.Array]


def _hinge(c, r, hp):
    return jax.nn.relu(1.0 - hp["beta"] * (c - r))


def _robust(c, r, hp):
    beta, eps = hp["beta"], hp["label_smoothing"]
    z = beta * (c - r)
    return (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def _exo_pair(c, r, hp):
    beta, eps = hp["beta"], hp["label_smoothing"]
    z = beta * (c - r)
    log_qw, log_ql = log_sigmoid(z), log_sigmoid(-z)
    return jnp.exp(log_qw) * (log_qw - jnp.log1p(-eps)) + jnp.exp(log_ql) * (log_ql - jnp.log(eps))


def _nca_pair(c, r, hp):
    beta = hp["beta"]
    return -log_sigmoid(beta * c) - 0.5 * log_sigmoid(-beta * c) - 0.5 * log_sigmoid(-beta * r)


def _bco_pair(c, r, hp):
    beta = hp["beta"]
    return -log_sigmoid(beta * c) - log_sigmoid(-beta * r)


def _sppo_hard(c, r, hp):
    half_inverse_beta = 0.5 / hp["beta"]
    return jnp.square(c - half_inverse_beta) + jnp.square(r + half_inverse_beta)


def _apo_zero(c, r, hp):
    beta = hp["beta"]
    return (1.0 - sigmoid(beta * c)) + sigmoid(beta * r)


def _apo_down(c, r, hp):
    beta = hp["beta"]
    return sigmoid(beta * c) + (1.0 - sigmoid(beta * (c - r)))


def _discopop(c, r, hp):
    z = hp["beta"] * (c - r)
    tau = hp["discopop_tau"]
    logistic = -log_sigmoid(z) * sigmoid(-z / tau)  # (1 − σ(z/τ)) = σ(−z/τ)
    exponential = jnp.exp(log_sigmoid(z / tau) - z)  # exp(−z)·σ(z/τ), finite for very negative z when τ < 1
    return logistic + exponential


PAIR_LOSSES: dict[str, PairFn] = {
    "hinge": _hinge,
    "robust": _robust,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
}


def _log_ratios(prep: PreparedBatch) -> jax.Array:
    return prep.policy - primary_reference(prep.ref)


def pair_loss(name: str, prep: PreparedBatch, hp: dict, axis_name: str | None = None) -> ComponentResult:
    """A per-pair TRL loss averaged over each example's preferred pairs (one pair for K = 2)."""
    del axis_name
    scores = _log_ratios(prep)
    mask = preference_pair_mask(prep)
    chosen = jnp.where(mask, scores[:, :, None], 0.0)
    rejected = jnp.where(mask, scores[:, None, :], 0.0)
    per_example, weight = pair_mean(PAIR_LOSSES[name](chosen, rejected, hp), mask)
    return ComponentResult(per_example, weight, implicit=hp["beta"] * scores, pair_mask=mask)


def sigmoid_norm_loss(prep: PreparedBatch, hp: dict, axis_name: str | None = None) -> ComponentResult:
    """TRL ``sigmoid_norm``: ``−log σ(β (c/|y_w| − r/|y_l|))`` with log-ratio scores and lengths clamped at 1."""
    del axis_name
    scores = _log_ratios(prep) / jnp.maximum(prep.lengths, 1.0)
    mask = preference_pair_mask(prep)
    delta = jnp.where(mask, scores[:, :, None] - scores[:, None, :], 0.0)
    per_example, weight = pair_mean(-log_sigmoid(hp["beta"] * delta), mask)
    return ComponentResult(per_example, weight, implicit=hp["beta"] * _log_ratios(prep), pair_mask=mask)


def _select(values: jax.Array, one_hot: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(one_hot, values, 0.0), axis=-1)


def _sorted_over_batch(values: jax.Array, has_pair: jax.Array, axis_name: str | None):
    """Sort ``values [B]`` over the (global) batch, examples without a pair last; return this shard's slice
    of the sorted values and of the "is a real entry" mask."""
    sentinel = jnp.finfo(jnp.float32).max
    keyed = jnp.where(has_pair, values, sentinel)
    count = jnp.sum(has_pair)
    if axis_name is not None:
        keyed = jax.lax.all_gather(keyed, axis_name, tiled=True)
        count = jax.lax.psum(count, axis_name)
    ordered = jnp.sort(keyed)
    real = jnp.arange(ordered.shape[0]) < count
    if axis_name is not None:
        local = values.shape[0]
        start = jax.lax.axis_index(axis_name) * local
        ordered = jax.lax.dynamic_slice_in_dim(ordered, start, local)
        real = jax.lax.dynamic_slice_in_dim(real, start, local)
    return jnp.where(real, ordered, 0.0), real


def aot_loss(prep: PreparedBatch, hp: dict, axis_name: str | None = None, *, unpaired: bool = False) -> ComponentResult:
    """TRL ``aot`` / ``aot_unpaired`` (Melnyk et al., arXiv:2406.05882): DPO on batch-sorted log-ratios."""
    mask = best_worst_pair_mask(prep)
    chosen_slot, rejected_slot = jnp.any(mask, axis=2), jnp.any(mask, axis=1)
    has_pair = jnp.any(mask, axis=(1, 2))
    ref = primary_reference(prep.ref)
    if unpaired:
        first = _select(prep.policy - ref, chosen_slot)
        second = _select(prep.policy - ref, rejected_slot)
    else:
        first = _select(prep.policy, chosen_slot) - _select(prep.policy, rejected_slot)
        second = _select(ref, chosen_slot) - _select(ref, rejected_slot)
    first_sorted, real = _sorted_over_batch(first, has_pair, axis_name)
    second_sorted, _ = _sorted_over_batch(second, has_pair, axis_name)
    z = hp["beta"] * (first_sorted - second_sorted)
    eps = hp["label_smoothing"]
    per_example = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    weight = real.astype(jnp.float32)
    return ComponentResult(
        jnp.where(real, per_example, 0.0), weight, implicit=hp["beta"] * (prep.policy - ref), pair_mask=mask
    )


def sft_loss(prep: PreparedBatch, hp: dict, axis_name: str | None = None) -> ComponentResult:
    """TRL ``sft``: token-mean negative log-likelihood of the chosen responses over the (global) batch.

    The chosen response is response 0 without rewards, else the valid response with the highest reward (even
    when it is the only valid one). Examples without a valid chosen response get weight 0.
    """
    del hp
    chosen_slot = chosen_slot_mask(prep)
    has_chosen = jnp.any(chosen_slot, axis=-1)
    nll = -jnp.sum(_select(prep.policy, chosen_slot))
    tokens = jnp.sum(_select(prep.lengths, chosen_slot))
    nll, tokens = global_sum((nll, tokens), axis_name)
    mean_nll = nll / jnp.maximum(tokens, 1.0)
    weight = has_chosen.astype(jnp.float32)
    return ComponentResult(weight * mean_nll, weight, implicit=None, pair_mask=preference_pair_mask(prep))
