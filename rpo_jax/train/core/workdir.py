"""The run directory: its layout, the records a run keeps there, and how they are written.

    WORKDIR/config.json          the run's config, with the mode that trains it (`rpo-export` reads it back)
    WORKDIR/run_identity.json    what defines the run (`rpo_jax.train.core.identity`); resuming compares against it
    WORKDIR/metrics.jsonl        one JSON record per logged step (and TensorBoard files under WORKDIR/tensorboard)
    WORKDIR/checkpoints/         orbax checkpoints (train state + data position + metrics.jsonl's length)
    WORKDIR/ref_cache/           cached reference log-probs (preference training; `config.reference_cache_dir`)
    WORKDIR/export/              the Hugging Face export at the end of the run (`config.train.export_at_end`)
    WORKDIR/errors.log           tracebacks of failed `rpo-train` invocations (the console shows one line)

WORKDIR is a local path or a URL (`gs://bucket/run`; every file goes through `rpo_jax.data.storage`). Records
are replaced atomically (`storage.write_atomically`), so a process killed while writing leaves the old record or
the new one, never half of one. Process 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from rpo_jax.data import storage
from rpo_jax.train.config.validation import to_config_dict

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
IDENTITY_FILE = "run_identity.json"
METRICS_FILE = "metrics.jsonl"
REPLAYED_METRICS_FILE = "metrics.replayed.jsonl"
CHECKPOINTS = "checkpoints"
REFERENCE_CACHE = "ref_cache"
EXPORT = "export"
EXPORT_ADAPTER = "export_adapter"  # LoRA runs: the adapters as a PEFT directory (rpo_jax.train.core.export)
ERRORS_FILE = "errors.log"


def record_run(cfg, workdir: storage.PathLike, mode: str, identity: Mapping[str, Any]) -> None:
    """Record `cfg` (with `mode`) in WORKDIR/config.json and the run's identity in WORKDIR/run_identity.json."""
    if jax.process_index() != 0:
        return
    recorded = to_config_dict(cfg)  # a RunConfig or a ConfigDict; `validate` reads it back
    recorded.mode = mode
    workdir = storage.as_path(workdir)
    storage.write_atomically(workdir / CONFIG_FILE, recorded.to_json_best_effort(indent=1))
    storage.write_atomically(workdir / IDENTITY_FILE, json.dumps(identity, indent=1, sort_keys=True))


def read_identity(workdir: storage.PathLike) -> dict[str, Any] | None:
    """The identity recorded in WORKDIR/run_identity.json, or None when there is none."""
    path = storage.as_path(workdir) / IDENTITY_FILE
    return json.loads(path.read_text()) if path.exists() else None


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run directory was started with (WORKDIR/config.json)."""
    config_file = storage.as_path(workdir) / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"{workdir}: {CONFIG_FILE} is missing (not an rpo-train run directory)")
    return ml_collections.ConfigDict(json.loads(config_file.read_text()))


def is_run_directory(path: storage.PathLike) -> bool:
    """Whether `path` is an rpo-train work directory (it has config.json and checkpoints/)."""
    path = storage.as_path(path)
    return (path / CONFIG_FILE).is_file() and (path / CHECKPOINTS).is_dir()


def metrics_records(workdir: storage.PathLike) -> int:
    """The number of records (lines) in WORKDIR/metrics.jsonl, 0 when there is none."""
    path = storage.as_path(workdir) / METRICS_FILE
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(1 for _ in f)


def continue_metrics(workdir: storage.PathLike, keep_lines: int | None) -> None:
    """Prepare WORKDIR/metrics.jsonl for a run that starts fresh (`keep_lines` None) or resumes from a checkpoint
    taken when the file had `keep_lines` records.

    Fresh: an existing file (an attempt that left no checkpoint, or a run started over) is moved to
    metrics.<n>.jsonl, never appended to. Resumed: the records written after the checkpoint — whose steps are
    now replayed — move to metrics.replayed.jsonl (added after its earlier records), so metrics.jsonl holds one
    record per logged step. Both files are rewritten whole (`storage.write_atomically`: object stores have no
    append)."""
    workdir = storage.as_path(workdir)
    path = workdir / METRICS_FILE
    if jax.process_index() != 0 or not path.exists():
        return
    if keep_lines is None:
        n = 1
        while (workdir / f"metrics.{n}.jsonl").exists():
            n += 1
        storage.move(path, workdir / f"metrics.{n}.jsonl")
        log.warning("%s: starting the run afresh; the earlier metrics are kept as metrics.%d.jsonl", workdir, n)
        return
    lines = path.read_text().split("\n")
    kept, replayed = lines[:keep_lines], [line for line in lines[keep_lines:] if line]
    if not replayed:
        return
    replayed_file = workdir / REPLAYED_METRICS_FILE
    earlier = replayed_file.read_text() if replayed_file.exists() else ""
    storage.write_atomically(replayed_file, earlier + "".join(line + "\n" for line in replayed))
    storage.write_atomically(path, "".join(line + "\n" for line in kept))


def add_to_error_log(workdir: storage.PathLike, text: str) -> str | None:
    """Add `text` to WORKDIR/errors.log (read and written back whole: object stores have no append); returns
    the log's path, or None (nothing written) when WORKDIR is not an existing directory."""
    directory = storage.as_path(workdir)
    if not directory.is_dir():
        return None
    path = directory / ERRORS_FILE
    earlier = path.read_text() if path.exists() else ""
    storage.write_atomically(path, earlier + text)
    return str(path)
