"""Choosing what a run trains on from validated records: pairs from K responses, a held-out split, the reward check."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from rpo_jax.data.records import PreferenceRecord


def require_rewards(records: Any) -> None:
    """Refuse data without explicit rewards before a reward-aware loss trains on it.

    Args:
      records: a sequence of :class:`PreferenceRecord`, or any object with a ``records`` attribute holding
        one (e.g. :class:`rpo_jax.data.TokenizedDataset`).

    Raises:
      ValueError: naming every file (and the first line in each) whose records carry no rewards.
    """
    recs = getattr(records, "records", records)
    lacking: dict[str, list[int]] = {}
    for r in recs:
        if r.rewards is None:
            lacking.setdefault(r.source[0], []).append(r.source[1])
    if not recs:
        raise ValueError("no records: a reward-aware loss needs records with explicit rewards")
    if lacking:
        parts = [f"{f} ({len(v)} record(s), first at line {v[0]})" for f, v in lacking.items()]
        raise ValueError(
            "this loss needs explicit rewards, but these files have records without rewards "
            "(rewards are never invented): " + "; ".join(parts)
        )


def to_pairs(
    records: Sequence[PreferenceRecord], *, mode: Literal["best_vs_worst", "all_pairs"] = "best_vs_worst"
) -> list[PreferenceRecord]:
    """K-response records with rewards -> K = 2 records (response 0 chosen, 1 rejected), rewards kept; the pairs
    are ordered by their rewards (``labelled=False``), also those of a labelled pair (its label is not used).

    ``best_vs_worst``: one pair per record (highest vs lowest reward; first index wins ties).
    ``all_pairs``: every (i, j) with ``rewards[i] > rewards[j]`` (tied pairs are left out), chosen first.
    Records whose rewards are all equal give no pair.

    Args:
        records: records with rewards.
        mode: `"best_vs_worst"` or `"all_pairs"`.

    Returns:
        The K = 2 records.

    Raises:
        ValueError: for a record without rewards.
    """
    out = []
    for r in records:
        if r.rewards is None:
            raise ValueError(f"{r.source[0]}:{r.source[1]}: rewards: to_pairs needs rewards")
        rw = r.rewards
        if mode == "best_vs_worst":
            best = max(range(len(rw)), key=lambda k: (rw[k], -k))
            worst = min(range(len(rw)), key=lambda k: (rw[k], k))
            pairs = [(best, worst)] if rw[best] > rw[worst] else []
        elif mode == "all_pairs":
            pairs = [(i, j) for i in range(len(rw)) for j in range(len(rw)) if rw[i] > rw[j]]
        else:
            raise ValueError(f"mode must be 'best_vs_worst' or 'all_pairs', got {mode!r}")
        for i, j in pairs:
            out.append(
                dataclasses.replace(
                    r, responses=(r.responses[i], r.responses[j]), rewards=(rw[i], rw[j]), labelled=False
                )
            )  # ordered by rewards, not by a label
    return out


def holdout_split(
    records: Sequence[PreferenceRecord],
    fraction: float,
    *,
    seed: int = 0,
    train_split: str = "train",
    holdout_split: str = "test",
) -> dict[str, list[PreferenceRecord]]:
    """Hold out `round(fraction * N)` records picked by `default_rng(seed)`; both splits keep input order.

    Args:
        records: the N records.
        fraction: the held-out fraction, in [0, 1).
        seed: the seed of the pick.
        train_split: the name of the rest.
        holdout_split: the name of the held-out split.

    Returns:
        `{train_split: [...], holdout_split: [...]}`.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction}")
    n = len(records)
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).permutation(n)[: round(fraction * n)]] = True
    return {
        train_split: [r for r, h in zip(records, held) if not h],
        holdout_split: [r for r, h in zip(records, held) if h],
    }


# ------------------------------------------------------------------------------------------------ labels vs scores
#: ``data.pairs_from``: what decides the preference direction of a labelled pair for a preference-only loss.
PAIRS_FROM = ("labels", "rewards")


@dataclasses.dataclass(frozen=True)
class LabelScoreCounts:
    """How the scores of labelled pairs (``PreferenceRecord.labelled`` with rewards) relate to their labels.

    Attributes:
      scored_pairs: labelled pairs that carry scores (``score_chosen``/``score_rejected``, NeMo rewards).
      ties: of those, pairs with ``score_chosen == score_rejected``.
      disagreements: of those, pairs with ``score_chosen < score_rejected`` (the scores prefer the rejected one).
      tie_sources, disagreement_sources: ``(file, line)`` of each, in input order.
    """

    scored_pairs: int = 0
    ties: int = 0
    disagreements: int = 0
    tie_sources: tuple[tuple[str, int], ...] = ()
    disagreement_sources: tuple[tuple[str, int], ...] = ()

    def summary(self, *, first: int = 3) -> str:
        """One line: ``"120 labelled pairs carry scores: 3 ties, 2 disagree with their labels (first: a:4, a:9)"``."""
        where = [f"{f}:{n}" for f, n in (self.disagreement_sources + self.tie_sources)[:first]]
        return (
            f"{self.scored_pairs} labelled pairs carry scores: {self.ties} ties, {self.disagreements} "
            f"disagree with their labels" + (f" (first: {', '.join(where)})" if where else "")
        )

    def as_dict(self) -> dict[str, int]:
        """The three counts (for a run's record)."""
        return {"scored_pairs": self.scored_pairs, "ties": self.ties, "disagreements": self.disagreements}


def label_score_counts(records: Sequence[PreferenceRecord]) -> LabelScoreCounts:
    """Count ties and label/score disagreements among labelled pairs with scores.

    Args:
        records: the records.

    Returns:
        A `LabelScoreCounts`.
    """
    ties, disagreements, scored = [], [], 0
    for r in records:
        if not r.labelled or r.rewards is None:
            continue
        scored += 1
        chosen, rejected = r.rewards
        if chosen == rejected:
            ties.append(r.source)
        elif chosen < rejected:
            disagreements.append(r.source)
    return LabelScoreCounts(scored, len(ties), len(disagreements), tuple(ties), tuple(disagreements))


def rewards_reach_loss(records: Sequence[PreferenceRecord], *, loss_uses_rewards: bool, pairs_from: str) -> bool:
    """Whether a split's rewards go into the loss (``PreferenceLogps.rewards``, which then decide every pair's
    direction) or stay out of it (response 0 preferred: the label).

    * A reward-aware loss (``LossSpec.requires_rewards``) always gets them: rewards are what it trains on.
    * ``pairs_from="rewards"``: every record's rewards decide (a record without rewards is a ValueError naming
      its file): a labelled pair whose scores disagree trains the other way round, a tie contributes nothing.
    * ``pairs_from="labels"`` (default): labelled pairs (TRL, NeMo formats) train as labelled, their scores kept
      out of a preference-only loss, as TRL does. K-response records have no labels: their rewards rank them
      (K = 2 without rewards: response 0 preferred, as ever). A split mixing labelled pairs with K-response
      records that carry rewards cannot do both in one batch: a ValueError naming one file of each.

    Args:
        records: the split.
        loss_uses_rewards: the loss is reward-aware.
        pairs_from: `"labels"` or `"rewards"` (`config.data.pairs_from`).

    Returns:
        Whether the rewards reach the loss.

    Raises:
        ValueError: an unknown `pairs_from`, missing rewards under `"rewards"`, or the mix above.
    """
    if pairs_from not in PAIRS_FROM:
        raise ValueError(f"data.pairs_from={pairs_from!r}: expected one of {PAIRS_FROM}")
    if loss_uses_rewards:
        return True
    if pairs_from == "rewards":
        require_rewards(records)
        return True
    labelled = [r for r in records if r.labelled]
    ranked = [r for r in records if not r.labelled and r.rewards is not None]
    if labelled and ranked:
        raise ValueError(
            f"data.pairs_from='labels': {labelled[0].source[0]} has labelled pairs and "
            f"{ranked[0].source[0]} K-response records ranked by rewards; one preference-only loss "
            "cannot follow labels and rewards in the same batch: set data.pairs_from='rewards' or "
            "train them separately"
        )
    return bool(ranked) and all(r.rewards is not None for r in records)
