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
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from rpo_jax.data import TokenizedDataset, make_eval_batches, num_eval_batches, storage, tokenize_records
from rpo_jax.train.build.data import load_tokenizer, tokenizer_path
from rpo_jax.train.build.fingerprints import checkpoint_fingerprint, dataset_fingerprint, weights_fingerprint
from rpo_jax.train.build.lora import lora_enabled, lora_reference_is_base
from rpo_jax.train.build.model import adapters_off_graphdef, load_model, split_trainable
from rpo_jax.train.build.state import RunSetup
from rpo_jax.train.runtime.global_batches import process_rows, replicate, to_global

log = logging.getLogger(__name__)

#: The name of the reference that is the initial policy (an empty `config.references[i].path`).
INITIAL_POLICY = "initial-policy"


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
    rows = process_rows(mesh)  # processes of one row group feed the same rows; every row is scored once
    batches = num_eval_batches(dataset, batch_size, rows.count)
    log.info("%s: scoring %d records in %d batches", description, dataset.num_records, batches)
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=batches, desc=description, unit="batch", dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for batch in make_eval_batches(dataset, batch_size, **rows.iterator_args()):
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


# ------------------------------------------------------------------------------------------------ building
def build_references(
    cfg: ml_collections.ConfigDict, setup: RunSetup, datasets: Mapping[str, TokenizedDataset], loss_fn
) -> list[Reference]:
    """The references of `config.references` (index 0 the primary; an empty path, or an empty list, is the
    initial policy), none for a reference-free loss. A reference with its own tokenizer gets the records tokenized
    with it."""
    if not loss_fn.spec.requires_reference:
        return []
    references = []
    for spec in [dict(s) for s in cfg.references] or [{"path": "", "tokenizer": ""}]:
        if not spec.get("path"):
            references.append(initial_policy_reference(cfg, setup, datasets))
            continue
        model, _ = load_model(spec["path"], cfg, setup.mesh, setup.dtype)
        graphdef, params, rest = split_trainable(model)
        tokenizer_name = spec.get("tokenizer") or spec["path"]
        own = datasets
        if tokenizer_name != tokenizer_path(cfg):
            tokenizer = load_tokenizer(tokenizer_name)
            own = {
                split: tokenize_records(
                    ds.records,
                    tokenizer,
                    max_length=cfg.data.max_length,
                    max_prompt_length=cfg.data.max_prompt_length or None,
                    truncation=cfg.data.truncation,
                    k_max=ds.k_max,
                    on_error=cfg.data.on_error,
                )
                for split, ds in datasets.items()
            }
        references.append(
            Reference(spec["path"], weights_fingerprint(spec["path"], cfg), graphdef, params, rest, own, tokenizer_name)
        )
    loss_fn.spec.check_reference_count(len(references), given="config.references")
    return references


def initial_policy_reference(
    cfg: ml_collections.ConfigDict, setup: RunSetup, datasets: Mapping[str, TokenizedDataset]
) -> Reference:
    """The primary reference of an empty path. Without LoRA: the initial policy, a copy of its parameters.

    With LoRA (`config.model.lora.reference`): "base" (the default, TRL's for a PEFT model without ref_model) is
    the policy's own weights with the adapters switched off — `adapters_off_graphdef`, with parameters and rest
    None: the step (and the cache fill) use the policy's, nothing is copied; it is the base without any adapter,
    also when the run starts from `init_from`'s. "initial": base + the adapters the run starts from (a copy of
    the adapters only; rest None, the policy's)."""
    fingerprint = weights_fingerprint(cfg.model.path, cfg, len(setup.tokenizer))
    params = setup.state["params"]
    if not lora_enabled(cfg):
        return Reference(
            INITIAL_POLICY,
            fingerprint,
            setup.graphdef,
            jax.tree.map(jnp.copy, params),
            setup.rest,
            datasets,
            tokenizer_path(cfg),
        )
    lora = cfg.model.lora
    if lora.base_dtype:
        fingerprint = f"{fingerprint}+base_dtype={lora.base_dtype}"
    if not lora_reference_is_base(cfg):  # "initial"
        adapter = checkpoint_fingerprint(lora.init_from) if lora.init_from else f"fresh-seed={cfg.seed}"
        return Reference(
            INITIAL_POLICY,
            f"{fingerprint}+adapter={adapter}",
            setup.graphdef,
            jax.tree.map(jnp.copy, params),
            None,
            datasets,
            tokenizer_path(cfg),
        )
    return Reference(
        INITIAL_POLICY,
        fingerprint,
        adapters_off_graphdef(setup.graphdef, params, setup.rest),
        None,
        None,
        datasets,
        tokenizer_path(cfg),
    )
