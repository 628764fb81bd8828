"""Nothing lost, nothing silent: a non-finite value in a *valid* slot of any input field makes the loss NaN (and
the affected example's ``per_example``, and its policy gradient), while NaN/±inf in an *invalid* slot is fully
masked: the outputs equal those of the same batch with that slot set to 0, and gradients stay finite."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rpo_jax.losses import PreferenceLogps, make_loss
from tests.losses.losses_testlib import check_every_case, jit_loss, paired_losses

B, K = 4, 3
VALID = np.array([[True, True, True], [True, True, False], [True, True, True], [True, False, True]])
VALID_SLOT = (0, 1)  # a valid response of example 0 (neither its best nor its worst: it is in every kind of pair)
INVALID_SLOT = (1, 2)  # an invalid response of example 1


def _batch(name: str, seed: int = 0) -> PreferenceLogps:
    """Every field a loss may read: rewards (no ties, slot (0, 1) in the middle), float lengths, a reference
    axis of R = 3 for the multi-reference losses ([B, K] otherwise), and the prompt + response sequence log-probs."""
    spec = make_loss(name).spec
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 10, size=(B, K)).astype(np.float32)
    policy = (-rng.uniform(0.5, 1.5, size=(B, K)) * lengths).astype(np.float32)
    ref_shape = (B, K, 3) if spec.min_references >= 2 else (B, K)
    ref = -rng.uniform(0.5, 1.5, size=ref_shape) * (lengths if len(ref_shape) == 2 else lengths[..., None])
    rewards = np.array([[1.0, 0.0, -1.0], [0.3, -0.4, 0.9], [-0.2, 0.7, 0.1], [0.5, 0.0, -0.6]], np.float32)
    sequence_lengths = lengths + np.float32(3.0)
    sequence = policy - rng.uniform(1.0, 4.0, size=(B, K)).astype(np.float32)
    return PreferenceLogps(policy, ref.astype(np.float32), lengths, rewards, VALID, sequence, sequence_lengths)


def _fields(name: str) -> list[tuple[str, int | None]]:
    """(field, reference index or None): every field of the batch, each reference separately."""
    out = [("policy_logps", None), ("lengths", None), ("rewards", None)]
    out += [("sequence_logps", None), ("sequence_lengths", None)]
    ref = _batch(name).ref_logps
    out += [("ref_logps", r) for r in range(ref.shape[-1])] if ref.ndim == 3 else [("ref_logps", None)]
    return out


def _set(batch: PreferenceLogps, field: str, ref_index: int | None, slot: tuple[int, int], value: float):
    array = np.array(getattr(batch, field), np.float32)
    index = slot if ref_index is None else (*slot, ref_index)
    array[index] = value
    return dataclasses.replace(batch, **{field: array})


PAIRED = paired_losses()  # the unpaired losses (kto, bco, ...): tests/losses/test_losses_unpaired.py
CASES = [(name, field, r) for name in PAIRED for field, r in _fields(name)]
IDS = [f"{name}-{field}" + ("" if r is None else f"[{r}]") for name, field, r in CASES]
VALUES = [("nan", np.nan), ("+inf", np.inf), ("-inf", -np.inf)]
# Each check below loops over its whole table in one test (check_every_case names each failing case by the id it
# had as a parametrised item, e.g. "dpo-ref_logps-+inf"): 755 items of a few milliseconds each were mostly
# pytest's own overhead. The compiled losses are shared through jit_loss, as before.
CASES_AND_VALUES = [
    (f"{case_id}-{value_id}", (*case, value)) for case_id, case in zip(IDS, CASES) for value_id, value in VALUES
]


def _out(name, batch):
    out = jit_loss(name)(batch)
    return float(out.loss), np.asarray(out.per_example)


def test_the_batch_is_finite_and_every_loss_is_finite_on_it():
    for name in PAIRED:
        loss, per_example = _out(name, _batch(name))
        assert np.isfinite(loss) and np.all(np.isfinite(per_example)), name


def test_non_finite_in_a_valid_slot_gives_nan():
    def check(name, field, ref_index, value):
        batch = _set(_batch(name), field, ref_index, VALID_SLOT, value)
        loss, per_example = _out(name, batch)
        assert np.isnan(loss), (name, field, loss)
        assert np.isnan(per_example[VALID_SLOT[0]]), (name, field, per_example)

    assert check_every_case(CASES_AND_VALUES, check) == 3 * len(CASES)


def test_nan_in_a_valid_slot_reaches_the_policy_gradient():
    """A training step on a NaN example is not silently a step on the rest: the gradient of the affected
    example's valid policy slots is NaN too (examples whose inputs are all finite keep finite gradients unless
    the loss couples them, which the value test above already covers)."""

    def check(name, field, ref_index):
        batch = _set(_batch(name), field, ref_index, VALID_SLOT, np.nan)
        loss_fn = jit_loss(name)
        grad = jax.grad(lambda x: loss_fn(dataclasses.replace(batch, policy_logps=x)).loss)(
            jnp.asarray(batch.policy_logps)
        )
        grad = np.asarray(grad)
        assert np.all(np.isnan(grad[VALID_SLOT[0]][VALID[VALID_SLOT[0]]])), (name, field, grad)

    assert check_every_case(zip(IDS, CASES), check) == len(CASES)


def test_non_finite_in_an_invalid_slot_equals_zero_there():
    def check(name, field, ref_index, value):
        clean = _batch(name)
        spoiled = _set(clean, field, ref_index, INVALID_SLOT, value)
        zeroed = _set(clean, field, ref_index, INVALID_SLOT, 0.0)
        loss, per_example = _out(name, spoiled)
        loss_zero, per_example_zero = _out(name, zeroed)
        assert np.isfinite(loss) and np.all(np.isfinite(per_example)), (name, field, loss, per_example)
        np.testing.assert_array_equal(loss, loss_zero)
        np.testing.assert_array_equal(per_example, per_example_zero)

    assert check_every_case(CASES_AND_VALUES, check) == 3 * len(CASES)


def test_nan_in_every_invalid_slot_keeps_gradients_finite_and_zero_there():
    def check(name):
        batch = _batch(name)
        for field, r in _fields(name):
            for slot in zip(*np.nonzero(~VALID)):
                batch = _set(batch, field, r, tuple(slot), np.nan)
        loss_fn = jit_loss(name)
        value, grad = jax.value_and_grad(lambda x: loss_fn(dataclasses.replace(batch, policy_logps=x)).loss)(
            jnp.asarray(batch.policy_logps)
        )
        assert np.isfinite(float(value))
        assert np.all(np.isfinite(np.asarray(grad)))
        np.testing.assert_array_equal(np.asarray(grad)[~VALID], 0.0)

    assert check_every_case([(name, (name,)) for name in PAIRED], check) == len(PAIRED)


def test_combined_losses_and_component_losses_are_nan_too():
    batch = _set(_batch("dpo"), "rewards", None, VALID_SLOT, np.nan)
    out = make_loss([("dpo", 1.0), ("sft", 0.1)])(batch)
    assert np.isnan(float(out.loss))
    assert np.isnan(float(out.metrics["loss/dpo"])) and np.isnan(float(out.metrics["loss/sft"]))
    assert np.isnan(np.asarray(out.per_example)[VALID_SLOT[0]])
