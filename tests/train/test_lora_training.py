"""LoRA in the trainer (config.model.lora): only the adapters train (the base is compared bit for bit), the step's
gradients are the full model's gradients through W + s·A·B, the base reference (adapters off) equals the base
model's log-probs exactly in the step and in the cache, LoRA dropout has its closed form, resume is exact, and
adapters go in and out through real `peft` in PyTorch (logits within 1e-4) as the merged export does through
transformers. Online RPO and reward-model training run with LoRA and change only adapters (+ the score head)."""

from __future__ import annotations

import pathlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from rpo_jax.data import make_eval_batches
from rpo_jax.losses import make_loss
from rpo_jax.models import create_model
from rpo_jax.models.config import ModelConfig
from rpo_jax.models.layers import lora_delta
from rpo_jax.models.lora import (
    LoraConfig,
    attach_lora,
    count_adapter_parameters,
    lora_dropout,
    merge_lora,
    save_peft_adapter,
)
from rpo_jax.train.build import programs
from rpo_jax.train.build.data import load_tokenizer, tokenizer_path
from rpo_jax.train.build.lora import add_adapters, lora_settings
from rpo_jax.train.build.model import load_model, load_policy, split_trainable
from rpo_jax.train.build.references import compute_logps
from rpo_jax.train.cli.export import export_main
from rpo_jax.train.core.checkpoint import Checkpointer, abstract_like
from rpo_jax.train.jobs import online, preference, reward_model
from rpo_jax.train.runtime.global_batches import config_mesh
from rpo_jax.train.runtime.packed_rows import pack_local
from rpo_jax.train.step.logprobs import preference_inputs, response_logps, step_reference_logps
from rpo_jax.train.step.steps import make_scorer, make_train_step
from tests.hf_fixtures import hf_logits, load_torch_model
from tests.train.trainer_testlib import load_recipe, save_tiny_base, set_fields, tiny_config

ONE = jax.devices()[:1]
TOL = 1e-4
LORA = {"model.lora.rank": 4, "model.lora.alpha": 8.0}
TOKENS = np.random.default_rng(0).integers(3, 30, size=(2, 12)).astype(np.int32)


def quiet(c):
    c.train.progress_bar = False
    c.metrics.tensorboard = False
    c.train.async_checkpointing = False
    return c


def flat(tree) -> dict[str, np.ndarray]:
    """'a/b/c' → array for every leaf of a (restored or nnx) state."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): np.asarray(v) for path, v in leaves}


def tiny_lora_model(rank=4, alpha=8.0, targets="all-linear", dropout=0.0):
    config = ModelConfig(
        model_type="llama",
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
    )
    model = create_model(config, rngs=nnx.Rngs(0))
    attach_lora(model, LoraConfig(rank=rank, alpha=alpha, dropout=dropout, targets=targets), rngs=nnx.Rngs(1))
    keys = iter(jax.random.split(jax.random.key(7), 64))
    for v in jax.tree.leaves(nnx.state(model.lora, nnx.LoRAParam), is_leaf=lambda x: isinstance(x, nnx.Variable)):
        v[...] = 0.1 * jax.random.normal(next(keys), v.shape)  # B ≠ 0: the low-rank path matters
    return model


def synthetic_batch(b=4, k=2, t=10, vocab=40, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(b, k, t)).astype(np.int32)
    loss_mask = np.zeros((b, k, t), bool)
    loss_mask[:, :, 4:] = True
    return {
        "tokens": jnp.asarray(tokens),
        "loss_mask": jnp.asarray(loss_mask),
        "attention_mask": jnp.ones((b, k, t), bool),
        "valid": jnp.ones((b, k), bool),
        "lengths": jnp.full((b, k), t - 4, jnp.int32),
    }


# ----------------------------------------------------------------------------------------------- config errors
def config_with(**lora):
    c = tiny_config(pathlib.Path("/tmp/rpo_jax_lora_cfg"))
    for key, value in lora.items():
        c.model.lora[key] = value
    return c


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"rank": -1}, r"^config\.model\.lora\.rank=-1: expected ≥ 0"),
        ({"rank": 4, "dropout": 1.0}, r"^config\.model\.lora\.dropout=1\.0: expected < 1"),
        ({"rank": 4, "alpha": 0.0}, r"^config\.model\.lora\.alpha=0\.0: expected > 0"),
        (
            {"rank": 4, "base_dtype": "int3"},
            r"^config\.model\.lora\.base_dtype='int3': expected one of '', 'int8', 'int4'",
        ),
        ({"base_dtype": "int8"}, r"^config\.model\.lora\.base_dtype='int8' quantizes the frozen base of LoRA"),
        ({"rank": 4, "reference": "sft"}, r"^config\.model\.lora\.reference='sft': expected one of 'base', 'initial'"),
        (
            {"init_from": "/nonexistent/adapter"},
            r"^config\.model\.lora\.init_from: '/nonexistent/adapter' is not a dir",
        ),
    ],
)
def test_bad_lora_settings_are_one_line_errors_naming_the_field(fields, match):
    with pytest.raises(ValueError, match=match) as e:
        lora_settings(config_with(**fields))
    assert "\n" not in str(e.value)


def test_unknown_target_is_a_one_line_error_and_rank_zero_leaves_the_model_alone():
    model = create_model(
        ModelConfig(
            model_type="llama",
            vocab_size=40,
            hidden_size=16,
            intermediate_size=24,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            head_dim=8,
        ),
        rngs=nnx.Rngs(0),
    )
    with pytest.raises(ValueError, match=r"^config\.model\.lora\.targets: .*\['q_prj'\] name no adaptable module"):
        add_adapters(model, config_with(rank=4, targets="q_prj,v_proj"), None)
    assert getattr(model, "lora", None) is None
    assert add_adapters(model, config_with(rank=0), None) is model and getattr(model, "lora", None) is None
    add_adapters(model, config_with(rank=2, targets="q_proj,v_proj"), None)
    assert model.lora.targets == ("q_proj", "v_proj")
    trained = flat(split_trainable(model)[1])  # the adapters only
    assert sorted(k.split("/")[1] for k in trained) == [
        "q_proj_lora_a",
        "q_proj_lora_b",
        "v_proj_lora_a",
        "v_proj_lora_b",
    ] and all(k.startswith("lora/") for k in trained)


# ------------------------------------------------------------------------------------------------ dropout
def test_lora_dropout_closed_form_on_a_fixed_mask_and_in_expectation():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 3, 8)).astype(np.float32)
    a = rng.normal(size=(8, 4)).astype(np.float32)
    b = rng.normal(size=(4, 6)).astype(np.float32)
    key = jax.random.key_data(jax.random.key(11))
    keep = jnp.float32(0.75)
    mask = np.asarray(jax.random.bernoulli(jax.random.wrap_key_data(key), 0.75, x.shape))
    assert 0 < mask.mean() < 1
    expected = ((x * mask / 0.75).reshape(-1, 8) @ a @ b).reshape(5, 3, 6)
    np.testing.assert_allclose(
        np.asarray(lora_delta(jnp.asarray(x), a, b, (key, keep))), expected, rtol=1e-5, atol=1e-5
    )
    # keep = 1 (p = 0) is exactly no dropout
    np.testing.assert_array_equal(
        np.asarray(lora_delta(jnp.asarray(x), a, b, (key, jnp.float32(1.0)))),
        np.asarray(lora_delta(jnp.asarray(x), a, b)),
    )
    # E[drop(x)] = x: the mean over n masks is within 5 standard errors of (x·A)·B
    n = 4000
    keys = jax.random.key_data(jax.random.split(jax.random.key(5), n))
    samples = jax.jit(jax.vmap(lambda k: lora_delta(jnp.asarray(x), a, b, (k, keep))))(keys)
    exact = (x.reshape(-1, 8) @ a @ b).reshape(5, 3, 6)
    stderr = np.asarray(samples.std(0)) / np.sqrt(n)
    assert np.all(np.abs(np.asarray(samples.mean(0)) - exact) <= 5 * stderr + 1e-6)


@nnx.jit
def logits_with_dropout(model, key):
    with lora_dropout(model, key):
        return model(jnp.asarray(TOKENS))


@nnx.jit
def logits_of(model):
    return model(jnp.asarray(TOKENS))


def test_lora_dropout_only_inside_the_training_block_and_only_on_the_adapters():
    model = tiny_lora_model(dropout=0.5)
    plain = np.asarray(logits_of(model))
    dropped = np.asarray(logits_with_dropout(model, jax.random.key(0)))
    assert np.abs(dropped - plain).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(logits_of(model)), plain)  # identity again outside the block
    zero = tiny_lora_model(dropout=0.0)
    # p = 0: exactly the evaluation forward pass
    np.testing.assert_array_equal(np.asarray(logits_with_dropout(zero, jax.random.key(0))), plain)
    for name in model.lora.targets:  # B = 0 everywhere: dropout on the adapter input changes nothing
        b = model.lora.factors(name)[1]
        b[...] = jnp.zeros_like(b[...])
    np.testing.assert_array_equal(
        np.asarray(logits_with_dropout(model, jax.random.key(0))), np.asarray(logits_of(model))
    )


# ------------------------------------------------------------------------------------------------ gradients
def chain_rule_gradients(model, loss_of_logps, batch):
    """∂L/∂A, ∂L/∂B of every adapter from the full model's gradient G = ∂L/∂W' at the merged weights
    W' = W + s·A·B (`merge_lora`, no adapters left): per layer ∂L/∂A = s·G·Bᵀ and ∂L/∂B = s·Aᵀ·G with W' seen as
    [in, out] (the projection of the full gradient onto the adapters)."""
    merged = merge_lora(model)
    graphdef, params, rest = split_trainable(merged)
    full = jax.jit(
        jax.grad(lambda p: loss_of_logps(response_logps(graphdef, p, rest, batch, compute_dtype=jnp.float32)))
    )(params)
    adapters, scale = model.lora, model.lora.config.scale
    out = {}
    for name in adapters.targets:
        a, b = (np.asarray(v[...], np.float64) for v in adapters.factors(name))
        g = np.asarray(full["layers"][name][...], np.float64)
        layers, r = a.shape[0], a.shape[-1]
        g2, a2, b2 = g.reshape(layers, a.size // (layers * r), -1), a.reshape(layers, -1, r), b.reshape(layers, r, -1)
        out[f"{name}_lora_a"] = (scale * g2 @ b2.transpose(0, 2, 1)).reshape(a.shape)
        out[f"{name}_lora_b"] = (scale * a2.transpose(0, 2, 1) @ g2).reshape(b.shape)
    return out


def test_lora_step_gradients_equal_full_model_gradients_projected_onto_the_adapters():
    """One SGD(lr=1) LoRA step moves A, B by −∂L/∂(A, B), and those are the full model's gradients at
    W + s·A·B projected by the chain rule (`chain_rule_gradients`); micro-batches give the same."""
    model = tiny_lora_model(rank=3, alpha=6.0)
    graphdef, params, rest = split_trainable(model)
    loss_fn = make_loss("dpo", beta=0.5)
    batch = synthetic_batch()
    ref = jnp.asarray(np.random.default_rng(1).normal(-20, 1, size=(4, 2)), jnp.float32)
    batch = {**batch, "ref_logps": ref}
    expected = chain_rule_gradients(model, lambda logps: loss_fn(preference_inputs(logps, batch, ref)).loss, batch)

    for micro_batches in (1, 2):
        tx = optax.sgd(1.0)
        step = jax.jit(
            make_train_step(graphdef, rest, loss_fn, tx, compute_dtype=jnp.float32, micro_batches=micro_batches)
        )
        state = {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(0)),
        }
        new_state, _ = step(jax.tree.map(jnp.copy, state), batch, (), rest)
        moved = {
            k.split("/")[1]: v for k, v in flat(jax.tree.map(lambda o, n: o - n, params, new_state["params"])).items()
        }
        chex.assert_trees_all_close(moved, {k: v.astype(np.float32) for k, v in expected.items()}, rtol=2e-4, atol=1e-7)

    # bf16 compute: the master adapters stay float32 and move in the same direction
    tx = optax.sgd(1.0)
    step = jax.jit(make_train_step(graphdef, rest, loss_fn, tx, compute_dtype=jnp.bfloat16))
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(0)),
    }
    new_state, _ = step(state, batch, (), rest)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state["params"]))
    delta = {k.split("/")[1]: v for k, v in flat(jax.tree.map(lambda o, n: o - n, params, new_state["params"])).items()}
    moved = np.concatenate([np.ravel(delta[k]) for k in sorted(expected)])
    want = np.concatenate([np.ravel(expected[k]) for k in sorted(expected)])
    assert np.dot(moved, want) / (np.linalg.norm(moved) * np.linalg.norm(want)) > 0.99


# -------------------------------------------------------------------------------------- runs on a base checkpoint
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> pathlib.Path:
    """A tiny random Llama saved as a Hugging Face checkpoint with the demo tokenizer: the frozen base."""
    return save_tiny_base(tmp_path_factory.mktemp("lora_base"))


def lora_config(base: pathlib.Path, **overrides) -> ml_collections.ConfigDict:
    return quiet(
        tiny_config(
            base / "data",
            **{
                "model.path": str(base / "base"),
                **LORA,
                "optimizer.learning_rate": 1e-2,
                "optimizer.schedule": "constant",
                "optimizer.warmup_steps": 0,
                **overrides,
            },
        )
    )


def base_logps(base: pathlib.Path, cfg, batch) -> np.ndarray:
    """Response log-probs of the plain base checkpoint (no adapters anywhere)."""
    model, _ = load_model(str(base / "base"), cfg, config_mesh(cfg.mesh, ONE), jnp.float32)
    graphdef, params, rest = split_trainable(model)
    return np.asarray(
        jax.jit(lambda p, b: response_logps(graphdef, p, rest, b, compute_dtype=jnp.float32))(params, batch)
    )


def test_only_adapters_train_the_base_stays_bit_identical_and_is_the_reference(base):
    cfg = lora_config(base, **{"reference_mode": "in_step", "model.lora.dropout": 0.1})
    run = preference.build_run(cfg, base / "run_in_step", devices=ONE)
    names = flat(run.state["params"])
    assert names and all("lora" in k for k in names)
    assert sum(v.size for v in names.values()) == count_adapter_parameters(
        nnx.merge(run.graphdef, run.state["params"], run.rest)
    )
    adapter_shapes = sorted(v.shape for v in names.values())
    moments = [x.shape for x in jax.tree.leaves(run.state["opt_state"]) if x.ndim > 0]
    assert sorted(moments) == sorted(adapter_shapes * 2)  # Adam's two moments of the adapters, nothing else
    rest_before = flat(jax.tree.map(np.array, run.rest))
    assert "embed/value" in "/".join(rest_before) or any(k.startswith("embed") for k in rest_before)
    initial = flat(jax.tree.map(np.array, run.state["params"]))

    task = preference.preference_task(run)
    # the frozen base is an argument of the compiled step, not a constant baked into it
    batch = preference.device_batch(run, next(iter(make_eval_batches(run.datasets["train"], 8))), "train")
    text = task_step_text(run, batch)
    assert 'dense<"0x' not in text  # no non-splat constant (the embedding alone would be one)
    state = run.state
    for step in range(3):
        state = task.advance(state, step).state
    after = flat(state["params"])
    assert any(np.abs(after[k] - initial[k]).max() > 0 for k in after if "lora_b" in k)
    for k, v in flat(run.rest).items():
        np.testing.assert_array_equal(v, rest_before[k], err_msg=k)

    # the reference: the policy's own weights with the adapters off = the base checkpoint, bit for bit
    primary = run.references[0]
    assert primary.params is None and primary.rest is None
    logps = lambda gd, p, r, b: response_logps(gd, p, r, b, compute_dtype=jnp.float32)  # noqa: E731
    in_step = jax.jit(
        lambda p, r, b: step_reference_logps(logps, ((primary.graphdef, None),), (None,), b, policy=(p, r))
    )(state["params"], run.rest, batch)
    want = base_logps(base, cfg, batch)
    np.testing.assert_array_equal(np.asarray(in_step)[..., 0], want)
    policy = np.asarray(
        jax.jit(lambda p, r, b: response_logps(run.graphdef, p, r, b, compute_dtype=jnp.float32))(
            state["params"], run.rest, batch
        )
    )
    assert np.abs(policy - want).max() > 1e-4  # the trained adapters do change the policy


def task_step_text(run, batch) -> str:
    train_step, _ = programs.jitted_steps(
        run.config, run, run.loss_fn, tuple((r.graphdef, r.rest) for r in run.references), run.score_window
    )
    return train_step.lower(run.state, batch, preference.in_step_reference_params(run)).as_text()


def test_cached_base_reference_and_mrpo_extra_reference_equal_the_base_checkpoint(base):
    """Cache mode with MRPO: reference 0 is the base with adapters off, reference 1 the base checkpoint loaded as
    a separate model (as today); both columns of the cache are the base model's log-probs, exactly."""
    cfg = lora_config(
        base,
        **{
            "reference_mode": "cache",
            "loss.name": "mrpo",
            "loss.hparams": {"beta": 0.1},
            "data.pairs": "best_worst",
            "references": [{"path": ""}, {"path": str(base / "base")}],
        },
    )
    run = preference.build_run(cfg, base / "run_cache", devices=ONE)
    preference.fill_reference_cache(run)
    model, _ = load_model(str(base / "base"), cfg, run.mesh, jnp.float32)  # the plain base, no adapters
    graphdef, params, rest = split_trainable(model)
    scorer = make_scorer(graphdef, rest, run.mesh, compute_dtype=jnp.float32, score_window=run.score_window)
    for split, cache in run.ref_cache.items():
        want = compute_logps(
            scorer,
            params,
            run.datasets[split],
            8,
            run.mesh,  # in the cache's (packed) layout
            prepare=lambda batch: pack_local(batch, run.packing, run.mesh),
        )
        assert np.isfinite(want).any()
        np.testing.assert_array_equal(cache[..., 0], want)
        np.testing.assert_array_equal(cache[..., 1], want)
    task = preference.preference_task(run)
    out = task.advance(run.state, 0)
    assert np.isfinite(float(jax.device_get(out.metrics)["loss"]))


# ---------------------------------------------------------------------------------- export, PEFT, resume
@pytest.fixture(scope="module")
def lora_run(base):
    """4 LoRA steps with dropout, exported at the end (WORKDIR/export merged, WORKDIR/export_adapter PEFT)."""
    cfg = lora_config(
        base,
        **{
            "train.steps": 4,
            "train.checkpoint_every": 2,
            "train.export_at_end": True,
            "model.lora.dropout": 0.1,
            "model.lora.targets": "q_proj,v_proj,down_proj",
        },
    )
    preference.train(cfg, base / "lora_run", devices=ONE)
    return cfg, base / "lora_run"


def trained_policy(cfg, workdir):
    tok = load_tokenizer(tokenizer_path(cfg))
    model, _ = load_policy(cfg, tok, config_mesh(cfg.mesh, ONE), jnp.float32)
    graphdef, params, rest = split_trainable(model)
    ckpt = Checkpointer(workdir / "checkpoints", every_steps=1, asynchronous=False)
    step, params = ckpt.restore_params(abstract_like(params))
    ckpt.close()
    return step, nnx.merge(graphdef, params, rest)


def test_checkpoints_hold_adapters_and_the_run_identity_the_lora_settings(lora_run):
    cfg, workdir = lora_run
    import json

    identity = json.loads((workdir / "run_identity.json").read_text())
    assert identity["model"]["lora"]["rank"] == 4 and identity["model"]["lora"]["targets"] == "q_proj,v_proj,down_proj"
    kind, digest = identity["model"]["weights"].split(":")  # the base checkpoint's default fingerprint (sha256)
    assert kind == "fingerprint" and len(digest) == 64
    from tests.train.trainer_testlib import final_params

    saved = flat(final_params(workdir))
    assert saved and all("lora" in k for k in saved), sorted(saved)[:5]
    assert {k.split("/")[1].rsplit("_lora_", 1)[0] for k in saved} == {"q_proj", "v_proj", "down_proj"}


def test_merged_export_and_peft_adapter_load_in_pytorch_with_our_logits(lora_run, tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    cfg, workdir = lora_run
    step, policy = trained_policy(cfg, workdir)
    assert step == 4
    ours = np.asarray(policy(TOKENS))
    # merged: transformers alone
    np.testing.assert_allclose(hf_logits(workdir / "export", TOKENS), ours, atol=TOL)
    export_main([str(workdir), str(tmp_path / "merged")])
    np.testing.assert_allclose(hf_logits(tmp_path / "merged", TOKENS), ours, atol=TOL)
    # adapters: peft on the base
    export_main([str(workdir), str(tmp_path / "adapter"), "--adapter"])
    for directory in (workdir / "export_adapter", tmp_path / "adapter"):
        base_model = load_torch_model(cfg.model.path)
        peft_model = peft.PeftModel.from_pretrained(base_model, str(directory)).eval()
        with torch.no_grad():
            theirs = peft_model(input_ids=torch.as_tensor(TOKENS.astype(np.int64))).logits.numpy()
        np.testing.assert_allclose(theirs, ours, atol=TOL)
    assert np.abs(ours - hf_logits(cfg.model.path, TOKENS)).max() > 1e-4  # the adapters are not a no-op


def test_resume_is_bit_identical_to_the_uninterrupted_run(lora_run, base):
    cfg, workdir = lora_run
    resumed_dir = base / "lora_resumed"
    first = lora_config(
        base,
        **{
            "train.steps": 2,
            "train.checkpoint_every": 2,
            "model.lora.dropout": 0.1,
            "model.lora.targets": "q_proj,v_proj,down_proj",
        },
    )
    preference.train(first, resumed_dir, devices=ONE)
    second = lora_config(
        base,
        **{
            "train.steps": 4,
            "train.checkpoint_every": 2,
            "model.lora.dropout": 0.1,
            "model.lora.targets": "q_proj,v_proj,down_proj",
        },
    )
    result = preference.train(second, resumed_dir, devices=ONE)
    assert result["step"] == 4
    from tests.train.trainer_testlib import final_params

    expected, resumed = flat(final_params(workdir)), flat(final_params(resumed_dir))
    assert expected.keys() == resumed.keys()
    for k in expected:
        np.testing.assert_array_equal(resumed[k], expected[k], err_msg=k)


def test_init_from_a_peft_adapter_written_by_peft(base, tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    base_model = load_torch_model(base / "base")
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False, lora_dropout=0.0
    )
    peft_model = peft.get_peft_model(base_model, config).eval()
    peft_model.save_pretrained(str(tmp_path / "sft_adapter"))
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.as_tensor(TOKENS.astype(np.int64))).logits.numpy()

    cfg = lora_config(
        base,
        **{
            "model.lora.rank": 0,
            "model.lora.alpha": 16.0,
            "model.lora.init_from": str(tmp_path / "sft_adapter"),
            "reference_mode": "in_step",
        },
    )
    run = preference.build_run(cfg, tmp_path / "run", devices=ONE)
    policy = nnx.merge(run.graphdef, run.state["params"], run.rest)
    assert policy.lora.targets == ("q_proj", "v_proj", "up_proj") and policy.lora.config.rank == 4
    np.testing.assert_allclose(np.asarray(policy(TOKENS)), theirs, atol=TOL)
    # the reference is the base without the adapter (TRL's PEFT model without ref_model)
    batch = preference.device_batch(run, next(iter(make_eval_batches(run.datasets["train"], 8))), "train")
    logps = lambda gd, p, r, b: response_logps(gd, p, r, b, compute_dtype=jnp.float32)  # noqa: E731
    ref = jax.jit(
        lambda p, r, b: step_reference_logps(logps, ((run.references[0].graphdef, None),), (None,), b, policy=(p, r))
    )(run.state["params"], run.rest, batch)
    np.testing.assert_array_equal(np.asarray(ref)[..., 0], base_logps(base, cfg, batch))
    # the alternative, lora.reference = "initial": base + the starting adapter (the SFT policy itself)
    initial = preference.build_run(
        set_fields(cfg, {"model.lora.reference": "initial"}), tmp_path / "run_initial", devices=ONE
    )
    primary = initial.references[0]
    assert primary.rest is None and jax.tree.structure(primary.params) == jax.tree.structure(initial.state["params"])
    ref = jax.jit(lambda p, r, b, q: step_reference_logps(logps, ((primary.graphdef, None),), (q,), b, policy=(p, r)))(
        initial.state["params"], initial.rest, batch, primary.params
    )
    policy_logps = jax.jit(lambda p, r, b: response_logps(initial.graphdef, p, r, b, compute_dtype=jnp.float32))(
        initial.state["params"], initial.rest, batch
    )
    np.testing.assert_array_equal(np.asarray(ref)[..., 0], np.asarray(policy_logps))
    assert np.abs(np.asarray(policy_logps) - base_logps(base, cfg, batch)).max() > 1e-4

    with pytest.raises(ValueError, match=r"^config\.model\.lora\.rank=8 disagrees with .*r=4; set it to 4 or"):
        preference.build_run(set_fields(cfg, {"model.lora.rank": 8}), tmp_path / "bad", devices=ONE)
    with pytest.raises(ValueError, match=r"config\.model\.lora\.targets='q_proj' selects \['q_proj'\] but"):
        preference.build_run(
            set_fields(cfg, {"model.lora.rank": 0, "model.lora.targets": "q_proj"}), tmp_path / "bad2", devices=ONE
        )


def test_our_peft_writer_and_reader_round_trip_through_the_trainer(base, tmp_path):
    """save_peft_adapter of a trained-looking adapter → init_from → the same policy logits (exact file round trip)."""
    cfg = lora_config(base)
    tok = load_tokenizer(tokenizer_path(cfg))
    model, _ = load_policy(cfg, tok, config_mesh(cfg.mesh, ONE), jnp.float32)
    for name in model.lora.targets:
        b = model.lora.factors(name)[1]
        b[...] = 0.05 * jax.random.normal(jax.random.key(3), b.shape)
    save_peft_adapter(model, tmp_path / "adapter", cfg.model.path)
    again, _ = load_policy(
        set_fields(lora_config(base), {"model.lora.rank": 0, "model.lora.init_from": str(tmp_path / "adapter")}),
        tok,
        config_mesh(cfg.mesh, ONE),
        jnp.float32,
    )
    np.testing.assert_allclose(np.asarray(again(TOKENS)), np.asarray(model(TOKENS)), atol=1e-6)


# ------------------------------------------------------------------------------------------- other modes
def test_online_rpo_with_lora_samples_with_adapters_and_trains_only_them(base, tmp_path):
    c = quiet(load_recipe("online_demo"))
    c = set_fields(
        c,
        {
            "model.path": str(base / "base"),
            **LORA,
            "online.iterations": 1,
            "online.prompts_per_iteration": 8,
            "data.batch_size": 8,
            "online.updates_per_iteration": 2,
            "online.max_new_tokens": 8,
            "online.eval_prompts": 8,
            "online.eval_every": 0,
            "train.export_at_end": False,
            "optimizer.learning_rate": 1e-2,
        },
    )
    run = online.build_online_run(c, devices=ONE)
    assert run.base_scorer is not None and all("lora" in k for k in flat(run.state["params"]))
    # adapters moved off zero, so that the policy differs from its base reference: at B = 0 the two are equal and
    # the demo's judge scores a random model's samples alike, so the loss and its gradient are exactly 0
    leaves, treedef = jax.tree.flatten(run.state["params"])
    keys = jax.random.split(jax.random.key(5), len(leaves))
    run.state["params"] = jax.tree.unflatten(
        treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    )
    rest_before = flat(jax.tree.map(np.array, run.rest))
    initial = flat(jax.tree.map(np.array, run.state["params"]))
    unit = online.online_task(run).advance(run.state, 0)
    after = flat(unit.state["params"])
    assert any(np.abs(after[k] - initial[k]).max() > 0 for k in after)
    for k, v in flat(run.rest).items():
        np.testing.assert_array_equal(v, rest_before[k], err_msg=k)


def test_reward_model_with_lora_trains_adapters_and_the_score_head_and_exports_merged(base, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from tests.train.test_reward_model_training import tiny_config as rm_config

    cfg = rm_config(
        tmp_path / "data",
        **{"model.path": str(base / "base"), **LORA, "train.steps": 2, "optimizer.learning_rate": 1e-2},
    )
    run = reward_model.build_reward_run(cfg, devices=ONE)
    names = flat(run.state["params"])
    head = [k for k in names if "lora" not in k]
    assert len(head) == 1 and head[0].startswith("score"), sorted(names)
    rest_before = flat(jax.tree.map(np.array, run.rest))
    initial = flat(jax.tree.map(np.array, run.state["params"]))
    task = reward_model.reward_model_task(run)
    state = run.state
    for step in range(2):
        state = task.advance(state, step).state
    after = flat(state["params"])
    assert all(np.abs(after[k] - initial[k]).max() > 0 for k in after if "lora_b" in k or "score" in k)
    for k, v in flat(run.rest).items():
        np.testing.assert_array_equal(v, rest_before[k], err_msg=k)
    from rpo_jax.train.core.export import save_model

    out = save_model(
        "reward_model",
        run.graphdef,
        state["params"],
        run.rest,
        run.model_config,
        tmp_path / "rm",
        run.tokenizer,
        run.mesh,
    )
    model = nnx.merge(run.graphdef, state["params"], run.rest)
    mask = np.ones_like(TOKENS, bool)
    ours = np.asarray(model(jnp.asarray(TOKENS), jnp.asarray(mask)))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.as_tensor(TOKENS.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=TOL)
    with pytest.raises(ValueError, match="reward-model run exports merged only"):
        from rpo_jax.train.core.export import adapter_saver

        adapter_saver("reward_model", "")
