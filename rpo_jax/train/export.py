"""Export: trained parameters as a Hugging Face directory (config, safetensors, tokenizer), at the end of a run
and from a run directory (`rpo-export WORKDIR OUT_DIR`).

One table, `EXPORTERS`, says for each mode how its model is built from the run's config and how it is saved:
a policy (`save_hf`: `XForCausalLM`) for preference and online runs, a sequence-classification reward model
(`save_reward_model`: `XForSequenceClassification`) for reward-model runs.

An export never writes into a run's work directory (its config, checkpoints, metrics), except into the run's own
WORKDIR/export; it is written to a temporary directory beside the target and renamed into place at the end, so
an interrupted export leaves the previous one (or nothing), never half of one. An existing target is replaced only
when it is an earlier export (config.json and *.safetensors, nothing else of a run); its files get the process's
normal permissions.

The target may be a URL (`gs://bucket/exports/m`, through `rpo_jax.data.storage`). An object store has no
rename, so there the export is written to a local temporary directory, the earlier export's objects are
deleted and the files are uploaded with config.json last: an interrupted upload leaves a directory without
config.json, which loaders reject (and which a later export refuses to replace until it is deleted).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

import jax
from flax import nnx
from jax.experimental import multihost_utils

from rpo_jax.data import storage
from rpo_jax.models import ModelConfig, save_hf, save_reward_model
from rpo_jax.models.sharding import make_mesh
from rpo_jax.train.checkpoint import Checkpointer, abstract_like
from rpo_jax.train.mesh import replicate
from rpo_jax.train.setup import (build_reward_model, compute_dtype, load_policy, load_tokenizer, split_trainable,
                                 tokenizer_path)
from rpo_jax.train.workdir import CHECKPOINTS, EXPORT, is_run_directory, read_run_config

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Exporter:
    """How a mode's model is exported: `build(config, tokenizer, mesh, dtype) -> (model, ModelConfig)` makes the
    model the run trained (its parameters are then replaced by the checkpoint's), `save(model, model_config,
    out_dir, tokenizer=...)` writes it."""

    build: Callable[..., tuple[nnx.Module, ModelConfig]]
    save: Callable[..., pathlib.Path]


EXPORTERS: dict[str, Exporter] = {
    "preference": Exporter(build=load_policy, save=save_hf),
    "online": Exporter(build=load_policy, save=save_hf),
    "reward_model": Exporter(build=build_reward_model, save=save_reward_model),
}


def exporter_of(mode: str) -> Exporter:
    """The `EXPORTERS` entry of `mode` (a ValueError naming the modes otherwise)."""
    if mode not in EXPORTERS:
        raise ValueError(f"config.mode={mode!r}: expected one of {tuple(EXPORTERS)}")
    return EXPORTERS[mode]


def check_export_target(out_dir: storage.PathLike):
    """The resolved `out_dir` (a `pathlib.Path`, or an `epath.Path` for a URL), or a ValueError when writing an
    export there would touch a run or other files: `out_dir` is, or is inside, a run's work directory (other than
    that run's WORKDIR/export), or it is an existing directory that holds something other than an earlier
    export."""
    out = storage.as_path(out_dir) if storage.is_url(out_dir) else pathlib.Path(out_dir).resolve()
    parents = [p for p in out.parents if not storage.is_url(out) or "/" in os.fspath(p).split("://", 1)[-1]]
    for parent in (out, *parents):
        if is_run_directory(parent) and out != parent / EXPORT:
            raise ValueError(f"{out_dir}: {'is' if parent == out else 'is inside'} the run directory {parent}; "
                             f"export into a directory outside it (or into {parent / EXPORT})")
    if out.exists() and any(out.iterdir()):
        names = {p.name for p in out.iterdir()}
        if not out.is_dir() or "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
            raise ValueError(f"{out_dir}: exists and is not an earlier export (no config.json and *.safetensors); "
                             "nothing was written: choose a new or empty directory")
    return out


def _normal_permissions(root: pathlib.Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def upload_export(save: Callable[..., pathlib.Path], model, model_config: ModelConfig, out, tokenizer) -> None:
    """Write the export to a local temporary directory, delete the earlier export at the URL `out` and upload
    the files, config.json last (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="rpo_jax-export-") as local:
        save(model, model_config, pathlib.Path(local), tokenizer=tokenizer)
        storage.remove_tree(out)
        storage.copy_tree(local, out, last="config.json")


def save_model(mode: str, graphdef, params, rest, model_config: ModelConfig, out_dir: storage.PathLike, tokenizer,
               mesh):
    """Write the model `nnx.merge(graphdef, params, rest)` of a `mode` run to `out_dir` (see the module docstring:
    where it may write, atomically). Its parameters are gathered whole to every process first, process 0 writes,
    every process waits for it."""
    save = exporter_of(mode).save
    out = check_export_target(out_dir)
    params = replicate(params, mesh)
    if jax.process_index() == 0 and storage.is_url(out):
        upload_export(save, nnx.merge(graphdef, params, rest), model_config, out, tokenizer)
    elif jax.process_index() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in (*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.previous-*")):
            shutil.rmtree(stale, ignore_errors=True)  # left by an export that was killed
        partial = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            save(nnx.merge(graphdef, params, rest), model_config, partial, tokenizer=tokenizer)
            _normal_permissions(partial)
            previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
            if out.exists():
                os.replace(out, previous)
            os.replace(partial, out)
            shutil.rmtree(previous, ignore_errors=True)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    multihost_utils.sync_global_devices("rpo_jax_export")
    return out if storage.is_url(out) else pathlib.Path(out_dir)


def export_workdir(workdir: storage.PathLike, out_dir: storage.PathLike):
    """`rpo-export`: the newest restorable checkpoint of the run directory `workdir` as a Hugging Face directory
    (a policy, or a sequence-classification reward model for a `mode="reward_model"` run)."""
    workdir = storage.as_path(workdir)
    check_export_target(out_dir)  # before anything is loaded
    cfg = read_run_config(workdir)
    mode = cfg.get("mode", "preference")
    mesh = make_mesh(dict(cfg.mesh))
    dtype = compute_dtype(cfg.model.dtype)
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    model, model_config = exporter_of(mode).build(cfg, tokenizer, mesh, dtype)
    graphdef, params, rest = split_trainable(model)
    ckpt = Checkpointer(workdir / CHECKPOINTS, every_steps=1, asynchronous=False)
    restored = ckpt.restore_params(abstract_like(params))
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir / CHECKPOINTS}: no restorable checkpoint")
    step, params = restored
    log.info("exporting step %d of %s", step, workdir)
    return save_model(mode, graphdef, params, rest, model_config, out_dir, tokenizer, mesh)

