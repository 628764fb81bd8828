"""The run skeleton every training mode plugs into (`run_task`): metric writer, checkpointer, restore, progress
bar, preemption, throughput, the log / eval / checkpoint cadence, the last checkpoint and the export.

A mode (preference, online, reward model) builds a `Task`: its run (`RunSetup`), how one *unit* advances the
train state, how the policy is evaluated, and the data position saved with a checkpoint. A unit is one optimizer
step (preference, reward model) or one online iteration of several optimizer steps. Per unit the skeleton does:

    state, metrics = advance(state, unit)          (unit += 1)
    every log_every units and at the end:          write `<prefix>/…` metrics + throughput + memory
    every eval_every units (not at the end):       write `eval/…` = evaluate(params, unit)
    every train.checkpoint_every units (0: none):  checkpoint (train state + data position)
    SIGTERM seen (on every host):                  checkpoint, close and return {"preempted_at": unit}

and at the end: checkpoint (with checkpoint_every = 0 only when the run does not export), evaluate, close, export
(`config.train.export_at_end`), and a summary on stdout (main process; `print_summary`): where the export,
metrics.jsonl, TensorBoard and the last checkpoint are, and the final eval metrics. Each evaluation is logged
("evaluating at step N" … "evaluation at step N done in X s").

Safety (`config.train`):

* **Resume** (`resume`): the work directory records the run's identity (`rpo_jax.train.core.identity`). With
  checkpoints present, a run of the same identity resumes from the newest one that restores ("auto", "must",
  "force"); a different identity is refused with the differences listed, unless `resume="force"`; "never"
  refuses a directory with checkpoints; "must" refuses to start without one. Checkpoints are never deleted
  to make room for another run, and a directory whose checkpoints all fail to restore is an error, not a fresh
  start over them. A resumed run moves the metrics written after its checkpoint (their steps are replayed) to
  metrics.replayed.jsonl, so metrics.jsonl has one record per logged step.
* **Divergence** (`on_nonfinite`): every step reports whether its loss or gradient norm is non-finite; the
  skeleton reads the flags where it synchronises anyway (log points, before a checkpoint, at the end). "stop":
  the run stops with `NonFiniteError` naming the step and its values, without saving anything after the last
  good checkpoint; "skip_step": such steps make no update (counted as `skipped_steps`), and
  `max_skipped_in_a_row` of them in a row stop the run the same way.
* Every exit path (an error included) closes the checkpointer, so pending saves finish and no background
  machinery is left to print tracebacks at interpreter shutdown.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from rpo_jax.data import TokenizedDataset, make_eval_batches, storage
from rpo_jax.train.build.state import RunSetup
from rpo_jax.train.config.validation import validate
from rpo_jax.train.core.checkpoint import Checkpointer, abstract_like
from rpo_jax.train.core.export import save_adapter_at_end, save_model
from rpo_jax.train.core.identity import identity_differences
from rpo_jax.train.core.metrics import MetricWriter
from rpo_jax.train.core.workdir import CHECKPOINTS, EXPORT, continue_metrics, metrics_records, read_identity, record_run
from rpo_jax.train.runtime.cpu_memory import release_free_memory
from rpo_jax.train.runtime.global_batches import local_batch_size, process_rows
from rpo_jax.train.runtime.performance import Throughput, device_memory, measure_matmul_peak

RESUME_MODES = ("auto", "must", "never", "force")
NONFINITE_POLICIES = ("stop", "skip_step")


class ResumeError(ValueError):
    """The work directory cannot be continued as asked (`config.train.resume`); nothing in it was changed."""


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm was NaN or infinite (`config.train.on_nonfinite`)."""


log = logging.getLogger(__name__)


class Preemption:
    """SIGTERM sets a flag; the loop saves and exits at the next unit (multi-host: at JAX's sync point)."""

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
        """Whether to stop after optimizer step `step`: this process got SIGTERM, or (several processes) any
        did, or JAX's preemption service reached its sync point."""
        if jax.process_count() > 1:
            try:
                return multihost_utils.reached_preemption_sync_point(step) or self._agree(self.requested)
            except Exception:  # noqa: BLE001 - no preemption service: agree on the local flags
                return self._agree(self.requested)
        return self.requested

    @staticmethod
    def _agree(flag: bool) -> bool:
        return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))


class Unit(NamedTuple):
    """What one unit returns: the new train state, its metrics (device or host scalars; read only when logged)
    and the work it did, for throughput: counts of named items over all processes (`{"tokens": n}`) and FLOPs."""

    state: Any
    metrics: Mapping[str, Any]
    counts: Mapping[str, float] = {}
    flops: float = 0.0


@dataclasses.dataclass
class Task:
    """One training mode as `run_task` drives it.

    The train state's `step` counts optimizer steps, `steps_per_unit` of them per unit: a checkpoint taken after
    unit u is saved as step u·steps_per_unit, and a restored state resumes at unit step // steps_per_unit.
    """

    mode: str  # "preference" | "online" | "reward_model" (the exporter)
    run: RunSetup  # model, mesh, tokenizer, initial train state
    identity: Mapping[str, Any]  # what defines the run (`rpo_jax.train.core.identity`)
    units: int  # units in the whole run
    advance: Callable[[Any, int], Unit]  # (state, units done) → the next unit
    evaluate: Callable[[Any, int], dict[str, float]]  # (eval_input(state), units done) → eval metrics ({} when
    # no eval)
    eval_input: Callable[[Any], Any] = lambda state: state["params"]  # what of the train state evaluate reads
    data_state: Callable[[int], Any] = lambda unit: {}  # JSON data position saved with the checkpoint of a unit
    restore_data: Callable[[Any, int], None] = lambda data_state, unit: None  # put the data back at it
    steps_per_unit: int = 1
    unit_name: str = "step"  # the result's key for the units done
    metrics_prefix: str = "train"  # "<prefix>/…" metrics of a unit; the result's key
    log_every: int = 1
    eval_every: int = 0  # units between evaluations (0: only at the end)
    eval_at_start: bool = False  # also evaluate before the first unit (not on resume)
    label: str = "rpo-train"  # progress bar
    progress_metric: str | None = None  # a metric shown beside the progress bar
    mfu_dtype: Any = None  # units count FLOPs: MFU per chip against this dtype's peak
    log_filter: Callable[[dict[str, float]], dict[str, float]] = lambda metrics: metrics  # a unit's logged metrics
    # (read on the host) as written: e.g. without the metrics of a label the step had no row of (unpaired losses)
    # a second evaluation on its own cadence (config.eval.generation): (eval_input(state), unit) → metrics logged
    # under eval/ beside evaluate's, every side_eval_every units (0: never) and at the end; side_eval_done(): after
    # the final evaluation (the plot over training)
    side_eval: Callable[[Any, int], dict[str, float]] | None = None
    side_eval_every: int = 0
    side_eval_done: Callable[[], None] = lambda: None


def sum_over_eval_batches(
    dataset: TokenizedDataset, batch_size: int, mesh, sums_of: Callable[[dict[str, np.ndarray]], Mapping[str, float]]
) -> dict[str, float]:
    """Σ over every batch of a whole split (`make_eval_batches`, this process feeding its share of the global
    `batch_size`) of `sums_of(host batch)`, a mapping of per-batch sums (a modes' evaluation divides them by
    its weight)."""
    totals: dict[str, float] = {}
    for batch in make_eval_batches(dataset, local_batch_size(batch_size, mesh), **process_rows(mesh).iterator_args()):
        for k, v in sums_of(batch).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return totals


def check_safety_settings(cfg) -> None:
    """ValueErrors naming the field for bad `config.train.resume` / `on_nonfinite` / `max_skipped_in_a_row`
    (the schema's: `rpo_jax.train.config.validation.validate`)."""
    validate(cfg)


def resume_or_start(task: Task, ckpt: Checkpointer, workdir: storage.PathLike) -> tuple[Any, int, int | None]:
    """(train state, units done, metrics.jsonl records to keep or None for a fresh start), following
    `config.train.resume` (module docstring); records the run (config.json, run_identity.json) once it is
    clear that it starts or continues here."""
    cfg = task.run.config
    mode = cfg.train.resume
    steps = ckpt.all_steps()
    if not steps:
        if mode == "must":
            raise ResumeError(f"{workdir}: no checkpoint to resume (config.train.resume='must')")
        record_run(cfg, workdir, task.mode, task.identity)
        return task.run.state, 0, None
    if mode == "never":
        raise ResumeError(
            f"{workdir} already holds checkpoints (steps {', '.join(map(str, steps))}); "
            "config.train.resume='never' starts only in a directory without them: use another --workdir"
        )
    recorded = read_identity(workdir)
    differences = (
        identity_differences(recorded, task.identity)
        if recorded is not None
        else [
            "run_identity.json is missing (a run directory written before rpo_jax recorded run "
            "identities, or not an rpo-train run)"
        ]
    )
    if differences and mode != "force":
        raise ResumeError(
            f"{workdir} holds checkpoints (steps {', '.join(map(str, steps))}) of another run: "
            f"{'; '.join(differences)}. Use another --workdir, or --config.train.resume=force to "
            "continue these checkpoints with the new settings"
        )
    if differences:
        log.warning("resuming %s with a changed run (config.train.resume='force'): %s", workdir, "; ".join(differences))
    restored = ckpt.restore_latest(abstract_like(task.run.state))
    if restored is None:
        raise ResumeError(
            f"{ckpt.directory}: none of the checkpoints (steps {', '.join(map(str, steps))}) restores "
            "(see the warnings above); they are kept. Use another --workdir to start afresh"
        )
    _, state, saved = restored
    if isinstance(saved, Mapping) and {"data", "metrics_lines"} <= set(saved) <= {
        "data",
        "metrics_lines",
        "data_of_processes",
    }:
        data_state, metrics_lines = saved["data"], saved["metrics_lines"]
        of_processes = saved.get("data_of_processes") or [data_state]
        if len(of_processes) != jax.process_count():
            raise ResumeError(
                f"{ckpt.directory}: the checkpoint was written by {len(of_processes)} process(es), "
                f"this run has {jax.process_count()}; each process's data position is its own, so "
                f"resume with {len(of_processes)} process(es) (or use another --workdir)"
            )
        data_state = of_processes[jax.process_index()]
    else:  # a checkpoint from before the metrics count was recorded: keep every record, append after them
        data_state, metrics_lines = saved, metrics_records(workdir)
    unit = int(state["step"]) // task.steps_per_unit
    task.restore_data(data_state, unit)
    record_run(cfg, workdir, task.mode, task.identity)
    log.info("resumed at %s %d", task.unit_name, unit)
    return state, unit, metrics_lines


def json_of_every_process(value: Any) -> list[Any]:
    """The JSON-able `value` of every process, in process order (two small all-gathers: the sizes, then the
    bytes; `[value]` with one process). Every process must call it at the same point."""
    if jax.process_count() == 1:
        return [value]
    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: raw.size] = raw
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(gathered[i, : int(n)]).decode()) for i, n in enumerate(sizes)]


def checkpointed_position(data_state: Any, metrics_lines: int) -> dict[str, Any]:
    """What a checkpoint records beside the train state: the data position (`data`, process 0's; with several
    processes also `data_of_processes`, each process's own, since each reads its own share of the batches — the
    checkpoint's JSON is written by process 0 only) and the number of metrics.jsonl records."""
    out = {"data": data_state, "metrics_lines": metrics_lines}
    if jax.process_count() > 1:
        out["data_of_processes"] = json_of_every_process(data_state)
    return out


class DivergenceGuard:
    """Reads the units' `nonfinite` flags (device scalars, see `rpo_jax.train.step.steps.apply_gradients`) in one
    transfer when the run synchronises anyway, and raises `NonFiniteError` as `config.train.on_nonfinite` says."""

    def __init__(self, cfg, ckpt: Checkpointer, unit_name: str):
        self.policy, self.limit = cfg.train.on_nonfinite, int(cfg.train.max_skipped_in_a_row)
        self.ckpt, self.unit_name = ckpt, unit_name
        self.pending: list[tuple[int, Mapping[str, Any]]] = []
        self.in_a_row = self.skipped = 0

    def add(self, unit: int, metrics: Mapping[str, Any]) -> None:
        if "nonfinite" in metrics:
            self.pending.append((unit, metrics))

    def check(self) -> None:
        flags = jax.device_get([m["nonfinite"] for _, m in self.pending])
        pending, self.pending = self.pending, []
        for (unit, metrics), flag in zip(pending, flags):
            if not flag:
                self.in_a_row = 0
                continue
            self.in_a_row += 1
            self.skipped += 1
            if self.policy == "stop" or self.in_a_row >= self.limit:
                self._raise(unit, metrics)

    def _raise(self, unit: int, metrics: Mapping[str, Any]) -> None:
        values = {k: float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm") if k in metrics}
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        why = (
            "config.train.on_nonfinite='stop'"
            if self.policy == "stop"
            else f"{self.in_a_row} in a row, config.train.max_skipped_in_a_row={self.limit}"
        )
        latest = self.ckpt.latest_step()
        kept = f"the newest checkpoint, step {latest}, is kept" if latest is not None else "no checkpoint was saved"
        raise NonFiniteError(
            f"{self.unit_name} {unit}: non-finite training values ({shown}); stopped ({why}); "
            f"{kept} and nothing after it was saved"
        )


#: eval metrics the end-of-run summary shows, in this order, when the evaluation returns them (else its first few)
SUMMARY_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "accuracy",
    "margin",
    "judge_reward",
    "reward",
    "kl_to_initial",
    "generation/win_rate",
    "generation/win_rate_ci_low",
    "generation/win_rate_ci_high",
)


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.1f} s"
        if seconds < 120
        else f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"
    )


def print_summary(
    task: Task,
    workdir: storage.PathLike,
    unit: int,
    seconds: float,
    *,
    checkpoint: int | None,
    eval_metrics: Mapping[str, float] | None = None,
    exported: str | None = None,
    adapter: str | None = None,
    preempted: bool = False,
) -> None:
    """The few lines that end a run (main process only; stdout, stderr under RPO_JAX_QUIET like the metric lines):
    what it did, the export (and a LoRA run's PEFT adapter), metrics.jsonl, TensorBoard, the newest checkpoint
    (`checkpoint`: its step, None for none) and the key final eval metrics (`SUMMARY_METRICS`)."""
    if jax.process_index() != 0:
        return
    from rpo_jax.train.core.workdir import METRICS_FILE

    workdir, cfg = storage.as_path(workdir), task.run.config
    done = f"{task.unit_name} {unit} of {task.units}"
    what = (
        f"preempted at {done} after {_duration(seconds)}; run the same command again to resume"
        if preempted
        else f"done: {done} in {_duration(seconds)}"
    )
    lines = [f"{task.label}: {what}"]
    if exported:
        lines.append(f"  export:      {exported}")
    if adapter:
        lines.append(f"  adapter:     {adapter} (PEFT)")
    lines.append(f"  metrics:     {workdir / METRICS_FILE}")
    if cfg.metrics.tensorboard:
        lines.append(f"  TensorBoard: {workdir / 'tensorboard'}")
    lines.append(f"  checkpoint:  {workdir / CHECKPOINTS / str(checkpoint) if checkpoint is not None else 'none'}")
    if eval_metrics:
        keys = [k for k in SUMMARY_METRICS if k in eval_metrics] or list(eval_metrics)[:4]
        lines.append("  eval:        " + " ".join(f"{k}={float(eval_metrics[k]):.4g}" for k in keys))
    print("\n".join(lines), file=sys.stderr if os.environ.get("RPO_JAX_QUIET") else sys.stdout, flush=True)


def run_task(task: Task, workdir: storage.PathLike) -> dict[str, Any]:
    """Run `task` to its last unit in `workdir`, starting or resuming as `config.train.resume` says.

    Returns `{prefix: the last logged metrics, "eval": the final eval metrics, unit_name: units done, "export":
    the export directory or None}`, or `{prefix: …, "preempted_at": unit}` after SIGTERM. Raises `ResumeError`
    (the directory holds another run, ...) or `NonFiniteError` (the run diverged).
    """
    started = time.time()
    run, cfg, workdir = task.run, task.run.config, storage.as_path(workdir)
    check_safety_settings(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    every = cfg.train.checkpoint_every  # 0: no periodic checkpoint (config.train.checkpoint_every)
    ckpt = Checkpointer(
        workdir / CHECKPOINTS,
        every_steps=max(1, every) * task.steps_per_unit,
        keep=cfg.train.keep_checkpoints,
        asynchronous=cfg.train.async_checkpointing,
    )
    writer = progress = preempted = newest = None
    try:
        state, unit, metrics_lines = resume_or_start(task, ckpt, workdir)
        continue_metrics(workdir, metrics_lines)
        writer = MetricWriter(workdir, tensorboard=cfg.metrics.tensorboard, started=started)
        guard = DivergenceGuard(cfg, ckpt, task.unit_name)

        def evaluate(at: int, *, main: bool = True, side: bool = False) -> dict[str, float]:
            if progress is not None:
                progress.clear()  # the log lines on lines of their own, the bar drawn again below them
            log.info("evaluating at %s %d", task.unit_name, at)
            start = time.perf_counter()
            metrics = task.evaluate(task.eval_input(state), at) if main else {}
            if side and task.side_eval is not None:
                metrics = {**metrics, **task.side_eval(task.eval_input(state), at)}
            log.info("evaluation at %s %d done in %.1f s", task.unit_name, at, time.perf_counter() - start)
            if progress is not None:
                progress.refresh()
            return metrics

        def save(force: bool = False) -> None:
            step = unit * task.steps_per_unit
            if force or ckpt.should_save(step):
                guard.check()  # never save a state that a non-finite step produced
                writer.flush()  # the records the checkpoint counts are durable before it is
                ckpt.save(step, state, checkpointed_position(task.data_state(unit), writer.lines), force=force)

        peak = None
        if task.mfu_dtype is not None:
            peak = cfg.metrics.peak_flops or measure_matmul_peak(task.mfu_dtype, repeats=2)
        if cfg.train.progress_bar and jax.process_index() == 0 and unit < task.units:
            from tqdm.auto import tqdm

            progress = tqdm(total=task.units, initial=unit, desc=task.label, dynamic_ncols=True)
        if task.eval_at_start and unit == 0:
            writer.write(0, evaluate(0), prefix="eval/")

        prefix = task.metrics_prefix
        last: dict[str, float] = {}
        throughput = Throughput(peak, chips=run.mesh.devices.size)  # MFU per chip: peak_flops is one chip's
        compiled = False
        with Preemption() as preemption:
            while unit < task.units:
                state, metrics, counts, flops = task.advance(state, unit)
                unit += 1
                guard.add(unit, metrics)
                throughput.add(counts, flops)
                if not compiled:  # keep the first unit's compilation out of the throughput
                    jax.block_until_ready(metrics)
                    throughput.restart()
                    compiled = True
                if unit % task.log_every == 0 or unit == task.units:
                    guard.check()
                    last = {k: float(v) for k, v in jax.device_get(dict(metrics)).items() if k != "nonfinite"}
                    last = task.log_filter(last)
                    if cfg.train.on_nonfinite == "skip_step":
                        last["skipped_steps"] = float(guard.skipped)
                    last.update(throughput.read())
                    last.update(device_memory())
                    writer.write(unit, last, prefix=f"{prefix}/")
                if progress is not None:
                    progress.update(1)
                    if task.progress_metric in last:
                        progress.set_postfix({task.progress_metric: f"{last[task.progress_metric]:.3f}"})
                main_due = bool(task.eval_every) and unit % task.eval_every == 0
                side_due = bool(task.side_eval_every) and unit % task.side_eval_every == 0
                if (main_due or side_due) and unit != task.units:
                    guard.check()
                    writer.write(unit, evaluate(unit, main=main_due, side=side_due), prefix="eval/")
                    throughput.restart()
                if unit < task.units and every:
                    save()
                if preemption.should_stop(unit * task.steps_per_unit):
                    log.warning("preemption requested: saving %s %d and exiting", task.unit_name, unit)
                    save(force=True)
                    preempted = unit
                    break
        if preempted is None:
            # the last checkpoint comes before the final evaluation: a finished run started again re-evaluates,
            # and metrics.jsonl keeps one final record; with checkpoint_every = 0 only for rpo-export (no export)
            if every or not cfg.train.export_at_end:
                save(force=True)
            eval_metrics = evaluate(unit, side=bool(task.side_eval_every))
            writer.write(unit, eval_metrics, prefix="eval/")
            writer.flush()
            task.side_eval_done()
        newest = ckpt.latest_step()  # for the summary (once the last save is done, as close() waits anyway)
    finally:
        if progress is not None:
            progress.close()
        ckpt.close()
        if writer is not None:
            writer.close()
    if preempted is not None:
        print_summary(task, workdir, unit, time.time() - started, checkpoint=newest, preempted=True)
        return {prefix: last, "preempted_at": unit}
    exported = adapter = None
    if cfg.train.export_at_end:
        release_free_memory()  # the steps' freed buffers (CPU step memory reuse) go back before the export's copies
        exported = str(
            save_model(
                task.mode,
                run.graphdef,
                state["params"],
                run.rest,
                run.model_config,
                workdir / EXPORT,
                run.tokenizer,
                run.mesh,
                max_shard_size=cfg.export.max_shard_size,
            )
        )
        # LoRA runs: the adapters also as a PEFT directory, WORKDIR/export_adapter
        adapter = save_adapter_at_end(task.mode, run.graphdef, state["params"], run.rest, workdir, cfg, run.mesh)
    print_summary(
        task,
        workdir,
        unit,
        time.time() - started,
        checkpoint=newest,
        eval_metrics=eval_metrics,
        exported=exported,
        adapter=adapter and str(adapter),
    )
    return {prefix: last, "eval": eval_metrics, task.unit_name: unit, "export": exported}
