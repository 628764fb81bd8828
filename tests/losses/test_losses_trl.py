"""TRL loss types against formulas written here from TRL's DPOTrainer source (float64 NumPy)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpo_jax.losses import PreferenceLogps
from tests.losses.losses_testlib import (
    as_f64,
    jit_loss,
    log_sigmoid,
    mean_over_pairs,
    preferred_pairs,
    random_batch,
    sigmoid,
)

BETA = 0.3


def _trl_formula(name, c, r, hp):
    """TRL per-sequence loss from chosen/rejected log-ratios c, r (float64)."""
    beta = hp.get("beta", BETA)
    d = c - r
    eps = hp.get("label_smoothing", 0.0)
    if name == "hinge":
        return max(0.0, 1 - beta * d)
    if name == "robust":
        return ((-(1 - eps) * log_sigmoid(beta * d)) - (-eps * log_sigmoid(-beta * d))) / (1 - 2 * eps)
    if name == "exo_pair":
        qw, ql = sigmoid(beta * d), sigmoid(-beta * d)
        return qw * (log_sigmoid(beta * d) - math.log1p(-eps)) + ql * (log_sigmoid(-beta * d) - math.log(eps))
    if name == "nca_pair":
        return -log_sigmoid(beta * c) - 0.5 * log_sigmoid(-beta * c) - 0.5 * log_sigmoid(-beta * r)
    if name == "bco_pair":
        return -log_sigmoid(beta * c) - log_sigmoid(-beta * r)
    if name == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if name == "apo_zero":
        return (1 - sigmoid(beta * c)) + sigmoid(beta * r)
    if name == "apo_down":
        return sigmoid(beta * c) + (1 - sigmoid(beta * d))
    if name == "discopop":
        logits = beta * d
        mod = sigmoid(logits / hp["discopop_tau"])
        return -log_sigmoid(logits) * (1 - mod) + math.exp(-logits) * mod
    raise AssertionError(name)


PAIR_CASES = [
    ("hinge", {}),
    ("robust", {"label_smoothing": 0.2}),
    ("exo_pair", {"label_smoothing": 0.01}),
    ("nca_pair", {}),
    ("bco_pair", {}),
    ("sppo_hard", {}),
    ("apo_zero", {}),
    ("apo_down", {}),
    ("discopop", {"discopop_tau": 0.05}),
    ("discopop", {"discopop_tau": 0.5}),
]


@pytest.mark.parametrize("name,hp", PAIR_CASES, ids=[f"{n}-{hp}" for n, hp in PAIR_CASES])
def test_pair_losses_k2(name, hp):
    batch = random_batch(11, b=6, k=2, rewards=False, scale=1.2)
    policy, ref, _, _, _ = as_f64(batch)
    scores = policy - ref
    expected = np.array([_trl_formula(name, scores[b, 0], scores[b, 1], hp) for b in range(6)])
    out = jit_loss(name, beta=BETA, **hp)(batch)
    np.testing.assert_allclose(out.per_example, expected, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(out.loss, expected.mean(), rtol=2e-5)


@pytest.mark.parametrize("name,hp", PAIR_CASES[:3], ids=[n for n, _ in PAIR_CASES[:3]])
def test_pair_losses_k3_average_over_preferred_pairs(name, hp):
    valid = np.array([[True, True, True], [True, False, True], [True, True, False], [False, True, False]])
    batch = random_batch(12, b=4, k=3, valid=valid, scale=1.2)
    policy, ref, _, rewards, valid = as_f64(batch)
    scores = policy - ref
    per_ex, expected = mean_over_pairs(
        preferred_pairs(rewards, valid), lambda b, i, j: _trl_formula(name, scores[b, i], scores[b, j], hp)
    )
    out = jit_loss(name, beta=BETA, **hp)(batch)
    np.testing.assert_allclose(out.per_example, per_ex, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(out.loss, expected, rtol=2e-5)


def _trl_1_16_sigmoid(c, r, beta):
    """TRL 1.16.0 ``DPOTrainer._compute_loss``, ``loss_type == "sigmoid"``: ``-F.logsigmoid(self.beta *
    delta_score)`` — ``label_smoothing`` is not read by this branch (only by robust, exo_pair, aot, aot_unpaired)."""
    return -log_sigmoid(beta * (c - r))


def _trl_0_12_sigmoid(c, r, beta, label_smoothing):
    """TRL 0.12.0 ``DPOTrainer.dpo_loss``, ``loss_type == "sigmoid"`` (cDPO when ``label_smoothing > 0``):
    ``-F.logsigmoid(self.beta * logits) * (1 - self.label_smoothing) - F.logsigmoid(-self.beta * logits) *
    self.label_smoothing`` with ``logits = (π_c − π_r) − (ref_c − ref_r)``."""
    logits = c - r
    return -log_sigmoid(beta * logits) * (1 - label_smoothing) - log_sigmoid(-beta * logits) * label_smoothing


def test_trl_1_16_sigmoid_is_dpo_whatever_label_smoothing():
    batch = random_batch(21, b=6, k=2, rewards=False, scale=1.2)
    policy, ref, _, _, _ = as_f64(batch)
    expected = _trl_1_16_sigmoid(policy[:, 0] - ref[:, 0], policy[:, 1] - ref[:, 1], BETA)
    np.testing.assert_allclose(jit_loss("dpo", beta=BETA)(batch).per_example, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.45])
def test_cdpo_is_the_label_smoothed_sigmoid_of_trl_0x(eps):
    batch = random_batch(22, b=6, k=2, rewards=False, scale=1.2)
    policy, ref, _, _, _ = as_f64(batch)
    expected = _trl_0_12_sigmoid(policy[:, 0] - ref[:, 0], policy[:, 1] - ref[:, 1], BETA, eps)
    out = jit_loss("cdpo", beta=BETA, label_smoothing=eps)(batch)
    np.testing.assert_allclose(out.per_example, expected, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(out.loss, expected.mean(), rtol=2e-5)


def test_sigmoid_norm():
    batch = random_batch(13, b=6, k=2, rewards=False)
    policy, ref, lengths, _, _ = as_f64(batch)
    ca = (policy[:, 0] - ref[:, 0]) / np.maximum(lengths[:, 0], 1)
    ra = (policy[:, 1] - ref[:, 1]) / np.maximum(lengths[:, 1], 1)
    expected = -log_sigmoid(BETA * (ca - ra))
    np.testing.assert_allclose(jit_loss("sigmoid_norm", beta=BETA)(batch).per_example, expected, rtol=1e-5)


def test_sigmoid_norm_with_empty_response_clamps_length():
    batch = random_batch(14, b=3, k=2, rewards=False)
    lengths = np.array(batch.lengths)
    lengths[0, 1] = 0
    policy = np.array(batch.policy_logps)
    policy[0, 1] = 0.0
    ref = np.array(batch.ref_logps)
    ref[0, 1] = 0.0
    out = jit_loss("sigmoid_norm")(PreferenceLogps(policy, ref, lengths))
    expected0 = -log_sigmoid(0.1 * ((policy[0, 0] - ref[0, 0]) / lengths[0, 0]))
    np.testing.assert_allclose(out.per_example[0], expected0, rtol=1e-5)


def test_sft_is_token_mean_nll_of_chosen():
    batch = random_batch(15, b=5, k=2, rewards=False)
    policy, _, lengths, _, _ = as_f64(batch)
    expected = -policy[:, 0].sum() / lengths[:, 0].sum()
    out = jit_loss("sft")(PreferenceLogps(batch.policy_logps, None, batch.lengths))
    np.testing.assert_allclose(out.loss, expected, rtol=1e-6)
    np.testing.assert_allclose(out.per_example, np.full(5, expected), rtol=1e-6)


def test_sft_k3_takes_the_best_response():
    batch = random_batch(16, b=4, k=3)
    policy, _, lengths, rewards, _ = as_f64(batch)
    best = rewards.argmax(1)
    expected = -policy[np.arange(4), best].sum() / lengths[np.arange(4), best].sum()
    np.testing.assert_allclose(jit_loss("sft")(batch).loss, expected, rtol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_aot_sorts_over_the_batch(eps):
    batch = random_batch(17, b=7, k=2, rewards=False)
    policy, ref, _, _, _ = as_f64(batch)
    delta = np.sort(policy[:, 0] - policy[:, 1]) - np.sort(ref[:, 0] - ref[:, 1])
    expected = (-(1 - eps) * log_sigmoid(BETA * delta) - eps * log_sigmoid(-BETA * delta)).mean()
    np.testing.assert_allclose(jit_loss("aot", beta=BETA, label_smoothing=eps)(batch).loss, expected, rtol=1e-5)


def test_aot_unpaired_sorts_chosen_and_rejected_separately():
    batch = random_batch(18, b=7, k=2, rewards=False)
    policy, ref, _, _, _ = as_f64(batch)
    delta = np.sort(policy[:, 0] - ref[:, 0]) - np.sort(policy[:, 1] - ref[:, 1])
    expected = (-log_sigmoid(BETA * delta)).mean()
    np.testing.assert_allclose(jit_loss("aot_unpaired", beta=BETA)(batch).loss, expected, rtol=1e-5)


def test_aot_ignores_examples_without_a_pair():
    batch = random_batch(19, b=6, k=2, rewards=False)
    valid = np.ones((6, 2), bool)
    valid[[1, 4], 1] = False
    policy, ref, _, _, _ = as_f64(batch)
    keep = valid.all(1)
    delta = np.sort((policy[:, 0] - policy[:, 1])[keep]) - np.sort((ref[:, 0] - ref[:, 1])[keep])
    batch = PreferenceLogps(batch.policy_logps, batch.ref_logps, batch.lengths, None, valid)
    np.testing.assert_allclose(jit_loss("aot", beta=BETA)(batch).loss, (-log_sigmoid(BETA * delta)).mean(), rtol=1e-5)


def test_discopop_finite_where_trl_formula_overflows():
    policy = jnp.array([[0.0, 1e4], [1e4, 0.0]], jnp.float32)
    ref = jnp.zeros((2, 2), jnp.float32)
    loss = lambda x: jit_loss("discopop", beta=1.0)(PreferenceLogps(x, ref)).loss
    assert np.isfinite(float(loss(policy)))
    assert np.all(np.isfinite(jax.grad(loss)(policy)))


def test_sft_without_rewards_never_trains_on_the_rejected_response():
    batch = random_batch(20, b=3, k=2, rewards=False)
    valid = np.array([[True, True], [False, True], [True, False]])
    policy, _, lengths, _, _ = as_f64(batch)
    expected = -(policy[0, 0] + policy[2, 0]) / (lengths[0, 0] + lengths[2, 0])
    out = jit_loss("sft")(PreferenceLogps(batch.policy_logps, None, batch.lengths, None, valid))
    np.testing.assert_allclose(out.loss, expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.per_example)[1], 0.0)
