"""What one compiled step does, read from XLA's optimized HLO text (`compiled.as_text()`): collectives and matmul
FLOPs per execution of the program, per device.

XLA's own cost analysis (`compiled.cost_analysis()`) counts the body of a `while` loop once, but every layer
scan and micro-batch scan of a train step is a `while` loop; so this module walks the call graph of the HLO
module: a computation's multiplicity is the sum, over the instructions that call it, of the caller's
multiplicity × the loop's trip count (for a `while` body; 1 for fusions, calls and conditionals). The trip count
of a `lax.scan`/`fori_loop` loop is read from its condition computation, `counter < constant(N)` (the counter
starting at 0).

Counted per device (the module is the SPMD-partitioned program of one device):
  * collectives: all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute (and their async
    `-start` forms, counted once), with bytes = the largest array among the operands and the result (the full,
    unsharded side), and the number of devices in each replica group;
  * FLOPs of `dot` and `convolution`: 2 · (output elements) · (contracted elements per output element), where a
    convolution's spatial window counts only the taps that land on real input (`real_taps`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import numpy as np

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_BYTES = {
    "pred": 1,
    "s4": 1,
    "u4": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->\s*(.*)\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply|branch_computations)=\{?([^,}\s]+(?:,\s*%[\w.\-]+)*)\}?")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str  # the result type text, e.g. "bf16[8,128]{1,0}" or a tuple "(f32[2], s32[])"
    opcode: str
    rest: str  # operands and attributes


@dataclasses.dataclass
class Computation:
    name: str
    is_entry: bool
    shapes: dict[str, str]  # value name → its type text (parameters and instructions)
    instructions: list[Instruction]


@dataclasses.dataclass
class CollectiveStats:
    """One kind of collective per program execution, per device: `count` ops moving `bytes` (the full arrays)
    and `traffic_bytes`, the bytes each device sends in a ring algorithm: (n-1)/n of the array for all-gather,
    reduce-scatter and all-to-all, 2(n-1)/n for all-reduce, the whole array for collective-permute."""

    count: int = 0
    bytes: int = 0
    traffic_bytes: float = 0.0


def array_bytes(type_text: str) -> int:
    """Bytes of every array in a type text (a tuple's elements summed)."""
    return sum(
        _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in _ARRAY.findall(type_text)
    )


def largest_array_bytes(type_text: str) -> int:
    sizes = [
        _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in _ARRAY.findall(type_text)
    ]
    return max(sizes, default=0)


def array_dims(type_text: str) -> tuple[int, ...]:
    """Dimensions of the first array in a type text."""
    m = _ARRAY.search(type_text)
    return tuple(int(d) for d in m.group(2).split(",") if d) if m else ()


def parse_module(text: str) -> dict[str, Computation]:
    """name → Computation of an HLO module's text."""
    computations: dict[str, Computation] = {}
    current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and current is None:
            current = Computation(header.group(2), bool(header.group(1)), {}, [])
            for param in re.finditer(r"([\w.\-]+):\s*((?:\([^)]*\))|(?:\w+\[[0-9,]*\]))", header.group(3)):
                current.shapes[param.group(1)] = param.group(2)
            continue
        if current is None:
            continue
        if line.strip() == "}":
            computations[current.name] = current
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if m:
            inst = Instruction(m.group(1), m.group(2), m.group(3), m.group(4))
            current.instructions.append(inst)
            current.shapes[inst.name] = inst.shape
    return computations


def trip_count(condition: Computation) -> int | None:
    """N of a `counter < N` loop condition (a compare with direction=LT against one integer constant)."""
    constants = {
        i.name: int(m.group(1))
        for i in condition.instructions
        if i.opcode == "constant" and (m := re.match(r"(-?\d+)\)", i.rest))
    }
    for inst in condition.instructions:
        if inst.opcode == "compare" and "direction=LT" in inst.rest:
            operands = re.findall(r"%([\w.\-]+)", inst.rest.split(")")[0])
            if len(operands) == 2 and operands[1] in constants:
                return constants[operands[1]]
    return None


def multiplicities(computations: dict[str, Computation]) -> tuple[dict[str, int], list[str]]:
    """(computation → executions per run of the entry computation, names of loops whose trip count could not be
    read and were counted once)."""
    callers: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    unknown = []
    for comp in computations.values():
        for inst in comp.instructions:
            callees = {}
            for kind, names in _CALLEE.findall(inst.rest):
                for name in re.findall(r"%?([\w.\-]+)", names):
                    callees[name] = kind
            trips = 1
            if inst.opcode == "while":
                cond = next((n for n, k in callees.items() if k == "condition"), None)
                trips = trip_count(computations[cond]) if cond in computations else None
                if trips is None:
                    unknown.append(inst.name)
                    trips = 1
            for name, kind in callees.items():
                if name in computations:
                    callers[name].append((comp.name, trips if kind == "body" else 1))
    memo: dict[str, int] = {}

    def mult(name: str) -> int:
        if name not in memo:
            comp = computations[name]
            memo[name] = 1 if comp.is_entry else sum(mult(c) * t for c, t in callers.get(name, []))
        return memo[name]

    return {name: mult(name) for name in computations}, unknown


def group_size(rest: str, num_devices: int) -> int:
    """Devices per replica group of a collective's attributes (`{{0,1},{2,3}}`, iota `[G,S]<=[...]`, or
    `mesh[...] {axes}`); all devices when absent."""
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", rest)
    if m:
        return len([x for x in m.group(1).split(",") if x])
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
    if m:
        sizes = dict(re.findall(r"'([\w]+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([\w]+)'", m.group(2)) if a in sizes) or 1
    m = re.search(r"source_target_pairs=\{", rest)
    if m:
        return 2
    return num_devices


def _operand_types(inst: Instruction, comp: Computation) -> list[str]:
    head = inst.rest.split("),")[0]
    return [comp.shapes[n] for n in re.findall(r"%([\w.\-]+)", head) if n in comp.shapes]


def dot_flops(inst: Instruction, comp: Computation) -> int:
    """2 · output elements · contracted elements of one `dot` or `convolution` instruction."""
    out = math.prod(array_dims(inst.shape))
    operands = _operand_types(inst, comp)
    if inst.opcode == "dot":
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.rest)
        if not m or not operands:
            return 0
        lhs = array_dims(operands[0])
        return 2 * out * math.prod(lhs[int(d)] for d in m.group(1).split(",") if d)
    m = re.search(r"dim_labels=([\w]+)_([\w]+)->([\w]+)", inst.rest)
    if not m or len(operands) < 2:
        return 0
    lhs_labels, rhs_labels, out_labels = m.groups()
    lhs, rhs, out_dims = array_dims(operands[0]), array_dims(operands[1]), array_dims(inst.shape)
    features = math.prod(size for label, size in zip(rhs_labels, rhs) if label == "i")
    window = _window(inst.rest)
    per_output, outputs = 1.0, 1
    for d in sorted({c for c in rhs_labels if c.isdigit()}):
        w = window[int(d)] if int(d) < len(window) else {}
        size = w.get("size", rhs[rhs_labels.index(d)])
        n_in, n_out = lhs[lhs_labels.index(d)], out_dims[out_labels.index(d)]
        per_output *= (
            real_taps(
                n_in,
                n_out,
                size,
                w.get("stride", 1),
                w.get("pad_lo", 0),
                w.get("lhs_dilate", 1),
                w.get("rhs_dilate", 1),
            )
            / n_out
        )
        outputs *= n_out
    return int(round(2 * out * features * per_output))


def _window(rest: str) -> list[dict[str, int]]:
    """Per spatial dimension: size, stride, pad_lo, lhs_dilate, rhs_dilate of a convolution's `window={...}`."""
    m = re.search(r"window=\{([^}]*)\}", rest)
    if not m:
        return []
    fields = dict(item.split("=", 1) for item in m.group(1).split() if "=" in item)
    dims = len(fields.get("size", "").split("x")) if "size" in fields else 0
    out = [{} for _ in range(dims)]
    for key, name in (
        ("size", "size"),
        ("stride", "stride"),
        ("lhs_dilate", "lhs_dilate"),
        ("rhs_dilate", "rhs_dilate"),
    ):
        if key in fields:
            for i, v in enumerate(fields[key].split("x")):
                out[i][name] = int(v)
    if "pad" in fields:
        for i, v in enumerate(fields["pad"].split("x")):
            out[i]["pad_lo"] = int(v.split("_")[0])
    return out


def real_taps(n_in: int, n_out: int, size: int, stride: int, pad_lo: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """Products that touch a real input element, summed over the `n_out` outputs of one spatial dimension of a
    convolution (window positions on padding or on the holes of a dilated input multiply zeros). XLA:TPU writes
    batched matmuls as convolutions with the batch as a dilated spatial dimension: one real tap per output."""
    j = np.arange(n_out)[:, None]
    t = np.arange(size)[None, :]
    pos = j * stride + t * rhs_dilate - pad_lo
    real = (pos >= 0) & (pos % lhs_dilate == 0) & (pos // lhs_dilate < n_in)
    return int(real.sum())


@dataclasses.dataclass
class ModuleStats:
    flops: float
    collectives: dict[str, CollectiveStats]
    unknown_loops: list[str]


def analyze(text: str, num_devices: int) -> ModuleStats:
    """Matmul FLOPs and collectives of one execution of the compiled program (per device)."""
    computations = parse_module(text)
    mult, unknown = multiplicities(computations)
    flops = 0.0
    stats = {kind: CollectiveStats() for kind in COLLECTIVES}
    for comp in computations.values():
        times = mult[comp.name]
        if not times:
            continue
        for inst in comp.instructions:
            if inst.opcode in ("dot", "convolution"):
                flops += times * dot_flops(inst, comp)
                continue
            kind = inst.opcode[: -len("-start")] if inst.opcode.endswith("-start") else inst.opcode
            if kind not in stats:
                continue
            size = max([largest_array_bytes(inst.shape)] + [array_bytes(t) for t in _operand_types(inst, comp)])
            n = group_size(inst.rest, num_devices)
            factor = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(kind, (n - 1) / n)
            s = stats[kind]
            s.count += times
            s.bytes += times * size
            s.traffic_bytes += times * size * factor
    return ModuleStats(flops, stats, unknown)
