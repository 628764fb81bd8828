"""KTO, APO-zero (unpaired) and BCO: losses of single completions labelled desirable or undesirable.

Input: ``UnpairedLogps`` (``[B]`` rows, one completion each, summed log-probs). Semantics mirror TRL 1.16.0's
``trl.KTOTrainer._compute_loss`` (``trl/trainer/kto_trainer.py``; ``loss_type`` ``"kto"`` and
``"apo_zero_unpaired"``) and, for BCO, TRL's ``BCOTrainer.bco_loss`` / ``RunningMoments`` as last shipped in
``trl/experimental/bco/bco_trainer.py`` (huggingface/trl commit ``3b0ecdf8``, June 2026; TRL 1.16.0 no longer ships a
BCO trainer). With the log-ratio ``ρ = ℓ_θ(y|x) − ℓ_ref(y|x)`` of each row:

**KTO** (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7 as TRL computes it)::

    z₀ = max(0, stop_gradient(mean_b [ℓ_θ(y'_b|x_b) − ℓ_ref(y'_b|x_b)]))      (the KL reference point)
    desirable:    w_D · (1 − σ(β (ρ − z₀)))
    undesirable:  w_U · (1 − σ(β (z₀ − ρ)))
    L = mean over all rows (weighted terms summed, divided by the number of rows, as TRL's ``losses.nanmean()``)

``y'_b`` is a mismatched completion for prompt ``x_b`` (TRL: the completion of row ``b − 1`` of the same batch, row
0 taking the last row's; ``kl_policy_logps``/``kl_ref_logps``). The mean runs over the valid rows of the global
batch (TRL: the mean of each process's batch mean, the same when every process holds as many rows). ``beta``,
``desirable_weight`` (w_D), ``undesirable_weight`` (w_U) as ``KTOConfig``.

**APO-zero, unpaired** (D'Oosterlinck et al. 2024, arXiv:2408.06266; TRL's KTO ``loss_type="apo_zero_unpaired"``,
the only way TRL skips the KL term): desirable ``w_D·(1 − σ(βρ))``, undesirable ``w_U·σ(βρ)`` — KTO with ``z₀ = 0``
(``1 − σ(β(0 − ρ)) = σ(βρ)``), and no mismatched completions are needed.

**BCO** (Jung et al. 2024, arXiv:2404.04656) without UDM: rewards ``r = βρ``; the running moments of all rewards
seen so far (TRL's ``RunningMoments``, Chan et al.'s parallel update) are updated with this batch's rewards
*first*, then ``δ`` = the running mean::

    desirable: −log σ(r − δ)        undesirable: −log σ(−(r − δ))        L = mean over all rows

The moments are explicit state (``BCOState``): ``loss_fn(batch, state) → LossOutput(..., state=next)``, with
``update_state=False`` for evaluation (TRL's ``do_train=False``: δ is the current mean, the state unchanged). A
batch without a valid row leaves the state unchanged. Under ``axis_name`` the batch moments are global (TRL's
``get_global_statistics``). **UDM is not implemented**: its density-ratio weights come from a logistic-regression
classifier fitted (scikit-learn, on the host) on prompt embeddings of a separate embedding model over the whole
dataset before training — neither a function of log-probs nor of one batch, so it does not fit a pure loss. It
would enter as per-row weights of the undesirable terms, computed by the data pipeline.

Metrics (TRL's names, global means over the rows of each label; 0 for a label with no row): ``rewards/chosen``,
``rewards/rejected`` (``β·ρ`` of the desirable / undesirable rows), ``rewards/margins`` (their difference),
``logps/chosen``, ``logps/rejected`` (summed policy log-probs), ``count/chosen``, ``count/rejected`` (global row
counts: TRL skips a label's metrics in a step without rows of it, and ``rewards/margins`` unless both have rows),
and ``kl`` (KTO: ``z₀``, 0 for APO-zero) or ``delta`` (BCO: ``δ``).

Deliberate differences from TRL: a NaN/±inf in a valid row makes the loss NaN (TRL's ``nanmean`` drops NaN
losses); padding rows (``valid``) exist here and are left out of everything.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rpo_jax.losses.metrics import global_mean, global_sum
from rpo_jax.losses.types import BCOState, UnpairedLogps

__all__ = [
    "UnpairedRequirements",
    "PreparedUnpaired",
    "check_unpaired",
    "prepare_unpaired",
    "poison_unpaired",
    "kto_terms",
    "bco_terms",
    "update_moments",
]

log_sigmoid = jax.nn.log_sigmoid
sigmoid = jax.nn.sigmoid


@dataclasses.dataclass(frozen=True)
class UnpairedRequirements:
    """What an unpaired loss needs from the batch."""

    loss_name: str
    reference: bool = True
    kl: bool = False


@dataclasses.dataclass(frozen=True)
class PreparedUnpaired:
    """A validated ``UnpairedLogps``: float32 ``[B]`` arrays, invalid rows zeroed, references and KL log-probs
    constant, ``nonfinite [B]``: rows with a NaN/±inf in a valid slot of any field present."""

    policy: jax.Array
    labels: jax.Array
    ref: jax.Array | None
    kl_policy: jax.Array | None
    kl_ref: jax.Array | None
    valid: jax.Array
    nonfinite: jax.Array


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


FLOAT_FIELDS = ("policy_logps", "ref_logps", "kl_policy_logps", "kl_ref_logps")


def check_unpaired(batch: Any, req: UnpairedRequirements) -> None:
    """Raise ``ValueError`` naming the ``UnpairedLogps`` field when ``batch`` does not fit ``req`` (static shapes and
    dtypes only: the same at trace time under ``jit``)."""
    name = req.loss_name
    if not isinstance(batch, UnpairedLogps):
        raise ValueError(
            f"loss {name!r} takes unpaired data: it expects an UnpairedLogps (one labelled completion per row), "
            f"got {type(batch).__name__}"
        )
    if batch.policy_logps is None:
        raise ValueError(f"UnpairedLogps.policy_logps is None; loss {name!r} needs policy log-probs [B]")
    shape = _shape(batch.policy_logps)
    if len(shape) != 1:
        raise ValueError(f"UnpairedLogps.policy_logps must have shape [B], got shape {shape}")
    for field in ("labels", "valid", *FLOAT_FIELDS[1:]):
        value = getattr(batch, field)
        if value is not None and _shape(value) != shape:
            raise ValueError(
                f"UnpairedLogps.{field} has shape {_shape(value)}, expected [B] = {shape} like policy_logps"
            )
    for field in FLOAT_FIELDS:
        value = getattr(batch, field)
        if value is not None and not _is_float(value):
            raise ValueError(f"UnpairedLogps.{field} must be floating point, got {jnp.result_type(value)}")
    for field in ("labels", "valid"):
        value = getattr(batch, field)
        if value is not None and jnp.result_type(value) != jnp.bool_:
            raise ValueError(f"UnpairedLogps.{field} must be a bool array, got dtype {jnp.result_type(value)}")
    if batch.labels is None:
        raise ValueError(f"UnpairedLogps.labels is None; loss {name!r} needs each row's label (True = desirable) [B]")
    if req.reference and batch.ref_logps is None:
        raise ValueError(
            f"UnpairedLogps.ref_logps is None, but loss {name!r} compares against a reference model: pass reference "
            "log-probs [B]"
        )
    if req.kl:
        for field in ("kl_policy_logps", "kl_ref_logps"):
            if getattr(batch, field) is None:
                raise ValueError(
                    f"UnpairedLogps.{field} is None, but loss {name!r} estimates its KL reference point from "
                    "mismatched (prompt, completion) pairs: pass kl_policy_logps and kl_ref_logps [B] (or use "
                    "'apo_zero_unpaired', KTO without the KL term)"
                )


def prepare_unpaired(batch: UnpairedLogps) -> PreparedUnpaired:
    """Upcast to float32, zero invalid rows (``jnp.where``: NaN there cannot leak), ``stop_gradient`` the
    reference and both KL log-probs, and flag rows with a non-finite value in any field present."""
    num_b = _shape(batch.policy_logps)[0]
    valid = jnp.ones((num_b,), bool) if batch.valid is None else jnp.asarray(batch.valid, bool)
    nonfinite = jnp.zeros((num_b,), bool)
    cleaned = {}
    for field in FLOAT_FIELDS:
        x = getattr(batch, field)
        if x is None:
            cleaned[field] = None
            continue
        x = jnp.asarray(x, jnp.float32)
        nonfinite = nonfinite | (valid & ~jnp.isfinite(jax.lax.stop_gradient(x)))
        x = jnp.where(valid, x, 0.0)
        cleaned[field] = x if field == "policy_logps" else jax.lax.stop_gradient(x)
    return PreparedUnpaired(
        policy=cleaned["policy_logps"],
        labels=jnp.asarray(batch.labels, bool),
        ref=cleaned["ref_logps"],
        kl_policy=cleaned["kl_policy_logps"],
        kl_ref=cleaned["kl_ref_logps"],
        valid=valid,
        nonfinite=nonfinite,
    )


def poison_unpaired(prep: PreparedUnpaired) -> jax.Array:
    """``[B]``: 0 for a clean row, NaN (value and policy gradient) for a ``nonfinite`` one (see
    ``rpo_jax.losses.batch.poison_nonfinite``)."""
    return jnp.where(prep.nonfinite, jnp.nan, 0.0).astype(jnp.float32) * prep.policy


def _label_metrics(prep: PreparedUnpaired, rewards: jax.Array, axis_name: str | None) -> dict[str, jax.Array]:
    sg = jax.lax.stop_gradient
    desirable = (prep.valid & prep.labels).astype(jnp.float32)
    undesirable = (prep.valid & ~prep.labels).astype(jnp.float32)
    rewards, policy = sg(rewards), sg(prep.policy)
    metrics = {
        "rewards/chosen": global_mean(rewards, desirable, axis_name),
        "rewards/rejected": global_mean(rewards, undesirable, axis_name),
        "logps/chosen": global_mean(policy, desirable, axis_name),
        "logps/rejected": global_mean(policy, undesirable, axis_name),
        "count/chosen": global_sum(jnp.sum(desirable), axis_name),
        "count/rejected": global_sum(jnp.sum(undesirable), axis_name),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def kto_terms(
    prep: PreparedUnpaired, hp: dict, axis_name: str | None, *, kl: bool
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """KTO (``kl=True``) or APO-zero unpaired (``kl=False``): ``(per-row weighted loss [B], metrics)``."""
    beta = hp["beta"]
    log_ratio = prep.policy - prep.ref
    if kl:
        valid = prep.valid.astype(jnp.float32)
        z0 = global_mean(prep.kl_policy - prep.kl_ref, valid, axis_name)
        z0 = jnp.maximum(jax.lax.stop_gradient(z0), 0.0)
    else:
        z0 = jnp.zeros((), jnp.float32)
    desirable = hp["desirable_weight"] * (1.0 - sigmoid(beta * (log_ratio - z0)))
    undesirable = hp["undesirable_weight"] * (1.0 - sigmoid(beta * (z0 - log_ratio)))
    per_row = jnp.where(prep.valid, jnp.where(prep.labels, desirable, undesirable), 0.0)
    metrics = _label_metrics(prep, beta * log_ratio, axis_name)
    metrics["kl"] = z0
    return per_row, metrics


def update_moments(state: BCOState, values: jax.Array, weights: jax.Array, axis_name: str | None) -> BCOState:
    """TRL's ``RunningMoments.update`` with this batch's ``values [B]`` (rows of ``weights`` 1; global under
    ``axis_name``): batch mean ``m`` and biased variance ``v`` of ``n`` values, ``d = m − mean``, ``N = count + n``;
    ``mean += d·n/N``; ``var = (var·count + d²·count·n/N + v·n)/N``; ``count = N``. ``n = 0`` keeps ``state``."""
    values = jax.lax.stop_gradient(values)
    n, total = global_sum((jnp.sum(weights), jnp.sum(weights * values)), axis_name)
    batch_mean = total / jnp.maximum(n, 1.0)
    squares = global_sum(jnp.sum(weights * jnp.square(values - batch_mean)), axis_name)
    batch_var = squares / jnp.maximum(n, 1.0)
    mean, var, count = (jnp.asarray(x, jnp.float32) for x in (state.mean, state.var, state.count))
    delta = batch_mean - mean
    new_count = count + n
    new_mean = mean + delta * n / new_count
    new_var = (var * count + jnp.square(delta) * count * n / new_count + batch_var * n) / new_count
    seen = n > 0
    return BCOState(
        mean=jnp.where(seen, new_mean, mean), var=jnp.where(seen, new_var, var), count=jnp.where(seen, new_count, count)
    )


def bco_terms(
    prep: PreparedUnpaired, hp: dict, axis_name: str | None, state: BCOState, update: bool
) -> tuple[jax.Array, dict[str, jax.Array], BCOState]:
    """BCO without UDM: ``(per-row loss [B], metrics, next state)`` (module docstring)."""
    rewards = hp["beta"] * (prep.policy - prep.ref)
    if update:
        state = update_moments(state, rewards, prep.valid.astype(jnp.float32), axis_name)
    delta = jax.lax.stop_gradient(jnp.asarray(state.mean, jnp.float32))
    shifted = rewards - delta
    per_row = jnp.where(prep.valid, -log_sigmoid(jnp.where(prep.labels, shifted, -shifted)), 0.0)
    metrics = _label_metrics(prep, rewards, axis_name)
    metrics["delta"] = delta
    return per_row, metrics, state
