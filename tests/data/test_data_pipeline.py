"""Grain pipeline: deterministic order, exact resume, disjoint and complete process shards, complete eval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rpo_jax.data import (
    PreferenceRecord,
    epoch_permutation,
    make_eval_batches,
    make_train_iterator,
    num_eval_batches,
    tokenize_records,
)


def _record(i: int) -> PreferenceRecord:
    digits = " ".join(str(int(c)) for c in f"{i:03d}")
    k = 2 + i % 3  # variable K: 2, 3, 4
    responses = tuple(({"role": "assistant", "content": digits[: 2 * j + 1]},) for j in range(k))
    return PreferenceRecord(
        prompt=({"role": "user", "content": f"sort: {digits}"},),
        responses=responses,
        rewards=tuple(float(j) for j in range(k)),
        conversational=True,
        source=("mem.jsonl", i + 1),
    )


@pytest.fixture(scope="module")
def dataset(demo_tokenizer):
    return tokenize_records([_record(i) for i in range(24)], demo_tokenizer, max_length=32)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_epoch_order_follows_seed_and_epoch(dataset):
    it = make_train_iterator(dataset, 4, seed=3, process_index=0, process_count=1)
    assert it.steps_per_epoch == 6
    batches = [next(it) for _ in range(12)]
    for epoch in range(2):
        seen = np.concatenate([b["index"] for b in batches[6 * epoch : 6 * epoch + 6]])
        np.testing.assert_array_equal(seen, epoch_permutation(24, 3, epoch))  # record index == position here
        assert sorted(seen.tolist()) == list(range(24))
    assert it.epoch == 2 and it.step == 12
    first_epochs = [np.concatenate([b["index"] for b in batches[6 * e : 6 * e + 6]]).tolist() for e in range(2)]
    assert first_epochs[0] != first_epochs[1]
    again = make_train_iterator(dataset, 4, seed=3, process_index=0, process_count=1)
    assert all(_same(next(again), b) for b in batches)
    other_seed = make_train_iterator(dataset, 4, seed=4, process_index=0, process_count=1)
    assert next(other_seed)["index"].tolist() != batches[0]["index"].tolist()
    ordered = make_train_iterator(dataset, 4, shuffle=False, process_index=0, process_count=1)
    assert next(ordered)["index"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("stop", [1, 5, 6, 9])
def test_restored_iterator_continues_exactly(dataset, stop):
    reference = make_train_iterator(dataset, 4, seed=7, process_index=1, process_count=2)
    uninterrupted = [next(reference) for _ in range(10)]
    first = make_train_iterator(dataset, 4, seed=7, process_index=1, process_count=2)
    for _ in range(stop):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # must survive JSON (checkpoint metadata)
    resumed = make_train_iterator(dataset, 4, seed=7, process_index=1, process_count=2)
    resumed.set_state(state)
    for expected in uninterrupted[stop:]:
        assert _same(next(resumed), expected)


def test_state_from_another_layout_is_refused(dataset):
    it = make_train_iterator(dataset, 4, seed=7, process_index=0, process_count=1)
    state = it.get_state()
    with pytest.raises(ValueError, match="another layout.*seed"):
        make_train_iterator(dataset, 4, seed=8, process_index=0, process_count=1).set_state(state)


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_shards_are_disjoint_and_complete(dataset, process_count):
    iters = [
        make_train_iterator(dataset, 2, seed=1, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    steps = iters[0].steps_per_epoch
    assert steps == 24 // (2 * process_count)
    for epoch in range(2):
        per_process = [np.concatenate([next(it)["index"] for _ in range(steps)]) for it in iters]
        everything = np.concatenate(per_process)
        assert len(set(everything.tolist())) == 24  # disjoint and complete: 24 = N divisible by P * B
        for step in range(steps):  # each global step is one contiguous block of the epoch's permutation
            block = np.concatenate([pp[2 * step : 2 * step + 2] for pp in per_process])
            np.testing.assert_array_equal(
                block, epoch_permutation(24, 1, epoch)[step * 2 * process_count : (step + 1) * 2 * process_count]
            )


def test_remainder_is_left_out_per_epoch(demo_tokenizer):
    ds = tokenize_records([_record(i) for i in range(10)], demo_tokenizer, max_length=32)
    it = make_train_iterator(ds, 3, seed=0, process_index=0, process_count=1)
    assert it.steps_per_epoch == 3
    seen = np.concatenate([next(it)["index"] for _ in range(3)])
    np.testing.assert_array_equal(seen, epoch_permutation(10, 0, 0)[:9])
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        make_train_iterator(ds, 4, process_index=0, process_count=3)


def test_batches_use_static_buckets(dataset):
    it = make_train_iterator(dataset, 4, seed=0, process_index=0, process_count=1)
    shapes = {next(it)["tokens"].shape for _ in range(12)}
    assert all(s[:2] == (4, dataset.k_max) and s[2] in dataset.buckets for s in shapes)


def test_num_epochs_ends_the_iterator(dataset):
    it = make_train_iterator(dataset, 8, seed=0, num_epochs=2, process_index=0, process_count=1)
    assert len(list(it)) == 6


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_covers_every_example_once(demo_tokenizer, process_count):
    ds = tokenize_records([_record(i) for i in range(11)], demo_tokenizer, max_length=32)
    per_process = [
        list(make_eval_batches(ds, 2, process_index=p, process_count=process_count)) for p in range(process_count)
    ]
    n_batches = num_eval_batches(ds, 2, process_count)
    assert all(len(b) == n_batches for b in per_process)
    indices = np.concatenate([b["index"] for batches in per_process for b in batches])
    real = indices[indices >= 0]
    assert sorted(real.tolist()) == list(range(11))
    pad = sum((~b["valid"].any(-1)).sum() for batches in per_process for b in batches)
    assert pad == n_batches * 2 * process_count - 11
    for batches in per_process:
        for b in batches:
            padding = b["index"] < 0
            assert not b["valid"][padding].any() and (b["tokens"][padding] == 0).all()
            assert b["valid"][~padding].any(-1).all()


def test_process_defaults_come_from_jax(dataset):
    import jax

    it = make_train_iterator(dataset, 4, seed=0)
    state = it.get_state()
    assert (state["process_index"], state["process_count"]) == (jax.process_index(), jax.process_count())
