"""Metrics: FLOP accounting for MFU, the matmul peak, and writers (console, JSONL, TensorBoard).

FLOPs per trained token (the formula MFU uses, after Kaplan et al. / PaLM appendix B):

    train     = 6·P + 12·L·T·d_attn      (forward + backward through the policy; attention scores and
                                            values over all T keys, d_attn = heads·head_dim, T padded length)
    reference = 2·P + 4·L·T·d_attn      per reference scored in the step (none when log-probs are cached)

P counts the non-embedding parameters plus the unembedding matrix (the input embedding is a gather, not a
matmul). MFU = achieved FLOP/s ÷ peak FLOP/s; the peak is `metrics.peak_flops` from the config, or measured
once on the device with a large matmul in the compute dtype (`measure_matmul_peak`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np


def flops_per_token(matmul_params: int, num_layers: int, seq_len: int, attn_dim: int, num_references: int = 0) -> float:
    """Training FLOPs per token for the policy plus `num_references` in-step reference forwards."""
    forward = 2 * matmul_params + 4 * num_layers * seq_len * attn_dim  # matmuls + QKᵀ and AV over all T keys
    return 3 * forward + num_references * forward


def measure_matmul_peak(dtype=jnp.float32, n: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on the default device, best of `repeats` (the MFU denominator).

    Each product takes about a second on a CPU (n = 4096), long enough to ride out short frequency bursts.
    """
    platform = jax.devices()[0].platform
    n = n or (4096 if platform == "cpu" else 8192)
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def device_memory() -> dict[str, float]:
    """Peak and current bytes on the first local device (accelerators), or the process's peak RSS on CPU."""
    stats = {}
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend implements memory_stats
        stats = {}
    if "peak_bytes_in_use" in stats:
        return {"memory/peak_gib": stats["peak_bytes_in_use"] / 2**30,
                "memory/in_use_gib": stats.get("bytes_in_use", 0) / 2**30}
    import resource
    return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class MetricWriter:
    """Writes scalar metrics to the console, `metrics.jsonl` and TensorBoard event files (main process only)."""

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True, console: bool = True,
                 enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.console = console
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        values = {f"{prefix}{k}": float(np.asarray(v)) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
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
        if self._tb is not None:
            self._tb.close()
