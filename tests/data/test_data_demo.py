"""The bundled demo task: judge values by hand, byte-identical regeneration, tokenizer, splits."""

from __future__ import annotations

import json
import pathlib

import pytest

from rpo_jax.data import DEMO_DIR, demo_paths, judge, read_records, to_pairs
from rpo_jax.data.demo import write_demo


@pytest.mark.parametrize(
    "response, expected",
    [
        ("2 4 7 9", 1.0),  # sorted, all digits
        ("2 4 9 7", 0.5 + 0.5 * 2 / 3),  # one adjacent swap: 2 of 3 pairs ordered
        ("9 7 4 2", 0.5),  # reversed: digits right, no pair ordered
        ("2 4 7", 0.5 * 3 / 4 + 0.5),  # dropped digit
        ("2 4 7 9 9", 0.5 * 4 / 5 + 0.5),  # extra digit
        ("2 4 7 8", 0.5 * 3 / 4 + 0.5),  # wrong digit
        ("7", 0.5 * 1 / 4),  # one digit: no pair to order
        ("", 0.0),
        ("a b c d", 0.0),
        ("2 4 x 9", 0.0),
        ("24 79", 0.0),
        ("  2\n4 7   9 ", 1.0),  # whitespace-separated
    ],
)
def test_judge_hand_values(response, expected):
    assert judge("sort: 7 2 9 4", response) == pytest.approx(expected, abs=1e-12)


def test_judge_counts_repeated_digits():
    assert judge("sort: 3 3 1", "1 3 3") == 1.0
    assert judge("sort: 3 3 1", "1 3") == pytest.approx(0.5 * 2 / 3 + 0.5)
    with pytest.raises(ValueError, match="not a demo prompt"):
        judge("order: 1 2", "1 2")


def test_regeneration_is_byte_identical(tmp_path):
    write_demo(tmp_path)
    bundled = sorted(p.relative_to(DEMO_DIR) for p in DEMO_DIR.rglob("*") if p.is_file())
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert (
        bundled
        == fresh
        == [
            pathlib.Path(p)
            for p in ("test.jsonl", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "train.jsonl")
        ]
    )
    for rel in bundled:
        assert (DEMO_DIR / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    assert sum((DEMO_DIR / rel).stat().st_size for rel in bundled) < 400_000


def test_demo_records_carry_judge_rewards():
    paths = demo_paths()
    train, report = read_records(paths["train"])
    test, _ = read_records(paths["test"])
    assert report.formats[paths["train"]] == "k_responses"
    assert (len(train), len(test)) == (2000, 200)
    assert not {r.prompt_text for r in train} & {r.prompt_text for r in test}
    ties = 0
    for r in train + test:
        assert r.conversational and r.num_responses == 4 and len({r.response_text(k) for k in range(4)}) == 4
        assert 3 <= len(r.prompt_text.split()) - 1 <= 8
        assert list(r.rewards) == [round(judge(r.prompt_text, r.response_text(k)), 4) for k in range(4)]
        assert max(r.rewards) == 1.0
        ties += len(set(r.rewards)) < 4
    assert ties < 0.02 * len(train + test)
    pairs = to_pairs(train)
    assert len(pairs) == len(train) and all(p.rewards[0] > p.rewards[1] for p in pairs)
    first = json.loads(pathlib.Path(paths["train"]).read_text().splitlines()[0])
    assert set(first) == {"prompt", "responses", "rewards"}


def test_demo_tokenizer_loads_with_transformers(demo_tokenizer):
    tok = demo_tokenizer
    assert len(tok) < 64
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<pad>", "<eos>", "<bos>")
    messages = [{"role": "user", "content": "sort: 3 1"}, {"role": "assistant", "content": "1 3"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<bos><|user|>sort: 3 1<|assistant|>1 3<eos>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 + len("sort: 3 1") + len("1 3") + 1  # one token per character or special
    assert tok.decode(ids) == text
