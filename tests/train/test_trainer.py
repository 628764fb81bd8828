"""The trainer: step = direct computation, learning, exact resume (kill -9, SIGTERM), reference cache, sharding."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rpo_jax.losses import PreferenceLogps, make_loss
from rpo_jax.train.core.checkpoint import Checkpointer, abstract_like
from rpo_jax.train.jobs import preference
from rpo_jax.train.step.steps import make_eval_step, make_train_step

from .trainer_testlib import (
    final_params,
    read_metrics,
    steps_saved,
    subprocess_env,
    tiny_config,
    train_command,
    write_config,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
ONE = jax.devices()[:1]  # in-process runs on one device: faster on a 2-core CI machine


def direct_logps(graphdef, params, rest, batch) -> np.ndarray:
    """Σ log-softmax(logits)[next token] over loss_mask, from the model's logits (independent of sequence_logps)."""
    model = nnx.merge(graphdef, params, rest)
    tokens = np.asarray(batch["tokens"])
    b, k, t = tokens.shape
    flat_tokens = tokens.reshape(b * k, t)
    mask = np.asarray(batch["attention_mask"]).reshape(b * k, t).copy()
    mask[:, 0] = True
    logits = np.asarray(model(jnp.asarray(flat_tokens), attention_mask=jnp.asarray(mask)), np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    picked = np.take_along_axis(logp[:, :-1], flat_tokens[:, 1:, None], axis=-1)[..., 0]
    scored = np.asarray(batch["loss_mask"]).reshape(b * k, t)[:, 1:]
    return (picked * scored).sum(-1).reshape(b, k)


def test_train_step_loss_equals_direct_computation(tmp_path):
    cfg = tiny_config(tmp_path / "data", **{"optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 0})
    run = preference.build_run(cfg, tmp_path / "run", devices=ONE)
    preference.fill_reference_cache(run)
    from rpo_jax.data import make_train_iterator

    it = make_train_iterator(run.datasets["train"], cfg.data.batch_size, seed=cfg.seed)
    initial = jax.tree.map(np.asarray, run.state["params"])
    # the trainer's step: the output head only on the response window (config.model.score_window="auto")
    spans = []
    for ds in run.datasets.values():
        mask = ds.collate(range(len(ds)))["loss_mask"][..., 1:]  # logit position p scores token p+1
        spans.append(int(mask.sum(-1).max()))
    t = run.datasets["train"].collate(range(len(run.datasets["train"])))["tokens"].shape[-1]
    assert run.score_window < t - 1  # the window is narrower than the sequences: the test exercises it
    assert run.score_window == -(-max(spans) // 16) * 16
    step = jax.jit(
        make_train_step(
            run.graphdef, run.rest, run.loss_fn, run.tx, compute_dtype=jnp.float32, score_window=run.score_window
        )
    )
    state, _ = step(run.state, preference.train_batch(run, next(it)))
    batch = next(it)
    params_1 = jax.tree.map(np.asarray, state["params"])
    _, metrics = step(state, preference.train_batch(run, batch))

    policy = direct_logps(run.graphdef, params_1, run.rest, batch)
    reference = direct_logps(run.graphdef, initial, run.rest, batch)
    assert not np.allclose(policy, reference)  # one update moved the policy off the reference
    inputs = PreferenceLogps(
        policy_logps=jnp.asarray(policy, jnp.float32),
        ref_logps=jnp.asarray(reference, jnp.float32),
        lengths=jnp.asarray(batch["lengths"]),
        rewards=jnp.asarray(batch["rewards"]),
        valid=jnp.asarray(batch["valid"]),
    )
    expected = make_loss("rpo_bwd_kl", beta=0.1, eta=10.0)(inputs)
    np.testing.assert_allclose(float(metrics["loss"]), float(expected.loss), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(
        float(metrics["rewards/margins"]), float(expected.metrics["rewards/margins"]), rtol=1e-4, atol=1e-5
    )


def test_cached_and_in_step_references_give_the_same_losses(tmp_path):
    losses = {}
    for mode in ("cache", "in_step"):
        cfg = tiny_config(tmp_path / "data", **{"reference_mode": mode, "train.steps": 3})
        preference.train(cfg, tmp_path / mode, devices=ONE)
        losses[mode] = [m["train/loss"] for m in read_metrics(tmp_path / mode) if "train/loss" in m]
    np.testing.assert_allclose(losses["cache"], losses["in_step"], rtol=1e-5)


def test_reference_cache_is_reused_with_identical_losses(tmp_path, monkeypatch):
    shared = tmp_path / "cache"
    cfg = tiny_config(tmp_path / "data", **{"reference_cache_dir": str(shared), "train.steps": 3})
    preference.train(cfg, tmp_path / "a", devices=ONE)
    files = sorted(p.name for p in shared.glob("*.npy"))
    assert len(files) == 2  # train and eval splits
    key = json.loads(next(shared.glob("train-*.json")).read_text())
    assert {"checkpoint", "tokenizer", "data", "max_length"} <= set(key)

    def no_compute(*args, **kwargs):
        raise AssertionError("the reference cache should have been reused")

    monkeypatch.setattr(preference, "compute_logps", no_compute)
    preference.train(cfg, tmp_path / "b", devices=ONE)
    assert sorted(p.name for p in shared.glob("*.npy")) == files
    first = [m["train/loss"] for m in read_metrics(tmp_path / "a") if "train/loss" in m]
    second = [m["train/loss"] for m in read_metrics(tmp_path / "b") if "train/loss" in m]
    assert first == second


def test_loss_goes_down_and_reward_accuracy_rises_on_demo_data(tmp_path):
    cfg = tiny_config(
        tmp_path / "data",
        **{"train.steps": 40, "train.log_every": 10, "optimizer.learning_rate": 3e-3, "optimizer.warmup_steps": 5},
    )
    run = preference.build_run(cfg, tmp_path / "before", devices=ONE)
    preference.fill_reference_cache(run)
    eval_step = jax.jit(make_eval_step(run.graphdef, run.rest, run.loss_fn, compute_dtype=jnp.float32))
    before = preference.evaluate(run, run.state, eval_step)
    after = preference.train(cfg, tmp_path / "run", devices=ONE)["eval"]
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    assert after["rewards/gap_correlation"] > 0.5, after


def test_reward_aware_loss_on_data_without_rewards_fails_before_training(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "sort: 3 1 2", "chosen": "1 2 3", "rejected": "3 2 1"}) + "\n")
    cfg = tiny_config(tmp_path / "data", **{"data.train": str(data), "data.eval": str(data)})
    with pytest.raises(ValueError, match="needs explicit rewards"):
        preference.train(cfg, tmp_path / "run", devices=ONE)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sharded_8_devices_equal_1_device(tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    params = {}
    for name, mesh, devices in (
        ("one", {"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
        ("eight", {"data": 2, "fsdp": 2, "tensor": 2}, None),
    ):
        cfg = tiny_config(tmp_path / "data", **{"mesh": mesh, "train.steps": 3})
        preference.train(cfg, tmp_path / name, devices=devices)
        params[name] = final_params(tmp_path / name)
        params[name + "_loss"] = [m["train/loss"] for m in read_metrics(tmp_path / name) if "train/loss" in m]
    np.testing.assert_allclose(params["one_loss"], params["eight_loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params["one"]), jax.tree.leaves(params["eight"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _run_until_checkpoint(cmd, workdir, min_step: int, sig: int, env) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(s >= min_step for s in steps_saved(workdir)):
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted 60-step run, the baseline for the resume tests."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = tiny_config(tmp / "data", **{"train.steps": 60, "train.checkpoint_every": 5, "train.log_every": 5})
    config_file = write_config(cfg, tmp / "config.py")
    subprocess.run(train_command(config_file, tmp / "run"), env=subprocess_env(), check=True, capture_output=True)
    return config_file, final_params(tmp / "run")


def test_kill_9_then_resume_is_bit_identical(uninterrupted, tmp_path):
    config_file, expected = uninterrupted
    workdir = tmp_path / "run"
    killed = _run_until_checkpoint(train_command(config_file, workdir), workdir, 10, signal.SIGKILL, subprocess_env())
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:]
    assert max(steps_saved(workdir)) < 60
    subprocess.run(train_command(config_file, workdir), env=subprocess_env(), check=True, capture_output=True)
    resumed = final_params(workdir)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_exits_cleanly_then_resumes_identically(uninterrupted, tmp_path):
    config_file, expected = uninterrupted
    workdir = tmp_path / "run"
    stopped = _run_until_checkpoint(train_command(config_file, workdir), workdir, 5, signal.SIGTERM, subprocess_env())
    assert stopped.returncode == 0, stopped.stdout[-3000:]
    saved = steps_saved(workdir)
    assert 5 <= max(saved) < 60
    assert "preemption requested" in stopped.stdout
    subprocess.run(train_command(config_file, workdir), env=subprocess_env(), check=True, capture_output=True)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(final_params(workdir))):
        np.testing.assert_array_equal(a, b)


def test_corrupt_latest_checkpoint_falls_back_to_previous(uninterrupted, tmp_path, caplog):
    config_file, _ = uninterrupted
    cfg = tiny_config(tmp_path / "data", **{"train.steps": 4, "train.checkpoint_every": 2})
    preference.train(cfg, tmp_path / "run", devices=ONE)
    assert steps_saved(tmp_path / "run") == [2, 4]
    for f in (tmp_path / "run" / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints", every_steps=2, asynchronous=False)
    run = preference.build_run(cfg, tmp_path / "other", devices=ONE)
    with caplog.at_level("WARNING"):
        restored = ckpt.restore_latest(abstract_like(run.state))
    assert restored is not None and restored[0] == 2
    assert "could not be restored" in caplog.text


def test_two_processes_match_one_process(tmp_path):
    cfg = tiny_config(
        tmp_path / "data",
        **{"train.steps": 3, "mesh": {"data": -1, "fsdp": 1, "tensor": 1}, "train.async_checkpointing": False},
    )
    config_file = write_config(cfg, tmp_path / "config.py")
    subprocess.run(
        train_command(config_file, tmp_path / "single"), env=subprocess_env(devices=8), check=True, capture_output=True
    )
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            train_command(config_file, tmp_path / "multi"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(
                devices=4, RPO_JAX_COORDINATOR=f"localhost:{port}", RPO_JAX_NUM_PROCESSES="2", RPO_JAX_PROCESS_ID=str(i)
            ),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    single = [m["train/loss"] for m in read_metrics(tmp_path / "single") if "train/loss" in m]
    multi = [m["train/loss"] for m in read_metrics(tmp_path / "multi") if "train/loss" in m]
    np.testing.assert_allclose(single, multi, rtol=1e-6, atol=1e-6)
    for a, b in zip(
        jax.tree.leaves(final_params(tmp_path / "single")), jax.tree.leaves(final_params(tmp_path / "multi"))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = tiny_config(tmp_path / "data", **{"train.steps": 2, "train.export_at_end": True})
    preference.train(cfg, tmp_path / "run", devices=ONE)
    from rpo_jax.train.cli.export import export_main

    export_main([str(tmp_path / "run"), str(tmp_path / "exported")])
    for directory in (tmp_path / "run" / "export", tmp_path / "exported"):
        hf = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
        tok = AutoTokenizer.from_pretrained(directory)
        ids = tok.apply_chat_template([{"role": "user", "content": "sort: 3 1 2"}], add_generation_prompt=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        from rpo_jax.models import load_hf

        ours, _ = load_hf(directory)
        with torch.no_grad():
            expected = hf(torch.tensor([ids])).logits.numpy()
        np.testing.assert_allclose(np.asarray(ours(jnp.asarray([ids], jnp.int32))), expected, atol=1e-4)
    a = final_params(tmp_path / "run")
    ours, _ = load_hf(tmp_path / "exported")
    np.testing.assert_array_equal(
        np.asarray(a["embed"]["value"] if "value" in a["embed"] else a["embed"]), np.asarray(ours.embed[...])
    )


def test_mrpo_with_two_identical_references_trains_exactly_like_dpo(tmp_path):
    """MRPO's limit (identical references ⇒ DPO) through the whole trainer, with an [N, K, 2] cache."""
    common = {"data.pairs": "best_worst", "train.steps": 3}
    dpo = tiny_config(tmp_path / "data", **common, **{"loss.name": "dpo", "loss.hparams": {"beta": 0.1}})
    mrpo = tiny_config(
        tmp_path / "data",
        **common,
        **{
            "loss.name": "mrpo",
            "loss.hparams": {"beta": 0.1, "alpha": None, "epsilon": 0.1},
            "references": [{"path": "", "tokenizer": ""}, {"path": "", "tokenizer": ""}],
        },
    )
    preference.train(dpo, tmp_path / "dpo", devices=ONE)
    preference.train(mrpo, tmp_path / "mrpo", devices=ONE)
    # both references are the initial policy: one cache entry serves the two columns of [N, K, 2]
    assert len(list((tmp_path / "mrpo" / "ref_cache").glob("train-*.npy"))) == 1
    a = [m["train/loss"] for m in read_metrics(tmp_path / "dpo") if "train/loss" in m]
    b = [m["train/loss"] for m in read_metrics(tmp_path / "mrpo") if "train/loss" in m]
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_reference_with_its_own_tokenizer_scores_the_response_text(tmp_path):
    """A second reference loaded from a checkpoint directory and declared with its own tokenizer directory is
    scored on its own tokenization of the same records; with the same weights and an equivalent tokenizer its
    cached log-probs equal the primary reference's."""
    first = tiny_config(tmp_path / "data", **{"train.steps": 1, "train.export_at_end": True})
    preference.train(first, tmp_path / "first", devices=ONE)
    export = tmp_path / "first" / "export"
    tokenizer_copy = tmp_path / "tokenizer_copy"
    import shutil

    shutil.copytree(export, tokenizer_copy, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    cfg = tiny_config(
        tmp_path / "data",
        **{
            "train.steps": 1,
            "model.path": str(export),
            "model.tokenizer": str(export),
            "loss.name": "rpo_sq",
            "loss.hparams": {"beta": 0.1, "eta": 1.0, "reference_combiner": "mrpo"},
            "references": [{"path": "", "tokenizer": ""}, {"path": str(export), "tokenizer": str(tokenizer_copy)}],
        },
    )
    run = preference.build_run(cfg, tmp_path / "second", devices=ONE)
    assert run.references[1].datasets is not run.datasets  # re-tokenized with the reference's own tokenizer
    preference.fill_reference_cache(run)
    cache = run.ref_cache["train"]
    assert cache.shape[-1] == 2
    np.testing.assert_allclose(cache[..., 1], cache[..., 0], rtol=1e-5, atol=1e-4)


def _one_step(cfg, workdir, batch_index: int = 0):
    """(loss, grad_norm, params after one step) of the compiled train step on the `batch_index`-th batch."""
    run = preference.build_run(cfg, workdir, devices=ONE)
    preference.fill_reference_cache(run)
    from rpo_jax.data import make_train_iterator

    it = make_train_iterator(run.datasets["train"], cfg.data.batch_size, seed=cfg.seed)
    for _ in range(batch_index + 1):
        batch = next(it)
    step = jax.jit(
        make_train_step(
            run.graphdef,
            run.rest,
            run.loss_fn,
            run.tx,
            compute_dtype=run.dtype,
            micro_batches=cfg.data.micro_batches,
            score_window=run.score_window,
        )
    )
    state, metrics = step(run.state, preference.train_batch(run, batch))
    return float(metrics["loss"]), float(metrics["grad_norm"]), jax.tree.map(np.asarray, state["params"])


def test_output_head_on_the_response_window_trains_like_the_full_head(tmp_path):
    """score_window="auto" (head on 32 of the 63 logit positions of the demo's T = 64 batches) vs "off" (every
    position): the same train losses and gradient norms, and the same eval metrics from the reference cache."""
    runs = {}
    for setting in ("auto", "off"):
        cfg = tiny_config(tmp_path / "data", **{"model.score_window": setting, "train.steps": 3, "train.eval_every": 2})
        preference.train(cfg, tmp_path / setting, devices=ONE)
        runs[setting] = read_metrics(tmp_path / setting)
    for key in ("train/loss", "train/grad_norm", "eval/loss", "eval/rewards/margins"):
        auto = [m[key] for m in runs["auto"] if key in m]
        off = [m[key] for m in runs["off"] if key in m]
        assert len(auto) == len(off) > 0
        np.testing.assert_allclose(auto, off, rtol=1e-5, atol=1e-6)


def test_a_score_window_shorter_than_a_response_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="config.model.score_window=4 is shorter than the longest response"):
        preference.build_run(
            tiny_config(tmp_path / "data", **{"model.score_window": "4"}), tmp_path / "run", devices=ONE
        )
    with pytest.raises(ValueError, match="config.model.score_window='wide': expected 'auto', 'off' or a number"):
        preference.build_run(
            tiny_config(tmp_path / "data", **{"model.score_window": "wide"}), tmp_path / "run", devices=ONE
        )


def test_gradient_accumulation_over_micro_batches_equals_the_full_batch(tmp_path):
    """Every demo example has all K responses valid, so the mean of 4 micro-batch means is the batch mean."""
    full = _one_step(tiny_config(tmp_path / "data"), tmp_path / "a")
    micro = _one_step(tiny_config(tmp_path / "data", **{"data.micro_batches": 4}), tmp_path / "b")
    np.testing.assert_allclose(full[0], micro[0], rtol=1e-5)
    np.testing.assert_allclose(full[1], micro[1], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(full[2]), jax.tree.leaves(micro[2])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_remat_gives_the_same_step_and_bf16_compute_keeps_float32_master_weights(tmp_path):
    base = _one_step(tiny_config(tmp_path / "data"), tmp_path / "a", batch_index=1)
    remat = _one_step(tiny_config(tmp_path / "data", **{"model.remat": "full"}), tmp_path / "b", batch_index=1)
    np.testing.assert_allclose(base[0], remat[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(base[2]), jax.tree.leaves(remat[2])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    bf16 = _one_step(tiny_config(tmp_path / "data", **{"model.dtype": "bfloat16"}), tmp_path / "c", batch_index=1)
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(bf16[2]))
    # bfloat16 has an 8-bit mantissa: the loss agrees with float32 to bf16 accuracy, not float32 accuracy
    np.testing.assert_allclose(bf16[0], base[0], rtol=5e-2)


def test_iterated_training_resets_the_reference_to_the_previous_iterate(tmp_path, monkeypatch):
    resets = []
    original = preference.reset_reference_to_policy

    def spy(run, params, step):
        original(run, params, step)
        resets.append(step)
        # the primary reference now equals the policy at the end of the previous iteration
        for a, b in zip(jax.tree.leaves(run.references[0].params), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    monkeypatch.setattr(preference, "reset_reference_to_policy", spy)
    cfg = tiny_config(tmp_path / "data", **{"train.steps": 2, "train.iterations": 3, "optimizer.warmup_steps": 0})
    result = preference.train(cfg, tmp_path / "run", devices=ONE)
    assert resets == [2, 4] and result["step"] == 6
    # the first step of each iteration sees policy == reference: every implicit reward is 0 (up to float32
    # rounding between the cache pass and the step, which compile separately)
    margins = {m["step"]: m["train/rewards/margins"] for m in read_metrics(tmp_path / "run") if "train/loss" in m}
    assert all(abs(margins[s]) < 1e-6 for s in (1, 3, 5)), margins
    assert all(abs(margins[s]) > 1e-3 for s in (2, 4, 6)), margins
    assert len(list((tmp_path / "run" / "ref_cache").glob("train-*.npy"))) == 3


def test_iterated_training_resumes_exactly_at_a_boundary_and_refuses_inside_an_iteration(tmp_path):
    """train.iterations=3 × 2 steps: a checkpoint inside iteration 3 (step 5) does not hold that iteration's
    reference (the policy at step 4), so resuming there is refused with the checkpoints kept; resumed from the
    boundary checkpoint (step 4) the run ends with the uninterrupted run's parameters."""
    import shutil

    from rpo_jax.train.core.runner import ResumeError

    cfg = tiny_config(
        tmp_path / "data",
        **{
            "train.steps": 2,
            "train.iterations": 3,
            "optimizer.warmup_steps": 0,
            "train.checkpoint_every": 1,
            "train.keep_checkpoints": 10,
            "train.async_checkpointing": False,
        },
    )
    workdir = tmp_path / "run"
    preference.train(cfg, workdir, devices=ONE)
    uninterrupted = final_params(workdir)
    shutil.rmtree(workdir / "checkpoints" / "6")
    with pytest.raises(ResumeError, match=r"at step 5, inside iteration 3 .*\(the policy at step 4\)"):
        preference.train(cfg, workdir, devices=ONE)
    assert steps_saved(workdir) == [1, 2, 3, 4, 5]
    shutil.rmtree(workdir / "checkpoints" / "5")
    preference.train(cfg, workdir, devices=ONE)  # from step 4: the reference is reset to the restored policy
    for a, b in zip(jax.tree.leaves(final_params(workdir)), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "loss, hparams, extra, pairs",
    [
        ("simpo", {"beta": 2.0, "gamma": 0.5}, [], "best_worst"),  # reference-free: no reference at all
        ("ipo", {"beta": 0.1}, [], "best_worst"),  # per-token normalised (needs lengths)
        ("rloo", {"beta": 1.0, "eta": 1.0}, [], ""),  # reference = stop-gradient policy
        ("rpo_listwise", {"beta": 0.1, "eta": 5.0}, [], ""),
        ("aot", {"beta": 0.1}, [], "best_worst"),
        ("dpo", {"beta": 0.1}, [["sft", 0.05, {}]], "best_worst"),  # weighted combination
    ],
)
def test_any_loss_from_make_loss_trains_from_the_config(tmp_path, loss, hparams, extra, pairs):
    cfg = tiny_config(
        tmp_path / "data",
        **{"loss.name": loss, "loss.hparams": hparams, "loss.extra": extra, "data.pairs": pairs, "train.steps": 2},
    )
    result = preference.train(cfg, tmp_path / "run", devices=ONE)
    assert np.isfinite(result["train"]["loss"]) and np.isfinite(result["eval"]["loss"])
    uses_reference = loss not in ("simpo", "rloo")
    assert (tmp_path / "run" / "ref_cache").exists() == uses_reference
    if extra:
        assert "loss/sft" in result["train"]
