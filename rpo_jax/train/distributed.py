"""Multi-host start-up: `jax.distributed.initialize` from the environment, before JAX is used.

- Cloud TPU pods (several hosts): automatic (`jax.distributed.initialize()` reads the TPU metadata).
- CPU/GPU clusters: set `RPO_JAX_COORDINATOR=host:port`, `RPO_JAX_NUM_PROCESSES=N`, `RPO_JAX_PROCESS_ID=i`
  (and optionally `RPO_JAX_LOCAL_DEVICE_IDS=0,1,...`) on every process.
- Otherwise (one host): nothing to do.

CPU processes exchange collectives through Gloo (`jax_cpu_collectives_implementation="gloo"`; MPI would need an
MPI library and launcher). Gloo matches the messages of the processes' collectives in order, so every process
must run the same programs on the same shapes: `rpo_jax.train.mesh.to_global` pads each process's rows to the
shapes of every process before they become global arrays, and the batch axes must split the batch across the
processes (`rpo_jax.train.mesh.local_batch_size`). A process that fails exits at once (`rpo_jax.train.cli`),
so that the others stop with an error instead of waiting for it.
"""

from __future__ import annotations

import os

import jax


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
        return True
    if _tpu_pod_hosts() > 1:
        jax.distributed.initialize()
        return True
    return False


def _tpu_pod_hosts() -> int:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) if hosts else 1
