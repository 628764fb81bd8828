"""Formats -> canonical records; every bad input named by file, line and field."""

from __future__ import annotations

import gzip
import json

import pytest

from rpo_jax.data import NoRecordsError, PreferenceRecord, RecordError, read_records, require_rewards
from rpo_jax.data.records import detect_format

USER = {"role": "user", "content": "what is two plus two"}
GOOD = {"role": "assistant", "content": "four"}
BAD = {"role": "assistant", "content": "five"}

# The same content (a plain-string pair with rewards) in every format that carries plain strings.
STRING_PAIR_WITH_REWARDS = {
    "trl_standard": {
        "prompt": USER["content"],
        "chosen": "four",
        "rejected": "five",
        "score_chosen": 1.0,
        "score_rejected": 0.25,
    },
    "nemo": {
        "prompt": USER["content"],
        "chosen_response": "four",
        "rejected_response": "five",
        "chosen_reward": 1.0,
        "rejected_reward": 0.25,
    },
    "k_responses": {"prompt": USER["content"], "responses": ["four", "five"], "rewards": [1.0, 0.25]},
}
# The same conversational pair without rewards.
CONVERSATIONAL_PAIR = {
    "trl_conversational": {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
    "trl_implicit": {"chosen": [USER, GOOD], "rejected": [USER, BAD]},
    "k_responses_messages": {"prompt": [USER], "responses": [[GOOD], [BAD]]},
    "k_responses_strings": {"prompt": [USER], "responses": ["four", "five"]},
}


def _read_one(write_lines, tmp_path, obj, **kw) -> PreferenceRecord:
    records, report = read_records(write_lines(tmp_path / "x.jsonl", [obj]), **kw)
    assert report.ok and len(records) == 1
    return records[0]


@pytest.mark.parametrize("fmt", sorted(STRING_PAIR_WITH_REWARDS))
def test_string_formats_give_the_same_canonical_record(write_lines, tmp_path, fmt):
    record = _read_one(write_lines, tmp_path, STRING_PAIR_WITH_REWARDS[fmt])
    assert record.prompt == ({"role": "user", "content": "what is two plus two"},)
    assert record.responses == (
        ({"role": "assistant", "content": "four"},),
        ({"role": "assistant", "content": "five"},),
    )
    assert record.rewards == (1.0, 0.25)
    assert record.conversational is False
    assert record.source == (str(tmp_path / "x.jsonl"), 1)


@pytest.mark.parametrize("fmt", sorted(CONVERSATIONAL_PAIR))
def test_conversational_formats_give_the_same_canonical_record(write_lines, tmp_path, fmt):
    record = _read_one(write_lines, tmp_path, CONVERSATIONAL_PAIR[fmt])
    assert record.prompt == (USER,)
    assert record.responses == ((GOOD,), (BAD,))
    assert record.rewards is None
    assert record.conversational is True


def test_detected_formats_are_reported(write_lines, tmp_path):
    files = []
    for name, obj in [
        ("a", STRING_PAIR_WITH_REWARDS["nemo"]),
        ("b", CONVERSATIONAL_PAIR["trl_implicit"]),
        ("c", STRING_PAIR_WITH_REWARDS["k_responses"]),
        ("d", CONVERSATIONAL_PAIR["trl_conversational"]),
    ]:
        files.append(write_lines(tmp_path / f"{name}.jsonl", [obj]))
    _, report = read_records(files)
    assert [report.formats[str(f)] for f in files] == ["nemo", "trl_implicit", "k_responses", "trl"]


def test_implicit_prompt_is_the_longest_common_prefix(write_lines, tmp_path):
    sys_msg = {"role": "system", "content": "be brief"}
    turn2 = {"role": "assistant", "content": "hi"}
    turn3 = {"role": "user", "content": "sum"}
    obj = {"chosen": [sys_msg, USER, turn2, turn3, GOOD], "rejected": [sys_msg, USER, turn2, turn3, BAD, USER]}
    record = _read_one(write_lines, tmp_path, obj)
    assert record.prompt == (sys_msg, USER, turn2, turn3)
    assert record.responses == ((GOOD,), (BAD, USER))


def test_k_responses_variable_k_and_multi_message_responses(write_lines, tmp_path):
    lines = [
        {"prompt": "p one", "responses": ["a", "b", "c"], "rewards": [0.1, 0.2, 0.3]},
        {"prompt": "p two", "responses": ["a", "b"], "rewards": [1, 2]},
    ]
    records, _ = read_records(write_lines(tmp_path / "k.jsonl", lines))
    assert [r.num_responses for r in records] == [3, 2]
    assert records[1].rewards == (1.0, 2.0) and all(isinstance(x, float) for x in records[1].rewards)
    assert [r.source[1] for r in records] == [1, 2]


def test_gz_parquet_and_directory_sources_give_the_same_records(write_lines, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"prompt": f"prompt {i}", "responses": [f"a{i}", f"b{i}", f"c{i}"], "rewards": [1.0, 0.5, float(i)]}
        for i in range(5)
    ]
    plain = write_lines(tmp_path / "plain.jsonl", rows)
    gz = tmp_path / "data.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(plain.read_bytes())
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    shards = tmp_path / "shards"
    shards.mkdir()
    write_lines(shards / "part-00000.jsonl", rows[:2])
    write_lines(shards / "part-00001.jsonl", rows[2:])
    expected = [r.content_key() for r in read_records(plain)[0]]
    for source in (gz, tmp_path / "data.parquet", shards):
        records, report = read_records(source)
        assert [r.content_key() for r in records] == expected, source
    records, _ = read_records(tmp_path / "data.parquet")
    assert [r.source for r in records] == [(str(tmp_path / "data.parquet"), i) for i in range(1, 6)]
    records, _ = read_records(shards)
    assert [r.source[1] for r in records] == [1, 2, 1, 2, 3]


def test_declared_format_is_enforced(write_lines, tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [STRING_PAIR_WITH_REWARDS["trl_standard"]])
    with pytest.raises(RecordError, match=r"x\.jsonl:1: chosen_response: missing field"):
        read_records(path, format="nemo")
    path = write_lines(tmp_path / "y.jsonl", [CONVERSATIONAL_PAIR["trl_conversational"]])
    with pytest.raises(RecordError, match=r"y\.jsonl:1: prompt: expected str"):
        read_records(path, format="trl_standard")


# ---------------------------------------------------------------------------------------------- bad inputs

_STD = {"prompt": "what is two plus two", "chosen": "four", "rejected": "five"}
_NEMO = {"prompt": "q", "chosen_response": "a", "rejected_response": "b", "chosen_reward": 1.0, "rejected_reward": 0.0}
_K = {"prompt": "q", "responses": ["a", "b", "c"], "rewards": [1.0, 0.5, 0.0]}

BAD_LINES = {
    # name: (good line of the file's format, bad raw line, field, message fragment)
    "malformed_json": (_STD, '{"prompt": "q", "chosen": ', "<json>", "malformed JSON"),
    "non_utf8": (_STD, b'{"prompt": "q\xff\xfe", "chosen": "a", "rejected": "b"}', "<bytes>", "invalid UTF-8"),
    "missing_field": (_STD, {"prompt": "q", "chosen": "a"}, "rejected", "missing field"),
    "wrong_type_prompt": (_STD, {"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt", "got int"),
    "wrong_type_response": (_STD, {"prompt": "q", "chosen": ["a"], "rejected": "b"}, "chosen", "expected str"),
    "wrong_type_message": (
        _K,
        {"prompt": [{"role": "user"}], "responses": ["a", "b"]},
        "prompt[0].content",
        "missing field",
    ),
    "wrong_type_reward": (_NEMO, {**_NEMO, "chosen_reward": "1.0"}, "chosen_reward", "expected a number"),
    "bool_reward": (_NEMO, {**_NEMO, "rejected_reward": True}, "rejected_reward", "expected a number"),
    "one_reward_only": (
        _NEMO,
        {k: v for k, v in _NEMO.items() if k != "rejected_reward"},
        "rejected_reward",
        "missing field",
    ),
    "empty_prompt": (_STD, {"prompt": "  ", "chosen": "a", "rejected": "b"}, "prompt", "empty"),
    "empty_response": (_STD, {"prompt": "q", "chosen": "", "rejected": "b"}, "chosen", "empty"),
    "empty_k_response": (_K, {"prompt": "q", "responses": ["a", "\n"], "rewards": [1, 0]}, "responses[1]", "empty"),
    "nan_reward": (_K, '{"prompt": "q", "responses": ["a", "b"], "rewards": [NaN, 1.0]}', "rewards[0]", "not finite"),
    "inf_reward": (
        _NEMO,
        '{"prompt": "q", "chosen_response": "a", "rejected_response": "b", '
        '"chosen_reward": 1.0, "rejected_reward": -Infinity}',
        "rejected_reward",
        "not finite",
    ),
    "length_mismatch": (
        _K,
        {"prompt": "q", "responses": ["a", "b"], "rewards": [1.0, 0.5, 0.0]},
        "rewards",
        "3 rewards for 2 responses",
    ),
    "fewer_than_two": (
        _K,
        {"prompt": "q", "responses": ["a"], "rewards": [1.0]},
        "responses",
        "fewer than 2 responses",
    ),
    "identical_pair": (_STD, {"prompt": "q", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    "identical_nemo": (_NEMO, {**_NEMO, "rejected_response": "a"}, "rejected_response", "identical"),
    "identical_k": (_K, {"prompt": "q", "responses": ["a", "b", "a"]}, "responses", "responses 0 and 2"),
    "not_an_object": (_STD, "[1, 2]", "<record>", "expected a JSON object"),
}


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_bad_input_raises_with_file_line_field(write_lines, tmp_path, name):
    good, bad, field, fragment = BAD_LINES[name]
    path = write_lines(tmp_path / "bad.jsonl", [good, good, bad, good])
    with pytest.raises(RecordError) as info:
        read_records(path)
    problem = info.value.problem
    assert (problem.file, problem.line, problem.field) == (str(path), 3, field)
    assert fragment in problem.message
    assert str(info.value).startswith(f"{path}:3: {field}: ")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_skip_counts_and_reports_every_problem(write_lines, tmp_path, name):
    good, bad, field, _ = BAD_LINES[name]
    path = write_lines(tmp_path / "bad.jsonl", [good, bad, good, bad])
    records, report = read_records(path, on_error="skip")
    assert len(records) == 2 and report.num_skipped == 2 and report.num_records == 2
    assert [(p.line, p.field) for p in report.problems] == [(2, field), (4, field)]
    assert not report.ok


def test_every_problem_of_one_record_is_listed(write_lines, tmp_path):
    path = write_lines(tmp_path / "k.jsonl", [{"prompt": "", "responses": ["a", ""], "rewards": [float("nan"), 1]}])
    with pytest.raises(NoRecordsError) as info:  # its only record is bad: no record left is an error
        read_records(path, on_error="skip")
    report = info.value.report
    assert sorted(p.field for p in report.problems) == ["prompt", "responses[1]", "rewards[0]"]
    assert report.num_skipped == 1 and report.num_records == 0


def test_unknown_keys_and_missing_paths(write_lines, tmp_path):
    path = write_lines(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(RecordError, match=r"u\.jsonl:1: <record>: unknown record format"):
        read_records(path)
    with pytest.raises(ValueError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_records(tmp_path / "x.csv")


def test_detect_format_keys():
    assert detect_format(_STD) == "trl_standard"
    assert detect_format(CONVERSATIONAL_PAIR["trl_conversational"]) == "trl_conversational"
    assert detect_format(CONVERSATIONAL_PAIR["trl_implicit"]) == "trl_implicit"
    assert detect_format(_NEMO) == "nemo"
    assert detect_format(_K) == "k_responses"


def test_rewards_are_never_invented(write_lines, tmp_path):
    """NeMo-Aligner defaults missing rewards to 1/0; here they stay None and reward-aware use is refused."""
    nemo_no_rewards = {"prompt": "q", "chosen_response": "a", "rejected_response": "b"}
    no_rw = write_lines(tmp_path / "no_rewards.jsonl", [nemo_no_rewards, {**_NEMO, "prompt": "q2"}])
    rw = write_lines(tmp_path / "rewards.jsonl", [_K])
    records, _ = read_records([rw, no_rw])
    assert records[1].rewards is None and records[2].rewards == (1.0, 0.0)
    with pytest.raises(ValueError, match=r"no_rewards\.jsonl \(1 record\(s\), first at line 1\)") as info:
        require_rewards(records)
    assert "rewards.jsonl (" not in str(info.value).replace("no_rewards.jsonl (", "")
    require_rewards(records[:1] + records[2:])  # all carry rewards: passes


def test_record_json_round_trip():
    record = PreferenceRecord(
        prompt=(USER,), responses=((GOOD,), (BAD,)), rewards=(1.0, -2.5), conversational=True, source=("f.jsonl", 7)
    )
    assert PreferenceRecord.from_json(json.loads(json.dumps(record.to_json()))) == record


def test_empty_and_corrupt_files_are_problems(write_lines, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(RecordError, match=r"empty\.jsonl:0: <file>: no records"):
        read_records(empty)
    good = write_lines(tmp_path / "good.jsonl", [_K])
    records, report = read_records([empty, good], on_error="skip")
    assert len(records) == 1 and [p.field for p in report.problems] == ["<file>"]
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(gzip.compress(b'{"prompt": "q", "responses": ["a", "b"]}\n' * 50)[:-30])
    with pytest.raises(NoRecordsError) as info:  # nothing could be read: no record left is an error
        read_records(corrupt, on_error="skip")
    report = info.value.report
    assert report.problems and report.problems[-1].field == "<file>" and "cannot read" in report.problems[-1].message


def test_read_prompts_from_prompt_only_and_preference_files(write_lines, tmp_path):
    from rpo_jax.data import read_prompts

    lines = [
        {"prompt": "plain"},
        {"prompt": [USER], "anything": 1},
        CONVERSATIONAL_PAIR["trl_implicit"],
        STRING_PAIR_WITH_REWARDS["nemo"],
    ]
    prompts, report = read_prompts(write_lines(tmp_path / "p.jsonl", lines))
    assert report.ok and report.num_records == 4
    assert prompts[0].prompt == ({"role": "user", "content": "plain"},) and not prompts[0].conversational
    assert prompts[1].prompt == (USER,) and prompts[1].conversational
    assert prompts[2].prompt == (USER,)  # the implicit prompt: the common prefix of chosen and rejected
    assert prompts[3].prompt_text == USER["content"] and prompts[3].source[1] == 4


def test_read_prompts_errors_name_file_line_field_and_skip_counts(write_lines, tmp_path):
    from rpo_jax.data import read_prompts

    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": 3}, {"question": "x"}, "{not json"])
    with pytest.raises(RecordError, match=r"p\.jsonl:2: prompt: expected a string or a list of messages"):
        read_prompts(path)
    prompts, report = read_prompts(path, on_error="skip")
    assert len(prompts) == 1 and report.num_skipped == 3
    assert [(p.line, p.field) for p in report.problems] == [(2, "prompt"), (3, "prompt"), (4, "<json>")]


def test_encode_prompt_is_the_prompt_part_of_encode_record():
    from transformers import AutoTokenizer

    from rpo_jax.data import demo_paths, encode_prompt, encode_record, read_prompts, read_records

    tok = AutoTokenizer.from_pretrained(demo_paths()["tokenizer"])
    records, _ = read_records(demo_paths()["test"])
    prompts, _ = read_prompts(demo_paths()["test"])
    for rec, prompt in zip(records[:5], prompts[:5]):
        assert encode_prompt(prompt, tok) == encode_record(rec, tok)[0]
