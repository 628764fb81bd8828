"""ORPO and CPO against TRL 1.16's own ``ORPOTrainer`` / ``CPOTrainer`` loss code run in PyTorch on the same logits
(``get_batch_loss_metrics``: the forward pass's log-probs and NLL, the loss and every logged metric), gradients
against finite differences, limits against other losses of the registry, and jit / vmap."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

from rpo_jax.losses import PreferenceLogps, make_loss
from tests.losses.losses_testlib import random_batch
from tests.losses.trl_trainer_testlib import (
    MODEL_METRICS,
    assert_metrics_equal,
    pair_logps,
    pair_tokens,
    run_pair_trainer,
    trainer,
)


def _ours(tokens, name, **hp):
    fields = {k: np.asarray(v, np.float32) for k, v in pair_logps(tokens).items()}
    out = jax.jit(make_loss(name, **hp))(PreferenceLogps(**fields))

    def loss_of_logits(logits):
        logps = pair_logps(tokens, logits, xp=jnp)
        return make_loss(name, **hp)(PreferenceLogps(**logps)).loss

    grad = jax.grad(loss_of_logits)(jnp.asarray(tokens.logits, jnp.float32))
    return out, np.asarray(grad)


def _assert_parity(out, grad, trl_loss, trl_metrics, trl_grad):
    np.testing.assert_allclose(out.loss, trl_loss, rtol=1e-6)
    assert set(out.metrics) == set(trl_metrics) - MODEL_METRICS
    assert_metrics_equal(out.metrics, trl_metrics)
    scale = np.abs(trl_grad).max()
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-4, atol=1e-6 * scale)


# ORPO -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta,seed", [(0.1, 0), (0.5, 1), (2.0, 2)])
def test_orpo_equals_trl_orpo_trainer(beta, seed):
    from trl.experimental.orpo import ORPOTrainer

    tokens = pair_tokens(seed)
    trl_loss, trl_metrics, trl_grad = run_pair_trainer(trainer(ORPOTrainer, beta=beta, padding_value=0), tokens)
    out, grad = _ours(tokens, "orpo", beta=beta)
    _assert_parity(out, grad, trl_loss, trl_metrics, trl_grad)


def test_orpo_nll_counts_prompt_and_response_tokens_as_trl():
    """TRL's ORPO NLL is the chosen sequences' token mean over prompt *and* response (each non-padding token after
    the first); ``nll_tokens="response"`` is the response-only NLL, which is the ``sft`` loss."""
    tokens = pair_tokens(3)
    logps = pair_logps(tokens)
    batch = PreferenceLogps(**{k: np.asarray(v, np.float32) for k, v in logps.items()})
    sequence = -logps["sequence_logps"][:, 0].sum() / logps["sequence_lengths"][:, 0].sum()
    response = -logps["policy_logps"][:, 0].sum() / logps["lengths"][:, 0].sum()
    assert abs(sequence - response) > 1e-2
    np.testing.assert_allclose(make_loss("orpo")(batch).metrics["nll_loss"], sequence, rtol=1e-6)
    only_response = make_loss("orpo", nll_tokens="response")(batch)
    np.testing.assert_allclose(only_response.metrics["nll_loss"], response, rtol=1e-6)
    np.testing.assert_allclose(make_loss("sft")(batch).loss, response, rtol=1e-6)


def test_orpo_with_lambda_zero_is_the_nll():
    batch = random_batch(4, b=6, k=2, rewards=False)
    for nll_tokens, logps, lengths in (
        ("sequence", batch.sequence_logps, batch.sequence_lengths),
        ("response", batch.policy_logps, batch.lengths),
    ):
        out = make_loss("orpo", beta=0.0, nll_tokens=nll_tokens)(batch)
        want = -np.sum(np.asarray(logps, np.float64)[:, 0]) / np.sum(np.asarray(lengths, np.float64)[:, 0])
        np.testing.assert_allclose(out.loss, want, rtol=1e-6)
        grad = jax.grad(lambda x: make_loss("orpo", beta=0.0, nll_tokens="response")(_with(batch, x)).loss)(
            jnp.asarray(batch.policy_logps)
        )
        np.testing.assert_allclose(grad[:, 0], -1.0 / np.sum(batch.lengths[:, 0]), rtol=1e-6)
        np.testing.assert_array_equal(grad[:, 1], 0.0)


def test_orpo_odds_ratio_term_is_the_log_odds_formula():
    """Independent of TRL: −log σ(log[p_w/(1−p_w)] − log[p_l/(1−p_l)]) with p = exp(average log-prob)."""
    batch = random_batch(5, b=6, k=2, rewards=False, scale=1.5)
    beta = 0.3
    out = make_loss("orpo", beta=beta, nll_tokens="response")(batch)
    p = np.exp(np.asarray(batch.policy_logps, np.float64) / batch.lengths)
    log_odds = np.log(p[:, 0] / (1 - p[:, 0])) - np.log(p[:, 1] / (1 - p[:, 1]))
    nll = -np.sum(batch.policy_logps[:, 0]) / np.sum(batch.lengths[:, 0])
    np.testing.assert_allclose(out.loss, nll + beta * np.mean(np.log1p(np.exp(-log_odds))), rtol=1e-6)
    np.testing.assert_allclose(out.metrics["log_odds_chosen"], np.mean(log_odds), rtol=1e-5)


def test_orpo_stays_finite_where_a_response_has_probability_one():
    batch = PreferenceLogps(np.array([[0.0, -3.0], [-2.0, 0.0]], np.float32), lengths=np.ones((2, 2), np.float32))
    loss_fn = make_loss("orpo", nll_tokens="response")
    value, grad = jax.value_and_grad(lambda x: loss_fn(_with(batch, x)).loss)(jnp.asarray(batch.policy_logps))
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))


# CPO ------------------------------------------------------------------------------------------------------------

CPO_CASES = {
    "sigmoid": {},
    "sigmoid-label_smoothing": {"label_smoothing": 0.1, "beta": 0.3},
    "hinge": {"loss_type": "hinge", "beta": 0.05},
    "ipo": {"loss_type": "ipo", "beta": 0.5},
    "simpo": {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.7},
    "no-nll": {"cpo_alpha": 0.0},
    "alphapo": {"loss_type": "simpo", "cpo_alpha": 0.0, "alpha": 0.25, "beta": 2.5},
    "alphapo-sigmoid": {"alpha": -0.1, "cpo_alpha": 0.5},
}
CPO_DEFAULTS = {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "cpo_alpha": 1.0, "simpo_gamma": 0.5}


@pytest.mark.parametrize("case", sorted(CPO_CASES))
def test_cpo_equals_trl_cpo_trainer(case):
    from trl.experimental.cpo import CPOTrainer

    hp = {**CPO_DEFAULTS, "alpha": 0.0, **CPO_CASES[case]}
    tokens = pair_tokens(10 + sorted(CPO_CASES).index(case))
    trl_loss, trl_metrics, trl_grad = run_pair_trainer(trainer(CPOTrainer, pad_token_id=0, **hp), tokens)
    ours_hp = {k: v for k, v in hp.items() if k != "simpo_gamma" or hp["loss_type"] == "simpo"}
    out, grad = _ours(tokens, "cpo", **ours_hp)
    _assert_parity(out, grad, trl_loss, trl_metrics, trl_grad)


def test_cpo_simpo_without_margin_is_sigmoid_on_average_log_probs():
    batch = random_batch(6, b=6, k=2, rewards=False)
    average = PreferenceLogps(
        np.asarray(batch.policy_logps / batch.lengths, np.float32), lengths=np.ones_like(batch.lengths)
    )
    simpo = make_loss("cpo", loss_type="simpo", simpo_gamma=0.0, beta=1.5, cpo_alpha=0.0)(batch)
    sigmoid = make_loss("cpo", loss_type="sigmoid", beta=1.5, cpo_alpha=0.0)(average)
    np.testing.assert_allclose(simpo.loss, sigmoid.loss, rtol=1e-6)


def test_cpo_simpo_without_nll_is_the_simpo_loss():
    batch = random_batch(7, b=6, k=3)
    cpo = make_loss("cpo", loss_type="simpo", simpo_gamma=0.4, beta=2.0, cpo_alpha=0.0)(batch)
    simpo = make_loss("simpo", gamma=0.4, beta=2.0)(batch)
    np.testing.assert_allclose(cpo.loss, simpo.loss, rtol=1e-6)
    np.testing.assert_allclose(cpo.per_example, simpo.per_example, rtol=1e-6)


def test_cpo_nll_term_is_the_sft_loss():
    batch = random_batch(8, b=5, k=3)
    with_nll = make_loss("cpo", cpo_alpha=0.7)(batch)
    without = make_loss("cpo", cpo_alpha=0.0)(batch)
    np.testing.assert_allclose(with_nll.loss - without.loss, 0.7 * make_loss("sft")(batch).loss, rtol=1e-5)


def test_alphapo_tends_to_cpo_as_alpha_goes_to_zero():
    batch = random_batch(9, b=6, k=2, rewards=False)
    plain = make_loss("cpo", loss_type="simpo", cpo_alpha=0.0)(batch)
    near = make_loss("cpo", loss_type="simpo", cpo_alpha=0.0, alpha=1e-4)(batch)
    np.testing.assert_allclose(near.loss, plain.loss, rtol=1e-3)


@pytest.mark.parametrize(
    "hp,match",
    [
        ({"loss_type": "kto_pair"}, "loss_type"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing.*does not apply"),
        ({"simpo_gamma": 1.0}, "simpo_gamma.*only applies"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"beta": 0.0}, "beta"),
        ({"cpo_alpha": -1.0}, "cpo_alpha"),
    ],
)
def test_cpo_bad_hyperparameters(hp, match):
    with pytest.raises(ValueError, match=match):
        make_loss("cpo", **hp)


def test_orpo_needs_the_sequence_log_probs_or_response_nll():
    batch = random_batch(0, rewards=False)
    short = dataclasses.replace(batch, sequence_logps=None, sequence_lengths=None)
    with pytest.raises(ValueError, match=r"PreferenceLogps\.sequence_logps is None.*nll_tokens='response'"):
        jax.jit(make_loss("orpo"))(short)
    assert make_loss("orpo").spec.requires_sequence_logps
    assert not make_loss("orpo", nll_tokens="response").spec.requires_sequence_logps
    assert np.isfinite(float(make_loss("orpo", nll_tokens="response")(short).loss))
    with pytest.raises(ValueError, match="nll_tokens"):
        make_loss("orpo", nll_tokens="prompt")


# Gradients, jit, vmap ------------------------------------------------------------------------------------------


def _with(batch, x):
    return dataclasses.replace(batch, policy_logps=x)


GRAD_CASES = [
    ("orpo", {"beta": 0.4}),
    ("orpo", {"nll_tokens": "response"}),
    ("cpo", {}),
    ("cpo", {"loss_type": "ipo"}),
    ("cpo", {"loss_type": "simpo", "alpha": 0.3, "label_smoothing": 0.1}),
]


@pytest.mark.parametrize("name,hp", GRAD_CASES, ids=[f"{n}-{hp}" for n, hp in GRAD_CASES])
def test_gradients_against_finite_differences(name, hp):
    batch = random_batch(12, b=3, k=3, scale=1.5)
    loss_fn = make_loss(name, **hp)
    f = jax.jit(lambda x: loss_fn(_with(batch, x)).loss)
    check_grads(f, (jnp.asarray(batch.policy_logps),), order=2, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)


class JitAndVmapTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("orpo", {}), ("cpo", {"loss_type": "simpo", "alpha": 0.2}))
    def test_jit_and_no_jit_agree_and_vmap_is_per_batch(self, name, hp):
        batches = [random_batch(seed, b=4, k=2, rewards=False) for seed in (20, 21, 22)]
        loss_fn = make_loss(name, **hp)
        outs = [self.variant(loss_fn)(b) for b in batches]
        stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)
        mapped = self.variant(jax.vmap(loss_fn))(stacked)
        for i, out in enumerate(outs):
            reference = make_loss(name, **hp)(batches[i])
            np.testing.assert_allclose(out.loss, reference.loss, rtol=1e-6)
            np.testing.assert_allclose(mapped.loss[i], out.loss, rtol=1e-6)
            for key, value in out.metrics.items():
                np.testing.assert_allclose(mapped.metrics[key][i], value, rtol=1e-6, atol=1e-8, err_msg=key)
