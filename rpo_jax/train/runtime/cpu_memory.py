"""CPU host memory: let XLA:CPU reuse each step's temporary buffer instead of faulting in fresh pages.

XLA:CPU takes every execution's temporary buffer (~2.5 GiB for a SmolLM2-135M train step of 1,024 tokens) from
`malloc`. glibc serves a block that large with a fresh `mmap` and unmaps it on `free`, so every step faults the
whole buffer back in: ~645,000 minor page faults and 2–5 s of kernel time per 7–10 s step on a 2-core VM, spread
over every op that first touches a page (matmul outputs included). Two settings together make the buffer come
back from the heap, already mapped, from the second step on:

1. `jax_cpu_enable_async_dispatch=False`: a single-device CPU computation runs on the thread that calls it, so
   its buffers come from glibc's main arena. (Blocks that large taken on a worker thread's arena are mmapped
   whatever the settings: those arenas' heaps are at most 64 MiB.) It must be set before JAX creates its CPU
   client, hence before the first computation.
2. `mallopt(M_MMAP_MAX, 0)` and `mallopt(M_TRIM_THRESHOLD, -1)`: large blocks come from the main arena's
   `brk` heap, and freed memory is never returned to the kernel (-1 converts to SIZE_MAX: never trim).

The cost: the process keeps its peak heap (its resident memory does not shrink after a step), and Python waits
for each CPU computation instead of running ahead (a training loop blocks on its metrics anyway). Results are
unchanged: only where the memory comes from. Computations over several CPU devices still run on worker
threads and gain nothing. Measured (`benchmarks/train_step.py`, docs/benchmarks.md): the cached SmolLM2-135M step
goes from 130–141 to 163–172 tokens/s, its kernel time from 2.1 s to 0.03 s per step.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys

import jax

log = logging.getLogger(__name__)

# <malloc.h> parameter numbers (glibc).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def _backends_initialized() -> bool:
    from jax._src import xla_bridge  # no public equivalent

    return xla_bridge.backends_are_initialized()


def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)


def reuse_cpu_step_memory() -> bool:
    """Apply the two settings above when JAX will compute on the CPU; returns whether they were applied.

    Call it before anything runs a JAX computation (after `jax.distributed.initialize`, which does not start
    the backends): `rpo-train` and `benchmarks/train_step.py` do, unless `config.cpu_reuse_memory` is False.
    Not applied (False, and a log line saying why) when the backends are already running (the dispatch mode
    is fixed by then: e.g. in a notebook that has used JAX), when the default backend is not the CPU, or when
    the C library is not glibc. Safe to call more than once.
    """
    if _backends_initialized() and jax.config.values["jax_cpu_enable_async_dispatch"]:
        log.info("CPU step memory reuse not applied: JAX's backends were started before it was requested")
        return False
    libc = _glibc()
    if libc is None:
        log.info(
            "CPU step memory reuse not applied: needs Linux with glibc (found %s, %s)",
            sys.platform,
            platform.libc_ver()[0] or "unknown libc",
        )
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # only the CPU client reads it
    if (backend := jax.default_backend()) != "cpu":
        log.info("CPU step memory reuse not applied: JAX computes on %s", backend)
        return False
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, -1) != 1:
        log.warning("CPU step memory reuse: glibc rejected mallopt; XLA:CPU's temporaries stay mmapped per step")
        return False
    log.info("CPU step memory reuse applied: synchronous CPU dispatch, large blocks kept on glibc's heap")
    return True
