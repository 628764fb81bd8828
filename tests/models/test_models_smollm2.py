"""Slow: the real SmolLM2-135M-Instruct checkpoint (fixture `smollm2_dir`) against transformers."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rpo_jax.models import load_hf, sequence_logps
from tests.hf_fixtures import hf_logits, load_torch_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chat_tokens(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]
    ids = tok.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return tok, np.asarray(ids, np.int32)


def test_chat_template_tokenizes(chat_tokens):
    tok, ids = chat_tokens
    text = tok.decode(ids.tolist())
    assert "<|im_start|>user" in text and "Paris" in text and "<|im_start|>assistant" in text
    assert ids.ndim == 1 and 10 < len(ids) < 200


def test_smollm2_logits_match_transformers(smollm2_dir, chat_tokens):
    _, ids = chat_tokens
    tokens = ids[None]
    reference = hf_logits(load_torch_model(smollm2_dir), tokens)
    model, config = load_hf(smollm2_dir)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.tie_word_embeddings) == (30, 9, 3, True)
    logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
    assert np.abs(logits - reference).max() <= 2e-3
    np.testing.assert_array_equal(logits.argmax(-1), reference.argmax(-1))
    # the chunked log-prob of the assistant answer equals the log-softmax gather of the reference logits
    mask = np.zeros_like(tokens, bool)
    mask[0, -10:] = True
    ref_lp = reference - np.log(np.exp(reference - reference.max(-1, keepdims=True)).sum(-1, keepdims=True)) - reference.max(-1, keepdims=True)
    expected = (np.take_along_axis(ref_lp[0, :-1], tokens[0, 1:, None], -1)[:, 0] * mask[0, 1:]).sum()
    got, count = nnx.jit(lambda m, t, l: sequence_logps(m, t, l, vocab_chunk_size=8192))(model, jnp.asarray(tokens), jnp.asarray(mask))
    assert int(count[0]) == 10
    np.testing.assert_allclose(float(got[0]), expected, atol=5e-3)
