"""LoRA adapters on the scanned decoder (rpo_jax.models.lora): a fresh adapter changes nothing, adapters off equal
the base bit for bit, merge equals the adapted model, gradients w.r.t. the adapters equal the full gradient
projected by the chain rule, sharding follows the adapted weights, and PEFT adapters round-trip with PyTorch
`peft` in both directions (logits within 1e-4)."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rpo_jax.models import ModelConfig, create_model, generate, load_hf, make_mesh, save_hf, token_logps
from rpo_jax.models.lora import (
    LoraConfig,
    adapters_disabled,
    attach_lora,
    count_adapter_parameters,
    load_peft_adapter,
    merge_lora,
    resolve_targets,
    save_peft_adapter,
)
from tests.hf_fixtures import hf_logits, load_torch_model, make_tiny_gemma, make_tiny_llama

TOL = 1e-4
CONFIG = ModelConfig(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)
TOKENS = np.random.default_rng(0).integers(3, 64, size=(2, 7)).astype(np.int32)


def randomize_adapters(model, seed: int, std: float = 0.05) -> None:
    """Random non-zero A and B (a fresh B is zero and would hide every mistake in the low-rank path)."""
    keys = iter(jax.random.split(jax.random.key(seed), 32))
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    for variable in jax.tree.leaves(nnx.state(model.lora, nnx.LoRAParam), is_leaf=is_variable):
        variable[...] = std * jax.random.normal(next(keys), variable.shape, variable.dtype)


def tiny_lora_model(targets="all-linear", rank=4, alpha=8.0, seed=1):
    model = create_model(CONFIG, rngs=nnx.Rngs(0))
    attach_lora(model, LoraConfig(rank=rank, alpha=alpha, targets=targets), rngs=nnx.Rngs(seed))
    return model


# ------------------------------------------------------------------------------------------- config / targets


def test_targets_all_linear_regex_and_names():
    assert resolve_targets("all-linear", 2) == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    assert resolve_targets(r".*\.(q_proj|v_proj)", 2) == ("q_proj", "v_proj")
    assert resolve_targets(("q_proj", "v_proj"), 2) == ("q_proj", "v_proj")
    assert resolve_targets(r".*mlp\..*", 2) == ("gate_proj", "up_proj", "down_proj")


def test_bad_targets_and_config_are_clear_errors():
    with pytest.raises(ValueError, match=r"selects self_attn.q_proj in layers \[0\] only"):
        resolve_targets(r"model\.layers\.0\.self_attn\.q_proj", 2)
    with pytest.raises(ValueError, match="selects no module"):
        resolve_targets(r".*lm_head", 2)
    with pytest.raises(ValueError, match=r"\['q_prj', 'lm_head'\] name no adaptable module"):
        resolve_targets(("q_prj", "v_proj", "lm_head"), 2)
    with pytest.raises(ValueError, match="lora.rank must be a positive integer"):
        LoraConfig(rank=0, alpha=8.0)
    with pytest.raises(ValueError, match="lora.alpha"):
        LoraConfig(rank=4, alpha=-1.0)
    with pytest.raises(ValueError, match="invalid regular expression"):
        LoraConfig(rank=4, alpha=8.0, targets="(")


# ------------------------------------------------------------------------------ forward: fresh, off, merge


def test_fresh_adapter_changes_nothing_and_adapters_are_lora_params():
    base = create_model(CONFIG, rngs=nnx.Rngs(0))
    expected = np.asarray(base(TOKENS))
    model = attach_lora(create_model(CONFIG, rngs=nnx.Rngs(0)), LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), expected)  # B = 0
    adapter_state = nnx.state(model, nnx.LoRAParam)
    base_state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    assert len(jax.tree.leaves(adapter_state)) == 14  # A and B for 7 targets
    assert len(jax.tree.leaves(base_state)) == len(jax.tree.leaves(nnx.state(base, nnx.Param)))
    a = model.lora.q_proj_lora_a
    assert a.shape == (2, 32, 4) and model.lora.q_proj_lora_b.shape == (2, 4, 4, 8)
    assert model.lora.o_proj_lora_a.shape == (2, 4, 8, 4) and model.lora.o_proj_lora_b.shape == (2, 4, 32)
    assert float(jnp.abs(a[...]).max()) > 0
    # Σ over targets of L·r·(in + out): q 32+32, k 32+16, v 32+16, o 32+32, gate/up 32+48, down 48+32
    assert count_adapter_parameters(model) == 2 * 4 * (64 + 48 + 48 + 64 + 80 + 80 + 80)


def test_adapters_off_equals_base_bit_for_bit_eager_and_jit():
    base = create_model(CONFIG, rngs=nnx.Rngs(0))
    model = tiny_lora_model()
    randomize_adapters(model, seed=2)
    forward = nnx.jit(lambda m, t: m(t))
    on = np.asarray(model(TOKENS))
    assert np.abs(on - np.asarray(base(TOKENS))).max() > 1e-3  # the adapters do act
    with adapters_disabled(model):
        np.testing.assert_array_equal(np.asarray(model(TOKENS)), np.asarray(base(TOKENS)))
        np.testing.assert_array_equal(np.asarray(forward(model, TOKENS)), np.asarray(forward(base, TOKENS)))
    assert model.lora.enabled
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), on)

    @nnx.jit
    def policy_and_reference(m, t):  # as a training step would: both passes in one program
        with adapters_disabled(m):
            reference = m(t)
        return m(t), reference

    policy, reference = policy_and_reference(model, TOKENS)
    np.testing.assert_array_equal(np.asarray(reference), np.asarray(forward(base, TOKENS)))
    np.testing.assert_allclose(np.asarray(policy), on, atol=1e-5)


def test_bfloat16_compute_with_float32_adapters():
    base = create_model(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    model = create_model(CONFIG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    attach_lora(model, LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    randomize_adapters(model, seed=10, std=0.1)
    assert model.lora.q_proj_lora_a[...].dtype == jnp.float32
    with adapters_disabled(model):
        np.testing.assert_array_equal(np.asarray(model(TOKENS)), np.asarray(base(TOKENS)))
    f32 = tiny_lora_model()
    nnx.update(f32.lora, nnx.state(model.lora))
    np.testing.assert_allclose(np.asarray(model(TOKENS)), np.asarray(f32(TOKENS)), atol=0.1)
    assert np.abs(np.asarray(model(TOKENS)) - np.asarray(base(TOKENS))).max() > 0.1


def test_adapter_equals_closed_form_on_one_projection():
    """Only v_proj adapted: the model equals the base with v_proj replaced by W + s·A·B (s = alpha / r)."""
    model = tiny_lora_model(targets=("v_proj",), rank=2, alpha=6.0)
    randomize_adapters(model, seed=3)
    a, b = np.asarray(model.lora.v_proj_lora_a[...]), np.asarray(model.lora.v_proj_lora_b[...])
    w = np.asarray(model.layers.v_proj[...])
    by_hand = create_model(CONFIG, rngs=nnx.Rngs(0))
    by_hand.layers.v_proj[...] = jnp.asarray(w + 3.0 * np.einsum("ldr,lrkh->ldkh", a, b))
    np.testing.assert_allclose(np.asarray(model(TOKENS)), np.asarray(by_hand(TOKENS)), atol=1e-5)


def test_merge_equals_adapted_model_and_leaves_it_unchanged():
    model = tiny_lora_model(rank=4, alpha=16.0)
    randomize_adapters(model, seed=4)
    before = np.asarray(model(TOKENS))
    merged = merge_lora(model)
    assert getattr(merged, "lora", None) is None
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    np.testing.assert_allclose(np.asarray(merged(TOKENS)), before, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), before)


# ----------------------------------------------------------------------------------------------- gradients


def test_adapter_gradients_equal_projected_full_gradient():
    """dL/dA = s·(dL/dW)·Bᵀ and dL/dB = s·Aᵀ·(dL/dW), with dL/dW the full model's gradient at W + s·A·B."""
    scale = 2.0
    model = tiny_lora_model(rank=4, alpha=4 * scale)
    randomize_adapters(model, seed=5)
    targets = np.random.default_rng(1).normal(size=(2, 7, 64)).astype(np.float32)

    def loss(m):
        return jnp.mean((m(TOKENS) - targets) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    assert not jax.tree.leaves(nnx.state(grads, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    merged = merge_lora(model)
    full = nnx.grad(loss)(merged)
    for name in model.lora.targets:
        a, b = (np.asarray(v[...]) for v in model.lora.factors(name))
        g = np.asarray(getattr(full.layers, name)[...])  # [L, *in, *out]
        nl, rank = a.shape[0], a.shape[-1]
        a2, b2 = a.reshape(nl, -1, rank), b.reshape(nl, rank, -1)
        g2 = g.reshape(nl, a2.shape[1], b2.shape[2])
        expected_a = scale * g2 @ b2.transpose(0, 2, 1)
        expected_b = scale * a2.transpose(0, 2, 1) @ g2
        assert np.abs(expected_a).max() > 1e-5 and np.abs(expected_b).max() > 1e-5
        grad_a, grad_b = (np.asarray(grads["lora"][f"{name}_lora_{ab}"][...]) for ab in "ab")
        chex.assert_trees_all_close(grad_a.reshape(expected_a.shape), expected_a, atol=1e-6, rtol=1e-4)
        chex.assert_trees_all_close(grad_b.reshape(expected_b.shape), expected_b, atol=1e-6, rtol=1e-4)


def test_remat_gives_same_logits_and_adapter_gradients():
    plain = tiny_lora_model()
    randomize_adapters(plain, seed=6)
    remat_model = create_model(dataclasses.replace(CONFIG, remat="full"), rngs=nnx.Rngs(0))
    attach_lora(remat_model, LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    nnx.update(remat_model.lora, nnx.state(plain.lora))
    loss = lambda m: jnp.mean(m(TOKENS) ** 2)  # noqa: E731
    diff = nnx.DiffState(0, nnx.LoRAParam)
    g_plain = nnx.state(nnx.grad(loss, argnums=diff)(plain), nnx.LoRAParam)
    g_remat = nnx.state(nnx.grad(loss, argnums=diff)(remat_model), nnx.LoRAParam)
    chex.assert_trees_all_close(g_plain, g_remat, atol=1e-7, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(remat_model(TOKENS)), np.asarray(plain(TOKENS)), atol=1e-6)


def test_generation_samples_from_base_plus_adapters():
    """The KV-cache path runs the adapters too: sampled tokens' log-probs equal a full forward pass of the adapted
    model (and not the base's)."""
    model = tiny_lora_model()
    randomize_adapters(model, seed=9, std=0.3)
    prompt, mask = jnp.asarray(TOKENS), jnp.ones(TOKENS.shape, bool)
    out = generate(model, prompt, mask, max_new_tokens=5, temperature=1.0, rng=jax.random.key(0))
    full = jnp.concatenate([prompt, out.tokens], axis=1)
    forward = nnx.jit(token_logps)
    adapted = np.asarray(forward(model, full))[:, TOKENS.shape[1] :]
    np.testing.assert_allclose(np.asarray(out.logps), adapted, atol=1e-4)
    with adapters_disabled(model):
        base = np.asarray(forward(model, full))[:, TOKENS.shape[1] :]
    assert np.abs(base - adapted).max() > 1e-2


# ------------------------------------------------------------------------------------------------ sharding


def test_adapters_sharded_like_the_weights_they_adapt(tmp_path):
    mesh = make_mesh((2, 2, 2))
    model = create_model(CONFIG, rngs=nnx.Rngs(0), mesh=mesh)
    attach_lora(model, LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1), mesh=mesh)
    P = jax.sharding.PartitionSpec
    assert model.layers.gate_proj[...].sharding.spec == P(None, "fsdp", "tensor")
    assert model.lora.gate_proj_lora_a[...].sharding.spec == P(None, "fsdp", None)  # A by the input axis
    assert model.lora.gate_proj_lora_b[...].sharding.spec == P(None, None, "tensor")  # B by the output axis
    assert model.lora.down_proj_lora_a[...].sharding.spec == P(None, "tensor", None)
    assert model.lora.down_proj_lora_b[...].sharding.spec == P(None, None, "fsdp")
    assert model.lora.q_proj_lora_b[...].sharding.spec == P(None, None, "tensor", None)
    assert model.lora.o_proj_lora_a[...].sharding.spec == P(None, "tensor", None, None)
    randomize_adapters(model, seed=7)
    merged = merge_lora(model)
    assert merged.layers.gate_proj[...].sharding.spec == P(None, "fsdp", "tensor")
    plain = tiny_lora_model()
    nnx.update(plain.lora, jax.device_get(nnx.state(model.lora)))
    np.testing.assert_allclose(
        np.asarray(nnx.jit(lambda m, t: m(t))(model, TOKENS)), np.asarray(plain(TOKENS)), atol=1e-5
    )
    # a PEFT adapter loaded onto a sharded model lands in the same shardings
    save_peft_adapter(plain, tmp_path, base_model_name_or_path="tiny")
    loaded = load_peft_adapter(create_model(CONFIG, rngs=nnx.Rngs(0), mesh=mesh), tmp_path, mesh=mesh)
    assert loaded.lora.up_proj_lora_b[...].sharding.spec == P(None, None, "tensor")
    np.testing.assert_array_equal(
        np.asarray(loaded.lora.up_proj_lora_b[...]), np.asarray(plain.lora.up_proj_lora_b[...])
    )


# ---------------------------------------------------------------------------------------- PEFT in and out

PEFT_CASES = {
    "llama": lambda d: make_tiny_llama(d),
    "gemma2": lambda d: make_tiny_gemma(d, version=2, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
}
HF_TOKENS = np.random.default_rng(2).integers(3, 256, size=(2, 9)).astype(np.int64)


@pytest.fixture(scope="module", params=sorted(PEFT_CASES))
def checkpoint(request, tmp_path_factory):
    return PEFT_CASES[request.param](tmp_path_factory.mktemp(request.param))


def test_saved_adapter_loads_in_peft_with_equal_logits(checkpoint, tmp_path):
    import peft

    model, model_config = load_hf(checkpoint)
    attach_lora(model, LoraConfig(rank=4, alpha=8.0, targets=r".*\.(q_proj|v_proj|o_proj|down_proj)"), rngs=nnx.Rngs(3))
    randomize_adapters(model, seed=8, std=0.1)
    ours = np.asarray(model(jnp.asarray(HF_TOKENS, jnp.int32)))
    out = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(checkpoint))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == (
        "LORA",
        "CAUSAL_LM",
        4,
        8.0,
    )
    assert config["target_modules"] == ["q_proj", "v_proj", "o_proj", "down_proj"]
    peft_model = peft.PeftModel.from_pretrained(load_torch_model(checkpoint), str(out)).eval()
    theirs = hf_logits(peft_model, HF_TOKENS)
    assert np.abs(theirs - hf_logits(checkpoint, HF_TOKENS)).max() > 1e-2  # the adapter was applied
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
    # the merged model exported with save_hf is the same function in transformers
    merged_dir = save_hf(merge_lora(model), model_config, tmp_path / "merged")
    np.testing.assert_allclose(hf_logits(merged_dir, HF_TOKENS), theirs, atol=TOL, rtol=0)


def test_peft_adapter_loads_into_rpo_jax_with_equal_logits(checkpoint, tmp_path):
    import peft
    import torch

    torch.manual_seed(0)
    peft_config = peft.LoraConfig(
        r=3,
        lora_alpha=12,
        target_modules=["k_proj", "gate_proj", "up_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )  # random non-zero B
    peft_model = peft.get_peft_model(load_torch_model(checkpoint), peft_config).eval()
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    theirs = hf_logits(peft_model, HF_TOKENS)
    model, _ = load_hf(checkpoint)
    load_peft_adapter(model, tmp_path / "adapter")
    assert model.lora.targets == ("k_proj", "gate_proj", "up_proj") and model.lora.config.scale == 4.0
    assert float(jnp.abs(model.lora.up_proj_lora_b[...]).max()) > 0
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(HF_TOKENS, jnp.int32))), theirs, atol=TOL, rtol=0)
    # and back out: the saved tensors are PEFT's own, unchanged
    from safetensors.numpy import load_file

    again = save_peft_adapter(model, tmp_path / "again", base_model_name_or_path=str(checkpoint))
    original, ours = (
        load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")),
        load_file(str(again / "adapter_model.safetensors")),
    )
    assert sorted(original) == sorted(ours)
    for key in original:
        np.testing.assert_array_equal(ours[key], original[key])


def test_bad_peft_adapter_is_a_clear_error(tmp_path):
    model = create_model(CONFIG, rngs=nnx.Rngs(0))
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True})
    )
    with pytest.raises(ValueError, match=r"adapter_config.json: field 'use_dora' = True is not supported"):
        load_peft_adapter(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    )
    from safetensors.numpy import save_file

    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 32), np.float32)},
        str(tmp_path / "adapter_model.safetensors"),
    )
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: tensor .*layers.0.self_attn.q_proj.lora_B"):
        load_peft_adapter(model, tmp_path)
    assert getattr(model, "lora", None) is None  # a failed load leaves the model as it was
