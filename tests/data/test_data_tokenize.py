"""Exact tokens and loss masks on hand-checked examples; truncation; the batch contract."""

from __future__ import annotations

import numpy as np
import pytest

from rpo_jax.data import (
    PreferenceRecord,
    RecordError,
    bucket_for,
    default_buckets,
    demo_paths,
    read_records,
    tokenize_records,
)

# The demo tokenizer's vocabulary written out by hand: 7 special tokens, then one token per character.
DEMO_VOCAB = {
    t: i
    for i, t in enumerate(
        ["<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
        + list(" 0123456789abcdefghijklmnopqrstuvwxyz:.,?!-'\n")
    )
}


def chars(text: str) -> list[int]:
    return [DEMO_VOCAB[c] for c in text]


BOS, EOS, PAD, USER, ASSISTANT = (DEMO_VOCAB[t] for t in ("<bos>", "<eos>", "<pad>", "<|user|>", "<|assistant|>"))


def conv_record(prompt: str, responses: list[str], rewards=None, line: int = 1) -> PreferenceRecord:
    return PreferenceRecord(
        prompt=({"role": "user", "content": prompt},),
        responses=tuple(({"role": "assistant", "content": r},) for r in responses),
        rewards=None if rewards is None else tuple(rewards),
        conversational=True,
        source=("mem.jsonl", line),
    )


def std_record(prompt: str, responses: list[str], line: int = 1) -> PreferenceRecord:
    return PreferenceRecord(
        prompt=({"role": "user", "content": prompt},),
        responses=tuple(({"role": "assistant", "content": r},) for r in responses),
        rewards=None,
        conversational=False,
        source=("mem.jsonl", line),
    )


def test_default_buckets_and_bucket_choice():
    assert default_buckets(64) == (16, 32, 64)
    assert default_buckets(100) == (16, 32, 64, 100)
    assert bucket_for(16, (16, 32)) == 16 and bucket_for(17, (16, 32)) == 32
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_for(33, (16, 32))


def test_demo_tokenizer_chat_template_exact_tokens_and_masks(demo_tokenizer):
    record = conv_record("sort: 3 1", ["1 3", "3 1 1"], rewards=[1.0, 0.5])
    ds = tokenize_records([record], demo_tokenizer, max_length=64)
    batch = ds.collate([0])
    prompt = [BOS, USER] + chars("sort: 3 1") + [ASSISTANT]  # 12 tokens
    seq0 = prompt + chars("1 3") + [EOS]  # 16 tokens: exactly the first bucket
    seq1 = prompt + chars("3 1 1") + [EOS]  # 18 tokens
    assert batch["tokens"].shape == (1, 2, 32)  # longest is 18 -> bucket 32
    np.testing.assert_array_equal(batch["tokens"][0, 0], seq0 + [PAD] * 16)
    np.testing.assert_array_equal(batch["tokens"][0, 1], seq1 + [PAD] * 14)
    np.testing.assert_array_equal(batch["loss_mask"][0, 0], [False] * 12 + [True] * 4 + [False] * 16)
    np.testing.assert_array_equal(batch["loss_mask"][0, 1], [False] * 12 + [True] * 6 + [False] * 14)
    np.testing.assert_array_equal(batch["attention_mask"][0, 0], [True] * 16 + [False] * 16)
    np.testing.assert_array_equal(batch["lengths"], [[4, 6]])
    np.testing.assert_array_equal(batch["rewards"], np.array([[1.0, 0.5]], np.float32))
    np.testing.assert_array_equal(batch["valid"], [[True, True]])
    np.testing.assert_array_equal(batch["index"], [0])


def test_words_tokenizer_conversational_eos_from_template_is_not_repeated(words_tokenizer):
    tok = words_tokenizer
    ids = tok.convert_tokens_to_ids
    record = conv_record("the cat", ["sat", "ran on the mat"])
    batch = tokenize_records([record], tok, max_length=32).collate([0])
    prompt = ids(["<bos>", "<|im_start|>", "user", "the", "cat", "<|im_end|>", "<|im_start|>", "assistant"])
    np.testing.assert_array_equal(batch["tokens"][0, 0, :10], prompt + ids(["sat", "<|im_end|>"]))
    np.testing.assert_array_equal(batch["tokens"][0, 1, :13], prompt + ids(["ran", "on", "the", "mat", "<|im_end|>"]))
    np.testing.assert_array_equal(batch["lengths"], [[2, 5]])
    assert batch["loss_mask"][0, 0].nonzero()[0].tolist() == [8, 9]
    assert batch["tokens"].shape == (1, 2, 16)
    assert "rewards" not in batch


def test_words_tokenizer_standard_strings_prompt_response_eos(words_tokenizer):
    tok = words_tokenizer
    ids = tok.convert_tokens_to_ids
    record = std_record("the cat", [" sat", " ran"])
    batch = tokenize_records([record], tok, max_length=16).collate([0])
    np.testing.assert_array_equal(batch["tokens"][0, 0, :5], ids(["<bos>", "the", "cat", "sat", "<|im_end|>"]))
    np.testing.assert_array_equal(batch["loss_mask"][0, 0, :6], [False, False, False, True, True, False])
    np.testing.assert_array_equal(batch["lengths"], [[2, 2]])


def test_prompt_not_a_token_prefix_names_the_record(words_tokenizer):
    # "the ca" + "t sat" -> "the cat sat": the prompt's last token ("ca" -> <unk>) is not in the full sequence.
    bad = std_record("the ca", ["t sat", " ran"], line=7)
    with pytest.raises(RecordError, match=r"mem\.jsonl:7: responses\[0\]: the prompt's tokens are not a prefix"):
        tokenize_records([bad], words_tokenizer, max_length=16)
    ds = tokenize_records(
        [std_record("the cat", [" sat", " ran"]), bad], words_tokenizer, max_length=16, on_error="skip"
    )
    assert len(ds) == 1 and ds.report.num_skipped == 1 and ds.report.problems[0].line == 7


# ------------------------------------------------------------------------------------------------ truncation

# prompt "sort: 3 1" is 12 tokens; responses "1 3" + EOS = 4 tokens and "1 3 3" + EOS = 6 tokens.
PROMPT = [BOS, USER] + chars("sort: 3 1") + [ASSISTANT]
R0, R1 = chars("1 3") + [EOS], chars("1 3 3") + [EOS]


def _seqs(ds, i=0):
    return [s.tolist() for s in ds.examples[i].sequences], ds.examples[i].prompt_lengths


def test_truncation_drop(demo_tokenizer):
    record = conv_record("sort: 3 1", ["1 3", "1 3 3"])
    ds = tokenize_records([record], demo_tokenizer, max_length=17, truncation="drop")
    assert len(ds) == 0 and ds.report.num_dropped == 1 and ds.num_records == 1
    ds = tokenize_records([record], demo_tokenizer, max_length=18, truncation="drop")
    assert len(ds) == 1 and ds.report.num_dropped == 0
    ds = tokenize_records([record], demo_tokenizer, max_length=32, max_prompt_length=11, truncation="drop")
    assert len(ds) == 0 and ds.report.num_dropped == 1


def test_truncation_truncate_prompt_from_the_left(demo_tokenizer):
    record = conv_record("sort: 3 1", ["1 3", "1 3 3"])
    ds = tokenize_records([record], demo_tokenizer, max_length=16, truncation="truncate_prompt")
    seqs, plens = _seqs(ds)
    assert seqs == [PROMPT[2:] + R0, PROMPT[2:] + R1] and plens == (10, 10)
    assert ds.report.num_prompts_truncated == 1 and ds.report.num_dropped == 0
    ds = tokenize_records([record], demo_tokenizer, max_length=32, max_prompt_length=8, truncation="truncate_prompt")
    assert _seqs(ds)[0] == [PROMPT[4:] + R0, PROMPT[4:] + R1] and ds.report.num_prompts_truncated == 1
    # A response alone as long as max_length leaves no room for any prompt token: dropped, counted.
    ds = tokenize_records([record], demo_tokenizer, max_length=6, truncation="truncate_prompt")
    assert len(ds) == 0 and ds.report.num_dropped == 1


def test_truncation_truncate_response_keeps_the_first_tokens(demo_tokenizer):
    record = conv_record("sort: 3 1", ["1 3", "1 3 3"])
    ds = tokenize_records([record], demo_tokenizer, max_length=16, truncation="truncate_response")
    assert _seqs(ds) == ([PROMPT + R0, PROMPT + R1[:4]], (12, 12))
    assert ds.report.num_responses_truncated == 1 and ds.report.num_prompts_truncated == 0
    ds = tokenize_records([record], demo_tokenizer, max_length=14, max_prompt_length=8, truncation="truncate_response")
    assert _seqs(ds) == ([PROMPT[4:] + R0, PROMPT[4:] + R1], (8, 8))
    assert ds.report.num_prompts_truncated == 1 and ds.report.num_responses_truncated == 0


@pytest.mark.parametrize("truncation", ["drop", "truncate_response"])
def test_prompt_longer_than_max_length_is_a_problem(demo_tokenizer, truncation):
    long_prompt = conv_record("sort: 3 1", ["1 3", "1 3 3"], line=4)  # 12 prompt tokens
    with pytest.raises(RecordError, match=r"mem\.jsonl:4: prompt: prompt has 12 tokens, max_length 12"):
        tokenize_records([long_prompt], demo_tokenizer, max_length=12, truncation=truncation)
    ds = tokenize_records([long_prompt], demo_tokenizer, max_length=12, truncation=truncation, on_error="skip")
    assert ds.report.num_skipped == 1 and str(ds.report.problems[0]).startswith("mem.jsonl:4: prompt:")


# --------------------------------------------------------------------------------------------- batch contract


def _check_contract(batch, *, batch_size, k_max, buckets, with_rewards):
    expected_keys = {"tokens", "attention_mask", "loss_mask", "lengths", "valid", "index"}
    assert set(batch) == expected_keys | ({"rewards"} if with_rewards else set())
    b, k, t = batch["tokens"].shape
    assert (b, k) == (batch_size, k_max) and t in buckets
    assert batch["tokens"].dtype == np.int32 and batch["lengths"].dtype == np.int32
    assert batch["attention_mask"].dtype == bool and batch["loss_mask"].dtype == bool and batch["valid"].dtype == bool
    assert batch["index"].shape == (b,) and batch["index"].dtype == np.int32
    assert batch["valid"].shape == (b, k) and batch["lengths"].shape == (b, k)
    assert not batch["loss_mask"][..., 0].any()
    np.testing.assert_array_equal(batch["lengths"], batch["loss_mask"].sum(-1))
    assert not (batch["loss_mask"] & ~batch["attention_mask"]).any()
    invalid = ~batch["valid"]
    assert (batch["tokens"][invalid] == 0).all() and not batch["attention_mask"][invalid].any()
    assert (batch["lengths"][batch["valid"]] > 0).all()
    if with_rewards:
        assert batch["rewards"].dtype == np.float32 and (batch["rewards"][invalid] == 0).all()
    longest = batch["attention_mask"].sum(-1).max()
    assert t == min(x for x in buckets if x >= max(longest, 1))


def test_variable_k_pads_invalid_slots(demo_tokenizer):
    records = [
        conv_record("sort: 1 2", ["1 2", "2 1"], rewards=[1, 0]),
        conv_record("sort: 2 1 3", ["1 2 3", "3 2 1", "1 2", "x"], rewards=[1, 0.5, 0.8, 0]),
        conv_record("sort: 5 4", ["4 5", "5 4", "4"], rewards=[1, 0.5, 0.4]),
    ]
    ds = tokenize_records(records, demo_tokenizer, max_length=64)
    assert ds.k_max == 4 and ds.has_rewards
    batch = ds.collate([0, 1, 2, None])
    _check_contract(batch, batch_size=4, k_max=4, buckets=ds.buckets, with_rewards=True)
    np.testing.assert_array_equal(batch["valid"], [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["index"], [0, 1, 2, -1])
    np.testing.assert_allclose(batch["rewards"][2], [1, 0.5, 0.4, 0])
    with pytest.raises(ValueError, match="k_max=3 but a record has 4 responses"):
        tokenize_records(records, demo_tokenizer, max_length=64, k_max=3)
    assert tokenize_records(records, demo_tokenizer, max_length=64, k_max=6).collate([0])["tokens"].shape[1] == 6


def test_four_format_files_read_validate_and_batch(write_lines, tmp_path, words_tokenizer):
    """The 'done when' case: a JSONL per format (one a K = 4 file with rewards) gives contract batches."""
    u = {"role": "user", "content": "what is two plus two"}
    files = {
        "standard.jsonl": [{"prompt": "what is", "chosen": " four", "rejected": " five"}] * 3,
        "conversational.jsonl": [
            {
                "prompt": [u],
                "chosen": [{"role": "assistant", "content": "four"}],
                "rejected": [{"role": "assistant", "content": "five six"}],
            }
        ]
        * 3,
        "nemo.jsonl": [
            {
                "prompt": "two plus two",
                "chosen_response": " four",
                "rejected_response": " five",
                "chosen_reward": 1.0,
                "rejected_reward": 0.0,
            }
        ]
        * 3,
        "k4.jsonl": [{"prompt": [u], "responses": ["four", "five", "six", "the cat"], "rewards": [1, 0.2, 0.1, 0]}] * 3,
    }
    for name, lines in files.items():
        records, report = read_records(write_lines(tmp_path / name, lines))
        assert report.ok and len(records) == 3
        ds = tokenize_records(records, words_tokenizer, max_length=32)
        k = 4 if name == "k4.jsonl" else 2
        batch = ds.collate([0, 1, 2])
        _check_contract(
            batch, batch_size=3, k_max=k, buckets=ds.buckets, with_rewards=name in ("nemo.jsonl", "k4.jsonl")
        )
        assert batch["valid"].all()


def test_another_tokenizer_on_the_same_records_keeps_the_index(demo_tokenizer, words_tokenizer):
    records, _ = read_records(demo_paths()["test"])
    records = records[:12]
    main = tokenize_records(records, demo_tokenizer, max_length=64)
    # Same records through another tokenizer: same indices, so reference caches line up.
    other = tokenize_records(records, words_tokenizer, max_length=64)
    assert main.indices.tolist() == other.indices.tolist() == list(range(12))
    batch = main.collate([3, 7, None])
    ref = other.batch_for_indices(batch["index"])
    np.testing.assert_array_equal(ref["index"], [3, 7, -1])
    np.testing.assert_array_equal(ref["valid"], batch["valid"])
    np.testing.assert_array_equal(ref["rewards"], batch["rewards"])
    lengths = [len(s) for e in main.examples for s in e.sequences]
    # A tight limit drops some records; the kept ones keep their index.
    short = tokenize_records(records, demo_tokenizer, max_length=int(np.median(lengths)), truncation="drop")
    assert 0 < len(short) < 12
    kept = short.indices.tolist()
    assert kept == sorted(kept) and all(short.examples[i].index == kept[i] for i in range(len(kept)))
    dropped = next(i for i in range(12) if i not in kept)
    with pytest.raises(ValueError, match=f"record {dropped} was dropped or skipped"):
        short.batch_for_indices([dropped])


def test_tokenizer_requirements(demo_tokenizer, words_tokenizer):
    record = conv_record("sort: 1 2", ["1 2", "2 1"])
    with pytest.raises(ValueError, match="truncation must be one of"):
        tokenize_records([record], demo_tokenizer, max_length=64, truncation="left")
    with pytest.raises(ValueError, match="max_prompt_length must be in"):
        tokenize_records([record], demo_tokenizer, max_length=64, max_prompt_length=64)
    import copy

    no_template = copy.deepcopy(words_tokenizer)
    no_template.chat_template = None
    with pytest.raises(RecordError, match="no chat_template"):
        tokenize_records([record], no_template, max_length=64)


@pytest.mark.slow
def test_smollm2_chat_template_masks(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    record = PreferenceRecord(
        prompt=({"role": "user", "content": "Hi"},),
        responses=(({"role": "assistant", "content": "Hello!"},), ({"role": "assistant", "content": "Go away."},)),
        rewards=None,
        conversational=True,
        source=("mem.jsonl", 1),
    )
    batch = tokenize_records([record], tok, max_length=128).collate([0])
    expected_prompt = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    for k, text in enumerate(["Hello!", "Go away."]):
        tokens, mask, att = batch["tokens"][0, k], batch["loss_mask"][0, k], batch["attention_mask"][0, k]
        assert tok.decode(tokens[att & ~mask]) == expected_prompt
        assert tok.decode(tokens[mask]) == text + "<|im_end|>\n"  # the template's end of turn; no second EOS
        assert mask.sum() == len(tok(text + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
        assert (tokens[~att] == tok.pad_token_id).all()
    plain = PreferenceRecord(
        prompt=({"role": "user", "content": "The capital of France is"},),
        responses=(({"role": "assistant", "content": " Paris."},), ({"role": "assistant", "content": " Rome."},)),
        rewards=None,
        conversational=False,
        source=("mem.jsonl", 2),
    )
    batch = tokenize_records([plain], tok, max_length=64).collate([0])
    full = tok("The capital of France is Paris.")["input_ids"] + [tok.eos_token_id]
    n_prompt = len(tok("The capital of France is")["input_ids"])
    np.testing.assert_array_equal(batch["tokens"][0, 0, : len(full)], full)
    assert batch["loss_mask"][0, 0].nonzero()[0].tolist() == list(range(n_prompt, len(full)))
