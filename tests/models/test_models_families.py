"""Qwen2 / Qwen2.5, Qwen3 and Mistral against transformers (PyTorch, eager attention, float32) on tiny random
checkpoints, one per family × switch: logits, greedy generation with left padding, save_hf round trip (bit-exact
tensors in transformers), reward-model scores; plus the sliding-window ring-buffer cache and the speed paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rpo_jax.models import generate, load_hf, load_reward_model, make_mesh, save_hf, save_reward_model
from rpo_jax.models.config import FULL_ATTENTION, SLIDING_ATTENTION
from rpo_jax.models.generate import init_caches, ring_slots
from rpo_jax.models.logprobs import sequence_logps, token_logps
from tests.hf_fixtures import hf_logits, load_torch_model, make_tiny_family

TOL = 1e-4
T = 16  # longer than every sliding window below (4, 5)
NEW = 10
WINDOW = dict(use_sliding_window=True, sliding_window=4)

# name → (family, config overrides, switches the case must exercise: checked on the loaded ModelConfig)
CASES = {
    "qwen2_bias_untied_gqa": ("qwen2", {}, dict(qkv_bias=True, tie_word_embeddings=False, num_kv_heads=2)),
    "qwen2_tied_windowed_mqa": (
        "qwen2",
        dict(tie_word_embeddings=True, num_key_value_heads=1, num_hidden_layers=3, max_window_layers=1, **WINDOW),
        dict(
            qkv_bias=True,
            tie_word_embeddings=True,
            num_kv_heads=1,
            sliding_window=4,
            layer_types=(FULL_ATTENTION, SLIDING_ATTENTION, SLIDING_ATTENTION),
        ),
    ),
    "qwen2_head_dim": ("qwen2", dict(head_dim=24), dict(qkv_bias=True, head_dim=24)),
    "qwen3_qknorm_head_dim_gqa": ("qwen3", {}, dict(qk_norm=True, qkv_bias=False, head_dim=24, num_kv_heads=2)),
    "qwen3_tied_windowed_mqa": (
        "qwen3",
        dict(
            tie_word_embeddings=True,
            num_key_value_heads=1,
            max_window_layers=0,
            sliding_window=5,
            use_sliding_window=True,
        ),
        dict(
            qk_norm=True,
            tie_word_embeddings=True,
            num_kv_heads=1,
            sliding_window=5,
            layer_types=(SLIDING_ATTENTION,) * 2,
        ),
    ),
    "mistral_windowed_gqa": (
        "mistral",
        dict(sliding_window=4),
        dict(sliding_window=4, layer_types=(SLIDING_ATTENTION,) * 2, num_kv_heads=2, qkv_bias=False, qk_norm=False),
    ),
    "mistral_tied_mqa_head_dim": (
        "mistral",
        dict(tie_word_embeddings=True, num_key_value_heads=1, head_dim=24),
        dict(
            tie_word_embeddings=True,
            num_kv_heads=1,
            head_dim=24,
            sliding_window=None,
            layer_types=(FULL_ATTENTION,) * 2,
        ),
    ),
}
WINDOWED = [name for name, (_, overrides, _) in CASES.items() if "sliding_window" in overrides]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name → checkpoint directory, built lazily once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            family, overrides, _ = CASES[name]
            cache[name] = make_tiny_family(tmp_path_factory.mktemp(name), family, **overrides)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def tokens():
    return np.random.RandomState(0).randint(3, 250, size=(2, T)).astype(np.int32)


def _left_pad(prompts, t):
    tokens = np.zeros((len(prompts), t), np.int32)
    mask = np.zeros((len(prompts), t), bool)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p) :], mask[i, t - len(p) :] = p, True
    return tokens, mask


def _torch_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(CASES))
def test_family_matches_transformers(name, checkpoints, tokens, tmp_path):
    """Logits ≤ 1e-4, greedy left-padded generation token for token, and save_hf → transformers bit-exact."""
    import torch

    path = checkpoints(name)
    model, config = load_hf(path)
    for field, value in CASES[name][2].items():  # the switch under test is really on
        assert getattr(config, field) == value, field
    torch_model = load_torch_model(path)
    assert config.num_params() == sum(p.numel() for p in torch_model.parameters())  # biases and tying counted

    # logits in float32
    ours = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, hf_logits(torch_model, tokens), atol=TOL, rtol=0)

    # greedy generation, left-padded batch (prompt lengths 9 > every window, 5, 3), against transformers'
    # generate on the same left-padded batch
    rng = np.random.RandomState(1)
    prompt_tokens, prompt_mask = _left_pad([rng.randint(3, 250, n) for n in (9, 5, 3)], 9)
    out = generate(model, prompt_tokens, prompt_mask, max_new_tokens=NEW, temperature=0.0)
    with torch.no_grad():
        ref = torch_model.generate(
            torch.as_tensor(prompt_tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(prompt_mask, dtype=torch.long),
            max_new_tokens=NEW,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, 9:].numpy()
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)

    # save_hf → transformers: the same tensors bit for bit, the same switches, the same logits
    exported = load_torch_model(save_hf(model, config, tmp_path / "export"))
    original, reloaded = _torch_state(torch_model), _torch_state(exported)
    assert sorted(reloaded) == sorted(original)
    for key, value in original.items():
        assert reloaded[key].dtype == value.dtype and torch.equal(reloaded[key], value), key
    for field in ("layer_types", "sliding_window", "tie_word_embeddings", "num_key_value_heads"):
        assert getattr(exported.config, field, None) == getattr(torch_model.config, field, None), field
    head_dims = {m.model.layers[0].self_attn.head_dim for m in (exported, torch_model)}
    assert head_dims == {config.head_dim}  # (a Qwen2 config.json without head_dim now states it)
    np.testing.assert_array_equal(hf_logits(exported, tokens), hf_logits(torch_model, tokens))
    assert load_hf(tmp_path / "export")[1] == config


@pytest.mark.parametrize("name", WINDOWED)
def test_windows_are_shorter_than_the_sequence_and_change_the_logits(name, checkpoints, tokens):
    """Guards the windowed cases: the same weights with full attention everywhere give other logits."""
    path = checkpoints(name)
    model, config = load_hf(path)
    assert config.sliding_window < T
    rope = ((FULL_ATTENTION, config.rope_by_type[SLIDING_ATTENTION]),)
    full, _ = load_hf(path, layer_types=(FULL_ATTENTION,) * config.num_layers, sliding_window=None, rope=rope)
    diff = np.abs(np.asarray(model(jnp.asarray(tokens))) - np.asarray(full(jnp.asarray(tokens)))).max()
    assert diff > 1e-2


def test_ring_slots_closed_form():
    # after writing token slot 9 into a ring of 4: slots 8, 9 (r = 0, 1), then 6, 7 (r = 2, 3)
    np.testing.assert_array_equal(np.asarray(ring_slots(jnp.int32(9), 4)), [8, 9, 6, 7])
    # slot 1 into a ring of 4: slots 0, 1 written, r = 2, 3 never (negative)
    np.testing.assert_array_equal(np.asarray(ring_slots(jnp.int32(1), 4)), [0, 1, -2, -1])


def test_sliding_layers_keep_a_ring_of_window_slots_and_decode_exactly(checkpoints):
    """The mixed Qwen2 case: the full layer caches T + M slots, the two sliding layers `window`; every
    generated token's log-prob equals the forward pass's on the whole sequence (not only the argmax)."""
    model, config = load_hf(checkpoints("qwen2_tied_windowed_mqa"))
    rng = np.random.RandomState(2)
    tokens, mask = _left_pad([rng.randint(3, 250, n) for n in (9, 2)], 9)
    n, t = tokens.shape
    kv = jnp.zeros((config.num_layers, n, t, config.num_kv_heads, config.head_dim))
    caches, valid = init_caches(config, (kv, kv), jnp.asarray(mask), NEW)
    assert caches[FULL_ATTENTION][0].shape == (1, n, t + NEW, 1, config.head_dim)
    assert caches[SLIDING_ATTENTION][0].shape == (2, n, config.sliding_window, 1, config.head_dim)
    # ring after slots 0..8 holds slots 8, 5, 6, 7; row 1's real tokens are slots 7 and 8 only
    np.testing.assert_array_equal(np.asarray(valid[SLIDING_ATTENTION]), [[1, 1, 1, 1], [1, 0, 0, 1]])

    out = generate(model, tokens, mask, max_new_tokens=NEW, temperature=0.7, rng=jax.random.key(3))
    full_tokens = jnp.concatenate([jnp.asarray(tokens), out.tokens], axis=1)
    full_mask = jnp.concatenate([jnp.asarray(mask), out.mask], axis=1)
    forward = token_logps(model, full_tokens, attention_mask=full_mask)[:, t:]
    np.testing.assert_allclose(np.asarray(out.logps), np.asarray(forward), atol=1e-5, rtol=0)


def test_speed_paths_and_sharding_unchanged_for_a_windowed_qwen2(checkpoints, tokens):
    """Score window + vocabulary chunks + remat + scan unroll + bf16 storage + a (data, fsdp, tensor) mesh on the
    windowed Qwen2: same log-probs as the plain path."""
    path = checkpoints("qwen2_tied_windowed_mqa")
    model, _ = load_hf(path)
    toks = jnp.asarray(tokens)
    loss_mask = jnp.zeros_like(toks).at[:, 10:].set(1)
    plain, count = sequence_logps(model, toks, loss_mask)
    fast, _ = load_hf(path, remat="full", scan_unroll=2)
    windowed, count2 = sequence_logps(fast, toks, loss_mask, score_window=8, vocab_chunk_size=64)
    np.testing.assert_allclose(np.asarray(windowed), np.asarray(plain), atol=1e-4, rtol=0)
    assert (np.asarray(count) == np.asarray(count2)).all() and int(count[0]) == 6
    grads = nnx.grad(lambda m: sequence_logps(m, toks, loss_mask)[0].sum())(fast)
    assert (
        np.isfinite(np.asarray(grads.layers.q_bias[...])).all() and float(jnp.abs(grads.layers.q_bias[...]).max()) > 0
    )

    mesh = make_mesh((2, 2, 2))
    sharded, _ = load_hf(path, mesh=mesh)
    assert sharded.layers.q_bias[...].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
    with jax.set_mesh(mesh):
        logits = nnx.jit(lambda m, t: m(t))(sharded, toks)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(toks)), atol=1e-5, rtol=0)

    bf16, _ = load_hf(path, dtype=jnp.bfloat16)
    assert bf16.layers.q_bias[...].dtype == jnp.bfloat16
    err = np.abs(np.asarray(bf16(toks)) - np.asarray(model(toks))).max()
    assert 0 < err < 0.1


# ----------------------------------------------------------------------------------------------- reward models

REWARD_CASES = {
    "qwen2_windowed": ("qwen2", dict(num_hidden_layers=3, max_window_layers=1, **WINDOW), 2),
    "qwen3": ("qwen3", {}, 1),
    "mistral_windowed": ("mistral", dict(sliding_window=4), 1),
}


def _hf_scores(model, tokens, mask):
    import torch

    with torch.no_grad():
        return (
            model(
                input_ids=torch.as_tensor(tokens, dtype=torch.long),
                attention_mask=torch.as_tensor(mask, dtype=torch.long),
            )
            .logits.float()
            .numpy()
        )


@pytest.mark.parametrize("name", list(REWARD_CASES))
def test_reward_model_scores_and_round_trip(name, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    family, overrides, num_labels = REWARD_CASES[name]
    path = make_tiny_family(tmp_path / name, family, task="sequence_classification", num_labels=num_labels, **overrides)
    load = lambda p: AutoModelForSequenceClassification.from_pretrained(  # noqa: E731
        str(p), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    theirs = load(path)
    model, config = load_reward_model(path)
    assert model.num_labels == num_labels and config.pad_token_id == 0
    rng = np.random.RandomState(4)
    rows = [rng.randint(3, 250, n) for n in (12, 5, 9)]
    right = (
        np.stack([np.concatenate([r, np.zeros(12 - len(r), np.int64)]) for r in rows]).astype(np.int32),
        np.stack([np.arange(12) < len(r) for r in rows]),
    )
    for tokens, mask in (_left_pad(rows, 12), right):
        np.testing.assert_allclose(np.asarray(model(tokens, mask)), _hf_scores(theirs, tokens, mask), atol=TOL, rtol=0)
    exported = load(save_reward_model(model, config, tmp_path / "export"))
    original, reloaded = _torch_state(theirs), _torch_state(exported)
    assert sorted(reloaded) == sorted(original)
    for key, value in original.items():
        assert torch.equal(reloaded[key], value), key


# ----------------------------------------------------------------------------------------------- bad configs


def test_unsupported_or_contradictory_family_configs_are_named(checkpoints, tmp_path):
    from tests.hf_fixtures import copy_checkpoint, edit_config

    qwen3 = copy_checkpoint(checkpoints("qwen3_qknorm_head_dim_gqa"), tmp_path / "q3")
    edit_config(qwen3, attention_bias=True)
    with pytest.raises(ValueError, match=r"q3/config\.json: attention_bias=True is not supported"):
        load_hf(qwen3)
    mistral = copy_checkpoint(checkpoints("mistral_windowed_gqa"), tmp_path / "m")
    edit_config(mistral, layer_types=[FULL_ATTENTION, SLIDING_ATTENTION])
    with pytest.raises(ValueError, match=r"m/config\.json: layer_types=.*disagrees with sliding_window=4"):
        load_hf(mistral)
    # Qwen2 layer types that name sliding layers while use_sliding_window=False (transformers then has no window)
    qwen2 = copy_checkpoint(checkpoints("qwen2_bias_untied_gqa"), tmp_path / "q2")
    edit_config(qwen2, layer_types=[FULL_ATTENTION, SLIDING_ATTENTION], use_sliding_window=False)
    with pytest.raises(ValueError, match=r"q2/config\.json: sliding_attention layers need a positive sliding_window"):
        load_hf(qwen2)
