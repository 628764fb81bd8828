"""Packed batches and shared prompts give the padded batch's numbers: per-response log-probs, the references' log-probs
scored in the same layout, every loss family's loss and the gradients (≤ 1e-5), on a Gemma-2-style model (sliding
window + attention and final soft-capping) and a Llama one; and the trainer, with packing and a shared prompt,
takes the same steps as without."""

from __future__ import annotations

import dataclasses
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from rpo_jax.data.packing import Packing, pack_batch, real_tokens
from rpo_jax.data.tokenize import TokenizedExample, collate_examples
from rpo_jax.losses import make_loss
from rpo_jax.models.config import ModelConfig, RopeSpec
from rpo_jax.models.logprobs import (
    head_share,
    packed_token_logps,
    scored_token_logps,
    segment_logp_sums,
    unembeds_scored_slots,
)
from rpo_jax.models.model import create_model
from rpo_jax.models.sharding import make_mesh
from rpo_jax.train.build.model import split_trainable
from rpo_jax.train.build.programs import online_update_step
from rpo_jax.train.config.defaults import base_config
from rpo_jax.train.jobs import preference
from rpo_jax.train.runtime.packed_rows import AUTO_MIN_SAVING, packing_of, packing_setting, packing_with_references
from rpo_jax.train.runtime.performance import (
    attention_key_cost,
    batch_flops,
    decoder_flops_per_slot,
    head_flops_per_position,
    train_flops_per_token,
)
from rpo_jax.train.step.logprobs import preference_inputs, response_logps

from .test_multihost import finish, start_processes
from .trainer_testlib import TINY_MODEL, load_recipe, read_metrics, set_fields, tiny_config, write_config

GEMMA2 = ModelConfig(
    model_type="gemma2",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    sliding_window=4,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    norm_plus_one=True,
    sandwich_norms=True,
    layer_types=("sliding_attention", "full_attention"),
    rope=(("full_attention", RopeSpec()), ("sliding_attention", RopeSpec(theta=100.0))),
)
LLAMA = ModelConfig(
    model_type="llama",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
)
ROW = 24  # longer than any sequence below (≤ 8 + 11 tokens)
LAYOUTS = {"packed": Packing(ROW), "shared": Packing(ROW, share_prompt=True)}


def examples(ks, seed, rewards=True):
    """Random prompts (1–8 tokens) and K responses (1–11 tokens) per example, ids in [1, 64)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, k in enumerate(ks):
        prompt = rng.integers(1, 64, rng.integers(1, 9))
        seqs = tuple(
            np.concatenate([prompt, rng.integers(1, 64, rng.integers(1, 12))]).astype(np.int32) for _ in range(k)
        )
        out.append(
            TokenizedExample(
                i, seqs, (len(prompt),) * k, tuple(float((j * 7 + i) % 5) for j in range(k)) if rewards else None
            )
        )
    return out


def pair_batch():
    """K = 2, no rewards (response 0 preferred), one padding example."""
    return collate_examples(
        examples([2] * 5, seed=1, rewards=False) + [None], k_max=2, buckets=(16, 32), pad_id=0, with_rewards=False
    )


def list_batch():
    """Variable K (1–4) with rewards, a masked response (example 1, k = 1) and a padding example."""
    batch = collate_examples(
        examples([2, 3, 4, 1, 4, 3], seed=2) + [None], k_max=4, buckets=(16, 32), pad_id=0, with_rewards=True
    )
    batch["valid"][1, 1] = False
    return batch


def split(config, seed):
    return split_trainable(create_model(config, rngs=nnx.Rngs(seed)))


def scorer(model):
    """jit((params, batch) -> [B, K] log-probs) of the model's graph (one compilation per layout shape)."""
    graphdef, _, rest = model
    return jax.jit(lambda p, b: response_logps(graphdef, p, rest, b, compute_dtype=jnp.float32))


def layouts(batch):
    return {"padded": batch, **{name: pack_batch(batch, packing) for name, packing in LAYOUTS.items()}}


@pytest.fixture(scope="module")
def models():
    return {"gemma2": split(GEMMA2, 0), "ref_a": split(GEMMA2, 1), "ref_b": split(GEMMA2, 2), "llama": split(LLAMA, 3)}


@pytest.fixture(scope="module")
def scored(models):
    """data ("pair" / "list") → layout → model → [B, K] log-probs, and the batches themselves."""
    fns = {"gemma2": scorer(models["gemma2"]), "llama": scorer(models["llama"])}
    fns["ref_a"] = fns["ref_b"] = fns["gemma2"]  # the same graph, other weights
    out = {}
    for data, batch in (("pair", pair_batch()), ("list", list_batch())):
        out[data] = {}
        for layout, b in layouts(batch).items():
            inputs = {k: jnp.asarray(v) for k, v in b.items()}
            out[data][layout] = {"batch": b, **{m: np.asarray(fns[m](models[m][1], inputs)) for m in models}}
    return out


@pytest.mark.parametrize("model_name", ["gemma2", "llama"])
def test_response_logps_equal_in_every_layout(scored, model_name):
    """Per-response log-probs [B, K] of padded, packed and shared-prompt batches agree to 1e-5 (0 on masked and
    padding slots); packing holds every token once, a shared prompt holds fewer."""
    for by_layout in scored.values():
        batch = by_layout["padded"]["batch"]
        padded = by_layout["padded"][model_name]
        assert np.all(padded[~batch["valid"]] == 0) and np.all(padded[batch["valid"]] < 0)
        for name in LAYOUTS:
            np.testing.assert_allclose(by_layout[name][model_name], padded, atol=1e-5, rtol=0)
        slots = {name: int(np.sum(by_layout[name]["batch"]["attention_mask"])) for name in LAYOUTS}
        assert slots["packed"] == real_tokens(batch) > slots["shared"]  # every valid token once; a prompt once


@pytest.mark.parametrize("groups,chunk", [(1, 8), (2, 8), (3, 16), (1, 256)])
def test_scored_slot_head_equals_the_head_on_every_slot(models, groups, chunk):
    """`scored_token_logps` (the output head on each group's scored slots, `chunk` at a time, the chunks past the
    last scored slot skipped) gives the per-response sums and parameter gradients of `packed_token_logps` (the
    head on every slot) to 1e-5, in G = 1, 2 or 3 groups of rows, on the Gemma-2-style model (final soft-cap)."""
    graphdef, params, rest = models["gemma2"]
    batch = list_batch()
    packed = {k: jnp.asarray(v) for k, v in pack_batch(batch, Packing(ROW, share_prompt=True, row_multiple=6)).items()}
    r, t = packed["tokens"].shape
    assert r % groups == 0
    ids = np.asarray(packed["response_id"]).reshape(groups, -1)
    scored = int((ids > 0).sum(1).max())
    if chunk < 256:  # some chunks are skipped: fewer than all of them hold a scored slot
        assert -(-scored // chunk) < -(-ids.shape[1] // chunk)
    rows = {k: packed[k] for k in ("attention_mask", "positions", "segment_ids", "parent_ids")}
    num = batch["valid"].size

    def sums(p, scored_only):
        model = nnx.merge(graphdef, p, rest)
        if scored_only:
            logps, ids = scored_token_logps(
                model, packed["tokens"], packed["source"], packed["response_id"], groups=groups, chunk=chunk, **rows
            )
            return segment_logp_sums(logps, ids, num, width=t)
        logps = packed_token_logps(model, packed["tokens"], packed["source"], **rows)
        return segment_logp_sums(logps, packed["response_id"], num)

    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=num), jnp.float32)
    results = {}
    for scored_only in (False, True):
        per_response = jax.jit(lambda p, s=scored_only: sums(p, s))(params)
        grads = jax.jit(jax.grad(lambda p, s=scored_only: jnp.sum(cotangent * sums(p, s))))(params)
        results[scored_only] = (np.asarray(per_response), jax.tree.leaves(grads))
    every, every_grads = results[False]
    assert np.all(every[batch["valid"].reshape(-1)] < 0) and max(np.abs(g).max() for g in every_grads) > 1e-3
    np.testing.assert_allclose(results[True][0], every, atol=1e-5, rtol=0)
    for a, b in zip(results[True][1], every_grads, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


# IPO at β = 0.5: ∂(h − 1/(2β))²/∂h ≈ −1/β, so at TRL's β = 0.1 the loss (≈ 25, whose float32 ulp is 2e-6) moves
# by 1e-5 when the log-prob margin h moves by the float32 rounding of a log-prob sum (1e-6); β = 0.5 keeps it ≈ 1
LOSSES = [
    ("dpo", {}, "pair", 1),
    ("ipo", {"beta": 0.5}, "pair", 1),
    ("simpo", {}, "pair", 0),
    ("rpo_sq", {}, "list", 1),
    ("rpo_listwise", {}, "list", 1),
    ("mrpo", {}, "list", 2),
]


@pytest.mark.parametrize("name,hparams,data,num_refs", LOSSES, ids=[x[0] for x in LOSSES])
def test_losses_equal_in_every_layout(scored, name, hparams, data, num_refs):
    """Every loss family (pairwise DPO / IPO / SimPO, all-pairs and listwise RPO with K up to 4, MRPO with R = 2
    references scored in the same layout as the policy): loss, per-example losses and the loss's gradient with
    respect to the policy log-probs agree between padded, packed and shared-prompt batches."""
    loss_fn = make_loss(name, **hparams)
    results = {}
    for layout, got in scored[data].items():
        refs = [jnp.asarray(got[r]) for r in ("ref_a", "ref_b")[:num_refs]]
        ref = None if not refs else refs[0] if num_refs == 1 else jnp.stack(refs, -1)
        inputs = {k: jnp.asarray(v) for k, v in got["batch"].items()}

        def loss(policy, inputs=inputs, ref=ref):
            out = loss_fn(preference_inputs(policy, inputs, ref))
            return out.loss, out.per_example

        (value, per_example), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(got["gemma2"]))
        results[layout] = (float(value), np.asarray(per_example), np.asarray(grad))
    value, per_example, grad = results["padded"]
    assert np.isfinite(value) and abs(value) > 1e-3 and np.abs(grad).max() > 1e-4
    for layout in LAYOUTS:
        assert abs(results[layout][0] - value) <= 1e-5
        np.testing.assert_allclose(results[layout][1], per_example, atol=1e-5, rtol=0)
        np.testing.assert_allclose(results[layout][2], grad, atol=1e-5, rtol=0)


def test_parameter_gradients_equal_in_every_layout(models):
    """The pullback of the per-response log-probs to the parameters (Gemma-2-style model, variable K, a masked
    response) is the same in every layout: for a cotangent c [B, K], ∇_θ Σ c·logps agree to 1e-5 — with the
    equality of ∂loss/∂logps above, every loss's parameter gradient does."""
    graphdef, params, rest = models["gemma2"]
    batch = list_batch()
    cotangent = jnp.asarray(np.random.default_rng(0).normal(size=batch["valid"].shape), jnp.float32)
    grads = {}
    for layout, b in layouts(batch).items():
        inputs = {k: jnp.asarray(v) for k, v in b.items()}
        fn = jax.jit(
            jax.grad(lambda p, x: jnp.sum(cotangent * response_logps(graphdef, p, rest, x, compute_dtype=jnp.float32)))
        )
        grads[layout] = jax.tree.leaves(fn(params, inputs))
    assert max(float(jnp.abs(g).max()) for g in grads["padded"]) > 1e-3
    for layout in LAYOUTS:
        for a, b in zip(grads[layout], grads["padded"], strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_flops_count_the_packed_rows():
    """FLOPs of a packed step are R·T slots at T keys, the head on `head_positions` of them (every slot when not
    given); padded ones B·K·T with the score window's share of the head. The packing costs in closed form:
    c = 12·L·d_attn / (6·P') and h = 6·V·D / (6·P'), with or without in-step references (each adds a third of
    both numerator and denominator)."""
    assert batch_flops(LLAMA, (3, 24)) == 3 * 24 * train_flops_per_token(LLAMA, 24)
    body = LLAMA.num_params(include_embeddings=False)
    head, attn = LLAMA.vocab_size * LLAMA.hidden_size, LLAMA.num_heads * LLAMA.head_dim
    for refs in (0, 2):
        per_slot = (3 + refs) * (2 * body + 4 * LLAMA.num_layers * 24 * attn)
        expected = 3 * 24 * per_slot + 40 * (3 + refs) * 2 * head
        assert batch_flops(LLAMA, (3, 24), num_references=refs, head_positions=40) == pytest.approx(expected, 1e-12)
        assert attention_key_cost(LLAMA, num_references=refs) == pytest.approx(
            2 * LLAMA.num_layers * attn / body, rel=1e-12
        )
        head_flops = head_flops_per_position(LLAMA, num_references=refs)
        assert head_flops == pytest.approx((3 + refs) * 2 * head, rel=1e-12)
        assert head_flops / decoder_flops_per_slot(LLAMA, 0, num_references=refs) == pytest.approx(
            head_share(LLAMA), rel=1e-12
        )
    # the scored-slot head only where the head is ≥ 5 % of a slot's decoder matmuls (here 0.13; with 4 tokens 0.008)
    assert head_share(LLAMA) == pytest.approx(head / body, rel=1e-12) and unembeds_scored_slots(LLAMA)
    assert not unembeds_scored_slots(dataclasses.replace(LLAMA, vocab_size=4))
    assert batch_flops(LLAMA, (3, 24), score_window=8) == batch_flops(LLAMA, (3, 24))
    assert batch_flops(LLAMA, (2, 4, 32), score_window=8) == 2 * 4 * 32 * train_flops_per_token(
        LLAMA, 32, score_window=8
    )


def train_losses(tmp_path, name, devices=None, **overrides):
    cfg = tiny_config(
        tmp_path / "data",
        **{"train.steps": 3, "train.checkpoint_every": 0, "train.eval_every": 3, "data.max_length": 128, **overrides},
    )
    preference.train(cfg, tmp_path / name, devices=devices)
    metrics = read_metrics(tmp_path / name)
    return (
        [m["train/loss"] for m in metrics if "train/loss" in m],
        [m["eval/loss"] for m in metrics if "eval/loss" in m],
    )


def test_trainer_with_packing_and_shared_prompt_takes_the_padded_steps(tmp_path):
    """`rpo-train` with data.packing and data.share_prompt (cached reference log-probs scored on packed rows, the
    train iterator packing, packed eval): the same losses and eval loss as with padded batches."""
    padded, padded_eval = train_losses(tmp_path, "padded", **{"data.packing": False})
    shared, shared_eval = train_losses(tmp_path, "shared", **{"data.packing": True, "data.share_prompt": True})
    assert len(padded) == 3 and len(padded_eval) == 1
    np.testing.assert_allclose(shared, padded, atol=1e-5, rtol=0)
    np.testing.assert_allclose(shared_eval, padded_eval, atol=1e-5, rtol=0)


def test_bad_packing_settings_are_refused(tmp_path):
    cfg = tiny_config(tmp_path / "data", **{"data.packing": False, "data.share_prompt": True})
    with pytest.raises(ValueError, match="share_prompt=True needs config.data.packing=True or 'auto'"):
        preference.build_run(cfg, tmp_path / "a")
    cfg = tiny_config(tmp_path / "data", **{"data.packing": True, "data.pack_length": 64, "data.max_length": 128})
    with pytest.raises(ValueError, match="pack_length=64 is shorter than the longest sequence"):
        preference.build_run(cfg, tmp_path / "c")
    cfg = tiny_config(tmp_path / "data", **{"data.packing": "sometimes"})
    with pytest.raises(ValueError, match=r"config.data.packing='sometimes': expected True, False or 'auto'"):
        preference.build_run(cfg, tmp_path / "d")


def test_packing_settings():
    assert [packing_setting(v, "packing") for v in ("auto", "AUTO", True, "True", "1", False, "off", "")] == [
        "auto",
        "auto",
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    policy_data = {"train": object()}
    own = types.SimpleNamespace(name="other/ref", tokenizer_name="other/tok", datasets={"train": object()})
    same = types.SimpleNamespace(name="", tokenizer_name="tok", datasets=policy_data)
    explicit = ml_collections.ConfigDict({"data": {"share_prompt": True}})
    auto = ml_collections.ConfigDict({"data": {"share_prompt": "auto"}})
    shared = Packing(0, share_prompt=True)
    assert packing_with_references(shared, explicit, [same], policy_data) == shared
    assert packing_with_references(Packing(0), explicit, [same, own], policy_data) == Packing(0)  # packing alone
    assert packing_with_references(shared, auto, [same, own], policy_data) == Packing(0)  # "auto": sharing off
    assert packing_with_references(None, explicit, [own], policy_data) is None
    with pytest.raises(ValueError, match="share_prompt=True with reference 'other/ref', which has its own tokenizer"):
        packing_with_references(shared, explicit, [same, own], policy_data)


def test_auto_packing_is_the_default():
    """The default config packs ("auto": batches that save ≥ 5 % of their cost) and shares prompts, rows up to the
    mode's longest sequence (`row_length`); with the model's config the costs are its FLOPs' (`attention_key_cost`,
    and `head_share` where the scored-slot head runs)."""
    cfg = base_config()
    assert (cfg.data.packing, cfg.data.share_prompt, cfg.data.pack_length) == ("auto", "auto", 0)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    auto = Packing(0, share_prompt=True, max_row_length=512, min_saving=AUTO_MIN_SAVING)
    assert packing_of(cfg, mesh, row_length=512) == auto
    costed = packing_of(cfg, mesh, row_length=512, model_config=LLAMA, num_references=1, score_window=8)
    assert costed == Packing(
        0,
        share_prompt=True,
        max_row_length=512,
        min_saving=AUTO_MIN_SAVING,
        key_cost=attention_key_cost(LLAMA, num_references=1),
        head_cost=head_share(LLAMA),
        score_window=8,
    )
    small_head = dataclasses.replace(LLAMA, vocab_size=4)
    assert packing_of(cfg, mesh, row_length=512, model_config=small_head).head_cost == 0.0
    cfg.data.packing = True
    assert packing_of(cfg, mesh, row_length=512) == Packing(0, share_prompt=True, max_row_length=512)
    cfg.data.packing, cfg.data.share_prompt = "auto", False
    assert packing_of(cfg, mesh, row_length=512) == Packing(0, max_row_length=512, min_saving=AUTO_MIN_SAVING)
    cfg.data.packing = "false"  # as the command line gives it
    assert packing_of(cfg, mesh, row_length=512) is None


def test_trainer_with_packed_micro_batches_takes_the_padded_steps(tmp_path):
    """data.micro_batches = 2 with every batch packed (rows laid out per micro-batch) and with "auto" on one device
    (the demo slice's batches pack: they save ≥ 25 %; on a CPU mesh of several devices "auto" pads): the losses
    of padded micro-batches."""
    common = {"data.micro_batches": 2}
    padded, padded_eval = train_losses(tmp_path, "padded", **common, **{"data.packing": False})
    packed, packed_eval = train_losses(tmp_path, "packed", **common, **{"data.packing": True})
    auto, auto_eval = train_losses(tmp_path, "auto", devices=jax.devices()[:1], **common)
    for name in ("packed", "auto"):
        assert [m["train/packed"] for m in read_metrics(tmp_path / name) if "train/packed" in m] == [1.0] * 3
    assert len(padded) == 3
    for losses, evals in ((packed, packed_eval), (auto, auto_eval)):
        np.testing.assert_allclose(losses, padded, atol=1e-5, rtol=0)
        np.testing.assert_allclose(evals, padded_eval, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_two_processes_packing_their_own_rows_take_the_padded_steps(tmp_path):
    """2 processes × 4 CPU devices (fsdp 4 × tensor 2 across them), each packing its own rows with a shared prompt
    (response ids offset by its first example, rows padded to a common count by `to_global`): the losses of one
    process × 8 devices with padded batches. Run with the test suite's persistent compilation cache, which the
    processes turn off (`rpo_jax.train.runtime.processes.consistent_compilation_cache`): with it warm, process 0 ran
    the cached step while process 1 compiled its own, and the two hung in the first step."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    common = {
        "train.steps": 3,
        "mesh": {"data": 1, "fsdp": 4, "tensor": 2},
        "train.async_checkpointing": False,
        "train.checkpoint_every": 0,
    }
    packed = tiny_config(tmp_path / "data", **common, **{"data.packing": True, "data.share_prompt": True})
    outs = finish(start_processes(write_config(packed, tmp_path / "config.py"), tmp_path / "multi"))
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        assert all("persistent compilation cache" in out and "off: 2 CPU processes" in out for out in outs)
    preference.train(tiny_config(tmp_path / "data", **common), tmp_path / "single")
    single = [m["train/loss"] for m in read_metrics(tmp_path / "single") if "train/loss" in m]
    multi = [m["train/loss"] for m in read_metrics(tmp_path / "multi") if "train/loss" in m]
    assert len(single) == 3
    np.testing.assert_allclose(multi, single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_online_scoring_and_updates_on_packed_rows(micro_batches):
    """Online RPO with data.packing and a shared prompt: the samples' log-probs (policy and reference) and one
    update's loss and gradient norm (over `micro_batches` micro-batches, the rows laid out for them) equal those
    of the padded sample batch (parameter gradients: above)."""
    from rpo_jax.train.jobs import online

    cfg = load_recipe("online_demo")
    for key, value in {
        "model.path": "",
        "model.init": dict(TINY_MODEL),
        "online.prompts_per_iteration": 8,
        "data.batch_size": 8,
        "online.max_new_tokens": 12,
        "online.eval_prompts": 0,
        "train.progress_bar": False,
        "metrics.tensorboard": False,
        "data.packing": True,
        "data.share_prompt": True,
        "online.reference": "initial",
        "data.micro_batches": micro_batches,
    }.items():
        set_fields(cfg, {key: value})
    run = online.build_online_run(cfg)
    packing = run.packing
    batch, _ = online.iteration_batch(run, run.state["params"], 0)  # reference log-probs scored on packed rows
    step = online_update_step(run.config, run, run.loss_fn)
    out = {}
    for name, layout in (("packed", packing), ("padded", None)):
        run.packing = layout
        inputs = online.global_batch(run, batch)
        assert ("response_id" in inputs) == (layout is not None)
        logps = online.sample_logps(run.policy_scorer, run.initial_params, inputs)
        moved = {**run.state, "params": jax.tree.map(lambda x: x * 1.01, run.state["params"])}  # policy ≠ reference
        state, metrics = step(
            jax.tree.map(jnp.copy, moved), online.global_batch(run, batch, micro_batches=micro_batches)
        )
        out[name] = (logps, float(metrics["loss"]), float(metrics["grad_norm"]))
    assert np.all(out["padded"][0][batch["valid"]] < 0) and out["padded"][2] > 1e-4
    np.testing.assert_allclose(out["packed"][0], out["padded"][0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(batch["ref_logps"], out["padded"][0], atol=1e-5, rtol=0)
    assert abs(out["packed"][1] - out["padded"][1]) <= 1e-5
    np.testing.assert_allclose(out["packed"][2], out["padded"][2], rtol=1e-4)  # the gradient's global norm
