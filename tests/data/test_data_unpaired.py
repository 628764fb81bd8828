"""Unpaired preference records ``{prompt, completion, label}``: reading (standard, conversational, Hugging Face
datasets), one-line ``file:line: field: message`` problems for every bad input, nothing dropped silently; unpairing
against TRL 1.16's own ``unpair_preference_dataset`` (order included); the KTO balance advice against the warning
TRL's ``KTOTrainer`` itself logs; and ``rpo-data validate`` on unpaired files."""

from __future__ import annotations

import types

import pytest

from rpo_jax.data import (
    LabelBalance,
    NoRecordsError,
    RecordError,
    kto_weight_advice,
    label_balance,
    one_class_warning,
    read_records,
    read_unpaired_records,
    unpair_records,
)
from rpo_jax.data.cli import main

STANDARD = {"prompt": "the cat", "completion": " sat on the mat", "label": True}
CONVERSATIONAL = {
    "prompt": [{"role": "user", "content": "what is two plus two"}],
    "completion": [{"role": "assistant", "content": "four"}],
    "label": False,
}


def test_standard_and_conversational_records(write_lines, tmp_path):
    path = write_lines(tmp_path / "u.jsonl", [STANDARD, "", CONVERSATIONAL])
    records, report = read_unpaired_records(path)
    assert [(r.label, r.conversational, r.source) for r in records] == [
        (True, False, (str(path), 1)),
        (False, True, (str(path), 3)),
    ]
    assert records[0].prompt == ({"role": "user", "content": "the cat"},)
    assert records[0].completion == ({"role": "assistant", "content": " sat on the mat"},)
    assert records[1].completion_text == "four" and records[1].prompt_text == "what is two plus two"
    assert report.formats == {str(path): "unpaired"} and report.num_records == 2 and report.ok


BAD = {
    # name: (line, field, message)
    "missing_label": ({"prompt": "q", "completion": "a"}, "label", "missing field"),
    "string_label": ({**STANDARD, "label": "true"}, "label", "expected true or false (a boolean), got str 'true'"),
    "int_label": ({**STANDARD, "label": 1}, "label", "expected true or false (a boolean), got int 1"),
    "null_label": ({**STANDARD, "label": None}, "label", "expected true or false (a boolean), got null None"),
    "empty_completion": ({**STANDARD, "completion": ""}, "completion", "empty"),
    "blank_completion": ({**STANDARD, "completion": "  \n"}, "completion", "empty"),
    "empty_message_list": ({**CONVERSATIONAL, "completion": []}, "completion", "empty"),
    "blank_message": ({**CONVERSATIONAL, "completion": [{"role": "assistant", "content": " "}]}, "completion", "empty"),
    "missing_completion": ({"prompt": "q", "label": True}, "completion", "missing field"),
    "missing_prompt": ({"completion": "a", "label": True}, "prompt", "missing field"),
    "empty_prompt": ({**STANDARD, "prompt": ""}, "prompt", "empty"),
    "string_completion_of_a_chat": (
        {**CONVERSATIONAL, "completion": "four"},
        "completion",
        "expected a list of messages (the prompt is a list of messages)",
    ),
    "chat_completion_of_a_string": (
        {**STANDARD, "completion": CONVERSATIONAL["completion"]},
        "completion",
        "expected str (the prompt is a string), got list",
    ),
    "bad_role": (
        {**CONVERSATIONAL, "completion": [{"role": "bot", "content": "four"}]},
        "completion[0].role",
        "unknown role 'bot' (expected one of 'system', 'user', 'assistant', 'tool')",
    ),
    "pair_among_unpaired": ({"prompt": "q", "chosen": "a", "rejected": "b"}, "<record>", "a paired record in a file"),
    "not_an_object": (["q", "a", True], "<record>", "expected a JSON object, got list"),
    "malformed_json": ('{"prompt": "q", "completion": "a", "label": tru}', "<json>", "malformed JSON"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_record_is_one_line_naming_file_line_and_field(write_lines, tmp_path, name):
    line, field, message = BAD[name]
    path = write_lines(tmp_path / "u.jsonl", [STANDARD, CONVERSATIONAL, line, STANDARD])
    with pytest.raises(RecordError) as info:
        read_unpaired_records(path)
    assert str(info.value).startswith(f"{path}:3: {field}: {message}"), str(info.value)
    assert "\n" not in str(info.value)
    records, report = read_unpaired_records(path, on_error="skip")  # nothing dropped silently: counted, listed
    assert len(records) == 3 and report.num_skipped == 1 and report.num_lines == 4
    assert [(p.line, p.field) for p in report.problems] == [(3, field)]


def test_every_problem_of_a_record_is_listed_and_all_bad_is_an_error(write_lines, tmp_path):
    path = write_lines(tmp_path / "u.jsonl", [{"prompt": "", "completion": "", "label": "yes"}])
    with pytest.raises(NoRecordsError) as info:
        read_unpaired_records(path, on_error="skip")
    assert [str(p) for p in info.value.report.problems] == [
        f"{path}:1: prompt: empty",
        f"{path}:1: completion: empty",
        f"{path}:1: label: expected true or false (a boolean), got str 'yes'",
    ]


def test_read_records_points_unpaired_files_to_the_unpaired_reader(write_lines, tmp_path):
    path = write_lines(tmp_path / "u.jsonl", [STANDARD])
    with pytest.raises(RecordError, match=r"u\.jsonl:1: <record>: an unpaired record .*read_unpaired_records"):
        read_records(path)


def test_hugging_face_dataset_rows_are_named_by_row():
    datasets = pytest.importorskip("datasets")
    good = datasets.Dataset.from_dict(
        {"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"], "label": [True, False, True]}
    )
    records, report = read_unpaired_records(good)
    assert [r.label for r in records] == [True, False, True] and report.formats == {"<Dataset>": "unpaired"}
    bad = datasets.Dataset.from_dict({"prompt": ["a", "b"], "completion": ["x", ""], "label": ["true", "false"]})
    with pytest.raises(NoRecordsError) as info:
        read_unpaired_records(bad, on_error="skip")
    assert [str(p) for p in info.value.report.problems] == [
        "<Dataset>:1: label: expected true or false (a boolean), got str 'true'",
        "<Dataset>:2: completion: empty",
        "<Dataset>:2: label: expected true or false (a boolean), got str 'false'",
    ]


# Unpairing paired files: TRL's unpair_preference_dataset ----------------------------------------------------------


def _pairs(n: int, offset: int = 0) -> list[dict]:
    return [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(offset, offset + n)]


def _rows(records) -> list[tuple]:
    return [(r.prompt_text, r.completion_text, r.label) for r in records]


def test_unpairing_equals_trl_unpair_preference_dataset_in_order(write_lines, tmp_path):
    """2 500 pairs: TRL's batched map emits each block of 1 000 rows' chosen completions, then its rejected ones."""
    datasets = pytest.importorskip("datasets")
    from trl.data_utils import unpair_preference_dataset

    pairs = _pairs(2500)
    path = write_lines(tmp_path / "pairs.jsonl", pairs)
    trl = unpair_preference_dataset(datasets.Dataset.from_list(pairs))
    want = [(row["prompt"], row["completion"], row["label"]) for row in trl]
    records, report = read_unpaired_records(path, unpair=True)
    assert _rows(records) == want and report.formats == {str(path): "paired"} and report.num_records == 5000
    assert records[1000].source == (str(path), 1) and records[1000].label is False
    assert _rows(unpair_records(read_records(path)[0])) == want


def test_unpairing_conversational_and_implicit_prompt_pairs():
    datasets = pytest.importorskip("datasets")
    from trl.data_utils import extract_prompt, unpair_preference_dataset

    conv = [
        {
            "chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"good {i}"}],
            "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"bad {i}"}],
        }
        for i in range(3)
    ]
    trl = unpair_preference_dataset(datasets.Dataset.from_list(conv).map(extract_prompt))
    records, _ = read_unpaired_records(datasets.Dataset.from_list(conv), unpair=True)
    assert [(list(r.prompt), list(r.completion), r.label) for r in records] == [
        (row["prompt"], row["completion"], row["label"]) for row in trl
    ]
    assert all(r.conversational for r in records)


def test_pairs_need_unpair_and_k_responses_cannot_be_unpaired(write_lines, tmp_path):
    pairs = write_lines(tmp_path / "pairs.jsonl", _pairs(2))
    with pytest.raises(RecordError, match=r"pairs\.jsonl:1: <record>: a paired record \(trl_standard\); pass unpair"):
        read_unpaired_records(pairs)
    k = write_lines(tmp_path / "k.jsonl", [{"prompt": "q", "responses": ["a", "b"], "rewards": [1.0, 0.0]}])
    with pytest.raises(RecordError, match=r"k\.jsonl:1: <record>: a k_responses record has no chosen/rejected"):
        read_unpaired_records(k, unpair=True)
    bad_pair = write_lines(tmp_path / "bad.jsonl", [*_pairs(1), {"prompt": "q", "chosen": "a", "rejected": "a"}])
    with pytest.raises(RecordError, match=r"bad\.jsonl:2: rejected: chosen and rejected are identical"):
        read_unpaired_records(bad_pair, unpair=True)
    mixed = write_lines(tmp_path / "mixed.jsonl", [*_pairs(1), STANDARD])
    with pytest.raises(RecordError, match=r"mixed\.jsonl:2: <record>: an unpaired record in a file of pairs"):
        read_unpaired_records(mixed, unpair=True)


def test_unpaired_and_unpaired_pair_files_read_together(write_lines, tmp_path):
    first = write_lines(tmp_path / "a.jsonl", _pairs(2))
    second = write_lines(tmp_path / "b.jsonl", [STANDARD])
    records, report = read_unpaired_records([first, second], unpair=True)
    assert _rows(records) == [
        ("q0", "good 0", True),
        ("q1", "good 1", True),
        ("q0", "bad 0", False),
        ("q1", "bad 1", False),
        ("the cat", " sat on the mat", True),
    ]
    assert report.formats == {str(first): "paired", str(second): "unpaired"}


# Balance: TRL's KTO weight advice ----------------------------------------------------------------------------------


def _trl_kto_warnings(labels, desirable_weight, undesirable_weight, tokenizer) -> list[str]:
    """The warnings TRL 1.16's ``KTOTrainer._prepare_dataset`` logs for a train set with these labels."""
    datasets = pytest.importorskip("datasets")
    import trl.trainer.kto_trainer as kto_module

    trainer = object.__new__(kto_module.KTOTrainer)
    trainer.calculate_KL = False
    trainer.desirable_weight, trainer.undesirable_weight = desirable_weight, undesirable_weight
    trainer._tokenizer = tokenizer
    logged: list[str] = []
    log = types.SimpleNamespace(warning=lambda m, *a, **k: logged.append(m), warning_once=lambda *a, **k: None)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, per_device_train_batch_size=2)
    data = {"prompt": ["the cat"] * len(labels), "completion": [" sat"] * len(labels), "label": list(labels)}
    original, kto_module.logger = kto_module.logger, log
    try:
        trainer._prepare_dataset(datasets.Dataset.from_dict(data), tokenizer, args, "train")
    finally:
        kto_module.logger = original
    return logged


ADVICE_CASES = [
    # (desirable, undesirable, desirable_weight, undesirable_weight)
    (4, 4, 1.0, 1.0),  # balanced: no advice
    (6, 2, 1.0, 1.0),  # 3:1 at equal weights: advice
    (6, 2, 1.0, 2.5),  # undesirable_weight in TRL's range: no advice
    (6, 2, 0.4, 1.0),  # desirable_weight in range
    (2, 7, 1.0, 1.0),
    (2, 7, 3.0, 1.0),
    (5, 0, 1.0, 1.0),  # one class: TRL's clamped counts (1 undesirable)
    (0, 5, 1.0, 1.0),  # one class: n_D = 1, n_U = 5 − 1 = 4 (TRL's arithmetic)
    (1, 1, 1.0, 1.0),
    (3, 1, 1.0, 3.0),
]


def test_kto_weight_advice_is_the_warning_trl_logs(words_tokenizer):
    for desirable, undesirable, wd, wu in ADVICE_CASES:
        labels = [True] * desirable + [False] * undesirable
        advice = kto_weight_advice(LabelBalance(desirable, undesirable), desirable_weight=wd, undesirable_weight=wu)
        assert _trl_kto_warnings(labels, wd, wu, words_tokenizer) == ([] if advice is None else [advice]), (
            desirable,
            undesirable,
            wd,
            wu,
        )
    assert kto_weight_advice(LabelBalance(6, 2)) is not None and kto_weight_advice(LabelBalance(4, 4)) is None


def test_label_balance_and_one_class_warning(write_lines, tmp_path):
    path = write_lines(tmp_path / "u.jsonl", [STANDARD, STANDARD, {**STANDARD, "label": False}])
    balance = label_balance(read_unpaired_records(path)[0])
    assert balance == LabelBalance(2, 1) and balance.summary() == "desirable 2, undesirable 1 (66.7% desirable)"
    assert one_class_warning(balance) is None and one_class_warning(LabelBalance(0, 0)) is None
    assert one_class_warning(LabelBalance(3, 0)).startswith("all 3 records are desirable and none is undesirable")
    assert "only the undesirable term" in one_class_warning(LabelBalance(0, 2))


# rpo-data validate -----------------------------------------------------------------------------------------------


def test_validate_reports_the_balance_and_trl_advice(write_lines, tmp_path, capsys):
    path = write_lines(tmp_path / "u.jsonl", [STANDARD] * 6 + [CONVERSATIONAL] * 2)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"  {path}  [unpaired]" in out and "records: 8 valid (unpaired), 0 with problems" in out
    assert "labels: desirable 6, undesirable 2 (75.0% desirable)" in out
    assert "warning: You have different amounts of desirable/positive" in out
    assert "desirable_weight in [0.33, 0.44] or undesirable_weight in [2.26, 3.0]" in out
    assert main(["validate", str(path), "--undesirable-weight", "2.5"]) == 0
    out = capsys.readouterr().out
    assert "warning" not in out and "desirable_weight=1, undesirable_weight=2.5: in range" in out


def test_validate_lists_unpaired_problems_and_warns_on_one_class(write_lines, tmp_path, capsys):
    path = write_lines(tmp_path / "u.jsonl", [STANDARD, {**STANDARD, "label": 1}, {**STANDARD, "completion": ""}])
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "records: 1 valid (unpaired), 2 with problems" in out
    assert f"{path}:2: label: expected true or false (a boolean), got int 1" in out
    assert f"{path}:3: completion: empty" in out
    assert "warning: all 1 records are desirable and none is undesirable" in out


def test_validate_unpairs_paired_files_on_request(write_lines, tmp_path, capsys):
    path = write_lines(tmp_path / "pairs.jsonl", _pairs(3))
    assert main(["validate", str(path)]) == 0
    assert "K distribution: K=2: 3" in capsys.readouterr().out  # a paired file stays paired
    assert main(["validate", str(path), "--unpair"]) == 0
    out = capsys.readouterr().out
    assert f"  {path}  [paired]" in out and "labels: desirable 3, undesirable 3 (50.0% desirable)" in out
    assert "warning" not in out
