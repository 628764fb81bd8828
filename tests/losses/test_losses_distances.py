"""The three RPO distances: values, MATH.md's analytic ∂D/∂a, second-order gradient checks, extreme gaps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rpo_jax.losses import DISTANCES, bwd_kl, fwd_kl, squared
from rpo_jax.losses.distances import get_distance
from tests.losses.losses_testlib import log_sigmoid, sigmoid

A = np.array([-7.0, -2.5, -0.3, 0.0, 0.4, 1.7, 6.0], np.float32)
B = np.array([1.3, -0.8, 0.0, 2.2, -4.0, 1.7, 0.5], np.float32)


def _kl_bernoulli(p, q):
    """KL(Bern p ‖ Bern q) in float64, written from the definition."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))


def test_values_match_definitions():
    np.testing.assert_allclose(squared(A, B), (A.astype(np.float64) - B) ** 2, rtol=1e-6)
    np.testing.assert_allclose(bwd_kl(A, B), _kl_bernoulli(sigmoid(B), sigmoid(A)), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(fwd_kl(A, B), _kl_bernoulli(sigmoid(A), sigmoid(B)), rtol=2e-5, atol=1e-6)


ANALYTIC_GRADIENTS = {
    "sq": lambda a, b: 2 * (a - b),
    "bwd_kl": lambda a, b: sigmoid(a) - sigmoid(b),
    "fwd_kl": lambda a, b: sigmoid(a) * sigmoid(-a) * (a - b),
}


@pytest.mark.parametrize("name", sorted(DISTANCES))
def test_gradient_matches_math_md_table(name):
    grad = jax.vmap(jax.grad(get_distance(name)))(jnp.asarray(A), jnp.asarray(B))
    np.testing.assert_allclose(grad, ANALYTIC_GRADIENTS[name](A.astype(np.float64), B), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(DISTANCES))
def test_second_order_gradients(name):
    check_grads(get_distance(name), (jnp.asarray(A), jnp.asarray(B)), order=2, modes=("fwd", "rev"), eps=1e-2)


@pytest.mark.parametrize("name", sorted(DISTANCES))
def test_nonnegative_and_zero_only_at_target(name):
    d = get_distance(name)
    np.testing.assert_array_less(-1e-7, d(A, B))
    np.testing.assert_allclose(d(B, B), 0.0, atol=1e-6)


def test_bwd_kl_with_infinite_target_is_dpo():
    np.testing.assert_allclose(bwd_kl(A, jnp.inf), -log_sigmoid(A), rtol=1e-6)
    grad = jax.grad(lambda a: jnp.sum(bwd_kl(a, jnp.inf)))(jnp.asarray(A))
    np.testing.assert_allclose(grad, sigmoid(A) - 1.0, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(DISTANCES))
def test_finite_at_gaps_of_1e4(name):
    d = get_distance(name)
    a = jnp.array([1e4, -1e4, 1e4, -1e4, 0.0, 3.0], jnp.float32)
    b = jnp.array([-1e4, 1e4, 1e4, -1e4, 1e4, -1e4], jnp.float32)
    values = d(a, b)
    grads = jax.vmap(jax.grad(d))(a, b)
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))
    np.testing.assert_allclose(grads, ANALYTIC_GRADIENTS[name](np.asarray(a, np.float64), np.asarray(b)), rtol=1e-5)


def test_unknown_distance():
    with pytest.raises(ValueError, match="valid distances"):
        get_distance("l1")
