"""Ahead-of-time compilation of one program for `rpo-plan`: XLA's memory analysis (arguments, outputs,
temporaries, code), the HLO's FLOPs and collectives, and XLA:TPU's out-of-memory error read as a figure
(`DoesNotFit`).
"""

from __future__ import annotations

import dataclasses
import os
import re

from rpo_jax.train.build.fit import ProgramMemory, program_memory
from rpo_jax.train.build.plans import Program, device_bytes
from rpo_jax.train.plan.hlo_analysis import analyze


# ------------------------------------------------------------------------------------------------ compiling
class DoesNotFit(Exception):
    """XLA:TPU ran out of HBM compiling a program: `needed` and `capacity` in bytes per chip."""

    def __init__(self, program: str, needed: float, capacity: float):
        super().__init__(program)
        self.program, self.needed, self.capacity = program, needed, capacity


_OOM_USED = re.compile(r"Used\s+([\d.]+)([KMGT]?)\s+of\s+([\d.]+)([KMGT]?)\s+hbm", re.IGNORECASE)
_OOM_TEMPS = re.compile(
    r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)", re.IGNORECASE
)
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def oom_bytes(message: str, argument_bytes: int = 0) -> tuple[float, float] | None:
    """(needed, capacity) bytes per chip from XLA:TPU's out-of-memory errors: "Used X of Y hbm" (the whole
    program), or "the total memory required for HLO temporaries (X) exceeds available HBM (Y)" (temporaries
    only: the program's `argument_bytes` are added). None for any other error."""
    for pattern, extra in ((_OOM_USED, 0), (_OOM_TEMPS, argument_bytes)):
        m = pattern.search(message)
        if m:
            return (
                float(m.group(1)) * _UNIT[m.group(2).upper()] + extra,
                float(m.group(3)) * _UNIT[m.group(4).upper()],
            )
    return None


@dataclasses.dataclass(frozen=True)
class CompiledProgram(ProgramMemory):
    """A program's memory (`rpo_jax.train.build.fit.ProgramMemory`: XLA's memory analysis per device) with what
    its HLO computes and communicates: matmul FLOPs and collectives (loops × trip counts)."""

    flops: float = 0.0
    collectives: dict = dataclasses.field(default_factory=dict)
    unknown_loops: list = dataclasses.field(default_factory=list)


def compile_program(program: Program, num_devices: int, dump_dir: str = "", lowered=None) -> CompiledProgram:
    """Lower (unless `lowered` is given) and compile `program` for the slice (its HLO text written to `dump_dir`
    when given); raises DoesNotFit on XLA's out-of-memory error."""
    try:
        compiled = (lowered if lowered is not None else program.jitted.lower(*program.args)).compile()
    except Exception as e:  # noqa: BLE001 - XLA reports out-of-memory as a runtime error with this text
        found = oom_bytes(str(e), device_bytes(program.args))
        if found is None:
            raise
        raise DoesNotFit(program.name, found[0] + program.resident, found[1]) from None
    text = compiled.as_text()
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, re.sub(r"\W+", "_", program.name).strip("_") + ".hlo.txt"), "w") as f:
            f.write(text)
    stats = analyze(text, num_devices)
    memory = program_memory(program.name, compiled, resident=program.resident)
    return CompiledProgram(
        **vars(memory), flops=stats.flops, collectives=stats.collectives, unknown_loops=stats.unknown_loops
    )
