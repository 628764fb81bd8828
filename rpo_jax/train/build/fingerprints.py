"""Fingerprints of what a run is made of — checkpoints, weights, tokenized datasets, tokenizers — for the run
identity (`rpo_jax.train.core.identity`) and the reference cache's keys.
"""

from __future__ import annotations

import hashlib
import json
import os

import ml_collections
import numpy as np

from rpo_jax.data import TokenizedDataset
from rpo_jax.models.safetensors_io import is_url
from rpo_jax.train.build.checkpoint_digest import digest
from rpo_jax.train.build.model import init_fields


def checkpoint_fingerprint(path: str | os.PathLike, method: str = "full") -> str:
    """The checkpoint directory `path` (local or a URL) named by `method` (`checkpoint_digest.digest`): "full",
    sha256 over config.json and the bytes of every safetensors file (computed once per process for files whose
    sizes and versions have not changed), or "fingerprint" (headers, sizes and sampled bytes)."""
    return digest(path, method)


def weights_fingerprint(path: str, cfg: ml_collections.ConfigDict, vocab_size: int | None = None) -> str:
    """What identifies a model's weights: the checkpoint (`checkpoint_fingerprint` by
    `config.train.verify_weights`: a local directory or a URL), or the random init's fields and seed
    (`config.model.init`, `config.model.init_seed`) when `path` is empty; a hub id is named by itself."""
    if path:
        if os.path.isdir(path) or is_url(path):
            return checkpoint_fingerprint(path, getattr(cfg.train, "verify_weights", "fingerprint"))
        return path
    return json.dumps({"init": init_fields(cfg, vocab_size), "seed": cfg.model.init_seed}, sort_keys=True)


def dataset_fingerprint(dataset: TokenizedDataset) -> str:
    """sha256 over the tokenized examples (ids, prompt lengths, record indices), K, buckets and max length (and
    an unpaired dataset's labels)."""
    h = hashlib.sha256(
        json.dumps(
            {
                "k_max": dataset.k_max,
                "max_length": dataset.max_length,
                "num_records": dataset.num_records,
                "pad": dataset.pad_id,
            }
        ).encode()
    )
    for e in dataset.examples:
        h.update(np.int64(e.index).tobytes())
        h.update(np.asarray(e.prompt_lengths, np.int64).tobytes())
        for s in e.sequences:
            h.update(np.asarray(s, np.int32).tobytes())
            h.update(b"|")
    labels = getattr(dataset, "labels", None)  # unpaired records (`UnpairedDataset`): their labels too
    if labels is not None:
        h.update(b"labels")
        h.update(np.asarray(labels, bool).tobytes())
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
