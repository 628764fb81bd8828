"""Reward models (score parity with transformers' XForSequenceClassification) and the reward functions."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from tests.hf_fixtures import GEMMA_DEFAULTS, LLAMA_DEFAULTS, _randomize, make_tiny_llama

PAD = 0


def make_seq_cls(out_dir, family: str, *, num_labels: int, seed: int = 0, **overrides) -> pathlib.Path:
    """A tiny random transformers sequence-classification checkpoint (every weight random, score included)."""
    import torch
    import transformers as tr

    torch.manual_seed(seed)
    if family == "llama":
        cfg = tr.LlamaConfig(**{**LLAMA_DEFAULTS, **overrides}, num_labels=num_labels)
        model, plus_one = tr.LlamaForSequenceClassification(cfg), False
    elif family == "gemma":
        cfg = tr.GemmaConfig(**{**GEMMA_DEFAULTS, **overrides}, num_labels=num_labels)
        model, plus_one = tr.GemmaForSequenceClassification(cfg), True
    elif family == "gemma2":
        base = {"sliding_window": 4, "query_pre_attn_scalar": 24, **GEMMA_DEFAULTS, **overrides}
        model, plus_one = tr.Gemma2ForSequenceClassification(tr.Gemma2Config(**base, num_labels=num_labels)), True
    elif family == "gemma3":
        base = {"sliding_window": 4, "query_pre_attn_scalar": 24, **GEMMA_DEFAULTS, **overrides}
        cfg = tr.Gemma3TextConfig(**base, num_labels=num_labels)
        model, plus_one = tr.Gemma3TextForSequenceClassification(cfg), True
    else:
        raise ValueError(family)
    model = model.eval()
    _randomize(model, seed, norm_plus_one=plus_one)
    out = pathlib.Path(out_dir)
    model.save_pretrained(str(out))
    return out


def hf_scores(checkpoint_dir, tokens: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """transformers' pooled logits [N, num_labels] (float32, eager attention)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(checkpoint_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(attention_mask, dtype=torch.long),
        )
    return out.logits.float().numpy()


def padded_batch(lengths, width, *, side: str, seed: int = 0, vocab: int = 256):
    """Random real tokens (never the pad id) padded with PAD on `side`; returns tokens, mask [N,width]."""
    rng = np.random.default_rng(seed)
    tokens = np.full((len(lengths), width), PAD, np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        ids = rng.integers(3, vocab, size=n)
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        tokens[i, cols] = ids
        mask[i, cols] = 1
    return tokens, mask


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    return {
        "llama2": make_seq_cls(root / "llama2", "llama", num_labels=2),
        "gemma1": make_seq_cls(root / "gemma1", "gemma", num_labels=1, seed=1),
        "gemma2": make_seq_cls(root / "gemma2", "gemma2", num_labels=1, seed=2),
        "gemma3": make_seq_cls(root / "gemma3", "gemma3", num_labels=2, seed=3),
    }


@pytest.mark.parametrize("name", ["llama2", "gemma1", "gemma2", "gemma3"])
def test_reward_scores_match_transformers_right_and_left_padding(checkpoints, name):
    from rpo_jax.models import load_reward_model

    path = checkpoints[name]
    model, config = load_reward_model(path)
    num_labels = {"llama2": 2, "gemma1": 1, "gemma2": 1, "gemma3": 2}[name]
    assert model.num_labels == num_labels and config.pad_token_id == PAD
    lengths = [9, 3, 6, 1]
    for side in ("right", "left"):
        tokens, mask = padded_batch(lengths, 9, side=side, seed=len(side))
        ours = np.asarray(model(tokens.astype(np.int32), mask.astype(bool)))
        theirs = hf_scores(path, tokens, mask)
        assert ours.shape == (4, num_labels) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # the same sequence scores the same whatever the padding (pooling at the last non-pad token)
    right, rmask = padded_batch(lengths, 9, side="right", seed=7)
    left, lmask = padded_batch(lengths, 9, side="left", seed=7)
    np.testing.assert_allclose(np.asarray(model(right, rmask)), np.asarray(model(left, lmask)), atol=1e-4)


def test_pooling_follows_transformers_pad_token_rule(checkpoints):
    """A real token equal to pad_token_id: in the middle it is attended and ignored by pooling; at the end
    transformers pools the token before it (rightmost token != pad_token_id), and so do we."""
    from rpo_jax.models import load_reward_model
    from rpo_jax.models.reward import pooling_index

    path = checkpoints["llama2"]
    model, _ = load_reward_model(path)
    tokens = np.array([[5, 6, PAD, 7, 8, PAD], [5, 6, 7, 8, PAD, PAD], [PAD, PAD, 9, 10, 11, 12]], np.int64)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], np.int64)
    np.testing.assert_array_equal(np.asarray(pooling_index(tokens, mask, PAD)), [4, 3, 5])
    np.testing.assert_allclose(np.asarray(model(tokens, mask.astype(bool))), hf_scores(path, tokens, mask), atol=1e-4)
    # no pad id: last position the attention mask marks real (no mask: last position)
    np.testing.assert_array_equal(np.asarray(pooling_index(tokens, mask, None)), [5, 4, 5])
    np.testing.assert_array_equal(np.asarray(pooling_index(tokens, None, None)), [5, 5, 5])


def test_save_reward_model_roundtrip_through_transformers(checkpoints, tmp_path):
    from rpo_jax.models import load_reward_model, save_reward_model

    for name in ("llama2", "gemma1", "gemma3"):
        src = checkpoints[name]
        model, config = load_reward_model(src)
        out = save_reward_model(model, config, tmp_path / name)
        saved = json.loads((out / "config.json").read_text())
        original = json.loads((src / "config.json").read_text())
        assert saved["architectures"] == original["architectures"]
        assert saved["tie_word_embeddings"] == original["tie_word_embeddings"]
        tokens, mask = padded_batch([7, 4, 2], 7, side="right", seed=3)
        np.testing.assert_allclose(hf_scores(out, tokens, mask), hf_scores(src, tokens, mask), atol=1e-6, rtol=0)
        again, config2 = load_reward_model(out)
        assert config2 == config and again.labels == model.labels
        np.testing.assert_array_equal(np.asarray(again(tokens, mask)), np.asarray(model(tokens, mask)))


def test_load_reward_model_refuses_causal_lm_and_unknown_architectures(tmp_path):
    from rpo_jax.models import load_reward_model

    causal = make_tiny_llama(tmp_path / "causal")
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*causal language model has no score head"):
        load_reward_model(causal)
    # relabelled as a classifier but without the head
    cfg = json.loads((causal / "config.json").read_text())
    (causal / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForSequenceClassification"]}))
    with pytest.raises(ValueError, match=r"score\.weight is missing"):
        load_reward_model(causal)
    for archs, pattern in (
        (["PhiForSequenceClassification"], "not a supported reward model"),
        ([], "expected exactly one of"),
    ):
        (causal / "config.json").write_text(json.dumps({**cfg, "architectures": archs}))
        with pytest.raises(ValueError, match=pattern):
            load_reward_model(causal)
    (causal / "config.json").write_text(json.dumps({**cfg, "architectures": ["GemmaForSequenceClassification"]}))
    with pytest.raises(ValueError, match="does not match architectures"):
        load_reward_model(causal)


def test_reward_model_fn_matches_transformers_on_chat_template(tmp_path):
    """reward_model_fn = transformers' score (label 0) of each chat-templated conversation scored alone."""
    from transformers import AutoTokenizer

    from rpo_jax.data import demo_paths
    from rpo_jax.models import encode_conversation, load_reward_model, reward_model_fn

    tokenizer = AutoTokenizer.from_pretrained(demo_paths()["tokenizer"])
    assert tokenizer.pad_token_id == PAD
    path = make_seq_cls(tmp_path / "rm", "llama", num_labels=2, vocab_size=64)
    model, _ = load_reward_model(path)
    prompts = [[{"role": "user", "content": "sort: 3 1 2"}], "sort: 9 8 7 6 5"]
    responses = [["1 2 3", "3 2 1", "a b"], ["5 6 7 8 9", "9"]]
    fn = reward_model_fn(model, tokenizer, max_length=64, batch_size=2)
    got = fn(prompts, responses)
    assert got.shape == (2, 3) and got.dtype == np.float32 and got[1, 2] == 0.0
    for b, rs in enumerate(responses):
        for k, r in enumerate(rs):
            ids = np.array([encode_conversation(tokenizer, prompts[b], r)])
            assert ids[0, 0] == tokenizer.bos_token_id and ids[0, -1] == tokenizer.eos_token_id
            want = hf_scores(path, ids, np.ones_like(ids))[0, 0]
            np.testing.assert_allclose(got[b, k], want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"responses\[1\]\[0\].*> max_length=8"):
        reward_model_fn(model, tokenizer, max_length=8, batch_size=2)(prompts, [[], ["5 6 7 8 9"]])
    # truncation="left" scores the last max_length tokens
    left = reward_model_fn(model, tokenizer, max_length=8, batch_size=2, truncation="left")
    ids = np.array([encode_conversation(tokenizer, prompts[1], "5 6 7 8 9")[-8:]])
    np.testing.assert_allclose(
        left(prompts[1:], [["5 6 7 8 9"]])[0, 0], hf_scores(path, ids, np.ones_like(ids))[0, 0], atol=1e-4, rtol=0
    )


def test_judge_fn_on_demo_judge_hand_computed():
    from rpo_jax.data import judge
    from rpo_jax.models import judge_fn

    fn = judge_fn(judge)
    prompts = [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort: 3 1 2"}],
        [
            {"role": "user", "content": "sort: 9 8"},
            {"role": "assistant", "content": "8 9"},
            {"role": "user", "content": "sort: 2 1"},
        ],
    ]
    responses = [["1 2 3", "3 2 1", "1 2", "a b"], ["1 2"]]
    got = fn(prompts, responses)
    # "1 2 3": 0.5·1 + 0.5·1; "3 2 1": 0.5·1 + 0.5·0; "1 2": 0.5·(2/3) + 0.5·1; "a b": not digits → 0
    # second prompt: the last user message "sort: 2 1" is judged → "1 2" is perfect; slots past K_b are 0
    want = np.array([[1.0, 0.5, 0.5 * 2 / 3 + 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    assert got.dtype == np.float32
    with pytest.raises(ValueError, match=r"prompts\[0\] has no user message"):
        fn([[{"role": "system", "content": "x"}]], [["1"]])
    with pytest.raises(ValueError, match=r"responses\[0\]\[1\]"):
        judge_fn(lambda p, r: float("nan") if r == "bad" else 1.0)(["sort: 1"], [["1", "bad"]])


def test_dataset_rewards_fn_looks_up_and_refuses_missing_rewards():
    from rpo_jax.data import PreferenceRecord
    from rpo_jax.models import dataset_rewards_fn

    user = ({"role": "user", "content": "sort: 2 1"},)
    with_rewards = PreferenceRecord(
        prompt=user,
        responses=(({"role": "assistant", "content": "1 2"},), ({"role": "assistant", "content": "2 1"},)),
        rewards=(1.0, 0.5),
        conversational=True,
        source=("train.jsonl", 3),
    )
    fn = dataset_rewards_fn([with_rewards])
    np.testing.assert_array_equal(fn([list(user)], [["2 1", "1 2"]]), np.array([[0.5, 1.0]], np.float32))
    np.testing.assert_array_equal(fn(["sort: 2 1"], [["1 2"]]), np.array([[1.0]], np.float32))
    with pytest.raises(ValueError, match=r"responses\[0\]\[0\]: no record holds a reward"):
        fn([list(user)], [["2 2"]])
    without = PreferenceRecord(
        prompt=user, responses=with_rewards.responses, rewards=None, conversational=True, source=("data/pairs.jsonl", 7)
    )
    with pytest.raises(ValueError, match=r"data/pairs\.jsonl:7.*never invented|never invented.*data/pairs\.jsonl:7"):
        dataset_rewards_fn([with_rewards, without])
    clash = PreferenceRecord(
        prompt=user,
        responses=with_rewards.responses,
        rewards=(0.9, 0.5),
        conversational=True,
        source=("other.jsonl", 2),
    )
    with pytest.raises(ValueError, match=r"other\.jsonl:2.*train\.jsonl:3"):
        dataset_rewards_fn([with_rewards, clash])


def test_sharded_reward_model_matches_unsharded(checkpoints):
    import jax
    from flax import nnx

    from rpo_jax.models import load_reward_model, make_mesh

    path = checkpoints["llama2"]
    model, _ = load_reward_model(path)
    tokens, mask = padded_batch([9, 3, 6, 1, 2, 5, 8, 4], 9, side="right", seed=5)
    expected = np.asarray(model(tokens, mask.astype(bool)))
    mesh = make_mesh((2, 2, 2))
    sharded, _ = load_reward_model(path, mesh=mesh)
    assert sharded.score[...].sharding.mesh.shape == mesh.shape
    assert sharded.score[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    with jax.set_mesh(mesh):
        scores = nnx.jit(lambda m, t, a: m(t, a))(sharded, tokens, mask.astype(bool))
    np.testing.assert_allclose(np.asarray(scores), expected, atol=1e-5)


def test_created_reward_model_exports_to_transformers(tmp_path):
    """A randomly initialised RewardModel (e.g. before Bradley–Terry training) saves as a checkpoint that
    transformers scores exactly as we do."""
    from flax import nnx

    from rpo_jax.models import ModelConfig, create_reward_model, save_reward_model

    config = ModelConfig(
        model_type="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        pad_token_id=PAD,
    )
    model = create_reward_model(config, num_labels=1, rngs=nnx.Rngs(1))
    assert not hasattr(model.backbone, "lm_head") and model.score[...].shape == (1, 32)
    out = save_reward_model(model, config, tmp_path / "rm")
    tokens, mask = padded_batch([6, 2, 4], 6, side="left", seed=2, vocab=64)
    np.testing.assert_allclose(
        np.asarray(model(tokens, mask.astype(bool))), hf_scores(out, tokens, mask), atol=1e-5, rtol=0
    )
