"""Nothing lost, nothing silent: duplicate JSON keys, chat roles, and a read that leaves no record."""

from __future__ import annotations

import gzip
import json

import pytest

from rpo_jax.data import ROLES, NoRecordsError, RecordError, encode_prompt, read_prompts, read_records, tokenize_records
from rpo_jax.data.cli import main
from rpo_jax.data.sources import DuplicateKeyError, loads_strict
from rpo_jax.data.tokenize import template_knows_tool

GOOD = '{"prompt": "q", "chosen": "a", "rejected": "b"}'
CONV = {
    "prompt": [{"role": "user", "content": "the cat"}],
    "chosen": [{"role": "assistant", "content": "sat"}],
    "rejected": [{"role": "assistant", "content": "ran"}],
}

# ------------------------------------------------------------------------------------------ duplicate keys

DUPLICATES = {
    # name: (raw line, field, key)
    "top_level": ('{"prompt": "q", "chosen": "a", "chosen": "c", "rejected": "b"}', "chosen", "chosen"),
    "message_role": (
        '{"prompt": [{"role": "user", "role": "system", "content": "x"}], '
        '"chosen": [{"role": "assistant", "content": "a"}], '
        '"rejected": [{"role": "assistant", "content": "b"}]}',
        "prompt[0].role",
        "role",
    ),
    "response_message": (
        '{"prompt": "q", "responses": ["a", [{"role": "assistant", "content": "b", "content": "c"}]]}',
        "responses[1][0].content",
        "content",
    ),
    "nested_extra": (
        '{"prompt": "q", "chosen": "a", "rejected": "b", "meta": {"x": [1, {"y": 1, "y": 2}]}}',
        "meta.x[1].y",
        "y",
    ),
}


@pytest.mark.parametrize("name", sorted(DUPLICATES))
def test_duplicate_key_is_an_error_naming_file_line_and_field(write_lines, tmp_path, name):
    line, field, key = DUPLICATES[name]
    path = write_lines(tmp_path / "data.jsonl", [GOOD] * 6 + [line])
    with pytest.raises(RecordError) as info:
        read_records(path)
    assert str(info.value) == f"{path}:7: {field}: duplicate key '{key}'"
    assert (info.value.problem.line, info.value.problem.field) == (7, field)


def test_duplicate_key_in_gz_and_skip_counts_it(write_lines, tmp_path):
    plain = write_lines(
        tmp_path / "plain.jsonl",
        [
            GOOD,
            DUPLICATES["top_level"][0],
            '{"prompt": "r", "chosen": "a", "rejected": "b"}',
            DUPLICATES["message_role"][0],
        ],
    )
    gz = tmp_path / "data.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, gz):
        records, report = read_records(path, on_error="skip")
        assert [r.prompt_text for r in records] == ["q", "r"]
        assert report.num_skipped == 2 and report.num_records == 2
        assert [str(p) for p in report.problems] == [
            f"{path}:2: chosen: duplicate key 'chosen'",
            f"{path}:4: prompt[0].role: duplicate key 'role'",
        ]


def test_read_prompts_refuses_duplicate_keys(write_lines, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", ['{"prompt": "a"}', '{"prompt": "a", "prompt": "b"}'])
    with pytest.raises(RecordError, match=r"p\.jsonl:2: prompt: duplicate key 'prompt'$"):
        read_prompts(path)


def test_loads_strict():
    assert loads_strict('{"a": [1, {"b": 2}], "c": NaN}')["a"] == [1, {"b": 2}]
    with pytest.raises(DuplicateKeyError) as info:
        loads_strict('{"a": {"b": 1, "c": 2, "b": 3}, "a": 0}')
    assert (info.value.field, info.value.key) == ("a", "a")  # the first in document order: the outer key
    with pytest.raises(json.JSONDecodeError):
        loads_strict('{"a": 1, "a": 2')  # malformed wins over duplicate


# ---------------------------------------------------------------------------------------------- chat roles


def _conv(prompt_role="user", chosen_role="assistant"):
    return {
        "prompt": [{"role": "system", "content": "be brief"}, {"role": prompt_role, "content": "q"}],
        "chosen": [{"role": chosen_role, "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }


@pytest.mark.parametrize("role", ["usr", "bot", "", "User", " user"])
def test_unknown_role_is_an_error_listing_the_allowed_roles(write_lines, tmp_path, role):
    path = write_lines(tmp_path / "r.jsonl", [_conv(), _conv(prompt_role=role)])
    with pytest.raises(RecordError) as info:
        read_records(path)
    assert str(info.value) == (
        f"{path}:2: prompt[1].role: unknown role {role!r} (expected one of 'system', 'user', 'assistant', 'tool')"
    )


def test_unknown_role_in_responses_and_prompts_and_skip(write_lines, tmp_path):
    k_line = {"prompt": "q", "responses": ["a", [{"role": "bot", "content": "b"}]]}
    path = write_lines(tmp_path / "r.jsonl", [_conv(), _conv(chosen_role="bot"), _conv(), _conv(prompt_role="")])
    records, report = read_records(path, on_error="skip")
    assert len(records) == 2 and report.num_skipped == 2
    assert [(p.line, p.field) for p in report.problems] == [(2, "chosen[0].role"), (4, "prompt[1].role")]
    k_path = write_lines(tmp_path / "k.jsonl", [k_line])
    with pytest.raises(RecordError, match=r"k\.jsonl:1: responses\[1\]\[0\]\.role: unknown role 'bot'"):
        read_records(k_path)
    p_path = write_lines(tmp_path / "p.jsonl", [{"prompt": [{"role": "usr", "content": "q"}]}])
    with pytest.raises(RecordError, match=r"p\.jsonl:1: prompt\[0\]\.role: unknown role 'usr'"):
        read_prompts(p_path)
    assert ROLES == ("system", "user", "assistant", "tool")


TOOL_LINE = {
    "prompt": [{"role": "user", "content": "the cat"}, {"role": "tool", "content": "four"}],
    "chosen": [{"role": "assistant", "content": "sat"}],
    "rejected": [{"role": "assistant", "content": "ran"}],
}
TOOL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'tool' %}<|im_start|>user {{ message['content'] }}<|im_end|>"
    "{% else %}<|im_start|>{{ message['role'] }} {{ message['content'] }}<|im_end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)


def test_tool_role_is_read_and_refused_by_a_template_without_tool(
    write_lines, tmp_path, words_tokenizer, demo_tokenizer
):
    path = write_lines(tmp_path / "t.jsonl", [CONV, TOOL_LINE])
    records, report = read_records(path)
    assert report.ok and records[1].prompt[1] == {"role": "tool", "content": "four"}
    for tok in (words_tokenizer, demo_tokenizer):  # neither template mentions 'tool'
        assert not template_knows_tool(tok)
        with pytest.raises(RecordError) as info:
            tokenize_records(records, tok, max_length=64)
        assert str(info.value) == (
            f"{path}:2: prompt[1].role: role 'tool', but the tokenizer's chat template "
            "never mentions 'tool' (it cannot render tool messages)"
        )
        ds = tokenize_records(records, tok, max_length=64, on_error="skip")
        assert len(ds) == 1 and ds.report.num_skipped == 1 and ds.report.problems[0].field == "prompt[1].role"
    prompts, _ = read_prompts(path)
    with pytest.raises(RecordError, match=r"t\.jsonl:2: prompt\[1\]\.role: role 'tool'"):
        encode_prompt(prompts[1], words_tokenizer)


def test_tool_role_with_a_template_that_knows_tool(write_lines, tmp_path, words_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(words_tokenizer_dir)
    tok.chat_template = TOOL_TEMPLATE
    assert template_knows_tool(tok)
    records, _ = read_records(write_lines(tmp_path / "t.jsonl", [TOOL_LINE]))
    batch = tokenize_records(records, tok, max_length=32).collate([0])
    ids = tok.convert_tokens_to_ids
    prompt = ids(
        [
            "<bos>",
            "<|im_start|>",
            "user",
            "the",
            "cat",
            "<|im_end|>",
            "<|im_start|>",
            "user",
            "four",
            "<|im_end|>",
            "<|im_start|>",
            "assistant",
        ]
    )
    assert batch["tokens"][0, 0, :14].tolist() == prompt + ids(["sat", "<|im_end|>"])
    assert batch["lengths"].tolist() == [[2, 2]]
    prompts, _ = read_prompts(tmp_path / "t.jsonl")
    assert encode_prompt(prompts[0], tok) == prompt


def test_unknown_role_in_an_in_memory_record_is_refused_at_tokenization(words_tokenizer):
    from rpo_jax.data import PreferenceRecord

    record = PreferenceRecord(
        prompt=({"role": "human", "content": "the cat"},),
        responses=(({"role": "assistant", "content": "sat"},), ({"role": "assistant", "content": "ran"},)),
        rewards=None,
        conversational=True,
        source=("mem.jsonl", 4),
    )
    with pytest.raises(RecordError, match=r"^mem\.jsonl:4: prompt\[0\]\.role: unknown role 'human'"):
        tokenize_records([record], words_tokenizer, max_length=32)


@pytest.mark.parametrize(
    "template,knows",
    [
        ("{% if message['role'] == 'tool' %}x{% endif %}", True),
        ('{% if message.role == "tool" %}x{% endif %}', True),
        ("{% for t in tools %}{{ t }}{% endfor %}", False),
        ("{{ message.tool_calls }}", False),
        ({"default": "{{ m }}", "tool_use": "{% if m.role == 'tool' %}{% endif %}"}, True),
        (None, False),
    ],
)
def test_template_knows_tool(template, knows):
    class Tok:
        chat_template = template

    assert template_knows_tool(Tok()) is knows


# ------------------------------------------------------------------------------------- no record left


def test_all_records_skipped_raises_naming_files_and_first_problems(write_lines, tmp_path):
    a = write_lines(tmp_path / "data.jsonl", [{"prompt": f"q{i}", "chosen": "a"} for i in range(4)])
    b = write_lines(tmp_path / "other.jsonl", ['{"prompt": "q"', '{"prompt": "q", "chosen": "a", "rejected": "a"}'])
    with pytest.raises(NoRecordsError) as info:
        read_records([a, b], on_error="skip")
    assert isinstance(info.value, ValueError)
    assert str(info.value) == (
        f"{a}, {b}: all 6 records were skipped (first problems: "
        f"{a}:1: rejected: missing field; {a}:2: rejected: missing field; {a}:3: rejected: missing field; "
        f"and 3 more)"
    )
    report = info.value.report
    assert (report.num_lines, report.num_skipped, report.num_records, len(report.problems)) == (6, 6, 0, 6)
    assert report.files == [str(a), str(b)]
    assert str(report.problems[-1]) == f"{b}:2: rejected: chosen and rejected are identical"


def test_one_good_record_is_enough_and_raise_mode_is_unchanged(write_lines, tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [{"prompt": "q"}, GOOD])
    records, report = read_records(path, on_error="skip")
    assert len(records) == 1 and report.num_skipped == 1
    with pytest.raises(RecordError, match=r"data\.jsonl:1: <record>: unknown record format"):
        read_records(path)


def test_only_record_skipped_and_empty_files_and_no_input(write_lines, tmp_path):
    one = write_lines(tmp_path / "one.jsonl", ['{"prompt": ""}'])
    with pytest.raises(NoRecordsError) as info:
        read_prompts(one, on_error="skip")
    assert str(info.value) == f"{one}: its only record was skipped (first problems: {one}:1: prompt: empty)"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(NoRecordsError) as info:
        read_records([empty, empty], on_error="skip")
    assert str(info.value) == (
        f"{empty}, {empty}: no records at all (first problems: {empty}:0: <file>: no records "
        f"(the file is empty); {empty}:0: <file>: no records (the file is empty))"
    )
    for reader in (read_records, read_prompts):
        with pytest.raises(ValueError, match=r"^no sources given \(an empty list of paths\)$"):
            reader([], on_error="skip")


def test_read_prompts_all_skipped(write_lines, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"question": "x"}, {"prompt": 3}])
    with pytest.raises(
        NoRecordsError,
        match=r"p\.jsonl: all 2 records were skipped \(first problems: .*p\.jsonl:1: "
        r"prompt: missing field .*; .*p\.jsonl:2: prompt: expected a string",
    ):
        read_prompts(path, on_error="skip")


def test_validate_lists_every_problem_when_all_records_are_bad(write_lines, tmp_path, capsys):
    path = write_lines(
        tmp_path / "bad.jsonl", ['{"prompt": "q", "chosen": "a", "chosen": "b", "rejected": "c"}', "{oops"]
    )
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "records: 0 valid, 2 with problems" in out
    assert f"{path}:1: chosen: duplicate key 'chosen'" in out and f"{path}:2: <json>: malformed JSON" in out
