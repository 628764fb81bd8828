"""Online RPO (rpo_jax.train.jobs.online): sampling → rewards → references → updates, resume, and the RLOO identity."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rpo_jax.data import demo_paths, judge
from rpo_jax.train.build.data import load_tokenizer
from rpo_jax.train.build.model import load_model, split_trainable
from rpo_jax.train.build.programs import online_update_step
from rpo_jax.train.core.export import export_workdir
from rpo_jax.train.jobs import online
from rpo_jax.train.jobs.preference import train
from tests.train.trainer_testlib import load_recipe, read_metrics, set_fields

SFT_MODEL = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "max_position_embeddings": 128,
}


def _quiet(c):
    c.train.progress_bar = False
    c.metrics.tensorboard = False
    c.metrics.peak_flops = 1e11
    return c


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory) -> str:
    """A tiny Llama fine-tuned (sft loss) on the demo task: its samples vary in judge reward."""
    workdir = tmp_path_factory.mktemp("sft")
    c = _quiet(load_recipe("sft_demo"))
    c.model.init = dict(SFT_MODEL)
    c.train.steps = 120
    c.train.checkpoint_every = 120
    c.train.async_checkpointing = False
    train(c, workdir)
    return str(workdir / "export")


def online_config(policy: str, **overrides):
    c = _quiet(load_recipe("online_demo"))
    c.model.path = policy
    c.online.iterations = 2
    c.online.prompts_per_iteration = 16
    c.data.batch_size = 8
    c.online.updates_per_iteration = 2
    c.online.max_new_tokens = 20
    c.online.eval_prompts = 32
    c.online.eval_every = 0
    c.train.export_at_end = False
    c.train.async_checkpointing = False
    return set_fields(c, overrides)


# ------------------------------------------------------------------------------------------------ pure parts
def test_prompt_order_is_a_permutation_per_epoch_and_continues_across_epochs():
    n, per = 10, 4
    order = np.concatenate([online.prompt_order(n, i, per, seed=3) for i in range(5)])  # 20 positions = 2 epochs
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
    assert not np.array_equal(order[:10], order[10:])  # a new permutation each epoch
    np.testing.assert_array_equal(online.prompt_order(n, 2, per, seed=3), order[8:12])


def test_sample_batch_layout_follows_the_data_contract():
    prompts = [[5, 6, 7], [8]]
    responses = np.array([[[1, 2, 0], [3, 0, 0]], [[4, 4, 4], [9, 2, 0]]], np.int32)
    mask = np.array([[[1, 1, 0], [1, 0, 0]], [[1, 1, 1], [1, 1, 0]]], bool)
    batch = online.sample_batch(prompts, responses, mask, np.array([[1.0, 0.0], [0.5, 0.25]]), width=7, pad_id=0)
    np.testing.assert_array_equal(batch["tokens"][0, 0], [5, 6, 7, 1, 2, 0, 0])
    np.testing.assert_array_equal(batch["tokens"][1, 1], [8, 9, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["loss_mask"][0, 1], [0, 0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(batch["attention_mask"][1, 0], [1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(batch["lengths"], [[2, 1], [3, 2]])
    assert batch["valid"].all() and batch["rewards"].dtype == np.float32
    with pytest.raises(ValueError, match="width"):
        online.sample_batch(prompts, responses, mask, None, width=4, pad_id=0)


def test_left_pad():
    tokens, mask = online.left_pad([[1, 2], [3]], 4, pad_id=9)
    np.testing.assert_array_equal(tokens, [[9, 9, 1, 2], [9, 9, 9, 3]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1]])


def test_import_object_errors():
    assert online.import_object("rpo_jax.data.demo:judge") is judge
    for bad in ("rpo_jax.data.demo", "rpo_jax.data.demo:nope", "no_such_module:f"):
        with pytest.raises(ValueError, match=bad.split(":")[0]):
            online.import_object(bad)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"online.reward_judge": ""}, "exactly one of reward_judge"),
        ({"online.reward_model": "/somewhere"}, "exactly one of reward_judge"),
        ({"online.prompts_per_iteration": 12}, "multiple of data.batch_size"),
        ({"online.num_samples": 1}, r"online.num_samples=1: expected ≥ 2"),
        ({"online.reference": "last"}, "online.reference"),
        ({"online.sampler": "other"}, "online.sampler"),
        ({"references": [{"path": "/x"}]}, "references\\[0\\] must have an empty path"),
    ],
)
def test_bad_online_configs_fail_before_training(overrides, match):
    with pytest.raises(ValueError, match=match):
        online.build_online_run(online_config("", **{"model.init": dict(SFT_MODEL), **overrides}))


# ------------------------------------------------------------------------------------------------ with a policy
def _independent_response_logps(run, params, batch) -> jax.Array:
    """Σ_t log softmax(model(tokens))[t-1, tokens[t]] over loss_mask, straight from the logits."""
    model = nnx.merge(run.graphdef, params, run.rest)
    b, k, t = batch["tokens"].shape
    tokens = jnp.asarray(batch["tokens"]).reshape(b * k, t)
    logits = model(tokens, jnp.asarray(batch["attention_mask"]).reshape(b * k, t))
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    mask = jnp.asarray(batch["loss_mask"]).reshape(b * k, t)[:, 1:]
    return jnp.sum(picked * mask, -1).reshape(b, k)


def test_rloo_online_step_gradient_is_the_rloo_estimator(sft_policy):
    """One `rloo` update with SGD(lr = 1) moves the parameters by −∇L, and ∇L = −4βη × the REINFORCE
    leave-one-out estimator (1/B) Σ_b (1/K) Σ_k (r_bk − mean_{j≠k} r_bj) ∇ log π(y_bk), computed here from the
    samples with an independent log-prob."""
    beta, eta, k = 0.5, 2.0, 4
    cfg = online_config(
        sft_policy,
        **{
            "loss.name": "rloo",
            "loss.hparams": {"beta": beta, "eta": eta},
            "online.reference": "current",
            "online.num_samples": k,
            "online.updates_per_iteration": 1,
            "data.batch_size": 16,
            "optimizer.name": "sgd",
            "optimizer.learning_rate": 1.0,
            "optimizer.schedule": "constant",
            "optimizer.grad_clip_norm": 0.0,
        },
    )
    run = online.build_online_run(cfg)
    params = run.state["params"]
    batch, stats = online.iteration_batch(run, params, 0)
    rewards = batch["rewards"]
    assert rewards.std() > 0.05, "the SFT policy's samples must differ in reward for this test to bite"
    assert "ref_logps" not in batch  # rloo needs no reference: its baseline is the other samples
    advantage = rewards - (rewards.sum(1, keepdims=True) - rewards) / (k - 1)

    estimator = jax.grad(lambda p: jnp.mean(jnp.sum(advantage * _independent_response_logps(run, p, batch), 1) / k))(
        params
    )
    before = jax.tree.map(np.asarray, params)
    state, _ = online_update_step(run.config, run, run.loss_fn)(
        jax.tree.map(jnp.copy, run.state), online.global_batch(run, batch)
    )
    step_grad = jax.tree.map(lambda a, b: a - np.asarray(b), before, state["params"])  # = ∇L
    flat_step, flat_est = jax.tree.leaves(step_grad), jax.tree.leaves(estimator)
    scale = max(float(np.max(np.abs(g))) for g in flat_est)
    assert scale > 1e-3
    for g_step, g_est in zip(flat_step, flat_est):
        np.testing.assert_allclose(g_step, -4 * beta * eta * np.asarray(g_est), atol=2e-5 * 4 * beta * eta * scale)


def test_reference_modes_give_the_documented_reference_logps(sft_policy):
    cfg = online_config(sft_policy, **{"online.reference": "initial"})
    run = online.build_online_run(cfg)
    moved = jax.tree.map(lambda x: x * 1.01, run.state["params"])
    batch, stats = online.iteration_batch(run, moved, 0)
    dev = online.global_batch(run, batch)
    np.testing.assert_allclose(
        batch["ref_logps"], online.sample_logps(run.policy_scorer, run.initial_params, dev), rtol=1e-6
    )
    assert stats["kl_to_initial"] == pytest.approx(
        float(np.mean(online.sample_logps(run.policy_scorer, moved, dev) - batch["ref_logps"])), rel=1e-5
    )

    run_prev = online.build_online_run(online_config(sft_policy, **{"online.reference": "previous_iterate"}))
    batch_prev, _ = online.iteration_batch(run_prev, moved, 0)
    np.testing.assert_array_equal(batch_prev["tokens"], batch["tokens"])  # same prompts, key and sampler
    np.testing.assert_allclose(
        batch_prev["ref_logps"], online.sample_logps(run_prev.policy_scorer, moved, dev), rtol=1e-6
    )

    # current: DPO against sg(policy) is log 2 for every example, whatever the parameters
    run_cur = online.build_online_run(
        online_config(sft_policy, **{"online.reference": "current", "loss.name": "dpo", "loss.hparams": {"beta": 0.3}})
    )
    batch_cur, _ = online.iteration_batch(run_cur, moved, 0)
    assert "ref_logps" not in batch_cur
    minibatch = online.global_batch(run_cur, next(online.minibatches(batch_cur, 8, 1)))
    _, metrics = online_update_step(run_cur.config, run_cur, run_cur.loss_fn)(run_cur.state, minibatch)
    assert float(metrics["loss"]) == pytest.approx(math.log(2), abs=1e-6)


def test_offline_sampler_draws_every_iteration_from_the_initial_policy(sft_policy):
    run = online.build_online_run(online_config(sft_policy, **{"online.sampler": "initial"}))
    moved = jax.tree.map(lambda x: x * 1.05, run.state["params"])
    offline, stats = online.iteration_batch(run, moved, 1)
    initial, _ = online.iteration_batch(run, run.initial_params, 1)
    np.testing.assert_array_equal(offline["tokens"], initial["tokens"])
    assert "kl_to_initial" not in stats  # samples from π_0 do not estimate KL(π_i ‖ π_0)


def test_mrpo_online_stacks_a_second_fixed_reference(sft_policy):
    cfg = online_config(
        sft_policy,
        **{"loss.name": "mrpo", "loss.hparams": {"beta": 0.1}, "references": [{"path": ""}, {"path": sft_policy}]},
    )
    run = online.build_online_run(cfg)
    batch, _ = online.iteration_batch(run, run.state["params"], 0)
    assert batch["ref_logps"].shape == batch["rewards"].shape + (2,)
    np.testing.assert_allclose(batch["ref_logps"][..., 0], batch["ref_logps"][..., 1], rtol=1e-6)


def test_reward_model_as_the_reward_source(sft_policy, tmp_path):
    from rpo_jax.models import create_reward_model, load_reward_model, reward_model_fn, save_reward_model
    from rpo_jax.models.hf_io import load_hf

    _, mconfig = load_hf(sft_policy)
    rm = create_reward_model(mconfig, rngs=nnx.Rngs(0))
    tokenizer = load_tokenizer(demo_paths()["tokenizer"])
    save_reward_model(rm, mconfig, tmp_path / "rm", tokenizer=tokenizer)
    cfg = online_config(
        sft_policy,
        **{
            "online.reward_judge": "",
            "online.reward_model": str(tmp_path / "rm"),
            "online.eval_judge": "rpo_jax.data.demo:judge",
        },
    )
    run = online.build_online_run(cfg)
    batch, stats = online.iteration_batch(run, run.state["params"], 0)
    # the rewards are the reward model's scores of the decoded samples; the judge is logged beside them
    texts = online.decode_responses(run, *_generated(batch))
    prompts = [
        online.prompt_for_reward(run.prompts["train"][i])
        for i in online.prompt_order(len(run.prompts["train"]), 0, 16, cfg.seed)
    ]
    loaded, _ = load_reward_model(tmp_path / "rm")
    expected = reward_model_fn(loaded, tokenizer, max_length=64, batch_size=8)(prompts, texts)
    np.testing.assert_allclose(batch["rewards"], expected, rtol=1e-5, atol=1e-6)
    judged = np.mean([[judge(p[-1]["content"], t) for t in ts] for p, ts in zip(prompts, texts)])
    assert stats["judge_reward"] == pytest.approx(judged, abs=1e-6)


def _generated(batch):
    """Back from a sample batch to the generated tokens and mask [P, K, max_len]."""
    lengths = batch["lengths"]
    m = int(lengths.max())
    tokens = np.zeros(lengths.shape + (m,), np.int32)
    mask = np.zeros(lengths.shape + (m,), bool)
    for p, k in np.ndindex(lengths.shape):
        pos = np.flatnonzero(batch["loss_mask"][p, k])
        tokens[p, k, : len(pos)], mask[p, k, : len(pos)] = batch["tokens"][p, k, pos], True
    return tokens, mask


def test_online_iterations_improve_the_judge_reward(sft_policy, tmp_path):
    cfg = online_config(
        sft_policy,
        **{
            "online.iterations": 12,
            "online.prompts_per_iteration": 32,
            "data.batch_size": 16,
            "online.updates_per_iteration": 4,
            "online.eval_prompts": 200,
            "online.eval_every": 100,
            "optimizer.learning_rate": 2e-3,
            "train.export_at_end": True,
        },
    )
    result = online.train_online(cfg, tmp_path)
    assert result["iteration"] == 12
    # Paired comparison: the starting and the trained policy answer the same 200 held-out prompts with the
    # same sampling key (common random numbers), and the judge scores both.
    run = online.build_online_run(cfg)
    trained, _ = load_model(result["export"], cfg, run.mesh, run.dtype)
    trained_params = split_trainable(trained)[1]
    before = online.evaluate_online(run, run.initial_params, 0)
    after = online.evaluate_online(run, trained_params, 0)
    assert after["judge_reward"] > before["judge_reward"] + 0.05, (before, after)
    assert after["kl_to_initial"] > 0 and before["kl_to_initial"] == 0


def test_resume_continues_exactly_like_an_uninterrupted_run(sft_policy, tmp_path):
    full = online_config(sft_policy, **{"online.iterations": 3, "train.checkpoint_every": 1})
    online.train_online(full, tmp_path / "full")
    first = online_config(sft_policy, **{"online.iterations": 1, "train.checkpoint_every": 1})
    online.train_online(first, tmp_path / "split")
    online.train_online(full, tmp_path / "split")  # resumes at iteration 1
    a = [m for m in read_metrics(tmp_path / "full") if "online/loss" in m]
    b = [m for m in read_metrics(tmp_path / "split") if "online/loss" in m]
    assert [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["online/loss"] == y["online/loss"] and x["online/reward"] == y["online/reward"]
    exported = {}
    for name in ("full", "split"):
        exported[name] = export_workdir(tmp_path / name, tmp_path / f"export_{name}")
    from safetensors.numpy import load_file

    ta, tb = (load_file(str(exported[n] / "model.safetensors")) for n in ("full", "split"))
    for key in ta:
        np.testing.assert_array_equal(ta[key], tb[key])
