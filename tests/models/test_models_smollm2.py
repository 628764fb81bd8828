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
    ref_lp = (
        reference
        - np.log(np.exp(reference - reference.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - reference.max(-1, keepdims=True)
    )
    expected = (np.take_along_axis(ref_lp[0, :-1], tokens[0, 1:, None], -1)[:, 0] * mask[0, 1:]).sum()
    got, count = nnx.jit(lambda m, t, l: sequence_logps(m, t, l, vocab_chunk_size=8192))(
        model, jnp.asarray(tokens), jnp.asarray(mask)
    )
    assert int(count[0]) == 10
    np.testing.assert_allclose(float(got[0]), expected, atol=5e-3)


def test_smollm2_reward_model_scores_match_transformers(smollm2_dir, tmp_path):
    """SmolLM2-135M-Instruct as a LlamaForSequenceClassification (transformers' fresh score head, saved): our
    `load_reward_model` + `reward_model_fn` (batched, right-padded) score chat conversations like transformers
    scores each one alone."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rpo_jax.models import encode_conversation, load_reward_model, reward_model_fn

    torch.manual_seed(0)
    hf = AutoModelForSequenceClassification.from_pretrained(
        str(smollm2_dir), num_labels=1, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    hf.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = [[{"role": "user", "content": "What is the capital of France?"}], "Sort these digits: 3 1 2"]
    responses = [["The capital of France is Paris.", "Lyon, I think."], ["1 2 3", "3 2 1, obviously not sorted"]]
    expected = np.zeros((2, 2), np.float32)
    for b, (p, rs) in enumerate(zip(prompts, responses)):
        for k, r in enumerate(rs):
            ids = torch.as_tensor([encode_conversation(tok, p, r)])
            with torch.no_grad():
                expected[b, k] = float(hf(input_ids=ids).logits[0, 0])
    rm, _ = load_reward_model(tmp_path / "rm")
    got = reward_model_fn(rm, tok, max_length=128, batch_size=4)(prompts, responses)
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, float(np.abs(expected).max())))
    assert np.ptp(expected) > 1e-3  # the conversations get different scores: the comparison bites
