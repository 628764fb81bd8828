"""What a run's batches carry for the losses of TRL's other preference trainers.

* Unpaired losses (`kto`, `apo_zero_unpaired`, `bco`): the records of `config.data` read as unpaired records
  (`{prompt, completion, label}`; labelled pairs, or the pairs `data.pairs` derives from rewards, split in two with
  `data.unpair=True`, as TRL's `unpair_preference_dataset`), tokenized as TRL's `KTOTrainer` does
  (`rpo_jax.data.tokenize_unpaired`; `kto`: with each record's mismatched completion, in blocks of one micro-batch
  of `data.batch_size / data.micro_batches` records), the label balance and TRL's weight advice logged after the
  length filter; and each train batch's rows put in micro-batch order (`in_micro_batch_order`), so that the step's
  micro-batch m holds the m-th block of consecutive records, as TRL's m-th per-device batch.
* `orpo` with `nll_tokens="sequence"`: padded batches (`packing_for_loss`), whose prompt tokens the step reads.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import ml_collections
import numpy as np

from rpo_jax.data import (
    holdout_split,
    kto_weight_advice,
    one_class_warning,
    read_records,
    read_unpaired_records,
    to_pairs,
    tokenize_unpaired,
    unpair_records,
)
from rpo_jax.data.packing import Packing
from rpo_jax.data.unpaired import UNPAIRED_FORMAT
from rpo_jax.data.unpaired_tokenize import UnpairedDataset
from rpo_jax.train.build.data import data_paths
from rpo_jax.train.config.values import parse_pairs

log = logging.getLogger(__name__)


def read_unpaired_split(cfg: ml_collections.ConfigDict, spec: str, split: str) -> list:
    """The unpaired records of `spec` (`config.data.train` / `.eval`; "demo": the demo's file of `split`).

    With `data.pairs`, the records' pairs derived from their rewards (best ≻ worst, or every scored pair), each a
    desirable and an undesirable record (`unpair_records`: blocks of `data.unpair_block` pairs, each block's
    desirable records then its undesirable ones, TRL's order at 1000); else unpaired files as they are and, with
    `data.unpair`, files of labelled pairs split the same way. A file of pairs without `data.unpair` is a
    ValueError naming it."""
    dc = cfg.data
    paths = data_paths(spec, split)
    if dc.pairs:
        records, report = read_records(paths, format=dc.format or None, on_error=dc.on_error)
        mode = parse_pairs(dc.pairs, allow_keep=False)
        pairs = [dataclasses.replace(p, labelled=True) for r in records for p in to_pairs([r], mode=mode)]
        if len(pairs) < len(records) and mode == "best_vs_worst":
            log.warning("%s data: %d records give no pair (their rewards tie)", split, len(records) - len(pairs))
        out = unpair_records(pairs, batch_size=dc.unpair_block)
    else:
        out, report = read_unpaired_records(paths, unpair=True, on_error=dc.on_error, batch_size=dc.unpair_block)
        paired = [name for name, fmt in report.formats.items() if fmt != UNPAIRED_FORMAT]
        if paired and not dc.unpair:
            raise ValueError(
                f"{paired[0]}: labelled pairs, but loss {cfg.loss.name!r} trains on unpaired records "
                "({prompt, completion, label}); set config.data.unpair=True to read each pair as a desirable and "
                "an undesirable record (TRL's unpair_preference_dataset, which KTOTrainer applies to paired data)"
            )
    if report.num_skipped:
        log.warning("%s data: %s", split, report.summary())
    return out


def load_unpaired_records(cfg: ml_collections.ConfigDict) -> dict[str, list]:
    """The train and eval splits of unpaired records (`read_unpaired_split`; the eval split as `load_records`
    decides it: `data.eval`, the demo's, or `data.eval_fraction` of train). Splits left empty are omitted."""
    dc = cfg.data
    train = read_unpaired_split(cfg, dc.train, "train")
    if dc.eval or dc.train in ("", "demo"):
        evaluation = read_unpaired_split(cfg, dc.eval or dc.train, "eval")
    elif dc.eval_fraction > 0:
        parts = holdout_split(train, dc.eval_fraction, seed=cfg.seed)
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = []
    return {k: v for k, v in {"train": train, "eval": evaluation}.items() if v}


def mismatched_block(cfg: ml_collections.ConfigDict, spec) -> int | None:
    """The records of one micro-batch (`data.batch_size / data.micro_batches`, TRL's `per_device_train_batch_size`)
    for a loss with a KL reference point (`kto`), among which mismatched completions are paired; else None."""
    return cfg.data.batch_size // cfg.data.micro_batches if spec.requires_kl_logps else None


def unpaired_datasets(cfg: ml_collections.ConfigDict, tokenizer, loss_fn) -> dict[str, UnpairedDataset]:
    """Every split read (`load_unpaired_records`) and tokenized (`tokenize_unpaired` with `config.data`'s lengths
    and truncation); the train split's label balance logged, with TRL's KTO weight advice and a one-class
    warning. A split left empty is a ValueError."""
    dc = cfg.data
    out = {}
    for split, records in load_unpaired_records(cfg).items():
        ds = tokenize_unpaired(
            records,
            tokenizer,
            max_length=dc.max_length,
            max_prompt_length=dc.max_prompt_length or None,
            truncation=dc.truncation,
            mismatched_block=mismatched_block(cfg, loss_fn.spec),
            on_error=dc.on_error,
        )
        log.info("%s: %s", split, ds.report.summary())
        if len(ds) == 0:
            raise ValueError(f"data.{split}: no example left after tokenization ({ds.report.summary()})")
        out[split] = ds
    log_label_balance(out["train"], loss_fn.spec.hparams[loss_fn.spec.name])
    return out


def log_label_balance(dataset: UnpairedDataset, hparams: Mapping) -> None:
    """The train split's desirable / undesirable counts (info), TRL's `KTOTrainer` weight advice for them and the
    loss's `desirable_weight` / `undesirable_weight` (a warning, as TRL logs it; losses with those weights only),
    and a warning when every record has one label (TRL trains on it)."""
    balance = dataset.balance
    log.info("train data labels: %s", balance.summary())
    if "desirable_weight" in hparams:
        advice = kto_weight_advice(
            balance, desirable_weight=hparams["desirable_weight"], undesirable_weight=hparams["undesirable_weight"]
        )
        if advice:
            log.warning("%s", advice)
    warning = one_class_warning(balance)
    if warning:
        log.warning("train data: %s", warning)


def micro_batch_order(rows: int, micro_batches: int) -> np.ndarray:
    """`[rows]`: which row of a host batch goes where so that the step's micro-batch m (rows m, m + M, ...:
    `split_micro_batches`) holds rows m·b .. (m+1)·b − 1 in order, b = rows / M: `out[i·M + m] = m·b + i`. The
    identity for M = 1 or rows not divisible by M."""
    if micro_batches <= 1 or rows % micro_batches:
        return np.arange(rows)
    return np.arange(rows).reshape(micro_batches, rows // micro_batches).T.reshape(-1)


def in_micro_batch_order(batch: Mapping[str, np.ndarray], micro_batches: int) -> dict[str, np.ndarray]:
    """A host batch (every array `[B, ...]`) with its rows in `micro_batch_order`."""
    order = micro_batch_order(int(np.shape(batch["valid"])[0]), micro_batches)
    return {k: np.asarray(v)[order] for k, v in batch.items()}


def packing_for_loss(packing: Packing | None, spec) -> Packing | None:
    """`packing`, or None (padded batches, logged) for a loss that reads each sequence's prompt + response
    log-probs (`orpo` with `nll_tokens="sequence"`: packed rows do not mark a sequence's prompt tokens;
    `data.packing=True` is refused by the schema)."""
    if packing is not None and spec.requires_sequence_logps:
        log.info("config.data.packing='auto': padded batches (loss %r reads every sequence's prompt tokens)", spec.name)
        return None
    return packing
