"""Unpaired records tokenized as TRL's KTOTrainer prepares them (`tokenize_unpaired`): the completion after the
prompt's tokens, EOS text appended to plain completions, the length filter, the mismatched completions rotated by one
within blocks of consecutive kept records, labels in the batch, and one-line errors for a prompt that is not a prefix.
Token-id equality with TRL's own KTOTrainer is tests/train/test_trl_parity_trainers.py's."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from rpo_jax.data import RecordError, demo_paths, tokenize_unpaired
from rpo_jax.data.unpaired import UnpairedRecord
from rpo_jax.data.unpaired_tokenize import mismatched_sources


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(demo_paths()["tokenizer"])


def record(prompt: str, completion: str, label: bool, line: int = 1) -> UnpairedRecord:
    return UnpairedRecord(
        ({"role": "user", "content": prompt},), ({"role": "assistant", "content": completion},), label, False,
        ("u.jsonl", line),
    )  # fmt: skip


def test_mismatched_sources_rotate_by_one_within_each_block():
    assert mismatched_sources(7, 3).tolist() == [2, 0, 1, 5, 3, 4, 6]  # the last block of one pairs with itself
    assert mismatched_sources(4, 2).tolist() == [1, 0, 3, 2]


def test_completion_tokens_eos_labels_and_mismatched_sequences(tok):
    records = [record(f"sort: {i} 1", f"1 {i}", i % 3 == 0, i + 1) for i in range(2, 8)]
    ds = tokenize_unpaired(records, tok, max_length=32, mismatched_block=3)
    assert ds.k_max == 2 and len(ds) == 6 and ds.balance.desirable == 2
    batch = ds.collate([0, 1, 2, None])
    assert batch["labels"].tolist() == [r.label for r in records[:3]] + [False]
    eos = tok.eos_token_id
    for b in range(3):
        prompt = tok(records[b].prompt_text)["input_ids"]
        own = tok(records[b].prompt_text + records[b].completion_text + tok.eos_token)["input_ids"]
        other = tok(records[(b - 1) % 3].prompt_text + records[(b - 1) % 3].completion_text + tok.eos_token)
        n0, n1 = (int(batch["attention_mask"][b, k].sum()) for k in (0, 1))
        assert batch["tokens"][b, 0, :n0].tolist() == own and own[-1] == eos
        mismatched = prompt + other["input_ids"][len(tok(records[(b - 1) % 3].prompt_text)["input_ids"]) :]
        assert batch["tokens"][b, 1, :n1].tolist() == mismatched
        assert batch["loss_mask"][b, 0, :n0].tolist() == [False] * len(prompt) + [True] * (n0 - len(prompt))
        assert batch["lengths"][b].tolist() == [n0 - len(prompt), n1 - len(prompt)]
    assert not batch["valid"][3].any() and batch["index"][3] == -1


def test_long_prompts_are_dropped_and_long_sequences_keep_their_start(tok):
    records = [record("sort: " + " ".join(["9"] * 20), "9", True), record("sort: 1", " ".join(["1"] * 20), False)]
    ds = tokenize_unpaired(records, tok, max_length=16, truncation="keep_start")
    assert ds.k_max == 1 and [e.index for e in ds.examples] == [1]
    assert ds.report.num_dropped == 1 and ds.report.num_responses_truncated == 1
    assert len(ds.examples[0].sequences[0]) == 16 and ds.balance.total == 1
    with pytest.raises(RecordError, match="^u.jsonl:1: prompt: prompt has"):
        tokenize_unpaired(records, tok, max_length=16, truncation="drop")


def test_a_prompt_that_is_not_a_prefix_is_an_error_naming_the_record_or_a_counted_skip(tok):
    class Merging:
        """A tokenizer whose prompt + completion ids differ from the prompt's at the boundary."""

        eos_token, eos_token_id, pad_token_id, chat_template = "<eos>", 2, 0, None

        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [[5, 6] if len(t) < 8 else [5, 7, 8] for t in texts]}

    records = [record("abc", "defgh", True, 4)]
    with pytest.raises(RecordError, match="^u.jsonl:4: completion: the prompt's tokens are not a prefix"):
        tokenize_unpaired(records, Merging(), max_length=8)
    ds = tokenize_unpaired(records * 2, Merging(), max_length=8, on_error="skip")
    assert len(ds) == 0 and ds.report.num_skipped == 2


def test_mismatched_block_below_two_is_refused(tok):
    with pytest.raises(ValueError, match="mismatched_block must be >= 2"):
        tokenize_unpaired([record("a", "b", True)], tok, max_length=8, mismatched_block=1)
    assert np.asarray(tokenize_unpaired([record("a", "b", True)], tok, max_length=8).labels).tolist() == [True]
