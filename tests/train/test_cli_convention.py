"""One command-line convention: `rpo-train`, `rpo-plan`, `rpo-export`, `rpo-data` and `rpo-eval` each answer
`--help` with what they do and their flags, spelled with dashes (absl's underscore spelling stays accepted)."""

from __future__ import annotations

import re

import pytest

from rpo_jax.data import cli as data_cli
from rpo_jax.train.cli import evaluate as eval_cli
from rpo_jax.train.cli import export as export_cli
from rpo_jax.train.cli import plan as plan_cli
from rpo_jax.train.cli import train as train_cli
from rpo_jax.train.cli.common import dashed_flags


def help_of(main, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code in (0, None)
    return capsys.readouterr().out


def test_every_command_explains_itself_with_dashed_flags(capsys):
    train = help_of(lambda: train_cli.main(["--help"]), capsys)
    plan = help_of(lambda: plan_cli.main(["rpo-plan", "--help"]), capsys)
    export = help_of(lambda: export_cli.export_main(["--help"]), capsys)
    data = help_of(lambda: data_cli.main(["--help"]), capsys)
    evaluate = help_of(lambda: eval_cli.main(["--help"]), capsys)
    assert train.startswith("usage: rpo-train") and "the reference cache" in train
    for flag in ("--workdir", "--from-trl", "--[no]precompute", "--config.KEY=VALUE"):
        assert flag in train, flag
    assert plan.startswith("usage: rpo-plan") and "ahead of time" in plan
    for flag in ("--topology", "--dump-hlo", "--responses", "--[no]rewards", "--config.KEY=VALUE"):
        assert flag in plan, flag
    assert export.startswith("usage: rpo-export") and "--adapter" in export and "Hugging Face" in export
    assert data.startswith("usage: rpo-data") and "validate" in data
    assert evaluate.startswith("usage: rpo-eval") and "win rate" in evaluate
    for flag in ("--policy", "--baseline", "--prompts", "--judge", "--out", "--judge-template"):
        assert flag in evaluate, flag
    for text in (train, plan, export, data, evaluate):  # flags of more than one word are spelled with dashes
        assert not re.search(r"--(\[no\])?[a-z]+_[a-z_]+", text.split("Exit status")[0]), text


def test_dashed_flags_map_onto_absl_names():
    args = ["--from-trl=x.yaml", "--dump-hlo", "d", "--config.data.batch_size=4", "--from_trl=y", "--other-flag"]
    assert dashed_flags(args, {"from_trl", "dump_hlo"}) == [
        "--from_trl=x.yaml",
        "--dump_hlo",
        "d",
        "--config.data.batch_size=4",
        "--from_trl=y",
        "--other-flag",
    ]
