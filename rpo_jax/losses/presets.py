"""Existing methods as *settings* of the one RPO form (the point of Sun et al., arXiv:2502.00203, Table 1).

An ``RPOSetting`` names a distance, the target ``b``, which pairs are compared, which reference is used, and
whether rewards are length-normalised; ``run_rpo`` evaluates any setting. Every preset below is just a setting:

=================  ============  =====  ===========  ==========================  ===============================
method             reference     norm.  D            target b                    pairs
=================  ============  =====  ===========  ==========================  ===============================
``rpo_<D>``        given         opt.   D            ``η Δr*``                    all valid ordered pairs
``rpo_listwise``   given         opt.   listwise KL  ``softmax(η r*)``            all valid responses
``dpo``            given         no     bwd_kl       ``+∞`` (σ(b) = 1)            preferred pairs
``cdpo`` (ε)       given         no     bwd_kl       ``logit(1 − ε)``             preferred pairs
``ipo`` (τ)        given         token  sq           ``1/(2τ)``, β = 1            preferred pairs
``simpo`` (γ)      none          token  bwd_kl       ``+∞``, margin γ             preferred pairs
``distill_dpo``    given         no     sq           ``η Δr*``                    all valid ordered pairs
``rloo``           sg(policy)    no     sq           ``η Δr*``                    all valid ordered pairs
``mrpo``           virtual π̃     no     bwd_kl       ``+∞``                       preferred pairs
=================  ============  =====  ===========  ==========================  ===============================

"Preferred pairs": ``(i, j)`` with ``r*_i > r*_j`` (ties excluded), or ``(0, 1)`` when there are no rewards.

Notes on values: ``dpo`` is exactly ``−log σ(β·Δlog-ratio)``; ``cdpo``'s *setting* is the KL form ``D_bwd`` with
``σ(b) = 1 − ε``, but the loss it *reports* (``run_cdpo``) is the conventional label-smoothed value
``−(1−ε) log σ(a) − ε log σ(−a)`` (TRL ≤ 0.x ``sigmoid`` with ``label_smoothing``, OpenRLHF, NeMo), which is
that KL plus the constant binary entropy ``H(ε)`` — same gradient, equal at ε = 0; ``ipo`` is exactly TRL's
length-normalised ``(Δ(log-ratio/|y|) − 1/(2τ))²``; ``simpo`` is exactly ``−log σ(β Δ(log π/|y|) − γ)``.

``rloo``: with the reference set to ``stop_gradient(policy)`` the implicit gaps are 0 in value, and the gradient
of the all-pairs ``sq`` loss w.r.t. ``ℓ_θ(y_i)`` is ``−(4βη/K)·(r*_i − mean_{j≠i} r*_j)`` (K = valid responses):
``−4βη`` times the REINFORCE leave-one-out (RLOO) policy-gradient estimator ``(1/K) Σ_i A_i ∇ℓ_θ(y_i)``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from rpo_jax.losses import references as refs
from rpo_jax.losses.batch import PreparedBatch, all_pairs_mask, preference_pair_mask
from rpo_jax.losses.distances import get_distance
from rpo_jax.losses.metrics import ComponentResult
from rpo_jax.losses.rpo import implicit_rewards, pairwise_differences, rpo_listwise, rpo_pairwise

__all__ = [
    "RPOSetting",
    "run_rpo",
    "reference_logps",
    "rpo_setting",
    "dpo_setting",
    "cdpo_setting",
    "label_smoothed_sigmoid",
    "run_cdpo",
    "ipo_setting",
    "simpo_setting",
    "distill_dpo_setting",
    "rloo_setting",
]

TARGET_FROM_REWARDS = "rewards"


@dataclasses.dataclass(frozen=True)
class RPOSetting:
    """One point of the RPO family.

    Attributes:
      distance: ``"sq"``, ``"bwd_kl"``, ``"fwd_kl"`` (pairwise) or ``"listwise"``.
      beta: β, the implicit-reward scale.
      eta: η, the explicit-reward scale (used when ``target == "rewards"``).
      target: ``"rewards"`` (``b_ij = η (r*_i − r*_j)``) or a constant gap (``math.inf`` allowed for ``bwd_kl``).
      pairs: ``"all"`` valid ordered pairs (reward-aware) or ``"preferred"`` pairs only.
      reference: ``"given"`` (ref_logps, combined by ``reference_combiner``), ``"none"`` (reference-free), or
        ``"stop_gradient_policy"`` (online: ``ℓ_ref = sg(ℓ_θ)``).
      length_normalize: divide log-ratios by the response length.
      margin: γ subtracted from every implicit gap.
    """

    distance: str
    beta: float
    eta: float = 1.0
    target: str | float = TARGET_FROM_REWARDS
    pairs: str = "all"
    reference: str = "given"
    length_normalize: bool = False
    margin: float = 0.0

    @property
    def reward_aware(self) -> bool:
        return self.target == TARGET_FROM_REWARDS


def reference_logps(
    prep: PreparedBatch,
    *,
    combiner: str = "primary",
    alpha=None,
    epsilon: float | None = 0.1,
    epsilon_mode: str = "adaptive",
    arwc: str = "own_margin",
) -> jax.Array:
    """``ℓ_ref [B, K]`` from the batch's reference(s) with the named combiner (see ``references``)."""
    if combiner == "primary":
        return refs.primary_reference(prep.ref)
    if combiner == "mrpo":
        return refs.virtual_reference(
            prep.ref, prep.valid, alpha=alpha, epsilon=epsilon, epsilon_mode=epsilon_mode, arwc=arwc
        )
    raise ValueError(f"reference_combiner must be one of {refs.REFERENCE_COMBINERS}, got {combiner!r}")


def run_rpo(prep: PreparedBatch, setting: RPOSetting, reference: jax.Array | None) -> ComponentResult:
    """Evaluate one point of the RPO family on a prepared batch.

    Args:
        prep: the prepared batch (`rpo_jax.losses.batch.prepare_batch`).
        setting: the `RPOSetting` (distance, target, pairs, reference, length normalisation, margin).
        reference: `[B, K]` reference log-probs, used when `setting.reference == "given"`.

    Returns:
        The component's per-example losses, weights and metrics.
    """
    if setting.reference == "given":
        ref = reference
    elif setting.reference == "none":
        ref = None
    elif setting.reference == "stop_gradient_policy":
        ref = jax.lax.stop_gradient(prep.policy)
    else:
        raise ValueError(f"unknown reference kind {setting.reference!r}")
    implicit = implicit_rewards(
        prep.policy, ref, prep.lengths, beta=setting.beta, length_normalize=setting.length_normalize
    )
    preferred = preference_pair_mask(prep)
    if setting.distance == "listwise":
        per_example, weight = rpo_listwise(implicit, setting.eta * prep.rewards, prep.valid)
    else:
        if setting.reward_aware:
            target = setting.eta * pairwise_differences(prep.rewards)
        else:
            target = jnp.float32(setting.target)
        mask = all_pairs_mask(prep.valid) if setting.pairs == "all" else preferred
        per_example, weight = rpo_pairwise(
            implicit, target, mask, get_distance(setting.distance), margin=setting.margin
        )
    return ComponentResult(
        per_example=per_example,
        weight=weight,
        implicit=None if setting.reference == "stop_gradient_policy" else implicit,
        pair_mask=preferred,
        reward_aware=setting.reward_aware,
    )


def rpo_setting(distance: str, *, beta: float, eta: float, length_normalize: bool, reference_free: bool) -> RPOSetting:
    """``rpo_sq`` / ``rpo_bwd_kl`` / ``rpo_fwd_kl`` / ``rpo_listwise``: target ``η Δr*`` over all valid pairs."""
    return RPOSetting(
        distance=distance,
        beta=beta,
        eta=eta,
        target=TARGET_FROM_REWARDS,
        pairs="all",
        reference="none" if reference_free else "given",
        length_normalize=length_normalize,
    )


def dpo_setting(*, beta: float) -> RPOSetting:
    """DPO (Rafailov et al., arXiv:2305.18290): ``bwd_kl`` with ``σ(b) = 1``, i.e. ``−log σ(a)``."""
    return RPOSetting(distance="bwd_kl", beta=beta, target=math.inf, pairs="preferred")


def cdpo_setting(*, beta: float, label_smoothing: float) -> RPOSetting:
    """Conservative DPO (Mitchell, 2023): ``bwd_kl`` with ``σ(b) = 1 − ε``, ``b = logit(1 − ε)``.

    Its value is the KL, ``H(ε)`` below the conventional cDPO loss that ``run_cdpo`` (the ``cdpo`` loss) reports.
    """
    target = math.inf if label_smoothing == 0 else math.log1p(-label_smoothing) - math.log(label_smoothing)
    return RPOSetting(distance="bwd_kl", beta=beta, target=target, pairs="preferred")


def label_smoothed_sigmoid(a: jax.Array, label_smoothing: float) -> jax.Array:
    """``−(1−ε)·log σ(a) − ε·log σ(−a)``, elementwise (in log space; finite for any finite ``a``).

    ``= D_bwd(a ‖ logit(1−ε)) + H(ε)`` with ``H(ε) = −ε log ε − (1−ε) log(1−ε)``; ``∂/∂a = σ(a) − (1−ε)``.
    """
    eps = label_smoothing
    return -(1.0 - eps) * jax.nn.log_sigmoid(a) - eps * jax.nn.log_sigmoid(-a)


def run_cdpo(prep: PreparedBatch, *, beta: float, label_smoothing: float, reference: jax.Array) -> ComponentResult:
    """cDPO as reported: the ``cdpo_setting`` evaluated by ``run_rpo`` (pairs, implicit rewards, metrics), with
    ``per_example`` the conventional label-smoothed loss ``mean over preferred pairs of −(1−ε) log σ(a) −
    ε log σ(−a)`` instead of the setting's KL (which is ``H(ε)`` lower; same gradient)."""
    result = run_rpo(prep, cdpo_setting(beta=beta, label_smoothing=label_smoothing), reference)
    per_example, _ = rpo_pairwise(
        result.implicit, 0.0, result.pair_mask, lambda a, _: label_smoothed_sigmoid(a, label_smoothing)
    )
    return dataclasses.replace(result, per_example=per_example)


def ipo_setting(*, beta: float) -> RPOSetting:
    """IPO (Azar et al., arXiv:2310.12036), TRL's per-token form: ``sq``, β = 1, ``b = 1/(2τ)``, τ = ``beta``."""
    return RPOSetting(distance="sq", beta=1.0, target=1.0 / (2.0 * beta), pairs="preferred", length_normalize=True)


def simpo_setting(*, beta: float, gamma: float) -> RPOSetting:
    """SimPO (Meng et al., arXiv:2405.14734): reference-free, length-normalised, ``−log σ(a − γ)``."""
    return RPOSetting(
        distance="bwd_kl",
        beta=beta,
        target=math.inf,
        pairs="preferred",
        reference="none",
        length_normalize=True,
        margin=gamma,
    )


def distill_dpo_setting(*, beta: float, eta: float) -> RPOSetting:
    """Distilled DPO (Fisch et al., arXiv:2405.19316): ``sq`` towards ``η Δr*`` over all valid pairs."""
    return RPOSetting(distance="sq", beta=beta, eta=eta, target=TARGET_FROM_REWARDS, pairs="all")


def rloo_setting(*, beta: float, eta: float) -> RPOSetting:
    """REINFORCE leave-one-out (Ahmadian et al., arXiv:2402.14740) as RPO: ``sq``, ``ℓ_ref = sg(ℓ_θ)``."""
    return RPOSetting(
        distance="sq", beta=beta, eta=eta, target=TARGET_FROM_REWARDS, pairs="all", reference="stop_gradient_policy"
    )
