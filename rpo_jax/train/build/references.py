"""Frozen reference models of preference training and the cache of their log-probs (keyed by the fingerprints of
`rpo_jax.train.core.identity`).

References are frozen. Their sequence log-probs of every response, `[N, K, R]` for N records of a split, are
computed once by a precompute pass and stored beside the run under `WORKDIR/ref_cache/`, keyed by a
fingerprint of (reference checkpoint, tokenizer, tokenized data, max lengths); a later run with the same key
reuses them. The pass shows a progress bar on the main process (`compute_logps(progress=True)`: rpo-train
passes `config.train.progress_bar`) and logs what it computed and how long it took.

A reference with its own tokenizer scores the response *text* tokenized with that tokenizer and
its chat template (sequence log-probs of the same text are comparable across tokenizers; tokens are not).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from rpo_jax.data import TokenizedDataset, make_eval_batches, num_eval_batches, storage
from rpo_jax.train.build.fingerprints import dataset_fingerprint
from rpo_jax.train.runtime.global_batches import replicate, to_global

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Reference:
    """A frozen model that scores responses: its split nnx graph, parameters and tokenized data per split."""

    name: str  # checkpoint path, or "initial-policy"
    fingerprint: str  # identifies the weights (checkpoint hash, or the policy's init config+seed)
    graphdef: Any
    params: Any
    rest: Any
    datasets: dict[str, TokenizedDataset]  # split → the split tokenized with this reference's tokenizer
    tokenizer_name: str


def cache_key(reference: Reference, split: str) -> dict[str, Any]:
    ds = reference.datasets[split]
    return {
        "reference": reference.name,
        "checkpoint": reference.fingerprint,
        "tokenizer": reference.tokenizer_name,
        "data": dataset_fingerprint(ds),
        "max_length": ds.max_length,
        "split": split,
    }


def compute_logps(
    scorer: Callable,
    params: Any,
    dataset: TokenizedDataset,
    batch_size: int,
    mesh,
    *,
    prepare: Callable[[dict], dict] | None = None,
    description: str = "reference log-probs",
    progress: bool = False,
) -> np.ndarray:
    """`[N, K]` float32 sequence log-probs of every record's responses (NaN where absent or dropped).

    `scorer(params, global batch) -> logps [B, K]` replicated (`rpo_jax.train.step.steps.make_scorer`), so every process
    receives every row; each process feeds `batch_size` rows, and the batches cover the split once over all
    processes. `prepare(host batch) -> host batch` runs before `to_global` (e.g. packing, the layout the policy
    trains on: `rpo_jax.train.runtime.packed_rows.pack_local`). `description` names the pass in the log and on
    the progress bar (`progress`: shown on the main process only).
    """
    out = np.full((dataset.num_records, dataset.k_max), np.nan, np.float32)
    batches = num_eval_batches(dataset, batch_size, jax.process_count())
    log.info("%s: scoring %d records in %d batches", description, dataset.num_records, batches)
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=batches, desc=description, unit="batch", dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for batch in make_eval_batches(dataset, batch_size):
            device_batch = to_global(prepare(batch) if prepare is not None else batch, mesh)
            values = scorer(params, device_batch)
            index, valid = replicate((device_batch["index"], device_batch["valid"]), mesh)
            values, index, valid = (np.asarray(x) for x in (values, index, valid))
            rows = index >= 0
            out[index[rows]] = np.where(valid[rows], values[rows], np.nan)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    log.info("%s: done in %.1f s", description, time.perf_counter() - start)
    return out


def cached_logps(
    directory: storage.PathLike, reference: Reference, split: str, compute: Callable[[], np.ndarray]
) -> np.ndarray:
    """The `[N, K]` log-probs of `reference` on `split`, from the cache `directory` (a local path or a URL) or
    computed (then stored: the key beside it first, the array last and whole, so a present array is complete)."""
    key = cache_key(reference, split)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    directory = storage.as_path(directory)
    path = directory / f"{split}-{digest}.npy"
    if path.exists():
        log.info("reference cache hit: %s", path)
        return np.load(io.BytesIO(path.read_bytes()))
    values = compute()
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        storage.write_atomically(path.with_suffix(".json"), json.dumps(key, indent=1))
        buffer = io.BytesIO()
        np.save(buffer, values)
        storage.write_atomically(path, buffer.getvalue())
    multihost_utils.sync_global_devices(f"ref_cache_{digest}")
    return values
