"""`rpo-plan --search`: the settings of a recipe that fit a slice, ranked by estimated step time.

Candidates are every mesh (data × fsdp × tensor × context = the slice's chips), remat policy and number of
micro-batches. Most are rejected before anything is compiled (`prune`), in this order:

1. divisibility: tensor divides the query heads, the key/value heads and the MLP width; each micro-batch
   (batch_size / micro_batches examples) and the eval batch split evenly over data × fsdp; the row length
   (data.max_length, data.pack_length when set) is a multiple of 2 × context (ring attention's zig-zag layout);
   context > 1 only for preference training with an attention that composes with the ring ("auto", "xla",
   "blockwise"); the mesh maps onto the slice's torus (`jax.make_mesh`: on a TPU slice every axis a product of
   the torus' own axes); "dots" is the same policy as "dots_saveable" and is not searched twice;
2. memory: `memory_lower_bound` — bytes per chip every such program holds at once, from closed forms — above the
   chip's HBM;

then the survivors are ordered by an analytic step-time proxy (`step_time_proxy`: the FLOP model with remat's
recomputation at the chip's peak, plus the weight gathers, tensor-parallel all-reduces, ring hops and gradient
all-reduce at the ICI bandwidth), those whose rough memory estimate (`memory_estimate`: what each policy keeps
per layer, the gradients, one layer's backward, the logits, dense attention's probabilities) exceeds 90 % of the
HBM last, and at
most `limit` of them are compiled — every program of the plan, the train step first. The compiled ones that fit
are ranked by the plan's own estimate (`estimate_step` on the compiled HLO).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from rpo_jax.models.config import REMAT_POLICIES, ModelConfig
from rpo_jax.models.sharding import MESH_AXES, make_mesh
from rpo_jax.train.build.model import architecture_of
from rpo_jax.train.build.optim import make_optimizer
from rpo_jax.train.build.plans import Plan, build_programs, plan_score_window
from rpo_jax.train.config.validation import validate
from rpo_jax.train.plan.compile import CompiledProgram, DoesNotFit, compile_program
from rpo_jax.train.plan.report import estimate_step, gib, model_flops_per_chip
from rpo_jax.train.plan.slices import Chip, Slice
from rpo_jax.train.runtime.performance import train_flops_per_token

#: policies searched ("dots" is "dots_saveable" under another name: jax's checkpoint_dots both)
SEARCHED_REMAT = tuple(p for p in REMAT_POLICIES if p != "dots")
#: attentions the ring composes with (model.attention with mesh.context > 1)
RING_ATTENTIONS = ("auto", "xla", "blockwise")
#: policies that save every matmul output, batched ones (the attention scores) included
SAVES_BATCHED_DOTS = ("none", "dots", "dots_saveable")
#: policies that save the projections' outputs (matmuls without batch dimensions)
SAVES_PROJECTIONS = ("none", "dots", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One setting searched: mesh sizes, remat policy, micro-batches."""

    data: int
    fsdp: int
    tensor: int
    context: int
    remat: str
    micro_batches: int

    @property
    def overrides(self) -> list[str]:
        """The `--config.*` flags that select this candidate."""
        mesh = [f"--config.mesh.{axis}={getattr(self, axis)}" for axis in ("data", "fsdp", "tensor", "context")]
        return mesh + [f"--config.model.remat={self.remat}", f"--config.data.micro_batches={self.micro_batches}"]

    @property
    def mesh(self) -> str:
        return f"{self.data}×{self.fsdp}×{self.tensor}×{self.context}"


def factorizations(n: int, parts: int) -> list[tuple[int, ...]]:
    """Every ordered tuple of `parts` positive integers whose product is `n`."""
    if parts == 1:
        return [(n,)]
    return [(d, *rest) for d in range(1, n + 1) if n % d == 0 for rest in factorizations(n // d, parts - 1)]


def candidates(cfg, num_chips: int) -> list[Candidate]:
    """Every (mesh, remat, micro-batches) of `cfg` (validated) on `num_chips`: meshes over the four axes, the
    searched remat policies, the divisors of data.batch_size."""
    batch = cfg.data.batch_size
    micro = [m for m in range(1, batch + 1) if batch % m == 0]
    return [
        Candidate(*mesh, remat, m)
        for mesh, remat, m in itertools.product(factorizations(num_chips, 4), SEARCHED_REMAT, micro)
    ]


# ------------------------------------------------------------------------------------------------ pruning
def row_lengths(cfg) -> list[int]:
    """The row lengths the plan's programs run on: data.max_length (online: prompt + new tokens) and
    data.pack_length when packing with a fixed length."""
    longest = cfg.data.max_prompt_length + cfg.online.max_new_tokens if cfg.mode == "online" else cfg.data.max_length
    return [longest] + ([cfg.data.pack_length] if cfg.data.pack_length and cfg.data.packing is not False else [])


def indivisible(c: Candidate, cfg, mc: ModelConfig) -> str | None:
    """Why candidate `c` cannot be set up evenly (None: it can); rule 1 of the module docstring."""
    if mc.num_heads % c.tensor or mc.num_kv_heads % c.tensor or mc.intermediate_size % c.tensor:
        return "tensor does not divide the heads / key-value heads / MLP width"
    rows = c.data * c.fsdp
    if (cfg.data.batch_size // c.micro_batches) % rows:
        return "a micro-batch does not split over data × fsdp"
    if cfg.data.eval_batch_size % rows:
        return "the eval batch does not split over data × fsdp"
    if c.context > 1:
        if cfg.mode != "preference":
            return "context > 1 is searched for preference training only"
        if cfg.model.attention not in RING_ATTENTIONS:
            return f"model.attention={cfg.model.attention!r} does not compose with context > 1"
        if any(t % (2 * c.context) for t in row_lengths(cfg)):
            return "the row length is not a multiple of 2 × context"
    return None


def optimizer_bytes_per_parameter(cfg) -> float:
    """Bytes of optimizer state per parameter of a matrix (Adam: 8, two float32 moments), from the optimizer's
    own `init` on an abstract 512 × 512 matrix; `cfg` the recipe's ConfigDict."""
    tx, _ = make_optimizer(cfg.optimizer, 1)
    n = 512
    state = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct((n, n), jnp.dtype(cfg.model.param_dtype))})
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / (n * n)


def tokens_per_chip(c: Candidate, cfg, responses: int) -> float:
    """Tokens of one micro-batch on one chip: (batch_size / micro_batches) × K × T over data × fsdp × context."""
    return cfg.data.batch_size // c.micro_batches * responses * max(row_lengths(cfg)) / (c.data * c.fsdp * c.context)


def memory_lower_bound(c: Candidate, cfg, mc: ModelConfig, responses: int, optimizer_bytes: float) -> float:
    """Bytes per chip the train step holds at once, at least (rule 2), n = `tokens_per_chip`, b = the compute
    dtype's bytes, L layers, D hidden, P parameters, s = fsdp × context × tensor:

    * the train state: P × (param bytes + optimizer bytes) / s (full fine-tuning; LoRA: 0, not bounded here);
    * the scan's carry, kept per layer for the backward pass: L × n × D × b;
    * policies saving the projections' outputs: + L × n × (H·hd + 2·K·hd + 2·F) / tensor × b (queries, keys,
      values, gate, up);
    * policies saving batched matmuls too, with dense attention (context = 1): + L × n × H / tensor × T × b (the
      attention scores).

    References, the batch, the logits and one layer's recomputed temporaries are not counted."""
    b = jnp.dtype(cfg.model.dtype).itemsize
    lora = cfg.model.lora.rank or cfg.model.lora.init_from
    state = 0.0 if lora else mc.num_params() * (jnp.dtype(cfg.model.param_dtype).itemsize + optimizer_bytes)
    state /= c.fsdp * c.context * c.tensor
    n = tokens_per_chip(c, cfg, responses)
    per_token = mc.hidden_size
    if c.remat in SAVES_PROJECTIONS:
        per_token += (mc.num_heads * mc.head_dim + 2 * mc.num_kv_heads * mc.head_dim + 2 * mc.intermediate_size) / (
            c.tensor
        )
    if c.remat in SAVES_BATCHED_DOTS and c.context == 1:
        per_token += mc.num_heads / c.tensor * max(row_lengths(cfg))
    return state + mc.num_layers * n * per_token * b


def memory_estimate(c: Candidate, cfg, mc: ModelConfig, responses: int, optimizer_bytes: float) -> float:
    """A rough estimate for the compile order, not a bound, n = `tokens_per_chip`, b the compute dtype's bytes,
    s = fsdp × context × tensor: the train state, float32 gradients (P × 4 / s) and a reference copy (P × param
    bytes / s); per layer and token what the policy keeps — "full" D × b, the "dots" policies (3·D + (H·hd + 2·K·hd +
    2·F) / tensor) × b (the projections' outputs, the attention and MLP outputs, the carry), "none" 3 × that (the
    elementwise activations too; the factor read off a compiled step: 112.6 GiB for the long recipe at data 4 ×
    tensor 2 × context 4, 8 micro-batches) — times L × n; one layer's backward in float32 (n × (4·D + 3·F / tensor)
    × 4); the output head's chunk of logits and their gradient (2 × n × min(vocab_chunk_size, V) / tensor × 4;
    "auto": 8192) and, with dense attention (context = 1), one layer's probabilities and their gradient (2 × n ×
    H / tensor × T × 4). Against XLA on v5p-64: 24.1 GiB for the 8B recipe's own setting (compiled: 21.5), 70 GiB
    for its data 4 × fsdp 4 × context 2 with dots_saveable and 2 micro-batches (74.2)."""
    n = tokens_per_chip(c, cfg, responses)
    d, f, t = mc.hidden_size, mc.intermediate_size / c.tensor, max(row_lengths(cfg))
    b = jnp.dtype(cfg.model.dtype).itemsize
    lora = cfg.model.lora.rank or cfg.model.lora.init_from
    shards = c.fsdp * c.context * c.tensor
    p = mc.num_params()
    state = 0.0 if lora else p * (jnp.dtype(cfg.model.param_dtype).itemsize + optimizer_bytes + 4) / shards
    reference = p * jnp.dtype(cfg.model.param_dtype).itemsize / shards
    per_token = d
    if c.remat != "full":
        qkv = (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim / c.tensor
        per_token = (3 * d + qkv + 2 * f) * (3 if c.remat == "none" else 1)
    extra = n * (4 * d + 3 * f) * 4
    chunk = cfg.model.vocab_chunk_size
    chunk = mc.vocab_size if not chunk else 8192 if chunk == "auto" else min(chunk, mc.vocab_size)
    extra += 2 * n * chunk / c.tensor * 4
    if c.context == 1:
        extra += 2 * n * mc.num_heads / c.tensor * t * 4
    return state + reference + mc.num_layers * n * per_token * b + extra


#: the step's FLOPs over the FLOP model's, per remat policy, for the compile order: "full" runs the forward twice
#: (4/3); the "dots" policies recompute the elementwise work and, without batch dimensions, attention's matmuls
RECOMPUTE = {"none": 1.0, "dots_saveable": 1.02, "dots_with_no_batch_dims_saveable": 1.05, "full": 4 / 3}


def step_time_proxy(c: Candidate, cfg, mc: ModelConfig, responses: int, chip: Chip, num_chips: int) -> float:
    """Seconds, analytic, for the compile order only: the FLOP model's step (`train_flops_per_token`) × the
    policy's `RECOMPUTE` at the peak, plus at the ICI bandwidth, per chip: the weights gathered over fsdp
    × context (b bytes each; per micro-batch twice, three times with full remat) and the gradients reduce-scattered
    (4 bytes, per micro-batch); tensor's all-reduces of the [n, D] layer outputs (2 per layer, × 2 for the
    backward, × 3 / 2 more with full remat; ring traffic 2(t-1)/t); the ring's key/value hops (context - 1 per
    layer; forward b bytes, backward b + 4 with dK, dV); the gradients' all-reduce over data once per step."""
    b = jnp.dtype(cfg.model.dtype).itemsize
    t = max(row_lengths(cfg))
    n = tokens_per_chip(c, cfg, responses)
    tokens = cfg.data.batch_size * responses * t
    flops = tokens * train_flops_per_token(mc, t, score_window=plan_score_window(cfg)) / num_chips
    full = c.remat == "full"
    compute = flops * RECOMPUTE[c.remat] / chip.peak_bf16_flops
    p, m, s = mc.num_params(), c.micro_batches, c.fsdp * c.context
    gathers = m * (3 if full else 2) * p * b / c.tensor * (s - 1) / s + m * p * 4 / c.tensor * (s - 1) / s
    tensor = mc.num_layers * m * 2 * (3 if full else 2) * n * mc.hidden_size * b * 2 * (c.tensor - 1) / c.tensor
    kv = n * 2 * mc.num_kv_heads * mc.head_dim / c.tensor
    ring = mc.num_layers * m * (c.context - 1) * kv * ((2 if full else 1) * b + b + 4)
    data = p * 4 / (s * c.tensor) * 2 * (c.data - 1) / c.data
    return compute + (gathers + tensor + ring + data) / chip.ici_bytes_per_s


#: the compile order puts first the candidates whose `memory_estimate` is within this fraction of the HBM (the
#: estimate was 24.1 GiB for configs/llama3_1_8b_v5p.py on v5p-64, whose train step compiles to 21.5 GiB)
ESTIMATE_MARGIN = 0.9


@dataclasses.dataclass
class Pruned:
    """What `prune` kept, in compile order, and how many it rejected by each reason."""

    kept: list[Candidate]
    rejected: dict[str, int]
    bounds: dict[Candidate, float]


def mesh_maps_onto(sizes: tuple[int, ...], devices) -> bool:
    """Whether `jax.make_mesh` places a (data, fsdp, tensor, context) mesh of these sizes on `devices` (on a TPU
    slice every axis must be a product of the torus' own axes)."""
    try:
        make_mesh(dict(zip(MESH_AXES, sizes)), devices)
    except (NotImplementedError, ValueError):
        return False
    return True


def prune(cfg, mc: ModelConfig, slc: Slice, responses: int, optimizer_bytes: float, devices=None) -> Pruned:
    """The candidates of `cfg` on `slc` that may fit (rules 1-2; with `devices`, meshes `mesh_maps_onto` them),
    ordered for compiling: those whose rough memory estimate is within `ESTIMATE_MARGIN` of the HBM first, then
    by `step_time_proxy`."""
    kept, rejected, bounds, placed = [], {}, {}, {}
    hbm = slc.chip.hbm_bytes
    for c in candidates(cfg, slc.num_chips):
        sizes = (c.data, c.fsdp, c.tensor, c.context)
        if devices is not None and sizes not in placed:
            placed[sizes] = mesh_maps_onto(sizes, devices)
        reason = indivisible(c, cfg, mc)
        if c.remat == "dots":
            reason = "the same policy as dots_saveable"
        elif devices is not None and not placed[sizes]:
            reason = "the mesh does not map onto the slice's torus (jax.make_mesh)"
        if reason:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        bounds[c] = memory_lower_bound(c, cfg, mc, responses, optimizer_bytes)
        if bounds[c] > hbm:
            reason = "memory lower bound above the HBM"
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        kept.append(c)
    kept.sort(
        key=lambda c: (
            memory_estimate(c, cfg, mc, responses, optimizer_bytes) > ESTIMATE_MARGIN * hbm,
            step_time_proxy(c, cfg, mc, responses, slc.chip, slc.num_chips),
        )
    )
    return Pruned(kept, rejected, bounds)


# ------------------------------------------------------------------------------------------------ compiling
@dataclasses.dataclass
class Result:
    """One compiled candidate: its plan, the programs compiled so far and the verdict. `fits`: every program
    compiled fits; `complete`: all of the plan's programs were compiled (else only the first, the train step)."""

    candidate: Candidate
    plan: Plan
    compiled: list[CompiledProgram]
    needed: float  # the largest compiled program's total per chip (or XLA's out-of-memory figure)
    fits: bool
    complete: bool = False
    estimate: dict[str, float] = dataclasses.field(default_factory=dict)


def compile_programs(r: Result, programs, slc: Slice, cache: dict) -> None:
    """Compile `programs` of `r`'s plan for `slc` into `r` (its `compiled`, `needed`, `fits`), stopping at the
    first that does not fit. A program whose lowered HLO was compiled before (the same eval step or scorer of
    another candidate) is not compiled again (`cache`: (name, held, HLO hash) → CompiledProgram)."""
    for program in programs:
        lowered = program.jitted.lower(*program.args)
        key = (program.name, program.resident, hashlib.sha256(lowered.as_text().encode()).hexdigest())
        try:
            if key not in cache:
                cache[key] = compile_program(program, slc.num_chips, lowered=lowered)
        except DoesNotFit as e:
            r.needed, r.fits = max(r.needed, e.needed), False
            return
        r.compiled.append(cache[key])
        r.needed = max(r.needed, cache[key].total)
        if cache[key].total > slc.chip.hbm_bytes:
            r.fits = False
            return


def compile_train_step(c: Candidate, cfg, slc: Slice, devices, responses: int, rewards: bool, cache: dict) -> Result:
    """`c`'s plan (`build_programs` on `cfg`, the recipe with `c`'s overrides) with its first program, the train
    step, compiled; the plan's estimate (`estimate_step`) when it fits."""
    plan = build_programs(cfg, devices, responses, rewards=rewards)
    r = Result(c, plan, [], 0.0, True, complete=len(plan.programs) == 1)
    compile_programs(r, plan.programs[:1], slc, cache)
    if r.fits:
        r.estimate = estimate_step(r.compiled[0], model_flops_per_chip(plan), slc.chip)
    return r


def search(
    config_for: Callable[[Sequence[str]], object],
    slc: Slice,
    devices,
    responses: int,
    rewards: bool,
    limit: int,
    progress: Callable[[str], None] = print,
) -> tuple[Pruned, list[Result]]:
    """Prune the candidates of the recipe (`config_for([])`: the recipe with the user's overrides; `config_for(
    candidate.overrides)`: the same with a candidate's flags, as the command line applies them), compile the
    train step of at most `limit` of them in `prune`'s order, then the other programs (eval step, scorers) of the
    best that fits, and of the next while one of those does not fit: the best row is checked whole. The results
    in compile order (`progress`: one line per compile)."""
    raw = config_for([])
    cfg, mc = validate(raw), architecture_of(raw)
    pruned = prune(cfg, mc, slc, responses, optimizer_bytes_per_parameter(raw), devices)
    chosen = pruned.kept[:limit]
    rejected = sum(pruned.rejected.values())
    progress(
        f"rpo-plan --search: {rejected + len(pruned.kept)} candidates, {rejected} pruned before compiling ("
        + "; ".join(f"{reason}: {count}" for reason, count in sorted(pruned.rejected.items()))
        + f"), {len(pruned.kept)} left; compiling the train step of the first {len(chosen)}"
    )
    results, cache = [], {}
    for i, c in enumerate(chosen, 1):
        try:
            r = compile_train_step(c, config_for(c.overrides), slc, devices, responses, rewards, cache)
        except (ValueError, NotImplementedError) as e:  # a setting the builder refuses: the next candidate
            progress(f"  [{i}/{len(chosen)}] {describe(c)}: not planned: {' '.join(str(e).split())}")
            continue
        verdict = f"est. step {r.estimate['step_s']:.3g} s" if r.fits else "does not fit"
        progress(
            f"  [{i}/{len(chosen)}] {describe(c)}: lower bound {gib(pruned.bounds[c])}, train step needs "
            f"{gib(r.needed)}: {verdict}"
        )
        results.append(r)
    for r in ranked(results):
        if not r.complete:
            compile_programs(r, r.plan.programs[1:], slc, cache)
            r.complete = True
            names = ", ".join(p.name for p in r.plan.programs[1:])
            progress(f"  {describe(r.candidate)}: {names}: {'fit' if r.fits else 'do not fit'}")
        if r.fits:
            break
    return pruned, results


def describe(c: Candidate) -> str:
    return f"mesh {c.mesh} (data×fsdp×tensor×context), remat {c.remat}, micro-batches {c.micro_batches}"


def ranked(results: Sequence[Result]) -> list[Result]:
    """The results that fit, best (shortest estimated step) first; ties by memory."""
    return sorted((r for r in results if r.fits), key=lambda r: (r.estimate["step_s"], r.needed))


def table(results: Sequence[Result], slc: Slice) -> str:
    """The ranked table: estimated step time and MFU, memory per chip (the largest program compiled: "all" of
    the plan's programs, or the "train" step only), and the overrides of each row."""
    rows = ranked(results)
    if not rows:
        return f"rpo-plan --search: nothing compiled fits {slc.accelerator}"
    lines = [
        f"rpo-plan --search: {len(rows)} of {len(results)} compiled fit {slc.accelerator} "
        f"({gib(slc.chip.hbm_bytes)} per chip), best first (ESTIMATES, not measurements):",
        f"  {'#':>2} {'est. step':>10} {'est. MFU':>9} {'per chip':>11} {'of':<5}  {'d×f×t×c':<11} {'remat':<33} "
        f"{'micro':>5}  overrides",
    ]
    for i, r in enumerate(rows, 1):
        c = r.candidate
        lines.append(
            f"  {i:>2} {r.estimate['step_s']:>8.3g} s {100 * r.estimate['mfu']:>7.1f} % {gib(r.needed):>11} "
            f"{'all' if r.complete else 'train':<5}  "
            f"{c.mesh:<11} {c.remat:<33} {c.micro_batches:>5}  {' '.join(c.overrides)}"
        )
    return "\n".join(lines)
