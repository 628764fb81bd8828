"""Selection: pairs from K responses, a seeded held-out split, the reward check; light imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rpo_jax.data.records import PreferenceRecord
from rpo_jax.data.selection import holdout_split, to_pairs

USER = {"role": "user", "content": "what is two plus two"}
GOOD = {"role": "assistant", "content": "four"}
BAD = {"role": "assistant", "content": "five"}


def test_to_pairs_best_vs_worst_and_all_pairs():
    r = PreferenceRecord(
        prompt=(USER,),
        responses=tuple(({"role": "assistant", "content": c},) for c in "abcd"),
        rewards=(0.5, 1.0, 0.0, 0.5),
        conversational=True,
        source=("f", 1),
    )
    (pair,) = to_pairs([r])
    assert [m[0]["content"] for m in pair.responses] == ["b", "c"] and pair.rewards == (1.0, 0.0)
    pairs = to_pairs([r], mode="all_pairs")
    got = sorted((p.responses[0][0]["content"], p.responses[1][0]["content"]) for p in pairs)
    assert got == [("a", "c"), ("b", "a"), ("b", "c"), ("b", "d"), ("d", "c")]  # the tie a = d is left out
    assert all(p.rewards[0] > p.rewards[1] for p in pairs)
    tied = PreferenceRecord(prompt=(USER,), responses=((GOOD,), (BAD,)), rewards=(1.0, 1.0), conversational=True)
    assert to_pairs([tied]) == []
    with pytest.raises(ValueError, match="to_pairs needs rewards"):
        to_pairs([PreferenceRecord(prompt=(USER,), responses=((GOOD,), (BAD,)), rewards=None, conversational=True)])


def test_holdout_split_is_seeded_disjoint_complete_and_ordered():
    records = [
        PreferenceRecord(
            prompt=(USER,), responses=((GOOD,), (BAD,)), rewards=None, conversational=True, source=("f", i)
        )
        for i in range(1, 41)
    ]
    parts = holdout_split(records, 0.25, seed=5)
    lines = {k: [r.source[1] for r in v] for k, v in parts.items()}
    assert sorted(lines) == ["test", "train"] and (len(lines["train"]), len(lines["test"])) == (30, 10)
    assert sorted(lines["train"] + lines["test"]) == list(range(1, 41))
    assert all(v == sorted(v) for v in lines.values())  # input order kept
    assert [r.source for r in holdout_split(records, 0.25, seed=5)["test"]] == [r.source for r in parts["test"]]
    assert [r.source for r in holdout_split(records, 0.25, seed=6)["test"]] != [r.source for r in parts["test"]]
    named = holdout_split(records, 0.25, seed=5, train_split="fit", holdout_split="eval")
    assert named == {"fit": parts["train"], "eval": parts["test"]}
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="holdout_fraction must be in"):
            holdout_split(records, bad)


def test_package_names_map_to_their_modules():
    import rpo_jax.data as data
    from rpo_jax.data import prompts, records, selection

    for name in ("holdout_split", "require_rewards", "to_pairs"):
        assert getattr(data, name) is getattr(selection, name)
    for name in ("PromptRecord", "read_prompts"):
        assert getattr(data, name) is getattr(prompts, name)
    assert data.read_records is records.read_records
    assert set(data.__all__) >= {"holdout_split", "require_rewards", "to_pairs", "PromptRecord", "read_prompts"}


def test_records_prompts_and_selection_import_without_jax_grain_or_tfds():
    code = (
        "import sys, rpo_jax.data.records, rpo_jax.data.prompts, rpo_jax.data.selection; "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'grain', 'tensorflow_datasets'}); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
