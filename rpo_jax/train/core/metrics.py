"""The metric writer: scalar metrics to the console, `WORKDIR/metrics.jsonl` and TensorBoard (main process only).

What is measured lives elsewhere: loss metrics in `rpo_jax.losses`, speed and memory in
`rpo_jax.train.runtime.performance`.

Every record reaches metrics.jsonl. A local file is appended to and flushed per record. An object store has no
append, so under a URL work directory (`gs://…`) the writer keeps the file's records in memory and uploads the
whole object again (`storage.write_atomically`): with the first record written `upload_every_s` seconds or more
after the last upload, before every checkpoint (`flush`, called by the run skeleton, so a checkpoint never
counts records the bucket does not have) and at the end. A process killed between uploads loses only records
after its last checkpoint, whose steps a resumed run replays and logs again. TensorBoard event files are
flushed (tensorboardX uploads them whole to `gs://` / `s3://`) at the same points.

Every record carries, after `step`, when it was written: `time`, the wall clock as ISO 8601 in UTC to the second
(`"2025-01-31T12:00:05+00:00"`, `datetime.fromisoformat` reads it), and `elapsed_s`, seconds since this process
started the run (`started`: the run skeleton passes the moment `run_task` began; a resumed run counts from its
own start, not from the first run's). Neither goes to TensorBoard (its events carry their own wall time) nor to
the console line.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections.abc import Mapping

import jax
import numpy as np

from rpo_jax.data import storage
from rpo_jax.train.core.workdir import METRICS_FILE, metrics_records


class MetricWriter:
    """Writes scalar metrics to the console, `metrics.jsonl` and TensorBoard event files (main process only)."""

    def __init__(
        self,
        workdir: storage.PathLike,
        *,
        tensorboard: bool = True,
        console: bool = True,
        enabled: bool | None = None,
        upload_every_s: float = 30.0,
        started: float | None = None,
    ):
        self.started = time.time() if started is None else started  # `time.time()` at the run's start
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.console = console
        self.lines = 0  # records in metrics.jsonl (those already there included); a checkpoint records it
        self.upload_every_s = upload_every_s
        self._jsonl = None  # the open file (local work directory)
        self._records = None  # the whole file's text, kept to upload again (URL work directory)
        self._uploaded = 0.0  # when the records were last uploaded
        self._pending = False  # records not uploaded yet
        self._tb = None
        if not self.enabled:
            return
        directory = storage.as_path(workdir)
        directory.mkdir(parents=True, exist_ok=True)
        self._path = directory / METRICS_FILE
        self.lines = metrics_records(directory)
        if storage.is_url(directory):
            self._records = self._path.read_text() if self._path.exists() else ""
            self._uploaded = time.monotonic()
        else:
            self._jsonl = open(self._path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.fspath(directory / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        """One record `{"step": step, "time": …, "elapsed_s": …, prefix + name: value, ...}`; nothing for empty
        `metrics`."""
        if not self.enabled or not metrics:
            return
        values = {f"{prefix}{k}": float(np.asarray(v)) for k, v in metrics.items()}
        now = time.time()
        when = {
            "time": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(now - self.started, 3),
        }
        line = json.dumps({"step": int(step), **when, **values}) + "\n"
        self.lines += 1
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))
        if self._jsonl is not None:
            self._jsonl.write(line)
            self.flush()
        else:
            self._records += line
            self._pending = True
            if time.monotonic() - self._uploaded >= self.upload_every_s:
                self.flush()
        if self.console:
            shown = " ".join(f"{k}={v:.4g}" for k, v in values.items())
            print(
                f"[step {step}] {shown}", file=sys.stderr if os.environ.get("RPO_JAX_QUIET") else sys.stdout, flush=True
            )

    def flush(self) -> None:
        """Make every record written so far durable: flushed to the local file, or the whole file uploaded."""
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.flush()
        elif self._pending:
            storage.write_atomically(self._path, self._records)
            self._pending = False
            self._uploaded = time.monotonic()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
