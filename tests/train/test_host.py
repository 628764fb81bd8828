"""rpo_jax.train.runtime.cpu_memory: XLA:CPU's per-execution temporary buffer stops faulting in fresh pages once reused.

Each check runs in a fresh interpreter (the settings must precede JAX's first computation and change the
process's malloc) and counts minor page faults with getrusage around a computation whose only large buffer is
an XLA temporary: the [2048, 16384] float32 product a·b (128 MiB = 32,768 pages; above glibc's 32 MiB ceiling
for reusing freed mappings) inside sum((a·b)·c).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="the settings are glibc's"
)

PAGES = 2048 * 16384 * 4 // 4096

SCRIPT = r"""
import json, resource, sys
import jax, jax.numpy as jnp
from rpo_jax.train.runtime.cpu_memory import reuse_cpu_step_memory
if sys.argv[1] == "late":
    jnp.ones(1).block_until_ready()  # backends started first
applied = reuse_cpu_step_memory() if sys.argv[1] != "fresh" else False
f = jax.jit(lambda a, b, c: jnp.sum((a @ b) @ c))
a, b, c = jnp.ones((2048, 256)), jnp.ones((256, 16384)), jnp.ones((16384, 8))
faults, values = [], []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    values.append(float(f(a, b, c)))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "async": jax.config.values["jax_cpu_enable_async_dispatch"],
                  "faults": faults, "values": values}))
"""


def _run(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reused_temporary_stops_faulting_and_results_are_unchanged():
    fresh, reused = _run("fresh"), _run("reuse")
    assert reused["applied"] and not reused["async"]
    assert not fresh["applied"] and fresh["async"]
    # JAX's defaults: every call maps the 64 MiB temporary afresh and faults in (nearly) all of its pages
    assert min(fresh["faults"][1:]) > 0.5 * PAGES
    # reused: after the first call the heap already holds it
    assert max(reused["faults"][2:]) < 0.02 * PAGES
    assert reused["values"] == fresh["values"] == [2048 * 8 * 16384 * 256.0] * 4


def test_not_applied_once_backends_have_started():
    late = _run("late")
    assert not late["applied"] and late["async"]
    assert min(late["faults"][1:]) > 0.5 * PAGES


GUARD_SCRIPT = r"""
import json, os
import jax, jax.numpy as jnp
from rpo_jax.train.runtime.cpu_memory import HeapGuard, reuse_cpu_step_memory
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
applied = reuse_cpu_step_memory()
guard = HeapGuard()
f = jax.jit(lambda a, b, c: jnp.sum((a @ b) @ c))
out = {"applied": applied, "enabled": guard.enabled, "trimmed": [], "rss": []}
for n in (4096, 4096, 32768, 32768):  # temporaries of 32 MiB, then 256 MiB: the heap grows in step 3
    a, b, c = jnp.ones((2048, 256)), jnp.ones((256, n)), jnp.ones((n, 8))
    float(f(a, b, c))
    before = rss()
    out["trimmed"].append(guard.after_step())
    out["rss"].append([before, rss()])
print(json.dumps(out))
"""


def test_heap_guard_trims_only_a_heap_that_grew_in_a_step():
    """`HeapGuard` on glibc's real heap (CPU step memory reuse applied): steps whose buffer the heap already holds
    leave it alone; the step whose larger buffer grew the heap is followed by a trim that returns the free pages
    (that buffer, now free) to the kernel; the next step of that size takes it again without a trim."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    env["JAX_PLATFORMS"] = "cpu"
    run = subprocess.run([sys.executable, "-c", GUARD_SCRIPT], env=env, capture_output=True, text=True, check=True)
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["applied"] and out["enabled"]
    assert out["trimmed"] == [False, False, True, False]
    before, after = out["rss"][2]
    assert before - after > 128 * 2**20  # most of the 256 MiB buffer left the resident set


def test_heap_guard_policy():
    """The guard's rule on given heap sizes: no trim after its first step, nor for growth up to `HEAP_GROWTH` past
    the largest size after any earlier step (a trimmed heap growing back to it included); a trim after a step that
    grew it more; nothing when disabled."""
    from rpo_jax.train.runtime.cpu_memory import HEAP_GROWTH, HeapGuard, HeapStats

    gib = 2**30
    sizes = iter([1 * gib, 3 * gib, 2 * gib, 3 * gib + HEAP_GROWTH, 5 * gib, 5 * gib])
    released = []
    guard = HeapGuard(True, stats=lambda: HeapStats(next(sizes), 0, 0, 0), release=lambda: released.append(1) or True)
    assert [guard.after_step() for _ in range(6)] == [False, True, False, False, True, False]
    assert guard.trims == 2 == len(released) and guard.largest == 5 * gib
    off = HeapGuard(False, stats=lambda: HeapStats(10 * gib, 0, 0, 0), release=lambda: released.append(1) or True)
    assert not off.after_step() and not off.after_step() and len(released) == 2


def test_heap_guard_releases_free_pages_before_a_larger_batch():
    """Before a step on a batch of more elements than the previous step's — a new larger shape, or a larger one
    seen before (the padded [4, 2, 512] batch after packed [6, 512] ones: its buffer does not fit in the freed
    one) — the free pages of a heap holding more than `HEAP_GROWTH` free are released; the same or a smaller
    batch, a heap with little free, or a disabled guard: nothing."""
    from rpo_jax.train.runtime.cpu_memory import HEAP_GROWTH, HeapGuard, HeapStats

    free = iter([2 * HEAP_GROWTH, HEAP_GROWTH // 2, 3 * HEAP_GROWTH])
    released = []
    guard = HeapGuard(True, stats=lambda: HeapStats(0, 0, next(free), 0), release=lambda: released.append(1) or True)
    shapes = [(4, 2, 512), (6, 512), (4, 2, 512), (6, 512), (8, 512), (8, 512), (6, 640), (2, 2048), (4, 1024)]
    # more elements than the batch before: (4, 2, 512) after (6, 512) — released, 2 × HEAP_GROWTH free; (8, 512)
    # after (6, 512) — only HEAP_GROWTH / 2 free; (2, 2048) after (6, 640) — released; not the equal (8, 512),
    # (4, 1024) nor the smaller (6, 512), (6, 640)
    assert [guard.before_step(s) for s in shapes] == [False, False, True, False, False, False, False, True, False]
    assert len(released) == 2 == guard.trims
    off = HeapGuard(False, stats=lambda: HeapStats(0, 0, 10 * HEAP_GROWTH, 0), release=lambda: released.append(1))
    assert not off.before_step((1,)) and not off.before_step((2,)) and len(released) == 2
