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

What a never-trimmed heap can strand (`HeapGuard`). Programs of different temporaries (a padded and a packed step,
packed rows of several shapes, the reference cache's scorer, the eval step) take their buffers from the same heap:
one freed buffer serves the next whenever it is large enough — 8, 10, 12, 16 packed rows run in ascending order
leave the heap at the largest buffer, not at their sum. But an allocation that lands inside a freed buffer between
two steps splits it, and the next step's buffer goes on top: the heap grows by a whole buffer, which stays
resident unused. Seen on SmolLM2-135M (30 layers, padded and packed steps alternating, remat="full", a loaded
machine): 5.97 → 6.79 → 8.77 GiB over steps 2–4, where the same run on a quiet machine stayed at 6.0 GiB.
`HeapGuard` returns the free pages of a heap that grew during a step (other than the run's first) to the kernel
(`malloc_trim`): the next step faults its buffer in once more, and stranded buffers never pile up. And before a
step on a batch of more elements than the previous step's (another program, a larger buffer — a new shape, or a
padded batch after packed ones) it returns the heap's free pages too, so that the new buffer, which no freed one
can take, is not added on top of resident free ones: the peak is the largest step's buffer, not the sum of two
(one page-faulting step per switch to a larger batch; the same or a smaller one reuses the freed buffer).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import platform
import sys
from collections.abc import Callable

import jax

log = logging.getLogger(__name__)

_applied = False  # set by reuse_cpu_step_memory

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
    global _applied
    _applied = True
    return True


def reuse_applied() -> bool:
    """Whether `reuse_cpu_step_memory` applied its settings in this process (the heap then keeps freed memory)."""
    return _applied


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


@dataclasses.dataclass(frozen=True)
class HeapStats:
    """glibc's heap (`mallinfo2`, all arenas), bytes: `size` of the heap (sbrk'd and arena heaps), `in_use`,
    `free` (inside it), `mmapped` (blocks mapped on their own)."""

    size: int
    in_use: int
    free: int
    mmapped: int


def heap_stats() -> HeapStats | None:
    """`HeapStats` now (None without glibc ≥ 2.33's mallinfo2)."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _Mallinfo2
    m = libc.mallinfo2()
    return HeapStats(int(m.arena), int(m.uordblks), int(m.fordblks), int(m.hblkhd))


def release_free_memory() -> bool:
    """Return the heap's free pages to the kernel (`malloc_trim(0)`: the top of the heap and whole free pages
    inside it); False without glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


#: a heap that grows by more than this during a step is trimmed after it (`HeapGuard`)
HEAP_GROWTH = 64 * 2**20


class HeapGuard:
    """After every step (`after_step`): when glibc's heap has grown more than `HEAP_GROWTH` past the largest size
    it had after any earlier step — a buffer went on top of the heap instead of into a freed one — release the
    heap's free pages (`release_free_memory`). So a stranded buffer stays resident only until the step that
    stranded it ends, while a heap that only takes back the size it had before (after a trim, the next step of
    the largest buffer) is left alone. `enabled` (default `reuse_applied()`) False — glibc trims the heap itself
    then — or no glibc: nothing. `stats` / `release`: for tests."""

    def __init__(
        self,
        enabled: bool | None = None,
        stats: Callable[[], HeapStats | None] = heap_stats,
        release: Callable[[], bool] = release_free_memory,
    ):
        self.enabled = reuse_applied() if enabled is None else enabled
        self.stats, self.release = stats, release
        self.largest: int | None = None  # the heap's largest size after a step so far
        self.trims = 0
        self.previous: tuple | None = None  # the last step's batch shape (`before_step`)

    def before_step(self, shape: tuple[int, ...]) -> bool:
        """Before a step on a batch of `shape`: when it has more elements than the previous step's batch (whose
        freed buffer is then likely too small to take the new one — a padded [4, 2, 512] step after packed
        [6, 512] ones, or a new larger shape) and the heap holds more than `HEAP_GROWTH` free, release the free
        pages, so that the new buffer is not added on top of them; True when it did. A step of the same or fewer
        elements reuses the freed buffer: nothing."""
        previous, self.previous = self.previous, tuple(shape)
        larger = previous is not None and math.prod(shape) > math.prod(previous)
        if not self.enabled or not larger or (now := self.stats()) is None:
            return False
        trimmed = now.free > HEAP_GROWTH and self.release()
        if trimmed:
            self.trims += 1
            log.info(
                "CPU step memory: a batch of %s after one of %s; returned the heap's %.2f GiB of free pages to the "
                "kernel first, so that its buffer is not added on top of them",
                shape,
                previous,
                now.free / 2**30,
            )
        return trimmed

    def after_step(self) -> bool:
        """Check the heap after a step; True when it was trimmed."""
        if not self.enabled or (now := self.stats()) is None:
            return False
        trimmed = self.largest is not None and now.size > self.largest + HEAP_GROWTH and self.release()
        if trimmed:
            self.trims += 1
            log.info(
                "CPU step memory: the heap grew by %.2f GiB past its largest size in a step (a freed buffer could "
                "not take the new one); returned its %.2f GiB of free pages to the kernel",
                (now.size - self.largest) / 2**30,
                now.free / 2**30,
            )
        self.largest = max(self.largest or 0, now.size)
        return trimmed
