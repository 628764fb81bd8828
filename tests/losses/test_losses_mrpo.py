"""MRPO (Le et al., arXiv:2405.16388): the virtual reference, CTRO clipping, ARWC weights, limits, multi-DPO."""

import jax
import numpy as np
import pytest

from rpo_jax.losses import PreferenceLogps, make_loss, virtual_reference
from tests.losses.losses_testlib import as_f64, jit_loss, log_sigmoid, random_batch

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
        margins = (
            np.array(
                [
                    np.mean([abs(r[i, k] - r[j, k]) for i in range(len(idx)) for j in range(len(idx)) if i != j])
                    for k in range(2)
                ]
            )
            + 1e-6
        )
        alpha = margins / margins.sum()
        expected[b, idx] = -np.log(np.sum(alpha * np.exp(-clipped), -1))
    got = np.asarray(virtual_reference(np.asarray(batch.ref_logps, np.float32), valid, alpha=None, epsilon=eps))
    np.testing.assert_allclose(got[valid], expected[valid], rtol=1e-5)


@pytest.mark.parametrize("loss_name", ["rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl", "rpo_listwise"])
def test_mrpo_combiner_composes_with_every_rpo_distance(loss_name):
    batch = random_batch(7, b=4, k=3, r=3)
    virtual = virtual_reference(
        np.asarray(batch.ref_logps), np.ones((4, 3), bool), alpha=(0.5, 0.25, 0.25), epsilon=0.1, epsilon_mode="fixed"
    )
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


# ---------------------------------------------------------------------------------------------------------------
# arwc="authors_code": the authors' two-reference weighting, against a direct transcription of their code.


def _authors_code_mrpo_k2(policy, ref, beta, eta):
    """Per-example MRPO loss transcribed line by line from the authors' code, github.com/thaihungle/MRPO,
    src/llmtuner/train/dpo/trainer_mref.py (commit 4171095f), ``MRefDPOTrainer.get_batch_loss_metrics``: MRPO
    branch (``mref_naive=False``), adaptive alpha (``self.alpha < 0``), CTRO clipping rate ``self.eta = eta``
    (``eta < 0``: fixed rate ``-eta``), then TRL's sigmoid ``dpo_loss`` with ``label_smoothing = 0``.

    Their ``ref_model2`` (the policy's initial model, around which the other is clipped) is our primary reference,
    index 0; their ``ref_model`` is our index 1. policy: [B, 2]; ref: [B, 2, 2] float64.
    """
    reference_chosen_logps, reference_rejected_logps = ref[:, 0, 1].copy(), ref[:, 1, 1].copy()
    reference_chosen_logps2, reference_rejected_logps2 = ref[:, 0, 0], ref[:, 1, 0]
    eta1 = eta2 = eta
    a2 = reference_chosen_logps2 - reference_rejected_logps2
    a1 = reference_chosen_logps - reference_rejected_logps
    alpha = np.abs(a1) / (np.abs(a1) + np.abs(a2) + 1e-6)
    b1 = (reference_chosen_logps2 + reference_chosen_logps) / 2
    b2 = (reference_rejected_logps2 + reference_rejected_logps) / 2
    scale = np.abs(b1) / (np.abs(b1) + np.abs(b2))
    eta1 = eta1 * scale
    eta2 = eta2 * (1 - scale)
    if eta < 0:
        eta1 = eta2 = -eta
    reference_chosen_logps = np.maximum(reference_chosen_logps, reference_chosen_logps2 * (1 + eta1))
    reference_chosen_logps = np.minimum(reference_chosen_logps, reference_chosen_logps2 * (1 - eta1))
    reference_chosen_logps0 = reference_chosen_logps + reference_chosen_logps2
    c = np.maximum(reference_chosen_logps, reference_chosen_logps2)
    p12 = c + np.log(alpha * np.exp(reference_chosen_logps - c) + (1 - alpha) * np.exp(reference_chosen_logps2 - c))
    reference_chosen_logps0 -= p12
    reference_rejected_logps = np.maximum(reference_rejected_logps, reference_rejected_logps2 * (1 + eta2))
    reference_rejected_logps = np.minimum(reference_rejected_logps, reference_rejected_logps2 * (1 - eta2))
    reference_rejected_logps0 = reference_rejected_logps + reference_rejected_logps2
    c = np.maximum(reference_rejected_logps, reference_rejected_logps2)
    p12 = c + np.log(alpha * np.exp(reference_rejected_logps - c) + (1 - alpha) * np.exp(reference_rejected_logps2 - c))
    reference_rejected_logps0 -= p12
    logits = (policy[:, 0] - policy[:, 1]) - (reference_chosen_logps0 - reference_rejected_logps0)
    return -log_sigmoid(beta * logits)


def _two_reference_batch(seed):
    """R = 2 references whose margins differ a lot (so the two weightings differ), some clipped, some not."""
    rng = np.random.default_rng(seed)
    batch = random_batch(seed, b=8, k=2, r=2, rewards=False, scale=1.5)
    ref = np.array(batch.ref_logps)
    ref[..., 1] = ref[..., 0] * rng.uniform(0.7, 1.4, size=ref[..., 1].shape)
    return PreferenceLogps(batch.policy_logps, ref.astype(np.float32), batch.lengths)


@pytest.mark.parametrize("epsilon,mode", [(0.1, "adaptive"), (0.1, "fixed"), (0.6, "adaptive"), (0.0, "fixed")])
def test_mrpo_authors_code_matches_a_transcription_of_their_code(epsilon, mode):
    batch = _two_reference_batch(10)
    policy, ref, _, _, _ = as_f64(batch)
    eta = epsilon if mode == "adaptive" else -epsilon  # their sign convention for the fixed rate
    expected = _authors_code_mrpo_k2(policy, ref, BETA, eta)
    out = jit_loss("mrpo", beta=BETA, epsilon=epsilon, epsilon_mode=mode, arwc="authors_code")(batch)
    np.testing.assert_allclose(out.per_example, expected, rtol=1e-5)
    np.testing.assert_allclose(out.loss, expected.mean(), rtol=1e-5)
    if epsilon > 0:  # the two weightings really differ on this data (ε = 0 is DPO with the primary for both)
        own = jit_loss("mrpo", beta=BETA, epsilon=epsilon, epsilon_mode=mode)(batch)
        assert np.max(np.abs(np.asarray(own.per_example) - expected)) > 1e-3


def test_mrpo_own_margin_is_not_the_authors_code_weighting():
    """The default ("own_margin") is the paper's ARWC, not the code's: on the same data the code's transcription
    equals the paper form only after swapping the weights."""
    batch = _two_reference_batch(11)
    policy, ref, _, _, _ = as_f64(batch)
    clipped = _ctro_k2(ref, 0.1, "adaptive")
    own = _arwc_k2(ref)
    swapped = np.stack([np.abs(ref[:, 0, 1] - ref[:, 1, 1]), np.abs(ref[:, 0, 0] - ref[:, 1, 0])], 1)
    swapped = swapped / (swapped.sum(-1, keepdims=True) + 1e-6)
    swapped[:, 1] = 1 - swapped[:, 0]
    np.testing.assert_allclose(
        _dpo(policy, _virtual(clipped, swapped)), _authors_code_mrpo_k2(policy, ref, BETA, 0.1), rtol=1e-9
    )
    out = jit_loss("mrpo", beta=BETA)(batch)
    np.testing.assert_allclose(out.per_example, _dpo(policy, _virtual(clipped, own)), rtol=1e-5)


def test_arwc_weights_authors_code_k2():
    from rpo_jax.losses import arwc_weights

    _, ref, _, _, valid = as_f64(_two_reference_batch(12))
    a1, a2 = ref[:, 0, 1] - ref[:, 1, 1], ref[:, 0, 0] - ref[:, 1, 0]
    alpha = np.abs(a1) / (np.abs(a1) + np.abs(a2) + 1e-6)  # their weight on 1/π of ref_model2 = our primary
    got = np.asarray(arwc_weights(np.asarray(ref, np.float32), valid, "authors_code"))
    np.testing.assert_allclose(got, np.stack([alpha, 1 - alpha], 1), rtol=1e-5)
    with pytest.raises(ValueError, match="arwc must be one of"):
        arwc_weights(np.asarray(ref, np.float32), valid, "paper")


@pytest.mark.parametrize("mode", ["adaptive", "fixed"])
def test_authors_code_limits(mode):
    batch = _two_reference_batch(13)
    identical = np.repeat(np.asarray(batch.ref_logps)[..., :1], 2, axis=-1)
    out = jit_loss("mrpo", beta=BETA, epsilon_mode=mode, arwc="authors_code")(
        PreferenceLogps(batch.policy_logps, identical)
    )
    dpo = jit_loss("dpo", beta=BETA)(PreferenceLogps(batch.policy_logps, identical[..., 0]))
    np.testing.assert_allclose(out.per_example, dpo.per_example, rtol=1e-5)
    out = jit_loss("mrpo", beta=BETA, epsilon=0.0, epsilon_mode=mode, arwc="authors_code")(batch)
    dpo = jit_loss("dpo", beta=BETA)(PreferenceLogps(batch.policy_logps, batch.ref_logps[..., 0]))
    np.testing.assert_allclose(out.per_example, dpo.per_example, rtol=1e-5)


@pytest.mark.parametrize("loss_name", ["rpo_bwd_kl", "rpo_listwise"])
def test_authors_code_combiner_composes_with_rpo_k3(loss_name):
    """K = 3 (the margins generalised to the mean over valid pairs), through the reference combiner."""
    valid = np.array([[True, True, True], [True, False, True], [True, True, True], [True, True, False]])
    batch = random_batch(14, b=4, k=3, r=2, valid=valid)
    _, ref, _, _, valid = as_f64(batch)
    expected_virtual = np.zeros((4, 3))
    for b in range(4):
        idx = np.flatnonzero(valid[b])
        r = ref[b, idx]
        m = np.abs(r.mean(-1))
        eps_y = 0.1 * (len(idx) / 2) * m / m.sum()
        clipped = r.copy()
        clipped[:, 1] = np.clip(r[:, 1], r[:, 0] * (1 + eps_y), r[:, 0] * (1 - eps_y))
        margins = [
            np.mean([abs(r[i, k] - r[j, k]) for i in range(len(idx)) for j in range(len(idx)) if i != j])
            for k in range(2)
        ]
        alpha0 = margins[1] / (margins[0] + margins[1] + 1e-6)
        expected_virtual[b, idx] = -np.log(alpha0 * np.exp(-clipped[:, 0]) + (1 - alpha0) * np.exp(-clipped[:, 1]))
    got_virtual = np.asarray(virtual_reference(np.asarray(batch.ref_logps), valid, arwc="authors_code"))
    np.testing.assert_allclose(got_virtual[valid], expected_virtual[valid], rtol=1e-5)
    combined = jit_loss(loss_name, reference_combiner="mrpo", arwc="authors_code")(batch)
    single = jit_loss(loss_name)(
        PreferenceLogps(
            batch.policy_logps, expected_virtual.astype(np.float32), batch.lengths, batch.rewards, batch.valid
        )
    )
    np.testing.assert_allclose(combined.per_example, single.per_example, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name_or_weighted_list": "mrpo", "arwc": "authors_code"},
        {"name_or_weighted_list": "rpo_sq", "reference_combiner": "mrpo", "arwc": "authors_code"},
    ],
)
def test_authors_code_needs_exactly_two_references(kwargs):
    f = make_loss(**kwargs)
    assert f.spec.num_references == 2 and f.spec.min_references == 2
    f.spec.check_reference_count(2, given="config.references")
    with pytest.raises(ValueError, match="needs 2 references; config.references gives 3"):
        f.spec.check_reference_count(3, given="config.references")
    batch = random_batch(15, b=2, k=2, r=3)
    for fn in (f, jax.jit(f)):  # at the first call, also at trace time
        with pytest.raises(ValueError, match=r"ref_logps has R = 3 .*arwc='authors_code'.*exactly R = 2"):
            fn(batch)
    assert (
        make_loss(
            kwargs["name_or_weighted_list"],
            **{k: v for k, v in kwargs.items() if k not in ("name_or_weighted_list", "arwc")},
        ).spec.num_references
        is None
    )
