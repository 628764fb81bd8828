"""Multi-host start-up: `jax.distributed.initialize` from the environment, before JAX is used.

- Cloud TPU pods (several hosts): automatic (`jax.distributed.initialize()` reads the TPU metadata).
- CPU/GPU clusters: set `RPO_JAX_COORDINATOR=host:port`, `RPO_JAX_NUM_PROCESSES=N`, `RPO_JAX_PROCESS_ID=i`
  (and optionally `RPO_JAX_LOCAL_DEVICE_IDS=0,1,...`) on every process.
- Otherwise (one host): nothing to do.

CPU processes exchange collectives through Gloo (`jax_cpu_collectives_implementation="gloo"`; MPI would need an
MPI library and launcher). Gloo matches the messages of the processes' collectives in order, so every process
must run the same programs on the same shapes: `rpo_jax.train.runtime.global_batches.to_global` pads each process's rows to the
shapes of every process before they become global arrays, and the batch axes must split the batch across the
processes (`rpo_jax.train.runtime.global_batches.local_batch_size`). A process that fails exits at once (`rpo_jax.train.cli`),
so that the others stop with an error instead of waiting for it.

Several CPU processes do not use JAX's persistent compilation cache (`consistent_compilation_cache`): JAX's cache
keys differ per process and only process 0 writes entries, so on a warm cache process 0 runs programs loaded from
it while the others compile theirs afresh, and for some programs (the packed train step, found by the 2-process
packing test) the two do not match: the processes then wait for each other in the step's first collective.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def initialize_from_environment() -> bool:
    """Initialise jax.distributed when the environment describes several processes; returns whether it did."""
    coordinator = os.environ.get("RPO_JAX_COORDINATOR")
    if coordinator:
        local = os.environ.get("RPO_JAX_LOCAL_DEVICE_IDS")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process collectives
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["RPO_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["RPO_JAX_PROCESS_ID"]),
            local_device_ids=[int(i) for i in local.split(",")] if local else None)
        consistent_compilation_cache()
        return True
    if _tpu_pod_hosts() > 1:
        jax.distributed.initialize()
        return True
    return False


def consistent_compilation_cache() -> bool:
    """Turn JAX's persistent compilation cache off in a multi-process CPU run (module docstring); returns whether
    it did. Call it before the first compilation (JAX decides once whether the cache is used)."""
    if (jax.process_count() == 1 or jax.devices()[0].platform != "cpu"
            or not (jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir)):
        return False
    jax.config.update("jax_enable_compilation_cache", False)
    log.info("persistent compilation cache (%s) off: %d CPU processes would mix programs loaded from it (process "
             "0's) with programs compiled afresh (the others'), which can deadlock their collectives",
             jax.config.jax_compilation_cache_dir, jax.process_count())
    return True


def _tpu_pod_hosts() -> int:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) if hosts else 1
