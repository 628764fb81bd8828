"""Export: trained parameters as a Hugging Face directory (config, safetensors, tokenizer), at the end of a run
and from a run directory (`rpo-export WORKDIR OUT_DIR`).

One table, `EXPORTERS`, says for each mode how its model is built from the run's config and how it is saved:
a policy (`save_hf`: `XForCausalLM`) for preference and online runs, a sequence-classification reward model
(`save_reward_model`: `XForSequenceClassification`) for reward-model runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Callable

import jax
from flax import nnx
from jax.experimental import multihost_utils

from rpo_jax.models import ModelConfig, save_hf, save_reward_model
from rpo_jax.models.sharding import make_mesh
from rpo_jax.train.checkpoint import Checkpointer, abstract_like
from rpo_jax.train.mesh import replicate
from rpo_jax.train.setup import (build_reward_model, compute_dtype, load_policy, load_tokenizer, split_trainable,
                                 tokenizer_path)
from rpo_jax.train.workdir import CHECKPOINTS, read_run_config

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


def save_model(mode: str, graphdef, params, rest, model_config: ModelConfig, out_dir: str | os.PathLike, tokenizer,
               mesh) -> pathlib.Path:
    """Write the model `nnx.merge(graphdef, params, rest)` of a `mode` run to `out_dir`: its parameters are
    gathered whole to every process first, process 0 writes, every process waits for it."""
    save = exporter_of(mode).save
    params = replicate(params, mesh)
    if jax.process_index() == 0:
        save(nnx.merge(graphdef, params, rest), model_config, out_dir, tokenizer=tokenizer)
    multihost_utils.sync_global_devices("rpo_jax_export")
    return pathlib.Path(out_dir)


def export_workdir(workdir: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """`rpo-export`: the newest restorable checkpoint of the run directory `workdir` as a Hugging Face directory
    (a policy, or a sequence-classification reward model for a `mode="reward_model"` run)."""
    workdir = pathlib.Path(workdir)
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

