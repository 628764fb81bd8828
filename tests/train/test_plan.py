"""`rpo-plan`: ahead-of-time compilation of the trainer's programs for a Cloud TPU slice, on this CPU host
(libtpu's topology description; no TPU).

Checked against closed forms: the slice shapes Cloud TPU documents, one device per chip (megacore), the
per-chip bytes of the sharded train state (12 bytes per parameter: float32 weights + Adam's two moments), the
matmul FLOPs and collectives of small programs whose counts are known, XLA's out-of-memory messages; and the exit
statuses of the command (0 fits, 1 does not fit, 2 bad usage).
"""

import json
import pathlib
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rpo_jax.models.config import ModelConfig
from rpo_jax.models.sharding import activation_spec, constrain, make_mesh
from rpo_jax.train.build.plans import build_programs
from rpo_jax.train.cli.plan import run
from rpo_jax.train.plan.compile import oom_bytes
from rpo_jax.train.plan.hlo_analysis import analyze
from rpo_jax.train.plan.slices import CHIPS, parse_slice, slice_devices

ROOT = pathlib.Path(__file__).resolve().parents[2]

TINY = dict(
    model_type="llama",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def write_recipe(tmp_path, init: dict, **fields) -> str:
    """A recipe file: a random-init model `init` (no checkpoint), bfloat16 compute, `fields` as overrides."""
    lines = "\n".join(f"    c.{k} = {v!r}" for k, v in fields.items())
    path = tmp_path / "recipe.py"
    path.write_text(
        textwrap.dedent(f"""\
        from rpo_jax.train.config.defaults import base_config
        def get_config():
            c = base_config()
            c.model.init = {init!r}
            c.model.dtype = "bfloat16"
            c.data.train = "data/train.jsonl"
            c.data.max_length = 64
            c.data.max_prompt_length = 32
            c.data.batch_size = 8
            c.data.eval_batch_size = 8
        """)
        + lines
        + "\n    return c\n"
    )
    return str(path)


# ------------------------------------------------------------------------------------------------ slices
@pytest.mark.parametrize(
    "name, chips, topology",
    [
        ("v5p-8", 4, "v5:2x2x1"),
        ("v5p-64", 32, "v5:2x4x4"),
        ("v5p-256", 128, "v5:4x4x8"),
        ("v4-32", 16, "v4:2x2x4"),
        ("v5litepod-16", 16, "v5e:4x4"),
        ("v5e-16", 16, "v5e:4x4"),
        ("v5e-4", 4, "v5e:2x2"),
        ("v6e-8", 8, "v6e:2x4"),
    ],
)
def test_accelerator_types_name_their_slices(name, chips, topology):
    slc = parse_slice(name)
    assert (slc.num_chips, slc.topology_name) == (chips, topology)


@pytest.mark.parametrize("name", ["v5p-8", "v5e-4", "v4-16"])
def test_one_device_per_chip(name):
    """v4/v5p need the megacore chip config: without it libtpu describes two devices (TensorCores) per chip."""
    slc = parse_slice(name)
    devices = slice_devices(slc)
    assert len(devices) == slc.num_chips
    assert {d.platform for d in devices} == {"tpu"}


@pytest.mark.parametrize("name", ["v9-8", "v5p-7", "v5p-12", "tpu", "v5e-3"])
def test_unknown_accelerator_types_are_refused(name):
    with pytest.raises(ValueError, match="--topology"):
        parse_slice(name)


def test_oom_messages_are_read():
    assert oom_bytes(
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
        "Used 120.50G of 95.74G hbm. Exceeded hbm capacity by 24.76G."
    ) == (120.5 * 2**30, 95.74 * 2**30)
    assert oom_bytes(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
        "(343.17G) exceeds available HBM (95.74G).",
        2**30,
    ) == (344.17 * 2**30, 95.74 * 2**30)
    assert oom_bytes("INVALID_ARGUMENT: something else") is None


# ------------------------------------------------------------------------------------------------ HLO counts
def test_matmul_flops_count_every_loop_iteration():
    """A scan of L matmuls [m,k]·[k,n] sharded over 4 chips: 2·m·k·n·L / 4 FLOPs per chip (XLA's own cost
    analysis counts the loop body once)."""
    devices = slice_devices(parse_slice("v5e-4"))
    mesh = make_mesh((4, 1, 1), devices)
    layers, m, k, n = 6, 256, 512, 384
    w = jax.ShapeDtypeStruct((layers, k, n), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("data")))

    def f(w, x):
        return jax.lax.scan(lambda h, wl: (h, h @ wl), x, w)[1]

    compiled = jax.jit(f).lower(w, x).compile()
    stats = analyze(compiled.as_text(), 4)
    assert stats.flops == 2 * m * k * n * layers / 4
    assert stats.unknown_loops == []
    assert sum(s.count for s in stats.collectives.values()) == 0


def test_batched_matmul_flops():
    """Attention-like einsums (batch and head axes): XLA:TPU writes them as convolutions over a dilated
    "spatial" batch axis, whose window taps on holes multiply zeros and are not counted."""
    devices = slice_devices(parse_slice("v5e-4"))
    mesh = make_mesh((4, 1, 1), devices)
    b, h, t, d = 8, 4, 128, 64
    q = jax.ShapeDtypeStruct((b, h, t, d), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec("data")))

    def attention_scores_and_values(q):
        s = jnp.einsum("bhqd,bhkd->bhqk", q, q, preferred_element_type=jnp.float32)
        return jnp.einsum("bhqk,bhkd->bhqd", s.astype(q.dtype), q)

    stats = analyze(jax.jit(attention_scores_and_values).lower(q).compile().as_text(), 4)
    assert stats.flops == 2 * (2 * b * h * t * t * d) / 4


def test_collectives_are_counted_with_their_bytes():
    """Gathering an array sharded over 4 chips onto every chip: one all-gather of the whole array, each chip
    sending 3/4 of it in a ring; summing it: one all-reduce of 4 bytes."""
    devices = slice_devices(parse_slice("v5e-4"))
    mesh = make_mesh((4, 1, 1), devices)
    x = jax.ShapeDtypeStruct((1024, 256), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("data")))
    gathered = jax.jit(lambda a: a * 2, out_shardings=NamedSharding(mesh, PartitionSpec())).lower(x).compile()
    stats = analyze(gathered.as_text(), 4).collectives
    assert (stats["all-gather"].count, stats["all-gather"].bytes) == (1, 1024 * 256 * 4)
    assert stats["all-gather"].traffic_bytes == 1024 * 256 * 4 * 3 / 4
    summed = analyze(jax.jit(jnp.sum).lower(x).compile().as_text(), 4).collectives
    assert (summed["all-reduce"].count, summed["all-reduce"].bytes) == (1, 4)


# ------------------------------------------------------------------------------------------------ the plan
def test_abstract_train_state_holds_twelve_bytes_per_parameter(tmp_path):
    """float32 weights + Adam's float32 moments, every matrix split over fsdp × tensor = 4 chips, the norms
    replicated; plus the scalars (step, Adam's count, the schedule's count: int32) and the RNG key (2 × uint32)."""
    recipe = write_recipe(tmp_path, TINY, mesh={"data": 1, "fsdp": 2, "tensor": 2})
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe", recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    plan = build_programs(cfg, slice_devices(parse_slice("v5p-8")))
    mc = ModelConfig.from_hf_dict(TINY)
    norms = mc.num_layers * 2 * mc.hidden_size + mc.hidden_size
    matrices = mc.num_params() - norms
    scalars = plan.state_bytes - 12 * (matrices // 4 + norms)
    assert 4 + 8 <= scalars <= 4 * 4 + 8  # step + rng, and one or more int32 optimizer counts
    assert plan.reference_bytes == 4 * (matrices // 4 + norms)  # one float32 copy of the initial policy
    assert [p.name for p in plan.programs] == ["train step", "reference 0 scorer (cache fill)"]
    t, b, k = 64, 8, 2
    # tokens int32 + two bool masks per token; lengths, valid, cached reference log-probs per response
    assert plan.batch_bytes == (b * k * t * (4 + 1 + 1) + b * k * (4 + 1 + 4)) // 2  # batch rows over fsdp=2


@pytest.mark.parametrize(
    "topology, mesh", [("v5p-8", {"data": 1, "fsdp": 2, "tensor": 2}), ("v5e-4", {"data": 1, "fsdp": -1, "tensor": 1})]
)
def test_small_llama_plan_compiles_and_fits(tmp_path, capsys, topology, mesh):
    recipe = write_recipe(tmp_path, TINY, mesh=mesh, reference_mode="in_step")
    assert run(["rpo-plan", "--config", recipe, "--topology", topology]) == 0
    out = capsys.readouterr().out
    chip = CHIPS["v5p" if topology.startswith("v5p") else "v5e"]
    assert f"per chip: HBM {chip.hbm_bytes / 2**30:.2f} GiB" in out
    assert "fits: needs " in out and f"per chip on {topology}" in out
    assert "train step: total" in out and "all-gather" in out and "ESTIMATE" in out
    assert "references: 1 scored in the step" in out
    assert "\nexport: " in out and "the writing process (process 0) needs " in out


def test_the_export_s_files_and_host_memory_are_save_pretrained_s_and_the_largest_piece(tmp_path):
    """What rpo-plan says an export writes: the files transformers' save_pretrained writes for the same model and
    max_shard_size (a real LlamaForCausalLM saved), its index's total_size; the writing process's extra host memory
    is the largest tensor when it is under 16 MiB (TINY's embedding, 512 × 64 float32), else a 16 MiB piece
    (a 1 GiB MLP matrix: 512 rows of 32 KiB), once more per local CPU device; a reward model adds its score head."""
    import types

    import torch
    import transformers

    from rpo_jax.train.config.defaults import base_config
    from rpo_jax.train.plan.report import export_line, export_needs

    def config(size):
        c = base_config()
        c.model.param_dtype, c.export.max_shard_size = "float32", size
        return c

    tiny = ModelConfig.from_hf_dict(TINY)
    for size in ("100KB", "300KB", "50GB"):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=False))
        hf.to(torch.float32).save_pretrained(tmp_path / size, max_shard_size=size)
        files = sorted(p.name for p in (tmp_path / size).glob("*.safetensors"))
        cfg = config(size)
        needs = export_needs(types.SimpleNamespace(model_config=tiny, mode="preference"), cfg)
        assert needs["files"] == len(files), (size, files)
        if len(files) > 1:
            index = json.loads((tmp_path / size / "model.safetensors.index.json").read_text())
            assert needs["bytes"] == index["metadata"]["total_size"]
    assert needs["bytes"] == 4 * tiny.num_params()
    assert needs["largest"] == needs["piece"] == needs["host"] == 512 * 64 * 4
    cpu = export_needs(types.SimpleNamespace(model_config=tiny, mode="preference"), cfg, local_cpu_devices=4)
    assert cpu["host"] == 5 * 512 * 64 * 4
    big = ModelConfig.from_hf_dict(
        dict(TINY, hidden_size=8192, intermediate_size=32768, num_attention_heads=64, num_key_value_heads=8)
    )
    cfg = config("50GB")
    needs = export_needs(types.SimpleNamespace(model_config=big, mode="preference"), cfg)
    assert needs["largest"] == 32768 * 8192 * 4 and needs["piece"] == needs["host"] == 16 * 2**20
    line = export_line(types.SimpleNamespace(model_config=big, mode="preference"), cfg, local_cpu_devices=2)
    assert "needs 48.0 MiB beyond what it holds (the largest piece gathered, 16.0 MiB" in line
    rm = export_needs(types.SimpleNamespace(model_config=tiny, mode="reward_model"), cfg)  # a fresh 1-label head
    assert rm["bytes"] == 4 * (tiny.num_params() + tiny.hidden_size)


@pytest.mark.parametrize(
    "fields, programs, references",
    [
        (
            {"mode": "online", "online.reward_judge": "rpo_jax.data.demo:judge", "online.max_new_tokens": 16},
            ["update step", "sampler", "policy scorer (samples)"],
            "references: 1 scored per iteration, between sampling and the updates; the primary: the initial "
            "policy's copy",
        ),
        (
            {
                "mode": "online",
                "online.reward_judge": "rpo_jax.data.demo:judge",
                "online.reference": "current",
                "loss.name": "rloo",
                "model.lora.rank": 8,
            },
            ["update step", "sampler", "policy scorer (samples)"],
            "references: none (online.reference='current'",
        ),
        (
            {"mode": "reward_model", "data.eval": "data/eval.jsonl"},
            ["train step", "eval step"],
            "references: none (a reward model)",
        ),
    ],
    ids=["online", "online_rloo_lora", "reward_model"],
)
def test_online_and_reward_model_recipes_are_planned(tmp_path, capsys, fields, programs, references):
    """rpo-plan plans every mode with the trainer's own programs (the online sampler with its KV cache, the
    scorers of the samples, the update step; the reward model's steps) and exits 0 when they fit."""
    recipe = write_recipe(tmp_path, TINY, mesh={"data": 1, "fsdp": -1, "tensor": 1}, **fields)
    assert run(["rpo-plan", "--config", recipe, "--topology", "v5e-4"]) == 0
    out = capsys.readouterr().out
    for name in programs:
        assert f"\n  {name}: total " in out, name
    assert f"mode {fields['mode']}; {references}" in out
    assert "fits: needs " in out


def test_this_machine_is_a_target(tmp_path, capsys):
    """`--topology cpu`: the programs compiled by this machine's XLA, the run's need (the process's memory now plus
    the largest program) against config.train.memory_budget of the host memory; a budget below it exits 1; a GPU
    target on a machine without one is bad usage (2)."""
    recipe = write_recipe(tmp_path, TINY, mesh={"data": 1, "fsdp": -1, "tensor": 1})
    assert run(["rpo-plan", "--config", recipe, "--topology", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "rpo-plan: this machine's CPU" in out and "GiB of host memory" in out and "  train step: total " in out
    devices = len(jax.devices("cpu"))
    assert f"once in host memory + once per local CPU device ({devices})" in out
    need = out.split("fits: needs ")[1].split(" for the process")[0]
    assert need.endswith("GiB") and float(need.split()[0]) > 0.1  # the process itself: Python, jax, XLA
    assert run(["rpo-plan", "--config", recipe, "--topology", "cpu", "--config.train.memory_budget=1MB"]) == 1
    assert "does not fit: needs " in capsys.readouterr().out
    assert run(["rpo-plan", "--config", recipe, "--topology", "gpu"]) == 2
    assert "rpo-plan: error: --topology=gpu: this machine has no GPU device" in capsys.readouterr().err


def test_oversized_config_does_not_fit(tmp_path, capsys):
    """A 7.7-billion-parameter model on a v5e-4 (16 GiB per chip): 12 bytes per parameter over 4 chips alone
    need 21 GiB per chip."""
    big = dict(
        TINY,
        hidden_size=8192,
        intermediate_size=32768,
        num_hidden_layers=8,
        num_attention_heads=64,
        num_key_value_heads=8,
    )
    recipe = write_recipe(tmp_path, big, mesh={"data": 1, "fsdp": -1, "tensor": 1}, **{"loss.name": "simpo"})
    assert run(["rpo-plan", "--config", recipe, "--topology", "v5e-4"]) == 1
    out = capsys.readouterr().out
    assert "does not fit: needs " in out and "GiB per chip on v5e-4" in out
    needed = float(out.split("does not fit: needs ")[1].split(" GiB")[0])
    assert needed >= 12 * ModelConfig.from_hf_dict(big).num_params() / 4 / 2**30 * 0.99


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--topology", "v9-8"], "--topology='v9-8'"),
        ([], "--config and --topology are required"),
        (["--topology", "v5p-8", "--config.mesh.tensor=3"], "mesh"),
        (["--topology", "v5p-8", "--config.model.architecture=no/such.json"], "no such file"),
        (
            ["--topology", "v5p-8", "--config.model.nope=1"],
            "config.model.nope: no such key (keys of config.model: path, ",
        ),
    ],
)
def test_bad_usage_exits_2(tmp_path, capsys, extra, message):
    recipe = write_recipe(tmp_path, TINY, mesh={"data": 1, "fsdp": -1, "tensor": 1})
    assert run(["rpo-plan", "--config", recipe, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rpo-plan: error: ") and message in err and "\n" not in err


# ------------------------------------------------------------------------------------------------ bundled files
@pytest.mark.parametrize(
    "name, billions",
    [  # the parameter counts of the model cards
        ("llama-3.2-1b-instruct", 1.24),
        ("llama-3.1-8b-instruct", 8.03),
        ("llama-3.1-70b-instruct", 70.6),
        ("gemma-2-9b-it", 9.24),
        ("gemma-2-27b-it", 27.2),
        ("gemma-3-1b-it", 1.0),
    ],
)
def test_bundled_architectures(name, billions):
    path = ROOT / "configs" / "architectures" / f"{name}.json"
    mc = ModelConfig.from_hf_dict(json.loads(path.read_text()), source=str(path))
    assert mc.num_params() / 1e9 == pytest.approx(billions, rel=0.01)


# ------------------------------------------------------------------------------------------------ activations
def test_activation_constraints_are_no_ops_without_a_mesh():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    assert constrain(x, ("batch", None, None)) is x
    np.testing.assert_array_equal(jax.jit(lambda a: constrain(a, ("batch", None, "mlp")))(x), x)


def test_activation_spec_leaves_indivisible_dimensions_to_xla():
    mesh = make_mesh((1, 2, 4), jax.devices()[:8])
    assert activation_spec(("batch", None, "heads", None), (6, 5, 8, 16), mesh) == PartitionSpec(
        "fsdp", None, "tensor", None
    )
    assert activation_spec(("batch", "mlp"), (3, 6), mesh) == PartitionSpec(
        PartitionSpec.UNCONSTRAINED, PartitionSpec.UNCONSTRAINED
    )
    x = jax.device_put(jnp.ones((6, 8)), NamedSharding(mesh, PartitionSpec()))
    y = jax.jit(lambda a: constrain(2 * a, ("batch", "mlp")))(x)
    assert y.sharding.spec == PartitionSpec("fsdp", "tensor")  # rows over fsdp, MLP width over tensor
    np.testing.assert_array_equal(y, 2 * np.ones((6, 8)))


def test_auto_attention_is_planned_as_the_slice_resolves_it_not_as_this_cpu_host(tmp_path, capsys):
    """On this CPU host "auto" takes blockwise attention for rows of 512 tokens or more; a multi-chip TPU slice
    takes XLA's dense attention (splash runs on one device only). The plan of a v5e-4 with "auto" and 1,024-token
    rows is therefore the plan with "xla" — the program the slice runs — not the blockwise one."""
    from rpo_jax.models.attention import resolve, target_backend

    facts = {"dtype": "bfloat16", "seq_len": 1024, "has_parents": False, "softcap": None}
    assert resolve("auto", backend="cpu", **facts) == "blockwise"
    with target_backend("tpu", 4):
        assert resolve("auto", devices=4, **facts) == "xla"

    def train_step_line(attention: str) -> str:
        recipe = write_recipe(
            tmp_path,
            TINY,
            mesh={"data": 1, "fsdp": -1, "tensor": 1},
            **{"data.max_length": 1024, "data.max_prompt_length": 512, "model.attention": attention},
        )
        assert run(["rpo-plan", "--config", recipe, "--topology", "v5e-4"]) == 0
        return next(line for line in capsys.readouterr().out.splitlines() if "train step: total" in line)

    auto, xla, blockwise = (train_step_line(a) for a in ("auto", "xla", "blockwise"))
    assert auto == xla != blockwise
