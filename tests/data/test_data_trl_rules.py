"""TRL 1.16's tokenization rules kept by rpo_jax.data: `keep_start` truncation (a prompt that fills max_length
drops the record, counted), the EOS of plain strings appended once, nothing appended to a chat-template
response (tests/train/test_trl_parity.py checks the same against TRL itself)."""

from __future__ import annotations

import numpy as np
import pytest

from rpo_jax.data import PreferenceRecord, RecordError, tokenize_records


def std(prompt: str, responses: list[str], line: int = 1) -> PreferenceRecord:
    return PreferenceRecord(
        prompt=({"role": "user", "content": prompt},),
        responses=tuple(({"role": "assistant", "content": r},) for r in responses),
        rewards=None,
        conversational=False,
        source=("mem.jsonl", line),
        labelled=True,
    )


def test_keep_start_cuts_each_sequence_and_drops_prompts_that_fill_max_length(words_tokenizer):
    ids = words_tokenizer.convert_tokens_to_ids
    long_prompt = std("the cat sat on the mat the dog ran", [" four", " five"], line=2)  # BOS + 9 tokens
    short = std("the cat", [" sat on the mat", " ran"], line=1)
    ds = tokenize_records([short, long_prompt], words_tokenizer, max_length=6, truncation="keep_start")
    assert len(ds) == 1 and ds.report.num_dropped == 1 and ds.report.num_responses_truncated == 1
    batch = ds.collate([0])
    # BOS the cat | sat on the (mat and EOS cut) / ran EOS
    np.testing.assert_array_equal(batch["tokens"][0, 0, :6], ids(["<bos>", "the", "cat", "sat", "on", "the"]))
    np.testing.assert_array_equal(batch["tokens"][0, 1, :5], ids(["<bos>", "the", "cat", "ran", "<|im_end|>"]))
    np.testing.assert_array_equal(batch["lengths"], [[3, 2]])
    with pytest.raises(RecordError, match=r"mem\.jsonl:2: prompt: prompt has 10 tokens, max_length 6"):
        tokenize_records([long_prompt], words_tokenizer, max_length=6, truncation="truncate_response")


def test_plain_string_eos_is_appended_once(words_tokenizer):
    ids = words_tokenizer.convert_tokens_to_ids
    ds = tokenize_records([std("the cat", [" sat<|im_end|>", " ran"])], words_tokenizer, max_length=16)
    batch = ds.collate([0])
    np.testing.assert_array_equal(batch["tokens"][0, 0, :5], ids(["<bos>", "the", "cat", "sat", "<|im_end|>"]))
    np.testing.assert_array_equal(batch["lengths"], [[2, 2]])


def test_chat_template_response_gets_nothing_appended(words_tokenizer):
    record = PreferenceRecord(
        prompt=({"role": "user", "content": "the cat"},),
        responses=(({"role": "assistant", "content": "sat"},), ({"role": "assistant", "content": "ran"},)),
        rewards=None,
        conversational=True,
        labelled=True,
    )
    template_without_eos = words_tokenizer.chat_template.replace("<|im_end|>", "")
    tok = words_tokenizer
    original = tok.chat_template
    try:
        tok.chat_template = template_without_eos
        batch = tokenize_records([record], tok, max_length=16).collate([0])
    finally:
        tok.chat_template = original
    ids = tok.convert_tokens_to_ids
    n = int(batch["attention_mask"][0, 0].sum())
    assert batch["tokens"][0, 0, :n].tolist() == ids(
        ["<bos>", "<|im_start|>", "user", "the", "cat", "<|im_start|>", "assistant", "sat"]
    )
