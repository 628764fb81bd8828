"""``rpo-data validate FILE... [--tokenizer NAME_OR_DIR] [--max-length N] [--format F] [--split S]``.

Reads every file (or directory of shards, ``.arrow`` file, Hugging Face ``save_to_disk`` directory; a saved
``DatasetDict``'s split as ``DIR:split``, ``DIR/split`` or ``--split``), prints the number of records, the K
distribution, reward statistics, ties and label/score disagreements of labelled pairs (TRL/NeMo files with
scores), and with a tokenizer the token-length percentiles and truncation counts, then every problem as
``file:line: field: message``. Exit status 1 when any record has a problem, 2 for bad usage, else 0.

Unpaired files (``{prompt, completion, label}``, detected from the first record, or ``--unpaired``; paired files
read as unpaired with ``--unpair``, as TRL's ``unpair_preference_dataset``) get the desirable / undesirable
balance instead, TRL's KTO weight advice for ``--desirable-weight`` / ``--undesirable-weight`` (default 1) and a
warning when every record has one label; warnings do not change the exit status (TRL trains on such data).
"""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Sequence
from typing import TextIO

import numpy as np

from rpo_jax.data.records import FORMATS, NoRecordsError, read_records
from rpo_jax.data.selection import label_score_counts
from rpo_jax.data.sources import iter_raw, resolve_sources
from rpo_jax.data.tokenize import TRUNCATION_POLICIES
from rpo_jax.data.unpaired import (
    is_unpaired_object,
    kto_weight_advice,
    label_balance,
    one_class_warning,
    read_unpaired_records,
)


def _percentiles(values: Sequence[float], qs: Sequence[int] = (0, 50, 90, 99, 100)) -> str:
    arr = np.asarray(values, np.float64)
    return "  ".join(f"p{q}={np.percentile(arr, q):g}" for q in qs)


def validate(
    paths: Sequence[str],
    *,
    tokenizer: str | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation: str = "drop",
    format: str | None = None,
    split: str | None = None,
    out: TextIO | None = None,
    unpaired: bool | None = None,
    unpair: bool = False,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> int:
    """Validate files and print a report to ``out`` (stdout); returns the exit status (0 clean, 1 problems).

    ``unpaired``: read unpaired records (None: with ``unpair``, or when no ``format`` is declared and the first
    record of the first source is unpaired);
    ``unpair``: paired sources too, each pair as two records; the weights: those the KTO advice is computed for.
    """
    out = sys.stdout if out is None else out
    if unpaired is None:
        unpaired = unpair or (format is None and _first_record_is_unpaired(paths, split))
    if unpaired:
        weights = (desirable_weight, undesirable_weight)
        return _validate_unpaired(paths, unpair=unpair, split=split, weights=weights, tokenizer=tokenizer, out=out)
    try:
        records, report = read_records(paths, format=format, on_error="skip", split=split)
    except NoRecordsError as e:  # every record bad: list them all like any other problems
        records, report = [], e.report
    problems = list(report.problems)
    print(f"files: {len(report.files)}", file=out)
    for f in report.files:
        print(f"  {f}  [{report.formats.get(f, 'no valid record')}]", file=out)
    print(f"records: {len(records)} valid, {report.num_skipped} with problems", file=out)
    ks = collections.Counter(r.num_responses for r in records)
    print("K distribution: " + (", ".join(f"K={k}: {n}" for k, n in sorted(ks.items())) or "-"), file=out)
    conv = sum(r.conversational for r in records)
    print(f"conversational: {conv}, plain strings: {len(records) - conv}", file=out)
    with_rewards = [r for r in records if r.rewards is not None]
    print(f"rewards: {len(with_rewards)} of {len(records)} records carry rewards", file=out)
    if with_rewards:
        flat = [x for r in with_rewards for x in r.rewards]
        gap = [max(r.rewards) - min(r.rewards) for r in with_rewards]
        ties = sum(len(set(r.rewards)) < len(r.rewards) for r in with_rewards)
        print(
            f"  reward mean={np.mean(flat):.4g} std={np.std(flat):.4g} min={min(flat):.4g} max={max(flat):.4g}",
            file=out,
        )
        print(f"  best-worst gap: {_percentiles(gap)}; records with tied rewards: {ties}", file=out)
    counts = label_score_counts(records)
    if counts.scored_pairs:
        print(f"labels vs scores: {counts.summary()}", file=out)
        print(
            "  with a preference-only loss (dpo, ipo, ...) every pair trains as labelled (data.pairs_from="
            "'labels'); with data.pairs_from='rewards' or a reward-aware loss the scores decide: a tie "
            "contributes nothing, a disagreeing pair trains the other way round",
            file=out,
        )
        for kind, sources in (("tie", counts.tie_sources), ("disagreement", counts.disagreement_sources)):
            for file, line in sources:
                print(f"  {kind}: {file}:{line}", file=out)
    if tokenizer is not None:
        from transformers import AutoTokenizer

        from rpo_jax.data.tokenize import tokenize_records

        tok = AutoTokenizer.from_pretrained(tokenizer)
        limit = max_length if max_length is not None else int(min(getattr(tok, "model_max_length", 4096), 1 << 20))
        ds = tokenize_records(
            records,
            tok,
            max_length=limit,
            max_prompt_length=max_prompt_length,
            truncation=truncation,
            on_error="skip",
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
        rep = ds.report
        problems += rep.problems
        print(f"tokens ({tokenizer}, max_length={limit}, truncation={truncation}):", file=out)
        if rep.prompt_lengths:
            print(f"  prompt length:             {_percentiles(rep.prompt_lengths)}", file=out)
            print(f"  prompt + response length:  {_percentiles(rep.sequence_lengths)}", file=out)
        print(f"  {rep.summary()}", file=out)
    elif max_length is not None:
        print("(--max-length needs --tokenizer; token checks skipped)", file=out)
    if problems:
        print(f"problems: {len(problems)}", file=out)
        for p in problems:
            print(f"  {p}", file=out)
        return 1
    print("problems: none", file=out)
    return 0


def _first_record_is_unpaired(paths: Sequence[str], split: str | None) -> bool:
    for source in resolve_sources(paths, split=split):
        for _, obj, _ in iter_raw(source):
            if obj is not None:
                return is_unpaired_object(obj)
    return False


def _validate_unpaired(
    paths: Sequence[str],
    *,
    unpair: bool,
    split: str | None,
    weights: tuple[float, float],
    tokenizer: str | None,
    out: TextIO,
) -> int:
    try:
        records, report = read_unpaired_records(paths, unpair=unpair, on_error="skip", split=split)
    except NoRecordsError as e:
        records, report = [], e.report
    print(f"files: {len(report.files)}", file=out)
    for f in report.files:
        print(f"  {f}  [{report.formats.get(f, 'no valid record')}]", file=out)
    print(f"records: {len(records)} valid (unpaired), {report.num_skipped} with problems", file=out)
    conv = sum(r.conversational for r in records)
    print(f"conversational: {conv}, plain strings: {len(records) - conv}", file=out)
    balance = label_balance(records)
    print(f"labels: {balance.summary()}", file=out)
    advice = kto_weight_advice(balance, desirable_weight=weights[0], undesirable_weight=weights[1])
    for warning in (one_class_warning(balance), advice):
        if warning is not None:
            print(f"  warning: {warning}", file=out)
    if advice is None and records:
        print(f"  KTO weights desirable_weight={weights[0]:g}, undesirable_weight={weights[1]:g}: in range", file=out)
    if tokenizer is not None:
        print("(--tokenizer: token checks of unpaired records are not implemented yet; skipped)", file=out)
    if report.problems:
        print(f"problems: {len(report.problems)}", file=out)
        for p in report.problems:
            print(f"  {p}", file=out)
        return 1
    print("problems: none", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``rpo-data``."""
    parser = argparse.ArgumentParser(prog="rpo-data", description="rpo_jax preference data tools")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check records (and token lengths with --tokenizer)")
    v.add_argument(
        "files",
        nargs="+",
        help=".jsonl, .jsonl.gz, .parquet, .arrow files, directories of shards, "
        "or datasets save_to_disk directories (a DatasetDict's split as DIR:split or DIR/split)",
    )
    v.add_argument("--tokenizer", help="Hugging Face tokenizer name or directory")
    v.add_argument("--max-length", type=int, help="longest prompt + response in tokens")
    v.add_argument("--max-prompt-length", type=int, help="longest prompt in tokens")
    v.add_argument("--truncation", choices=TRUNCATION_POLICIES, default="drop")
    v.add_argument("--format", choices=FORMATS + ("trl",), help="declare the format instead of detecting it")
    v.add_argument("--split", help="the split of a DatasetDict save_to_disk directory")
    v.add_argument(
        "--unpaired", action="store_true", default=None, help="read unpaired records {prompt, completion, label}"
    )
    v.add_argument("--unpair", action="store_true", help="read pairs as unpaired records (TRL's unpairing)")
    v.add_argument("--desirable-weight", type=float, default=1.0, help="KTO desirable_weight for the advice")
    v.add_argument("--undesirable-weight", type=float, default=1.0, help="KTO undesirable_weight for the advice")
    args = parser.parse_args(argv)
    try:
        status = validate(
            args.files,
            tokenizer=args.tokenizer,
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            truncation=args.truncation,
            format=args.format,
            split=args.split,
            unpaired=args.unpaired,
            unpair=args.unpair,
            desirable_weight=args.desirable_weight,
            undesirable_weight=args.undesirable_weight,
        )
    except ValueError as e:  # missing file, unsupported suffix, no split chosen, bad option values
        print(f"rpo-data: error: {e}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
