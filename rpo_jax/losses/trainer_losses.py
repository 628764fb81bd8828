"""The losses of TRL's other preference trainers as registry definitions: ``orpo`` and ``cpo`` (pairs, reference-free,
with an NLL term; ``rpo_jax.losses.odds_ratio``), ``kto``, ``apo_zero_unpaired`` and ``bco`` (single labelled
completions, ``UnpairedLogps``; ``rpo_jax.losses.unpaired``)."""

from __future__ import annotations

import jax.numpy as jnp

from rpo_jax.losses import odds_ratio, unpaired, validators
from rpo_jax.losses.batch import Requirements
from rpo_jax.losses.definition import LossDefinition
from rpo_jax.losses.metrics import global_mean, global_sum
from rpo_jax.losses.types import LossOutput

__all__ = ["definitions", "unpaired_definitions", "run_unpaired"]

_LABEL_SMOOTHING = validators.interval(0.0, 0.5, low_open=False, high_open=True)


def _orpo_requirements(hp: dict) -> Requirements:
    return Requirements("orpo", reference=False, lengths=True, sequence=hp["nll_tokens"] == "sequence")


def _cpo_cross_check(hp: dict, given: set) -> None:
    if hp["loss_type"] in ("hinge", "ipo") and hp["label_smoothing"] > 0:
        raise ValueError(
            f"hyperparameter 'label_smoothing' does not apply to loss_type={hp['loss_type']!r} (TRL ignores it); "
            "it applies to 'sigmoid' and 'simpo'"
        )
    if "simpo_gamma" in given and hp["loss_type"] != "simpo":
        raise ValueError(f"hyperparameter 'simpo_gamma' only applies with loss_type='simpo', not {hp['loss_type']!r}")


def _cpo_requirements(hp: dict) -> Requirements:
    lengths = hp["cpo_alpha"] > 0 or hp["loss_type"] in ("ipo", "simpo")
    return Requirements("cpo", reference=False, lengths=lengths)


def definitions() -> list[LossDefinition]:
    """The paired definitions (``orpo``, ``cpo``) and the unpaired ones (``unpaired_definitions``)."""
    orpo = LossDefinition(
        "orpo",
        {"beta": (0.1, validators.nonnegative), "nll_tokens": ("sequence", validators.choice(*odds_ratio.NLL_TOKENS))},
        odds_ratio.orpo_loss,
        _orpo_requirements,
        "NLL(y_w) − β log σ(log odds(ȳ_w) − log odds(ȳ_l)), odds(ȳ) = e^ℓ̄/(1 − e^ℓ̄)",
        "Hong et al. 2024, arXiv:2403.07691",
    )
    cpo = LossDefinition(
        "cpo",
        {
            "beta": (0.1, validators.positive),
            "loss_type": ("sigmoid", validators.choice(*odds_ratio.CPO_LOSS_TYPES)),
            "label_smoothing": (0.0, _LABEL_SMOOTHING),
            "cpo_alpha": (1.0, validators.nonnegative),
            "simpo_gamma": (0.5, validators.number),
            "alpha": (0.0, validators.number),
        },
        odds_ratio.cpo_loss,
        _cpo_requirements,
        "−log σ(β(s_w − s_l)) (sigmoid | hinge | ipo | simpo; AlphaPO s) + cpo_alpha · NLL(y_w)",
        "Xu et al. 2024, arXiv:2401.08417; SimPO arXiv:2405.14734; AlphaPO arXiv:2501.03884",
        _cpo_cross_check,
    )
    return [orpo, cpo, *unpaired_definitions()]


def _kto_hparams() -> dict:
    return {
        "beta": (0.1, validators.positive),
        "desirable_weight": (1.0, validators.nonnegative),
        "undesirable_weight": (1.0, validators.nonnegative),
    }


def unpaired_definitions() -> list[LossDefinition]:
    """``kto``, ``apo_zero_unpaired`` and ``bco`` (stateful)."""
    return [
        LossDefinition(
            "kto",
            _kto_hparams(),
            lambda prep, hp, ax, state, update: (*unpaired.kto_terms(prep, hp, ax, kl=True), state),
            lambda hp: unpaired.UnpairedRequirements("kto", reference=True, kl=True),
            "w_D(1 − σ(β(ρ − z₀))) | w_U(1 − σ(β(z₀ − ρ))), z₀ = max(0, sg mean KL(x, y'))",
            "Ethayarajh et al. 2024, arXiv:2402.01306",
            unpaired=True,
        ),
        LossDefinition(
            "apo_zero_unpaired",
            _kto_hparams(),
            lambda prep, hp, ax, state, update: (*unpaired.kto_terms(prep, hp, ax, kl=False), state),
            lambda hp: unpaired.UnpairedRequirements("apo_zero_unpaired", reference=True),
            "w_D(1 − σ(βρ)) | w_U σ(βρ)  (KTO with z₀ = 0)",
            "D'Oosterlinck et al. 2024, arXiv:2408.06266",
            unpaired=True,
        ),
        LossDefinition(
            "bco",
            {"beta": (0.1, validators.positive)},
            unpaired.bco_terms,
            lambda hp: unpaired.UnpairedRequirements("bco", reference=True),
            "−log σ(r − δ) | −log σ(δ − r), r = βρ, δ = running mean of r (state)",
            "Jung et al. 2024, arXiv:2404.04656 (without UDM)",
            unpaired=True,
            stateful=True,
        ),
    ]


def run_unpaired(definition: LossDefinition, hparams: dict, axis_name: str | None):
    """The loss function of an unpaired definition: ``loss_fn(batch, state=None, *, update_state=True)``
    → ``LossOutput`` (see ``rpo_jax.losses.unpaired``)."""
    requirements = definition.requirements(hparams)

    def loss_fn(batch, state=None, *, update_state: bool = True):
        unpaired.check_unpaired(batch, requirements)
        if definition.stateful and state is None:
            raise ValueError(
                f"loss {definition.name!r} carries a state from step to step: call loss_fn(batch, state), with "
                "state=loss_fn.init_state() at the start and LossOutput.state after each step"
            )
        if not definition.stateful and state is not None:
            raise ValueError(f"loss {definition.name!r} has no state; got state={state!r}")
        prep = unpaired.prepare_unpaired(batch)
        poison = unpaired.poison_unpaired(prep)
        per_row, metrics, state = definition.compute(prep, hparams, axis_name, state, update_state)
        loss = global_mean(per_row, prep.valid.astype(per_row.dtype), axis_name)
        loss = loss + global_sum(jnp.sum(poison), axis_name)
        return LossOutput(loss=loss, per_example=per_row + poison, metrics=metrics, state=state)

    return loss_fn
