"""The run directory: its layout, and the config record every run starts by writing.

    WORKDIR/config.json      the run's config (with the mode that trained it: `rpo-export` reads it back)
    WORKDIR/metrics.jsonl    one JSON record per logged step (and TensorBoard files under WORKDIR/tensorboard)
    WORKDIR/checkpoints/     orbax checkpoints (train state + data position)
    WORKDIR/ref_cache/       cached reference log-probs (preference training; `config.reference_cache_dir`)
    WORKDIR/export/          the Hugging Face export at the end of the run (`config.train.export_at_end`)
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import ml_collections

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
REFERENCE_CACHE = "ref_cache"
EXPORT = "export"


def start_run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, mode: str) -> pathlib.Path:
    """Create `workdir` and record `cfg` in WORKDIR/config.json with `mode` (the job that trains it; process 0
    writes). Returns the directory."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        recorded = ml_collections.ConfigDict(cfg.to_dict())
        recorded.mode = mode
        (workdir / CONFIG_FILE).write_text(recorded.to_json_best_effort(indent=1))
    return workdir


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run directory was started with (WORKDIR/config.json)."""
    config_file = pathlib.Path(workdir) / CONFIG_FILE
    if not config_file.exists():
        raise FileNotFoundError(f"{workdir}: {CONFIG_FILE} is missing (not an rpo-train run directory)")
    return ml_collections.ConfigDict(json.loads(config_file.read_text()))
