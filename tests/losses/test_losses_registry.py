"""make_loss / available_losses: names, the LossSpec and its attributes, hyperparameter validation, bad input naming
the field, combinations, metrics, second-order gradient checks for every loss, masking and extreme gaps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rpo_jax.losses import LossOutput, LossSpec, PreferenceLogps, available_losses, loss_hyperparameters, make_loss
from tests.losses.losses_testlib import check_every_case, random_batch

EXPECTED_NAMES = {
    "rpo_sq",
    "rpo_bwd_kl",
    "rpo_fwd_kl",
    "rpo_listwise",
    "dpo",
    "cdpo",
    "ipo",
    "simpo",
    "distill_dpo",
    "rloo",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
    "mrpo",
    "multi_dpo",
    "orpo",
    "cpo",
    "kto",
    "apo_zero_unpaired",
    "bco",
}
UNPAIRED = {"kto", "apo_zero_unpaired", "bco"}  # UnpairedLogps: tests/losses/test_losses_unpaired.py
PAIRED_NAMES = EXPECTED_NAMES - UNPAIRED
REWARD_AWARE = {"rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl", "rpo_listwise", "distill_dpo", "rloo"}
REFERENCE_FREE = {"simpo", "sft", "rloo", "orpo", "cpo"}
MULTI_REFERENCE = {"mrpo", "multi_dpo"}


def test_available_losses_is_exactly_the_issue_list():
    assert set(available_losses()) == EXPECTED_NAMES
    assert len(available_losses()) == len(EXPECTED_NAMES)


def batch_for(name, seed=0, b=4, k=2):
    """A batch with everything the loss might need (rewards, R = 3 references for MRPO)."""
    return random_batch(seed, b=b, k=k, r=3 if name in MULTI_REFERENCE else None, scale=1.0)


def each_loss(names):
    """``(case id, args)`` for check_every_case: one test loops over the losses that were once one item each
    (a failure names the loss)."""
    return [(name, (name,)) for name in names]


def test_requirement_attributes():
    def check(name):
        f = make_loss(name)
        assert f.requires_rewards == (name in REWARD_AWARE)
        assert f.requires_reference == (name not in REFERENCE_FREE)
        assert f.num_references == (None if name in REFERENCE_FREE | MULTI_REFERENCE else 1)

    assert check_every_case(each_loss(sorted(PAIRED_NAMES)), check) == len(PAIRED_NAMES)


# LossSpec: the typed description (loss_fn.spec) and the documented attributes carry the same values.

SPEC_FIELDS = [field.name for field in dataclasses.fields(LossSpec)]


def assert_spec_matches_attributes(f):
    assert isinstance(f.spec, LossSpec)
    assert SPEC_FIELDS == [
        "name",
        "requires_reference",
        "requires_rewards",
        "requires_lengths",
        "min_references",
        "num_references",
        "hparams",
        "requires_sequence_logps",
        "unpaired",
        "requires_kl_logps",
        "stateful",
    ]
    for field in SPEC_FIELDS:
        assert getattr(f.spec, field) == getattr(f, field), field


def test_spec_equals_the_attributes():
    def check(name):
        f = make_loss(name)
        assert_spec_matches_attributes(f)
        assert f.spec.name == name
        assert f.spec.hparams == {name: loss_hyperparameters(name)}

    assert check_every_case(each_loss(available_losses()), check) == len(available_losses())


def test_spec_of_a_weighted_combination():
    f = make_loss([("rpo_bwd_kl", 1.0), ("sft", 0.05)], beta=0.3)
    assert_spec_matches_attributes(f)
    assert f.spec == LossSpec(
        name="1*rpo_bwd_kl+0.05*sft",
        requires_reference=True,
        requires_rewards=True,
        requires_lengths=True,
        min_references=1,
        num_references=1,
        hparams={"rpo_bwd_kl": {**loss_hyperparameters("rpo_bwd_kl"), "beta": 0.3}, "sft": {}},
    )


def test_spec_of_mrpo_with_three_weights():
    f = make_loss("mrpo", alpha=(0.5, 0.3, 0.2))
    assert_spec_matches_attributes(f)
    assert f.spec.requires_reference and f.spec.num_references == 3 and f.spec.min_references == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.spec.num_references = 2


@pytest.mark.parametrize(
    "kwargs, count, given, needed",
    [
        ({"name_or_weighted_list": "mrpo", "alpha": (0.5, 0.3, 0.2)}, 2, "config.references", "3"),
        ({"name_or_weighted_list": "mrpo", "alpha": (0.5, 0.3, 0.2)}, 4, "config.references", "3"),
        ({"name_or_weighted_list": "mrpo"}, 1, "online mode", "at least 2"),
        ({"name_or_weighted_list": "multi_dpo"}, 0, "online mode", "at least 2"),
        ({"name_or_weighted_list": "dpo"}, 2, "config.references", "1"),
        ({"name_or_weighted_list": "dpo"}, 0, "config.references", "1"),
        ({"name_or_weighted_list": "rpo_sq", "reference_combiner": "mrpo"}, 1, "config.references", "at least 2"),
    ],
)
def test_check_reference_count_refuses_wrong_counts(kwargs, count, given, needed):
    spec = make_loss(**kwargs).spec
    expected = f"loss {spec.name!r} needs {needed} references; {given} gives {count}"
    with pytest.raises(ValueError) as info:
        spec.check_reference_count(count, given=given)
    assert str(info.value) == expected


@pytest.mark.parametrize(
    "kwargs, counts",
    [
        ({"name_or_weighted_list": "mrpo", "alpha": (0.5, 0.3, 0.2)}, [3]),
        ({"name_or_weighted_list": "mrpo"}, [2, 3, 5]),
        ({"name_or_weighted_list": "dpo"}, [1]),
        ({"name_or_weighted_list": [("rpo_bwd_kl", 1.0), ("sft", 0.05)]}, [1]),
        ({"name_or_weighted_list": "sft"}, [0, 1, 3]),
        ({"name_or_weighted_list": "simpo"}, [0, 2]),
        ({"name_or_weighted_list": "rpo_sq", "reference_free": True}, [0, 1, 4]),
    ],
)
def test_check_reference_count_accepts_right_counts_and_reference_free_losses(kwargs, counts):
    spec = make_loss(**kwargs).spec
    for count in counts:
        assert spec.check_reference_count(count, given="config.references") is None


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match="available losses.*rpo_bwd_kl"):
        make_loss("dpoo")


def test_unknown_hyperparameter_lists_valid_ones():
    with pytest.raises(ValueError, match=r"no hyperparameter.*\['gama'\].*valid hyperparameters: \['beta', 'gamma'\]"):
        make_loss("simpo", gama=1.0)
    with pytest.raises(ValueError, match="valid hyperparameters: none"):
        make_loss("sft", beta=0.1)


@pytest.mark.parametrize(
    "name,hp,match",
    [
        ("dpo", {"beta": 0.0}, "beta.*> 0"),
        ("dpo", {"beta": float("nan")}, "beta.*finite"),
        ("dpo", {"beta": True}, "beta.*finite number"),
        ("cdpo", {"label_smoothing": 0.5}, r"label_smoothing.*\[0.0, 0.5\)"),
        ("exo_pair", {"label_smoothing": 0.0}, r"label_smoothing.*\(0.0, 1.0\)"),
        ("rpo_sq", {"length_normalize": 1}, "length_normalize.*True or False"),
        ("rpo_sq", {"reference_combiner": "mean"}, "reference_combiner.*primary.*mrpo"),
        ("rpo_sq", {"alpha": (0.5, 0.5)}, "only apply with reference_combiner='mrpo'"),
        ("rpo_sq", {"reference_free": True, "reference_combiner": "mrpo"}, "reference_free"),
        ("mrpo", {"alpha": (0.5, 0.6)}, "alpha.*sum to 1"),
        ("mrpo", {"alpha": (1.0,)}, "alpha.*R >= 2"),
        ("mrpo", {"alpha": 0.5}, "alpha.*sequence"),
        ("mrpo", {"epsilon": 1.5}, "epsilon"),
        ("mrpo", {"epsilon_mode": "auto"}, "epsilon_mode.*adaptive.*fixed"),
        ("mrpo", {"arwc": "paper"}, r"'arwc'.*\['own_margin', 'authors_code'\].*'paper'"),
        ("rpo_bwd_kl", {"reference_combiner": "mrpo", "arwc": None}, r"'arwc'.*\['own_margin', 'authors_code'\]"),
        ("mrpo", {"alpha": (0.5, 0.5), "arwc": "authors_code"}, r"'arwc' only applies.*alpha=None"),
        ("rpo_sq", {"reference_combiner": "mrpo", "alpha": (0.5, 0.5), "arwc": "own_margin"}, r"'arwc' only applies"),
        ("rpo_sq", {"arwc": "authors_code"}, r"\['arwc'\] only apply with reference_combiner='mrpo'"),
        ("multi_dpo", {"arwc": "authors_code"}, r"no hyperparameter.*\['arwc'\]"),
        ("discopop", {"discopop_tau": -1.0}, "discopop_tau"),
    ],
)
def test_bad_hyperparameter_values(name, hp, match):
    with pytest.raises(ValueError, match=match):
        make_loss(name, **hp)


def test_weighted_list_validation():
    with pytest.raises(ValueError, match="no loss in.*has hyperparameter"):
        make_loss([("dpo", 1.0), ("sft", 0.1)], gamma=1.0)
    with pytest.raises(ValueError, match="at most once"):
        make_loss([("dpo", 1.0), ("dpo", 0.1)])
    with pytest.raises(ValueError, match="weight"):
        make_loss([("dpo", -1.0)])
    with pytest.raises(ValueError, match=r"\(name, weight\)"):
        make_loss([("dpo",)])
    with pytest.raises(ValueError, match="non-empty list"):
        make_loss([])


@pytest.mark.parametrize("name", sorted(REWARD_AWARE))
def test_reward_aware_losses_need_rewards(name):
    batch = random_batch(0, rewards=False)
    with pytest.raises(ValueError, match=r"PreferenceLogps\.rewards is None.*reward-aware"):
        make_loss(name)(batch)
    with pytest.raises(ValueError, match=r"PreferenceLogps\.rewards"):  # also at trace time under jit
        jax.jit(make_loss(name))(batch)


def test_reference_losses_need_ref_logps():
    def check(name):
        batch = random_batch(0)
        with pytest.raises(ValueError, match=r"PreferenceLogps\.ref_logps is None"):
            make_loss(name)(PreferenceLogps(batch.policy_logps, None, batch.lengths, batch.rewards))

    names = sorted(PAIRED_NAMES - REFERENCE_FREE)
    assert check_every_case(each_loss(names), check) == len(names)


@pytest.mark.parametrize("name", ["ipo", "simpo", "sigmoid_norm", "sft"])
def test_length_normalised_losses_need_lengths(name):
    batch = random_batch(0)
    with pytest.raises(ValueError, match=r"PreferenceLogps\.lengths is None"):
        make_loss(name)(PreferenceLogps(batch.policy_logps, batch.ref_logps, None, batch.rewards))


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("policy_logps", np.zeros((4,), np.float32), r"policy_logps must have shape \[B, K\]"),
        ("policy_logps", np.zeros((4, 1), np.float32), "K = 1"),
        ("policy_logps", np.zeros((4, 2), np.int32), "policy_logps must be floating point"),
        ("ref_logps", np.zeros((4, 3), np.float32), r"ref_logps has shape \(4, 3\)"),
        ("ref_logps", np.zeros((4, 2, 2, 1), np.float32), r"ref_logps has shape"),
        ("lengths", np.zeros((4, 3), np.int32), r"lengths has shape \(4, 3\)"),
        ("rewards", np.zeros((2, 2), np.float32), r"rewards has shape \(2, 2\)"),
        ("valid", np.ones((4, 2), np.float32), "valid must be a bool array"),
        ("valid", np.ones((4,), bool), r"valid has shape \(4,\)"),
    ],
)
def test_bad_shapes_and_dtypes_name_the_field(field, value, match):
    batch = random_batch(0)
    fields = dict(
        policy_logps=batch.policy_logps,
        ref_logps=batch.ref_logps,
        lengths=batch.lengths,
        rewards=batch.rewards,
        valid=None,
    )
    fields[field] = value
    with pytest.raises(ValueError, match=match):
        make_loss("dpo")(PreferenceLogps(**fields))
    with pytest.raises(ValueError, match=match):
        jax.jit(make_loss("dpo"))(PreferenceLogps(**fields))


def test_k3_without_rewards_is_rejected():
    batch = random_batch(0, k=3, rewards=False)
    with pytest.raises(ValueError, match=r"rewards is None with K = 3"):
        make_loss("dpo")(batch)


def test_not_a_preference_logps():
    with pytest.raises(ValueError, match="expects a PreferenceLogps"):
        make_loss("dpo")({"policy_logps": np.zeros((2, 2))})


def test_loss_hyperparameters_lists_defaults():
    assert loss_hyperparameters("simpo") == {"beta": 2.0, "gamma": 1.0}
    assert loss_hyperparameters("mrpo") == {
        "beta": 0.1,
        "alpha": None,
        "epsilon": 0.1,
        "epsilon_mode": "adaptive",
        "arwc": "own_margin",
    }
    assert loss_hyperparameters("multi_dpo") == {"beta": 0.1, "alpha": None, "epsilon": 0.1, "epsilon_mode": "adaptive"}


# ---------------------------------------------------------------------------------------------------------------
# Combinations and metrics.


def test_weighted_combination():
    batch = random_batch(3, b=5, k=2)
    combined = make_loss([("rpo_bwd_kl", 1.0), ("sft", 0.05)], beta=0.3)(batch)
    rpo = make_loss("rpo_bwd_kl", beta=0.3)(batch)
    sft = make_loss("sft")(batch)
    np.testing.assert_allclose(combined.loss, rpo.loss + 0.05 * sft.loss, rtol=1e-6)
    np.testing.assert_allclose(combined.per_example, rpo.per_example + 0.05 * sft.per_example, rtol=1e-6)
    np.testing.assert_allclose(combined.metrics["loss/rpo_bwd_kl"], rpo.loss, rtol=1e-6)
    np.testing.assert_allclose(combined.metrics["loss/sft"], sft.loss, rtol=1e-6)
    for key, value in rpo.metrics.items():
        np.testing.assert_allclose(combined.metrics[key], value, rtol=1e-6)
    f = make_loss([("rpo_bwd_kl", 1.0), ("sft", 0.05)])
    assert f.requires_rewards and f.requires_reference and f.num_references == 1


def test_per_component_hyperparameters_and_prefixing():
    batch = random_batch(4, b=5, k=2)
    combined = make_loss([("dpo", 1.0, {"beta": 0.5}), ("ipo", 0.5, {"beta": 0.2})])(batch)
    dpo = make_loss("dpo", beta=0.5)(batch)
    ipo = make_loss("ipo", beta=0.2)(batch)
    np.testing.assert_allclose(combined.loss, dpo.loss + 0.5 * ipo.loss, rtol=1e-6)
    np.testing.assert_allclose(combined.metrics["rewards/chosen"], dpo.metrics["rewards/chosen"], rtol=1e-6)
    np.testing.assert_allclose(combined.metrics["ipo/rewards/chosen"], ipo.metrics["rewards/chosen"], rtol=1e-6)


def test_metrics_k2_follow_trl_definitions():
    batch = random_batch(5, b=6, k=2, rewards=False)
    beta = 0.25
    out = make_loss("dpo", beta=beta)(batch)
    policy, ref = np.asarray(batch.policy_logps, np.float64), np.asarray(batch.ref_logps, np.float64)
    chosen, rejected = beta * (policy[:, 0] - ref[:, 0]), beta * (policy[:, 1] - ref[:, 1])
    m = out.metrics
    np.testing.assert_allclose(m["rewards/chosen"], chosen.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/rejected"], rejected.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["rewards/margins"], (chosen - rejected).mean(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m["rewards/accuracies"], (chosen > rejected).mean())
    np.testing.assert_allclose(m["logps/chosen"], policy[:, 0].mean(), rtol=1e-6)
    np.testing.assert_allclose(m["logps/rejected"], policy[:, 1].mean(), rtol=1e-6)
    assert "rewards/gap_correlation" not in m


def test_metrics_k4_argmax_accuracy_and_gap_correlation():
    valid = np.array([[True, True, True, True], [True, True, False, True], [True, True, True, True]])
    batch = random_batch(6, b=3, k=4, valid=valid)
    beta = 0.5
    out = make_loss("rpo_bwd_kl", beta=beta)(batch)
    policy, ref = np.asarray(batch.policy_logps, np.float64), np.asarray(batch.ref_logps, np.float64)
    rewards = np.asarray(batch.rewards, np.float64)
    implicit = beta * (policy - ref)
    low = np.where(valid, 0, -np.inf)
    accuracy = np.mean((implicit + low).argmax(1) == (rewards + low).argmax(1))
    np.testing.assert_allclose(out.metrics["rewards/accuracies"], accuracy)
    xs, ys = [], []
    for b in range(3):
        for i in range(4):
            for j in range(4):
                if i != j and valid[b, i] and valid[b, j]:
                    xs.append(implicit[b, i] - implicit[b, j])
                    ys.append(rewards[b, i] - rewards[b, j])
    np.testing.assert_allclose(out.metrics["rewards/gap_correlation"], np.corrcoef(xs, ys)[0, 1], rtol=1e-4)


def test_output_is_a_pytree():
    out = jax.jit(make_loss("dpo"))(random_batch(0))
    assert isinstance(out, LossOutput)
    leaves = jax.tree_util.tree_leaves(out)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_bfloat16_inputs_are_upcast():
    batch = random_batch(8, b=4, k=2)
    low = PreferenceLogps(jnp.asarray(batch.policy_logps, jnp.bfloat16), jnp.asarray(batch.ref_logps, jnp.bfloat16))
    out = make_loss("dpo")(low)
    assert out.loss.dtype == jnp.float32
    ref = make_loss("dpo")(
        PreferenceLogps(np.asarray(low.policy_logps, np.float32), np.asarray(low.ref_logps, np.float32))
    )
    np.testing.assert_allclose(out.loss, ref.loss, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Gradients, masking, extreme gaps, for every loss.

HPARAMS_FOR_GRADS = {"hinge": {"beta": 0.1}}  # kinks of relu/sort stay away from the random test points


@pytest.mark.parametrize("name", sorted(PAIRED_NAMES))
def test_check_grads_second_order(name):
    batch = batch_for(name, seed=21, b=3, k=3)
    x = jnp.asarray(batch.policy_logps)
    if name == "rloo":
        # rloo's value is constant in x by design (ℓ_ref = sg(ℓ_θ)), so finite differences of rloo itself
        # cannot see its gradient. Its gradient is that of rpo_sq with the reference frozen at the current
        # policy: check that function to second order, and that rloo's gradient equals it.
        frozen = make_loss("rpo_sq", beta=1.0)
        f = jax.jit(lambda y: frozen(PreferenceLogps(y, x, batch.lengths, batch.rewards)).loss)
        rloo = lambda y: make_loss("rloo")(PreferenceLogps(y, None, batch.lengths, batch.rewards)).loss
        np.testing.assert_allclose(jax.grad(rloo)(x), jax.grad(f)(x), rtol=1e-6)
    else:
        loss_fn = make_loss(name, **HPARAMS_FOR_GRADS.get(name, {}))
        f = jax.jit(lambda y: loss_fn(dataclasses.replace(batch, policy_logps=y)).loss)
    check_grads(f, (x,), order=2, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)


_VALUE_AND_GRAD = {}


def value_and_grad(name):
    """One compiled ``(loss, LossOutput), ∂loss/∂policy_logps`` per loss, shared by the tests below ([4, 3])."""
    if name not in _VALUE_AND_GRAD:
        loss_fn = make_loss(name)

        def loss(x, ref, lengths, rewards, valid):
            sequence = {"sequence_logps": x - 2.0, "sequence_lengths": lengths + 3}  # (orpo's NLL)
            out = loss_fn(PreferenceLogps(x, ref, lengths, rewards, valid, **sequence))
            return out.loss, out

        _VALUE_AND_GRAD[name] = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return _VALUE_AND_GRAD[name]


def _finite_output(out):
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(out))


def test_masked_responses_get_zero_gradient_and_no_nan():
    def check(name):
        batch = batch_for(name, seed=22, b=4, k=3)
        valid = np.array([[True, True, False], [True, False, True], [False, False, True], [True, True, True]])
        spoil = lambda x, mask: np.where(mask, x, np.nan).astype(np.float32)
        ref = spoil(batch.ref_logps, valid if np.ndim(batch.ref_logps) == 2 else valid[..., None])
        (value, out), grad = value_and_grad(name)(
            jnp.asarray(spoil(batch.policy_logps, valid)), ref, batch.lengths, spoil(batch.rewards, valid), valid
        )
        assert np.isfinite(float(value)) and _finite_output(out)
        assert np.all(np.isfinite(grad))
        np.testing.assert_array_equal(np.asarray(grad)[~valid], 0.0)
        if name not in ("sft", "aot", "aot_unpaired"):  # (sft: still chosen; aot: per_example is by sorted rank)
            assert float(out.per_example[2]) == 0.0  # a single valid response has no pair

    assert check_every_case(each_loss(sorted(PAIRED_NAMES)), check) == len(PAIRED_NAMES)


def test_all_invalid_batch_is_zero_not_nan():
    def check(name):
        batch = batch_for(name, seed=23, b=4, k=3)
        valid = np.zeros((4, 3), bool)
        (value, out), grad = value_and_grad(name)(
            jnp.asarray(batch.policy_logps), batch.ref_logps, batch.lengths, batch.rewards, valid
        )
        assert float(value) == 0.0 and _finite_output(out)
        np.testing.assert_array_equal(grad, 0.0)

    assert check_every_case(each_loss(sorted(PAIRED_NAMES)), check) == len(PAIRED_NAMES)


def test_finite_at_gaps_of_1e4():
    """Log-probs and rewards 1e4 apart: every loss, metric and gradient stays finite."""

    def check(name):
        batch = batch_for(name, seed=24, b=4, k=3)
        policy = np.array([[0.0, -1e4, -5e3], [-1e4, 0.0, -2e3], [-1e4, -1e4, 0.0], [0.0, 0.0, -1e4]], np.float32)
        rewards = np.array([[1e4, -1e4, 0.0], [1e4, -1e4, 5.0], [-1e4, 0.0, 1e4], [0.0, 1e4, -1e4]], np.float32)
        (value, out), grad = value_and_grad(name)(
            jnp.asarray(policy), batch.ref_logps, batch.lengths, rewards, np.ones((4, 3), bool)
        )
        assert np.isfinite(float(value)) and _finite_output(out), out
        assert np.all(np.isfinite(grad)), grad

    assert check_every_case(each_loss(sorted(PAIRED_NAMES)), check) == len(PAIRED_NAMES)


def test_losses_import_no_flax_and_no_model_code():
    import subprocess
    import sys

    code = (
        "import sys, rpo_jax.losses; bad = [m for m in sys.modules if m.split('.')[0] == 'flax' or "
        "m.startswith(('rpo_jax.models', 'rpo_jax.train', 'rpo_jax.data'))]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
