"""MRPO (Le et al., arXiv:2405.16388): the virtual reference, CTRO clipping, ARWC weights, limits, multi-DPO."""

import numpy as np
import pytest

from rpo_jax.losses import PreferenceLogps, make_loss, virtual_reference
from tests.losses.losses_testlib import jit_loss, as_f64, log_sigmoid, random_batch

BETA = 0.2


def _ctro_k2(ref, eps, mode):
    """Authors' K = 2 clipping, written from their code: ε split by |mean over references|, clip each non-primary
    reference into [(1+ε)ℓ_0, (1−ε)ℓ_0]. ref: [B, 2, R] float64."""
    m = ref.mean(-1)  # [B, 2]
    if mode == "adaptive":
        scale = np.abs(m[:, 0]) / (np.abs(m[:, 0]) + np.abs(m[:, 1]))
        eps_y = np.stack([eps * scale, eps * (1 - scale)], 1)
    else:
        eps_y = np.full(m.shape, eps)
    primary = ref[..., 0]
    out = ref.copy()
    for k in range(1, ref.shape[-1]):
        out[..., k] = np.minimum(np.maximum(ref[..., k], primary * (1 + eps_y)), primary * (1 - eps_y))
    return out


def _arwc_k2(ref):
    margin = np.abs(ref[:, 0, :] - ref[:, 1, :]) + 1e-6  # [B, R]
    return margin / margin.sum(-1, keepdims=True)


def _virtual(clipped, alpha):
    """log of the weighted harmonic mean 1 / Σ_k α_k / π_k; alpha [B, R]."""
    return -np.log(np.sum(alpha[:, None, :] * np.exp(-clipped), -1))


def _dpo(policy, ref):
    return -log_sigmoid(BETA * ((policy[:, 0] - policy[:, 1]) - (ref[:, 0] - ref[:, 1])))


def _batch(seed=0, r=3):
    batch = random_batch(seed, b=6, k=2, r=r, rewards=False, scale=1.5)
    ref = np.array(batch.ref_logps)
    ref[..., 1:] = ref[..., :1] * np.random.default_rng(seed).uniform(0.8, 1.25, size=ref[..., 1:].shape)
    return PreferenceLogps(batch.policy_logps, ref.astype(np.float32), batch.lengths)


@pytest.mark.parametrize("mode", ["adaptive", "fixed"])
@pytest.mark.parametrize("alpha", [None, (0.2, 0.5, 0.3)])
def test_mrpo_matches_authors_formula_k2(mode, alpha):
    batch = _batch(1)
    policy, ref, _, _, _ = as_f64(batch)
    weights = _arwc_k2(ref) if alpha is None else np.tile(np.array(alpha), (6, 1))
    virtual = _virtual(_ctro_k2(ref, 0.1, mode), weights)
    out = jit_loss("mrpo", beta=BETA, alpha=alpha, epsilon=0.1, epsilon_mode=mode)(batch)
    np.testing.assert_allclose(out.per_example, _dpo(policy, virtual), rtol=1e-5)


def test_clipping_binds_in_the_test_data():
    ref = np.asarray(_batch(1).ref_logps, np.float64)
    assert np.any(_ctro_k2(ref, 0.1, "adaptive") != ref)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_one_hot_alpha_without_clipping_is_dpo_with_that_reference(k):
    batch = _batch(2)
    policy, ref, _, _, _ = as_f64(batch)
    alpha = tuple(float(i == k) for i in range(3))
    out = jit_loss("mrpo", beta=BETA, alpha=alpha, epsilon=None)(batch)
    dpo = jit_loss("dpo", beta=BETA)(PreferenceLogps(batch.policy_logps, batch.ref_logps[..., k]))
    np.testing.assert_allclose(out.per_example, dpo.per_example, rtol=1e-5)
    np.testing.assert_allclose(out.per_example, _dpo(policy, ref[..., k]), rtol=1e-5)


def test_one_hot_alpha_with_inactive_clipping_is_dpo_with_that_reference():
    batch = _batch(3)
    out = jit_loss("mrpo", beta=BETA, alpha=(0.0, 1.0, 0.0), epsilon=0.9, epsilon_mode="fixed")(batch)
    dpo = jit_loss("dpo", beta=BETA)(PreferenceLogps(batch.policy_logps, batch.ref_logps[..., 1]))
    np.testing.assert_allclose(out.per_example, dpo.per_example, rtol=1e-5)


@pytest.mark.parametrize("alpha", [None, (0.6, 0.4)])
@pytest.mark.parametrize("mode", ["adaptive", "fixed"])
def test_identical_references_give_dpo(alpha, mode):
    batch = _batch(4, r=2)
    ref = np.repeat(np.asarray(batch.ref_logps)[..., :1], 2, axis=-1)
    out = jit_loss("mrpo", beta=BETA, alpha=alpha, epsilon_mode=mode)(PreferenceLogps(batch.policy_logps, ref))
    dpo = jit_loss("dpo", beta=BETA)(PreferenceLogps(batch.policy_logps, ref[..., 0]))
    np.testing.assert_allclose(out.per_example, dpo.per_example, rtol=1e-5)


@pytest.mark.parametrize("alpha", [None, (0.1, 0.3, 0.6)])
@pytest.mark.parametrize("mode", ["adaptive", "fixed"])
def test_epsilon_zero_gives_dpo_with_the_primary_reference(alpha, mode):
    batch = _batch(5)
    out = jit_loss("mrpo", beta=BETA, alpha=alpha, epsilon=0.0, epsilon_mode=mode)(batch)
    dpo = jit_loss("dpo", beta=BETA)(PreferenceLogps(batch.policy_logps, batch.ref_logps[..., 0]))
    np.testing.assert_allclose(out.per_example, dpo.per_example, rtol=1e-5)


def test_virtual_reference_k4_with_missing_responses():
    """General K: ε_y = ε (K_valid/2) |m_y| / Σ_valid |m|, ARWC over all valid ordered pairs."""
    valid = np.array([[True, True, True, True], [True, False, True, True], [True, True, False, False]])
    batch = random_batch(6, b=3, k=4, r=2, valid=valid)
    _, ref, _, _, valid = as_f64(batch)
    eps = 0.2
    expected = np.zeros((3, 4))
    for b in range(3):
        idx = np.flatnonzero(valid[b])
        r = ref[b, idx]  # [Kv, R]
        m = np.abs(r.mean(-1))
        eps_y = eps * (len(idx) / 2) * m / m.sum()
        clipped = r.copy()
        clipped[:, 1] = np.clip(r[:, 1], r[:, 0] * (1 + eps_y), r[:, 0] * (1 - eps_y))
        margins = np.array([np.mean([abs(r[i, k] - r[j, k]) for i in range(len(idx)) for j in range(len(idx)) if i != j])
                            for k in range(2)]) + 1e-6
        alpha = margins / margins.sum()
        expected[b, idx] = -np.log(np.sum(alpha * np.exp(-clipped), -1))
    got = np.asarray(virtual_reference(np.asarray(batch.ref_logps, np.float32), valid, alpha=None, epsilon=eps))
    np.testing.assert_allclose(got[valid], expected[valid], rtol=1e-5)


@pytest.mark.parametrize("loss_name", ["rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl", "rpo_listwise"])
def test_mrpo_combiner_composes_with_every_rpo_distance(loss_name):
    batch = random_batch(7, b=4, k=3, r=3)
    virtual = virtual_reference(np.asarray(batch.ref_logps), np.ones((4, 3), bool), alpha=(0.5, 0.25, 0.25),
                                epsilon=0.1, epsilon_mode="fixed")
    combined = jit_loss(loss_name, reference_combiner="mrpo", alpha=(0.5, 0.25, 0.25), epsilon_mode="fixed")(batch)
    single = jit_loss(loss_name)(PreferenceLogps(batch.policy_logps, np.asarray(virtual), batch.lengths, batch.rewards))
    np.testing.assert_allclose(combined.per_example, single.per_example, rtol=1e-6)


def test_multi_dpo_is_weighted_sum_of_dpo():
    batch = _batch(8)
    policy, ref, _, _, _ = as_f64(batch)
    alpha = (0.5, 0.3, 0.2)
    expected = sum(a * _dpo(policy, ref[..., k]) for k, a in enumerate(alpha))
    out = jit_loss("multi_dpo", beta=BETA, alpha=alpha, epsilon=None)(batch)
    np.testing.assert_allclose(out.per_example, expected, rtol=1e-5)
    clipped = _ctro_k2(ref, 0.1, "adaptive")
    weights = _arwc_k2(ref)
    expected_arwc = sum(weights[:, k] * _dpo(policy, clipped[..., k]) for k in range(3))
    np.testing.assert_allclose(jit_loss("multi_dpo", beta=BETA)(batch).per_example, expected_arwc, rtol=1e-5)


def test_mrpo_needs_a_reference_axis():
    batch = random_batch(9, b=2, k=2, rewards=False)
    with pytest.raises(ValueError, match="ref_logps.*R >= 2"):
        jit_loss("mrpo")(batch)
    with pytest.raises(ValueError, match="ref_logps.*R >= 2"):
        jit_loss("rpo_bwd_kl", reference_combiner="mrpo")(random_batch(9, b=2, k=2))
    with pytest.raises(ValueError, match="ref_logps"):
        jit_loss("mrpo", alpha=(0.5, 0.5))(random_batch(9, b=2, k=2, r=3, rewards=False))
    with pytest.raises(ValueError, match="ref_logps"):
        jit_loss("mrpo")(PreferenceLogps(batch.policy_logps))


def test_loss_attributes():
    f = make_loss("mrpo", alpha=(0.5, 0.25, 0.25))
    assert f.requires_reference and not f.requires_rewards and f.num_references == 3 and f.min_references == 2
    g = make_loss("mrpo")
    assert g.num_references is None and g.min_references == 2
