"""Shared helpers for the rpo_jax.losses tests: random batches and independent NumPy reference formulas."""

from __future__ import annotations

import numpy as np

from rpo_jax.losses import PreferenceLogps


def log_sigmoid(x):
    x = np.asarray(x, np.float64)
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return np.exp(log_sigmoid(x))


def random_batch(
    seed: int,
    *,
    b: int = 4,
    k: int = 2,
    r: int | None = None,
    rewards: bool = True,
    valid: np.ndarray | None = None,
    scale: float = 3.0,
) -> PreferenceLogps:
    """A batch of plausible (negative) log-probs; rewards without ties; lengths 1..9; and the prompt + response
    sequence log-probs (``sequence_logps``: the policy's plus 1..5 prompt tokens' log-probs) ORPO's NLL reads."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 10, size=(b, k)).astype(np.int32)
    policy = -rng.uniform(0.5, scale, size=(b, k)) * lengths
    ref_shape = (b, k) if r is None else (b, k, r)
    ref = -rng.uniform(0.5, scale, size=ref_shape) * (lengths if r is None else lengths[..., None])
    rew = rng.normal(size=(b, k)) if rewards else None
    prompt_lengths = rng.integers(1, 6, size=(b, 1)).astype(np.int32)
    prompt = -rng.uniform(0.5, scale, size=(b, 1)) * prompt_lengths
    return PreferenceLogps(
        policy_logps=policy.astype(np.float32),
        ref_logps=ref.astype(np.float32),
        lengths=lengths,
        rewards=None if rew is None else rew.astype(np.float32),
        valid=None if valid is None else np.asarray(valid, bool),
        sequence_logps=(policy + prompt).astype(np.float32),
        sequence_lengths=(lengths + prompt_lengths).astype(np.int32),
    )


def paired_losses() -> list[str]:
    """Every loss of ``available_losses()`` that takes a ``PreferenceLogps`` (not the unpaired KTO/BCO family)."""
    from rpo_jax.losses import available_losses, make_loss

    return [name for name in available_losses() if not make_loss(name).spec.unpaired]


def as_f64(batch: PreferenceLogps):
    """(policy, ref, lengths, rewards, valid) as float64 NumPy arrays (valid defaults to all True)."""
    policy = np.asarray(batch.policy_logps, np.float64)
    valid = np.ones(policy.shape, bool) if batch.valid is None else np.asarray(batch.valid, bool)
    ref = None if batch.ref_logps is None else np.asarray(batch.ref_logps, np.float64)
    lengths = None if batch.lengths is None else np.asarray(batch.lengths, np.float64)
    rewards = None if batch.rewards is None else np.asarray(batch.rewards, np.float64)
    return policy, ref, lengths, rewards, valid


def preferred_pairs(rewards, valid):
    """List (per example) of preferred ordered pairs (i, j): r_i > r_j, or (0, 1) without rewards."""
    out = []
    for b in range(valid.shape[0]):
        k = valid.shape[1]
        if rewards is None:
            out.append([(0, 1)] if valid[b, 0] and valid[b, 1] else [])
        else:
            out.append(
                [
                    (i, j)
                    for i in range(k)
                    for j in range(k)
                    if valid[b, i] and valid[b, j] and rewards[b, i] > rewards[b, j]
                ]
            )
    return out


def all_ordered_pairs(valid):
    k = valid.shape[1]
    return [
        [(i, j) for i in range(k) for j in range(k) if i != j and valid[b, i] and valid[b, j]]
        for b in range(valid.shape[0])
    ]


def mean_over_pairs(pairs_per_example, pair_loss):
    """(per_example, loss) where loss is the mean over examples that have at least one pair."""
    per_example, used = [], []
    for b, pairs in enumerate(pairs_per_example):
        if pairs:
            per_example.append(np.mean([pair_loss(b, i, j) for i, j in pairs]))
            used.append(True)
        else:
            per_example.append(0.0)
            used.append(False)
    per_example = np.array(per_example)
    loss = per_example[used].mean() if any(used) else 0.0
    return per_example, loss


_JIT_CACHE: dict = {}


def jit_loss(name, **hparams):
    """``jax.jit(make_loss(name, **hparams))``, memoised so each loss compiles once per shape in a test session."""
    import jax

    from rpo_jax.losses import make_loss

    key = repr((name, sorted(hparams.items())))
    if key not in _JIT_CACHE:
        _JIT_CACHE[key] = jax.jit(make_loss(name, **hparams))
    return _JIT_CACHE[key]


def check_every_case(cases, check) -> int:
    """Run ``check(*args)`` for every ``(case_id, args)`` of ``cases``: one test item for a table of cases that
    were once one item each. Every case runs even after another fails; the test then fails listing each failing
    case by its id (the old item's parameter id) with its error. Returns the number of cases checked."""
    import pytest

    failures, count = [], 0
    for case_id, args in cases:
        count += 1
        try:
            check(*args)
        except (Exception, pytest.fail.Exception) as error:  # pytest.raises' "DID NOT RAISE" is no Exception
            failures.append(f"[{case_id}] {type(error).__name__}: {error}")
    assert count, "no cases"
    assert not failures, f"{len(failures)} of {count} cases failed:\n" + "\n".join(failures)
    return count
