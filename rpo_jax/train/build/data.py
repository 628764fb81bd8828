"""The data of a run: the tokenizer, data paths (`config.data.train` / `eval`, the bundled demo), records
read and validated, pairs derived (`config.data.pairs`), whether the records' rewards reach the loss
(`preference_direction`), and every split tokenized once.
"""

from __future__ import annotations

import importlib
import logging
import math
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from rpo_jax.data import (
    TokenizedDataset,
    demo_paths,
    holdout_split,
    label_score_counts,
    make_train_iterator,
    read_records,
    require_rewards,
    rewards_reach_loss,
    storage,
    to_pairs,
    tokenize_records,
)
from rpo_jax.train.config.schema import RunConfig
from rpo_jax.train.config.values import parse_pairs
from rpo_jax.train.runtime.global_batches import local_batch_size, process_rows

log = logging.getLogger(__name__)

#: Files of which a tokenizer directory has at least one (fast; SentencePiece; BPE or WordPiece vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def tokenizer_path(cfg: ml_collections.ConfigDict) -> str:
    """`config.model.tokenizer`, else `config.model.path`, else the demo's character tokenizer."""
    if cfg.model.tokenizer:
        return cfg.model.tokenizer
    if cfg.model.path:
        return cfg.model.path
    return demo_paths()["tokenizer"]


def load_tokenizer(path: str):
    """A transformers tokenizer (one without a pad token pads with its EOS token) from a local directory, a hub id
    or a URL (`gs://…`: the directory's files but weights read whole once per process, `storage.cached_copy`). A
    directory without tokenizer files, or one transformers cannot load, is an error naming the directory and what
    is wrong."""
    from transformers import AutoTokenizer

    local = storage.cached_copy(path)  # a URL (gs://…): its small files read whole, once per process
    directory = pathlib.Path(local)
    if directory.is_dir() and not any((directory / name).exists() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path}: no tokenizer in this directory (none of {', '.join(TOKENIZER_FILES)}); "
            "set config.model.tokenizer to a directory that has one"
        )
    try:
        tok = AutoTokenizer.from_pretrained(local)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; name the directory and the reason
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: the tokenizer does not load ({type(e).__name__}: {reason})") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# ------------------------------------------------------------------------------------------------ data
def import_object(spec: str) -> Any:
    """`"package.module:name"` → the object (a judge function)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"{spec!r}: expected 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{spec!r}: cannot import ({e})") from e


def data_paths(spec: str, split: str) -> list[str]:
    """`config.data.train` / `.eval` → files: comma-separated paths, or "" / "demo" for the bundled demo task
    (its train file for `split="train"`, its test file otherwise)."""
    if spec in ("", "demo"):
        return [demo_paths()["train" if split == "train" else "test"]]
    return [p for p in spec.split(",") if p]


def load_records(cfg: ml_collections.ConfigDict, *, requires_rewards: bool = False) -> dict[str, list]:
    """The train and eval records of `config.data`, read and validated; `requires_rewards` checks that every
    record has rewards before anything trains. Splits left empty are omitted."""
    dc = cfg.data
    fmt = dc.format or None
    train, report = read_records(data_paths(dc.train, "train"), format=fmt, on_error=dc.on_error)
    if report.num_skipped:
        log.warning("train data: %s", report.summary())
    if dc.eval or dc.train in ("", "demo"):
        evaluation, ereport = read_records(data_paths(dc.eval or dc.train, "eval"), format=fmt, on_error=dc.on_error)
        if ereport.num_skipped:
            log.warning("eval data: %s", ereport.summary())
    elif dc.eval_fraction > 0:
        parts = holdout_split(train, dc.eval_fraction, seed=cfg.seed)
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = []
    splits = {"train": train, "eval": evaluation}
    if dc.pairs:
        try:
            mode = parse_pairs(dc.pairs, allow_keep=False)  # `to_pairs`'s mode (aliases normalised)
        except ValueError as e:
            raise ValueError(f"config.data.pairs={dc.pairs!r}: {e}") from None
        for split, recs in list(splits.items()):
            per_record = [to_pairs([r], mode=mode) for r in recs]
            splits[split] = [pair for pairs in per_record for pair in pairs]
            tied = sum(not pairs for pairs in per_record)
            if tied:
                log.warning(
                    "%s data: %d of %d records give no pair under data.pairs=%r (all their rewards "
                    "tie); they are left out",
                    split,
                    tied,
                    len(recs),
                    dc.pairs,
                )
    if requires_rewards:
        for recs in splits.values():
            if recs:
                require_rewards(recs)
    if not splits["train"]:
        raise ValueError(
            f"data.train={dc.train!r}: no training records left"
            + (f" after data.pairs={dc.pairs!r}" if dc.pairs else "")
        )
    return {k: v for k, v in splits.items() if v}


def tokenize_splits(
    cfg: ml_collections.ConfigDict, records: Mapping[str, list], tokenizer
) -> dict[str, TokenizedDataset]:
    """`tokenize_records` of every split with `config.data`'s lengths and truncation; a split left empty is a
    ValueError."""
    dc = cfg.data
    out = {}
    for split, recs in records.items():
        ds = tokenize_records(
            recs,
            tokenizer,
            max_length=dc.max_length,
            max_prompt_length=dc.max_prompt_length or None,
            truncation=dc.truncation,
            on_error=dc.on_error,
        )
        log.info("%s: %s", split, ds.report.summary())
        if len(ds) == 0:
            raise ValueError(f"data.{split}: no example left after tokenization ({ds.report.summary()})")
        out[split] = ds
    return out


def preference_direction(
    cfg: ml_collections.ConfigDict, records: Mapping[str, list], loss_uses_rewards: bool
) -> tuple[bool, dict[str, Any]]:
    """Whether the records' rewards reach the loss (`rewards_reach_loss` with `config.data.pairs_from`), and
    the run's record of it: `{"pairs_from", "rewards_reach_loss", split: {"scored_pairs", "ties",
    "disagreements"}}`. Ties and label/score disagreements among labelled pairs are logged (a warning when
    there are any), never passed over in silence."""
    pairs_from = cfg.data.pairs_from
    every = [r for recs in records.values() for r in recs]
    to_loss = rewards_reach_loss(every, loss_uses_rewards=loss_uses_rewards, pairs_from=pairs_from)
    record: dict[str, Any] = {"pairs_from": pairs_from, "rewards_reach_loss": to_loss}
    for split, recs in records.items():
        counts = label_score_counts(recs)
        record[split] = counts.as_dict()
        if not counts.scored_pairs:
            continue
        if to_loss:
            how = (
                "the scores reach the loss: a tie contributes nothing, a disagreeing pair trains the other way "
                "round" + ("" if loss_uses_rewards else " (data.pairs_from='rewards')")
            )
        else:
            how = "trained as labelled (data.pairs_from='labels'; scores reach only reward-aware losses)"
        (log.warning if counts.ties or counts.disagreements else log.info)(
            "%s data, labels vs scores: %s; %s", split, counts.summary(), how
        )
    return to_loss, record


def largest_batch(dataset, size: int) -> dict:
    """The batch of `dataset`'s `size` examples with the most tokens (padding examples when it has fewer): the
    longest length bucket and the most packed rows — the largest batch of a run, which the fit check before step 1
    compiles (`rpo_jax.train.build.fit`; for a preference run's train split only when the run is longer than the
    steps whose batches it compiles). Every process picks the same examples."""
    tokens = [sum(len(s) for s in example.sequences) for example in dataset.examples]
    positions = sorted(range(len(tokens)), key=lambda i: -tokens[i])[:size]
    return dataset.collate(positions + [None] * (size - len(positions)))


def train_iterator(dataset: TokenizedDataset, cfg: RunConfig, mesh):
    """The run's resumable iterator of this process's host batches of `dataset` (the train split), from the start:
    `config.data.batch_size` over the processes that feed distinct rows (`process_rows`), `config.seed`'s order."""
    per_process, rows = local_batch_size(cfg.data.batch_size, mesh), process_rows(mesh)
    return make_train_iterator(dataset, per_process, seed=cfg.seed, shuffle=cfg.data.shuffle, **rows.iterator_args())


def distinct_inputs(batches: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One of each distinct step input among `batches` (its arrays' names, shapes and dtypes: one compiled program
    each), in order of first appearance; the others are let go as they come."""
    inputs = {}
    for batch in batches:
        inputs.setdefault(tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items())), batch)
    return list(inputs.values())


def epoch_steps(cfg, num_train: int) -> int:
    """The run's optimizer steps (per iteration): `config.train.steps`, or with `config.train.epochs` > 0
    ceil(epochs · ceil(N / data.batch_size)) for the N train examples (TRL's step count for `num_train_epochs`:
    ceil(ceil(N / per-device batch) / accumulation))."""
    epochs = float(cfg.train.epochs)
    if epochs <= 0:
        return int(cfg.train.steps)
    return math.ceil(epochs * math.ceil(num_train / cfg.data.batch_size))


def resolve_epochs(cfg: RunConfig, num_train: int) -> RunConfig:
    """`cfg` with `config.train.steps` = `epoch_steps(cfg, num_train)` when `config.train.epochs` > 0 (logged; a
    new frozen config), else `cfg` itself."""
    if float(cfg.train.epochs) <= 0:
        return cfg
    steps = epoch_steps(cfg, num_train)
    log.info("train.epochs=%g over %d examples: train.steps=%d", cfg.train.epochs, num_train, steps)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps})})
