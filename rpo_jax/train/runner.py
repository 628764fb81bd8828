"""The run skeleton every training mode plugs into (`run_task`): metric writer, checkpointer, restore, progress
bar, preemption, throughput, the log / eval / checkpoint cadence, the last checkpoint and the export.

A mode (preference, online, reward model) builds a `Task`: its run (`RunSetup`), how one *unit* advances the
train state, how the policy is evaluated, and the data position saved with a checkpoint. A unit is one optimizer
step (preference, reward model) or one online iteration of several optimizer steps. Per unit the skeleton does:

    state, metrics = advance(state, unit)          (unit += 1)
    every log_every units and at the end:          write `<prefix>/…` metrics + throughput + memory
    every eval_every units (not at the end):       write `eval/…` = evaluate(params, unit)
    every train.checkpoint_every units:            checkpoint (train state + data position)
    SIGTERM seen (on every host):                  checkpoint, close and return {"preempted_at": unit}

and at the end: evaluate, checkpoint, close, export (`config.train.export_at_end`).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import signal
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from rpo_jax.data import TokenizedDataset, make_eval_batches
from rpo_jax.train.checkpoint import Checkpointer, abstract_like
from rpo_jax.train.export import save_model
from rpo_jax.train.mesh import local_batch_size
from rpo_jax.train.metrics import MetricWriter
from rpo_jax.train.performance import Throughput, device_memory, measure_matmul_peak
from rpo_jax.train.setup import RunSetup
from rpo_jax.train.workdir import CHECKPOINTS, EXPORT

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

    mode: str                                            # "preference" | "online" | "reward_model" (the exporter)
    run: RunSetup                                        # model, mesh, tokenizer, initial train state
    units: int                                           # units in the whole run
    advance: Callable[[Any, int], Unit]                  # (state, units done) → the next unit
    evaluate: Callable[[Any, int], dict[str, float]]     # (params, units done) → eval metrics ({} when no eval)
    data_state: Callable[[int], Any] = lambda unit: {}   # JSON data position saved with the checkpoint of a unit
    restore_data: Callable[[Any, int], None] = lambda data_state, unit: None  # put the data back at it
    steps_per_unit: int = 1
    unit_name: str = "step"                              # the result's key for the units done
    metrics_prefix: str = "train"                        # "<prefix>/…" metrics of a unit; the result's key
    log_every: int = 1
    eval_every: int = 0                                  # units between evaluations (0: only at the end)
    eval_at_start: bool = False                          # also evaluate before the first unit (not on resume)
    label: str = "rpo-train"                             # progress bar
    progress_metric: str | None = None                   # a metric shown beside the progress bar
    mfu_dtype: Any = None                                # units count FLOPs: MFU against this dtype's matmul peak


def sum_over_eval_batches(dataset: TokenizedDataset, batch_size: int, mesh,
                          sums_of: Callable[[dict[str, np.ndarray]], Mapping[str, float]]) -> dict[str, float]:
    """Σ over every batch of a whole split (`make_eval_batches`, this process feeding its share of the global
    `batch_size`) of `sums_of(host batch)`, a mapping of per-batch sums (a modes' evaluation divides them by
    its weight)."""
    totals: dict[str, float] = {}
    for batch in make_eval_batches(dataset, local_batch_size(batch_size, mesh)):
        for k, v in sums_of(batch).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return totals


def run_task(task: Task, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Run `task` to its last unit in `workdir` (resuming from its newest restorable checkpoint).

    Returns `{prefix: the last logged metrics, "eval": the final eval metrics, unit_name: units done, "export":
    the export directory or None}`, or `{prefix: …, "preempted_at": unit}` after SIGTERM.
    """
    run, cfg, workdir = task.run, task.run.config, pathlib.Path(workdir)
    writer = MetricWriter(workdir, tensorboard=cfg.metrics.tensorboard)
    ckpt = Checkpointer(workdir / CHECKPOINTS, every_steps=max(1, cfg.train.checkpoint_every) * task.steps_per_unit,
                        keep=cfg.train.keep_checkpoints, asynchronous=cfg.train.async_checkpointing)
    state, unit = run.state, 0
    restored = ckpt.restore_latest(abstract_like(state))
    if restored is not None:
        _, state, data_state = restored
        unit = int(state["step"]) // task.steps_per_unit
        task.restore_data(data_state, unit)
        log.info("resumed at %s %d", task.unit_name, unit)

    def save(force: bool = False) -> None:
        ckpt.save(unit * task.steps_per_unit, state, task.data_state(unit), force=force)

    def close() -> None:
        save(force=True)
        ckpt.close()
        writer.close()

    peak = None
    if task.mfu_dtype is not None:
        peak = cfg.metrics.peak_flops or measure_matmul_peak(task.mfu_dtype, repeats=2)
    progress = None
    if cfg.train.progress_bar and jax.process_index() == 0 and unit < task.units:
        from tqdm.auto import tqdm
        progress = tqdm(total=task.units, initial=unit, desc=task.label, dynamic_ncols=True)
    if task.eval_at_start and unit == 0:
        writer.write(0, task.evaluate(state["params"], 0), prefix="eval/")

    prefix = task.metrics_prefix
    last: dict[str, float] = {}
    throughput = Throughput(peak)
    compiled = False
    with Preemption() as preemption:
        while unit < task.units:
            state, metrics, counts, flops = task.advance(state, unit)
            unit += 1
            throughput.add(counts, flops)
            if not compiled:  # keep the first unit's compilation out of the throughput
                jax.block_until_ready(metrics)
                throughput.restart()
                compiled = True
            if unit % task.log_every == 0 or unit == task.units:
                last = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
                last.update(throughput.read())
                last.update(device_memory())
                writer.write(unit, last, prefix=f"{prefix}/")
            if progress is not None:
                progress.update(1)
                if task.progress_metric in last:
                    progress.set_postfix({task.progress_metric: f"{last[task.progress_metric]:.3f}"})
            if task.eval_every and unit % task.eval_every == 0 and unit != task.units:
                writer.write(unit, task.evaluate(state["params"], unit), prefix="eval/")
                throughput.restart()
            save()
            if preemption.should_stop(unit * task.steps_per_unit):
                log.warning("preemption requested: saving %s %d and exiting", task.unit_name, unit)
                close()
                return {prefix: last, "preempted_at": unit}
    if progress is not None:
        progress.close()
    eval_metrics = task.evaluate(state["params"], unit)
    writer.write(unit, eval_metrics, prefix="eval/")
    close()
    exported = None
    if cfg.train.export_at_end:
        exported = str(save_model(task.mode, run.graphdef, state["params"], run.rest, run.model_config,
                                  workdir / EXPORT, run.tokenizer, run.mesh))
    return {prefix: last, "eval": eval_metrics, task.unit_name: unit, "export": exported}
