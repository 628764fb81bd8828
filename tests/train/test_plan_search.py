"""`rpo-plan --search`: candidates over the mesh, remat policy and micro-batches, pruned before compiling, the
survivors that fit ranked by estimated step time, each with the `--config.*` overrides that select it.

Fast tests: the enumeration (ordered factorizations), the divisibility rules, the memory lower bound against
closed forms and against XLA's own figure for the 8B recipe, and the search's bookkeeping with the compiler
replaced by a stand-in of known totals and FLOPs (ranking, the limit, a pruned candidate never compiled, the best
row checked whole). Slow: a real search of a tiny model on a v5e-4 slice (libtpu's compiler), whose top row
planned on its own with its overrides gives the same figures.
"""

import dataclasses
import importlib.util
import math
import re

import pytest
from absl import flags
from ml_collections import config_flags

from rpo_jax.models.config import ModelConfig
from rpo_jax.train.build.model import architecture_of
from rpo_jax.train.cli.plan import run
from rpo_jax.train.config.validation import validate
from rpo_jax.train.plan import search as search_module
from rpo_jax.train.plan.compile import CompiledProgram, DoesNotFit
from rpo_jax.train.plan.hlo_analysis import COLLECTIVES, CollectiveStats
from rpo_jax.train.plan.search import (
    Candidate,
    candidates,
    factorizations,
    indivisible,
    memory_estimate,
    memory_lower_bound,
    optimizer_bytes_per_parameter,
    prune,
    ranked,
    search,
)
from rpo_jax.train.plan.slices import CHIPS, GiB, parse_slice
from tests.train.test_plan import TINY, write_recipe


def recipe_config(path: str, *overrides: str):
    """The recipe's ConfigDict with `--config.*` overrides, read as rpo-plan reads it (ml_collections' flags)."""
    argv = ["rpo-plan", "--config", path, *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


def test_every_mesh_of_the_slice_is_a_candidate():
    meshes = factorizations(32, 4)
    assert len(meshes) == math.comb(5 + 3, 3)  # 2^5 over 4 axes: stars and bars
    assert len(set(meshes)) == len(meshes) and all(math.prod(m) == 32 for m in meshes)
    cfg = validate(recipe_config("configs/llama3_1_8b_v5p.py"))  # batch 128: 8 divisors
    assert len(candidates(cfg, 32)) == 56 * 4 * 8  # four remat policies searched ("dots" = "dots_saveable")


@pytest.mark.parametrize(
    "candidate, reason",
    [
        (Candidate(1, 4, 8, 1, "full", 4), None),  # tensor 8: 32 heads, 8 key/value heads, 14,336 = 8 × 1,792
        (Candidate(1, 2, 16, 1, "full", 4), "tensor does not divide"),  # 8 key/value heads
        (Candidate(1, 32, 1, 1, "full", 8), "a micro-batch does not split"),  # 128 / 8 = 16 examples over 32
        (Candidate(1, 16, 1, 2, "full", 8), None),
        (Candidate(1, 8, 1, 4, "full", 1), None),
    ],
)
def test_divisibility_rules(candidate, reason):
    raw = recipe_config("configs/llama3_1_8b_v5p.py")
    found = indivisible(candidate, validate(raw), architecture_of(raw))
    assert (found is None) if reason is None else found.startswith(reason)


def test_the_row_length_must_split_into_two_chunks_per_context_device():
    raw = recipe_config("configs/llama3_1_8b_long_v5p.py", "--config.data.max_length=32764", "--config.mesh.context=2")
    cfg, mc = validate(raw), architecture_of(raw)  # 32,764 = 4 × 8,191: context 2, not 4
    assert indivisible(Candidate(1, 8, 1, 4, "full", 4), cfg, mc).startswith("the row length is not a multiple")
    assert indivisible(Candidate(1, 8, 2, 2, "full", 4), cfg, mc) is None
    # a recipe at context 1 with splash (validation refuses splash only with a context axis): no context candidate
    raw = recipe_config("configs/llama3_1_8b_v5p.py", "--config.model.attention=splash")
    assert "does not compose" in indivisible(Candidate(1, 8, 1, 4, "full", 4), validate(raw), architecture_of(raw))


def test_memory_lower_bound_is_the_state_and_the_saved_layer_inputs():
    """Llama-3.1-8B, the long recipe: Adam's 8 bytes + float32 weights per parameter over fsdp × context ×
    tensor, and with full remat one bfloat16 [tokens, 4,096] residual per layer: 8 pairs × 2 × 32,768 tokens
    per micro-batch over data × fsdp × context."""
    raw = recipe_config("configs/llama3_1_8b_long_v5p.py")
    cfg, mc = validate(raw), architecture_of(raw)
    assert optimizer_bytes_per_parameter(raw) == pytest.approx(8.0, abs=1e-3)  # two float32 moments (+ count)
    c = Candidate(1, 8, 1, 4, "full", 4)
    tokens = 8 * 2 * 32768 / 32
    expected = 12 * mc.num_params() / 32 + 32 * tokens * 4096 * 2
    assert memory_lower_bound(c, cfg, mc, 2, 8.0) == pytest.approx(expected)
    # saving the projections adds q (32 × 128), k and v (8 × 128 each) and gate, up (14,336 each), bfloat16
    saved = dataclasses.replace(c, remat="dots_with_no_batch_dims_saveable")
    extra = 32 * tokens * (4096 + 2 * 1024 + 2 * 14336) * 2
    assert memory_lower_bound(saved, cfg, mc, 2, 8.0) == pytest.approx(expected + extra)


def test_memory_lower_bound_is_below_what_xla_compiled():
    """configs/llama3_1_8b_v5p.py on v5p-64 (fsdp 8 × tensor 4, full remat, 4 micro-batches): its train step
    compiled to 21.51 GiB per chip (rpo-plan, 2026-12-07, docs/guides/rpo_plan.md); the bound is below it."""
    raw = recipe_config("configs/llama3_1_8b_v5p.py")
    bound = memory_lower_bound(Candidate(1, 8, 4, 1, "full", 4), validate(raw), architecture_of(raw), 2, 8.0)
    assert 0.3 * 21.51 * GiB < bound < 21.51 * GiB


@pytest.mark.parametrize(
    "recipe, candidate, compiled_gib",
    [
        ("llama3_1_8b_v5p", Candidate(1, 8, 4, 1, "full", 4), 21.51),
        ("llama3_1_8b_v5p", Candidate(4, 4, 1, 2, "dots_saveable", 2), 74.18),
        ("llama3_1_8b_v5p", Candidate(1, 16, 1, 2, "dots_saveable", 2), 55.45),
        ("llama3_1_8b_v5p", Candidate(8, 1, 1, 4, "dots_saveable", 2), 102.21),
        ("llama3_1_8b_long_v5p", Candidate(8, 1, 1, 4, "dots_saveable", 4), 102.37),
        ("llama3_1_8b_long_v5p", Candidate(4, 1, 2, 4, "none", 8), 112.64),
    ],
)
def test_memory_estimate_is_near_what_xla_compiled(recipe, candidate, compiled_gib):
    """The compile order's estimate against XLA:TPU's train-step totals per chip on v5p-64 (rpo-plan --search,
    2026-12-07): within 20 %; the lower bound below each."""
    raw = recipe_config(f"configs/{recipe}.py")
    cfg, mc = validate(raw), architecture_of(raw)
    assert memory_estimate(candidate, cfg, mc, 2, 8.0) / GiB == pytest.approx(compiled_gib, rel=0.2)
    assert memory_lower_bound(candidate, cfg, mc, 2, 8.0) / GiB < compiled_gib


def test_memory_prunes_what_cannot_fit():
    """No remat and one micro-batch of the long recipe: the scan keeps every layer's activations of 16 pairs ×
    2 × 32,768 tokens per chip group; a v5p chip's 95 GiB cannot hold them."""
    raw = recipe_config("configs/llama3_1_8b_long_v5p.py")
    cfg, mc = validate(raw), architecture_of(raw)
    pruned = prune(cfg, mc, parse_slice("v5p-64"), 2, 8.0)
    heavy = Candidate(1, 32, 1, 1, "none", 1)
    assert pruned.bounds[heavy] > CHIPS["v5p"].hbm_bytes and heavy not in pruned.kept
    assert pruned.rejected["memory lower bound above the HBM"] >= 1
    assert all(pruned.bounds[c] <= CHIPS["v5p"].hbm_bytes for c in pruned.kept)
    assert all(indivisible(c, cfg, mc) is None and c.remat != "dots" for c in pruned.kept)


# ------------------------------------------------------------------------------------------------ the search
def fake_compiled(name: str, total: float, flops: float) -> CompiledProgram:
    zero = {kind: CollectiveStats(kind) for kind in COLLECTIVES}
    return CompiledProgram(name, total, 0, 0, 0, 0, 0, flops=flops, collectives=zero)


def test_search_ranks_what_fits_and_never_compiles_a_pruned_candidate(tmp_path, monkeypatch):
    """The compiler replaced by a stand-in: a program's total is its candidate's lower bound × 1.5 (the "none"
    policy: its eval step 20 GiB, over the v5e chip's 16), its FLOPs 1e12 × (micro-batches + tensor): the
    ranking follows the FLOPs, the limit caps what is compiled, only survivors of the pruning are compiled, and
    the best row is compiled whole (a "none" row ranked first whose eval step does not fit is dropped)."""
    recipe = write_recipe(tmp_path, TINY, reference_mode="in_step", **{"data.eval_fraction": 0.1})
    raw = recipe_config(recipe)
    cfg, mc = validate(raw), architecture_of(raw)
    slc = parse_slice("v5e-4")
    pruned_all = prune(cfg, mc, slc, 2, optimizer_bytes_per_parameter(raw))
    compiled = []

    def fake_compile(program, num_devices, dump_dir="", lowered=None):
        c = current[0]
        compiled.append((c, program.name))
        if program.name == "eval step" and c.remat == "none":
            raise DoesNotFit(program.name, 20 * GiB, 16 * GiB)
        return fake_compiled(program.name, 1.5 * pruned_all.bounds[c], 1e12 * (c.micro_batches + c.tensor))

    current = []
    real_compile_programs = search_module.compile_programs

    def tracking(r, *args):
        current[:] = [r.candidate]
        return real_compile_programs(r, *args)

    monkeypatch.setattr(search_module, "compile_program", fake_compile)
    monkeypatch.setattr(search_module, "compile_programs", tracking)
    monkeypatch.setattr(search_module, "prune", lambda *a: pruned_all)
    lines = []
    pruned, results = search(
        lambda o: recipe_config(recipe, *o), slc, slc_devices(slc), 2, False, limit=5, progress=lines.append
    )
    assert [r.candidate for r in results] == pruned_all.kept[:5]
    assert {c for c, _ in compiled} <= set(pruned_all.kept[:5])  # nothing pruned, nothing past the limit
    order = ranked(results)
    steps = [r.estimate["step_s"] for r in order]
    assert steps == sorted(steps) and len(order) >= 1
    flops = [r.candidate.micro_batches + r.candidate.tensor for r in order]
    assert flops == sorted(flops)
    assert order[0].complete and order[0].candidate.remat != "none"
    assert all(not r.fits for r in results if r.candidate.remat == "none" and r.complete)
    assert lines[0].startswith(f"rpo-plan --search: {len(candidates(cfg, 4))} candidates")


def slc_devices(slc):
    from rpo_jax.train.plan.slices import slice_devices

    return slice_devices(slc)


def test_search_is_refused_for_this_machine(tmp_path, capsys):
    recipe = write_recipe(tmp_path, TINY)
    assert run(["rpo-plan", "--config", recipe, "--topology", "cpu", "--search"]) == 2
    assert "--search plans a TPU slice" in capsys.readouterr().err


@pytest.mark.slow
def test_the_top_row_planned_alone_gives_the_same_fit(tmp_path, capsys):
    """A real search (libtpu's compiler) of a tiny Llama on a v5e-4 with 16,384-token rows: the dense attention
    scores of the policies that save them (context = 1) are pruned by the bound; the table is ranked by estimated
    step time; each compiled train step's total is above its lower bound; planning the top row's overrides alone
    fits with the same total per chip."""
    recipe = write_recipe(
        tmp_path,
        TINY,
        reference_mode="in_step",
        **{"data.max_length": 16384, "data.max_prompt_length": 1024, "data.eval_fraction": 0.0},
    )
    calls = []
    real = search_module.compile_train_step

    def tracking(c, *args):
        calls.append(c)
        return real(c, *args)

    search_module.compile_train_step, saved = tracking, real
    try:
        assert run(["rpo-plan", "--config", recipe, "--topology", "v5e-4", "--search", "--search-limit", "3"]) == 0
    finally:
        search_module.compile_train_step = saved
    out = capsys.readouterr().out
    raw = recipe_config(recipe)
    cfg, mc = validate(raw), architecture_of(raw)
    pruned = prune(cfg, mc, parse_slice("v5e-4"), 2, optimizer_bytes_per_parameter(raw))
    assert pruned.rejected["memory lower bound above the HBM"] > 0
    assert calls == pruned.kept[:3]
    rows = re.findall(r"^\s+\d+\s+([\d.e+-]+) s .*?  (--config\.mesh\.data=.*)$", out, re.M)
    assert rows, out
    steps = [float(s) for s, _ in rows]
    assert steps == sorted(steps)
    needed = re.findall(r"lower bound ([\d.]+) (GiB|MiB), train step needs ([\d.]+) (GiB|MiB)", out)
    scale = {"GiB": 1, "MiB": 1 / 1024}
    assert needed and all(float(b) * scale[bu] <= float(n) * scale[nu] for b, bu, n, nu in needed)
    best_total = re.search(r"fits: needs ([\d.]+ \w+) of", out).group(1)
    capsys.readouterr()
    assert run(["rpo-plan", "--config", recipe, "--topology", "v5e-4", *rows[0][1].split()]) == 0
    assert f"fits: needs {best_total} of" in capsys.readouterr().out


def test_model_config_of_the_long_recipe():
    """The long recipe is Llama-3.1-8B's shape: 32 layers, 32 query and 8 key/value heads of 128."""
    spec = importlib.util.spec_from_file_location("long", "configs/llama3_1_8b_long_v5p.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    mc: ModelConfig = architecture_of(cfg)
    assert (mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim) == (32, 32, 8, 128)
    assert cfg.data.max_length == 32768 and cfg.data.max_length % (2 * cfg.mesh.context) == 0
