"""The training loop: config → data, policy, references, optimizer → sharded jit steps → checkpoints → export.

`train(config, workdir)` is the whole main job; `rpo-train` (rpo_jax.train.cli) calls it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from rpo_jax import data as D
from rpo_jax.losses import make_loss
from rpo_jax.models import ModelConfig, create_model, load_hf, save_hf
from rpo_jax.train import references as R
from rpo_jax.train.checkpoint import Checkpointer, abstract_like
from rpo_jax.train.mesh import local_batch_size, make_mesh, replicated, to_global
from rpo_jax.train.metrics import MetricWriter, device_memory, measure_matmul_peak
from rpo_jax.train.optim import make_optimizer
from rpo_jax.train.step import (make_eval_step, make_train_step, resolve_score_window, response_logps,
                                train_flops_per_token)

log = logging.getLogger(__name__)

INITIAL_POLICY = "initial-policy"


# ----------------------------------------------------------------------------------------------------- set-up
def compute_dtype(name: str):
    """"auto" → float32 on CPU, bfloat16 on GPU/TPU; otherwise the named dtype."""
    if name == "auto":
        return jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def build_loss(cfg: ml_collections.ConfigDict):
    """`make_loss` from `config.loss`: the main term (weight 1) plus weighted `extra` terms."""
    main = (cfg.loss.name, 1.0, dict(cfg.loss.hparams))
    extra = [tuple(e) if len(e) == 3 else (e[0], e[1], {}) for e in cfg.loss.extra]
    if not extra:
        return make_loss(main[0], **main[2])
    return make_loss([main, *extra])


def tokenizer_path(cfg: ml_collections.ConfigDict) -> str:
    if cfg.model.tokenizer:
        return cfg.model.tokenizer
    if cfg.model.path:
        return cfg.model.path
    return D.demo_paths()["tokenizer"]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _data_paths(spec: str, which: str) -> list[str]:
    if spec in ("", "demo"):
        return [D.demo_paths()["train" if which == "train" else "test"]]
    return [p for p in spec.split(",") if p]


def load_records(cfg: ml_collections.ConfigDict, loss_fn) -> dict[str, list]:
    """Read and validate the train and eval records (`config.data`); rewards checked before anything trains."""
    dc = cfg.data
    fmt = dc.format or None
    train, report = D.read_records(_data_paths(dc.train, "train"), format=fmt, on_error=dc.on_error)
    if report.num_skipped:
        log.warning("train data: %s", report.summary())
    if dc.eval or dc.train in ("", "demo"):
        evaluation, ereport = D.read_records(_data_paths(dc.eval or dc.train, "eval"), format=fmt,
                                             on_error=dc.on_error)
        if ereport.num_skipped:
            log.warning("eval data: %s", ereport.summary())
    elif dc.eval_fraction > 0:
        from rpo_jax.data.tfds_builder import holdout_split
        parts = holdout_split(train, dc.eval_fraction, seed=cfg.seed)
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = []
    splits = {"train": train, "eval": evaluation}
    if dc.pairs:
        splits = {k: D.to_pairs(v, mode={"best_worst": "best_vs_worst", "all": "all_pairs"}.get(dc.pairs, dc.pairs))
                  for k, v in splits.items()}
    if loss_fn.requires_rewards:
        for recs in splits.values():
            if recs:
                D.require_rewards(recs)
    return {k: v for k, v in splits.items() if v}


def tokenize_splits(cfg: ml_collections.ConfigDict, records: Mapping[str, list], tokenizer
                    ) -> dict[str, D.TokenizedDataset]:
    dc = cfg.data
    out = {}
    for split, recs in records.items():
        ds = D.tokenize_records(recs, tokenizer, max_length=dc.max_length, max_prompt_length=dc.max_prompt_length or None,
                                truncation=dc.truncation, on_error=dc.on_error)
        log.info("%s: %s", split, ds.report.summary())
        if len(ds) == 0:
            raise ValueError(f"data.{split}: no example left after tokenization ({ds.report.summary()})")
        out[split] = ds
    return out


def load_model(path: str, cfg: ml_collections.ConfigDict, mesh, dtype, vocab_size: int | None = None):
    """(model, model config): a HF checkpoint, or a random init from `config.model.init`."""
    param_dtype = jnp.dtype(cfg.model.param_dtype)
    if path:
        return load_hf(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, remat=cfg.model.remat,
                       scan_unroll=cfg.model.scan_unroll)
    mconfig = ModelConfig.from_hf_dict(_init_fields(cfg, vocab_size), source="config.model.init",
                                       remat=cfg.model.remat, scan_unroll=cfg.model.scan_unroll)
    model = create_model(mconfig, rngs=nnx.Rngs(params=cfg.model.init_seed), dtype=dtype, param_dtype=param_dtype,
                         mesh=mesh)
    return model, mconfig


def _init_fields(cfg: ml_collections.ConfigDict, vocab_size: int | None) -> dict:
    init = dict(cfg.model.init)
    if vocab_size is not None:
        init.setdefault("vocab_size", vocab_size)
    return init


def weights_fingerprint(path: str, cfg: ml_collections.ConfigDict, vocab_size: int | None = None) -> str:
    """What identifies a model's weights in the reference-cache key: the checkpoint's bytes, or the random
    init's fields and seed. Computed only for losses that use a reference (hashing a large checkpoint takes a
    while)."""
    if path:
        return R.checkpoint_fingerprint(path) if os.path.isdir(path) else path
    return json.dumps({"init": _init_fields(cfg, vocab_size), "seed": cfg.model.init_seed}, sort_keys=True)


def on_mesh(tree: Any, mesh) -> Any:
    """Leaves already spread over `mesh` keep their sharding (parameters, moments that follow them); any other
    leaf (scalars such as the step or Adam's count) is replicated over the mesh. Every leaf comes back committed
    to its devices, as the jitted step's outputs are, so the step compiles once rather than twice."""
    devices = set(mesh.devices.flat)
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding)
                        if getattr(x, "sharding", None) is not None and x.sharding.device_set == devices
                        else jax.device_put(x, replicated(mesh)), tree)


# ------------------------------------------------------------------------------------------------ the run
@dataclasses.dataclass
class Run:
    """Everything `train` builds before the first step (also used by tests and benchmarks)."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    mesh: Any
    tokenizer: Any
    loss_fn: Any
    datasets: dict[str, D.TokenizedDataset]
    model_config: ModelConfig
    graphdef: Any
    rest: Any
    state: dict[str, Any]
    state_shardings: Any
    tx: Any
    schedule: Any
    references: list[R.Reference]
    ref_cache: dict[str, np.ndarray]      # split → [N, K, R] (cache mode)
    in_step_refs: bool
    dtype: Any
    score_window: int | None = None       # output-head positions per sequence (config.model.score_window)


def build_run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, devices=None) -> Run:
    """Data, policy, references, optimizer and initial state (`devices`: a subset to run on; default all)."""
    workdir = pathlib.Path(workdir)
    mesh = make_mesh(dict(cfg.mesh), devices)
    dtype = compute_dtype(cfg.model.dtype)
    loss_fn = build_loss(cfg)
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    datasets = tokenize_splits(cfg, load_records(cfg, loss_fn), tokenizer)

    model, mconfig = load_model(cfg.model.path, cfg, mesh, dtype, vocab_size=len(tokenizer))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    total_steps = cfg.train.steps * max(1, cfg.train.iterations)
    tx, schedule = make_optimizer(cfg.optimizer, total_steps)
    state = {"params": params, "opt_state": jax.jit(tx.init)(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(cfg.seed))}
    state = on_mesh(state, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)

    references: list[R.Reference] = []
    if loss_fn.requires_reference:
        specs = list(cfg.references) or [{"path": "", "tokenizer": ""}]
        for spec in specs:
            spec = dict(spec)
            if not spec.get("path"):
                fingerprint = weights_fingerprint(cfg.model.path, cfg, len(tokenizer))
                references.append(R.Reference(INITIAL_POLICY, fingerprint, graphdef,
                                              jax.tree.map(jnp.copy, params), rest, datasets, tokenizer_path(cfg)))
                continue
            rmodel, _ = load_model(spec["path"], cfg, mesh, dtype)
            rfp = weights_fingerprint(spec["path"], cfg)
            rgd, rparams, rrest = nnx.split(rmodel, nnx.Param, ...)
            rtok_name = spec.get("tokenizer") or spec["path"]
            if rtok_name == tokenizer_path(cfg):
                rdatasets = datasets
            else:
                rtok = load_tokenizer(rtok_name)
                rdatasets = {s: D.tokenize_records(ds.records, rtok, max_length=cfg.data.max_length,
                                                   max_prompt_length=cfg.data.max_prompt_length or None,
                                                   truncation=cfg.data.truncation, k_max=ds.k_max,
                                                   on_error=cfg.data.on_error) for s, ds in datasets.items()}
            references.append(R.Reference(spec["path"], rfp, rgd, rparams, rrest, rdatasets, rtok_name))
        needed = getattr(loss_fn, "num_references", None)
        if needed and needed != len(references):
            raise ValueError(f"loss {cfg.loss.name!r} needs {needed} references, config.references gives "
                             f"{len(references)}")
    mode = cfg.reference_mode
    if mode not in ("auto", "cache", "in_step"):
        raise ValueError(f"reference_mode={mode!r}: expected 'auto', 'cache' or 'in_step'")
    in_step = mode == "in_step" and bool(references)
    if in_step and any(r.datasets is not datasets for r in references):
        raise ValueError("reference_mode='in_step' needs references that share the policy's tokenizer; "
                         "use 'cache' for references with their own tokenizer")
    return Run(cfg, workdir, mesh, tokenizer, loss_fn, datasets, mconfig, graphdef, rest, state, shardings, tx,
               schedule, references, {}, in_step, dtype, score_window_of(cfg, datasets))


def score_window_of(cfg: ml_collections.ConfigDict, datasets: Mapping[str, D.TokenizedDataset]) -> int | None:
    """The run's static `score_window` (`config.model.score_window`) for `datasets` (one tokenization: every
    split, so train, eval and the reference cache share one W and one compilation per length bucket)."""
    span = max((ds.max_scored_span for ds in datasets.values()), default=0)
    return resolve_score_window(cfg.model.score_window, span)


def fill_reference_cache(run: Run) -> None:
    """Precompute `[N, K, R]` reference log-probs for every split (cached under WORKDIR/ref_cache)."""
    if not run.references or run.in_step_refs:
        return
    cfg = run.config
    per_process = local_batch_size(cfg.data.eval_batch_size, run.mesh)
    cache_dir = pathlib.Path(cfg.reference_cache_dir or run.workdir / "ref_cache")

    def logps_fn(ref: R.Reference):
        """One jitted scorer per reference, shared by every split (compiled once per length bucket)."""
        window = run.score_window if ref.datasets is run.datasets else score_window_of(cfg, ref.datasets)
        return jax.jit(lambda p, b: (response_logps(ref.graphdef, p, ref.rest, b, compute_dtype=run.dtype,
                                                    vocab_chunk_size=cfg.model.vocab_chunk_size or None,
                                                    score_window=window),
                                     b["index"], b["valid"]),
                       out_shardings=replicated(run.mesh))

    scorers = [logps_fn(ref) for ref in run.references]
    cache = {}
    for split, ds in run.datasets.items():
        columns = []
        for ref, fn in zip(run.references, scorers):
            compute = lambda ref=ref, fn=fn: R.compute_logps(fn, ref.params, ref.datasets[split], per_process,  # noqa: E731
                                                             lambda b: to_global(b, run.mesh))
            columns.append(R.cached_logps(cache_dir, ref, split, compute))
        values = np.stack(columns, axis=-1)  # [N, K, R]
        _check_cache_complete(values, ds, split)
        cache[split] = values
    run.ref_cache = cache


def _check_cache_complete(values: np.ndarray, ds: D.TokenizedDataset, split: str) -> None:
    for e in ds.examples:
        k = len(e.sequences)
        if np.isnan(values[e.index, :k]).any():
            file, line = ds.records[e.index].source
            raise ValueError(f"{file}:{line}: a reference tokenizer dropped this record ({split}); raise "
                             "data.max_length or use truncation='truncate_prompt'")


def with_references(run: Run, batch: dict[str, np.ndarray], split: str) -> dict[str, np.ndarray]:
    """Add `ref_logps [B, K, R]` from the cache (cache mode), by record index."""
    if not run.ref_cache:
        return batch
    index = batch["index"]
    ref = run.ref_cache[split][np.maximum(index, 0)]
    ref = np.where(batch["valid"][..., None], np.nan_to_num(ref), 0.0).astype(np.float32)
    if ref.shape[-1] == 1 and not getattr(run.loss_fn, "num_references", None):
        ref = ref[..., 0]
    return {**batch, "ref_logps": ref}


def _device_batch(run: Run, batch: dict[str, np.ndarray], split: str) -> dict[str, jax.Array]:
    batch = with_references(run, batch, split)
    batch = {k: v for k, v in batch.items() if k != "index"}
    return to_global(batch, run.mesh)


# ------------------------------------------------------------------------------------------------ train
class _Preemption:
    """SIGTERM sets a flag; the loop saves and exits at the next step (multi-host: at JAX's sync point)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                return multihost_utils.reached_preemption_sync_point(step) or self._agree(self.requested)
            except Exception:  # noqa: BLE001 - no preemption service: agree on the local flags
                return self._agree(self.requested)
        return self.requested

    @staticmethod
    def _agree(flag: bool) -> bool:
        return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


class _Window:
    """Throughput over the steps since the last read: tokens/s, step time and MFU (see rpo_jax.train.metrics)."""

    def __init__(self):
        self.compiled = False
        self.restart()

    def restart(self) -> None:
        self.start, self.tokens, self.flops, self.steps = time.perf_counter(), 0.0, 0.0, 0

    def add(self, batch: Mapping[str, np.ndarray], flops_per_token_: float) -> None:
        """Count one step's tokens (real, all processes) and FLOPs (padded sequences × their length)."""
        b, k, t = batch["tokens"].shape
        self.tokens += float(np.sum(batch["attention_mask"])) * jax.process_count()
        self.flops += b * k * t * jax.process_count() * flops_per_token_
        self.steps += 1

    def read(self, peak_flops: float) -> dict[str, float]:
        """Metrics since the last read (the caller has just synchronised on the step's results)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"perf/step_time_s": elapsed / max(self.steps, 1), "perf/tokens_per_s": self.tokens / elapsed,
               "perf/mfu": self.flops / elapsed / peak_flops}
        self.restart()
        return out


def evaluate(run: Run, params, eval_step) -> dict[str, float]:
    """Loss and metrics over the whole eval split (means weighted by the examples in each batch)."""
    ds = run.datasets.get("eval")
    if ds is None:
        return {}
    per_process = local_batch_size(run.config.data.eval_batch_size, run.mesh)
    totals: dict[str, float] = {}
    weight_sum = 0.0
    loss_sum = 0.0
    for batch in D.make_eval_batches(ds, per_process):
        batch_loss, batch_weight, metrics = jax.device_get(
            eval_step(params, _device_batch(run, batch, "eval"), _ref_params(run)))
        if batch_weight == 0:
            continue
        loss_sum += float(batch_loss)
        weight_sum += float(batch_weight)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) * float(batch_weight)
    if weight_sum == 0:
        return {}
    return {"loss": loss_sum / weight_sum, **{k: v / weight_sum for k, v in totals.items()}}


def _ref_params(run: Run) -> tuple:
    return tuple(r.params for r in run.references) if run.in_step_refs else ()


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, precompute_only: bool = False,
          devices=None) -> dict[str, Any]:
    """Run the configured training; returns the final train and eval metrics."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=1))
    run = build_run(cfg, workdir, devices=devices)
    fill_reference_cache(run)
    if precompute_only:
        return {"reference_cache": {k: list(v.shape) for k, v in run.ref_cache.items()}}

    writer = MetricWriter(workdir, tensorboard=cfg.metrics.tensorboard)
    ckpt = Checkpointer(workdir / "checkpoints", every_steps=cfg.train.checkpoint_every,
                        keep=cfg.train.keep_checkpoints, asynchronous=cfg.train.async_checkpointing)
    per_process = local_batch_size(cfg.data.batch_size, run.mesh)
    iterator = D.make_train_iterator(run.datasets["train"], per_process, seed=cfg.seed, shuffle=cfg.data.shuffle)

    ref_graphdefs = tuple((r.graphdef, r.rest) for r in run.references) if run.in_step_refs else ()
    chunk = cfg.model.vocab_chunk_size or None
    step_fn = make_train_step(run.graphdef, run.rest, run.loss_fn, run.tx, compute_dtype=run.dtype,
                              micro_batches=cfg.data.micro_batches, vocab_chunk_size=chunk,
                              ref_graphdefs=ref_graphdefs, lr_schedule=run.schedule, score_window=run.score_window)
    train_step = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(run.state_shardings, replicated(run.mesh)))
    eval_step = jax.jit(make_eval_step(run.graphdef, run.rest, run.loss_fn, compute_dtype=run.dtype,
                                       vocab_chunk_size=chunk, ref_graphdefs=ref_graphdefs,
                                       score_window=run.score_window),
                        out_shardings=replicated(run.mesh))

    state = run.state
    restored = ckpt.restore_latest(abstract_like(state))
    if restored is not None:
        step0, state, data_state = restored
        iterator.set_state(data_state)
        log.info("resumed from step %d", step0)
    total_steps = cfg.train.steps * max(1, cfg.train.iterations)
    step = int(state["step"])

    peak = cfg.metrics.peak_flops or measure_matmul_peak(run.dtype, repeats=2)
    n_refs = len(run.references) if run.in_step_refs else 0
    if run.score_window:
        log.info("output head on %d logit positions per sequence (config.model.score_window)", run.score_window)

    progress = None
    if cfg.train.progress_bar and jax.process_index() == 0 and step < total_steps:
        from tqdm.auto import tqdm
        progress = tqdm(total=total_steps, initial=step, desc="rpo-train", dynamic_ncols=True)

    last: dict[str, float] = {}
    window = _Window()
    with _Preemption() as preemption:
        while step < total_steps:
            if cfg.train.iterations > 1 and step > 0 and step % cfg.train.steps == 0 and run.references:
                _reset_reference_to_policy(run, state["params"], step)
            batch = next(iterator)
            window.add(batch, train_flops_per_token(run.model_config, batch["tokens"].shape[-1],
                                                    num_references=n_refs, score_window=run.score_window))
            state, metrics = train_step(state, _device_batch(run, batch, "train"), _ref_params(run))
            step += 1
            if not window.compiled:  # keep the first step's compilation out of the throughput
                jax.block_until_ready(metrics)
                window.restart()
                window.compiled = True
            if step % cfg.train.log_every == 0 or step == total_steps:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last.update(window.read(peak))
                last.update(device_memory())
                writer.write(step, last, prefix="train/")
            if progress is not None:
                progress.update(1)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != total_steps:
                writer.write(step, evaluate(run, state["params"], eval_step), prefix="eval/")
                window.restart()
            ckpt.save(step, state, iterator.get_state())
            if preemption.should_stop(step):
                log.warning("preemption requested: saving step %d and exiting", step)
                close_run(ckpt, writer, step, state, iterator.get_state())
                return {"train": last, "preempted_at": step}
    if progress is not None:
        progress.close()
    eval_metrics = evaluate(run, state["params"], eval_step)
    if eval_metrics:
        writer.write(step, eval_metrics, prefix="eval/")
    close_run(ckpt, writer, step, state, iterator.get_state())
    if cfg.train.export_at_end:
        export(run, state["params"], workdir / "export")
    return {"train": last, "eval": eval_metrics, "step": step}


def _reset_reference_to_policy(run: Run, params, step: int) -> None:
    """Iterated training: the primary reference becomes the current policy (the previous iterate); its cached
    log-probs are recomputed. Other references (MRPO) stay as they are."""
    primary = run.references[0]
    if primary.datasets is not run.datasets:
        raise ValueError("train.iterations > 1 needs a primary reference with the policy's tokenizer")
    run.references[0] = dataclasses.replace(primary, name=INITIAL_POLICY, graphdef=run.graphdef, rest=run.rest,
                                            params=jax.tree.map(jnp.copy, params),
                                            fingerprint=f"{primary.fingerprint}+iterate@{step}")
    fill_reference_cache(run)


def export(run: Run, params, out_dir: str | os.PathLike) -> pathlib.Path:
    """Write the policy as a Hugging Face directory (config, safetensors, tokenizer); process 0 writes."""
    return save_replicated(run.graphdef, params, run.rest, run.model_config, out_dir, run.tokenizer, run.mesh)


def save_replicated(graphdef, params, rest, model_config, out_dir, tokenizer, mesh, *, save=save_hf) -> pathlib.Path:
    """`save(model, model_config, out_dir, tokenizer=...)` of the merged model, its parameters gathered to every
    process first; process 0 writes (`save_hf` for a policy, `save_reward_model` for a reward model)."""
    params = jax.jit(lambda p: p, out_shardings=replicated(mesh))(params)  # every process holds the whole
    if jax.process_index() == 0:
        save(nnx.merge(graphdef, params, rest), model_config, out_dir, tokenizer=tokenizer)
    multihost_utils.sync_global_devices("rpo_jax_export")
    return pathlib.Path(out_dir)


def close_run(ckpt: Checkpointer, writer: MetricWriter, step: int, state, data_state) -> None:
    """The last checkpoint of a run (forced, waited for) and the metric files closed."""
    ckpt.save(step, state, data_state, force=True)
    ckpt.close()
    writer.close()


def read_run_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
    """The config an rpo-train run directory was started with (WORKDIR/config.json)."""
    config_file = workdir / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{workdir}: config.json is missing (not an rpo-train run directory)")
    return ml_collections.ConfigDict(json.loads(config_file.read_text()))


def export_workdir(workdir: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """`rpo-export`: the newest restorable checkpoint of `workdir` as a Hugging Face directory (a policy, or a
    sequence-classification reward model for a `mode="reward_model"` run)."""
    workdir = pathlib.Path(workdir)
    cfg = read_run_config(workdir)
    mesh = make_mesh(dict(cfg.mesh))
    dtype = compute_dtype(cfg.model.dtype)
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    if cfg.get("mode") == "reward_model":
        from rpo_jax.models import save_reward_model
        from rpo_jax.train.reward_model import build_reward_model
        model, mconfig = build_reward_model(cfg, tokenizer, mesh, dtype)
        save = save_reward_model
    else:
        model, mconfig = load_model(cfg.model.path, cfg, mesh, dtype, vocab_size=len(tokenizer))
        save = save_hf
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ckpt = Checkpointer(workdir / "checkpoints", every_steps=1, asynchronous=False)
    restored = ckpt.restore_params(abstract_like(params))
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir}/checkpoints: no restorable checkpoint")
    step, params = restored
    log.info("exporting step %d of %s", step, workdir)
    return save_replicated(graphdef, params, rest, mconfig, out_dir, tokenizer, mesh, save=save)
