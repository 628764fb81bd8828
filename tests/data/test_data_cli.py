"""rpo-data validate: report contents and exit status."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from rpo_jax.data import demo_paths
from rpo_jax.data.cli import main

GOOD = {"prompt": "q", "responses": ["a", "b", "c"], "rewards": [1.0, 0.5, 0.0]}


def test_clean_file_exits_zero_and_prints_statistics(write_lines, tmp_path, capsys):
    path = write_lines(tmp_path / "good.jsonl", [GOOD, {"prompt": "r", "responses": ["a", "b"], "rewards": [2, 1]}])
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "records: 2 valid, 0 with problems" in out
    assert "K distribution: K=2: 1, K=3: 1" in out
    assert "rewards: 2 of 2 records carry rewards" in out and "max=2" in out
    assert "problems: none" in out


def test_problems_are_listed_with_file_line_field_and_exit_one(write_lines, tmp_path, capsys):
    path = write_lines(
        tmp_path / "bad.jsonl", [GOOD, "{oops", {"prompt": "q", "responses": ["a", "b"], "rewards": [1.0]}, b"\xff\xfe"]
    )
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out
    assert "records: 1 valid, 3 with problems" in out
    assert f"{path}:2: <json>: malformed JSON" in out
    assert f"{path}:3: rewards: 1 rewards for 2 responses" in out
    assert f"{path}:4: <bytes>: invalid UTF-8" in out


def test_tokenizer_adds_lengths_and_truncation_and_prompt_problems(write_lines, tmp_path, capsys):
    tok = demo_paths()["tokenizer"]
    assert main(["validate", demo_paths()["test"], "--tokenizer", tok, "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    assert "prompt length:" in out and "p50=" in out and "200/200 records kept" in out
    long_prompt = {"prompt": [{"role": "user", "content": "sort: 1 2 3 4 5 6 7 8"}], "responses": ["1", "2"]}
    path = write_lines(tmp_path / "long.jsonl", [long_prompt])
    assert main(["validate", str(path), "--tokenizer", tok, "--max-length", "20"]) == 1
    out = capsys.readouterr().out
    assert f"{path}:1: prompt: prompt has 24 tokens, max_length 20" in out
    assert (
        main(["validate", str(path), "--tokenizer", tok, "--max-length", "20", "--truncation", "truncate_prompt"]) == 0
    )
    assert "prompts truncated 1" in capsys.readouterr().out


def test_bad_usage_exits_two(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_console_script_entry_point(write_lines, tmp_path):
    """The installed ``rpo-data`` script when present (setup.cfg entry point), else the same call."""
    path = write_lines(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    script = pathlib.Path(sys.executable).parent / "rpo-data"
    cmd = (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "import sys; from rpo_jax.data.cli import main; sys.exit(main())"]
    )
    proc = subprocess.run(cmd + ["validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 1 and f"{path}:1: rejected: chosen and rejected are identical" in proc.stdout
