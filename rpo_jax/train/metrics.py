"""The metric writer: scalar metrics to the console, `WORKDIR/metrics.jsonl` and TensorBoard (main process only).

What is measured lives elsewhere: loss metrics in `rpo_jax.losses`, speed and memory in
`rpo_jax.train.performance`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

import jax
import numpy as np

from rpo_jax.train.workdir import METRICS_FILE, metrics_records


class MetricWriter:
    """Writes scalar metrics to the console, `metrics.jsonl` and TensorBoard event files (main process only)."""

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True, console: bool = True,
                 enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.console = console
        self.lines = 0  # records in metrics.jsonl (those already there included); a checkpoint records it
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.lines = metrics_records(workdir)
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        """One record `{"step": step, prefix + name: value, ...}`; nothing for empty `metrics`."""
        if not self.enabled or not metrics:
            return
        values = {f"{prefix}{k}": float(np.asarray(v)) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        self.lines += 1
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))
            self._tb.flush()
        if self.console:
            shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            print(f"[step {step}] {shown}", file=sys.stderr if os.environ.get("RPO_JAX_QUIET") else sys.stdout,
                  flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
