"""The evaluation statistics (`rpo_jax.models.win_rates`): win rate with ties, the paired bootstrap's coverage,
the length-controlled win rate's limits, length ratio, KL estimate and distinct-n."""

from __future__ import annotations

import numpy as np
import pytest

from rpo_jax.models.win_rates import distinct_n, kl_estimate, lc_win_rate, length_ratio, paired_bootstrap_ci, win_rate


def test_win_rate_counts_ties_as_half_and_weighs_prompts_equally():
    assert win_rate([1, 0, 0.5, 1]) == pytest.approx(0.625)
    # [N, S]: per-prompt means first: (1 + 0)/2 and 1 → 0.75
    assert win_rate([[1, 0], [1, 1]]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        win_rate([1.5])
    with pytest.raises(ValueError, match="N ≥ 1"):
        win_rate([])


def test_bootstrap_is_seeded_and_brackets_the_mean():
    x = np.random.default_rng(1).random(50)
    assert paired_bootstrap_ci(x, seed=3) == paired_bootstrap_ci(x, seed=3)
    low, high = paired_bootstrap_ci(x, seed=3)
    assert low < x.mean() < high
    assert paired_bootstrap_ci(np.full(10, 0.5)) == (0.5, 0.5)


def test_bootstrap_covers_a_bernoulli_mean_95_percent_of_the_time():
    """1000 simulated evaluations of 200 prompts, each won with probability 0.6: the 95 % interval covers 0.6 in
    93–97 % of them (binomial sd of the coverage estimate: 0.7 %)."""
    rng = np.random.default_rng(0)
    sims, n = 1000, 200
    covered = 0
    for i in range(sims):
        prefs = (rng.random(n) < 0.6).astype(float)
        low, high = paired_bootstrap_ci(prefs, seed=i, resamples=1000)
        covered += low <= 0.6 <= high
    assert 0.93 <= covered / sims <= 0.97, covered / sims


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    """A judge that prefers the longer answer whatever it says: the longer-answering policy's raw win rate is high,
    its LC win rate near 0.5."""
    rng = np.random.default_rng(0)
    n = 2000
    policy_len = rng.normal(60, 15, n).round()
    baseline_len = rng.normal(40, 15, n).round()
    d = policy_len - baseline_len
    prefs = (rng.random(n) < 1 / (1 + np.exp(-3 * np.tanh(d / d.std())))).astype(float)
    assert win_rate(prefs) > 0.75
    assert abs(lc_win_rate(prefs, d) - 0.5) < 0.04


def test_length_controlled_win_rate_equals_the_raw_one_at_equal_lengths():
    prefs = np.array([1, 1, 0, 0.5, 1, 0, 1])
    assert lc_win_rate(prefs, np.zeros(7)) == win_rate(prefs)


def test_length_controlled_win_rate_is_the_logistic_intercept():
    """Lengths that carry no information (independent of the preference, balanced): the fitted slope is 0 and
    σ(θ₀) is the mean preference (the score equations Σ(σ(l) − p) = 0 and Σ(σ(l) − p)·z = 0)."""
    prefs = np.array([1, 0, 1, 0, 1, 1, 1, 1.0])
    d = np.array([5, 5, -5, -5, 5, 5, -5, -5.0])
    assert lc_win_rate(prefs, d) == pytest.approx(0.75, abs=1e-5)


def test_length_ratio_kl_and_distinct_n():
    assert length_ratio([[4, 6]], [2, 3]) == pytest.approx(2.0)
    assert length_ratio([1], [0]) == float("inf")
    assert kl_estimate([-1.0, -3.0], [-2.0, -2.0]) == pytest.approx(0.0)
    assert kl_estimate([-1.0, -1.0], [-2.0, -4.0]) == pytest.approx(2.0)
    assert distinct_n(["abab"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert distinct_n([[1, 2, 3]], 1) == 1.0 and distinct_n([[1]], 2) == 0.0
