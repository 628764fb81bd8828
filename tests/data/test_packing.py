"""The packer: every scored token sees exactly its own sequence's context (prompt + earlier response tokens, at its
own positions), every token is packed once (a shared prompt once per row-unit), no segment crosses a row, K
responses stay in one row where they fit, the row count and fill ratio of a hand-worked batch, determinism,
exact resume of a packing iterator, and global response ids across two processes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rpo_jax.data import PreferenceRecord, make_eval_batches, make_train_iterator, tokenize_records
from rpo_jax.data.packing import Packing, fill_ratio, pack_batch, padded_row_count, real_tokens
from rpo_jax.data.tokenize import TokenizedExample, collate_examples


def record(i: int) -> PreferenceRecord:
    """A conversational record with K = 2, 3 or 4 responses of different lengths (digits of i)."""
    digits = " ".join(str(int(c)) for c in f"{i:03d}")
    responses = tuple(({"role": "assistant", "content": digits[: 2 * j + 1]},) for j in range(2 + i % 3))
    return PreferenceRecord(prompt=({"role": "user", "content": f"sort: {digits}"},), responses=responses,
                            rewards=tuple(float(j) for j in range(len(responses))), conversational=True,
                            source=("mem.jsonl", i + 1))


def batch_of(prompts_and_responses, k_max, with_rewards=False):
    """A contract batch from ``[(prompt tokens, [response tokens, ...]), ...]`` (None = a padding example)."""
    examples = []
    for i, item in enumerate(prompts_and_responses):
        if item is None:
            examples.append(None)
            continue
        prompt, responses = item
        examples.append(TokenizedExample(i, tuple(np.asarray(prompt + r, np.int32) for r in responses),
                                         (len(prompt),) * len(responses),
                                         tuple(float(j) for j in range(len(responses))) if with_rewards else None))
    return collate_examples(examples, k_max=k_max, buckets=(8, 16, 32), pad_id=0, with_rewards=with_rewards)


def random_batch(seed, ks=(2, 3, 4, 1, 4, 2)):
    rng = np.random.default_rng(seed)
    items = [(rng.integers(1, 99, rng.integers(1, 7)).tolist(),
              [rng.integers(1, 99, rng.integers(1, 10)).tolist() for _ in range(k)]) for k in ks]
    batch = batch_of(items + [None], k_max=4, with_rewards=True)
    batch["valid"][2, 1] = False  # a masked response
    return batch


def visible(packed, row, q):
    """Slots a query at (row, q) attends to: k ≤ q, real, same segment or the query's parent segment."""
    seg, parent = packed["segment_ids"][row], packed.get("parent_ids", packed["segment_ids"])[row]
    keys = np.arange(q + 1)
    ok = packed["attention_mask"][row, keys] & ((seg[keys] == seg[q]) | (seg[keys] == parent[q]))
    return keys[ok]


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_scored_token_sees_exactly_its_own_sequence(seed, share_prompt):
    """For each valid response k of example b and each scored token t of ``prompt + response`` (loss_mask, t ≥ 1):
    exactly one slot carries response id 1 + b·K + k with that token; its source slot sees, in slot order, the
    tokens ``sequence[:t]`` at positions ``0..t-1`` and nothing else. Invalid and padding responses own no slot."""
    batch = random_batch(seed)
    packed = pack_batch(batch, Packing(20, share_prompt=share_prompt))
    b_count, k_max, _ = batch["tokens"].shape
    for b in range(b_count):
        for k in range(k_max):
            rows, slots = np.nonzero(packed["response_id"] == 1 + b * k_max + k)
            if not batch["valid"][b, k]:
                assert len(rows) == 0
                continue
            n = int(batch["attention_mask"][b, k].sum())
            sequence = batch["tokens"][b, k, :n]
            scored = np.flatnonzero(batch["loss_mask"][b, k, :n])
            scored = scored[scored >= 1]
            assert len(set(rows.tolist())) == 1 and len(slots) == len(scored)  # one row: no segment crosses one
            row = rows[0]
            for slot, t in zip(slots, scored, strict=True):
                assert packed["tokens"][row, slot] == sequence[t] and packed["positions"][row, slot] == t
                context = visible(packed, row, packed["source"][row, slot])
                np.testing.assert_array_equal(packed["tokens"][row, context], sequence[:t])
                np.testing.assert_array_equal(packed["positions"][row, context], np.arange(t))
    assert real_tokens(packed) == real_tokens(batch) == int(packed["sequence_lengths"].sum())
    for key in ("valid", "lengths", "rewards", "index"):
        np.testing.assert_array_equal(packed[key], batch[key])


def test_tokens_are_packed_once_and_a_shared_prompt_once_per_unit():
    """Without sharing the real slots hold exactly the valid sequences' tokens (as a multiset); with sharing,
    each example's prompt once plus its responses. Segments are contiguous runs inside a row."""
    batch = random_batch(3)
    valid = batch["valid"][..., None] & batch["attention_mask"]
    plain = pack_batch(batch, Packing(40))
    assert sorted(plain["tokens"][plain["attention_mask"]].tolist()) == sorted(batch["tokens"][valid].tolist())
    shared = pack_batch(batch, Packing(40, share_prompt=True))
    expected = []
    for b in range(batch["tokens"].shape[0]):
        ks = np.flatnonzero(batch["valid"][b])
        if len(ks) == 0:
            continue
        p = int(np.argmax(batch["loss_mask"][b, ks[0]]))
        expected += batch["tokens"][b, ks[0], :p].tolist() if len(ks) > 1 else []
        for k in ks:
            n = int(batch["attention_mask"][b, k].sum())
            expected += batch["tokens"][b, k, p if len(ks) > 1 else 0:n].tolist()
    assert sorted(shared["tokens"][shared["attention_mask"]].tolist()) == sorted(expected)
    for packed in (plain, shared):
        for seg in packed["segment_ids"]:
            for s in set(seg[seg > 0].tolist()):
                where = np.flatnonzero(seg == s)
                assert np.array_equal(where, np.arange(where[0], where[-1] + 1))


def test_row_count_and_fill_ratio_of_a_worked_example():
    """Rows of 10 slots. Example 0: prompt 3, responses 2 and 3 tokens; example 1: prompt 2, responses 1 and 1.
    Unshared units: example 0's sequences (5 + 6 = 11 > 10) split into units of 5 and 6, example 1 one unit of
    3 + 3 = 6; first-fit decreasing puts 6, 6, 5 into three rows: fill 17/30. Shared: units 3+2+3 = 8 and
    2+1+1 = 4 need two rows: fill 12/20. Padded [2, 2, 8]: 17/32."""
    batch = batch_of([([1, 2, 3], [[4, 5], [6, 7, 8]]), ([9, 10], [[11], [12]])], k_max=2)
    assert fill_ratio(batch) == 17 / 32
    plain = pack_batch(batch, Packing(10))
    assert plain["tokens"].shape == (3, 10) and fill_ratio(plain) == 17 / 30
    shared = pack_batch(batch, Packing(10, share_prompt=True))
    assert shared["tokens"].shape == (2, 10) and fill_ratio(shared) == 12 / 20
    np.testing.assert_array_equal(shared["tokens"][0, :8], [1, 2, 3, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(shared["positions"][0, :8], [0, 1, 2, 3, 4, 3, 4, 5])
    np.testing.assert_array_equal(shared["segment_ids"][0, :8], [1, 1, 1, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(shared["parent_ids"][0, :8], [1, 1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(shared["source"][0, :8], [0, 0, 0, 2, 3, 2, 5, 6])
    np.testing.assert_array_equal(shared["response_id"][0, :8], [0, 0, 0, 1, 1, 2, 2, 2])
    # K responses stay in one row where they fit: 12 slots hold example 0's two sequences together
    wide = pack_batch(batch, Packing(12))
    rows = {k: set(np.nonzero(wide["response_id"] == 1 + k)[0].tolist()) for k in range(2)}
    assert rows[0] == rows[1] and len(rows[0]) == 1
    assert pack_batch(batch, Packing(10, row_multiple=4))["tokens"].shape == (4, 10)


def test_row_counts_follow_the_ladder():
    assert [padded_row_count(n, 1) for n in (1, 2, 3, 4, 5, 6, 7, 9, 13, 17)] == [1, 2, 3, 4, 6, 6, 8, 12, 16, 24]
    assert [padded_row_count(n, 2) for n in (1, 2, 3, 5, 7)] == [2, 2, 4, 6, 8]


def test_packing_is_deterministic_and_refuses_what_it_cannot_pack():
    batch = random_batch(5)
    a, b = pack_batch(batch, Packing(20, True)), pack_batch({k: v.copy() for k, v in batch.items()}, Packing(20, True))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"batch example 0 \(record 0\): response 1 has 9 tokens .* row length 8"):
        pack_batch(batch_of([([1, 2, 3], [[4], [5, 6, 7, 8, 9, 10]])], k_max=2), Packing(8))
    other = batch_of([([1, 2, 3], [[4], [5, 6]])], k_max=2)
    other["tokens"][0, 1, 0] = 7  # response 1 has another prompt
    with pytest.raises(ValueError, match=r"record 0\): data.share_prompt needs one prompt per example, but "
                                         r"response 1's first 3 tokens differ"):
        pack_batch(other, Packing(8, share_prompt=True))
    pack_batch(other, Packing(8))  # without sharing it packs


@pytest.fixture(scope="module")
def dataset(demo_tokenizer):
    return tokenize_records([record(i) for i in range(24)], demo_tokenizer, max_length=32)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_packing_iterator_restores_exactly_and_packs_its_own_rows(dataset, share_prompt):
    """A packing iterator yields pack_batch of the plain iterator's batch (process p's ids offset by p·B·K), and
    restores from its state to the same next batches."""
    packing = Packing(32, share_prompt=share_prompt)
    for process in (0, 1):
        plain = make_train_iterator(dataset, 4, seed=7, process_index=process, process_count=2)
        packed = make_train_iterator(dataset, 4, seed=7, process_index=process, process_count=2, packing=packing)
        batches = [next(packed) for _ in range(5)]
        for got in batches[:3]:
            want = pack_batch(next(plain), packing, response_offset=process * 4 * dataset.k_max)
            assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
        ids = batches[0]["response_id"][batches[0]["response_id"] > 0]
        assert ids.min() >= 1 + process * 4 * dataset.k_max and ids.max() <= (process + 1) * 4 * dataset.k_max
        first = make_train_iterator(dataset, 4, seed=7, process_index=process, process_count=2, packing=packing)
        next(first), next(first)
        resumed = make_train_iterator(dataset, 4, seed=7, process_index=process, process_count=2, packing=packing)
        resumed.set_state(json.loads(json.dumps(first.get_state())))
        for want in batches[2:]:
            got = next(resumed)
            assert all(np.array_equal(got[k], want[k]) for k in want)
    evals = list(make_eval_batches(dataset, 8, process_index=0, process_count=1, packing=packing))
    assert sum(real_tokens(b) for b in evals) == real_tokens(dataset.collate(list(range(len(dataset)))))
