"""Does a run fit? XLA's memory analysis of the compiled programs against what the machine has, before step 1.

Every program a run compiles is measured by XLA itself (`compiled.memory_analysis()`: arguments, outputs,
outputs aliased to donated arguments, temporaries, generated code) and read into a `ProgramMemory`. What the
run needs at its peak is then compared with `config.train.memory_budget`
(`rpo_jax.train.config.values.memory_budget_bytes`):

- on an accelerator (GPU, TPU) per device: the largest program's arguments + outputs not aliased + temporaries +
  code, plus what the trainer holds meanwhile outside it (`ProgramMemory.resident`), against the device's
  `bytes_limit` (`memory_capacity`);
- on the CPU, for the process: its resident set now (Python, the libraries, and every array already allocated:
  parameters, optimizer state, references) plus the largest program's memory that is not allocated yet — its
  temporaries, outputs not aliased, code and the batch — against the host's memory (`memory_capacity`: what is
  available now plus what this process already holds, within its cgroup's limit).

A run that does not fit stops with one line (`DoesNotFit`: what it needs, the budget, what there is, and which
settings would lower the need) before anything is trained or written but the log.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax

from rpo_jax.train.config.values import memory_budget_bytes

log = logging.getLogger(__name__)

GiB = 2**30


# ------------------------------------------------------------------------------------------------ what there is
@dataclasses.dataclass(frozen=True)
class Capacity:
    """Memory a run can use: `bytes` per device on an accelerator, for the process on the CPU; `what` says which.
    On the CPU `devices` is the process's device count: each runs its own copy of a program's per-device
    buffers in the process's memory (8 simulated devices: 8 sets of temporaries)."""

    bytes: int
    what: str
    host: bool  # the CPU: the process's resident set counts
    devices: int = 1


def _meminfo() -> dict[str, int]:
    out = {}
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        out[name] = int(rest.split()[0]) * 1024
    return out


def cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 `memory.max`, v1 `memory.limit_in_bytes`), or None."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = pathlib.Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def resident_bytes() -> int:
    """This process's resident set now (`/proc/self/statm`)."""
    pages = int(pathlib.Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def memory_capacity(devices: Sequence[jax.Device]) -> Capacity:
    """What the run's devices have: an accelerator's `bytes_limit` (the smallest of `devices`); on the CPU the
    host memory this process can use — the memory available now (`MemAvailable`) plus what the process already
    holds, within its cgroup's limit."""
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices if d.platform != "cpu"]
    if limits and all(limits):
        kind = devices[0].device_kind
        return Capacity(int(min(limits)), f"{min(limits) / GiB:.1f} GiB per device ({kind})", host=False)
    info = _meminfo()
    rss = resident_bytes()
    usable = info["MemAvailable"] + rss
    limit = cgroup_limit()
    if limit is not None:
        usable = min(usable, limit)
    return Capacity(
        usable,
        f"{usable / GiB:.1f} GiB of host memory (available now + this process's {rss / GiB:.1f} GiB)",
        True,
        max(len(devices), 1),
    )


# ------------------------------------------------------------------------------------------------ what it needs
@dataclasses.dataclass(frozen=True)
class ProgramMemory:
    """XLA's memory analysis of one compiled program (bytes per device), plus `resident`: what the trainer holds
    meanwhile outside it."""

    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    resident: int = 0

    @property
    def total(self) -> int:
        """Peak bytes per device: arguments + outputs not aliased to arguments + temporaries + code, plus what
        the trainer holds meanwhile outside the program."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code + self.resident

    @property
    def to_allocate(self) -> int:
        """What running it adds to arrays already allocated (its arguments): outputs not aliased + temporaries +
        code."""
        return self.outputs - self.aliased + self.temporaries + self.code


def program_memory(name: str, compiled, *, resident: int = 0) -> ProgramMemory:
    """`ProgramMemory` of a `jax.stages.Compiled`."""
    m = compiled.memory_analysis()
    return ProgramMemory(
        name,
        m.argument_size_in_bytes,
        m.output_size_in_bytes,
        m.alias_size_in_bytes,
        m.temp_size_in_bytes,
        m.generated_code_size_in_bytes,
        resident,
    )


def run_need(
    programs: Sequence[ProgramMemory], capacity: Capacity, resident_now: int | None = None, *, allocated: bool = True
) -> int:
    """The run's peak need: on an accelerator the largest program's `total`; on the CPU the process's resident
    set now (`resident_now`, default measured) plus the largest `to_allocate` once per device of the process
    (`Capacity.devices`; the generated code once) — or, when the programs' arguments are not `allocated` yet (a
    plan: abstract arguments), the largest `total` so. (8 simulated devices running a step with 12 MiB of
    temporaries per device grow the process by 185 MiB, one device by 27 MiB.)"""
    if not capacity.host:
        return max(p.total for p in programs)
    now = resident_bytes() if resident_now is None else resident_now
    per_device = lambda p: (p.to_allocate if allocated else p.total) - p.code  # noqa: E731
    return now + max(capacity.devices * per_device(p) + p.code for p in programs)


def largest_program(programs: Sequence[ProgramMemory], capacity: Capacity) -> ProgramMemory:
    """The program that sets the run's need (`run_need`): the most to allocate on the CPU, the largest total on
    an accelerator."""
    return max(programs, key=lambda p: p.to_allocate if capacity.host else p.total)


class DoesNotFit(ValueError):
    """A run that needs more memory than its budget: the one line says what it needs, the budget, what there is
    and which settings would lower the need (`need`, `budget`: bytes; `held`: the part of the need that no setting
    of the step lowers — the process's resident set on the CPU, the step's arguments on an accelerator)."""

    def __init__(self, message: str, need: int = 0, budget: int = 0, held: int = 0):
        super().__init__(message)
        self.need, self.budget, self.held = need, budget, held


def check_fit(
    programs: Sequence[ProgramMemory],
    capacity: Capacity,
    setting: str,
    *,
    suggestions: Sequence[str] = (),
    allocated: bool = True,
) -> tuple[int, int | None]:
    """(need, budget) of a run whose programs were measured (`run_need`; `allocated`: their arguments are live
    arrays already); raises `DoesNotFit` when the need exceeds the budget of `setting`
    (`config.train.memory_budget`). Budget None: the check is off."""
    now = resident_bytes() if capacity.host else 0
    need = run_need(programs, capacity, now, allocated=allocated)
    budget = memory_budget_bytes(setting, capacity.bytes)
    if budget is not None and need > budget:
        if capacity.host:
            held = now + (0 if allocated else capacity.devices * max(p.arguments for p in programs))
        else:
            held = max(p.arguments + p.resident for p in programs)
        largest = largest_program(programs, capacity)
        hint = f"; settings that lower it: {', '.join(suggestions)}" if suggestions else ""
        raise DoesNotFit(
            f"the run does not fit in memory: it needs {need / GiB:.2f} GiB ({largest.name}: temporaries "
            f"{largest.temporaries / GiB:.2f} GiB) but config.train.memory_budget={setting!r} allows "
            f"{budget / GiB:.2f} GiB of {capacity.what}{hint}",
            need,
            budget,
            held,
        )
    return need, budget


def memory_suggestions(cfg) -> list[str]:
    """Overrides that lower a preference run's peak memory, from the config's own settings (the cheapest first):
    blockwise attention (memory linear in the row length), more micro-batches (activations of fewer rows at
    once), full rematerialisation (activations recomputed in the backward pass), cached references (no reference
    forward pass in the step), shorter sequences."""
    out = []
    if cfg.model.attention not in ("blockwise", "cudnn", "splash"):
        out.append("--config.model.attention=blockwise")
    shards = max(cfg.mesh.data, 1) * max(cfg.mesh.fsdp, 1)  # -1 (the rest of the devices): at least 1
    micro = int(cfg.data.micro_batches)
    if cfg.data.batch_size % (2 * micro * shards) == 0:
        out.append(f"--config.data.micro_batches={2 * micro}")
    if cfg.model.remat == "none":
        out.append("--config.model.remat=full")
    if cfg.reference_mode == "in_step" and not cfg.reference_sync.every:
        out.append("--config.reference_mode=cache")
    if cfg.data.max_length > 256:
        out.append(f"--config.data.max_length={cfg.data.max_length // 2}")
    return out


def lighter_settings(cfg, shards: int, backend: str | None = None) -> list[dict[str, object]]:
    """The settings a run that does not fit tries, in turn, before it gives up: rungs of a ladder, each the one
    before plus one more setting that lowers the step's memory without changing its results (the run identity
    leaves them out, `rpo_jax.train.core.identity`), the cheapest in speed first —

    1. `model.attention="blockwise"` (memory linear in the row length; exact) where the configured attention is
       XLA's dense one: "xla", or "auto" on the CPU (GPUs and TPUs keep their kernels);
    2. `model.remat="full"` (each layer's activations recomputed in the backward pass) when it is "none";
    3. `data.micro_batches` doubled while each micro-batch keeps at least one example per data shard (`shards`:
       data × fsdp) — gradient accumulation, the same mean gradient up to float rounding.

    Settings that change what is trained (cached references, shorter sequences) are never chosen for the user:
    `memory_suggestions` names them in the error."""
    backend = backend or jax.default_backend()
    rungs, rung = [], {}
    if cfg.model.attention == "xla" or (cfg.model.attention == "auto" and backend == "cpu"):
        rung = {**rung, "model.attention": "blockwise"}
        rungs.append(rung)
    if cfg.model.remat == "none":
        rung = {**rung, "model.remat": "full"}
        rungs.append(rung)
    micro = int(cfg.data.micro_batches)
    while cfg.data.batch_size % (2 * micro * shards) == 0:
        micro *= 2
        rung = {**rung, "data.micro_batches": micro}
        rungs.append(rung)
    return rungs


def settings_flags(settings: dict[str, object]) -> str:
    """`{"model.remat": "full"}` → "--config.model.remat=full" (the overrides that select `settings`)."""
    return " ".join(f"--config.{key}={value}" for key, value in settings.items())


Run = TypeVar("Run")


def fitting_run(run: Run, check: Callable[[Run], Any], lighten: Callable[[dict], Run], cfg, shards: int) -> Run:
    """The first of `run` and `lighten(settings)` for each rung of `lighter_settings(cfg, shards)` that
    `check` passes (it raises `DoesNotFit` otherwise); the choice is logged with the overrides that select it.
    When none fits, the `DoesNotFit` of the configured settings, with what the lightest rung still needs."""
    try:
        check(run)
        return run
    except DoesNotFit as configured:
        first = configured
    if first.held >= first.budget:  # the arrays (the process) alone pass the budget: no step setting helps
        raise DoesNotFit(
            f"{first} (what the run holds outside the step, {first.held / GiB:.2f} GiB, passes the budget already: "
            "no lighter setting of the step can fit)",
            first.need,
            first.budget,
            first.held,
        )
    tried = None
    for settings in lighter_settings(cfg, shards):
        log.info("fit check: trying %s", settings_flags(settings))
        candidate = lighten(settings)
        try:
            check(candidate)
        except DoesNotFit as lighter:
            tried = (settings, lighter)
            continue
        log.warning(
            "fit check: the configured settings need %.2f GiB, over the budget of %.2f GiB; running with %s "
            "instead (the same results; put them in the config to skip this search)",
            first.need / GiB,
            first.budget / GiB,
            settings_flags(settings),
        )
        return candidate
    if tried is None:
        raise first
    settings, lighter = tried
    raise DoesNotFit(
        f"{first} (tried: {settings_flags(settings)} still needs {lighter.need / GiB:.2f} GiB)",
        first.need,
        first.budget,
    )


#: a preference run's fit check compiles the train step for each distinct input of this many first steps
FIT_LOOKAHEAD_STEPS = 64


def local_devices(mesh) -> list[jax.Device]:
    """This process's devices of `mesh` (the ones whose memory it can read)."""
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


def check_programs_fit(
    programs: Sequence[tuple], cfg, devices: Sequence[jax.Device], batches: str = "the largest batches"
):
    """Compile each `(name, program, args, resident)` — a jitted step (`rpo_jax.train.step.steps.WithFrozen`) with
    arguments the run will call it with, already allocated (`args[1]` its batch, or a sampler's prompt tokens;
    logged, with `batches` saying which they are), and the bytes the run holds outside them meanwhile — and
    `check_fit` the run against `cfg.train.memory_budget` on `devices` (this process's); returns (the
    `ProgramMemory`s, need, budget, `Capacity`). Each compiled executable stays in its program's cache: a later
    call with the same shapes does not compile again."""
    shape = lambda batch: (batch["tokens"] if isinstance(batch, dict) else batch).shape  # noqa: E731
    shapes: dict[str, list] = {}
    for name, _, args, _ in programs:
        shapes.setdefault(name, []).append(str(shape(args[1])))
    what = " and ".join(f"the {name} for {', '.join(each)} tokens" for name, each in shapes.items())
    log.info("fit check: compiling %s (%s)", what, batches)
    memories = [
        program_memory(name, program.lower(*args).compile(), resident=resident)
        for name, program, args, resident in programs
    ]
    capacity = memory_capacity(devices)
    need, budget = check_fit(memories, capacity, cfg.train.memory_budget, suggestions=memory_suggestions(cfg))
    return memories, need, budget, capacity


def log_fit(log, memories: Sequence[ProgramMemory], need: int, budget: int | None, capacity: Capacity) -> None:
    """The fit check's result in the run's log: the need, the temporaries of the program that sets it, the
    budget."""
    largest = largest_program(memories, capacity)
    log.info(
        "fit check: the run needs %.2f GiB (%s: temporaries %.2f GiB); budget %s of %s",
        need / GiB,
        largest.name,
        largest.temporaries / GiB,
        "off" if budget is None else f"{budget / GiB:.2f} GiB",
        capacity.what,
    )
