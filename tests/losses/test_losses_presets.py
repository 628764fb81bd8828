"""Every preset equals (1) its setting of the general RPO form, computed through another route, and (2) its
textbook formula written here independently in float64 NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpo_jax.losses import PreferenceLogps, bwd_kl, make_loss, rpo_pairwise
from tests.losses.losses_testlib import (
    all_ordered_pairs,
    as_f64,
    jit_loss,
    log_sigmoid,
    mean_over_pairs,
    preferred_pairs,
    random_batch,
    sigmoid,
)

VALID_K4 = np.array(
    [
        [True, True, True, True],
        [True, False, True, True],
        [False, True, False, True],
        [True, False, False, False],
        [True, True, True, False],
    ]
)


def _with_garbage(batch: PreferenceLogps) -> PreferenceLogps:
    """Put NaN into every invalid slot: it must not leak into any value or gradient."""
    valid = np.asarray(batch.valid)

    def spoil(x):
        if x is None:
            return None
        x = np.array(x, np.float32)
        mask = valid if x.ndim == 2 else valid[..., None]
        return np.where(mask, x, np.nan).astype(np.float32)

    return PreferenceLogps(
        spoil(batch.policy_logps), spoil(batch.ref_logps), batch.lengths, spoil(batch.rewards), batch.valid
    )


def pair_batch(seed=0):
    return random_batch(seed, b=6, k=2, rewards=False)


def listwise_batch(seed=1):
    return _with_garbage(random_batch(seed, b=5, k=4, valid=VALID_K4))


def _loss(name, batch, **hp):
    out = jit_loss(name, **hp)(batch)
    return float(out.loss), np.asarray(out.per_example)


# ---------------------------------------------------------------------------------------------------------------
# Textbook formulas (K = 2, response 0 chosen).


def textbook_pairs(batch, fn):
    policy, ref, lengths, _, _ = as_f64(batch)
    per_example = np.array([fn(policy[b], ref[b], lengths[b]) for b in range(policy.shape[0])])
    return per_example.mean(), per_example


def test_dpo_textbook_and_setting():
    batch, beta = pair_batch(), 0.3
    expected, per_ex = textbook_pairs(batch, lambda p, r, l: -log_sigmoid(beta * ((p[0] - p[1]) - (r[0] - r[1]))))
    loss, per_example = _loss("dpo", batch, beta=beta)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(per_example, per_ex, rtol=1e-5)
    # RPO setting, other route: rpo_bwd_kl with an explicit reward gap so large that σ(η Δr*) = 1 in float32.
    rewarded = PreferenceLogps(
        batch.policy_logps, batch.ref_logps, batch.lengths, np.tile(np.float32([1e4, 0.0]), (6, 1))
    )
    np.testing.assert_allclose(_loss("rpo_bwd_kl", rewarded, beta=beta)[0], loss, rtol=1e-6)
    # RPO setting, direct: bwd_kl towards b = +∞ through the general pairwise function.
    policy, ref = jnp.asarray(batch.policy_logps), jnp.asarray(batch.ref_logps)
    mask = jnp.zeros((6, 2, 2), bool).at[:, 0, 1].set(True)
    direct, _ = rpo_pairwise(beta * (policy - ref), jnp.inf, mask, bwd_kl)
    np.testing.assert_allclose(direct, per_ex, rtol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cdpo_textbook_and_setting(eps):
    batch, beta = pair_batch(1), 0.2
    entropy = 0.0 if eps == 0 else -(eps * math.log(eps) + (1 - eps) * math.log(1 - eps))

    def label_smoothed(p, r, l):  # Mitchell's cDPO; TRL <= 0.x sigmoid + label_smoothing, OpenRLHF, NeMo
        z = beta * ((p[0] - p[1]) - (r[0] - r[1]))
        return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)

    expected, per_ex = textbook_pairs(batch, label_smoothed)
    loss, per_example = _loss("cdpo", batch, beta=beta, label_smoothing=eps)
    # cdpo reports the conventional label-smoothed value itself (not the KL, which is H(ε) lower).
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(per_example, per_ex, rtol=1e-5, atol=1e-6)
    grad_cdpo = jax.grad(
        lambda x: jit_loss("cdpo", beta=beta, label_smoothing=eps)(PreferenceLogps(x, batch.ref_logps)).loss
    )(jnp.asarray(batch.policy_logps))
    policy, ref, _, _, _ = as_f64(batch)
    z = beta * ((policy[:, 0] - policy[:, 1]) - (ref[:, 0] - ref[:, 1]))
    dz = (-(1 - eps) * sigmoid(-z) + eps * sigmoid(z)) * beta / policy.shape[0]
    np.testing.assert_allclose(grad_cdpo, np.stack([dz, -dz], 1), rtol=1e-4, atol=1e-7)
    if eps > 0:  # RPO setting: rpo_bwd_kl with η Δr* = logit(1 − ε) is the KL, H(ε) below, with the same gradient.
        target = math.log((1 - eps) / eps)
        rewards = np.tile(np.float32([target, 0.0]), (6, 1))
        rewarded = PreferenceLogps(batch.policy_logps, batch.ref_logps, batch.lengths, rewards)
        np.testing.assert_allclose(_loss("rpo_bwd_kl", rewarded, beta=beta)[0], loss - entropy, rtol=1e-5)
        grad_kl = jax.grad(
            lambda x: jit_loss("rpo_bwd_kl", beta=beta)(PreferenceLogps(x, batch.ref_logps, None, rewards)).loss
        )(jnp.asarray(batch.policy_logps))
        # rpo_bwd_kl averages over both ordered pairs (0, 1) and (1, 0) — the same value by symmetry.
        np.testing.assert_allclose(grad_kl, grad_cdpo, rtol=1e-4, atol=1e-7)


def test_cdpo_k4_averages_the_label_smoothed_loss_over_preferred_pairs():
    batch, beta, eps = listwise_batch(6), 0.3, 0.2
    policy, ref, _, rewards, valid = as_f64(batch)

    def pair(b, i, j):
        z = beta * ((policy[b, i] - ref[b, i]) - (policy[b, j] - ref[b, j]))
        return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)

    per_ex, expected = mean_over_pairs(preferred_pairs(rewards, valid), pair)
    out = jit_loss("cdpo", beta=beta, label_smoothing=eps)(batch)
    np.testing.assert_allclose(out.loss, expected, rtol=1e-5)
    np.testing.assert_allclose(out.per_example, per_ex, rtol=1e-5, atol=1e-7)


def test_cdpo_at_zero_equals_dpo():
    batch = pair_batch(2)
    np.testing.assert_allclose(_loss("cdpo", batch, label_smoothing=0.0)[0], _loss("dpo", batch)[0], rtol=1e-7)


def test_ipo_textbook_and_setting():
    batch, tau = pair_batch(3), 0.25

    def ipo(p, r, l):
        return (((p[0] - r[0]) / l[0] - (p[1] - r[1]) / l[1]) - 1 / (2 * tau)) ** 2

    expected, _ = textbook_pairs(batch, ipo)
    loss, _ = _loss("ipo", batch, beta=tau)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    rewarded = PreferenceLogps(
        batch.policy_logps, batch.ref_logps, batch.lengths, np.tile(np.float32([1 / (2 * tau), 0.0]), (6, 1))
    )
    np.testing.assert_allclose(_loss("rpo_sq", rewarded, beta=1.0, length_normalize=True)[0], loss, rtol=1e-5)


def test_simpo_textbook_and_setting():
    batch, beta, gamma = pair_batch(4), 2.0, 0.7

    def simpo(p, r, l):
        return -log_sigmoid(beta * (p[0] / l[0] - p[1] / l[1]) - gamma)

    expected, _ = textbook_pairs(batch, simpo)
    loss, _ = _loss("simpo", PreferenceLogps(batch.policy_logps, None, batch.lengths), beta=beta, gamma=gamma)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # RPO setting through rpo_bwd_kl: a "reference" that shifts the chosen length-normalised reward by γ/β
    # reproduces the margin, and σ(η Δr*) = 1 gives the +∞ target.
    lengths = np.asarray(batch.lengths, np.float32)
    ref = np.stack([gamma / beta * lengths[:, 0], np.zeros(6, np.float32)], 1)
    shifted = PreferenceLogps(batch.policy_logps, ref, batch.lengths, np.tile(np.float32([1e4, 0.0]), (6, 1)))
    np.testing.assert_allclose(_loss("rpo_bwd_kl", shifted, beta=beta, length_normalize=True)[0], loss, rtol=1e-5)


def _rpo_textbook(batch, distance, beta, eta):
    policy, ref, _, rewards, valid = as_f64(batch)
    implicit = beta * (policy - ref)

    def d(b, i, j):
        a, t = implicit[b, i] - implicit[b, j], eta * (rewards[b, i] - rewards[b, j])
        if distance == "sq":
            return (a - t) ** 2
        p, q = (sigmoid(t), sigmoid(a)) if distance == "bwd_kl" else (sigmoid(a), sigmoid(t))
        return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))

    return mean_over_pairs(all_ordered_pairs(valid), d)


@pytest.mark.parametrize("distance", ["sq", "bwd_kl", "fwd_kl"])
def test_rpo_pairwise_textbook_k4_with_missing_responses(distance):
    batch = listwise_batch()
    per_ex, expected = _rpo_textbook(batch, distance, 0.4, 1.5)
    out = jit_loss(f"rpo_{distance}", beta=0.4, eta=1.5)(batch)
    np.testing.assert_allclose(out.loss, expected, rtol=1e-5)
    np.testing.assert_allclose(out.per_example, per_ex, rtol=1e-5, atol=1e-7)
    assert np.all(np.isfinite(np.asarray(out.per_example)))


def test_distill_dpo_is_rpo_sq_and_textbook():
    batch = listwise_batch(2)
    per_ex, expected = _rpo_textbook(batch, "sq", 0.3, 0.8)
    np.testing.assert_allclose(jit_loss("distill_dpo", beta=0.3, eta=0.8)(batch).loss, expected, rtol=1e-5)
    np.testing.assert_allclose(
        jit_loss("distill_dpo", beta=0.3, eta=0.8)(batch).per_example,
        jit_loss("rpo_sq", beta=0.3, eta=0.8)(batch).per_example,
        rtol=1e-7,
    )


def test_rpo_listwise_textbook_k4():
    batch, beta, eta = listwise_batch(3), 0.5, 2.0
    policy, ref, _, rewards, valid = as_f64(batch)
    per_ex = []
    for b in range(policy.shape[0]):
        v = valid[b]
        if v.sum() < 2:
            per_ex.append(0.0)
            continue
        p = np.exp(eta * rewards[b, v])
        p /= p.sum()
        q = np.exp(beta * (policy[b, v] - ref[b, v]))
        q /= q.sum()
        per_ex.append(np.sum(p * np.log(p / q)))
    out = jit_loss("rpo_listwise", beta=beta, eta=eta)(batch)
    np.testing.assert_allclose(out.per_example, per_ex, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.loss, np.sum(per_ex) / (valid.sum(1) >= 2).sum(), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_listwise_at_k2_equals_pairwise_bwd_kl(seed):
    batch = random_batch(seed, b=8, k=2)
    for hp in ({}, {"beta": 0.7, "eta": 3.0, "length_normalize": True}):
        listwise = jit_loss("rpo_listwise", **hp)(batch)
        pairwise = jit_loss("rpo_bwd_kl", **hp)(batch)
        np.testing.assert_allclose(listwise.per_example, pairwise.per_example, rtol=2e-5, atol=1e-7)


def test_dpo_k4_uses_preferred_pairs_and_excludes_ties():
    batch = listwise_batch(4)
    rewards = np.array(batch.rewards)
    rewards[0, 1] = rewards[0, 0]  # a tie: (0, 1) and (1, 0) are not pairs
    batch = PreferenceLogps(batch.policy_logps, batch.ref_logps, batch.lengths, rewards, batch.valid)
    policy, ref, _, rew, valid = as_f64(batch)
    beta = 0.1

    def dpo(b, i, j):
        return -log_sigmoid(beta * ((policy[b, i] - ref[b, i]) - (policy[b, j] - ref[b, j])))

    per_ex, expected = mean_over_pairs(preferred_pairs(rew, valid), dpo)
    out = jit_loss("dpo", beta=beta)(batch)
    np.testing.assert_allclose(out.loss, expected, rtol=1e-5)
    np.testing.assert_allclose(out.per_example, per_ex, rtol=1e-5, atol=1e-7)


def test_rloo_value_and_setting():
    batch = listwise_batch(5)
    policy, _, _, rewards, valid = as_f64(batch)
    beta, eta = 0.5, 2.0
    per_ex, expected = mean_over_pairs(
        all_ordered_pairs(valid), lambda b, i, j: (eta * (rewards[b, i] - rewards[b, j])) ** 2
    )
    out = jit_loss("rloo", beta=beta, eta=eta)(
        PreferenceLogps(batch.policy_logps, None, batch.lengths, batch.rewards, batch.valid)
    )
    np.testing.assert_allclose(out.loss, expected, rtol=1e-5)

    # Setting: rpo_sq whose (constant) reference equals the current policy — same value and same gradient.
    def loss_rloo(x):
        return jit_loss("rloo", beta=beta, eta=eta)(PreferenceLogps(x, None, None, batch.rewards, batch.valid)).loss

    def loss_rpo(x):
        ref = jax.lax.stop_gradient(x)
        return jit_loss("rpo_sq", beta=beta, eta=eta)(PreferenceLogps(x, ref, None, batch.rewards, batch.valid)).loss

    x = jnp.where(jnp.asarray(batch.valid), jnp.nan_to_num(jnp.asarray(batch.policy_logps)), 0.0)
    np.testing.assert_allclose(jax.grad(loss_rloo)(x), jax.grad(loss_rpo)(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_rloo_gradient_is_the_leave_one_out_estimator(k):
    """∇_ℓ L = −(4βη/K) (r_i − mean_{j≠i} r_j), per valid example, averaged over examples (MATH.md)."""
    rng = np.random.default_rng(k)
    b, beta, eta = 6, 0.7, 1.3
    valid = rng.random((b, k)) < 0.8
    valid[:, :2] = True
    rewards = rng.normal(size=(b, k)).astype(np.float32)
    policy = -rng.uniform(1, 5, size=(b, k)).astype(np.float32)
    loss = lambda x: jit_loss("rloo", beta=beta, eta=eta)(PreferenceLogps(x, None, None, rewards, valid)).loss
    grad = np.asarray(jax.grad(loss)(jnp.asarray(policy)))
    expected = np.zeros((b, k))
    for e in range(b):
        idx = np.flatnonzero(valid[e])
        kv = len(idx)
        for i in idx:
            others = [rewards[e, j] for j in idx if j != i]
            advantage = rewards[e, i] - np.mean(others)
            expected[e, i] = -(4 * beta * eta / kv) * advantage / b
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_reference_free_rpo_drops_the_reference():
    batch = random_batch(7, b=4, k=3)
    with_ref = jit_loss("rpo_sq", reference_free=True)(batch)
    zero_ref = jit_loss("rpo_sq")(
        PreferenceLogps(batch.policy_logps, np.zeros((4, 3), np.float32), batch.lengths, batch.rewards)
    )
    np.testing.assert_allclose(with_ref.loss, zero_ref.loss, rtol=1e-7)
    assert not make_loss("rpo_sq", reference_free=True).requires_reference


@pytest.mark.parametrize("distance", ["sq", "bwd_kl", "fwd_kl"])
def test_loss_gradient_is_math_md_dD_da_times_beta(distance):
    """K = 2: ∂L/∂ℓ_θ(y_0) = −∂L/∂ℓ_θ(y_1) = (β/B)·∂D/∂a with ∂D/∂a from MATH.md's table."""
    batch, beta, eta = random_batch(31, b=5, k=2, scale=1.0), 0.7, 1.5
    policy, ref, _, rewards, _ = as_f64(batch)
    a = beta * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))
    b = eta * (rewards[:, 0] - rewards[:, 1])
    dd_da = {"sq": 2 * (a - b), "bwd_kl": sigmoid(a) - sigmoid(b), "fwd_kl": sigmoid(a) * sigmoid(-a) * (a - b)}[
        distance
    ]
    loss = lambda x: (
        jit_loss(f"rpo_{distance}", beta=beta, eta=eta)(PreferenceLogps(x, batch.ref_logps, None, batch.rewards)).loss
    )
    grad = np.asarray(jax.grad(loss)(jnp.asarray(batch.policy_logps)))
    expected = beta * dd_da / 5
    np.testing.assert_allclose(grad, np.stack([expected, -expected], 1), rtol=1e-4, atol=1e-7)


def test_mrpo_is_the_dpo_setting_with_the_virtual_reference():
    batch = random_batch(32, b=5, k=2, r=3, rewards=False)
    mrpo = jit_loss("mrpo", beta=0.3)(batch)
    rewarded = PreferenceLogps(batch.policy_logps, batch.ref_logps, None, np.tile(np.float32([1e4, 0.0]), (5, 1)))
    rpo = jit_loss("rpo_bwd_kl", beta=0.3, reference_combiner="mrpo")(rewarded)
    np.testing.assert_allclose(mrpo.per_example, rpo.per_example, rtol=1e-6)
