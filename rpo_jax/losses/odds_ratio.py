"""ORPO and CPO: reference-free pair losses with an NLL term on the chosen response, as TRL's trainers compute them.

Semantics mirror TRL 1.16.0's ``trl.experimental.orpo.ORPOTrainer`` (``odds_ratio_loss``, ``concatenated_forward``,
``get_batch_loss_metrics``) and ``trl.experimental.cpo.CPOTrainer`` (``cpo_loss`` and the same two methods), read
in the installed ``trl/experimental/{orpo,cpo}/*_trainer.py``. With ``ℓ`` a response's summed policy log-prob,
``|y|`` its token count and ``ℓ̄ = ℓ / |y|`` the per-token average (``|y|`` clamped at 1):

**ORPO** (Hong et al. 2024, arXiv:2403.07691), ``beta`` = the paper's λ::

    log_odds = (ℓ̄_w − ℓ̄_l) − (log(1 − e^{ℓ̄_w}) − log(1 − e^{ℓ̄_l}))        (log odds(y_w) − log odds(y_l))
    L        = NLL − β · mean_b log σ(log_odds)

``NLL`` is the token mean of ``−log π_θ`` over the chosen responses of the whole (global) batch. TRL takes it over
the *prompt and response* tokens of each chosen sequence (every non-padding token after the first: its
``cross_entropy_loss`` on ``concatenated_input_ids`` masked by the attention mask), which is
``nll_tokens="sequence"`` (default; reads ``PreferenceLogps.sequence_logps`` / ``sequence_lengths``), also the ORPO
authors' default (``disable_prompt_loss=False``); ``nll_tokens="response"`` uses the response tokens only (the
authors' ``disable_prompt_loss=True``; reads ``policy_logps`` / ``lengths``). ``log(1 − e^x)`` is evaluated as TRL's
``log1mexp`` (branch at −ln 2), at ``min(x, −1e-7)``: TRL's loss is ±inf/NaN when a response's average log-prob
is 0 (every token at probability 1 in float32); here it stays finite, identical elsewhere.

Metrics (TRL's names): ``rewards/chosen`` = ``β·ℓ̄_w``, ``rewards/rejected`` = ``β·ℓ̄_l``, ``rewards/margins``,
``rewards/accuracies``; ``logps/chosen``, ``logps/rejected`` are the *averages* ``ℓ̄`` (as TRL logs them);
``nll_loss``; ``log_odds_ratio`` = mean ``log σ(log_odds)``; ``log_odds_chosen`` = mean ``log_odds``.

**CPO** (Xu et al. 2024, arXiv:2401.08417) with TRL's ``loss_type`` variants, reference-free. The score of a
response is ``s = ℓ̄`` for ``ipo`` and ``simpo`` (TRL's ``average_log_prob``), else ``s = ℓ``; with AlphaPO
(Gupta et al. 2025, arXiv:2501.03884; ``alpha ≠ 0``) it becomes ``s = (1 − p^{−α})/α`` with ``p = e^{s}``,
evaluated as ``−expm1(−α s)/α``. With ``z = s_w − s_l``:

===========  ===============================================================================================
loss_type    per-pair loss
===========  ===============================================================================================
``sigmoid``  ``−(1−ε) log σ(β z) − ε log σ(−β z)``   (CPO Eq. 3 at ε = 0)
``simpo``    the same with ``z − γ/β``  (SimPO's margin γ = ``simpo_gamma``; at γ = 0 it is ``sigmoid`` on ``ℓ̄``)
``hinge``    ``relu(1 − β z)``
``ipo``      ``(z − 1/(2β))²``
===========  ===============================================================================================

``L = mean_b loss + cpo_alpha · NLL`` with ``NLL`` the token mean of ``−log π_θ`` over the chosen *responses* of the
(global) batch (TRL's ``cross_entropy_loss`` on the prompt-masked labels). TRL's ``loss_type="alphapo"`` is
``loss_type="simpo", cpo_alpha=0`` with ``alpha ≠ 0``. Metrics: ``rewards/chosen`` = ``β·s_w``,
``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``/``logps/rejected`` = the
log-probs the loss uses (averages for ``ipo``/``simpo``), ``nll_loss``. Float32 overflow: AlphaPO's ``e^{−α s}``
overflows when ``α·|s| > 88`` (TRL's ``p^{−α}`` already at ``s < −103``, ``p`` underflowing to 0), so use it with
averaged log-probs (``simpo``/``ipo``) as AlphaPO does.

For K > 2 (with rewards) the pair term averages over each example's preferred pairs ``r*_i > r*_j`` and the NLL
is over each example's best valid response; an example without a pair has weight 0 (its chosen response still
counts in the batch's NLL token mean when it has one). Not in TRL: the model-level metrics ``logits/chosen``,
``logits/rejected`` (mean logits), which the trainer reports if it wants them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rpo_jax.losses.batch import PreparedBatch, chosen_slot_mask, preference_pair_mask
from rpo_jax.losses.metrics import ComponentResult, global_sum
from rpo_jax.losses.rpo import pair_mean

__all__ = ["CPO_LOSS_TYPES", "NLL_TOKENS", "MAX_AVERAGE_LOGP", "log1mexp", "chosen_nll", "orpo_loss", "cpo_loss"]

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
NLL_TOKENS = ("sequence", "response")
#: ``log(1 − e^x)`` is evaluated at ``min(x, MAX_AVERAGE_LOGP)`` (finite where TRL's is −inf).
MAX_AVERAGE_LOGP = -1e-7

log_sigmoid = jax.nn.log_sigmoid


def log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 − e^x)`` for ``x < 0``, stable on both sides of ``−ln 2`` (Mächler 2012), at ``min(x, −1e-7)``."""
    x = jnp.minimum(x, MAX_AVERAGE_LOGP)
    return jnp.where(x < -math.log(2.0), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def chosen_nll(prep: PreparedBatch, axis_name: str | None, *, sequence: bool) -> jax.Array:
    """The token-mean NLL of the chosen responses (``batch.chosen_slot_mask``) over the global batch.

    ``sequence=True``: over their prompt + response tokens (``prep.sequence`` / ``prep.sequence_lengths``), else
    over their response tokens (``prep.policy`` / ``prep.lengths``). 0 when there is no token.
    """
    slot = chosen_slot_mask(prep)
    logps, counts = (prep.sequence, prep.sequence_lengths) if sequence else (prep.policy, prep.lengths)
    nll = -jnp.sum(jnp.where(slot, logps, 0.0))
    tokens = jnp.sum(jnp.where(slot, counts, 0.0))
    nll, tokens = global_sum((nll, tokens), axis_name)
    return nll / jnp.maximum(tokens, 1.0)


def _average_logps(prep: PreparedBatch) -> jax.Array:
    return prep.policy / jnp.maximum(prep.lengths, 1.0)


def _pairs(values: jax.Array, mask: jax.Array, fill: float) -> tuple[jax.Array, jax.Array]:
    """(chosen [B, K, K], rejected [B, K, K]) of ``values [B, K]`` over the pairs of ``mask``, ``fill`` elsewhere
    (a value at which every formula and its gradient is finite, so masked pairs cannot leak NaN)."""
    chosen = jnp.where(mask, values[:, :, None], fill)
    rejected = jnp.where(mask, values[:, None, :], fill)
    return chosen, rejected


def orpo_loss(prep: PreparedBatch, hp: dict, axis_name: str | None = None) -> ComponentResult:
    """ORPO (module docstring): ``NLL − β · log σ(log odds ratio)`` per example (NLL: one global scalar)."""
    beta = hp["beta"]
    average = _average_logps(prep)
    mask = preference_pair_mask(prep)
    chosen, rejected = _pairs(average, mask, -1.0)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio, weight = pair_mean(log_sigmoid(log_odds), mask)
    odds, _ = pair_mean(log_odds, mask)
    nll = chosen_nll(prep, axis_name, sequence=hp["nll_tokens"] == "sequence")
    per_example = weight * nll - beta * ratio
    extra = {"nll_loss": (weight * nll, weight), "log_odds_ratio": (ratio, weight), "log_odds_chosen": (odds, weight)}
    return ComponentResult(per_example, weight, implicit=beta * average, pair_mask=mask, extra=extra, logps=average)


def alphapo_scores(logps: jax.Array, alpha: float) -> jax.Array:
    """AlphaPO's reward shape ``(1 − p^{−α})/α`` of ``p = e^{logps}``, as ``−expm1(−α·logps)/α`` (``alpha ≠ 0``)."""
    return -jnp.expm1(-alpha * logps) / alpha


def _cpo_pair_loss(z: jax.Array, hp: dict) -> jax.Array:
    beta, eps, loss_type = hp["beta"], hp["label_smoothing"], hp["loss_type"]
    if loss_type == "simpo":
        z = z - hp["simpo_gamma"] / beta
    if loss_type in ("sigmoid", "simpo"):
        return -(1.0 - eps) * log_sigmoid(beta * z) - eps * log_sigmoid(-beta * z)
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * z)
    if loss_type == "ipo":
        return jnp.square(z - 1.0 / (2.0 * beta))
    raise ValueError(f"unknown CPO loss_type {loss_type!r}; expected one of {list(CPO_LOSS_TYPES)}")


def cpo_loss(prep: PreparedBatch, hp: dict, axis_name: str | None = None) -> ComponentResult:
    """CPO / SimPO / AlphaPO as TRL's ``CPOTrainer`` (module docstring): pair loss + ``cpo_alpha · NLL``."""
    averaged = hp["loss_type"] in ("ipo", "simpo")
    logps = _average_logps(prep) if averaged else prep.policy
    scores = logps if hp["alpha"] == 0.0 else alphapo_scores(logps, hp["alpha"])
    mask = preference_pair_mask(prep)
    chosen, rejected = _pairs(scores, mask, 0.0)
    pair_loss, weight = pair_mean(_cpo_pair_loss(chosen - rejected, hp), mask)
    if hp["cpo_alpha"] == 0.0:
        nll = jnp.zeros((), jnp.float32)  # TRL skips the NLL (and logs 0) when cpo_alpha is 0
    else:
        nll = chosen_nll(prep, axis_name, sequence=False)
    per_example = pair_loss + hp["cpo_alpha"] * weight * nll
    extra = {"nll_loss": (weight * nll, weight)}
    return ComponentResult(per_example, weight, implicit=hp["beta"] * scores, pair_mask=mask, extra=extra, logps=logps)
