"""The pairwise judges (`rpo_jax.models.judges`): reward judges, the LLM judge in both orders (position bias),
a Decoder's next-token log-probs, template checks."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

from rpo_jax.data import judge as demo_judge
from rpo_jax.data.demo import DEMO_DIR
from rpo_jax.models import ModelConfig, create_model, judge_fn
from rpo_jax.models.judges import (
    check_template,
    decoder_next_token_logps,
    judge_prompt_ids,
    llm_judge,
    position_bias,
    reward_judge,
)

TEMPLATE = "which is better? {prompt} a: {response_a} b: {response_b}"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(DEMO_DIR / "tokenizer"))


def test_reward_judge_prefers_the_higher_reward_and_ties_at_half():
    judge = reward_judge(judge_fn(demo_judge))
    out = judge(["sort: 3 1 2"] * 3, ["1 2 3", "3 2 1", "1 2 3"], ["3 2 1", "1 2 3", "1 2 3"])
    np.testing.assert_array_equal(out.prefs, [1.0, 0.0, 0.5])
    np.testing.assert_allclose(out.rewards_a, [demo_judge("sort: 3 1 2", r) for r in ("1 2 3", "3 2 1", "1 2 3")])


def test_an_always_first_llm_judge_gives_half_and_position_bias_one(tokenizer):
    first = tokenizer("a", add_special_tokens=False)["input_ids"][0]

    def always_first(token_lists):
        out = np.full((len(token_lists), len(tokenizer)), -30.0)
        out[:, first] = 0.0
        return out

    judge = llm_judge(always_first, tokenizer, TEMPLATE, answers=("a", "b"))
    out = judge(["sort: 2 1"] * 4, ["1 2", "2 1", "x", "1 2"], ["2 1", "1 2", "1 2", "1 2"])
    np.testing.assert_allclose(out.prefs, 0.5)
    assert position_bias(out.first_position) == pytest.approx(1.0)


def test_an_order_blind_llm_judge_has_no_position_bias(tokenizer):
    """A judge that answers whichever letter names the response "1 2" (wherever it is shown): prefs 1 / 0 and
    no position bias."""
    a, b = (tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in ("a", "b"))

    def content_judge(token_lists):
        out = np.full((len(token_lists), len(tokenizer)), -30.0)
        for i, ids in enumerate(token_lists):
            text = tokenizer.decode(ids)
            shown_first = text.split(" a: ")[1].split(" b: ")[0]
            out[i, a if shown_first == "1 2" else b] = 0.0
        return out

    out = llm_judge(content_judge, tokenizer, TEMPLATE, answers=("a", "b"))(
        ["sort: 2 1"] * 2, ["1 2", "2 1"], ["2 1", "1 2"]
    )
    np.testing.assert_allclose(out.prefs, [1.0, 0.0], atol=1e-9)
    assert position_bias(out.first_position) == pytest.approx(0.0, abs=1e-9)


def test_decoder_next_token_logps_match_the_unpadded_forward(tokenizer):
    config = ModelConfig.from_hf_dict(
        {
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "max_position_embeddings": 256,
        }
    )
    model = create_model(config, rngs=nnx.Rngs(0))
    lists = [judge_prompt_ids(tokenizer, TEMPLATE, "sort: 2 1", "1 2", r) for r in ("2 1", "2 1 1 1 1 1 1", "")]
    got = decoder_next_token_logps(model, pad_id=0, batch_size=2)(lists)
    for i, ids in enumerate(lists):
        want = jax.nn.log_softmax(model(np.asarray([ids], np.int32))[0, -1])
        np.testing.assert_allclose(got[i], want, atol=1e-5)


def test_template_and_answer_problems_are_one_line_errors(tokenizer):
    with pytest.raises(ValueError, match=r"judge.txt: the judge template lacks the placeholder\(s\) \{response_b\}"):
        check_template("{prompt} {response_a}", "judge.txt")
    with pytest.raises(ValueError, match="'ab' is 2 tokens"):
        llm_judge(lambda x: x, tokenizer, TEMPLATE, answers=("ab", "b"))
