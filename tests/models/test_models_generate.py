"""KV-cache generation: greedy parity with transformers `generate(do_sample=False)`, sampling paths, filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rpo_jax.models import (
    GenerateOutput,
    filter_logits,
    generate,
    load_hf,
    make_mesh,
    token_logps,
    truncate_at_stop_strings,
)
from tests.hf_fixtures import load_torch_model, make_tiny_gemma, make_tiny_llama

CASES = {
    "llama_gqa": lambda d: make_tiny_llama(d),
    "gemma2_sliding_softcaps": lambda d: make_tiny_gemma(
        d, version=2, sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=3.0
    ),
    "gemma3_pattern": lambda d: make_tiny_gemma(d, version=3, num_hidden_layers=6, sliding_window=4),
}
NEW = 10


def _left_pad(prompts, t):
    tokens = np.zeros((len(prompts), t), np.int32)
    mask = np.zeros((len(prompts), t), bool)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p) :], mask[i, t - len(p) :] = p, True
    return tokens, mask


def _hf_greedy(torch_model, prompt, eos=None):
    import torch

    out = torch_model.generate(
        torch.as_tensor(np.asarray(prompt)[None], dtype=torch.long),
        max_new_tokens=NEW,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].numpy()


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
def llama_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_hf(llama_dir)[0]


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


# ------------------------------------------------------------------------------------------- stop sequences
def _first_stop(row, stop_sequences):
    """Reference: the first j such that row[:j+1] ends with a stop sequence, or None (plain Python)."""
    for j in range(len(row)):
        if any(j + 1 >= len(s) and list(row[j + 1 - len(s) : j + 1]) == list(s) for s in stop_sequences):
            return j
    return None


def _assert_truncated(out, base, ends, pad=0):
    """out equals base cut after index ends[i] in row i (None: row unchanged), pad / False / 0 afterwards."""
    for i, j in enumerate(ends):
        n = base.tokens.shape[1] if j is None else j + 1
        np.testing.assert_array_equal(np.asarray(out.tokens[i, :n]), np.asarray(base.tokens[i, :n]))
        np.testing.assert_array_equal(np.asarray(out.logps[i, :n]), np.asarray(base.logps[i, :n]))
        assert (np.asarray(out.tokens[i, n:]) == pad).all() and (np.asarray(out.logps[i, n:]) == 0).all()
        assert np.asarray(out.mask[i, :n]).all() and not np.asarray(out.mask[i, n:]).any()
        assert int(out.lengths[i]) == n


def test_stop_sequences_end_rows_at_first_completion(llama, prompts):
    tokens, mask = _left_pad(prompts, 9)
    kw = {"max_new_tokens": NEW, "temperature": 0.0}
    base = generate(llama, tokens, mask, **kw)
    rows = np.asarray(base.tokens)
    # two tokens of row 0 (steps 3, 4), one token of row 2 (step 6); the prompt's last token + row 1's first
    # generated token must NOT match: only generated tokens count
    stops = [rows[0, 3:5].tolist(), [int(rows[2, 6])], [int(prompts[1][-1]), int(rows[1, 0])]]
    out = generate(llama, tokens, mask, stop_sequences=stops, **kw)
    ends = [_first_stop(r, stops) for r in rows]
    assert ends[0] is not None and ends[0] <= 4 and ends[2] is not None and ends[2] <= 6
    assert ends[1] is None or ends[1] > 0  # the prompt-straddling sequence never matches at step 0
    _assert_truncated(out, base, ends, pad=0)

    # with an EOS too, whichever comes first ends the row (a stop sequence of length 1 acts as an EOS)
    eos = int(rows[1, 0])
    both = generate(llama, tokens, mask, eos_token_id=eos, stop_sequences=stops, **kw)
    ends_both = [_first_stop(r, [*stops, [eos]]) for r in rows]
    assert ends_both[1] == 0 and ends[1] != 0  # row 1: the EOS (step 0) comes before any stop sequence
    _assert_truncated(both, base, ends_both, pad=0)


# ------------------------------------------------------------------------------------------- stop strings
class _PieceTokenizer:
    """decode = concatenation of fixed token strings (what a Fuse-decoder tokenizer does)."""

    pieces = ("", "st", "op", "las", "topper", "x", "s", "to", "pped", "\n")

    def decode(self, ids):
        return "".join(self.pieces[int(i)] for i in ids)


def test_truncate_at_stop_strings_hand_built():
    tokens = np.array(
        [
            [3, 4, 5, 5],  # "las"+"topper": "stop" overhangs both ends → ends at token 1
            [5, 1, 2, 5],  # "x"+"st"+"op" → token 2
            [6, 7, 8, 5],  # "s"+"to"+"pped" → token 2
            [5, 5, 5, 5],  # no stop string → unchanged
            [5, 1, 2, 5],  # ended at an EOS (token 1): "stop" lies beyond the mask → unchanged
            [1, 2, 9, 7],
        ],  # "st"+"op" before the EOS "\n" (token 2) → token 1
        np.int32,
    )
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], bool)
    logps = -np.arange(1, 25, dtype=np.float32).reshape(6, 4) * mask
    out = GenerateOutput(
        tokens=jnp.asarray(tokens),
        mask=jnp.asarray(mask),
        logps=jnp.asarray(logps),
        lengths=jnp.asarray(mask.sum(1), jnp.int32),
    )
    cut = truncate_at_stop_strings(out, _PieceTokenizer(), ["stop"], pad_token_id=7)
    lengths = np.array([2, 3, 3, 4, 2, 2])
    keep = np.arange(4)[None, :] < lengths[:, None]
    expected_tokens = np.where(keep, tokens, 7)
    expected_tokens[4] = tokens[4]  # unchanged row: its tokens after the mask are left as they were
    np.testing.assert_array_equal(np.asarray(cut.lengths), lengths)
    np.testing.assert_array_equal(np.asarray(cut.mask), keep)
    np.testing.assert_array_equal(np.asarray(cut.tokens), expected_tokens)
    np.testing.assert_array_equal(np.asarray(cut.logps), np.where(keep, logps, 0.0))
    assert isinstance(cut.tokens, jax.Array) and cut.tokens.dtype == jnp.int32
    # a stop string inside one token ("opp" in "topper", "stopped"); several stop strings: the first completed
    np.testing.assert_array_equal(
        np.asarray(truncate_at_stop_strings(out, _PieceTokenizer(), ["opp"], pad_token_id=0).lengths),
        [2, 4, 3, 4, 2, 3],
    )
    np.testing.assert_array_equal(
        np.asarray(truncate_at_stop_strings(out, _PieceTokenizer(), ["xx", "stop"], pad_token_id=0).lengths),
        [2, 3, 3, 2, 2, 2],
    )
    same = truncate_at_stop_strings(out, _PieceTokenizer(), ["zz"], pad_token_id=0)
    for field in ("tokens", "mask", "logps", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(same, field)), np.asarray(getattr(out, field)))
    bad = GenerateOutput(tokens=out.tokens, mask=jnp.asarray(mask[:, ::-1]), logps=out.logps, lengths=out.lengths)
    with pytest.raises(ValueError, match="not a prefix"):
        truncate_at_stop_strings(bad, _PieceTokenizer(), ["stop"], pad_token_id=0)


def _tiny_bpe_tokenizer():
    """A 120-token BPE tokenizer trained offline (multi-character tokens, Fuse decoder), as transformers'."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "the stop sign stops the topper at last",
        "stopping is not the same as stepping on a top",
        "a quick brown fox jumps over the lazy dog",
        "she sells sea shells by the sea shore",
    ] * 5
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=120, show_progress=False, special_tokens=["<pad>", "<unk>", "<eos>"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _first_text_stop(prefix: str, pieces: list[str], stop: str):
    """Reference: the first j such that prefix + pieces[0] + ... + pieces[j] contains stop, or None."""
    return next((j for j in range(len(pieces)) if stop in prefix + "".join(pieces[: j + 1])), None)


def _straddling_stops(prompt_texts, rows_pieces):
    """Per row, a stop string made of the end of one generated token and the start of the next (neither token
    contains it alone). Kept only if, in every row, it is first completed at the same token whether the prompt's
    text is prepended (transformers' criterion) or not (ours): the comparison is then about the same thing.
    Returns [(stop string, row, j)]: in that row it is first completed at token j, straddling tokens j-1 and j."""
    chosen = []
    for row, pieces in enumerate(rows_pieces):
        for j in range(1, len(pieces)):
            a, b = pieces[j - 1], pieces[j]
            stop = a[-2:] + b[:1]
            if not a.strip() or not b.strip() or stop in a or stop in b or stop in [c[0] for c in chosen]:
                continue
            if _first_text_stop("", pieces, stop) == j and all(
                _first_text_stop(pt, ps, stop) == _first_text_stop("", ps, stop)
                for pt, ps in zip(prompt_texts, rows_pieces)
            ):
                chosen.append((stop, row, j))
                break
    return chosen


def test_stop_strings_match_transformers(tmp_path):
    import torch

    tok = _tiny_bpe_tokenizer()
    path = make_tiny_llama(
        tmp_path / "bpe_llama", vocab_size=len(tok), bos_token_id=None, eos_token_id=2, pad_token_id=0
    )
    model, _ = load_hf(path)
    torch_model = load_torch_model(path)
    prompts = [
        np.asarray(tok(t, add_special_tokens=False)["input_ids"], np.int32)
        for t in ("the stop", "she sells sea", "a quick brown fox jumps")
    ]
    tokens, mask = _left_pad(prompts, max(map(len, prompts)))
    base = generate(model, tokens, mask, max_new_tokens=NEW, temperature=0.0)
    rows_pieces = [[tok.decode([int(t)]) for t in row] for row in np.asarray(base.tokens)]
    chosen = _straddling_stops([tok.decode(p.tolist()) for p in prompts], rows_pieces)
    assert len(chosen) >= 2, (rows_pieces, chosen)
    stop_strings = [stop for stop, _, _ in chosen]
    out = generate(model, tokens, mask, max_new_tokens=NEW, temperature=0.0, stop_strings=stop_strings, tokenizer=tok)
    for i, p in enumerate(prompts):
        ref = torch_model.generate(
            torch.as_tensor(p[None], dtype=torch.long),
            max_new_tokens=NEW,
            do_sample=False,
            stop_strings=stop_strings,
            tokenizer=tok,
            pad_token_id=0,
            eos_token_id=None,
        )[0, len(p) :].numpy()
        n = len(ref)
        np.testing.assert_array_equal(np.asarray(out.tokens[i, :n]), ref)
        assert int(out.lengths[i]) == n and (np.asarray(out.tokens[i, n:]) == 0).all()
        assert np.asarray(out.mask[i, :n]).all() and not np.asarray(out.mask[i, n:]).any()
    # rows end at the token completing their own straddling stop string (or earlier, at another one)
    assert all(int(out.lengths[row]) <= j + 1 for _, row, j in chosen)
    assert any(int(out.lengths[row]) == j + 1 for _, row, j in chosen), (chosen, np.asarray(out.lengths))


def test_stop_argument_errors(llama):
    tokens, mask = np.ones((1, 3), np.int32), np.ones((1, 3), bool)
    kw = {"max_new_tokens": 2, "temperature": 0.0}
    for bad, match in [
        ([[]], r"stop_sequences\[0\] is empty"),
        ([[1, 2.0]], r"stop_sequences\[0\]\[1\]"),
        ([1, 2], "flat list"),
        ([[1], [True]], r"\[1\]\[0\]"),
        ([[10_000]], "vocabulary"),
        ("ab", "list of token-id lists"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate(llama, tokens, mask, stop_sequences=bad, **kw)
    with pytest.raises(ValueError, match="needs tokenizer"):
        generate(llama, tokens, mask, stop_strings=["x"], **kw)
    with pytest.raises(ValueError, match="list of str"):
        generate(llama, tokens, mask, stop_strings="x", tokenizer=_PieceTokenizer(), **kw)
    with pytest.raises(ValueError, match="non-empty str"):
        generate(llama, tokens, mask, stop_strings=[""], tokenizer=_PieceTokenizer(), **kw)
    with pytest.raises(ValueError, match="decode"):
        generate(llama, tokens, mask, stop_strings=["x"], tokenizer=object(), **kw)


# ------------------------------------------------------------------------------------------- sharding
def _sharded_inputs(llama_dir, shape):
    """The tiny Llama loaded onto a make_mesh(shape) mesh by the rules, and 8 left-padded prompts placed with
    the batch sharding (over data × fsdp), plus their host copies."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = make_mesh(shape)
    sharded, _ = load_hf(llama_dir, mesh=mesh)
    rng = np.random.RandomState(1)
    prompts = [rng.randint(3, 250, n).astype(np.int32) for n in (5, 9, 3, 7, 2, 8, 6, 4)]
    tokens, mask = _left_pad(prompts, 9)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    return sharded, tokens, mask, jax.device_put(tokens, batch), jax.device_put(mask, batch)


def _assert_same_generation(llama, sharded, tokens, mask, s_tokens, s_mask):
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 50, "top_p": 0.9, "rng": jax.random.key(11)}):
        ref = generate(llama, tokens, mask, max_new_tokens=NEW, eos_token_id=7, **kw)
        out = generate(sharded, s_tokens, s_mask, max_new_tokens=NEW, eos_token_id=7, **kw)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(ref.mask))
        np.testing.assert_allclose(np.asarray(out.logps), np.asarray(ref.logps), atol=1e-5)
    # stop strings on sharded outputs (same compiled program: they are applied afterwards): same cut, same layout
    letters = _LetterTokenizer()
    ref = generate(llama, tokens, mask, max_new_tokens=NEW, eos_token_id=7, temperature=0.0)
    stop = letters.decode(np.asarray(ref.tokens[0, 2:4]).tolist())
    out = generate(
        sharded,
        s_tokens,
        s_mask,
        max_new_tokens=NEW,
        eos_token_id=7,
        temperature=0.0,
        stop_strings=[stop],
        tokenizer=letters,
    )
    cut = truncate_at_stop_strings(ref, letters, [stop], pad_token_id=0)
    assert int(cut.lengths[0]) <= 4
    for field in ("tokens", "mask", "lengths"):
        np.testing.assert_array_equal(np.asarray(getattr(out, field)), np.asarray(getattr(cut, field)))
    assert (
        out.tokens.sharding
        == generate(sharded, s_tokens, s_mask, max_new_tokens=NEW, eos_token_id=7, temperature=0.0).tokens.sharding
    )


class _LetterTokenizer:
    """decode: token id i → letter i mod 10 (several ids share a letter)."""

    def decode(self, ids):
        return "".join("abcdefghij"[int(i) % 10] for i in ids)


def test_sharded_generate_equals_unsharded(llama, llama_dir):
    """Policy sharded by the rules on a data 2 × fsdp 4 mesh of the 8 CPU devices, prompts sharded on the batch
    axis, no mesh context: the same greedy tokens, and the same sampled tokens for the same rng."""
    _assert_same_generation(llama, *_sharded_inputs(llama_dir, (2, 4, 1)))


@pytest.mark.slow
def test_sharded_generate_tensor_parallel_and_cache_layout(llama, llama_dir):
    """fsdp 4 × tensor 2: same tokens as unsharded; the compiled program's KV cache is split like the policy —
    the batch over data × fsdp, the key/value heads over tensor: [L, N/4, S, K/2, hd] per device."""
    import sys

    sharded, tokens, mask, s_tokens, s_mask = _sharded_inputs(llama_dir, (1, 4, 2))
    _assert_same_generation(llama, sharded, tokens, mask, s_tokens, s_mask)
    hlo = (
        sys.modules["rpo_jax.models.generate"]
        ._generate_jit.lower(
            sharded,
            s_tokens,
            s_mask,
            jax.random.key(0),
            max_new_tokens=NEW,
            temperature=0.0,
            top_k=None,
            top_p=None,
            eos_ids=(),
            pad_id=0,
        )
        .compile()
        .as_text()
    )
    c = sharded.config
    assert f"f32[{c.num_layers},2,{9 + NEW},{c.num_kv_heads // 2},{c.head_dim}]" in hlo
    assert f"f32[{c.num_layers},8,{9 + NEW},{c.num_kv_heads},{c.head_dim}]" not in hlo


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
        ref = torch_model.generate(
            torch.as_tensor(p[None], dtype=torch.long),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )[0, len(p) :].numpy()
        n = len(ref) if tok.eos_token_id not in ref else int(np.argmax(ref == tok.eos_token_id)) + 1
        np.testing.assert_array_equal(np.asarray(out.tokens[i, :n]), ref[:n])
    assert "Paris" in tok.decode(np.asarray(out.tokens[0])[: int(out.lengths[0])].tolist())
