"""``make_loss`` and ``available_losses``: every loss by name, its hyperparameters, defaults and validation.

``make_loss(name, **hparams)`` or ``make_loss([(name, weight), ...], **hparams)`` returns a pure function
``PreferenceLogps → LossOutput``. Unknown names or hyperparameters, and out-of-range values, raise ``ValueError``
at ``make_loss`` listing the valid ones; a batch that does not fit the loss (missing ``ref_logps``/``rewards``/
``lengths``, wrong shapes, no reference axis for MRPO) raises ``ValueError`` naming the field at the first call,
including at trace time under ``jit``. Values are traced, so they are not checked, but a NaN/±inf in a valid slot
of any field is never dropped: the loss, that example's ``per_example`` and its policy gradient are NaN
(``batch.poison_nonfinite``); NaN/±inf in invalid slots is masked as before.

Weighted combinations (like TRL's ``loss_type=[...]``, ``loss_weights=[...]``): ``[("rpo_bwd_kl", 1.0), ("sft",
0.05)]``. Entries may carry their own hyperparameters, ``("sft", 0.05, {})`` / ``("dpo", 1.0, {"beta": 0.2})``;
keyword hyperparameters go to every component that accepts them (and must be accepted by at least one).
The combined ``loss = Σ_c w_c · loss_c`` (each component's own global mean), ``per_example = Σ_c w_c ·
per_example_c``; metrics: the first component's metrics keep their names, a later component's metric is added
under its own name unless that name is taken, in which case it is prefixed ``"<component>/"`` (``logps/*`` are
the same for every component and kept once); and every
component's unweighted loss is reported as ``"loss/<component>"``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from rpo_jax.losses import presets, trainer_losses, trl, validators
from rpo_jax.losses import references as refs
from rpo_jax.losses.batch import PreparedBatch, Requirements, check_batch, poison_nonfinite, prepare_batch
from rpo_jax.losses.definition import Compute, LossDefinition
from rpo_jax.losses.metrics import ComponentResult, global_mean, global_sum, preference_metrics
from rpo_jax.losses.types import BCOState, LossOutput, LossSpec, PreferenceLogps

__all__ = ["make_loss", "available_losses", "loss_hyperparameters", "LOSSES", "LossDefinition"]

# ----------------------------------------------------------------------------------------------------------------
# Loss definitions.

MULTI_REFERENCE_OPTIONS = {
    "alpha": (None, validators.alpha),
    "epsilon": (0.1, validators.epsilon),
    "epsilon_mode": ("adaptive", validators.choice(*refs.EPSILON_MODES)),
}
# The MRPO virtual reference's options: the above plus how ARWC turns margins into weights (``references``).
MRPO_OPTIONS = {**MULTI_REFERENCE_OPTIONS, "arwc": ("own_margin", validators.choice(*refs.ARWC_MODES))}

AUTHORS_CODE_REASON = (
    "uses arwc='authors_code', the MRPO authors' two-reference weighting (each reference weighted by the other's "
    "margin), which needs exactly R = 2 references; use arwc='own_margin' for R != 2"
)


def _arwc_cross_check(hp: dict, given: set) -> None:
    if "arwc" in given and hp["alpha"] is not None:
        raise ValueError(
            f"hyperparameter 'arwc' only applies to ARWC weights (alpha=None); alpha={hp['alpha']!r} fixes the weights"
        )


def _hp(beta: float = 0.1, **more) -> dict:
    return {"beta": (beta, validators.positive), **more}


def _needs(
    name: str,
    *,
    reference=True,
    rewards=False,
    lengths=False,
    min_references=1,
    num_references=None,
    num_references_reason=None,
):
    return Requirements(
        name,
        reference=reference,
        rewards=rewards,
        lengths=lengths,
        min_references=min_references,
        num_references=num_references,
        num_references_reason=num_references_reason,
    )


def _combiner_references(hp: dict) -> tuple[int, int | None, str | None]:
    """(min_references, num_references, why num_references is fixed) implied by a loss's reference options."""
    if hp.get("reference_combiner", "primary") == "mrpo":
        if hp["alpha"] is not None:
            return 2, len(hp["alpha"]), None
        if hp.get("arwc", "own_margin") == "authors_code":
            return 2, 2, AUTHORS_CODE_REASON
        return 2, None, None
    return 1, None, None


# RPO family ------------------------------------------------------------------------------------------------------

RPO_HPARAMS = {
    "beta": (0.1, validators.positive),
    "eta": (1.0, validators.nonnegative),
    "length_normalize": (False, validators.boolean),
    "reference_free": (False, validators.boolean),
    "reference_combiner": ("primary", validators.choice(*refs.REFERENCE_COMBINERS)),
    **MRPO_OPTIONS,
}


def _rpo_cross_check(hp: dict, given: set) -> None:
    mrpo_options = sorted(given & set(MRPO_OPTIONS))
    if hp["reference_combiner"] != "mrpo" and mrpo_options:
        raise ValueError(f"hyperparameter(s) {mrpo_options} only apply with reference_combiner='mrpo'")
    if hp["reference_free"] and "reference_combiner" in given:
        raise ValueError("reference_free=True uses no reference; do not also set reference_combiner")
    _arwc_cross_check(hp, given)


def _rpo_requirements(name: str) -> Callable[[dict], Requirements]:
    def requirements(hp: dict) -> Requirements:
        min_r, num_r, reason = _combiner_references(hp)
        return _needs(
            name,
            reference=not hp["reference_free"],
            rewards=True,
            lengths=hp["length_normalize"],
            min_references=min_r,
            num_references=num_r,
            num_references_reason=reason,
        )

    return requirements


def _reference_from(prep: PreparedBatch, hp: dict) -> jax.Array | None:
    if hp.get("reference_free", False):
        return None
    return presets.reference_logps(
        prep,
        combiner=hp.get("reference_combiner", "primary"),
        alpha=hp.get("alpha"),
        epsilon=hp.get("epsilon", 0.1),
        epsilon_mode=hp.get("epsilon_mode", "adaptive"),
        arwc=hp.get("arwc", "own_margin"),
    )


def _rpo_compute(distance: str) -> Compute:
    def compute(prep: PreparedBatch, hp: dict, axis_name: str | None) -> ComponentResult:
        setting = presets.rpo_setting(
            distance,
            beta=hp["beta"],
            eta=hp["eta"],
            length_normalize=hp["length_normalize"],
            reference_free=hp["reference_free"],
        )
        return presets.run_rpo(prep, setting, _reference_from(prep, hp))

    return compute


def _setting_compute(make_setting: Callable[[dict], presets.RPOSetting], *, mrpo: bool = False) -> Compute:
    def compute(prep: PreparedBatch, hp: dict, axis_name: str | None) -> ComponentResult:
        setting = make_setting(hp)
        if setting.reference != "given":
            reference = None
        elif mrpo:
            reference = presets.reference_logps(
                prep,
                combiner="mrpo",
                alpha=hp["alpha"],
                epsilon=hp["epsilon"],
                epsilon_mode=hp["epsilon_mode"],
                arwc=hp["arwc"],
            )
        else:
            reference = presets.reference_logps(prep)
        return presets.run_rpo(prep, setting, reference)

    return compute


def _multi_dpo_compute(prep: PreparedBatch, hp: dict, axis_name: str | None) -> ComponentResult:
    """``Σ_k α_k · DPO(θ; π_k)`` with the (optionally CTRO-clipped) references and fixed or ARWC weights."""
    ref = prep.ref
    weights = (
        refs.arwc_weights(ref, prep.valid)
        if hp["alpha"] is None
        else jnp.broadcast_to(jnp.asarray(hp["alpha"], jnp.float32), (ref.shape[0], ref.shape[-1]))
    )
    clipped = ref if hp["epsilon"] is None else refs.ctro_clip(ref, prep.valid, hp["epsilon"], hp["epsilon_mode"])
    setting = presets.dpo_setting(beta=hp["beta"])
    results = [presets.run_rpo(prep, setting, clipped[..., k]) for k in range(ref.shape[-1])]
    per_example = sum(weights[:, k] * res.per_example for k, res in enumerate(results))
    return dataclasses.replace(results[0], per_example=per_example)


def _ipo_compute(prep: PreparedBatch, hp: dict, axis_name: str | None) -> ComponentResult:
    """IPO (``presets.ipo_setting``); its ``rewards/*`` metrics are TRL's: ``β · (ℓ_θ − ℓ_ref)``, not the
    length-normalised log-ratios the loss itself compares."""
    reference = presets.reference_logps(prep)
    result = presets.run_rpo(prep, presets.ipo_setting(beta=hp["beta"]), reference)
    return dataclasses.replace(result, implicit=hp["beta"] * (prep.policy - reference))


def _mrpo_requirements(name: str) -> Callable[[dict], Requirements]:
    def requirements(hp: dict) -> Requirements:
        _, num_r, reason = _combiner_references({**hp, "reference_combiner": "mrpo"})
        return _needs(name, min_references=2, num_references=num_r, num_references_reason=reason)

    return requirements


def _trl_pair(name: str) -> Compute:
    return lambda prep, hp, axis_name: trl.pair_loss(name, prep, hp, axis_name)


def _build() -> dict[str, LossDefinition]:
    d: dict[str, LossDefinition] = {}

    def add(name, hparams, compute, requirements, formula, paper, cross_check=lambda hp, given: None):
        d[name] = LossDefinition(name, hparams, compute, requirements, formula, paper, cross_check)

    rpo_paper = "Sun et al. 2025, arXiv:2502.00203"
    for distance, formula in (
        ("sq", "mean_{i≠j} (a_ij − η Δr*_ij)²"),
        ("bwd_kl", "mean_{i≠j} KL(Bern σ(η Δr*_ij) ‖ Bern σ(a_ij))"),
        ("fwd_kl", "mean_{i≠j} KL(Bern σ(a_ij) ‖ Bern σ(η Δr*_ij))"),
    ):
        add(
            f"rpo_{distance}",
            RPO_HPARAMS,
            _rpo_compute(distance),
            _rpo_requirements(f"rpo_{distance}"),
            formula,
            rpo_paper,
            _rpo_cross_check,
        )
    add(
        "rpo_listwise",
        RPO_HPARAMS,
        _rpo_compute("listwise"),
        _rpo_requirements("rpo_listwise"),
        "KL(softmax_k(η r*) ‖ softmax_k(r_θ))",
        rpo_paper + "; NeMo-Aligner PR #311",
        _rpo_cross_check,
    )

    add(
        "dpo",
        _hp(0.1),
        _setting_compute(lambda hp: presets.dpo_setting(beta=hp["beta"])),
        lambda hp: _needs("dpo"),
        "−log σ(β Δlog-ratio)",
        "Rafailov et al. 2023, arXiv:2305.18290",
    )
    add(
        "cdpo",
        _hp(0.1, label_smoothing=(0.1, validators.interval(0.0, 0.5, low_open=False, high_open=True))),
        lambda prep, hp, ax: presets.run_cdpo(
            prep, beta=hp["beta"], label_smoothing=hp["label_smoothing"], reference=presets.reference_logps(prep)
        ),
        lambda hp: _needs("cdpo"),
        "−(1−ε) log σ(βδ) − ε log σ(−βδ)",
        "Mitchell 2023, 'A note on DPO with noisy preferences'",
    )
    add(
        "ipo",
        _hp(0.1),
        _ipo_compute,
        lambda hp: _needs("ipo", lengths=True),
        "(Δ(log-ratio/|y|) − 1/(2τ))², τ = beta",
        "Azar et al. 2023, arXiv:2310.12036",
    )
    add(
        "simpo",
        _hp(2.0, gamma=(1.0, validators.number)),
        _setting_compute(lambda hp: presets.simpo_setting(beta=hp["beta"], gamma=hp["gamma"])),
        lambda hp: _needs("simpo", reference=False, lengths=True),
        "−log σ(β Δ(log π/|y|) − γ)",
        "Meng et al. 2024, arXiv:2405.14734",
    )
    add(
        "distill_dpo",
        _hp(0.1, eta=(1.0, validators.nonnegative)),
        _setting_compute(lambda hp: presets.distill_dpo_setting(beta=hp["beta"], eta=hp["eta"])),
        lambda hp: _needs("distill_dpo", rewards=True),
        "mean_{i≠j} (a_ij − η Δr*_ij)²",
        "Fisch et al. 2024, arXiv:2405.19316",
    )
    add(
        "rloo",
        _hp(1.0, eta=(1.0, validators.nonnegative)),
        _setting_compute(lambda hp: presets.rloo_setting(beta=hp["beta"], eta=hp["eta"])),
        lambda hp: _needs("rloo", reference=False, rewards=True),
        "mean_{i≠j} (β(ℓ_i − sg ℓ_i − ℓ_j + sg ℓ_j) − η Δr*_ij)²; ∇ = −4βη·RLOO",
        "Ahmadian et al. 2024, arXiv:2402.14740",
    )
    add(
        "mrpo",
        {"beta": (0.1, validators.positive), **MRPO_OPTIONS},
        _setting_compute(lambda hp: presets.dpo_setting(beta=hp["beta"]), mrpo=True),
        _mrpo_requirements("mrpo"),
        "−log σ(β[Δℓ_θ − Δ log π̃]), log π̃ = −logsumexp_k(log α_k − ℓ̂_k)",
        "Le et al. 2024, arXiv:2405.16388",
        _arwc_cross_check,
    )
    add(
        "multi_dpo",
        {"beta": (0.1, validators.positive), **MULTI_REFERENCE_OPTIONS},
        _multi_dpo_compute,
        _mrpo_requirements("multi_dpo"),
        "Σ_k α_k · DPO(θ; π̂_k)",
        "Le et al. 2024, arXiv:2405.16388 (baseline)",
    )

    trl_papers = {
        "hinge": ("relu(1 − β δ)", "Liu et al. 2023 (RSO), arXiv:2309.06657", {}),
        "robust": (
            "(−(1−ε) log σ(βδ) + ε log σ(−βδ)) / (1−2ε)",
            "Chowdhury et al. 2024, arXiv:2403.00409",
            {"label_smoothing": (0.0, validators.interval(0.0, 0.5, low_open=False, high_open=True))},
        ),
        "exo_pair": (
            "KL(Bern σ(βδ) ‖ Bern(1−ε))",
            "Ji et al. 2024, arXiv:2402.00856",
            {"label_smoothing": (1e-3, validators.interval(0.0, 1.0, low_open=True, high_open=True))},
        ),
        "nca_pair": ("−log σ(βc) − ½ log σ(−βc) − ½ log σ(−βr)", "Chen et al. 2024, arXiv:2402.05369", {}),
        "bco_pair": ("−log σ(βc) − log σ(−βr)", "Jung et al. 2024, arXiv:2404.04656", {}),
        "sppo_hard": ("(c − 1/(2β))² + (r + 1/(2β))²", "Wu et al. 2024, arXiv:2405.00675", {}),
        "apo_zero": ("1 − σ(βc) + σ(βr)", "D'Oosterlinck et al. 2024, arXiv:2408.06266", {}),
        "apo_down": ("σ(βc) + 1 − σ(βδ)", "D'Oosterlinck et al. 2024, arXiv:2408.06266", {}),
        "discopop": (
            "−log σ(βδ)(1 − σ(βδ/τ)) + e^{−βδ} σ(βδ/τ)",
            "Lu et al. 2024, arXiv:2406.08414",
            {"discopop_tau": (0.05, validators.positive)},
        ),
    }
    for name, (formula, paper, extra) in trl_papers.items():
        add(name, _hp(0.1, **extra), _trl_pair(name), functools.partial(lambda n, hp: _needs(n), name), formula, paper)
    aot_hp = _hp(0.1, label_smoothing=(0.0, validators.interval(0.0, 1.0, low_open=False, high_open=False)))
    add(
        "aot",
        aot_hp,
        lambda prep, hp, ax: trl.aot_loss(prep, hp, ax),
        lambda hp: _needs("aot"),
        "−(1−ε) log σ(βΔ_s) − ε log σ(−βΔ_s), Δ_s = sort(Δℓ_θ) − sort(Δℓ_ref)",
        "Melnyk et al. 2024, arXiv:2406.05882",
    )
    add(
        "aot_unpaired",
        aot_hp,
        lambda prep, hp, ax: trl.aot_loss(prep, hp, ax, unpaired=True),
        lambda hp: _needs("aot_unpaired"),
        "same with Δ_s = sort(c) − sort(r)",
        "Melnyk et al. 2024, arXiv:2406.05882",
    )
    add(
        "sft",
        {},
        trl.sft_loss,
        lambda hp: _needs("sft", reference=False, lengths=True),
        "−Σ ℓ_θ(y_w) / Σ |y_w| (global token mean)",
        "—",
    )
    add(
        "sigmoid_norm",
        _hp(0.1),
        trl.sigmoid_norm_loss,
        lambda hp: _needs("sigmoid_norm", lengths=True),
        "−log σ(β (c/|y_w| − r/|y_l|))",
        'TRL `loss_type="sigmoid_norm"` (length-normalised DPO)',
    )
    for definition in trainer_losses.definitions():  # orpo, cpo; kto, apo_zero_unpaired, bco (unpaired)
        d[definition.name] = definition
    return d


LOSSES: dict[str, LossDefinition] = _build()


def available_losses() -> list[str]:
    """Every loss name `make_loss` accepts.

    Returns:
        The names, in the registry's order (the RPO family first).
    """
    return list(LOSSES)


def loss_hyperparameters(name: str) -> dict[str, Any]:
    """The hyperparameters of a loss with their defaults.

    Args:
        name: a name from `available_losses()`.

    Returns:
        `{hyperparameter: default}`.

    Raises:
        ValueError: for an unknown name (listing the valid ones).
    """
    return {key: default for key, (default, _) in _definition(name).hparams.items()}


def _definition(name: Any) -> LossDefinition:
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; available losses: {available_losses()}")
    return LOSSES[name]


# ----------------------------------------------------------------------------------------------------------------
# make_loss.


@dataclasses.dataclass(frozen=True)
class _Component:
    definition: LossDefinition
    weight: float
    hparams: dict
    requirements: Requirements


def _components(name_or_weighted_list: Any, hparams: dict) -> list[_Component]:
    if isinstance(name_or_weighted_list, str):
        definition = _definition(name_or_weighted_list)
        resolved = definition.resolve(hparams)
        return [_Component(definition, 1.0, resolved, definition.requirements(resolved))]
    if not isinstance(name_or_weighted_list, Sequence) or not name_or_weighted_list:
        raise ValueError(
            "make_loss expects a loss name or a non-empty list of (name, weight) or (name, weight, hparams) "
            f"entries; got {name_or_weighted_list!r}"
        )
    entries = []
    for entry in name_or_weighted_list:
        if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
            raise ValueError(f"loss list entry {entry!r} must be (name, weight) or (name, weight, hparams)")
        name, weight = entry[0], entry[1]
        own = dict(entry[2]) if len(entry) == 3 else {}
        definition = _definition(name)
        weight = validators.nonnegative(f"weight of {name!r}", weight)
        entries.append((definition, weight, own))
    names = [e[0].name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"loss list names each loss at most once, got {names}")
    unused = sorted(k for k in hparams if not any(k in e[0].hparams for e in entries))
    if unused:
        valid = sorted({k for e in entries for k in e[0].hparams})
        raise ValueError(f"no loss in {names} has hyperparameter(s) {unused}; valid hyperparameters: {valid}")
    components = []
    for definition, weight, own in entries:
        shared = {k: v for k, v in hparams.items() if k in definition.hparams}
        resolved = definition.resolve({**shared, **own})
        components.append(_Component(definition, weight, resolved, definition.requirements(resolved)))
    return components


def _merge_metrics(per_component: list[tuple[str, jax.Array, dict]], own_logps: set[str]) -> dict[str, jax.Array]:
    """``own_logps``: the components whose ``logps/*`` are not the summed policy log-probs (``orpo``, ``cpo``)."""
    merged: dict[str, jax.Array] = {}
    first = per_component[0][0]
    for name, _, metrics in per_component:
        for key, value in metrics.items():
            if key not in merged:
                merged[key] = value
            elif not key.startswith("logps/") or {first, name} & own_logps:
                merged[f"{name}/{key}"] = value  # summed policy log-probs are the same for every component
    if len(per_component) > 1:
        for name, loss, _ in per_component:
            merged[f"loss/{name}"] = loss
    return merged


def _num_references(reqs: list[Requirements], min_references: int) -> int | None:
    """The number R of references the loss needs: None when reference-free or not fixed (ARWC MRPO)."""
    fixed = sorted({r.num_references for r in reqs if r.reference and r.num_references is not None})
    if len(fixed) > 1:
        raise ValueError(f"the combined losses need different numbers of references (alpha lengths {fixed})")
    if fixed:
        return fixed[0]
    return 1 if min_references == 1 else None


def make_loss(name_or_weighted_list: str | Sequence, *, axis_name: str | None = None, **hparams: Any):
    """Build a loss: ``loss_fn(PreferenceLogps) -> LossOutput``.

    Args:
      name_or_weighted_list: a name from ``available_losses()``, or a list of ``(name, weight)`` /
        ``(name, weight, hparams)`` combined as ``Σ w · loss`` (see the module docstring).
      axis_name: a ``pmap``/``shard_map`` axis name; the batch mean (and every metric) becomes the global mean.
      **hparams: hyperparameters (``loss_hyperparameters(name)`` lists them with defaults).

    Returns:
      A pure function with attribute ``spec``, a ``LossSpec`` (its typed description), and, with the same values,
      attributes ``requires_reference``, ``requires_rewards``, ``requires_lengths`` (bools), ``num_references``
      (``None``: reference-free; else the R it needs when fixed by ``alpha``, or 1 for single-reference losses),
      ``min_references`` (0, 1 or 2), ``name``, ``hparams``, ``requires_sequence_logps``, ``unpaired``,
      ``requires_kl_logps``, ``stateful``; and ``init_state()`` (``None`` for stateless losses).

      The unpaired losses (``kto``, ``apo_zero_unpaired``, ``bco``; ``spec.unpaired``) take an ``UnpairedLogps``
      instead: ``loss_fn(batch, state=None, *, update_state=True) -> LossOutput``; ``bco`` is stateful: pass
      ``state`` (``loss_fn.init_state()`` first, then the previous ``LossOutput.state``). They cannot be combined.
    """
    components = _components(name_or_weighted_list, dict(hparams))
    unpaired = [c.definition.name for c in components if c.definition.unpaired]
    if unpaired and len(components) > 1:
        raise ValueError(
            f"loss {unpaired[0]!r} takes unpaired data (UnpairedLogps) and cannot be combined with other losses"
        )
    if unpaired:
        only = components[0]
        return _with_spec(trainer_losses.run_unpaired(only.definition, only.hparams, axis_name), components)

    def loss_fn(batch: PreferenceLogps) -> LossOutput:
        for component in components:
            check_batch(batch, component.requirements)
        prep = prepare_batch(batch)
        # 0 (value and gradient) for clean examples; NaN for one with a non-finite value in a valid slot, which
        # therefore can never be dropped by a pair mask or a weight and turned into a plausible finite loss.
        poison = poison_nonfinite(prep)
        batch_poison = global_sum(jnp.sum(poison), axis_name)
        total_loss = batch_poison
        total_per_example = poison
        reported, own_logps = [], set()
        for component in components:
            result = component.definition.compute(prep, component.hparams, axis_name)
            if result.logps is not None:
                own_logps.add(component.definition.name)
            loss = global_mean(result.per_example, result.weight, axis_name)
            total_loss = total_loss + component.weight * loss
            total_per_example = total_per_example + component.weight * result.per_example
            reported.append(
                (
                    component.definition.name,
                    loss + jax.lax.stop_gradient(batch_poison),
                    preference_metrics(result, prep, axis_name),
                )
            )
        return LossOutput(loss=total_loss, per_example=total_per_example, metrics=_merge_metrics(reported, own_logps))

    return _with_spec(loss_fn, components)


def _with_spec(loss_fn: Callable, components: list[_Component]) -> Callable:
    """``loss_fn`` with its ``spec``, the spec's values as attributes, and ``init_state()``."""
    spec = _spec(components)
    loss_fn.spec = spec
    for field in dataclasses.fields(LossSpec):  # the documented attributes: the spec's values, set in one place
        setattr(loss_fn, field.name, getattr(spec, field.name))
    loss_fn.init_state = BCOState.initial if spec.stateful else (lambda: None)
    loss_fn.__name__ = f"loss_{spec.name}"
    return loss_fn


def _spec(components: list[_Component]) -> LossSpec:
    """The ``LossSpec`` of a (possibly weighted) combination of components."""
    reqs = [c.requirements for c in components]
    if components[0].definition.unpaired:  # alone (make_loss refuses combinations)
        (req,) = reqs
        return LossSpec(
            name=components[0].definition.name,
            requires_reference=req.reference,
            requires_rewards=False,
            requires_lengths=False,
            min_references=int(req.reference),
            num_references=1 if req.reference else None,
            hparams={components[0].definition.name: dict(components[0].hparams)},
            unpaired=True,
            requires_kl_logps=req.kl,
            stateful=components[0].definition.stateful,
        )
    min_references = max((r.min_references for r in reqs if r.reference), default=0)
    if len(components) == 1:
        name = components[0].definition.name
    else:
        name = "+".join(f"{c.weight:g}*{c.definition.name}" for c in components)
    return LossSpec(
        name=name,
        requires_reference=any(r.reference for r in reqs),
        requires_rewards=any(r.rewards for r in reqs),
        requires_lengths=any(r.lengths for r in reqs),
        min_references=min_references,
        num_references=_num_references(reqs, min_references),
        hparams={c.definition.name: dict(c.hparams) for c in components},
        requires_sequence_logps=any(r.sequence for r in reqs),
    )
