"""`rpo-plan` with LoRA and QLoRA (`config.model.lora`): the train state holds the adapters only (12 bytes per
adapter parameter: float32 factors and Adam's two moments, split by the sharding rules), the base-as-reference
costs no bytes, the frozen base is an argument of the compiled step (quantized: one byte per int8 code), and the
plan compiles and fits for a TPU slice on this CPU host (libtpu's topology description)."""

import importlib.util

from rpo_jax.train.build.plans import build_programs
from rpo_jax.train.cli.plan import run
from rpo_jax.train.plan.slices import parse_slice, slice_devices
from tests.train.test_plan import TINY, write_recipe


def load_recipe(path):
    spec = importlib.util.spec_from_file_location("recipe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def adapter_elements_per_chip(fsdp: int) -> int:
    """TINY (D 64, F 128, H 4, K 2, hd 16, L 2) with rank-4 all-linear adapters on a (fsdp, tensor 1) mesh: A is
    split where its input axis is `embed` (q/k/v/gate/up_proj), B where its output axis is (o/down_proj); the
    rest is replicated (heads and mlp go to `tensor` = 1)."""
    d, f, h, k, hd, r, layers = 64, 128, 4, 2, 16, 4, 2
    a = 5 * d * r // fsdp + h * hd * r + f * r  # q, k, v, gate, up (split) + o + down
    b = r * h * hd + 2 * r * k * hd + r * d // fsdp + 2 * r * f + r * d // fsdp  # q, k+v, o (split), gate+up, down
    return layers * (a + b)


def test_qlora_plan_state_is_the_adapters_and_the_reference_is_free(tmp_path):
    recipe = write_recipe(
        tmp_path,
        TINY,
        mesh={"data": 1, "fsdp": -1, "tensor": 1},
        reference_mode="in_step",
        **{"model.lora.rank": 4, "model.lora.alpha": 8.0, "model.lora.base_dtype": "int8"},
    )
    plan = build_programs(load_recipe(recipe), slice_devices(parse_slice("v5p-8")))  # 4 chips: fsdp 4
    scalars = plan.state_bytes - 12 * adapter_elements_per_chip(4)
    assert 4 + 8 <= scalars <= 4 * 4 + 8  # step + rng, and one or more int32 optimizer counts
    assert plan.reference_bytes == 0 and plan.in_step
    assert [p.name for p in plan.programs] == ["train step"]


def test_qlora_plan_compiles_and_fits(tmp_path, capsys):
    recipe = write_recipe(
        tmp_path,
        TINY,
        mesh={"data": 1, "fsdp": -1, "tensor": 1},
        reference_mode="cache",
        **{
            "model.lora.rank": 4,
            "model.lora.alpha": 8.0,
            "model.lora.base_dtype": "int4",
            "model.lora.targets": "q_proj,v_proj",
        },
    )
    assert run(["rpo-plan", "--config", recipe, "--topology", "v5e-4"]) == 0
    out = capsys.readouterr().out
    assert "fits: needs " in out and "per chip on v5e-4" in out
    assert "reference 0 scorer (cache fill)" in out
