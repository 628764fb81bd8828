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
        raise ValueError("this loss needs explicit rewards, but these files have records without rewards "
                         "(rewards are never invented): " + "; ".join(parts))


def to_pairs(records: Sequence[PreferenceRecord], *, mode: Literal["best_vs_worst", "all_pairs"] = "best_vs_worst"
             ) -> list[PreferenceRecord]:
    """K-response records with rewards -> K = 2 records (response 0 chosen, 1 rejected), rewards kept.

    ``best_vs_worst``: one pair per record (highest vs lowest reward; first index wins ties).
    ``all_pairs``: every (i, j) with ``rewards[i] > rewards[j]`` (tied pairs are left out), chosen first.
    Records whose rewards are all equal give no pair. Raises ValueError for a record without rewards.
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
            out.append(dataclasses.replace(r, responses=(r.responses[i], r.responses[j]), rewards=(rw[i], rw[j])))
    return out


def holdout_split(records: Sequence[PreferenceRecord], fraction: float, *, seed: int = 0,
                  train_split: str = "train", holdout_split: str = "test") -> dict[str, list[PreferenceRecord]]:
    """``round(fraction * N)`` records picked by ``default_rng(seed)`` held out; both splits keep input order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {fraction}")
    n = len(records)
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).permutation(n)[:round(fraction * n)]] = True
    return {train_split: [r for r, h in zip(records, held) if not h],
            holdout_split: [r for r, h in zip(records, held) if h]}
