"""KTO, APO-zero (unpaired) and BCO on ``UnpairedLogps``: KTO against TRL 1.16's own ``KTOTrainer._compute_loss`` run
in PyTorch (loss, every logged loss metric, gradient); BCO against a PyTorch transcription of TRL's last
``BCOTrainer.bco_loss`` / ``RunningMoments`` (TRL 1.16 ships no BCO trainer); limits against the paired
``apo_zero`` / ``bco_pair``; gradients against finite differences; masking, non-finite inputs, errors; jit, vmap,
shard_map and no retracing."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from rpo_jax.losses import BCOState, PreferenceLogps, UnpairedLogps, make_loss
from tests.losses.losses_testlib import random_batch
from tests.losses.trl_trainer_testlib import TrlRunningMoments, assert_metrics_equal, run_kto, torch

KTO_MODEL_METRICS = {"entropy", "num_tokens", "logits/chosen", "logits/rejected"}


def unpaired_batch(seed, *, labels, kl_shift=0.5, valid=None, spread=2.0) -> UnpairedLogps:
    """Summed log-probs of completions of 2..12 tokens; log-ratios of a few nats; mismatched completions whose
    policy/reference log-ratios average about ``kl_shift``."""
    labels = np.asarray(labels, bool)
    rng = np.random.default_rng(seed)
    n = len(labels)
    lengths = rng.integers(2, 13, size=n)
    ref = -rng.uniform(0.8, 2.5, size=n) * lengths
    policy = ref + rng.normal(scale=spread, size=n)
    kl_ref = -rng.uniform(1.5, 3.5, size=n) * lengths
    kl_policy = kl_ref + kl_shift + rng.normal(scale=0.3, size=n)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return UnpairedLogps(f32(policy), labels, f32(ref), f32(kl_policy), f32(kl_ref), valid)


def _trl_kto(batch, **kw):
    as64 = lambda x: np.asarray(x, np.float64)  # noqa: E731  (the float32 values, exactly)
    return run_kto(
        as64(batch.policy_logps), as64(batch.ref_logps), as64(batch.kl_policy_logps), as64(batch.kl_ref_logps),
        batch.labels, **kw,
    )  # fmt: skip


def _with(batch, x):
    return dataclasses.replace(batch, policy_logps=x)


# KTO and APO-zero against TRL's KTOTrainer -----------------------------------------------------------------------

KTO_CASES = {
    "balanced": (dict(labels=[1, 0, 1, 0, 1, 0, 0, 1]), {"beta": 0.1}),
    "unbalanced-weighted": (dict(labels=[1, 1, 1, 1, 1, 1, 0, 0]), {"beta": 0.3, "undesirable_weight": 2.5}),
    "negative-kl-clamped": (dict(labels=[1, 0, 1, 1, 0], kl_shift=-1.0), {"beta": 0.2}),
    "only-desirable": (dict(labels=[1, 1, 1, 1]), {"beta": 0.5, "desirable_weight": 0.8}),
    "only-undesirable": (dict(labels=[0, 0, 0]), {}),
}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("case", sorted(KTO_CASES))
def test_kto_equals_trl_kto_trainer(case, loss_type):
    data, hp = KTO_CASES[case]
    batch = unpaired_batch(sorted(KTO_CASES).index(case), **data)
    trl_names = {"beta": "beta", "desirable_weight": "desirable", "undesirable_weight": "undesirable"}
    trl_loss, trl_metrics, trl_grad = _trl_kto(batch, loss_type=loss_type, **{trl_names[k]: v for k, v in hp.items()})
    loss_fn = make_loss(loss_type, **hp)
    out = jax.jit(loss_fn)(batch)
    grad = jax.grad(lambda x: loss_fn(_with(batch, x)).loss)(jnp.asarray(batch.policy_logps))
    np.testing.assert_allclose(out.loss, trl_loss, rtol=1e-6)
    assert_metrics_equal(out.metrics, trl_metrics, skip=KTO_MODEL_METRICS)
    np.testing.assert_allclose(grad, trl_grad, rtol=1e-5, atol=1e-9)
    labels = np.asarray(batch.labels)
    assert (
        float(out.metrics["count/chosen"]) == labels.sum() and float(out.metrics["count/rejected"]) == (~labels).sum()
    )
    # TRL logs a label's metrics only in steps with rows of it (and the margin only with both): count/* tell which
    assert ("rewards/chosen" in trl_metrics) == bool(labels.any())
    assert ("rewards/margins" in trl_metrics) == bool(labels.any() and (~labels).any())
    if case == "negative-kl-clamped" and loss_type == "kto":
        assert trl_metrics["kl"] == 0.0 and float(out.metrics["kl"]) == 0.0


def test_kto_formula_and_kl_reference_point():
    """Independent of TRL (float64 NumPy): z₀ = max(0, mean(KL log-ratio)) and KTO Eq. 7."""
    batch = unpaired_batch(7, labels=[1, 0, 0, 1, 1, 0], kl_shift=0.8)
    beta, wd, wu = 0.25, 1.3, 0.6
    out = make_loss("kto", beta=beta, desirable_weight=wd, undesirable_weight=wu)(batch)
    rho = np.asarray(batch.policy_logps, np.float64) - batch.ref_logps
    z0 = max(0.0, float(np.mean(np.asarray(batch.kl_policy_logps, np.float64) - batch.kl_ref_logps)))
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    rows = np.where(batch.labels, wd * (1 - sig(beta * (rho - z0))), wu * (1 - sig(beta * (z0 - rho))))
    np.testing.assert_allclose(out.metrics["kl"], z0, rtol=1e-6)
    np.testing.assert_allclose(out.per_example, rows, rtol=1e-5)
    np.testing.assert_allclose(out.loss, rows.mean(), rtol=1e-6)


def _unpair(batch: PreferenceLogps) -> UnpairedLogps:
    """A K = 2 batch as 2B unpaired rows: the chosen completions (desirable), then the rejected ones."""
    policy, ref = np.asarray(batch.policy_logps), np.asarray(batch.ref_logps)
    b = policy.shape[0]
    return UnpairedLogps(
        np.concatenate([policy[:, 0], policy[:, 1]]),
        np.array([True] * b + [False] * b),
        np.concatenate([ref[:, 0], ref[:, 1]]),
    )


def test_kto_without_kl_term_on_unpaired_pairs_is_half_apo_zero():
    paired = random_batch(3, b=6, k=2, rewards=False, scale=1.2)
    unpaired = make_loss("apo_zero_unpaired", beta=0.4)(_unpair(paired))
    apo_zero = make_loss("apo_zero", beta=0.4)(paired)
    np.testing.assert_allclose(unpaired.loss, 0.5 * apo_zero.loss, rtol=1e-6)


def test_kto_with_the_kl_estimate_at_or_below_zero_is_apo_zero_unpaired():
    for shift in (0.0, -2.0):
        batch = unpaired_batch(8, labels=[1, 0, 1, 0, 0], kl_shift=shift)
        batch = dataclasses.replace(batch, kl_policy_logps=batch.kl_ref_logps + np.float32(shift))
        kto, apo = make_loss("kto", beta=0.3)(batch), make_loss("apo_zero_unpaired", beta=0.3)(batch)
        np.testing.assert_allclose(kto.loss, apo.loss, rtol=1e-6)
        np.testing.assert_allclose(kto.per_example, apo.per_example, rtol=1e-6)


# BCO against TRL's BCOTrainer (last shipped: huggingface/trl 3b0ecdf8, trl/experimental/bco/bco_trainer.py) -----


def trl_bco_step(batch: UnpairedLogps, running: TrlRunningMoments, beta: float, do_train: bool = True):
    """TRL's ``bco_loss`` + ``get_batch_loss_metrics`` (without UDM) on one batch: (loss, metrics, ∂loss/∂policy).
    Rewards β(ℓ_θ − ℓ_ref); the moments updated with all rewards first (``do_train``), δ = their mean; losses
    −log σ(r − δ) (desirable), −log σ(−(r − δ)) (undesirable), mean over rows; metrics as its ``log``."""
    labels = np.asarray(batch.labels, bool)
    policy = torch.tensor(np.asarray(batch.policy_logps, np.float32), requires_grad=True)
    ref = torch.tensor(np.asarray(batch.ref_logps, np.float32))
    chosen, rejected = torch.tensor(np.nonzero(labels)[0]), torch.tensor(np.nonzero(~labels)[0])
    chosen_rewards = beta * (policy[chosen] - ref[chosen])
    rejected_rewards = beta * (policy[rejected] - ref[rejected])
    if do_train:
        running.update(torch.cat((chosen_rewards, rejected_rewards), 0).detach())
    delta = torch.as_tensor(running.mean)
    log_sigmoid = torch.nn.functional.logsigmoid
    losses = torch.cat((-log_sigmoid(chosen_rewards - delta), -log_sigmoid(-(rejected_rewards - delta))))
    loss = losses.nanmean()
    loss.backward()
    metrics = {"delta": delta.item()}
    for split, rewards, rows in (("chosen", chosen_rewards, chosen), ("rejected", rejected_rewards, rejected)):
        if len(rows):
            metrics[f"rewards/{split}"] = rewards.sum().item() / len(rows)
            metrics[f"logps/{split}"] = policy[rows].sum().item() / len(rows)
    if len(chosen) and len(rejected):
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss.item(), metrics, policy.grad.numpy()


def test_bco_equals_trl_bco_over_steps_and_an_eval_batch():
    beta = 0.2
    loss_fn = jax.jit(make_loss("bco", beta=beta), static_argnames="update_state")
    state, running = make_loss("bco").init_state(), TrlRunningMoments()
    plan = [([1, 0, 1, 1, 0, 0], True), ([1, 1, 1, 0], True), ([0, 0, 1, 0, 1], True), ([1, 0, 0], False)]
    for step, (labels, train) in enumerate(plan):
        batch = unpaired_batch(30 + step, labels=labels)
        trl_loss, trl_metrics, trl_grad = trl_bco_step(batch, running, beta, do_train=train)
        out = loss_fn(batch, state, update_state=train)
        grad = jax.grad(lambda x: make_loss("bco", beta=beta)(_with(batch, x), state, update_state=train).loss)(
            jnp.asarray(batch.policy_logps)
        )
        np.testing.assert_allclose(out.loss, trl_loss, rtol=1e-6, err_msg=f"step {step}")
        assert_metrics_equal(out.metrics, trl_metrics, skip=())
        np.testing.assert_allclose(grad, trl_grad, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(out.state.mean, running.mean, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(out.state.var, running.var, rtol=1e-5)
        np.testing.assert_allclose(out.state.count, running.count, rtol=1e-7)
        if not train:
            chex.assert_trees_all_equal(out.state, state)
        state = out.state


def test_bco_delta_is_the_mean_of_every_reward_seen():
    beta = 0.5
    loss_fn = make_loss("bco", beta=beta)
    state, seen = loss_fn.init_state(), []
    for seed, valid in ((40, None), (41, np.array([True, False, True, True, False])), (42, None)):
        batch = unpaired_batch(seed, labels=[1, 0, 0, 1, 1], valid=valid)
        out = loss_fn(batch, state)
        keep = np.ones(5, bool) if valid is None else valid
        seen += list(beta * (np.asarray(batch.policy_logps, np.float64) - batch.ref_logps)[keep])
        np.testing.assert_allclose(out.metrics["delta"], np.mean(seen), rtol=1e-5)
        np.testing.assert_allclose(out.state.var, np.var(seen), rtol=1e-4)
        assert float(out.state.count) == len(seen)
        state = out.state
    np.testing.assert_allclose(state.std, np.std(seen, ddof=1), rtol=1e-4)


def test_bco_with_zero_shift_on_unpaired_pairs_is_half_bco_pair():
    paired = random_batch(5, b=6, k=2, rewards=False, scale=1.2)
    loss_fn = make_loss("bco", beta=0.3)
    out = loss_fn(_unpair(paired), loss_fn.init_state(), update_state=False)  # δ = the initial mean, 0
    assert float(out.metrics["delta"]) == 0.0
    np.testing.assert_allclose(out.loss, 0.5 * make_loss("bco_pair", beta=0.3)(paired).loss, rtol=1e-6)


# Gradients, masking, non-finite inputs, errors -------------------------------------------------------------------

GRAD_CASES = [("kto", {"undesirable_weight": 2.0}), ("apo_zero_unpaired", {"beta": 0.5}), ("bco", {})]


@pytest.mark.parametrize("name,hp", GRAD_CASES, ids=[n for n, _ in GRAD_CASES])
def test_gradients_against_finite_differences(name, hp):
    """(BCO with ``update_state=False``: with the update δ moves with the rewards of the batch, but, as in TRL, is a
    constant of the gradient; that gradient is the one TRL's test above checks.)"""
    batch = unpaired_batch(50, labels=[1, 0, 1, 1, 0])
    loss_fn = make_loss(name, **hp)
    state = BCOState(jnp.float32(0.3), jnp.float32(1.0), jnp.float32(10.0)) if name == "bco" else None
    kwargs = {"update_state": False} if name == "bco" else {}
    f = jax.jit(lambda x: loss_fn(_with(batch, x), state, **kwargs).loss)
    check_grads(f, (jnp.asarray(batch.policy_logps),), order=2, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2)


def _run(name, batch):
    loss_fn = make_loss(name)
    return loss_fn(batch, loss_fn.init_state())


FIELDS = ("policy_logps", "ref_logps", "kl_policy_logps", "kl_ref_logps")


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired", "bco"])
def test_padding_rows_are_masked_and_non_finite_valid_rows_are_never_dropped(name):
    valid = np.array([True, True, False, True, False, True])
    clean = unpaired_batch(60, labels=[1, 0, 1, 0, 0, 1], valid=valid)
    zeroed = dataclasses.replace(clean, **{f: np.where(valid, getattr(clean, f), 0).astype(np.float32) for f in FIELDS})
    want = _run(name, zeroed)
    for field in FIELDS:
        for value in (np.nan, np.inf):
            spoiled = np.array(getattr(clean, field))
            spoiled[2] = value  # a padding row: exactly as a 0 there
            out = _run(name, dataclasses.replace(zeroed, **{field: spoiled}))
            chex.assert_trees_all_close(out, want, rtol=0, atol=0)
            spoiled[1] = value  # a valid row: NaN loss and that row NaN, whatever the loss reads
            out = _run(name, dataclasses.replace(zeroed, **{field: spoiled}))
            assert np.isnan(float(out.loss)) and np.isnan(out.per_example[1]), (field, value)
    loss_fn = make_loss(name)
    grad = jax.grad(lambda x: loss_fn(_with(clean, x), loss_fn.init_state()).loss)(
        jnp.asarray(np.where(valid, clean.policy_logps, np.nan), jnp.float32)
    )
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~valid] == 0.0)
    out = _run(name, dataclasses.replace(clean, valid=np.zeros(6, bool)))
    assert float(out.loss) == 0.0 and all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(out))
    if name == "bco":
        chex.assert_trees_all_equal(out.state, loss_fn.init_state())  # no row: the moments stay


def test_bad_batches_and_calls_name_the_field():
    batch = unpaired_batch(70, labels=[1, 0, 1])
    cases = [
        ("kto", random_batch(0), {}, "expects an UnpairedLogps"),
        ("dpo", batch, {}, "expects a PreferenceLogps"),
        ("kto", dataclasses.replace(batch, kl_ref_logps=None), {}, r"kl_ref_logps is None.*apo_zero_unpaired"),
        ("bco", dataclasses.replace(batch, ref_logps=None), {"state": "init"}, r"ref_logps is None"),
        ("kto", dataclasses.replace(batch, labels=np.array([1, 0, 1])), {}, "labels must be a bool array"),
        ("kto", dataclasses.replace(batch, labels=None), {}, "labels is None"),
        ("kto", dataclasses.replace(batch, ref_logps=np.zeros(4, np.float32)), {}, r"ref_logps has shape \(4,\)"),
        ("kto", _with(batch, np.zeros((3, 1), np.float32)), {}, r"policy_logps must have shape \[B\]"),
        ("bco", batch, {}, r"carries a state.*init_state\(\)"),
        ("kto", batch, {"state": "init-bco"}, "has no state"),
    ]
    for name, b, kw, match in cases:
        kw = dict(kw)
        if kw.get("state") == "init":
            kw["state"] = make_loss(name).init_state()
        elif kw.get("state") == "init-bco":
            kw["state"] = BCOState.initial()
        with pytest.raises(ValueError, match=match):
            jax.jit(make_loss(name))(b, **kw)  # at trace time too
    with pytest.raises(ValueError, match="takes unpaired data.*cannot be combined"):
        make_loss([("kto", 1.0), ("dpo", 0.5)])
    with pytest.raises(ValueError, match="desirable_weight"):
        make_loss("kto", desirable_weight=-1.0)
    spec = make_loss("kto").spec
    assert spec.unpaired and spec.requires_kl_logps and spec.requires_reference and not spec.stateful
    assert not make_loss("apo_zero_unpaired").spec.requires_kl_logps
    assert make_loss("bco").spec.stateful and make_loss("kto").init_state() is None


# jit, vmap, shard_map, retracing ----------------------------------------------------------------------------------


class JitAndVmapTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("kto", "apo_zero_unpaired", "bco")
    def test_jit_and_no_jit_agree_and_vmap_is_per_batch(self, name):
        batches = [unpaired_batch(seed, labels=[1, 0, 1, 1, 0, 0]) for seed in (80, 81, 82)]
        loss_fn = make_loss(name)
        state = BCOState(jnp.float32(-0.2), jnp.float32(0.5), jnp.float32(7.0)) if name == "bco" else None
        outs = [self.variant(loss_fn)(b, state) for b in batches]
        stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *batches)
        mapped = self.variant(jax.vmap(loss_fn, in_axes=(0, None)))(stacked, state)
        for i, out in enumerate(outs):
            reference = loss_fn(batches[i], state)
            chex.assert_trees_all_close(out, reference, rtol=1e-6)
            chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: x[i], mapped), out, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["kto", "bco"])
def test_shard_map_over_eight_devices_is_the_global_batch(name):
    """The KL reference point and BCO's batch moments are global: 16 rows on 8 devices (2 of them padding)."""
    valid = np.ones(16, bool)
    valid[[3, 12]] = False
    batch = unpaired_batch(90, labels=np.arange(16) % 3 == 0, valid=valid)
    state = BCOState(jnp.float32(0.1), jnp.float32(0.7), jnp.float32(5.0)) if name == "bco" else None
    single, sharded = make_loss(name), make_loss(name, axis_name="d")
    x = jnp.asarray(batch.policy_logps)
    want = jax.jit(lambda x: single(_with(batch, x), state))(x)
    want_grad = jax.grad(lambda x: single(_with(batch, x), state).loss)(x)

    def local(x, rest):
        out = sharded(_with(rest, x), state)
        return out, jax.grad(lambda y: sharded(_with(rest, y), state).loss)(x)

    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    state_spec = None if state is None else BCOState(P(), P(), P())
    out_specs = (type(want)(P(), P("d"), {k: P() for k in want.metrics}, state_spec), P("d"))
    rest_spec = UnpairedLogps(None, P("d"), P("d"), P("d"), P("d"), P("d"))
    run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"), rest_spec), out_specs=out_specs))
    got, got_grad = run(x, _with(batch, None))
    chex.assert_trees_all_close(got, want, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(got_grad, want_grad, rtol=2e-5, atol=1e-8)


def test_bco_steps_do_not_retrace():
    loss_fn = make_loss("bco")
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(batch, state):
        return loss_fn(batch, state)

    state = loss_fn.init_state()
    for seed in range(4):
        state = step(unpaired_batch(100 + seed, labels=[1, 0, 0, 1]), state).state
    assert np.isfinite(float(state.mean))
