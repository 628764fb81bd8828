"""Performance accounting: the one FLOP model, the matmul peak, device memory, and the throughput window (step
time, items/s, MFU) that every training mode reports.

FLOPs per trained token (after Kaplan et al. / PaLM appendix B), for a policy with P matmul parameters and L
layers on sequences of T (padded) tokens, d_attn = heads·head_dim:

    train     = 6·P + 12·L·T·d_attn      (forward + backward through the policy; attention scores and values
                                           over all T keys)
    reference = 2·P + 4·L·T·d_attn       per reference scored in the step (none when log-probs are cached)

`train_flops_per_token` splits P into the decoder's matmuls P' (the input embedding is a gather, not a matmul)
and the unembedding V·D, which runs only on the W scored positions of a score window:

    6·P' + 12·L·T·d_attn + 6·V·D·W/T   (+ 2·P' + 4·L·T·d_attn + 2·V·D·W/T per in-step reference)

MFU = achieved FLOP/s ÷ (per-chip peak FLOP/s × chips). The FLOPs are those of the whole step over all processes
(counted from the global batch's shape, so every process counts the same), the chips every device of the run's
mesh, and the per-chip peak is `config.metrics.peak_flops` (one chip's, e.g. 459e12 for a TPU v5p in bf16), or
measured once on the first device with a large matmul in the compute dtype (`measure_matmul_peak`).
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp


def flops_per_token(matmul_params: int, num_layers: int, seq_len: int, attn_dim: int, num_references: int = 0) -> float:
    """Training FLOPs per token for the policy plus `num_references` in-step reference forwards (formula above)."""
    forward = 2 * matmul_params + 4 * num_layers * seq_len * attn_dim  # matmuls + QKᵀ and AV over all T keys
    return 3 * forward + num_references * forward


def train_flops_per_token(config, seq_len: int, *, num_references: int = 0, score_window: int | None = None) -> float:
    """FLOPs per token of the trainer's step for a model `config` (a `ModelConfig`): the output head counted
    only on the W = `score_window` positions it runs on (every position when None or W ≥ T−1)."""
    head_fraction = 1.0 if score_window is None or score_window >= seq_len - 1 else score_window / seq_len
    head = head_flops_per_position(config, num_references=num_references)
    return decoder_flops_per_slot(config, seq_len, num_references=num_references) + head_fraction * head


def head_flops_per_position(config, *, num_references: int = 0) -> float:
    """The output head's FLOPs at one position: 6·V·D, plus 2·V·D per in-step reference."""
    return flops_per_token(config.vocab_size * config.hidden_size, 0, 0, 0, num_references)


def decoder_flops_per_slot(config, seq_len: int, *, num_references: int = 0) -> float:
    """The step's FLOPs per slot of a row of `seq_len` slots without the output head: `train_flops_per_token`
    less its unembedding, `a + b·seq_len`."""
    attn_dim = config.num_heads * config.head_dim
    body = config.num_params(include_embeddings=False)
    return flops_per_token(body, config.num_layers, seq_len, attn_dim, num_references)


def attention_key_cost(config, *, num_references: int = 0) -> float:
    """c: the FLOPs of one more attention key per slot over a slot's FLOPs at no keys, the output head left out
    (`decoder_flops_per_slot(T) = a + b·T`: c = b / a). A packed row of T slots then costs ∝ T·(1 + c·T)
    (`rpo_jax.data.packing.Packing.key_cost`)."""
    a = decoder_flops_per_slot(config, 0, num_references=num_references)
    return (decoder_flops_per_slot(config, 1, num_references=num_references) - a) / a


def batch_flops(
    config,
    tokens_shape: tuple[int, ...],
    *,
    num_references: int = 0,
    score_window: int | None = None,
    head_positions: int | None = None,
) -> float:
    """FLOPs of one step on a global batch whose `tokens` have `tokens_shape`: `[B, K, T]` (padded: B·K·T
    slots at `train_flops_per_token(T, score_window)`) or `[R, T]` (packed rows, `rpo_jax.data.packing`: the
    decoder on every one of the R·T slots, the output head on `head_positions` of them — the scored slots, where
    the packed step runs it (`rpo_jax.models.logprobs.scored_token_logps`, which rounds each device's count up to
    a 256-slot chunk) — or on every slot when None)."""
    seq_len = tokens_shape[-1]
    slots = math.prod(tokens_shape)
    if len(tokens_shape) == 2 and head_positions is not None:
        head = head_flops_per_position(config, num_references=num_references)
        return slots * decoder_flops_per_slot(config, seq_len, num_references=num_references) + head_positions * head
    window = score_window if len(tokens_shape) == 3 else None
    return slots * train_flops_per_token(config, seq_len, num_references=num_references, score_window=window)


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


def mfu(flops_per_second: float, peak_flops_per_chip: float, chips: int) -> float:
    """Model FLOPs utilisation: achieved FLOP/s (of all chips together) ÷ (one chip's peak FLOP/s × chips)."""
    return flops_per_second / (peak_flops_per_chip * chips)


def device_memory() -> dict[str, float]:
    """Peak and current bytes on the first local device (accelerators), or the process's peak RSS on CPU."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend implements memory_stats
        stats = {}
    if "peak_bytes_in_use" in stats:
        return {
            "memory/peak_gib": stats["peak_bytes_in_use"] / 2**30,
            "memory/in_use_gib": stats.get("bytes_in_use", 0) / 2**30,
        }
    return {"memory/peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class Throughput:
    """Speed over the units (steps, iterations) since the last read.

    `add(counts, flops)` after each unit: `counts` of named items (e.g. {"tokens": n}, over all processes) and the
    unit's FLOPs over all chips; `read()` → `perf/step_time_s` (seconds per unit), `perf/<item>_per_s` per counted
    item and, when FLOPs were counted and a peak is known, `perf/mfu` = FLOP/s ÷ (`peak_flops` × `chips`), where
    `peak_flops` is one chip's peak and `chips` the number of chips (devices) the step runs on. A read with no
    unit since the last one is empty (e.g. right after the first, compiling unit was set aside with `restart`).
    """

    def __init__(self, peak_flops: float | None = None, chips: int = 1):
        if chips < 1:
            raise ValueError(f"Throughput: chips={chips} must be ≥ 1")
        self.peak_flops = peak_flops
        self.chips = chips
        self.restart()

    def restart(self) -> None:
        self.start, self.units, self.flops, self.counts = time.perf_counter(), 0, 0.0, {}

    def add(self, counts: Mapping[str, float] | None = None, flops: float = 0.0) -> None:
        self.units += 1
        self.flops += flops
        for name, value in (counts or {}).items():
            self.counts[name] = self.counts.get(name, 0.0) + float(value)

    def read(self) -> dict[str, float]:
        """The metrics since the last read (the caller has just synchronised on the unit's results); restarts."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {}
        if self.units:
            out["perf/step_time_s"] = elapsed / self.units
            out.update({f"perf/{name}_per_s": value / elapsed for name, value in self.counts.items()})
            if self.flops and self.peak_flops:
                out["perf/mfu"] = mfu(self.flops / elapsed, self.peak_flops, self.chips)
        self.restart()
        return out
