"""KV-cache generation: greedy parity with transformers `generate(do_sample=False)`, sampling paths, filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rpo_jax.models import filter_logits, generate, load_hf, token_logps
from tests.hf_fixtures import load_torch_model, make_tiny_gemma, make_tiny_llama

CASES = {
    "llama_gqa": lambda d: make_tiny_llama(d),
    "gemma2_sliding_softcaps": lambda d: make_tiny_gemma(d, version=2, sliding_window=4, attn_logit_softcapping=2.0,
                                                         final_logit_softcapping=3.0),
    "gemma3_pattern": lambda d: make_tiny_gemma(d, version=3, num_hidden_layers=6, sliding_window=4),
}
NEW = 10


def _left_pad(prompts, t):
    tokens = np.zeros((len(prompts), t), np.int32)
    mask = np.zeros((len(prompts), t), bool)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p):], mask[i, t - len(p):] = p, True
    return tokens, mask


def _hf_greedy(torch_model, prompt, eos=None):
    import torch

    out = torch_model.generate(torch.as_tensor(np.asarray(prompt)[None], dtype=torch.long), max_new_tokens=NEW,
                               do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].numpy()


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(0)
    return [rng.randint(3, 250, n).astype(np.int32) for n in (5, 9, 3)]


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_matches_transformers(name, prompts, tmp_path):
    path = CASES[name](tmp_path / name)
    model, _ = load_hf(path)
    torch_model = load_torch_model(path)
    tokens, mask = _left_pad(prompts, 9)
    out = generate(model, tokens, mask, max_new_tokens=NEW, temperature=0.0)
    assert out.tokens.shape == (3, NEW) and out.tokens.dtype == jnp.int32
    for i, p in enumerate(prompts):  # transformers on each prompt alone, unpadded
        np.testing.assert_array_equal(np.asarray(out.tokens[i]), _hf_greedy(torch_model, p))
    assert np.asarray(out.mask).all() and (np.asarray(out.lengths) == NEW).all()

    # EOS: stop at the 4th greedy token of prompt 0; that row is padded afterwards (pad 0), the EOS kept.
    eos = int(out.tokens[0, 3])
    stopped = generate(model, tokens, mask, max_new_tokens=NEW, temperature=0.0, eos_token_id=eos)
    for i, p in enumerate(prompts):
        ref = _hf_greedy(torch_model, p, eos=eos)
        n = len(ref) if eos not in ref else int(np.argmax(ref == eos)) + 1
        np.testing.assert_array_equal(np.asarray(stopped.tokens[i, :n]), ref[:n])
        assert (np.asarray(stopped.tokens[i, n:]) == 0).all()
        assert int(stopped.lengths[i]) == n and np.asarray(stopped.mask[i, :n]).all()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_hf(make_tiny_llama(tmp_path_factory.mktemp("llama")))[0]


def test_top_k_one_sampling_equals_greedy(llama, prompts):
    tokens, mask = _left_pad(prompts, 9)
    greedy = generate(llama, tokens, mask, max_new_tokens=NEW, temperature=0.0)
    sampled = generate(llama, tokens, mask, max_new_tokens=NEW, temperature=1.3, top_k=1, rng=jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(sampled.tokens), np.asarray(greedy.tokens))


def test_sample_logps_equal_forward_scores(llama, prompts):
    """The cache path's per-token log-probs equal a full forward pass over prompt + sample."""
    tokens, mask = _left_pad(prompts, 9)
    out = generate(llama, tokens, mask, max_new_tokens=NEW, temperature=1.0, rng=jax.random.key(3))
    full = np.concatenate([tokens, np.asarray(out.tokens)], axis=1)
    full_mask = np.concatenate([mask, np.ones((3, NEW), bool)], axis=1)
    lp = nnx.jit(token_logps)(llama, jnp.asarray(full), attention_mask=jnp.asarray(full_mask))
    np.testing.assert_allclose(np.asarray(out.logps), np.asarray(lp)[:, 9:], atol=1e-4)
    # different keys give different samples; the same key the same samples
    again = generate(llama, tokens, mask, max_new_tokens=NEW, temperature=1.0, rng=jax.random.key(3))
    other = generate(llama, tokens, mask, max_new_tokens=NEW, temperature=1.0, rng=jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))
    assert (np.asarray(other.tokens) != np.asarray(out.tokens)).any()


def test_filter_logits_hand_checked():
    probs = np.array([0.1, 0.5, 0.05, 0.2, 0.15])
    logits = jnp.asarray(np.log(probs), jnp.float32)
    kept = lambda x: set(np.flatnonzero(np.isfinite(np.asarray(x))).tolist())  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == {1, 3}
    assert kept(filter_logits(logits, top_k=1)) == {1}
    assert kept(filter_logits(logits, top_p=0.6)) == {1, 3}  # 0.5 < 0.6, then 0.5 + 0.2 ≥ 0.6
    assert kept(filter_logits(logits, top_p=0.5)) == {1}  # mass before 0.2 is 0.5, not < 0.5
    assert kept(filter_logits(logits, top_p=0.71)) == {1, 3, 4}
    assert kept(filter_logits(logits, top_p=1.0)) == {0, 1, 2, 3, 4}
    assert kept(filter_logits(logits, top_k=3, top_p=0.6)) == {1, 3}
    np.testing.assert_array_equal(np.asarray(filter_logits(logits, top_k=2))[[1, 3]], np.asarray(logits)[[1, 3]])


def test_generate_argument_errors(llama):
    tokens, mask = np.ones((1, 3), np.int32), np.ones((1, 3), bool)
    with pytest.raises(ValueError, match="rng"):
        generate(llama, tokens, mask, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(llama, tokens, mask, max_new_tokens=2, temperature=1.0, top_p=0.0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(llama, tokens, mask, max_new_tokens=0, temperature=0.0)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2_dir):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    model, _ = load_hf(smollm2_dir)
    torch_model = load_torch_model(smollm2_dir)
    chats = ["What is the capital of France?", "Name three primary colors."]
    prompts = []
    for q in chats:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        prompts.append(np.asarray(ids["input_ids"] if hasattr(ids, "keys") else ids, np.int32))
    tokens, mask = _left_pad(prompts, max(map(len, prompts)))
    out = generate(model, tokens, mask, max_new_tokens=20, temperature=0.0, eos_token_id=tok.eos_token_id)
    for i, p in enumerate(prompts):
        ref = torch_model.generate(torch.as_tensor(p[None], dtype=torch.long), max_new_tokens=20, do_sample=False,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(p):].numpy()
        n = len(ref) if tok.eos_token_id not in ref else int(np.argmax(ref == tok.eos_token_id)) + 1
        np.testing.assert_array_equal(np.asarray(out.tokens[i, :n]), ref[:n])
    assert "Paris" in tok.decode(np.asarray(out.tokens[0])[: int(out.lengths[0])].tolist())
