"""Multi-host start-up: `jax.distributed.initialize` from the environment, before JAX is used.

- Cloud TPU pods (several hosts): automatic (`jax.distributed.initialize()` reads the TPU metadata).
- CPU/GPU clusters: set `RPO_JAX_COORDINATOR=host:port`, `RPO_JAX_NUM_PROCESSES=N`, `RPO_JAX_PROCESS_ID=i`
  (and optionally `RPO_JAX_LOCAL_DEVICE_IDS=0,1,...`) on every process.
- Otherwise (one host): nothing to do.

Before that, `skip_absent_tpu`: with libtpu installed (the `test` extra brings it) JAX starts every backend it
knows when it first computes, TPU included, and on a machine without a TPU libtpu then prints errors ("Failed to
find host bounds …", "INVALID_ARGUMENT … Source Location Trace") to stderr. So when the user has not chosen the
platforms (`JAX_PLATFORMS` unset) and this machine shows no sign of a TPU (`tpu_may_be_present`: no
/dev/accel*, no /dev/vfio/<group>, no Google TPU on the PCI bus, none of `TPU_ENVIRONMENT` set) nor of a GPU
(/dev/nvidia*, /dev/kfd), JAX is told to use the CPU (`jax_platforms="cpu"`), which is what it would have
chosen. A machine with a TPU or a GPU is left to JAX's own choice; `JAX_PLATFORMS=...` always wins.

CPU processes exchange collectives through Gloo (`jax_cpu_collectives_implementation="gloo"`; MPI would need an
MPI library and launcher). Gloo matches the messages of the processes' collectives in order, so every process
must run the same programs on the same shapes: `rpo_jax.train.runtime.global_batches.to_global` pads each
process's rows to the shapes of every process before they become global arrays, and each process feeds the rows
of its row group (`rpo_jax.train.runtime.global_batches.process_rows`: processes holding the same batch shards feed
the same rows). A process that fails exits at
once (`rpo_jax.train.cli`), so that the others stop with an error instead of waiting for it.

Several CPU processes do not use JAX's persistent compilation cache (`consistent_compilation_cache`): JAX's cache
keys differ per process and only process 0 writes entries, so on a warm cache process 0 runs programs loaded from
it while the others compile theirs afresh, and for some programs (the packed train step, found by the 2-process
packing test) the two do not match: the processes then wait for each other in the step's first collective.
"""

from __future__ import annotations

import glob
import logging
import os
import sys

import jax

log = logging.getLogger(__name__)


#: Environment variables that mean a TPU is (or should be) used: Cloud TPU VMs and GKE set the first ones.
#: (Not TPU_LIBRARY_PATH: importing the libtpu package sets it, TPU or not.)
TPU_ENVIRONMENT = (
    "TPU_ACCELERATOR_TYPE",
    "TPU_WORKER_HOSTNAMES",
    "TPU_WORKER_ID",
    "TPU_NAME",
    "TPU_HOST_BOUNDS",
    "TPU_PROCESS_BOUNDS",
    "TPU_CHIPS_PER_PROCESS_BOUNDS",
    "TPU_VISIBLE_CHIPS",
    "JAX_FORCE_TPU_INIT",
)


def tpu_may_be_present(environ=None, exists=None) -> bool:
    """Whether this machine may have a TPU (the rule of `skip_absent_tpu`): a TPU device file (/dev/accel*: v4 and
    v5p; /dev/vfio/<group>: v5e, v6e and later), a Google TPU on the PCI bus (JAX's own check), or a variable of
    `TPU_ENVIRONMENT` set. `environ` / `exists(pattern) -> bool` replace os.environ and the file system (tests)."""
    environ = os.environ if environ is None else environ
    exists = exists or (lambda pattern: bool(glob.glob(pattern)))
    if any(environ.get(name) for name in TPU_ENVIRONMENT) or exists("/dev/accel*") or exists("/dev/vfio/[0-9]*"):
        return True
    try:
        from jax._src import hardware_utils  # no public equivalent; what JAX's cloud_tpu_init reads

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - another JAX version: the checks above decide
        return False


def cpu_without_tpu_probe(environ=None, exists=None) -> bool:
    """The rule of `skip_absent_tpu` (module docstring): `JAX_PLATFORMS` unset, Linux, no sign of a TPU
    (`tpu_may_be_present`) and no GPU device file (/dev/nvidia*, /dev/kfd). Arguments as `tpu_may_be_present`."""
    environ = os.environ if environ is None else environ
    exists = exists or (lambda pattern: bool(glob.glob(pattern)))
    return (
        "JAX_PLATFORMS" not in environ
        and sys.platform.startswith("linux")
        and not tpu_may_be_present(environ, exists)
        and not exists("/dev/nvidia*")
        and not exists("/dev/kfd")
    )


def skip_absent_tpu() -> bool:
    """Make JAX use the CPU without probing for a TPU when nothing chose the platforms and the machine has neither
    a TPU nor a GPU (`cpu_without_tpu_probe`); returns whether it did. Call it before JAX starts its backends."""
    if jax.config.jax_platforms or not cpu_without_tpu_probe():
        return False
    from jax._src import xla_bridge  # no public equivalent

    if xla_bridge.backends_are_initialized():
        return False
    jax.config.update("jax_platforms", "cpu")
    log.debug("no TPU or GPU on this machine: JAX uses the CPU without probing libtpu")
    return True


def initialize_from_environment() -> bool:
    """Initialise jax.distributed when the environment describes several processes; returns whether it did.
    First `skip_absent_tpu` (module docstring)."""
    skip_absent_tpu()
    coordinator = os.environ.get("RPO_JAX_COORDINATOR")
    if coordinator:
        local = os.environ.get("RPO_JAX_LOCAL_DEVICE_IDS")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process collectives
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["RPO_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["RPO_JAX_PROCESS_ID"]),
            local_device_ids=[int(i) for i in local.split(",")] if local else None,
        )
        consistent_compilation_cache()
        return True
    if _tpu_pod_hosts() > 1:
        jax.distributed.initialize()
        return True
    return False


def consistent_compilation_cache() -> bool:
    """Turn JAX's persistent compilation cache off in a multi-process CPU run (module docstring); returns whether
    it did. Call it before the first compilation (JAX decides once whether the cache is used)."""
    if (
        jax.process_count() == 1
        or jax.devices()[0].platform != "cpu"
        or not (jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir)
    ):
        return False
    jax.config.update("jax_enable_compilation_cache", False)
    log.info(
        "persistent compilation cache (%s) off: %d CPU processes would mix programs loaded from it (process "
        "0's) with programs compiled afresh (the others'), which can deadlock their collectives",
        jax.config.jax_compilation_cache_dir,
        jax.process_count(),
    )
    return True


def _tpu_pod_hosts() -> int:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) if hosts else 1
