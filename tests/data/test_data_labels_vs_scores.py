"""Labelled pairs vs their scores: counts of ties and disagreements, what reaches the loss (`data.pairs_from`),
and `rpo-data validate`'s report."""

from __future__ import annotations

import io

import pytest

from rpo_jax.data import label_score_counts, read_records, rewards_reach_loss
from rpo_jax.data.cli import validate

# line 1 agrees, 2 ties, 3 disagrees, 4 agrees, 5 disagrees, 6 has no scores
TRL_LINES = [
    {"prompt": "p1", "chosen": "a", "rejected": "b", "score_chosen": 8.0, "score_rejected": 2.0},
    {"prompt": "p2", "chosen": "a", "rejected": "b", "score_chosen": 5.0, "score_rejected": 5.0},
    {"prompt": "p3", "chosen": "a", "rejected": "b", "score_chosen": 1.0, "score_rejected": 7.5},
    {"prompt": "p4", "chosen": "a", "rejected": "b", "score_chosen": 3.0, "score_rejected": 2.5},
    {"prompt": "p5", "chosen": "a", "rejected": "b", "score_chosen": 0.0, "score_rejected": 0.5},
]
NEMO_LINES = [
    {"prompt": "p", "chosen_response": "a", "rejected_response": "b", "chosen_reward": 1.0, "rejected_reward": 1.0},
    {"prompt": "q", "chosen_response": "a", "rejected_response": "b", "chosen_reward": 0.0, "rejected_reward": 2.0},
]
K_LINES = [{"prompt": "p", "responses": ["a", "b", "c"], "rewards": [0.0, 1.0, 1.0]}]


def test_pair_formats_are_labelled_and_k_responses_are_not(tmp_path, write_lines):
    trl, _ = read_records(write_lines(tmp_path / "t.jsonl", TRL_LINES))
    nemo, _ = read_records(write_lines(tmp_path / "n.jsonl", NEMO_LINES))
    k, _ = read_records(write_lines(tmp_path / "k.jsonl", K_LINES))
    implicit, _ = read_records(
        write_lines(
            tmp_path / "i.jsonl",
            [
                {
                    "chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
                    "rejected": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "b"}],
                    "score_chosen": 1,
                    "score_rejected": 1,
                }
            ],
        )
    )
    assert all(r.labelled for r in trl + nemo + implicit) and not any(r.labelled for r in k)
    assert trl[2].rewards == (1.0, 7.5)  # the scores are kept as they are; the order is the label
    assert trl[2].response_text(0) == "a"
    rebuilt = type(trl[0]).from_json(trl[0].to_json())
    assert rebuilt == trl[0]


def test_counts_of_ties_and_disagreements(tmp_path, write_lines):
    trl, _ = read_records(
        write_lines(tmp_path / "t.jsonl", TRL_LINES + [{"prompt": "p6", "chosen": "a", "rejected": "b"}])
    )
    nemo, _ = read_records(write_lines(tmp_path / "n.jsonl", NEMO_LINES))
    k, _ = read_records(write_lines(tmp_path / "k.jsonl", K_LINES))
    counts = label_score_counts(trl + nemo + k)
    assert (counts.scored_pairs, counts.ties, counts.disagreements) == (7, 2, 3)
    name_t, name_n = str(tmp_path / "t.jsonl"), str(tmp_path / "n.jsonl")
    assert counts.tie_sources == ((name_t, 2), (name_n, 1))
    assert counts.disagreement_sources == ((name_t, 3), (name_t, 5), (name_n, 2))
    assert counts.summary().startswith("7 labelled pairs carry scores: 2 ties, 3 disagree with their labels")


def test_what_reaches_the_loss(tmp_path, write_lines):
    trl, _ = read_records(write_lines(tmp_path / "t.jsonl", TRL_LINES))
    plain, _ = read_records(write_lines(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}]))
    k, _ = read_records(write_lines(tmp_path / "k.jsonl", K_LINES))
    # preference-only loss: labels by default, scores only when asked
    assert rewards_reach_loss(trl, loss_uses_rewards=False, pairs_from="labels") is False
    assert rewards_reach_loss(trl, loss_uses_rewards=False, pairs_from="rewards") is True
    # reward-aware loss: the rewards, whatever pairs_from says
    assert rewards_reach_loss(trl, loss_uses_rewards=True, pairs_from="labels") is True
    # K responses have no labels: their rewards rank them
    assert rewards_reach_loss(k, loss_uses_rewards=False, pairs_from="labels") is True
    with pytest.raises(ValueError, match=r"p\.jsonl.*rewards are never invented|rewards.*p\.jsonl"):
        rewards_reach_loss(trl + plain, loss_uses_rewards=False, pairs_from="rewards")
    with pytest.raises(ValueError, match=r"t\.jsonl has labelled pairs and .*k\.jsonl K-response records"):
        rewards_reach_loss(trl + k, loss_uses_rewards=False, pairs_from="labels")
    with pytest.raises(ValueError, match=r"data\.pairs_from='score'"):
        rewards_reach_loss(trl, loss_uses_rewards=False, pairs_from="score")


def test_validate_reports_ties_and_disagreements(tmp_path, write_lines):
    path = write_lines(tmp_path / "t.jsonl", TRL_LINES)
    out = io.StringIO()
    assert validate([str(path)], out=out) == 0
    text = out.getvalue()
    assert "labels vs scores: 5 labelled pairs carry scores: 1 ties, 2 disagree with their labels" in text
    assert f"  tie: {path}:2\n" in text
    assert f"  disagreement: {path}:3\n" in text and f"  disagreement: {path}:5\n" in text
    assert "trains as labelled" in text


def test_pairs_derived_from_rewards_are_unlabelled(tmp_path, write_lines):
    from rpo_jax.data import to_pairs

    trl, _ = read_records(write_lines(tmp_path / "t.jsonl", TRL_LINES))
    pairs = to_pairs(trl)  # data.pairs: an explicit request to order by the scores
    assert len(pairs) == 4 and not any(p.labelled for p in pairs)  # the tie gives none
    assert [p.rewards for p in pairs] == [(8.0, 2.0), (7.5, 1.0), (3.0, 2.5), (0.5, 0.0)]
