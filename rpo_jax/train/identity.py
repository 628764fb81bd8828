"""What makes a run the run it is, and the fingerprints it is made of.

A run's identity (`run_identity`) is recorded in WORKDIR/run_identity.json when the run starts; resuming the work
directory compares it with the identity of the new invocation (`identity_differences`) and refuses a different run
(`config.train.resume`, `rpo_jax.train.runner`). It holds what changes the trained model:

    mode          preference | online | reward_model
    model         the architecture (ModelConfig; speed-only switches left out) and the weights it starts from
    tokenizer     its vocabulary and chat template
    objective     the loss and its hyperparameters, references, and the mode's own settings
    data          a fingerprint of every split's tokenized examples (or prompts)
    settings      seed, global batch, parameter dtype, optimizer

and not what only decides how long, how fast or where it runs (steps / iterations, mesh, compute dtype, remat,
log / eval / checkpoint cadence). The same fingerprints key the reference log-prob cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from rpo_jax.data import TokenizedDataset
from rpo_jax.train.setup import init_fields, lora_enabled

#: ModelConfig fields that change speed only (same results), not the model.
SPEED_ONLY = ("remat", "scan_unroll", "attention")


def _file_state(root: pathlib.Path) -> tuple:
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                 for f in sorted(root.glob("config.json")) + sorted(root.glob("*.safetensors")))


@functools.lru_cache(maxsize=16)
def _checkpoint_digest(root: str, state: tuple) -> str:
    del state  # part of the cache key only: a file rewritten in place is hashed again
    h = hashlib.sha256()
    path = pathlib.Path(root)
    for f in sorted(path.glob("config.json")) + sorted(path.glob("*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over config.json and the bytes of every safetensors file of a checkpoint directory (computed once
    per process for files whose sizes and modification times have not changed)."""
    root = pathlib.Path(path).resolve()
    return _checkpoint_digest(str(root), _file_state(root))


def weights_fingerprint(path: str, cfg: ml_collections.ConfigDict, vocab_size: int | None = None) -> str:
    """What identifies a model's weights: the checkpoint's bytes (`checkpoint_fingerprint`), or the random init's
    fields and seed (`config.model.init`, `config.model.init_seed`) when `path` is empty."""
    if path:
        return checkpoint_fingerprint(path) if os.path.isdir(path) else path
    return json.dumps({"init": init_fields(cfg, vocab_size), "seed": cfg.model.init_seed}, sort_keys=True)


def dataset_fingerprint(dataset: TokenizedDataset) -> str:
    """sha256 over the tokenized examples (ids, prompt lengths, record indices), K, buckets and max length."""
    h = hashlib.sha256(json.dumps({"k_max": dataset.k_max, "max_length": dataset.max_length,
                                   "num_records": dataset.num_records, "pad": dataset.pad_id}).encode())
    for e in dataset.examples:
        h.update(np.int64(e.index).tobytes())
        h.update(np.asarray(e.prompt_lengths, np.int64).tobytes())
        for s in e.sequences:
            h.update(np.asarray(s, np.int32).tobytes())
            h.update(b"|")
    return h.hexdigest()


def token_lists_fingerprint(token_lists) -> str:
    """sha256 over lists of token ids (e.g. the prompts of an online split)."""
    h = hashlib.sha256()
    for ids in token_lists:
        h.update(np.asarray(ids, np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over a tokenizer's vocabulary (token → id), special tokens and chat template."""
    h = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def _json_value(value: Any) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def _plain(value: Any) -> Any:
    """A JSON value (ConfigDicts and dataclasses at any depth → dicts, tuples → lists)."""
    return json.loads(json.dumps(value, sort_keys=True, default=_json_value))


def run_identity(cfg: ml_collections.ConfigDict, mode: str, model_config, tokenizer, *, objective: Mapping[str, Any],
                 data: Mapping[str, str]) -> dict[str, Any]:
    """The identity of a run (module docstring): `objective` and `data` (split → fingerprint) come from the
    mode; the rest from the config, the model config and the tokenizer."""
    architecture = {k: v for k, v in _plain(model_config).items() if k not in SPEED_ONLY}
    model = {"architecture": architecture, "weights": weights_fingerprint(cfg.model.path, cfg, len(tokenizer))}
    if lora_enabled(cfg):  # only then, so that the identities of full fine-tuning runs stay as they were
        model["lora"] = lora_identity(cfg)
    return _plain({
        "mode": mode,
        "model": model,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "objective": dict(objective),
        "data": dict(data),
        "settings": {"seed": cfg.seed, "batch_size": cfg.data.batch_size, "param_dtype": cfg.model.param_dtype,
                     "optimizer": cfg.optimizer},
    })


def lora_identity(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config.model.lora`'s settings, with the starting adapter's fingerprint (`checkpoint_fingerprint` of
    `init_from`) in place of its path."""
    lora = dict(cfg.model.lora)
    if lora.get("init_from"):
        lora["init_from"] = checkpoint_fingerprint(lora["init_from"])
    return lora


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def identity_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`"key: recorded → now"` for every leaf that differs between two identities (dotted keys, sorted)."""
    old, new = _flatten(recorded), _flatten(current)
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            show = lambda x: "(absent)" if x is missing else json.dumps(x)[:80]  # noqa: E731
            out.append(f"{key}: {show(a)} → {show(b)}")
    return out
