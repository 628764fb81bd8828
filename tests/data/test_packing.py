"""The packer: every scored token sees exactly its own sequence's context (prompt + earlier response tokens, at its
own positions), every token is packed once (a shared prompt once per row-unit), no segment crosses a row, K
responses stay in one row where they fit, the row count and fill ratio of a hand-worked batch, determinism,
exact resume of a packing iterator, and global response ids across two processes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rpo_jax.data import PreferenceRecord, make_eval_batches, make_train_iterator, tokenize_records
from rpo_jax.data.packing import (
    Packing,
    candidate_row_lengths,
    fill_ratio,
    pack_batch,
    packing_saves,
    padded_row_count,
    real_tokens,
    row_counts,
    shape_ladder,
)
from rpo_jax.data.tokenize import TokenizedExample, collate_examples


def record(i: int) -> PreferenceRecord:
    """A conversational record with K = 2, 3 or 4 responses of different lengths (digits of i)."""
    digits = " ".join(str(int(c)) for c in f"{i:03d}")
    responses = tuple(({"role": "assistant", "content": digits[: 2 * j + 1]},) for j in range(2 + i % 3))
    return PreferenceRecord(
        prompt=({"role": "user", "content": f"sort: {digits}"},),
        responses=responses,
        rewards=tuple(float(j) for j in range(len(responses))),
        conversational=True,
        source=("mem.jsonl", i + 1),
    )


def batch_of(prompts_and_responses, k_max, with_rewards=False):
    """A contract batch from ``[(prompt tokens, [response tokens, ...]), ...]`` (None = a padding example)."""
    examples = []
    for i, item in enumerate(prompts_and_responses):
        if item is None:
            examples.append(None)
            continue
        prompt, responses = item
        examples.append(
            TokenizedExample(
                i,
                tuple(np.asarray(prompt + r, np.int32) for r in responses),
                (len(prompt),) * len(responses),
                tuple(float(j) for j in range(len(responses))) if with_rewards else None,
            )
        )
    return collate_examples(examples, k_max=k_max, buckets=(8, 16, 32), pad_id=0, with_rewards=with_rewards)


def random_batch(seed, ks=(2, 3, 4, 1, 4, 2)):
    rng = np.random.default_rng(seed)
    items = [
        (
            rng.integers(1, 99, rng.integers(1, 7)).tolist(),
            [rng.integers(1, 99, rng.integers(1, 10)).tolist() for _ in range(k)],
        )
        for k in ks
    ]
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
            expected += batch["tokens"][b, k, p if len(ks) > 1 else 0 : n].tolist()
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


def test_row_counts_are_capped_at_the_padded_sequence_count():
    assert padded_row_count(5, 1, cap=5) == 5 and padded_row_count(5, 2, cap=6) == 6  # the ladder gives 6 and 6
    assert padded_row_count(7, 1, cap=8) == 8 and padded_row_count(9, 1, cap=10) == 10  # 8 and 12 on the ladder
    # five 8-token sequences in rows of 8: five rows (not the ladder's six), never more slots than padded
    batch = batch_of([([1, 2, 3], [[4, 5, 6, 7, 8]])] * 5, k_max=1)
    assert pack_batch(batch, Packing(8))["tokens"].shape == (5, 8)
    assert pack_batch(batch, Packing(8, row_multiple=2))["tokens"].shape == (6, 8)


def test_candidate_row_lengths():
    assert candidate_row_lengths(300, 2048) == [384, 512, 768, 1024, 1536, 2048]
    assert candidate_row_lengths(1025, 2048) == [1536, 2048]
    assert candidate_row_lengths(10, 200) == [128, 200] and candidate_row_lengths(90, 100) == [100]
    assert candidate_row_lengths(0, 128) == [128]
    # rows up to max_row_length past the batch's own T_pad, which stays a candidate
    assert candidate_row_lengths(300, 512, 1024) == [384, 512, 768, 1024]
    assert candidate_row_lengths(10, 200, 1024) == [128, 200, 256, 384, 512, 768, 1024]
    assert candidate_row_lengths(10, 200, 1000) == [128, 200, 256, 384, 512, 768, 1000]
    assert candidate_row_lengths(300, 512, 300) == candidate_row_lengths(300, 512)  # below T_pad: T_pad's


def long_batch(lengths, prompt=50):
    """One example per row of ``lengths``: a ``prompt``-token prompt and responses making sequences of the given
    lengths, padded to the 512 bucket."""
    rng = np.random.default_rng(0)
    items = [
        (rng.integers(1, 99, prompt).tolist(), [rng.integers(1, 99, n - prompt).tolist() for n in row])
        for row in lengths
    ]
    examples = [
        TokenizedExample(i, tuple(np.asarray(p + r, np.int32) for r in rs), (len(p),) * len(rs), None)
        for i, (p, rs) in enumerate(items)
    ]
    return collate_examples(examples, k_max=max(map(len, lengths)), buckets=(256, 512), pad_id=0, with_rewards=False)


def test_automatic_row_length_takes_the_fewest_slots():
    """Sequences 300 + 250 and 200 + 100 tokens, padded [2, 2, 512] = 2048 slots. Rows of 384 (the candidates are
    384 and 512): units 300, 250 (550 > 384) and 300 need three rows = 1152 slots; rows of 512 also need three
    (300 + 250 > 512, 300 + 250 > 512) = 1536. So T = 384, R = 3. Shared prompt (50 tokens): at 384 example 0's
    unit 50 + 250 + 200 = 500 splits into 300 and 250 (the prompt repeated), example 1 is one unit of
    50 + 150 + 50 = 250, and no two of 300, 250, 250 share a row: 1152 slots; at 512 the units 500 and 250 take
    two rows = 1024 slots, so T = 512, R = 2."""
    batch = long_batch([[300, 250], [200, 100]])
    plain = pack_batch(batch, Packing(0))
    assert plain["tokens"].shape == (3, 384) and fill_ratio(plain) == 850 / 1152
    shared = pack_batch(batch, Packing(0, share_prompt=True))
    assert shared["tokens"].shape == (2, 512) and fill_ratio(shared) == 750 / 1024
    assert pack_batch(batch, Packing(512))["tokens"].shape == (3, 512)  # a fixed row length is kept
    # with attention counted, 2 rows of 512 cost 1024·(1 + 512c), 3 of 384 cost 1152·(1 + 384c): equal at c = 1/640
    for key_cost, shape in ((0.0015, (2, 512)), (0.0017, (3, 384))):
        assert pack_batch(batch, Packing(0, share_prompt=True, key_cost=key_cost))["tokens"].shape == shape


def test_rows_may_be_longer_than_the_batch_up_to_max_row_length():
    """The worked example above (T_pad 512) with `max_row_length` 1024 (candidates 384, 512, 768, 1024). Shared
    prompt: the units 500 and 250 take one row of 768 (750 tokens) = 768 slots, fewer than 2 × 512 = 1024. Plain:
    example 0's two sequences (300 + 250 = 550) are one unit once a row holds them, example 1's (200 + 100) another;
    at 1024 both share one row = 1024 slots, fewer than 3 × 384 = 1152 (at 768: 550 + 300 > 768, two rows). With
    c = 1/640, one row of 1024 costs 1024·(1 + 1024/640) = 2662.4 and three of 384 1152·1.6 = 1843.2 (two of 512
    1536·1.8, two of 768 1536·2.2): 3 × 384 again. A limit below T_pad changes nothing; every token is in a row."""
    batch = long_batch([[300, 250], [200, 100]])
    shared = pack_batch(batch, Packing(0, share_prompt=True, max_row_length=1024))
    assert shared["tokens"].shape == (1, 768) and fill_ratio(shared) == 750 / 768
    plain = pack_batch(batch, Packing(0, max_row_length=1024))
    assert plain["tokens"].shape == (1, 1024) and fill_ratio(plain) == 850 / 1024
    assert np.array_equal(
        np.sort(plain["tokens"][plain["attention_mask"]]), np.sort(batch["tokens"][batch["attention_mask"]])
    )
    assert pack_batch(batch, Packing(0, max_row_length=1024, key_cost=1 / 640))["tokens"].shape == (3, 384)
    assert pack_batch(batch, Packing(0, max_row_length=300))["tokens"].shape == (3, 384)
    assert pack_batch(batch, Packing(512, max_row_length=1024))["tokens"].shape == (3, 512)  # a fixed length is kept
    with pytest.raises(ValueError, match="max_row_length"):
        Packing(0, max_row_length=-1)


def test_max_slots_limits_the_rows_chosen():
    """The worked example above (shared prompt: 2 rows of 512 = 1024 slots, or 3 of 384 = 1152): a limit of 1100
    slots leaves 512 in; a limit of 1000 fits neither, so the layout of fewest slots is kept (2 × 512); without a
    shared prompt the cheapest, 3 × 384 = 1152 slots, fits 1200 but not 1100, where rows of 512 (1536) do not
    either: 3 × 384 stays. Equal costs: the fewer slots."""
    batch = long_batch([[300, 250], [200, 100]])
    for limit, shape in ((1100, (2, 512)), (1000, (2, 512))):
        assert pack_batch(batch, Packing(0, share_prompt=True, max_slots=limit))["tokens"].shape == shape
    for limit in (1200, 1100):
        assert pack_batch(batch, Packing(0, max_slots=limit))["tokens"].shape == (3, 384)
    # 3 × 384 (cost 1152·(1 + 384c)) against 2 × 512 (1024·(1 + 512c)): with c = 1/640 equal, the fewer slots win
    assert pack_batch(batch, Packing(0, share_prompt=True, key_cost=1 / 640))["tokens"].shape == (2, 512)
    with pytest.raises(ValueError, match="max_slots"):
        Packing(0, max_slots=-1)


def test_every_packed_shape_is_on_the_ladder_and_the_ladder_is_bounded():
    """Random batches (B = 8 examples, the last one padding, of up to K = 4 responses, buckets 8 / 16 / 32) packed
    with every setting give only shapes of `shape_ladder`, whose size is (row lengths) × (row counts): the 3
    buckets (and 64 with `max_row_length` 64) × the counts 1, 2, 3, 4, 6, 8, 12, 16, 24, 32 (the cap: B·K) — 40 at
    most, however many batches."""
    assert row_counts(1, 24) == [1, 2, 3, 4, 6, 8, 12, 16, 24] and row_counts(4, 24) == [4, 8, 12, 16, 24]
    assert row_counts(2, 10) == [2, 4, 6, 8, 10]
    settings = (
        (Packing(0), 1),
        (Packing(0, share_prompt=True), 1),
        (Packing(32), 1),
        (Packing(0), 2),
        (Packing(0, share_prompt=True, max_row_length=64), 1),
    )
    for packing, micro in settings:
        ladder = shape_ladder(8, 4, (8, 16, 32), packing, micro_batches=micro)
        lengths = {t for _, t in ladder}
        assert len(ladder) == len(lengths) * len(row_counts(1, 32 // micro)) <= 40
        for seed in range(20):
            batch = random_batch(seed, ks=tuple(int(k) for k in np.random.default_rng(seed).integers(1, 5, 7)))
            assert batch["valid"].shape[0] == 8
            packed = pack_batch(batch, packing, micro_batches=micro)
            assert tuple(packed["tokens"].shape) in ladder
    assert shape_ladder(16, 2, (256, 512, 1024), Packing(0)) == sorted(
        (r, t) for t in (128, 256, 384, 512, 768, 1024) for r in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    )
    # rows up to max_row_length: the row lengths of the largest bucket, whatever the data's buckets
    assert shape_ladder(16, 2, (256, 512), Packing(0, max_row_length=1024)) == shape_ladder(
        16, 2, (256, 512, 1024), Packing(0)
    )


def test_min_saving_keeps_batches_padded_unless_packing_saves_enough():
    batch = long_batch([[300, 250], [200, 100]])  # packs into 1152 of 2048 slots: saves 44 %
    assert packing_saves(pack_batch(batch, Packing(0)), batch, Packing(0, min_saving=0.4))
    assert "response_id" in pack_batch(batch, Packing(0, min_saving=0.4))
    kept = pack_batch(batch, Packing(0, min_saving=0.5))
    assert kept.keys() == batch.keys() and all(np.array_equal(kept[k], batch[k]) for k in batch)
    with pytest.raises(ValueError, match="min_saving must be in"):
        Packing(0, min_saving=1.0)


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("micro_batches,first_example", [(2, 0), (3, 0), (2, 7)])
def test_micro_batch_layout_gives_each_slice_its_own_examples(micro_batches, first_example, share_prompt):
    """Packed for M micro-batches, slice m of the rows (rows m, m+M, ...: the step's split) holds exactly the
    scored tokens of the global examples g ≡ m (mod M), under ids 1 + (g // M)·K + k, at their own positions."""
    batch = random_batch(3, ks=(2, 3, 4, 1, 4, 2, 3, 2, 1, 4, 2))  # 12 examples with the padding one
    b_count, k_max = batch["valid"].shape
    packed = pack_batch(
        batch, Packing(24, share_prompt=share_prompt), first_example=first_example, micro_batches=micro_batches
    )
    assert packed["tokens"].shape[0] % micro_batches == 0
    for m in range(micro_batches):
        ids, tokens, positions = (
            packed[key][m::micro_batches].reshape(-1) for key in ("response_id", "tokens", "positions")
        )
        expected = set()
        for b in range(b_count):
            g = first_example + b
            for k in range(k_max):
                scored = np.flatnonzero(batch["loss_mask"][b, k][1:]) + 1
                if g % micro_batches != m or not batch["valid"][b, k] or not len(scored):
                    continue
                i = 1 + g // micro_batches * k_max + k
                expected.add(i)
                np.testing.assert_array_equal(tokens[ids == i], batch["tokens"][b, k, scored])
                np.testing.assert_array_equal(positions[ids == i], scored)
        assert set(ids[ids > 0].tolist()) == expected
    assert real_tokens(packed) == real_tokens(batch)


def test_packing_is_deterministic_and_refuses_what_it_cannot_pack():
    batch = random_batch(5)
    a, b = pack_batch(batch, Packing(20, True)), pack_batch({k: v.copy() for k, v in batch.items()}, Packing(20, True))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"batch example 0 \(record 0\): response 1 has 9 tokens .* row length 8"):
        pack_batch(batch_of([([1, 2, 3], [[4], [5, 6, 7, 8, 9, 10]])], k_max=2), Packing(8))
    other = batch_of([([1, 2, 3], [[4], [5, 6]])], k_max=2)
    other["tokens"][0, 1, 0] = 7  # response 1 has another prompt
    with pytest.raises(
        ValueError,
        match=r"record 0\): data.share_prompt needs one prompt per example, but "
        r"response 1's first 3 tokens differ",
    ):
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
            want = pack_batch(next(plain), packing, first_example=process * 4)
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
