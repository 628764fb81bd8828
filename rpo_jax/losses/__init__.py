"""Preference losses in pure JAX: RPO (every distance, pairwise/all-pairs/listwise), MRPO, DPO family, TRL losses,
ORPO and CPO, the unpaired KTO / APO-zero / BCO, and the Bradley–Terry reward-model loss.

The public entry points are ``make_loss`` / ``available_losses``, the seam types ``PreferenceLogps`` /
``LossOutput`` and ``LossSpec`` (``loss_fn.spec``, what a loss needs), and for single labelled completions
``UnpairedLogps`` (with BCO's running-moments state ``BCOState``). The math follows ``MATH.md``: Sun et al.,
arXiv:2502.00203 (RPO) and Le et al., arXiv:2405.16388 (MRPO). This package imports no Flax and no model code.
"""

from rpo_jax.losses.bradley_terry import bradley_terry_loss, bradley_terry_per_pair
from rpo_jax.losses.distances import DISTANCES, bernoulli_kl, bwd_kl, fwd_kl, squared
from rpo_jax.losses.presets import RPOSetting, run_rpo
from rpo_jax.losses.references import arwc_weights, ctro_clip, primary_reference, virtual_reference
from rpo_jax.losses.registry import available_losses, loss_hyperparameters, make_loss
from rpo_jax.losses.rpo import implicit_rewards, rpo_listwise, rpo_pairwise
from rpo_jax.losses.types import BCOState, LossOutput, LossSpec, PreferenceLogps, UnpairedLogps

__all__ = [
    "PreferenceLogps",
    "UnpairedLogps",
    "BCOState",
    "LossOutput",
    "LossSpec",
    "make_loss",
    "available_losses",
    "loss_hyperparameters",
    "DISTANCES",
    "squared",
    "bwd_kl",
    "fwd_kl",
    "bernoulli_kl",
    "implicit_rewards",
    "rpo_pairwise",
    "rpo_listwise",
    "RPOSetting",
    "run_rpo",
    "primary_reference",
    "ctro_clip",
    "arwc_weights",
    "virtual_reference",
    "bradley_terry_per_pair",
    "bradley_terry_loss",
]
