"""The Bradley–Terry reward-model loss (`rpo_jax.losses.bradley_terry_loss`): closed form, metrics, limits and
gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rpo_jax.losses import bradley_terry_loss


def _closed_form(c, r, w, lam, m):
    c, r, w, m = (np.asarray(x, np.float64) for x in (c, r, w, m))
    per = np.log1p(np.exp(-(c - r - m))) + lam * (c + r) ** 2
    return (w * per).sum() / w.sum()


def test_bradley_terry_loss_matches_the_closed_form_and_its_metrics():
    rng = np.random.default_rng(0)
    c, r = rng.normal(size=7).astype(np.float32), rng.normal(size=7).astype(np.float32)
    w = np.array([1, 1, 0, 1, 0.5, 1, 0], np.float32)
    m = rng.uniform(0, 1, size=7).astype(np.float32)
    loss, metrics = bradley_terry_loss(c, r, w, center_coefficient=0.3, margin=m)
    np.testing.assert_allclose(float(loss), _closed_form(c, r, w, 0.3, m), rtol=1e-6)
    plain, _ = bradley_terry_loss(c, r, w)
    np.testing.assert_allclose(float(plain), _closed_form(c, r, w, 0.0, 0.0), rtol=1e-6)
    wn = w / w.sum()
    np.testing.assert_allclose(float(metrics["accuracy"]), (wn * (c > r)).sum(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["margin"]), (wn * (c - r)).sum(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["chosen_score"]), (wn * c).sum(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(metrics["rejected_score"]), (wn * r).sum(), rtol=1e-5, atol=1e-7)
    assert float(metrics["pairs"]) == pytest.approx(w.sum())
    # equal scores: log 2 per pair; a scalar margin m: −log σ(−m); no weight: 0, not NaN
    assert float(bradley_terry_loss(c, c, w)[0]) == pytest.approx(np.log(2.0), rel=1e-6)
    assert float(bradley_terry_loss(c, c, w, margin=1.5)[0]) == pytest.approx(np.log1p(np.exp(1.5)), rel=1e-6)
    zero, zm = bradley_terry_loss(c, r, np.zeros(7, np.float32))
    assert float(zero) == 0.0 and float(zm["accuracy"]) == 0.0
    # large score gaps stay finite (log-sigmoid, not log(sigmoid))
    big = bradley_terry_loss(np.array([-100.0], np.float32), np.array([100.0], np.float32), np.ones(1))[0]
    assert float(big) == pytest.approx(200.0, rel=1e-6)


def test_bradley_terry_loss_gradients():
    rng = np.random.default_rng(1)
    c, r = (jnp.asarray(rng.normal(size=5), jnp.float32) for _ in range(2))
    w = jnp.asarray([1.0, 0.0, 1.0, 2.0, 1.0])
    m = jnp.asarray(rng.uniform(size=5), jnp.float32)
    lam = 0.2

    def f(cc, rr):
        return bradley_terry_loss(cc, rr, w, center_coefficient=lam, margin=m)[0]

    check_grads(f, (c, r), order=1, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2, eps=1e-2)
    # analytic: ∂L/∂s_c = w (−σ(−(Δ − m)) + 2λ(s_c + s_r)) / Σw, ∂L/∂s_r = w (σ(−(Δ − m)) + 2λ(s_c + s_r)) / Σw
    gc, gr = jax.grad(f, argnums=(0, 1))(c, r)
    sig = 1.0 / (1.0 + np.exp(np.asarray(c - r - m, np.float64)))
    center = 2 * lam * np.asarray(c + r, np.float64)
    wn = np.asarray(w) / float(np.sum(w))
    np.testing.assert_allclose(np.asarray(gc), wn * (-sig + center), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gr), wn * (sig + center), rtol=1e-5, atol=1e-7)
