"""Hugging Face ``datasets`` inputs read like JSONL: objects, save_to_disk directories, .arrow files."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

datasets = pytest.importorskip("datasets")

from rpo_jax.data import NoRecordsError, RecordError, read_prompts, read_records  # noqa: E402
from rpo_jax.data.cli import main  # noqa: E402

# Conversational prompt, K = 3 string responses, rewards: the same content in every input kind.
ROWS = [
    {
        "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"question {i}"}],
        "responses": [f"a{i}", f"b{i}", "c"],
        "rewards": [1.0, 0.5, float(i)],
    }
    for i in range(20)
]
BAD_ROW = 16  # 0-based: row 17 of the source
TRL_ROWS = [
    {"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "score_chosen": 1.0 + i, "score_rejected": 0.0}
    for i in range(4)
]


def _jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def expected(tmp_path):
    records, _ = read_records(_jsonl(tmp_path / "rows.jsonl", ROWS))
    return [r.content_key() for r in records]


@pytest.fixture
def saved(tmp_path):
    """A Dataset and a DatasetDict (train = ROWS, test = its first 3 rows) saved with save_to_disk."""
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
    return tmp_path


def _keys(records):
    return [r.content_key() for r in records]


def test_dataset_object_equals_jsonl(expected):
    records, report = read_records(datasets.Dataset.from_list(ROWS))
    assert _keys(records) == expected
    assert report.files == ["<Dataset>"] and report.formats == {"<Dataset>": "k_responses"}
    assert [r.source for r in records[:3]] == [("<Dataset>", 1), ("<Dataset>", 2), ("<Dataset>", 3)]
    assert records[0].conversational and records[0].rewards == (1.0, 0.5, 0.0)


def test_dataset_dict_needs_a_split(expected):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:2])})
    with pytest.raises(
        ValueError,
        match=r"^<DatasetDict>: a DatasetDict holds splits; choose one with split= "
        r"\(available splits: train, test\)$",
    ):
        read_records(dd)
    with pytest.raises(ValueError, match=r"^<DatasetDict>: no split 'valid' \(available splits: train, test\)$"):
        read_records(dd, split="valid")
    records, report = read_records(dd, split="train")
    assert _keys(records) == expected and report.files == ["<DatasetDict>[train]"]
    records, _ = read_records(dd, split="test")
    assert _keys(records) == expected[:2] and records[1].source == ("<DatasetDict>[test]", 2)


def test_save_to_disk_dataset_dir(saved, expected):
    records, report = read_records(saved / "single")
    assert _keys(records) == expected and report.files == [str(saved / "single")]
    assert records[19].source == (str(saved / "single"), 20)


def test_save_to_disk_dataset_dict_dir(saved, expected):
    dd = saved / "dd"
    for source, kw in [(f"{dd}:train", {}), (dd / "train", {}), (dd, {"split": "train"})]:
        records, report = read_records(source, **kw)
        assert _keys(records) == expected, source
        assert report.files == [str(dd / "train")] and records[0].source == (str(dd / "train"), 1)
    records, _ = read_records(f"{dd}:test")
    assert _keys(records) == expected[:3]
    with pytest.raises(ValueError) as info:
        read_records(dd)
    assert str(info.value) == (
        f"{dd}: a DatasetDict saved with save_to_disk; choose a split as {dd}:SPLIT, "
        f"{dd}/SPLIT or with split= (available splits: train, test)"
    )
    with pytest.raises(
        ValueError,
        match=r"dd: no split 'valid' in this DatasetDict \(available splits: train, "
        r"test\)$",
    ):
        read_records(f"{dd}:valid")
    with pytest.raises(ValueError, match=r"the path chooses split 'test' but split='train'"):
        read_records(f"{dd}:test", split="train")


def test_split_given_where_nothing_has_splits_and_foreign_inputs(saved):
    with pytest.raises(ValueError, match=r"^split='train' given, but no source is a DatasetDict"):
        read_records(saved / "single", split="train")
    with pytest.raises(TypeError, match=r"^cannot read a dict: expected a path, a datasets Dataset / DatasetDict"):
        read_records([{"prompt": "q"}])


def test_arrow_file(saved, expected, tmp_path):
    arrow = saved / "single" / "data-00000-of-00001.arrow"
    records, report = read_records(arrow)
    assert _keys(records) == expected and report.files == [str(arrow)] and records[16].source == (str(arrow), 17)
    import pyarrow as pa  # an Arrow IPC *file* (not the stream format datasets writes) reads the same

    table = pa.Table.from_pylist(ROWS)
    ipc = tmp_path / "ipc.arrow"
    with pa.OSFile(str(ipc), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    assert _keys(read_records(ipc)[0]) == expected


def test_directory_scan_never_mixes_saved_splits(saved):
    """A plain directory holding a saved DatasetDict is not read as .arrow shards (train and test mixed)."""
    (saved / "parent").mkdir()
    (saved / "dd").rename(saved / "parent" / "dd")
    with pytest.raises(ValueError, match=r"parent: directory holds no \.jsonl, \.jsonl\.gz, \.parquet shards"):
        read_records(saved / "parent")


def test_load_dataset_json_local_files(tmp_path, expected):
    path = _jsonl(tmp_path / "rows.jsonl", ROWS)
    dd = datasets.load_dataset("json", data_files=str(path), cache_dir=str(tmp_path / "cache"))
    records, report = read_records(dd, split="train")
    assert _keys(records) == expected and report.files == ["<DatasetDict>[train]"]
    records, _ = read_records(dd["train"])
    assert _keys(records) == expected


def test_trl_rows_iterable_formatted_and_several_datasets(tmp_path):
    jsonl, _ = read_records(_jsonl(tmp_path / "trl.jsonl", TRL_ROWS))
    ds = datasets.Dataset.from_list(TRL_ROWS)
    for source in (ds, ds.to_iterable_dataset(), ds.with_format("numpy")):
        records, report = read_records(source)
        assert _keys(records) == _keys(jsonl) and report.formats[report.files[0]] == "trl"
        assert records[3].rewards == (4.0, 0.0) and not records[3].conversational
    records, report = read_records([ds, ds.select([1])])
    assert report.files == ["<Dataset #1>", "<Dataset #2>"] and records[4].source == ("<Dataset #2>", 1)
    assert _keys(records) == _keys(jsonl) + _keys(jsonl)[1:2]


def _bad_rows():
    rows = [dict(r) for r in ROWS]
    rows[BAD_ROW] = {**rows[BAD_ROW], "responses": ["same", "same", "c"]}
    rows[18] = {**rows[18], "prompt": [{"role": "bot", "content": "q"}]}
    return rows


def test_bad_row_names_the_source_and_row(tmp_path):
    ds = datasets.Dataset.from_list(_bad_rows())
    with pytest.raises(RecordError) as info:
        read_records(ds)
    assert str(info.value) == "<Dataset>:17: responses: responses 0 and 1 are identical"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(RecordError) as info:
        read_records(f"{tmp_path / 'dd'}:train")
    assert str(info.value) == f"{tmp_path / 'dd' / 'train'}:17: responses: responses 0 and 1 are identical"
    records, report = read_records(tmp_path / "dd", split="train", on_error="skip")
    assert len(records) == 18 and report.num_skipped == 2 and report.num_records == 18
    assert [str(p) for p in report.problems] == [
        f"{tmp_path / 'dd' / 'train'}:17: responses: responses 0 and 1 are identical",
        f"{tmp_path / 'dd' / 'train'}:19: prompt[0].role: unknown role 'bot' (expected one of 'system', 'user', "
        "'assistant', 'tool')",
    ]


def test_null_from_arrow_is_validated_like_json_null(tmp_path):
    """Arrow gives every row every column: a key absent from one JSON line is null in that row."""
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "r", "chosen": "a"}]
    dd = datasets.load_dataset(
        "json", data_files=str(_jsonl(tmp_path / "x.jsonl", rows)), cache_dir=str(tmp_path / "cache")
    )
    with pytest.raises(
        RecordError,
        match=r"^<DatasetDict>\[train\]:2: rejected: expected str \(the prompt is a "
        r"string\), got null$",
    ):
        read_records(dd, split="train")


def test_all_rows_bad_and_prompts(saved):
    ds = datasets.Dataset.from_list([{"prompt": "", "responses": ["a", "b"]}] * 3)
    with pytest.raises(
        NoRecordsError,
        match=r"^<Dataset>: all 3 records were skipped \(first problems: "
        r"<Dataset>:1: prompt: empty; <Dataset>:2: prompt: empty; "
        r"<Dataset>:3: prompt: empty\)$",
    ):
        read_records(ds, on_error="skip")
    prompts, report = read_prompts(saved / "dd", split="test")
    assert [p.prompt_text for p in prompts] == ["be brief\nquestion 0", "be brief\nquestion 1", "be brief\nquestion 2"]
    assert report.files == [str(saved / "dd" / "test")] and prompts[2].source == (str(saved / "dd" / "test"), 3)


def test_empty_and_corrupt_arrow_are_problems(tmp_path):
    corrupt = tmp_path / "bad.arrow"
    corrupt.write_bytes(b"not an arrow stream at all")
    with pytest.raises(RecordError, match=r"bad\.arrow:0: <file>: cannot read arrow file: "):
        read_records(corrupt)
    empty = datasets.Dataset.from_dict({"prompt": [], "responses": []})
    with pytest.raises(RecordError, match=r"^<Dataset>:0: <file>: no records \(the file is empty\)$"):
        read_records(empty)


def test_validate_cli_reads_saved_datasets(saved, capsys):
    dd = saved / "dd"
    assert main(["validate", f"{dd}:test"]) == 0
    out = capsys.readouterr().out
    assert f"{dd / 'test'}  [k_responses]" in out and "records: 3 valid, 0 with problems" in out
    assert main(["validate", str(dd), "--split", "train"]) == 0
    assert "records: 20 valid" in capsys.readouterr().out
    assert main(["validate", str(dd)]) == 2
    assert "available splits: train, test" in capsys.readouterr().err


def test_records_module_does_not_import_datasets():
    code = (
        "import sys, rpo_jax.data.records, rpo_jax.data.prompts, rpo_jax.data.sources; "
        "assert 'datasets' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
