"""``LossDefinition``: one named loss of the registry — its hyperparameters, requirements and computation."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from rpo_jax.losses.batch import PreparedBatch
from rpo_jax.losses.metrics import ComponentResult

__all__ = ["Compute", "LossDefinition"]

Compute = Callable[[PreparedBatch, dict, "str | None"], ComponentResult]


@dataclasses.dataclass(frozen=True)
class LossDefinition:
    """A named loss: its hyperparameters ``name → (default, validator)``, requirements and computation.

    A paired loss (the default) computes ``(PreparedBatch, hparams, axis_name) → ComponentResult`` and states its
    ``Requirements``. An ``unpaired`` loss (single labelled completions, ``UnpairedLogps``) computes
    ``(PreparedUnpaired, hparams, axis_name, state, update_state) → (per-row loss [B], metrics, next state)`` and
    states ``rpo_jax.losses.unpaired.UnpairedRequirements``; a ``stateful`` one carries a state from step to step.
    """

    name: str
    hparams: Mapping[str, tuple[Any, Callable[[str, Any], Any]]]
    compute: Callable[..., Any]
    requirements: Callable[[dict], Any]
    formula: str
    paper: str
    cross_check: Callable[[dict, set], None] = lambda hp, given: None
    unpaired: bool = False
    stateful: bool = False

    def resolve(self, given: Mapping[str, Any]) -> dict:
        unknown = sorted(set(given) - set(self.hparams))
        if unknown:
            raise ValueError(
                f"loss {self.name!r} has no hyperparameter(s) {unknown}; valid hyperparameters: "
                f"{sorted(self.hparams) or 'none'}"
            )
        resolved = {}
        for key, (default, validate) in self.hparams.items():
            resolved[key] = validate(key, given[key]) if key in given else default
        self.cross_check(resolved, set(given))
        return resolved
