"""`config.mode = "reward_model"`: the Bradley–Terry loss, pairs, scoring consistency with `reward_model_fn` and
transformers, an end-to-end run on the demo data, the `rpo-train` entry point, checkpoints / resume and export."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from rpo_jax.data import PreferenceRecord, demo_paths, read_records, reward_pairs
from rpo_jax.models import encode_conversation, load_reward_model, reward_model_fn
from rpo_jax.models.reward import pooling_index
from rpo_jax.train.build.data import load_tokenizer
from rpo_jax.train.build.model import split_trainable
from rpo_jax.train.core.checkpoint import Checkpointer, abstract_like
from rpo_jax.train.core.export import export_workdir, save_model
from rpo_jax.train.jobs import reward_model
from rpo_jax.train.step import reward_steps

from .trainer_testlib import TINY_MODEL, demo_slice, load_recipe, read_metrics, set_fields

ONE = jax.devices()[:1]  # in-process runs on one device: faster on a 2-core machine


def demo_config(**overrides):
    """configs/reward_model_demo.py with `overrides` ("a.b" → value), quiet (no progress bar, no TensorBoard)."""
    c = load_recipe("reward_model_demo")
    c.train.progress_bar = False
    c.metrics.tensorboard = False
    c.train.async_checkpointing = False
    return set_fields(c, overrides)


def tiny_config(data_dir: pathlib.Path, **overrides):
    """The demo recipe shrunk: hidden-32 Llama, 96 train / 24 eval records, a few steps."""
    train, evaluation = demo_slice(data_dir)
    base = {
        "model.init": dict(TINY_MODEL),
        "data.train": train,
        "data.eval": evaluation,
        "data.batch_size": 8,
        "data.eval_batch_size": 16,
        "train.steps": 4,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.checkpoint_every": 2,
        "optimizer.warmup_steps": 0,
    }
    return demo_config(**{**base, **overrides})


def conversations(records, n):
    """(prompts, responses) of the first n records, in the shape a RewardFn takes."""
    prompts = [[dict(m) for m in r.prompt] for r in records[:n]]
    responses = [[r.response_text(k) for k in range(r.num_responses)] for r in records[:n]]
    return prompts, responses


def hf_scores(export_dir, tokenizer, prompts, responses) -> np.ndarray:
    """transformers' AutoModelForSequenceClassification scores [B, K] of the chat template of prompt + response,
    right-padded by the tokenizer (float32, eager attention)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(export_dir), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    texts = [
        tokenizer.apply_chat_template(list(p) + [{"role": "assistant", "content": r}], tokenize=False)
        for p, rs in zip(prompts, responses)
        for r in rs
    ]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    assert tokenizer.padding_side == "right"
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, 0].numpy()
    return logits.reshape(len(prompts), -1)


def _closed_form(c, r, w, lam, m):
    """The Bradley–Terry loss in float64: Σ w (log(1 + e^{−(c − r − m)}) + λ (c + r)²) / Σ w."""
    c, r, w, m = (np.asarray(x, np.float64) for x in (c, r, w, m))
    per = np.log1p(np.exp(-(c - r - m))) + lam * (c + r) ** 2
    return (w * per).sum() / w.sum()


# --------------------------------------------------------------------------------------------- pairs
def _record(responses, rewards=None, line=1):
    return PreferenceRecord(
        prompt=({"role": "user", "content": "q"},),
        responses=tuple(({"role": "assistant", "content": x},) for x in responses),
        rewards=None if rewards is None else tuple(rewards),
        conversational=True,
        source=("f.jsonl", line),
    )


def _texts(pairs):
    return [(p.response_text(0), p.response_text(1)) for p in pairs]


def test_pairs_from_rewards_all_and_best_worst_with_ties():
    rec = _record(["a", "b", "c", "d"], [0.5, 1.0, 0.5, 0.0])
    pairs, without = reward_pairs.preference_pairs([rec], mode="all")
    assert without == 0
    assert sorted(_texts(pairs)) == sorted([("a", "d"), ("b", "a"), ("b", "c"), ("b", "d"), ("c", "d")])  # a~c tie
    assert all(p.rewards[0] > p.rewards[1] for p in pairs)
    best, _ = reward_pairs.preference_pairs([rec], mode="best_worst")
    assert _texts(best) == [("b", "d")]
    # all tied: no pair, counted; K = 2 with rewards: the higher reward is chosen whatever the order
    tied = _record(["x", "y", "z"], [0.3, 0.3, 0.3])
    swapped = _record(["lo", "hi"], [0.1, 0.9])
    pairs, without = reward_pairs.preference_pairs([tied, swapped], mode="all")
    assert without == 1 and _texts(pairs) == [("hi", "lo")]


def test_pairs_k2_without_rewards_keep_response_0_as_chosen():
    pairs, without = reward_pairs.preference_pairs([_record(["chosen", "rejected"])], mode="all")
    assert without == 0 and _texts(pairs) == [("chosen", "rejected")] and pairs[0].rewards is None


def test_k_above_2_without_rewards_is_an_error_naming_file_and_line(tmp_path):
    data = tmp_path / "k3.jsonl"
    data.write_text(
        json.dumps({"prompt": "sort: 2 1", "responses": ["1 2", "2 1"]})
        + "\n"
        + json.dumps({"prompt": "sort: 3 1", "responses": ["1 3", "3 1", "x"]})
        + "\n"
    )
    with pytest.raises(ValueError, match=rf"{data}:2: rewards: 3 responses without rewards"):
        reward_pairs.preference_pairs(read_records([str(data)])[0], mode="all")
    cfg = tiny_config(tmp_path / "d", **{"data.train": str(data), "data.eval": ""})
    with pytest.raises(ValueError, match=rf"{data}:2: rewards"):
        reward_model.build_reward_run(cfg, devices=ONE)


def test_bad_settings_are_refused(tmp_path):
    k2 = tmp_path / "k2.jsonl"
    k2.write_text(json.dumps({"prompt": "sort: 2 1", "chosen": "1 2", "rejected": "2 1"}) + "\n")
    with pytest.raises(ValueError, match="margin_scale=0.5 needs rewards"):
        reward_model.build_reward_run(
            tiny_config(tmp_path, **{"data.train": str(k2), "data.eval": "", "reward_model.margin_scale": 0.5}),
            devices=ONE,
        )
    with pytest.raises(ValueError, match="truncate_response"):
        reward_model.build_reward_run(tiny_config(tmp_path, **{"data.truncation": "truncate_response"}), devices=ONE)
    with pytest.raises(ValueError, match="reward_model.pairs='both'"):
        reward_model.build_reward_run(tiny_config(tmp_path, **{"reward_model.pairs": "both"}), devices=ONE)
    with pytest.raises(ValueError, match="reward_model.label=1"):
        reward_model.build_reward_run(tiny_config(tmp_path, **{"reward_model.label": 1}), devices=ONE)


def test_training_sequences_are_reward_model_fn_conversations(tmp_path):
    """The tokens trained on are `encode_conversation` of (prompt, response) — what `reward_model_fn` scores —
    for string prompts too, padded with the model's pad id; `truncate_prompt` keeps the last max_length tokens."""
    tok = load_tokenizer(demo_paths()["tokenizer"])
    records = read_records([demo_slice(tmp_path)[0]])[0][:5]
    plain = PreferenceRecord(
        prompt=({"role": "user", "content": "sort: 2 1"},),
        responses=(({"role": "assistant", "content": "1 2"},), ({"role": "assistant", "content": "2 1"},)),
        rewards=None,
        conversational=False,
        source=("s.jsonl", 1),
    )
    pairs, _ = reward_pairs.preference_pairs(records + [plain], mode="all")
    ds = reward_pairs.tokenize_pairs(pairs, tok, max_length=64, pad_id=7)
    assert len(ds) == len(pairs)
    for example in ds.examples:
        pair = pairs[example.index]
        for k in range(2):
            want = encode_conversation(tok, [dict(m) for m in pair.prompt], pair.response_text(k))
            assert example.sequences[k].tolist() == want
    batch = ds.collate(list(range(4)))
    seq = ds.examples[0].sequences[0]
    assert (batch["tokens"][0, 0, len(seq) :] == 7).all() and batch["attention_mask"][0, 0].sum() == len(seq)
    short = reward_pairs.tokenize_pairs(pairs, tok, max_length=12, pad_id=0, truncation="truncate_prompt")
    assert len(short) == len(pairs)
    full = reward_pairs.tokenize_pairs(pairs, tok, max_length=64, pad_id=0).examples[0].sequences[1].tolist()
    assert short.examples[0].sequences[1].tolist() == full[-12:]
    assert len(reward_pairs.tokenize_pairs(pairs, tok, max_length=12, pad_id=0)) == 0  # "drop": every pair is longer


def test_train_step_is_the_bradley_terry_loss_of_the_scores_and_micro_batches_agree(tmp_path):
    """One jitted step: its loss is the closed form on the model's pair scores (float64), and accumulating two
    micro-batches gives the same update as one batch (equal weights per micro-batch)."""
    cfg = tiny_config(
        tmp_path,
        **{
            "reward_model.center_coefficient": 0.1,
            "optimizer.name": "sgd",
            "optimizer.learning_rate": 1.0,
            "optimizer.schedule": "constant",
        },
    )
    run = reward_model.build_reward_run(cfg, devices=ONE)
    batch = reward_pairs.pair_batch(run.datasets["train"].collate(list(range(8))))
    model = nnx.merge(run.graphdef, run.state["params"], run.rest)
    c, r = (
        np.asarray(x, np.float64)
        for x in reward_steps.pair_scores(model, jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"]))
    )
    new_params = []
    for micro in (1, 2):
        step = jax.jit(
            reward_steps.make_reward_train_step(
                run.graphdef, run.rest, run.tx, compute_dtype=jnp.float32, center_coefficient=0.1, micro_batches=micro
            )
        )
        state, metrics = step(jax.tree.map(jnp.copy, run.state), {k: jnp.asarray(v) for k, v in batch.items()})
        np.testing.assert_allclose(float(metrics["loss"]), _closed_form(c, r, np.ones(8), 0.1, 0.0), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(c > r))
        new_params.append(state["params"])
    # SGD with learning rate 1: the parameter change is the (clipped) gradient itself
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6), *new_params)


# --------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo recipe on the full demo training data (short schedule), evaluated on 100 held-out prompts."""
    root = tmp_path_factory.mktemp("rm_demo")
    _, evaluation = demo_slice(root / "data", n_train=1, n_eval=60)
    cfg = demo_config(
        **{
            "data.eval": evaluation,
            "data.max_length": 48,
            "train.steps": 100,
            "train.eval_every": 0,
            "train.log_every": 25,
            "train.checkpoint_every": 100,
        }
    )
    result = reward_model.train_reward_model(cfg, root / "run", devices=ONE)
    return cfg, root / "run", result


def test_demo_run_reaches_high_heldout_pair_accuracy(demo_run):
    _, workdir, result = demo_run
    ev = result["eval"]
    assert result["step"] == 100
    assert ev["pairs"] > 300  # ~6 pairs for each of the 60 held-out prompts
    assert ev["accuracy"] >= 0.8, ev
    assert ev["margin"] > 0 and ev["loss"] < 0.45  # chance: accuracy ~0.5, loss log 2 = 0.69
    metrics = read_metrics(workdir)
    assert [m["step"] for m in metrics if "train/loss" in m] == [25, 50, 75, 100]
    assert metrics[-1]["eval/accuracy"] == pytest.approx(ev["accuracy"])
    assert json.loads((workdir / "config.json").read_text())["mode"] == "reward_model"


def test_export_scores_equal_training_scores_reward_model_fn_and_transformers(demo_run):
    """One sequence, one score: the training path (`pair_scores` on a pipeline batch), `reward_model_fn` on the
    export loaded by `load_reward_model`, and transformers' LlamaForSequenceClassification on the same texts."""
    cfg, workdir, _ = demo_run
    export = workdir / "export"
    hf = json.loads((export / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForSequenceClassification"] and hf["pad_token_id"] == 0
    tok = load_tokenizer(str(export))
    rm, _ = load_reward_model(export)
    records = read_records([cfg.data.eval])[0]
    prompts, responses = conversations(records, 6)
    ours = reward_model_fn(rm, tok, max_length=64, batch_size=8)(prompts, responses)
    theirs = hf_scores(export, tok, prompts, responses)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.ptp(ours) > 1.0  # trained, not constant

    # the training path scores the same pairs identically (from the checkpoint the export was written from;
    # the held-out file stands in for the training data, which is not needed here)
    small = ml_collections.ConfigDict(cfg.to_dict())
    small.data.train = cfg.data.eval
    run = reward_model.build_reward_run(small, devices=ONE)
    restored = Checkpointer(workdir / "checkpoints", every_steps=1, asynchronous=False)
    step, params = restored.restore_params(abstract_like(run.state["params"]))
    restored.close()
    assert step == 100
    ds = run.datasets["eval"]
    batch = ds.collate(list(range(8)))
    model = nnx.merge(run.graphdef, params, run.rest)
    chosen, rejected = reward_steps.pair_scores(
        model, jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"])
    )
    for b, e in enumerate(ds.examples[:8]):
        pair = ds.records[e.index]
        fn = reward_model_fn(rm, tok, max_length=64, batch_size=8)
        want = fn([[dict(m) for m in pair.prompt]], [[pair.response_text(0), pair.response_text(1)]])[0]
        np.testing.assert_allclose([float(chosen[b]), float(rejected[b])], want, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def eos_pad_runs(tmp_path_factory):
    """Runs with a tokenizer whose pad id is its EOS id (the demo chat template ends every conversation with EOS):
    "straight" trains 4 steps; "resumed" trains 2 steps, then is started again with 4 steps and resumes."""
    root = tmp_path_factory.mktemp("rm_eos_pad")
    tok = load_tokenizer(demo_paths()["tokenizer"])
    tok.pad_token = tok.eos_token
    tok.save_pretrained(root / "tok")

    def config(steps):
        return tiny_config(
            root / "data",
            **{"model.tokenizer": str(root / "tok"), "train.steps": steps, "optimizer.schedule": "constant"},
        )

    straight = reward_model.train_reward_model(config(4), root / "straight", devices=ONE)
    first = reward_model.train_reward_model(config(2), root / "resumed", devices=ONE)
    resumed = reward_model.train_reward_model(config(4), root / "resumed", devices=ONE)
    return {
        "root": root,
        "config": config(4),
        "tokenizer": tok,
        "straight": straight,
        "first": first,
        "resumed": resumed,
    }


def test_resume_continues_from_the_checkpoint_like_an_uninterrupted_run(eos_pad_runs):
    runs, root = eos_pad_runs, eos_pad_runs["root"]
    assert runs["first"]["step"] == 2 and runs["resumed"]["step"] == 4 == runs["straight"]["step"]
    a, b = read_metrics(root / "straight"), read_metrics(root / "resumed")

    def loss(ms, s):
        return [m["train/loss"] for m in ms if m["step"] == s and "train/loss" in m]

    assert [loss(b, s) for s in (1, 2, 3, 4)] == [loss(a, s) for s in (1, 2, 3, 4)]  # same batches, same params
    assert loss(a, 3)[0] != loss(a, 1)[0]
    assert runs["straight"]["eval"] == runs["resumed"]["eval"]


def test_pad_id_equal_to_eos_skips_the_trailing_eos_in_training_and_in_transformers(eos_pad_runs):
    """transformers pools at the rightmost token that is not the pad id, i.e. before the trailing EOS when pad =
    EOS; training pools there too, and the exported model scores like the trained one."""
    cfg, tok, export = eos_pad_runs["config"], eos_pad_runs["tokenizer"], eos_pad_runs["root"] / "straight" / "export"
    hf = json.loads((export / "config.json").read_text())
    assert hf["pad_token_id"] == hf["eos_token_id"] == tok.eos_token_id == 2

    run = reward_model.build_reward_run(cfg, devices=ONE)
    assert run.pad_id == 2
    batch = run.datasets["eval"].collate(list(range(4)))
    flat = batch["tokens"].reshape(8, -1)
    ends = batch["attention_mask"].reshape(8, -1).sum(-1)
    assert (flat[np.arange(8), ends - 1] == 2).all()  # every conversation ends with EOS = pad
    np.testing.assert_array_equal(np.asarray(pooling_index(jnp.asarray(flat), None, 2)), ends - 2)

    rm, _ = load_reward_model(export)
    prompts, responses = conversations(read_records([cfg.data.eval])[0], 4)
    ours = reward_model_fn(rm, tok, max_length=64, batch_size=4)(prompts, responses)
    np.testing.assert_allclose(ours, hf_scores(export, tok, prompts, responses), atol=1e-4, rtol=0)
    chosen, rejected = reward_steps.pair_scores(rm, jnp.asarray(batch["tokens"]), jnp.asarray(batch["attention_mask"]))
    ev_pairs = [run.datasets["eval"].records[e.index] for e in run.datasets["eval"].examples[:4]]
    want = reward_model_fn(rm, tok, max_length=64, batch_size=4)(
        [[dict(m) for m in p.prompt] for p in ev_pairs], [[p.response_text(0), p.response_text(1)] for p in ev_pairs]
    )
    np.testing.assert_allclose(np.stack([chosen, rejected], -1), want, atol=1e-5, rtol=0)


def test_rpo_train_runs_the_demo_config_and_rpo_export_re_exports(tmp_path):
    """`rpo-train --config configs/reward_model_demo.py` (cli.run_job, all 8 devices, bfloat16 compute on float32
    master weights) trains and exports; `rpo-export` (export_workdir) writes the newest checkpoint as the same
    sequence-classification model."""
    from rpo_jax.train.cli.train import run_job

    train, evaluation = demo_slice(tmp_path / "data", n_train=64, n_eval=16)
    cfg = demo_config(
        **{
            "data.train": train,
            "data.eval": evaluation,
            "train.steps": 2,
            "train.log_every": 1,
            "train.eval_every": 1,
            "train.checkpoint_every": 1,
            "data.batch_size": 8,
            "model.init": dict(TINY_MODEL),
            "model.dtype": "bfloat16",
        }
    )
    assert cfg.mode == "reward_model"
    result = run_job(cfg, str(tmp_path / "run"))
    assert result["step"] == 2 and 0.0 <= result["eval"]["accuracy"] <= 1.0
    assert pathlib.Path(result["export"]) == tmp_path / "run" / "export"
    steps = [m["step"] for m in read_metrics(tmp_path / "run") if "eval/accuracy" in m]
    assert steps == [1, 2]
    assert all(np.isfinite(m["train/loss"]) for m in read_metrics(tmp_path / "run") if "train/loss" in m)
    out = export_workdir(tmp_path / "run", tmp_path / "re_export")
    tok = load_tokenizer(str(out))
    a, _ = load_reward_model(tmp_path / "run" / "export")
    b, _ = load_reward_model(out)
    assert b.score[...].dtype == jnp.float32 and b.backbone.embed[...].dtype == jnp.float32  # master weights
    prompts, responses = conversations(read_records([evaluation])[0], 3)
    np.testing.assert_array_equal(
        reward_model_fn(a, tok, max_length=64, batch_size=4)(prompts, responses),
        reward_model_fn(b, tok, max_length=64, batch_size=4)(prompts, responses),
    )


def test_causal_lm_backbone_gets_a_fresh_head_and_a_reward_model_checkpoint_continues(tmp_path):
    """model.path = a LlamaForCausalLM (untied, no pad id): its decoder weights + a new score head; exported, the
    LlamaForSequenceClassification scores like transformers and a run from it starts from exactly its weights."""
    from safetensors.numpy import load_file

    from tests.hf_fixtures import make_tiny_llama

    tok_path = demo_paths()["tokenizer"]
    lm = make_tiny_llama(
        tmp_path / "lm",
        vocab_size=52,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=None,
        rms_norm_eps=1e-5,
    )
    cfg = tiny_config(tmp_path / "data", **{"model.path": str(lm), "model.tokenizer": tok_path})
    run = reward_model.build_reward_run(cfg, devices=ONE)
    weights = load_file(str(lm / "model.safetensors"))
    model = nnx.merge(run.graphdef, run.state["params"], run.rest)
    assert "lm_head.weight" in weights and not hasattr(model.backbone, "lm_head")
    np.testing.assert_array_equal(np.asarray(model.backbone.embed[...]), weights["model.embed_tokens.weight"])
    assert model.score[...].shape == (1, 32) and run.model_config.pad_token_id == 0 == run.pad_id
    model.score.set_value(model.score[...] * 100.0)  # scores of order 1, so that the parity below means something
    _, params, _ = split_trainable(model)
    export = save_model(
        "reward_model", run.graphdef, params, run.rest, run.model_config, tmp_path / "export", run.tokenizer, run.mesh
    )
    assert json.loads((export / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]

    cont = tiny_config(tmp_path / "data", **{"model.path": str(export), "model.tokenizer": tok_path})
    run2 = reward_model.build_reward_run(cont, devices=ONE)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), run2.state["params"], params)
    tok = load_tokenizer(str(export))
    exported, _ = load_reward_model(export)
    prompts, responses = conversations(read_records([cont.data.eval])[0], 3)
    ours = reward_model_fn(exported, tok, max_length=64, batch_size=4)(prompts, responses)
    np.testing.assert_allclose(ours, hf_scores(export, tok, prompts, responses), atol=1e-4, rtol=0)
    assert np.ptp(ours) > 0.1
