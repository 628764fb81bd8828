"""Attention implementations (rpo_jax.models.attention) against the XLA reference path.

Splash attention (the TPU kernel) runs here in Pallas interpret mode on CPU: forward and gradients under causal,
padding, segment, sliding-window, soft-cap and grouped/multi-query masks, alone and inside the model. cuDNN cannot
run on CPU: its argument mapping is pinned by running `jax.nn.dot_product_attention` with the same arguments on
JAX's own XLA implementation, and the choice ("auto", explicit kernels, their one-line errors) by `resolve`.
The shared-prompt mask (`parent_ids`) is pinned against running each prompt + response on its own.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rpo_jax.models import ModelConfig, RopeSpec, attention, create_model, layers
from rpo_jax.models import sequence_logps as _sequence_logps

T = 128  # splash tiles are multiples of 128 (interpret mode checks it too)
SCALE = 0.3


def _qkv(seed, n, heads, kv_heads, hd=16, t=T):
    rng = np.random.default_rng(seed)
    draw = lambda h: jnp.asarray(rng.normal(size=(n, t, h, hd)), jnp.float32)  # noqa: E731
    return draw(heads), draw(kv_heads), draw(kv_heads)


def _spec(kind, n=2, t=T):
    """A MaskSpec per case: causal only, right/left padding, packed segments with padding."""
    slots = np.arange(t)[None, :]
    if kind == "causal":
        valid, seg = None, None
    elif kind == "right_pad":
        valid, seg = slots < np.array([[100], [t]]), None
    elif kind == "left_pad":
        valid, seg = slots >= np.array([[9], [40]]), None
    elif kind == "segments":  # three / two packed sequences, then padding
        valid = slots < np.array([[120], [90]])
        seg = (slots >= np.array([[30], [64]])).astype(np.int32) + (slots >= np.array([[77], [t]]))
    else:
        raise ValueError(kind)
    valid = None if valid is None else jnp.asarray(valid)
    seg = None if seg is None else jnp.asarray(seg, jnp.int32)
    positions = layers.default_positions(valid, seg, (n, t))
    return attention.MaskSpec(positions, valid, seg, None)


def _real(spec, x):
    """x [N,T,...] with padding query rows zeroed (their outputs are never read by a real token)."""
    if spec.valid is None:
        return x
    return jnp.where(spec.valid.reshape(spec.valid.shape + (1,) * (x.ndim - 2)), x, 0.0)


def _reference(q, k, v, spec, window, softcap):
    mask = attention.dense_mask(spec, window)
    return layers.dot_product_attention(q, k, v, mask, scale=SCALE, softcap=softcap)


SLOW = pytest.mark.slow  # interpret mode compiles a large program per case: the default run keeps three
CASES = [  # (mask, heads, kv heads, window, soft-cap)
    pytest.param("causal", 4, 4, None, None, marks=SLOW),
    pytest.param("right_pad", 4, 2, None, None, marks=SLOW),
    pytest.param("left_pad", 4, 1, None, None, marks=SLOW),  # multi-query
    pytest.param("segments", 4, 2, None, None, marks=SLOW),
    ("segments", 4, 2, 19, None),  # grouped-query, sliding window across segment boundaries
    ("right_pad", 2, 1, 7, 5.0),  # multi-query, window + Gemma 2 soft-cap
    pytest.param("segments", 6, 3, None, 2.0, marks=SLOW),
]


@pytest.mark.parametrize(("kind", "heads", "kv_heads", "window", "softcap"), CASES)
def test_splash_matches_xla_forward_and_gradients(kind, heads, kv_heads, window, softcap):
    """Splash (interpret mode) = the XLA path on every real query: outputs and ∂/∂q, ∂/∂k, ∂/∂v of a random
    linear functional of the real outputs."""
    spec = _spec(kind)
    q, k, v = _qkv(0, 2, heads, kv_heads)
    probe = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(_real(spec, fn(q, k, v)) * probe)

    splash = lambda q, k, v: attention.splash_attention(  # noqa: E731
        q, k, v, spec, window=window, scale=SCALE, softcap=softcap, interpret=True
    )
    xla = lambda q, k, v: _reference(q, k, v, spec, window, softcap)  # noqa: E731
    np.testing.assert_allclose(_real(spec, splash(q, k, v)), _real(spec, xla(q, k, v)), atol=2e-6, rtol=1e-5)
    got = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)


def test_splash_segment_ids_mark_padding():
    """Real tokens keep their segment id, padding keys get -1 (never a real segment)."""
    spec = _spec("segments")
    seg = np.asarray(attention.splash_segment_ids(spec))
    valid = np.asarray(spec.valid)
    np.testing.assert_array_equal(seg[valid], np.asarray(spec.segment_ids)[valid])
    assert (seg[~valid] == -1).all()


# ------------------------------------------------------------------------------------------------ cuDNN mapping
def _with_parents():
    """One row: prompt (segment 0, 5 tokens), response A (segment 1, 4), response B (segment 2, 3), padding; the
    responses continue the prompt (parent 0) with positions 5, 6, ...; a second row without sharing."""
    t = 16
    seg = np.array([[0] * 5 + [1] * 4 + [2] * 3 + [3] * 4, [0] * 10 + [1] * 6])
    parent = np.array([[0] * 5 + [0] * 4 + [0] * 3 + [3] * 4, [0] * 10 + [1] * 6])
    pos = np.array([list(range(5)) + [5, 6, 7, 8] + [5, 6, 7] + [0] * 4, list(range(10)) + list(range(6))])
    valid = np.array([[True] * 12 + [False] * 4, [True] * 16])
    return t, attention.MaskSpec(
        jnp.asarray(pos, jnp.int32), jnp.asarray(valid), jnp.asarray(seg, jnp.int32), jnp.asarray(parent, jnp.int32)
    )


@pytest.mark.parametrize(
    ("kind", "window"), [("causal", None), ("causal", 9), ("left_pad", None), ("segments", 19), ("parents", 3)]
)
def test_cudnn_arguments_match_the_xla_path(kind, window):
    """The arguments given to jax.nn.dot_product_attention(implementation="cudnn"), run by its XLA implementation,
    give our XLA path's outputs (pins the mapping of causality, windows, padding, segments and parents)."""
    if kind == "parents":
        t, spec = _with_parents()
    else:
        t, spec = T, _spec(kind)
    q, k, v = _qkv(2, 2, 4, 2, t=t)
    got = attention.cudnn_attention(q, k, v, spec, window=window, scale=SCALE, implementation="xla")
    want = _reference(q, k, v, spec, window, None)
    np.testing.assert_allclose(_real(spec, got), _real(spec, want), atol=2e-6, rtol=1e-5)


def test_cudnn_arguments_use_the_kernel_masks_when_they_suffice():
    """No padding or segments: causal (+ window) by the kernel alone, no dense mask; with parents the window is
    on positions, so it goes into the mask instead of local_window_size."""
    plain = attention.cudnn_arguments(_spec("causal"), 9, SCALE)
    assert plain == {"is_causal": True, "scale": SCALE, "local_window_size": (8, 0)}
    segments = attention.cudnn_arguments(_spec("segments"), 9, SCALE)
    assert segments["local_window_size"] == (8, 0) and segments["mask"].shape == (2, 1, T, T)
    _, spec = _with_parents()
    parents = attention.cudnn_arguments(spec, 3, SCALE)
    assert "local_window_size" not in parents
    np.testing.assert_array_equal(parents["mask"][:, 0], attention.dense_mask(spec, 3))


# ------------------------------------------------------------------------------------------------ choosing
FACTS = {"dtype": jnp.bfloat16, "seq_len": 256, "has_parents": False, "softcap": None}


def test_auto_picks_the_backend_kernel_only_when_it_expresses_the_call():
    assert attention.resolve("auto", backend="cpu", **FACTS) == "xla"
    assert attention.resolve("auto", backend="gpu", **FACTS) == "cudnn"
    assert attention.resolve("auto", backend="gpu", **{**FACTS, "dtype": jnp.float32}) == "xla"
    assert attention.resolve("auto", backend="gpu", **{**FACTS, "softcap": 50.0}) == "xla"
    assert attention.resolve("auto", backend="gpu", **{**FACTS, "has_parents": True}) == "cudnn"
    assert attention.resolve("auto", backend="tpu", **FACTS) == "splash"
    assert attention.resolve("auto", backend="tpu", **{**FACTS, "softcap": 50.0}) == "splash"
    assert attention.resolve("auto", backend="tpu", **{**FACTS, "has_parents": True}) == "xla"
    assert attention.resolve("auto", backend="tpu", **{**FACTS, "seq_len": 200}) == "xla"
    assert attention.resolve("auto", backend="tpu", **{**FACTS, "devices": 8}) == "xla"
    assert attention.resolve("auto", backend="gpu", **{**FACTS, "devices": 8}) == "cudnn"
    assert attention.resolve("xla", backend="tpu", **FACTS) == "xla"
    assert attention.resolve("auto", **FACTS) == "xla"  # this CPU test run's own backend


@pytest.mark.parametrize(
    ("requested", "backend", "change", "message"),
    [
        ("cudnn", "cpu", {}, "attention='cudnn': cuDNN flash attention needs an NVIDIA GPU (backend is 'cpu')"),
        ("cudnn", "gpu", {"dtype": jnp.float32}, "needs bfloat16 or float16 compute (dtype is float32)"),
        ("cudnn", "gpu", {"softcap": 50.0}, "has no attention-logit soft-cap"),
        ("splash", "cpu", {}, "attention='splash': splash attention is a TPU kernel (backend is 'cpu')"),
        ("splash", "tpu", {"has_parents": True}, "cannot express shared-prompt parent ids"),
        ("splash", "tpu", {"seq_len": 200}, "row length (200) to be a multiple of 128"),
        ("splash", "tpu", {"devices": 4}, "not partitioned over 4 (no shard_map yet)"),
        ("flash", "gpu", {}, "attention='flash' is not one of ('auto', 'xla', 'cudnn', 'splash', 'blockwise')"),
    ],
)
def test_an_explicit_kernel_that_cannot_run_is_a_one_line_error(requested, backend, change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        attention.resolve(requested, backend=backend, **{**FACTS, **change})
    assert "\n" not in str(info.value)


def test_attention_is_a_config_field_that_never_reaches_config_json():
    config = ModelConfig(
        model_type="llama",
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        attention="splash",
    )
    hf = config.to_hf_dict()
    assert "attention" not in hf and ModelConfig.from_hf_dict(hf).attention == "auto"
    with pytest.raises(ValueError, match=r"attention='flash' is not one of"):
        dataclasses.replace(config, attention="flash")


def test_model_with_cudnn_on_cpu_fails_clearly():
    config = ModelConfig(
        model_type="llama",
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        attention="cudnn",
    )
    model = create_model(config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention='cudnn': cuDNN flash attention needs an NVIDIA GPU"):
        model(jnp.zeros((1, 8), jnp.int32))


# ------------------------------------------------------------------------------------------------ in the model
def _gemma2_like(attention_impl, vocab=64):
    """Gemma 2 shape: sliding and global layers alternating, attention-logit and final soft-caps, GQA."""
    return ModelConfig(
        model_type="gemma2",
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        norm_plus_one=True,
        sandwich_norms=True,
        scale_embeddings=True,
        activation="gelu_tanh",
        query_pre_attn_scalar=16,
        attn_logit_softcap=3.0,
        final_logit_softcap=10.0,
        sliding_window=11,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"),
        rope=(("full_attention", RopeSpec()), ("sliding_attention", RopeSpec())),
        attention=attention_impl,
    )


def _llama_mqa(attention_impl):
    return ModelConfig(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=1,
        head_dim=8,
        attention=attention_impl,
    )


def _logps_and_grads(model, tokens, loss_mask, valid, seg):
    def total(m):
        logp, _ = _sequence_logps(m, tokens, loss_mask, attention_mask=valid, segment_ids=seg)
        return jnp.sum(logp * jnp.arange(1, logp.shape[0] + 1)), logp

    (_, logp), grads = nnx.value_and_grad(total, has_aux=True)(model)
    return logp, grads


@pytest.mark.parametrize("make", [_gemma2_like, pytest.param(_llama_mqa, marks=SLOW)])
def test_model_with_splash_equals_the_xla_model(make):
    """The whole model with attention="splash" (interpret mode) gives the XLA model's sequence log-probs and
    parameter gradients on packed, padded rows (sliding + global layers through the scan's lax.cond)."""
    spec = _spec("segments")
    tokens = jnp.asarray(np.random.default_rng(3).integers(1, 64, size=(2, T)), jnp.int32)
    loss_mask = spec.valid & (jnp.arange(T) % 3 != 0)[None, :]
    xla = create_model(make("xla"), rngs=nnx.Rngs(5))
    kernel = create_model(make("splash"), rngs=nnx.Rngs(5))
    want = _logps_and_grads(xla, tokens, loss_mask, spec.valid, spec.segment_ids)
    with attention.pallas_interpret():
        got = _logps_and_grads(kernel, tokens, loss_mask, spec.valid, spec.segment_ids)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):  # float32 sums in another order
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_splash_model_with_parent_ids_is_a_clear_error():
    _, spec = _with_parents()
    model = create_model(_llama_mqa("splash"), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, T), jnp.int32)
    seg = jnp.pad(spec.segment_ids, ((0, 0), (0, T - 16)), mode="edge")
    with attention.pallas_interpret(), pytest.raises(ValueError, match="cannot express shared-prompt parent ids"):
        model(tokens, segment_ids=seg, parent_ids=seg)


# ------------------------------------------------------------------------------------------------ shared prompts
@pytest.mark.parametrize("make", [_gemma2_like, pytest.param(_llama_mqa, marks=SLOW)])
def test_shared_prompt_equals_each_response_alone(make):
    """One row [prompt, response A, response B] with parent ids (responses → the prompt) and positions continuing
    the prompt for each response gives each response's logits of prompt + response run alone, and the prompt's
    own; the sliding window (11) is on positions, not slots (B starts 7 slots after A's start)."""
    config = dataclasses.replace(make("xla"), sliding_window=5) if make is _gemma2_like else make("xla")
    model = create_model(config, rngs=nnx.Rngs(7))
    rng = np.random.default_rng(4)
    prompt, a, b = (rng.integers(1, 64, size=n) for n in (6, 7, 4))
    row = np.concatenate([prompt, a, b])[None]
    seg = np.array([[0] * 6 + [1] * 7 + [2] * 4])
    parent = np.array([[0] * 6 + [0] * 7 + [0] * 4])
    pos = np.array([list(range(13)) + list(range(6, 10))])
    forward = nnx.jit(lambda m, tokens, **kw: m(tokens, **kw))
    shared = forward(
        model,
        jnp.asarray(row, jnp.int32),
        positions=jnp.asarray(pos, jnp.int32),
        segment_ids=jnp.asarray(seg, jnp.int32),
        parent_ids=jnp.asarray(parent, jnp.int32),
    )[0]
    alone_a = forward(model, jnp.asarray(np.concatenate([prompt, a])[None], jnp.int32))[0]
    alone_b = forward(model, jnp.asarray(np.concatenate([prompt, b])[None], jnp.int32))[0]
    np.testing.assert_allclose(shared[:13], alone_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(shared[13:], alone_b[6:], rtol=1e-5, atol=1e-5)


def test_parent_ids_need_segment_ids():
    model = create_model(_llama_mqa("xla"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="parent_ids needs segment_ids"):
        model(jnp.zeros((1, 4), jnp.int32), parent_ids=jnp.zeros((1, 4), jnp.int32))
