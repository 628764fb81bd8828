"""Model behaviour beyond parity: padding / packing invariance, sharding, sequence log-probs (chunked and not,
values and gradients), remat, random init and clear errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from flax import nnx

from rpo_jax.models import (
    DEFAULT_RULES,
    ModelConfig,
    RopeSpec,
    create_model,
    load_hf,
    logical_to_spec,
    make_mesh,
    token_logps_from_hidden,
)
from rpo_jax.models import sequence_logps as _sequence_logps
from rpo_jax.models import token_logps as _token_logps
from tests.hf_fixtures import make_tiny_gemma, make_tiny_llama

# jit once per shape (eager op-by-op dispatch of a whole model is slow on CPU)
token_logps = nnx.jit(_token_logps)
sequence_logps = nnx.jit(_sequence_logps, static_argnames=("vocab_chunk_size",))
_forward = nnx.jit(lambda m, t, a: m(t, attention_mask=a))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # vocab 250 and 3 kv heads: not divisible by tensor=2 (replicated fallback); hidden 48 divisible by 8.
    return make_tiny_llama(
        tmp_path_factory.mktemp("llama"),
        vocab_size=250,
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=3,
        intermediate_size=96,
    )


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    return make_tiny_gemma(
        tmp_path_factory.mktemp("gemma3"), version=3, num_hidden_layers=6, sliding_window=3, final_logit_softcapping=4.0
    )


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_hf(llama_dir)


@pytest.fixture(scope="module")
def gemma3(gemma3_dir):
    return load_hf(gemma3_dir)


def _seq(seed, n):
    return np.random.RandomState(seed).randint(3, 240, size=n).astype(np.int32)


# --------------------------------------------------------------------------------------- padding and packing


@pytest.mark.parametrize("which", ["llama", "gemma3"])
def test_left_right_padding_and_packing_match_unpadded(which, llama, gemma3):
    """Two sequences of 6 tokens: alone (unpadded), right-padded, left-padded and packed (+ padding) to 12 give
    the same per-token log-probs (each call passes mask and segment ids so one compiled function serves all)."""
    model, _ = llama if which == "llama" else gemma3
    a, b = _seq(1, 6), _seq(2, 6)

    def run(tokens, mask, segments):
        return np.asarray(
            token_logps(model, jnp.asarray(tokens), attention_mask=jnp.asarray(mask), segment_ids=jnp.asarray(segments))
        )

    alone = run(np.stack([a, b]), np.ones((2, 6), bool), np.ones((2, 6), np.int32))
    pad = np.zeros(6, np.int32)
    ones, zeros = np.ones(6, bool), np.zeros(6, bool)
    seg1 = np.ones((2, 12), np.int32)

    right = run(np.stack([np.r_[a, pad], np.r_[b, pad]]), np.stack([np.r_[ones, zeros]] * 2), seg1)
    np.testing.assert_allclose(right[:, :6], alone, atol=1e-5)

    left = run(np.stack([np.r_[pad, a], np.r_[pad, b]]), np.stack([np.r_[zeros, ones]] * 2), seg1)
    np.testing.assert_allclose(left[:, 7:], alone[:, 1:], atol=1e-5)  # token 0 of a sequence has no score

    # row 0: [a | b] packed; row 1: [b[:3] | a[:3] | pad*6] packed then padded (segment 0 = padding)
    packed = np.stack([np.r_[a, b], np.r_[b[:3], a[:3], pad]])
    mask = np.stack([np.r_[ones, ones], np.r_[ones, zeros]])
    segments = np.stack([np.r_[[1] * 6, [2] * 6], np.r_[[1] * 3, [2] * 3, [0] * 6]])
    lp = run(packed, mask, segments)
    np.testing.assert_allclose(lp[0, :6], alone[0], atol=1e-5)
    np.testing.assert_allclose(lp[0, 7:], alone[1, 1:], atol=1e-5)
    np.testing.assert_allclose(lp[1, :3], alone[1, :3], atol=1e-5)
    np.testing.assert_allclose(lp[1, 4:6], alone[0, 1:3], atol=1e-5)


# --------------------------------------------------------------------------------------- sharding


def test_partition_rules_and_non_divisible_fallback(llama):
    model, config = llama
    mesh = make_mesh((1, 4, 2))
    assert dict(DEFAULT_RULES)["embed"] == ("fsdp", "context") and dict(DEFAULT_RULES)["heads"] == "tensor"
    spec = logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 48, 6, 8), mesh)
    assert tuple(spec) == (None, "fsdp", "tensor", None)
    # 3 kv heads on tensor=2 and vocab 250 on tensor=2: replicated on that dimension only
    assert tuple(logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 48, 3, 8), mesh)) == (
        None,
        "fsdp",
        None,
        None,
    )
    assert tuple(logical_to_spec(("vocab", "embed"), (250, 48), make_mesh((1, 2, 4)))) == (None, "fsdp")


@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 4, 2)])
def test_sharded_load_matches_unsharded(shape, llama, llama_dir):
    model, _ = llama
    tokens = jnp.asarray(np.stack([_seq(3, 10), _seq(4, 10)] * 4))
    expected = np.asarray(_forward(model, tokens, None))
    mesh = make_mesh(shape)
    sharded, _ = load_hf(llama_dir, mesh=mesh)
    q = sharded.layers.q_proj[...]
    assert q.sharding.mesh.shape == mesh.shape
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape[1] == 48 // shape[1]
    with jax.set_mesh(mesh):
        logits = nnx.jit(lambda m, t: m(t))(sharded, tokens)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)


def test_create_model_sharded_equals_unsharded():
    config = ModelConfig(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    plain = create_model(config, rngs=nnx.Rngs(3))
    sharded = create_model(config, rngs=nnx.Rngs(3), mesh=make_mesh((2, 2, 2)))
    assert sharded.layers.gate_proj[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    for a, b in zip(jax.tree.leaves(nnx.state(plain)), jax.tree.leaves(nnx.state(sharded))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert config.num_params() == sum(x.size for x in jax.tree.leaves(nnx.state(plain)))


# --------------------------------------------------------------------------------------- log-probs


def _direct_logps(model, tokens, loss_mask, attention_mask=None):
    """Σ mask · log_softmax(logits[t-1])[tokens[t]] with numpy from the model's logits."""
    logits = np.asarray(_forward(model, jnp.asarray(tokens), attention_mask), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    lp = np.take_along_axis(logits[:, :-1], tokens[:, 1:, None], -1)[..., 0] - logz[:, :-1]
    return (lp * loss_mask[:, 1:]).sum(-1), loss_mask[:, 1:].sum(-1)


@pytest.mark.parametrize(("which", "chunk"), [("llama", None), ("llama", 100), ("gemma3", None), ("gemma3", 64)])
def test_sequence_logps_equals_log_softmax_gather(which, chunk, llama, gemma3):
    """V=250 with C=100 (zero-padded last chunk) and V=256 with C=64 (Gemma 3 final soft-cap per chunk)."""
    model, _ = llama if which == "llama" else gemma3
    tokens = np.stack([_seq(5, 11), _seq(6, 11)])
    loss_mask = np.zeros_like(tokens, bool)
    loss_mask[0, 4:9], loss_mask[1, 2:] = True, True
    attn = np.ones_like(tokens, bool)
    attn[0, 9:] = False
    expected, count = _direct_logps(model, tokens, loss_mask, jnp.asarray(attn))
    got, got_count = sequence_logps(
        model, jnp.asarray(tokens), jnp.asarray(loss_mask), attention_mask=jnp.asarray(attn), vocab_chunk_size=chunk
    )
    assert got.dtype == jnp.float32 and got_count.dtype == jnp.int32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(got_count), count)


def test_chunked_gradients_equal_unchunked(gemma3):
    """Whole-model gradients (tied embedding, final soft-cap): chunked (C=48, padded last chunk) = unchunked."""
    model, _ = gemma3
    tokens = jnp.asarray(np.stack([_seq(7, 9), _seq(8, 9)]))
    loss_mask = jnp.ones(tokens.shape, bool)
    weights = jnp.asarray([0.7, -1.3])

    def loss(m, chunk):
        s, _ = sequence_logps(m, tokens, loss_mask, vocab_chunk_size=chunk)
        return jnp.sum(weights * s)

    grads = nnx.jit(lambda m: (nnx.grad(lambda m: loss(m, None))(m), nnx.grad(lambda m: loss(m, 48))(m)))
    g_full, g_chunk = grads(model)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_chunk)):
        # float32: the two paths sum exp(z) in different orders, so compare relative to the gradient's scale
        scale = float(np.abs(np.asarray(a)).max())
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("cap", [None, 3.0])
def test_chunked_logps_gradients_numerically(cap):
    """check_grads (finite differences) on the chunked log-softmax w.r.t. hidden states and the matrix."""
    rng = np.random.RandomState(0)
    hidden = jnp.asarray(rng.normal(size=(2, 3, 5)))
    w = jnp.asarray(rng.normal(size=(11, 5)))
    targets = jnp.asarray(rng.randint(0, 11, size=(2, 3)))
    with jax.enable_x64(True):
        hidden, w = hidden.astype(jnp.float64), w.astype(jnp.float64)
        f = lambda h, w: token_logps_from_hidden(h, w, targets, final_logit_softcap=cap, vocab_chunk_size=4)  # noqa
        jax.test_util.check_grads(f, (hidden, w), order=1, modes=("rev",), atol=1e-4, rtol=1e-4)
        full = token_logps_from_hidden(hidden, w, targets, final_logit_softcap=cap)
        np.testing.assert_allclose(np.asarray(f(hidden, w)), np.asarray(full), rtol=1e-6)
        # closed form: z_target - log Σ exp z
        z = np.asarray(hidden) @ np.asarray(w).T
        z = z if cap is None else cap * np.tanh(z / cap)
        closed = np.take_along_axis(z, np.asarray(targets)[..., None], -1)[..., 0] - np.log(np.exp(z).sum(-1))
        np.testing.assert_allclose(np.asarray(full), closed, rtol=1e-6)


def test_remat_policies_keep_values_and_gradients(llama_dir):
    tokens = jnp.asarray(np.stack([_seq(9, 8)]))
    mask = jnp.ones(tokens.shape, bool)
    grads = {}
    for policy, unroll in [("none", 1), ("full", 2)]:
        model, config = load_hf(llama_dir, remat=policy, scan_unroll=unroll)
        assert config.remat == policy and config.scan_unroll == unroll
        grads[policy] = nnx.jit(nnx.grad(lambda m: _sequence_logps(m, tokens, mask)[0].sum()))(model)
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads["full"])):
        # recomputation may fuse float32 ops differently: compare relative to the gradient's scale
        scale = float(np.abs(np.asarray(a)).max())
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * scale)


def test_large_logits_are_chunked_automatically():
    """`vocab_chunk_size=None` keeps one log-softmax below `AUTO_CHUNK_LOGITS_BYTES` of float32 logits (bit for bit
    the unchunked path: small runs compute exactly what they did) and chunks by `AUTO_VOCAB_CHUNK` above it: the
    gradient's temporaries (XLA's memory analysis) are a few [N·T, C] arrays instead of two or more [N·T, V] ones,
    values and gradients equal to float32 rounding."""
    from rpo_jax.models.logprobs import AUTO_CHUNK_LOGITS_BYTES, AUTO_VOCAB_CHUNK, auto_vocab_chunk

    v, d = 4 * AUTO_VOCAB_CHUNK, 16
    big = AUTO_CHUNK_LOGITS_BYTES // (4 * v) + 1  # positions whose logits pass the limit
    assert auto_vocab_chunk(big, v) == AUTO_VOCAB_CHUNK and auto_vocab_chunk(big - 1, v) is None
    assert auto_vocab_chunk(10**9, AUTO_VOCAB_CHUNK) is None  # nothing to chunk
    rng = np.random.RandomState(0)
    w = jnp.asarray(rng.normal(size=(v, d)).astype(np.float32) / 4)

    def program(n, chunk):
        hidden = jnp.asarray(np.random.RandomState(n).normal(size=(1, n, d)).astype(np.float32))
        targets = jnp.asarray(np.random.RandomState(n + 1).randint(0, v, size=(1, n)))
        f = lambda h, w: token_logps_from_hidden(h, w, targets, vocab_chunk_size=chunk).sum()  # noqa: E731
        fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
        return fn, (hidden, w), fn.lower(hidden, w).compile().memory_analysis().temp_size_in_bytes

    small = 64
    auto, args, _ = program(small, None)
    off, _, _ = program(small, 0)
    for a, b in zip(jax.tree.leaves(auto(*args)), jax.tree.leaves(off(*args))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    auto, args, auto_temps = program(big, None)
    off, _, off_temps = program(big, 0)
    chunk_logits, all_logits = big * AUTO_VOCAB_CHUNK * 4, big * v * 4  # bytes of [N·T, C] and [N·T, V] float32
    assert auto_temps <= 5 * chunk_logits and off_temps >= 2 * all_logits  # here C = V / 4
    for a, b in zip(jax.tree.leaves(auto(*args)), jax.tree.leaves(off(*args))):
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)


def test_remat_saves_memory_whatever_the_scan_unroll():
    """An unrolled scan of rematerialised layers is scheduled as one block (every layer's recomputed activations
    alive together), so the model scans them one at a time whenever remat is on: XLA's memory analysis of the
    gradient gives the same temporaries for scan_unroll = 1 and = the depth, less than half those without remat."""
    from rpo_jax.models.model import scan_unroll

    layers, tokens = 8, jnp.zeros((4, 128), jnp.int32)

    def temporaries(remat, unroll):
        config = ModelConfig(
            model_type="llama",
            vocab_size=64,
            hidden_size=64,
            intermediate_size=256,
            num_layers=layers,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            remat=remat,
            scan_unroll=unroll,
        )
        assert scan_unroll(config) == (1 if remat != "none" else unroll)
        graphdef, state = nnx.split(create_model(config, rngs=nnx.Rngs(0)))
        fn = lambda s: _sequence_logps(nnx.merge(graphdef, s), tokens, jnp.ones(tokens.shape, bool))[0].sum()  # noqa
        return jax.jit(jax.grad(fn)).lower(state).compile().memory_analysis().temp_size_in_bytes

    full = temporaries("full", layers)
    assert full == temporaries("full", 1)
    assert 2 * full < temporaries("none", layers)


# --------------------------------------------------------------------------------------- errors


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_model_type(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "x")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mistral_x"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*model_type='mistral_x' is not supported"):
        load_hf(d)


def test_missing_and_unexpected_tensors_are_named(llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(llama_dir / "model.safetensors"))
    d = _copy(llama_dir, tmp_path / "missing")
    save_file(
        {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}, str(d / "model.safetensors")
    )
    with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        load_hf(d)
    d = _copy(llama_dir, tmp_path / "extra")
    save_file({**tensors, "model.layers.0.extra.weight": np.zeros(3, np.float32)}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model\.layers\.0\.extra\.weight'\]"):
        load_hf(d)


def test_shape_mismatch(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[96, 48\], "
        r"expected \[64, 48\]",
    ):
        load_hf(d)


def test_pickle_checkpoints_refused(llama_dir, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(llama_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"only safetensors.*pytorch_model\.bin"):
        load_hf(d)


def test_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf("./relative/nope")
    # a hub id is only tried when no such local path exists; offline it fails with the reason
    with pytest.raises(FileNotFoundError, match="could not be downloaded from the hub"):
        load_hf("rpo-jax-no-such-owner/no-such-model")


def test_unsupported_config_values(llama_dir, tmp_path):
    d = _copy(llama_dir, tmp_path / "yarn")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        load_hf(d)
    with pytest.raises(ValueError, match="remat"):
        ModelConfig(
            model_type="llama",
            vocab_size=8,
            hidden_size=8,
            intermediate_size=8,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            head_dim=4,
            remat="sometimes",
        )


def test_traced_program_size_is_flat_in_depth():
    """Layers are scanned: the traced program of a 2-layer and an 8-layer model has the same number of equations
    (so compile time does not grow with depth)."""

    def num_eqns(layers, remat):
        config = ModelConfig(
            model_type="gemma3_text",
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_layers=layers,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            norm_plus_one=True,
            sandwich_norms=True,
            qk_norm=True,
            sliding_window=4,
            remat=remat,
            layer_types=("sliding_attention",) * (layers - 1) + ("full_attention",),
            rope=(("full_attention", RopeSpec(theta=1e6)), ("sliding_attention", RopeSpec())),
        )
        model = create_model(config, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        tokens = jnp.zeros((1, 8), jnp.int32)
        fn = lambda s: _sequence_logps(nnx.merge(graphdef, s), tokens, jnp.ones((1, 8), bool))[0].sum()  # noqa
        return len(jax.make_jaxpr(jax.grad(fn))(state).jaxpr.eqns)

    assert num_eqns(2, "none") == num_eqns(8, "none")
    assert num_eqns(2, "full") == num_eqns(8, "full")


def test_save_hf_from_sharded_model(llama, llama_dir, tmp_path):
    from rpo_jax.models import save_hf

    model, config = llama
    sharded, _ = load_hf(llama_dir, mesh=make_mesh((1, 4, 2)))
    save_hf(sharded, config, tmp_path / "out")
    reloaded, config2 = load_hf(tmp_path / "out")
    assert config2 == config
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(reloaded))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
