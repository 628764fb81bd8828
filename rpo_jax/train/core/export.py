"""Export: trained parameters as a Hugging Face directory (config, safetensors, tokenizer), at the end of a run
and from a run directory (`rpo-export WORKDIR OUT_DIR`).

One table, `EXPORTERS`, says for each mode how its model is built from the run's config and how it is saved:
a policy (`save_hf`: `XForCausalLM`) for preference and online runs, a sequence-classification reward model
(`save_reward_model`: `XForSequenceClassification`) for reward-model runs.

LoRA runs (`config.model.lora`): the export is the merged model, W + (alpha / rank)·A·B in every adapted
projection (`merge_lora`), loadable by transformers as any other; a policy's adapters can also be written as a
PEFT adapter directory (`adapter=True`: `rpo-export RUN OUT --adapter`, and WORKDIR/export_adapter at the end
of a run) that `peft.PeftModel.from_pretrained(base, OUT)` loads. A reward model's LoRA run exports merged only:
its score head is trained in full, which a PEFT LoRA adapter of the backbone cannot carry.

The weights are streamed (`rpo_jax.models.hf_export`): one piece of one tensor at a time is gathered to process 0,
which writes it into Hugging Face's sharded layout (`config.export.max_shard_size`, default save_pretrained's):
no process ever holds the whole model in host memory; every process takes part in the gathers.

An export never writes into a run's work directory (its config, checkpoints, metrics), except into the run's own
WORKDIR/export; it is written to a hidden temporary directory beside the target (`.NAME.partial-*`) and renamed
into place at the end, so an interrupted export leaves the previous one (or nothing), never half of one. An
existing target is replaced only when it is an earlier export (config.json and *.safetensors, nothing else of a
run); its files get the process's normal permissions.

The target may be a URL (`gs://bucket/exports/m`, through `rpo_jax.data.storage`). An object store has no
rename, so there the earlier export's objects are deleted, an `INCOMPLETE` object is written first, the new files
are streamed to the bucket with config.json last — the completion marker — and `INCOMPLETE` is deleted at the
end: an interrupted export leaves a directory without config.json, which loaders reject, holding `INCOMPLETE`,
by which a later export recognises it as its own remains and replaces it. A PEFT adapter (small) is written
locally and uploaded the same way, adapter_config.json last.

Every export is logged (main process): what it writes and where when it starts, and the time it took at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable

import jax
from flax import nnx
from jax.experimental import multihost_utils

from rpo_jax.data import storage
from rpo_jax.models import ModelConfig, save_hf, save_reward_model
from rpo_jax.models.hf_export import DEFAULT_MAX_SHARD_SIZE
from rpo_jax.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, merge_lora, save_peft_adapter
from rpo_jax.models.quantize import dequantize_base, is_quantized
from rpo_jax.train.build.data import load_tokenizer, tokenizer_path
from rpo_jax.train.build.lora import lora_enabled
from rpo_jax.train.build.model import build_reward_model, load_policy, split_trainable
from rpo_jax.train.build.state import compute_dtype
from rpo_jax.train.config.validation import validate
from rpo_jax.train.core.checkpoint import Checkpointer, abstract_like
from rpo_jax.train.core.workdir import CHECKPOINTS, EXPORT, EXPORT_ADAPTER, is_run_directory, read_run_config
from rpo_jax.train.runtime.global_batches import config_mesh, replicate

log = logging.getLogger(__name__)

#: the object an export to a URL writes first and deletes last (module docstring): its directory is an export
#: that was interrupted (no config.json), which a later export may replace.
INCOMPLETE = ".rpo_jax-export-incomplete"


@dataclasses.dataclass(frozen=True)
class Exporter:
    """How a mode's model is exported: `build(config, tokenizer, mesh, dtype) -> (model, ModelConfig)` makes the
    model the run trained (its parameters are then replaced by the checkpoint's), `save(model, model_config,
    out_dir, tokenizer=..., max_shard_size=...)` writes it (called on every process; process 0 writes)."""

    build: Callable[..., tuple[nnx.Module, ModelConfig]]
    save: Callable[..., pathlib.Path]


def save_policy(model, model_config: ModelConfig, out_dir, tokenizer=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE):
    """`save_hf` of a policy; one with LoRA adapters is saved merged (`merge_lora`). A quantized base (QLoRA) is
    dequantized first (`dequantize_base`, in `model`, the export's own copy): the export is the model the run
    trained, ŵ + (alpha / rank)·B·A."""
    if is_quantized(model):
        dequantize_base(model)
    if getattr(model, "lora", None) is not None:
        model = merge_lora(model)
    return save_hf(model, model_config, out_dir, tokenizer=tokenizer, max_shard_size=max_shard_size)


def save_merged_reward_model(
    model, model_config: ModelConfig, out_dir, tokenizer=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE
):
    """`save_reward_model`; LoRA adapters on the backbone are merged into it first (in `model`, which is the
    export's own copy)."""
    if is_quantized(model.backbone):
        dequantize_base(model.backbone)
    if getattr(model.backbone, "lora", None) is not None:
        model.backbone = merge_lora(model.backbone)
    return save_reward_model(model, model_config, out_dir, tokenizer=tokenizer, max_shard_size=max_shard_size)


EXPORTERS: dict[str, Exporter] = {
    "preference": Exporter(build=load_policy, save=save_policy),
    "online": Exporter(build=load_policy, save=save_policy),
    "reward_model": Exporter(build=build_reward_model, save=save_merged_reward_model),
}


def adapter_saver(mode: str, base_model_name_or_path: str) -> Callable[..., pathlib.Path]:
    """`save(model, model_config, out_dir, tokenizer=None)` writing a policy's LoRA adapters as a PEFT directory
    (`save_peft_adapter`); a ValueError for a reward-model run (merged exports only, module docstring)."""
    if mode == "reward_model":
        raise ValueError(
            "--adapter: a reward-model run exports merged only (its score head is trained in full and "
            "is not part of a LoRA adapter); run rpo-export without --adapter"
        )

    def save(model, model_config, out_dir, tokenizer=None):
        del model_config, tokenizer
        if getattr(model, "lora", None) is None:
            raise ValueError(
                "--adapter: this run trained no LoRA adapters (config.model.lora.rank = 0); run "
                "rpo-export without --adapter"
            )
        return save_peft_adapter(model, out_dir, base_model_name_or_path)

    return save


def export_kind(mode: str, adapter: bool = False) -> str:
    """What an export of a `mode` run is, in words: "Hugging Face model", "reward model" or "PEFT adapter"."""
    return "PEFT adapter" if adapter else "reward model" if mode == "reward_model" else "Hugging Face model"


def exporter_of(mode: str) -> Exporter:
    """The `EXPORTERS` entry of `mode` (a ValueError naming the modes otherwise)."""
    if mode not in EXPORTERS:
        raise ValueError(f"config.mode={mode!r}: expected one of {tuple(EXPORTERS)}")
    return EXPORTERS[mode]


def check_export_target(out_dir: storage.PathLike, *, adapter: bool = False):
    """The resolved `out_dir` (a `pathlib.Path`, or an `epath.Path` for a URL), or a ValueError when writing an
    export there would touch a run or other files: `out_dir` is, or is inside, a run's work directory (other than
    that run's WORKDIR/export or WORKDIR/export_adapter), or it is an existing directory that holds something
    other than an earlier export (of a PEFT adapter with `adapter`) or an interrupted export to a URL
    (`INCOMPLETE`)."""
    out = storage.as_path(out_dir) if storage.is_url(out_dir) else pathlib.Path(out_dir).resolve()
    parents = [p for p in out.parents if not storage.is_url(out) or "/" in os.fspath(p).split("://", 1)[-1]]
    for parent in (out, *parents):
        if is_run_directory(parent) and out not in (parent / EXPORT, parent / EXPORT_ADAPTER):
            raise ValueError(
                f"{out_dir}: {'is' if parent == out else 'is inside'} the run directory {parent}; "
                f"export into a directory outside it (or into {parent / EXPORT})"
            )
    marker, weights = (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if adapter else ("config.json", "*.safetensors")
    if out.exists() and any(out.iterdir()):
        names = {p.name for p in out.iterdir()}
        earlier = marker in names and any(n.endswith(".safetensors") for n in names)
        if not out.is_dir() or not (earlier or storage.is_url(out) and INCOMPLETE in names):
            raise ValueError(
                f"{out_dir}: exists and is not an earlier export (no {marker} and {weights}); "
                "nothing was written: choose a new or empty directory"
            )
    return out


def _normal_permissions(root: pathlib.Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def upload_export(
    save: Callable[..., pathlib.Path], model, model_config: ModelConfig, out, tokenizer, last: str = "config.json"
) -> None:
    """Write the export to a local temporary directory, delete the earlier export at the URL `out` and upload
    the files, `last` (config.json) last, between `begin_upload` and `end_upload` (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="rpo_jax-export-") as local:
        save(model, model_config, pathlib.Path(local), tokenizer=tokenizer)
        begin_upload(out)
        storage.copy_tree(local, out, last=last)
        end_upload(out)


def begin_upload(out) -> None:
    """Before an export's files go to the URL `out`: the earlier export deleted, `INCOMPLETE` written."""
    storage.remove_tree(out)
    storage.write_atomically(storage.as_path(out) / INCOMPLETE, "an export to this directory has not finished\n")


def end_upload(out) -> None:
    """After the last file (the completion marker) of an export to the URL `out`: `INCOMPLETE` deleted."""
    (storage.as_path(out) / INCOMPLETE).unlink()


def save_model(
    mode: str,
    graphdef,
    params,
    rest,
    model_config: ModelConfig,
    out_dir: storage.PathLike,
    tokenizer,
    mesh,
    *,
    adapter_base: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
):
    """Write the model `nnx.merge(graphdef, params, rest)` of a `mode` run to `out_dir` (see the module docstring:
    where it may write, atomically, streamed into shards of `max_shard_size`); with `adapter_base` (the base's path
    or hub id) only its LoRA adapters, as a PEFT directory (`adapter_saver`: the adapters, small, are gathered whole
    first). Every process calls it; process 0 writes, every process waits for it."""
    adapter = adapter_base is not None
    out = check_export_target(out_dir, adapter=adapter)
    writer = jax.process_index() == 0
    if writer:
        log.info("exporting the %s to %s", export_kind(mode, adapter), out)
    start = time.perf_counter()
    if adapter:
        save = adapter_saver(mode, adapter_base)
        params = replicate(params, mesh)  # the adapters; the frozen base (rest) is not read
    else:
        save = functools.partial(exporter_of(mode).save, max_shard_size=max_shard_size)
    model = nnx.merge(graphdef, params, rest)
    if storage.is_url(out):
        if adapter and writer:
            upload_export(save, model, model_config, out, tokenizer, last=ADAPTER_CONFIG)
        elif not adapter:
            if writer:
                begin_upload(out)
            multihost_utils.sync_global_devices("rpo_jax_export_target")
            save(model, model_config, os.fspath(out), tokenizer=tokenizer)  # config.json last: the marker
            if writer:
                end_upload(out)
    elif adapter and not writer:
        pass
    else:
        partial = None
        if writer:
            out.parent.mkdir(parents=True, exist_ok=True)
            for stale in (*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.previous-*")):
                shutil.rmtree(stale, ignore_errors=True)  # left by an export that was killed
            partial = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            save(model, model_config, partial or out, tokenizer=tokenizer)  # only the writer touches the path
            if writer:
                _normal_permissions(partial)
                previous = out.with_name(f".{out.name}.previous-{os.getpid()}")
                if out.exists():
                    os.replace(out, previous)
                os.replace(partial, out)
                shutil.rmtree(previous, ignore_errors=True)
        finally:
            if partial is not None:
                shutil.rmtree(partial, ignore_errors=True)
    multihost_utils.sync_global_devices("rpo_jax_export")
    if writer:
        log.info("wrote the %s to %s in %.1f s", export_kind(mode, adapter), out, time.perf_counter() - start)
    return out if storage.is_url(out) else pathlib.Path(out_dir)


def save_adapter_at_end(mode: str, graphdef, params, rest, workdir: storage.PathLike, cfg, mesh):
    """The end of a LoRA run that writes WORKDIR/export: also its adapters as the PEFT directory
    WORKDIR/export_adapter (`save_model` with `adapter_base`). Returns that directory, or None when the run has
    no adapters to write (no LoRA, or a reward model: merged only)."""
    if not lora_enabled(cfg) or mode == "reward_model":
        return None
    return save_model(
        mode,
        graphdef,
        params,
        rest,
        None,
        storage.as_path(workdir) / EXPORT_ADAPTER,
        None,
        mesh,
        adapter_base=cfg.model.path,
    )


def export_mesh(mesh) -> dict:
    """`config.mesh` of the run being exported, for this export: without `processes` when the export runs in one
    process (the run's layout across processes does not apply to one; the axis sizes still do)."""
    fields = dict(mesh)
    spans = dict(fields.pop("processes", None) or {})
    if jax.process_count() > 1:
        return {**fields, "processes": spans}
    if any(n != 1 for n in spans.values()):
        log.info("config.mesh.processes=%s: not used by an export in one process", spans)
    return fields


def export_workdir(workdir: storage.PathLike, out_dir: storage.PathLike, *, adapter: bool = False):
    """`rpo-export`: the newest restorable checkpoint of a run directory as a Hugging Face directory.

    Args:
        workdir: the run directory (local or a URL).
        out_dir: a new or empty directory, or an earlier export; not inside a run directory other than
            `WORKDIR/export`.
        adapter: write a LoRA run's adapters as a PEFT directory instead of the merged model.

    Returns:
        The directory written: a policy (merged when it has LoRA adapters), a sequence-classification reward model
        for a `mode="reward_model"` run, or with `adapter` the PEFT adapter.
    """
    workdir = storage.as_path(workdir)
    check_export_target(out_dir, adapter=adapter)  # before anything is loaded
    cfg = validate(read_run_config(workdir))  # what the run recorded (its mode included), checked
    mode = cfg.mode
    if adapter:
        adapter_saver(mode, cfg.model.path)  # a reward-model run: the error before anything is loaded
    mesh = config_mesh(export_mesh(cfg.mesh))
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
    return save_model(
        mode,
        graphdef,
        params,
        rest,
        model_config,
        out_dir,
        tokenizer,
        mesh,
        adapter_base=cfg.model.path if adapter else None,
        max_shard_size=cfg.export.max_shard_size,
    )
