"""Statistics of a generation-based evaluation (pure numpy / scipy, no JAX): judged win rates with a paired
bootstrap interval, a length-controlled win rate, length ratio, mean reward, a KL estimate and distinct-n.

Conventions: `prefs [N]` float in [0, 1] is the judge's preference for the policy's response over the baseline's
on prompt i (1: policy wins, 0: baseline wins, 0.5: a tie); with several samples per prompt, `prefs [N, S]` and
every statistic treats the prompt as the unit (the bootstrap resamples prompts, keeping each prompt's samples
together: a *paired* bootstrap, as the policy and baseline answer the same prompts).

Which library does what: the bootstrap is numpy's `Generator` (seeded; percentile interval), the length-controlled
fit is `scipy.optimize.minimize` (L-BFGS-B) on the logistic log-likelihood — scipy is already a dependency of
JAX; statsmodels / scikit-learn would add a dependency for one two-parameter fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import optimize, special

#: Bootstrap resamples of every interval (`paired_bootstrap_ci`).
BOOTSTRAP_RESAMPLES = 2000


def _per_prompt(values: np.ndarray | Sequence) -> np.ndarray:
    """`[N]` or `[N, S]` → `[N]` per-prompt means (float64); a ValueError on no prompt or a non-finite value."""
    x = np.asarray(values, np.float64)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"expected [N] or [N, S] values with N ≥ 1, got shape {np.shape(values)}")
    if not np.all(np.isfinite(x)):
        raise ValueError("non-finite values")
    return x


def win_rate(prefs: np.ndarray | Sequence) -> float:
    """The win rate: the mean preference, a tie counting 0.5.

    Args:
        prefs: `[N]` or `[N, S]` preferences in [0, 1] (1: the policy's response wins).

    Returns:
        `mean_i mean_s prefs[i, s]` (every prompt weighs the same).
    """
    x = _per_prompt(prefs)
    if np.any((x < 0) | (x > 1)):
        raise ValueError("preferences must lie in [0, 1]")
    return float(x.mean())


def paired_bootstrap_ci(
    values: np.ndarray | Sequence, *, seed: int = 0, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean over prompts: prompts drawn with replacement (`resamples`
    times, a seeded numpy `Generator`), each resample's mean of per-prompt means; the interval is its
    `(1 − level)/2` and `(1 + level)/2` quantiles.

    Args:
        values: `[N]` or `[N, S]` per-prompt values (preferences, rewards); a prompt's samples stay together.
        seed: the bootstrap's seed (the same seed and values give the same interval).
        level: the coverage, in (0, 1).
        resamples: bootstrap resamples (≥ 1).

    Returns:
        `(low, high)`.
    """
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level={level} must be in (0, 1) and resamples={resamples} ≥ 1")
    x = _per_prompt(values)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, x.size, size=(resamples, x.size))
    means = x[index].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def lc_win_rate(prefs: np.ndarray | Sequence, length_diff: np.ndarray | Sequence) -> float:
    """The length-controlled win rate, in the manner of AlpacaEval 2 (Dubois et al., 2024, arXiv 2404.04475).

    The model (a logistic regression of the preference, fractional targets allowed — a tie is 0.5):

        P(policy preferred | d) = σ(θ₀ + θ₁ · tanh(d / s)),   d = len(policy) − len(baseline) (tokens),
        s = the standard deviation of d over the evaluation,

    fitted by maximum likelihood (`scipy.optimize.minimize`, L-BFGS-B, θ₀ and θ₁ bounded to [−20, 20]); the LC
    win rate is the model's preference at zero length difference, σ(θ₀). AlpacaEval 2's model also has
    per-instruction difficulty terms, which one policy against one baseline cannot identify; they are left out.
    When d does not vary (s = 0: e.g. equal lengths) the length term is not identifiable and is dropped: σ(θ₀) is
    then the mean preference, the raw win rate.

    Args:
        prefs: `[N]` or `[N, S]` preferences in [0, 1].
        length_diff: the same shape: the policy's response length minus the baseline's.

    Returns:
        σ(θ₀) in (0, 1).
    """
    p = np.asarray(prefs, np.float64).reshape(-1)
    d = np.asarray(length_diff, np.float64).reshape(-1)
    if p.shape != d.shape or p.size == 0:
        raise ValueError(f"prefs {np.shape(prefs)} and length_diff {np.shape(length_diff)} must match (N ≥ 1)")
    if np.any((p < 0) | (p > 1)) or not np.all(np.isfinite(d)):
        raise ValueError("preferences must lie in [0, 1] and length differences be finite")
    scale = float(d.std())
    if scale == 0.0:
        return win_rate(p)
    z = np.tanh(d / scale)

    def nll(theta):
        logit = theta[0] + theta[1] * z
        # −Σ [p log σ(l) + (1 − p) log σ(−l)], and its gradient Σ (σ(l) − p) · [1, z]
        value = np.sum(np.logaddexp(0.0, -logit) * p + np.logaddexp(0.0, logit) * (1 - p))
        r = special.expit(logit) - p
        return value, np.array([r.sum(), (r * z).sum()])

    fit = optimize.minimize(nll, np.zeros(2), jac=True, method="L-BFGS-B", bounds=[(-20, 20), (-20, 20)])
    return float(special.expit(fit.x[0]))


def length_ratio(policy_lengths: np.ndarray | Sequence, baseline_lengths: np.ndarray | Sequence) -> float:
    """Mean policy response length over mean baseline response length (∞ when the baseline's mean is 0).

    Args:
        policy_lengths: `[N]` or `[N, S]` response lengths (tokens).
        baseline_lengths: the baseline's, any shape with N ≥ 1 entries.

    Returns:
        `mean(policy) / mean(baseline)`.
    """
    a, b = float(np.mean(policy_lengths)), float(np.mean(baseline_lengths))
    return a / b if b else float("inf")


def kl_estimate(policy_logps: np.ndarray | Sequence, reference_logps: np.ndarray | Sequence) -> float:
    """A Monte-Carlo estimate of KL(π ‖ π_ref) from the policy's own samples y ~ π:
    `mean_y [Σ_t log π(y_t | ·) − Σ_t log π_ref(y_t | ·)]` (unbiased at temperature 1 without top-k / top-p).

    Args:
        policy_logps: `[N]` (or any shape) Σ over each sample's tokens of log π.
        reference_logps: the same samples' Σ log π_ref.

    Returns:
        The mean difference (nats per response).
    """
    a, b = np.asarray(policy_logps, np.float64), np.asarray(reference_logps, np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"policy {a.shape} and reference {b.shape} log-probs must match (≥ 1 sample)")
    return float(np.mean(a - b))


def distinct_n(texts: Sequence[Sequence], n: int) -> float:
    """Distinct-n (Li et al., 2016): distinct n-grams over all n-grams of the responses (1.0: no repetition;
    0.0 when no response has n items).

    Args:
        texts: responses as token sequences (token ids, or a str's characters / `str.split()` words).
        n: the n-gram order, ≥ 1.

    Returns:
        `|{n-grams}| / Σ count of n-grams`.
    """
    if n < 1:
        raise ValueError(f"n={n} must be ≥ 1")
    grams = [tuple(t[i : i + n]) for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
