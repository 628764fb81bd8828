"""TFDS builder: array_record splits read back through tfds.data_source, without TensorFlow."""

from __future__ import annotations

import sys

import pytest

from rpo_jax.data import build_tfds, load_tfds_records, read_records, tfds_data_source


def _rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"question {i} é"}],
            "responses": [f"a{i}", f"b{i}"],
            "rewards": [1.0, float(i)],
        }
        for i in range(offset, offset + n)
    ]


def test_given_split_files_round_trip(write_lines, tmp_path):
    train = write_lines(tmp_path / "train.jsonl", _rows(7))
    test = write_lines(tmp_path / "test.jsonl", _rows(3, offset=100))
    builder_dir, reports = build_tfds(tmp_path / "tfds", splits={"train": [train], "validation": [test]}, name="given")
    assert builder_dir.endswith("rpo_preferences/given/1.0.0")
    assert reports["train"].num_records == 7 and reports["validation"].num_records == 3
    for split, path in (("train", train), ("validation", test)):
        assert load_tfds_records(tmp_path / "tfds", split, name="given") == read_records(path)[0]  # incl. source
    source = tfds_data_source(tmp_path / "tfds", "validation", name="given")
    assert type(source).__name__ == "ArrayRecordDataSource" and len(source) == 3
    assert int(source[2]["index"]) == 2
    assert "tensorflow" not in sys.modules  # the TF-free path


def test_holdout_fraction_is_seeded_disjoint_and_complete(write_lines, tmp_path):
    src = write_lines(tmp_path / "all.jsonl", _rows(40))
    build_tfds(tmp_path / "a", sources=src, holdout_fraction=0.25, seed=5)
    build_tfds(tmp_path / "b", sources=[src], holdout_fraction=0.25, seed=5)
    build_tfds(tmp_path / "c", sources=[src], holdout_fraction=0.25, seed=6)
    train, test = (load_tfds_records(tmp_path / "a", s) for s in ("train", "test"))
    assert (len(train), len(test)) == (30, 10)
    lines = lambda recs: [r.source[1] for r in recs]  # noqa: E731
    assert sorted(lines(train) + lines(test)) == list(range(1, 41))
    assert lines(train) == sorted(lines(train)) and lines(test) == sorted(lines(test))  # source order kept
    assert lines(load_tfds_records(tmp_path / "b", "test")) == lines(test)
    assert lines(load_tfds_records(tmp_path / "c", "test")) != lines(test)


def test_builder_reports_and_refuses_bad_records(write_lines, tmp_path):
    src = write_lines(tmp_path / "bad.jsonl", _rows(2) + [{"prompt": "q", "responses": ["a"]}])
    from rpo_jax.data import RecordError

    with pytest.raises(RecordError, match=r"bad\.jsonl:3: responses: fewer than 2"):
        build_tfds(tmp_path / "x", sources=src, name="strict")
    _, reports = build_tfds(tmp_path / "y", sources=src, name="lenient", on_error="skip")
    assert reports["all"].num_skipped == 1
    assert len(load_tfds_records(tmp_path / "y", "train", name="lenient")) == 2
    with pytest.raises(ValueError, match="no prepared dataset"):
        load_tfds_records(tmp_path / "nothing", "train")
