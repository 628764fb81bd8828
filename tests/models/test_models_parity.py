"""Logits parity with transformers (PyTorch, eager attention, float32) on tiny random checkpoints, one per
feature, plus config formats, sharded / bf16 safetensors and the load → save_hf → transformers round trip."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rpo_jax.models import load_hf, save_hf
from tests.hf_fixtures import hf_logits, load_torch_model, make_tiny_gemma, make_tiny_llama, rewrite_config_t4

TOL = 1e-4
T = 16  # longer than every sliding window used below (4)

LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)

# name → builder(out_dir). Each exercises one feature against transformers.
CASES = {
    "llama_untied_gqa": lambda d: make_tiny_llama(d),
    "llama_linear_rope": lambda d: make_tiny_llama(
        d, rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=4.0)
    ),
    "llama3_rope_tied": lambda d: make_tiny_llama(d, tie_word_embeddings=True, rope_parameters=dict(LLAMA3_ROPE)),
    "llama_mqa": lambda d: make_tiny_llama(d, num_key_value_heads=1),
    "llama_head_dim_not_d_over_h": lambda d: make_tiny_llama(d, head_dim=24),
    "gemma1": lambda d: make_tiny_gemma(d, version=1),
    "gemma2_softcaps_sliding": lambda d: make_tiny_gemma(
        d, version=2, attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=4
    ),
    "gemma3_pattern_qknorm": lambda d: make_tiny_gemma(
        d,
        version=3,
        num_hidden_layers=6,
        sliding_window=4,
        final_logit_softcapping=5.0,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        },
    ),
    "gemma3_multimodal_text_tower": lambda d: make_tiny_gemma(
        d, version=3, multimodal=True, num_hidden_layers=6, sliding_window=4
    ),
}


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.RandomState(0)
    return rng.randint(3, 250, size=(2, T)).astype(np.int32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Built lazily and cached for the module: name → directory."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = CASES[name](tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def _max_diff(model, tokens, reference):
    out = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
    assert out.shape == reference.shape
    return float(np.abs(out - reference).max())


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, checkpoints, tokens):
    path = checkpoints(name)
    reference = hf_logits(path, tokens)
    model, config = load_hf(path)
    assert _max_diff(model, tokens, reference) <= TOL


def test_features_are_really_exercised(checkpoints):
    """Guards the parity cases above against silently testing the default path."""
    _, c = load_hf(checkpoints("gemma3_pattern_qknorm"))
    assert c.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert c.qk_norm and c.sandwich_norms and c.sliding_window == 4 < T
    assert c.rope_by_type["sliding_attention"].theta == 100.0
    assert c.rope_by_type["full_attention"].rope_type == "linear"
    _, c = load_hf(checkpoints("gemma2_softcaps_sliding"))
    assert c.attn_logit_softcap == 2.0 and c.final_logit_softcap == 3.0 and c.query_pre_attn_scalar == 24
    assert c.layer_types == ("sliding_attention", "full_attention")
    _, c = load_hf(checkpoints("llama_head_dim_not_d_over_h"))
    assert c.head_dim == 24 != c.hidden_size // c.num_heads
    _, c = load_hf(checkpoints("llama3_rope_tied"))
    assert c.tie_word_embeddings and c.rope_by_type["full_attention"].rope_type == "llama3"
    _, c = load_hf(checkpoints("gemma1"))
    assert c.norm_plus_one and c.scale_embeddings and c.activation == "gelu_tanh" and c.tie_word_embeddings


@pytest.mark.parametrize("name", ["llama3_rope_tied", "llama_linear_rope", "gemma3_pattern_qknorm"])
def test_transformers4_config_format_gives_same_model(name, checkpoints, tokens, tmp_path):
    import shutil

    src = checkpoints(name)
    t4 = tmp_path / "t4"
    shutil.copytree(src, t4)
    cfg = rewrite_config_t4(t4)
    text = cfg.get("text_config", cfg)
    assert "rope_parameters" not in text and "rope_theta" in text
    _, config5 = load_hf(src)
    model4, config4 = load_hf(t4)
    assert config4 == config5
    assert _max_diff(model4, tokens, hf_logits(src, tokens)) <= TOL


def test_sharded_safetensors(tmp_path, tokens):
    path = make_tiny_llama(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, _ = load_hf(path)
    assert _max_diff(model, tokens, hf_logits(path, tokens)) <= TOL


def test_bf16_checkpoint(tmp_path, tokens):
    path = make_tiny_gemma(tmp_path / "bf16", version=2, dtype="bfloat16")
    header = json.loads((path / "config.json").read_text())
    assert header.get("dtype", header.get("torch_dtype")) == "bfloat16"
    # transformers upcasts the bf16 weights exactly to float32; so do we.
    model, _ = load_hf(path, dtype=jnp.float32)
    assert model.layers.q_proj[...].dtype == jnp.float32
    assert _max_diff(model, tokens, hf_logits(path, tokens)) <= TOL
    # Stored as bf16, computed in float32: same values (bf16 → f32 is exact).
    model_bf16, _ = load_hf(path, dtype=jnp.float32, param_dtype=jnp.bfloat16)
    assert model_bf16.layers.q_proj[...].dtype == jnp.bfloat16
    assert _max_diff(model_bf16, tokens, hf_logits(path, tokens)) <= TOL


@pytest.mark.parametrize(
    "name", ["llama_untied_gqa", "llama3_rope_tied", "gemma2_softcaps_sliding", "gemma3_multimodal_text_tower"]
)
def test_round_trip_through_save_hf(name, checkpoints, tokens, tmp_path):
    src = checkpoints(name)
    model, config = load_hf(src)
    out = save_hf(model, config, tmp_path / "export")
    reloaded = load_torch_model(out)
    exported = hf_logits(reloaded, tokens)
    original = hf_logits(src, tokens)
    np.testing.assert_array_equal(exported, original)
    # and our loader reads the export back to the same config
    _, config2 = load_hf(out)
    assert config2 == config


def test_num_params_matches_transformers(checkpoints):
    for name in ["llama_untied_gqa", "llama3_rope_tied", "gemma3_pattern_qknorm"]:
        path = checkpoints(name)
        model, config = load_hf(path)
        torch_model = load_torch_model(path)
        assert config.num_params() == sum(p.numel() for p in torch_model.parameters())
        ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
        assert ours == config.num_params()


@pytest.mark.parametrize("name", ["llama_untied_gqa", "gemma2_softcaps_sliding"])
def test_bfloat16_compute_is_as_accurate_as_transformers_bfloat16(name, checkpoints, tokens):
    """bf16 compute cannot match float32 to 1e-4; instead our bf16 error (vs transformers float32) must be no
    larger than twice transformers' own bf16 error."""
    import torch

    path = checkpoints(name)
    reference = hf_logits(path, tokens)
    torch_bf16 = load_torch_model(path).to(torch.bfloat16)
    with torch.no_grad():
        hf_bf16 = torch_bf16(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
    model, _ = load_hf(path, dtype=jnp.bfloat16)
    assert model.layers.q_proj[...].dtype == jnp.bfloat16
    ours = _max_diff(model, tokens, reference)
    theirs = float(np.abs(hf_bf16 - reference).max())
    assert 0 < ours <= 2 * theirs
