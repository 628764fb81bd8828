"""The run directory: its layout, the records a run keeps there, and how they are written.

    WORKDIR/config.json          the run's config, with the mode that trains it (`rpo-export` reads it back)
    WORKDIR/run_identity.json    what defines the run (`rpo_jax.train.identity`); resuming compares against it
    WORKDIR/metrics.jsonl        one JSON record per logged step (and TensorBoard files under WORKDIR/tensorboard)
    WORKDIR/checkpoints/         orbax checkpoints (train state + data position + metrics.jsonl's length)
    WORKDIR/ref_cache/           cached reference log-probs (preference training; `config.reference_cache_dir`)
    WORKDIR/export/              the Hugging Face export at the end of the run (`config.train.export_at_end`)
    WORKDIR/errors.log           tracebacks of failed `rpo-train` invocations (the console shows one line)

Records are replaced atomically (written beside, then renamed), so a process killed while writing leaves the old
record or the new one, never half of one. Process 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
IDENTITY_FILE = "run_identity.json"
METRICS_FILE = "metrics.jsonl"
REPLAYED_METRICS_FILE = "metrics.replayed.jsonl"
CHECKPOINTS = "checkpoints"
REFERENCE_CACHE = "ref_cache"
EXPORT = "export"
ERRORS_FILE = "errors.log"


def write_atomically(path: pathlib.Path, text: str) -> None:
    """Replace `path` with `text`: written to a temporary file beside it, then renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def record_run(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, mode: str, identity: Mapping[str, Any]) -> None:
    """Record `cfg` (with `mode`) in WORKDIR/config.json and the run's identity in WORKDIR/run_identity.json."""
    if jax.process_index() != 0:
        return
    recorded = ml_collections.ConfigDict(cfg.to_dict())
    recorded.mode = mode
    write_atomically(workdir / CONFIG_FILE, recorded.to_json_best_effort(indent=1))
    write_atomically(workdir / IDENTITY_FILE, json.dumps(identity, indent=1, sort_keys=True))


def read_identity(workdir: pathlib.Path) -> dict[str, Any] | None:
    """The identity recorded in WORKDIR/run_identity.json, or None when there is none."""
    path = workdir / IDENTITY_FILE
    return json.loads(path.read_text()) if path.exists() else None


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run directory was started with (WORKDIR/config.json)."""
    config_file = pathlib.Path(workdir) / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"{workdir}: {CONFIG_FILE} is missing (not an rpo-train run directory)")
    return ml_collections.ConfigDict(json.loads(config_file.read_text()))


def is_run_directory(path: pathlib.Path) -> bool:
    """Whether `path` is an rpo-train work directory (it has config.json and checkpoints/)."""
    return (path / CONFIG_FILE).is_file() and (path / CHECKPOINTS).is_dir()


def metrics_records(workdir: str | os.PathLike) -> int:
    """The number of records (lines) in WORKDIR/metrics.jsonl, 0 when there is none."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.exists():
        return 0
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def continue_metrics(workdir: pathlib.Path, keep_lines: int | None) -> None:
    """Prepare WORKDIR/metrics.jsonl for a run that starts fresh (`keep_lines` None) or resumes from a checkpoint
    taken when the file had `keep_lines` records.

    Fresh: an existing file (an attempt that left no checkpoint, or a run started over) is renamed to
    metrics.<n>.jsonl, never appended to. Resumed: the records written after the checkpoint — whose steps are
    now replayed — move to metrics.replayed.jsonl, so metrics.jsonl holds one record per logged step."""
    path = workdir / METRICS_FILE
    if jax.process_index() != 0 or not path.exists():
        return
    if keep_lines is None:
        n = 1
        while (workdir / f"metrics.{n}.jsonl").exists():
            n += 1
        os.replace(path, workdir / f"metrics.{n}.jsonl")
        log.warning("%s: starting the run afresh; the earlier metrics are kept as metrics.%d.jsonl", workdir, n)
        return
    lines = path.read_text().split("\n")
    kept, replayed = lines[:keep_lines], [line for line in lines[keep_lines:] if line]
    if not replayed:
        return
    with open(workdir / REPLAYED_METRICS_FILE, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in replayed))
    write_atomically(path, "".join(line + "\n" for line in kept))
