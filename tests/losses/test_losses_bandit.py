"""Training on the population loss of a tabular bandit converges to the closed-form optimum.

Set-up: ``N`` responses to one prompt, a tabular softmax policy ``π_θ = softmax(θ)``, a reference ``π_ref``,
explicit rewards ``r*``, and a sampling distribution ``μ`` (≠ π_ref) from which the two responses of a pair are
drawn independently. The population loss is the exact expectation over all ordered pairs,
``L(θ) = Σ_{i≠j} μ_i μ_j · ℓ(i, j)``, built as a batch of the ``N(N−1)`` pairs weighted by ``μ_i μ_j``, and is
minimised by plain gradient descent.

RPO (each distance D): ``ℓ(i, j) = D(a_ij ‖ b_ij)`` with ``a_ij = β[(log π_i − log π_ref,i) − (log π_j −
log π_ref,j)]`` and ``b_ij = η (r_i − r_j)``. Every ``D ≥ 0`` vanishes iff ``a = b``, and ``a_ij = b_ij`` for all
pairs is attainable (``log π_i = log π_ref,i + (η/β) r_i + const``), so since every ``μ_i μ_j > 0`` that is the
unique minimiser up to the softmax's constant: ``π* ∝ π_ref · exp((η/β) r*)`` (MATH.md).

Listwise RPO: one example holding all ``N`` responses; ``KL(softmax(η r*) ‖ softmax(β (log π − log π_ref)))`` is 0
iff the two softmaxes agree, giving the same ``π*``.

MRPO with fixed α and fixed-rate CTRO clipping: the clipped ``ℓ̂_k(y)`` and hence ``log π̃(y) = −log Σ_k α_k
e^{−ℓ̂_k(y)}`` depend on ``y`` alone. Preferences follow Bradley–Terry on ``r``: the pair ``(i, j)`` is observed as
"i preferred" with probability ``σ(r_i − r_j)``. With ``a_ij = β[(log π_i − log π̃_i) − (log π_j − log π̃_j)]`` the
expected loss of the unordered pair is ``μ_i μ_j [σ(Δr)(−log σ(a)) + σ(−Δr)(−log σ(−a))]``, which equals
``μ_i μ_j [D_bwd(a ‖ Δr) + H(σ(Δr))]`` and is minimised at ``a_ij = r_i − r_j``. Hence
``log π*_i = log π̃_i + r_i/β + const``: ``π* ∝ π̃ · exp(r*/β)`` (π̃ unnormalised; the constant absorbs it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpo_jax.losses import PreferenceLogps, make_loss

N, BETA, ETA, STEPS = 5, 0.5, 1.0, 3000
RNG = np.random.default_rng(0)
REF_LOGITS = RNG.normal(size=N)
REWARDS = RNG.uniform(-1.0, 1.0, size=N)
MU = RNG.dirichlet(3.0 * np.ones(N))
FIRST, SECOND = np.array([(i, j) for i in range(N) for j in range(N) if i != j]).T
PAIR_WEIGHTS = jnp.asarray(MU[FIRST] * MU[SECOND], jnp.float32)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.sum(np.exp(x - x.max()))) - x.max()


def _normalise(log_p):
    p = np.exp(log_p - log_p.max())
    return p / p.sum()


def _train(population_loss, learning_rate):
    grad = jax.grad(population_loss)

    @jax.jit
    def descend(theta):
        return jax.lax.fori_loop(0, STEPS, lambda _, t: t - learning_rate * grad(t), theta)

    return np.asarray(jax.nn.softmax(descend(jnp.zeros(N, jnp.float32))), np.float64)


def _pairs(values):
    return jnp.stack([values[FIRST], values[SECOND]], axis=1)


REF_LOGPS = _log_softmax(REF_LOGITS)
RPO_OPTIMUM = _normalise(REF_LOGPS + (ETA / BETA) * REWARDS)


@pytest.mark.parametrize("distance,learning_rate", [("sq", 2.0), ("bwd_kl", 20.0), ("fwd_kl", 20.0)])
def test_rpo_pairwise_converges_to_closed_form(distance, learning_rate):
    loss_fn = make_loss(f"rpo_{distance}", beta=BETA, eta=ETA)
    ref = _pairs(jnp.asarray(REF_LOGPS, jnp.float32))
    rewards = _pairs(jnp.asarray(REWARDS, jnp.float32))

    def population_loss(theta):
        out = loss_fn(PreferenceLogps(_pairs(jax.nn.log_softmax(theta)), ref, None, rewards))
        return jnp.sum(PAIR_WEIGHTS * out.per_example)

    policy = _train(population_loss, learning_rate)
    np.testing.assert_allclose(policy, RPO_OPTIMUM, atol=1e-3)
    assert np.abs(policy - _normalise(REF_LOGPS)).max() > 0.05  # it moved far from the reference


def test_rpo_listwise_converges_to_closed_form():
    loss_fn = make_loss("rpo_listwise", beta=BETA, eta=ETA)
    ref = jnp.asarray(REF_LOGPS, jnp.float32)[None]
    rewards = jnp.asarray(REWARDS, jnp.float32)[None]

    def population_loss(theta):
        return loss_fn(PreferenceLogps(jax.nn.log_softmax(theta)[None], ref, None, rewards)).loss

    np.testing.assert_allclose(_train(population_loss, 20.0), RPO_OPTIMUM, atol=1e-3)


def test_mrpo_with_fixed_alpha_converges_to_virtual_reference_optimum():
    alpha, epsilon = (0.5, 0.3, 0.2), 0.15
    refs = np.stack([REF_LOGPS, _log_softmax(RNG.normal(size=N)), _log_softmax(2.0 * RNG.normal(size=N))], -1)
    # Independent virtual reference: fixed-rate clipping of references 1, 2 around reference 0, then the
    # weighted harmonic mean.
    low, high = (
        np.minimum((1 + epsilon) * refs[:, 0], (1 - epsilon) * refs[:, 0]),
        np.maximum((1 + epsilon) * refs[:, 0], (1 - epsilon) * refs[:, 0]),
    )
    clipped = refs.copy()
    clipped[:, 1:] = np.clip(refs[:, 1:], low[:, None], high[:, None])
    assert np.any(clipped != refs), "the clipping must bind somewhere for this test to mean something"
    virtual = -np.log(np.sum(np.asarray(alpha) * np.exp(-clipped), -1))
    optimum = _normalise(virtual + REWARDS / BETA)

    loss_fn = make_loss("mrpo", beta=BETA, alpha=alpha, epsilon=epsilon, epsilon_mode="fixed")
    ref_pairs = jnp.stack([jnp.asarray(refs[FIRST], jnp.float32), jnp.asarray(refs[SECOND], jnp.float32)], axis=1)
    preference = 1.0 / (1.0 + np.exp(-(REWARDS[FIRST] - REWARDS[SECOND])))  # P(first ≻ second), Bradley–Terry
    weights = PAIR_WEIGHTS * jnp.asarray(preference, jnp.float32)

    def population_loss(theta):
        out = loss_fn(PreferenceLogps(_pairs(jax.nn.log_softmax(theta)), ref_pairs))  # response 0 chosen
        return jnp.sum(weights * out.per_example)

    policy = _train(population_loss, 20.0)
    np.testing.assert_allclose(policy, optimum, atol=1e-3)
    assert np.abs(optimum - RPO_OPTIMUM).max() > 0.01  # π̃ differs from the primary reference's optimum
