"""Speed paths give the same results as the plain ones: the scored window (output head only where tokens are
scored), SwiGLU with fewer saved activations, the in-step reference outside the gradient, the host-side window
choice / FLOP count and the huge-page malloc restart."""

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import optax
import pytest
from flax import nnx

from rpo_jax.losses import make_loss
from rpo_jax.models import load_hf
from rpo_jax.models import sequence_logps as _sequence_logps
from rpo_jax.models.logprobs import score_window_start
from rpo_jax.train.build.model import split_trainable
from rpo_jax.train.runtime.performance import flops_per_token, train_flops_per_token
from rpo_jax.train.step.logprobs import resolve_score_window
from rpo_jax.train.step.steps import make_eval_step, make_train_step
from tests.hf_fixtures import make_tiny_gemma, make_tiny_llama

sequence_logps = nnx.jit(_sequence_logps, static_argnames=("vocab_chunk_size", "score_window"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_hf(
        make_tiny_llama(
            tmp_path_factory.mktemp("llama"),
            vocab_size=250,
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=3,
            intermediate_size=96,
        )
    )


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    return load_hf(make_tiny_gemma(tmp_path_factory.mktemp("gemma2"), version=2, final_logit_softcapping=4.0))


def right_padded(prompt_lens, response_lens, t, seed=0, vocab=240):
    """tokens/attention_mask/loss_mask [N,T]: prompt then response (scored) then padding, like rpo_jax.data."""
    rng = np.random.RandomState(seed)
    n = len(prompt_lens)
    tokens = np.zeros((n, t), np.int32)
    attention = np.zeros((n, t), bool)
    loss = np.zeros((n, t), bool)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        tokens[i, : p + r] = rng.randint(3, vocab, size=p + r)
        attention[i, : p + r] = True
        loss[i, p : p + r] = True
    return jnp.asarray(tokens), jnp.asarray(attention), jnp.asarray(loss)


# Rows: short and long prompts, a response that ends at the last position (window moved left), a row with
# nothing scored (an empty response slot), a one-token response.
PROMPTS, RESPONSES, T, W = [3, 9, 1, 5, 11], [6, 4, 8, 0, 1], 14, 8


def test_score_window_start_closed_form():
    _, _, loss = right_padded(PROMPTS, RESPONSES, T)
    # first scored token p → start p-1, capped at T-1-W = 5; nothing scored → 0
    np.testing.assert_array_equal(score_window_start(loss, W), [2, 5, 0, 0, 5])
    with pytest.raises(ValueError, match="score_window=14"):
        score_window_start(loss, T)


@pytest.mark.parametrize("which,chunk", [("llama", None), ("gemma2", 64)])
def test_scored_window_equals_full_head(which, chunk, llama, gemma2):
    """Values and parameter gradients of Σ logp over the scored tokens are the same with the window."""
    model, _ = llama if which == "llama" else gemma2
    tokens, attention, loss = right_padded(PROMPTS, RESPONSES, T, seed=1)

    def total(m, window):
        logp, count = _sequence_logps(
            m, tokens, loss, attention_mask=attention, vocab_chunk_size=chunk, score_window=window
        )
        return jnp.sum(logp * jnp.arange(1, 6)), (logp, count)

    grad = nnx.jit(nnx.grad(total, has_aux=True), static_argnums=1)
    g_full, (lp_full, c_full) = grad(model, None)
    g_win, (lp_win, c_win) = grad(model, W)
    np.testing.assert_array_equal(c_full, c_win)
    np.testing.assert_array_equal(c_full, [6, 4, 8, 0, 1])
    np.testing.assert_allclose(lp_win, lp_full, rtol=1e-5, atol=1e-5)
    assert lp_full[3] == 0.0 and lp_win[3] == 0.0
    for a, b in zip(jax.tree.leaves(nnx.state(g_full)), jax.tree.leaves(nnx.state(g_win))):
        # float32: the head's gradient is summed over fewer (all-zero) positions, so compare at the gradient's scale
        scale = float(np.abs(np.asarray(a)).max())
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4 * scale)


def test_scored_window_too_narrow_gives_nan_not_a_truncated_sum(llama):
    model, _ = llama
    tokens, attention, loss = right_padded(PROMPTS, RESPONSES, T, seed=2)
    logp, _ = sequence_logps(model, tokens, loss, attention_mask=attention, score_window=5)
    full, _ = sequence_logps(model, tokens, loss, attention_mask=attention)
    too_long = np.asarray(RESPONSES) > 5
    assert np.all(np.isnan(np.asarray(logp)[too_long]))
    np.testing.assert_allclose(np.asarray(logp)[~too_long], np.asarray(full)[~too_long], rtol=1e-5, atol=1e-5)


def test_window_of_t_minus_one_or_more_is_the_full_path(llama):
    model, _ = llama
    tokens, attention, loss = right_padded(PROMPTS, RESPONSES, T, seed=3)
    full, _ = sequence_logps(model, tokens, loss, attention_mask=attention)
    for window in (T - 1, T + 5):
        np.testing.assert_array_equal(
            sequence_logps(model, tokens, loss, attention_mask=attention, score_window=window)[0], full
        )


def test_resolve_score_window_settings():
    assert resolve_score_window("auto", 21) == 32  # rounded up to a multiple of 16 (few compilations)
    assert resolve_score_window("auto", 32) == 32
    assert resolve_score_window("auto", 21, multiple=1) == 21
    assert resolve_score_window("auto", 0) is None  # nothing scored: no window
    for off in ("off", "", "0", None, 0):
        assert resolve_score_window(off, 21) is None
    assert resolve_score_window("48", 21) == 48
    assert resolve_score_window(21, 21) == 21
    with pytest.raises(ValueError, match="score_window=20 is shorter than the longest response in the data"):
        resolve_score_window("20", 21)
    with pytest.raises(ValueError, match=r"score_window='-3': expected 'auto', 'off' or a number ≥ 1"):
        resolve_score_window("-3", 0)
    with pytest.raises(ValueError, match="expected 'auto', 'off' or a number"):
        resolve_score_window("wide", 21)


def test_train_flops_per_token_counts_the_head_only_where_computed(llama):
    _, config = llama
    p_body = config.num_params(include_embeddings=False)
    head = config.vocab_size * config.hidden_size
    attn = config.num_heads * config.head_dim
    for refs in (0, 1):
        plain = flops_per_token(p_body + head, config.num_layers, 128, attn, refs)
        assert train_flops_per_token(config, 128, num_references=refs) == pytest.approx(plain, rel=1e-12)
        expected = (3 + refs) * (2 * p_body + 4 * config.num_layers * 128 * attn + 2 * head * 64 / 128)
        assert train_flops_per_token(config, 128, num_references=refs, score_window=64) == pytest.approx(
            expected, rel=1e-12
        )


def _batch(b=3, k=2, seed=4):
    prompts = [2, 7, 4, 1, 6, 3]
    responses = [5, 3, 6, 2, 4, 1]
    tokens, attention, loss = right_padded(prompts[: b * k], responses[: b * k], 16, seed=seed)
    shape = lambda x: x.reshape(b, k, 16)  # noqa: E731
    loss_np = np.asarray(loss).reshape(b, k, 16)
    return {
        "tokens": shape(tokens),
        "attention_mask": shape(attention),
        "loss_mask": shape(loss),
        "lengths": jnp.asarray(loss_np.sum(-1).astype(np.int32)),
        "valid": jnp.ones((b, k), bool),
        "rewards": jnp.asarray(np.random.RandomState(seed).normal(size=(b, k)).astype(np.float32)),
    }


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_train_and_eval_steps_with_window_equal_without(micro_batches, llama):
    """One SGD step (lr 1: update = -gradient) with an in-step reference: same loss, metrics, gradient norm and
    gradients; the eval step gives the same sums."""
    model, _ = llama
    graphdef, params, rest = split_trainable(model)
    tx = optax.sgd(1.0)
    loss_fn = make_loss("dpo", beta=0.5)
    batch = _batch()
    longest = int(np.asarray(batch["loss_mask"])[..., 1:].sum(-1).max())
    window = resolve_score_window("auto", longest, multiple=1)
    assert window == 6
    ref_params = (jax.tree.map(lambda x: x * 0.9, params),)
    results = []
    for w in (None, window):
        step = jax.jit(
            make_train_step(
                graphdef,
                rest,
                loss_fn,
                tx,
                compute_dtype=jnp.float32,
                micro_batches=micro_batches,
                ref_graphdefs=((graphdef, rest),),
                score_window=w,
            )
        )
        state = {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(0)),
        }
        new_state, metrics = step(state, batch, ref_params)
        ev = jax.jit(
            make_eval_step(
                graphdef, rest, loss_fn, compute_dtype=jnp.float32, ref_graphdefs=((graphdef, rest),), score_window=w
            )
        )(params, batch, ref_params)
        results.append((new_state, metrics, ev))
    (s0, m0, e0), (s1, m1, e1) = results
    assert float(m0["loss"]) != pytest.approx(np.log(2.0), abs=1e-4)  # the reference differs from the policy
    for key in m0:
        np.testing.assert_allclose(m1[key], m0[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for p, a, b in zip(jax.tree.leaves(params), jax.tree.leaves(s0["params"]), jax.tree.leaves(s1["params"])):
        g0, g1 = np.asarray(p) - np.asarray(a), np.asarray(p) - np.asarray(b)
        scale = float(np.abs(g0).max())
        assert scale > 0
        np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-4 * scale)
    for a, b in zip(jax.tree.leaves(e0), jax.tree.leaves(e1)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_swiglu_custom_vjp_equals_autodiff_and_finite_differences():
    from rpo_jax.models.layers import swiglu

    rng = np.random.RandomState(0)
    g = jnp.asarray(rng.normal(scale=3.0, size=(5, 7)))
    u = jnp.asarray(rng.normal(size=(5, 7)))
    dy = jnp.asarray(rng.normal(size=(5, 7)))
    plain = lambda g, u: jax.nn.silu(g) * u  # noqa: E731
    np.testing.assert_array_equal(swiglu(g, u), plain(g, u))
    _, vjp = jax.vjp(swiglu, g, u)
    _, vjp_plain = jax.vjp(plain, g, u)
    for a, b in zip(vjp(dy), vjp_plain(dy)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with jax.enable_x64(True):
        jax.test_util.check_grads(swiglu, (g.astype(jnp.float64), u.astype(jnp.float64)), order=1, modes=("rev",))
