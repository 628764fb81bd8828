"""Cross-device means (``axis_name``) under pmap and shard_map on the 8 fake CPU devices, chex variants, and no
retracing on new values of the same shape."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import PartitionSpec as P

from rpo_jax.losses import PreferenceLogps, make_loss
from tests.losses.losses_testlib import random_batch

N_DEVICES = 8
FIELDS = ("policy_logps", "ref_logps", "lengths", "rewards", "valid")
# One loss of each kind: reward-aware pairwise/listwise, preference-only, batch-global (sft, aot), MRPO, combined.
CASES = [
    ("rpo_bwd_kl", {}),
    ("rpo_listwise", {}),
    ("dpo", {}),
    ("ipo", {}),
    ("aot", {}),
    ("mrpo", {}),
    ("sft", {}),
    ([("rpo_sq", 1.0), ("sft", 0.1)], {}),
]


def _needs_r(name):
    return name in ("mrpo", "multi_dpo")


def global_batch(name, seed=0):
    """16 examples, K = 3, with missing responses and whole examples without a pair on some devices."""
    valid = np.ones((16, 3), bool)
    valid[[1, 5, 6, 12], 2] = False
    valid[[3, 4, 5], 1:] = False  # device 1 (examples 2, 3) and device 2 (4, 5): examples without a pair
    batch = random_batch(seed, b=16, k=3, r=3 if _needs_r(name) else None, valid=valid)
    return batch


def _first_name(name):
    return name if isinstance(name, str) else name[0][0]


def _shard(batch):
    return PreferenceLogps(
        *[
            None
            if getattr(batch, f) is None
            else np.asarray(getattr(batch, f)).reshape(N_DEVICES, -1, *np.shape(getattr(batch, f))[1:])
            for f in FIELDS
        ]
    )


def _assert_same_output(got, want):
    np.testing.assert_allclose(got.loss, want.loss, rtol=2e-6, atol=1e-7)
    assert set(got.metrics) == set(want.metrics)
    for key in want.metrics:
        np.testing.assert_allclose(got.metrics[key], want.metrics[key], rtol=2e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize(
    "name,hp", CASES, ids=[str(_first_name(n)) + ("+" if not isinstance(n, str) else "") for n, _ in CASES]
)
def test_pmap_over_sharded_batch_is_the_global_mean(name, hp):
    batch = global_batch(_first_name(name))
    single = jax.jit(make_loss(name, **hp))(batch)
    sharded = jax.pmap(make_loss(name, axis_name="d", **hp), axis_name="d")(_shard(batch))
    _assert_same_output(jax.tree_util.tree_map(lambda x: x[0], sharded), single)
    np.testing.assert_allclose(np.asarray(sharded.per_example).reshape(-1), single.per_example, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(
    "name,hp", CASES, ids=[str(_first_name(n)) + ("+" if not isinstance(n, str) else "") for n, _ in CASES]
)
def test_shard_map_values_and_gradients_match_single_device(name, hp):
    batch = global_batch(_first_name(name), seed=1)
    mesh = jax.make_mesh((N_DEVICES,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    single_fn, sharded_fn = make_loss(name, **hp), make_loss(name, axis_name="d", **hp)

    def with_policy(fn, x, rest):
        return fn(PreferenceLogps(x, rest.ref_logps, rest.lengths, rest.rewards, rest.valid))

    rest = PreferenceLogps(None, batch.ref_logps, batch.lengths, batch.rewards, batch.valid)
    x = jnp.asarray(batch.policy_logps)
    want = jax.jit(lambda x: with_policy(single_fn, x, rest))(x)
    want_grad = jax.jit(jax.grad(lambda x: with_policy(single_fn, x, rest).loss))(x)

    def local(x, rest):
        out = with_policy(sharded_fn, x, rest)
        grad = jax.grad(lambda y: with_policy(sharded_fn, y, rest).loss)(x)
        return out, grad

    out_specs = (type(want)(loss=P(), per_example=P("d"), metrics={k: P() for k in want.metrics}), P("d"))
    run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=out_specs))
    got, got_grad = run(x, rest)
    _assert_same_output(got, want)
    np.testing.assert_allclose(got_grad, want_grad, rtol=2e-5, atol=1e-7)


def test_pmap_gradients_carry_jax_pmap_psum_scaling():
    """Documented JAX behaviour: under the legacy ``jax.pmap`` (no varying-axis typing) psum transposes to psum,
    so the gradient of a psum-ed global mean is the true gradient times the number of devices."""
    batch = global_batch("dpo", seed=2)
    x = jnp.asarray(batch.policy_logps)
    rest = PreferenceLogps(None, batch.ref_logps, batch.lengths, batch.rewards, batch.valid)
    loss = lambda fn, x, rest: fn(PreferenceLogps(x, rest.ref_logps, rest.lengths, rest.rewards, rest.valid)).loss
    want = jax.grad(lambda x: loss(make_loss("dpo"), x, rest))(x)
    sharded = _shard(PreferenceLogps(x, *[getattr(rest, f) for f in FIELDS[1:]]))
    got = jax.pmap(jax.grad(lambda x, rest: loss(make_loss("dpo", axis_name="d"), x, rest)), axis_name="d")(
        sharded.policy_logps, PreferenceLogps(None, *[getattr(sharded, f) for f in FIELDS[1:]])
    )
    np.testing.assert_allclose(np.asarray(got).reshape(16, 3) / N_DEVICES, want, rtol=2e-5, atol=1e-8)


class VariantsTest(chex.TestCase):
    """chex variants: jit, no jit, and pmap (chex replicates the batch on every device; the psum-ed global
    mean of 8 identical shards must equal the single-device value)."""

    @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
    @parameterized.parameters("rpo_fwd_kl", "simpo", "mrpo", "aot_unpaired")
    def test_variants_agree_with_single_device(self, name):
        batch = global_batch(name, seed=3)
        want = make_loss(name)(batch)
        axis_name = "i" if self.variant.type == chex.ChexVariantType.WITH_PMAP else None
        got = self.variant(make_loss(name, axis_name=axis_name))(batch)
        _assert_same_output(got, want)


def test_no_retrace_on_new_values_of_the_same_shape():
    loss_fn = make_loss("rpo_bwd_kl", reference_combiner="mrpo")
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(batch):
        return loss_fn(batch)

    for seed in range(4):
        out = step(random_batch(seed, b=4, k=3, r=2))
        assert np.isfinite(float(out.loss))
