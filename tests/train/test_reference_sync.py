"""References that move (TR-DPO, `config.reference_sync`): the reference after N steps equals the closed-form mix
of the recorded policies, α = 1 is a hard copy, `every = 0` changes nothing, resume across a sync (and inside an
iteration of iterated in-step training) is bit-exact, what cannot work is refused, and TRL's DPOTrainer with
`sync_ref_model` ends with the same reference and policy weights."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rpo_jax.train.build import programs
from rpo_jax.train.build.references import Reference
from rpo_jax.train.jobs import preference
from rpo_jax.train.step.steps import ReferenceSync, sync_reference

from .trainer_testlib import final_params, read_metrics, steps_saved, tiny_config

ONE = jax.devices()[:1]


def host(tree) -> list[np.ndarray]:
    """The leaves of `tree` as numpy copies (the train step donates its state)."""
    return [np.array(x) for x in jax.tree.leaves(tree)]


def checkpoint_item(workdir: pathlib.Path, step: int, item: str = "state") -> dict:
    """An item of checkpoint `step` as numpy arrays: "state" (everything but the params) or "params"."""
    path = workdir / "checkpoints" / str(step) / item
    checkpointer = ocp.StandardCheckpointer()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), checkpointer.metadata(path).item_metadata.tree
    )
    return jax.tree.map(np.asarray, checkpointer.restore(path, target))


def sync_config(tmp_path, **overrides):
    return tiny_config(tmp_path / "data", **{"optimizer.warmup_steps": 0, "optimizer.learning_rate": 1e-2, **overrides})


# ------------------------------------------------------------------------------------------------ closed form
@pytest.mark.parametrize("mix", [0.6, 1.0])
def test_reference_after_n_steps_is_the_closed_form_mix_of_the_recorded_policies(tmp_path, monkeypatch, mix):
    """Six steps with every=2: after steps 2, 4, 6 (TRL's global_step % N == 0, after the optimizer step) the
    reference is θ_ref·(1 − α) + θ_k·α of the policy θ_k after that step, computed here by hand from the recorded
    policies; after steps 1, 3, 5 it is bit for bit what it was. α = 1: an exact copy of θ_k. Step 3 scores
    against the synced reference: its reward metrics equal a plain eval step given θ_2 and that reference."""
    cfg = sync_config(tmp_path, **{"reference_sync.every": 2, "reference_sync.mix": mix})
    run = preference.build_run(cfg, tmp_path / "run", devices=ONE)
    assert run.reference_sync == ReferenceSync(2, mix) and run.in_step_refs  # "auto" became in-step
    assert run.references[0].params is None  # the reference's only copy is the train state's
    inputs = []
    original = preference.device_batch
    monkeypatch.setattr(preference, "device_batch", lambda *a, **k: inputs.append(original(*a, **k)) or inputs[-1])
    task = preference.preference_task(run)
    state = run.state
    initial = host(state["params"])
    for a, b in zip(host(state["reference"]), initial):  # it starts as the initial policy
        np.testing.assert_array_equal(a, b)
    expected, previous, seen = initial, initial, []
    for step in range(6):
        unit = task.advance(state, step)
        state = unit.state
        theta, ref = host(state["params"]), host(state["reference"])
        seen.append((theta, ref, jax.device_get(unit.metrics)))
        if (step + 1) % 2:  # no sync after this step: the reference is bit for bit the previous one
            for got, want in zip(ref, previous):
                np.testing.assert_array_equal(got, want)
        else:  # synced: the closed form of the recorded policies, computed here
            expected = [r * np.float32(1 - mix) + t * np.float32(mix) for r, t in zip(expected, theta)]
            for got, want in zip(ref, expected):
                if mix == 1.0:
                    np.testing.assert_array_equal(got, want)  # a hard copy of θ_k, bit for bit
                else:
                    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        previous = ref
    moved = max(float(np.abs(a - b).max()) for a, b in zip(expected, initial))
    assert moved > 1e-3  # the reference moved far beyond the tolerance: the comparison is not vacuous

    # step 3 (index 2) scored against the reference synced at step 2, not the initial policy
    _, eval_step = programs.jitted_steps(cfg, run, run.loss_fn, ((run.graphdef, run.rest),), run.score_window)
    treedef = jax.tree.structure(state["params"])
    theta2, ref2, _ = seen[1]
    as_tree = lambda leaves: jax.tree.unflatten(treedef, [jax.numpy.asarray(x) for x in leaves])  # noqa: E731
    _, _, with_synced = jax.device_get(eval_step(as_tree(theta2), inputs[2], (as_tree(ref2),)))
    _, _, with_initial = jax.device_get(eval_step(as_tree(theta2), inputs[2], (as_tree(initial),)))
    step3 = seen[2][2]
    for key in ("rewards/chosen", "rewards/rejected"):
        np.testing.assert_allclose(step3[key], with_synced[key], rtol=1e-5, atol=1e-7, err_msg=key)
        assert abs(float(with_initial[key]) - float(with_synced[key])) > 1e-4, key


# ------------------------------------------------------------------------------------------------ off
def test_every_zero_changes_nothing_bit_for_bit(tmp_path):
    """`reference_sync.every = 0` trains exactly as a config without the key: the same parameters bit for bit,
    the same run identity, and checkpoints without a reference (the state layout of runs without sync)."""
    with_key = sync_config(tmp_path, **{"train.steps": 3, "reference_mode": "in_step"})
    assert with_key.reference_sync.every == 0
    without = sync_config(tmp_path, **{"train.steps": 3, "reference_mode": "in_step"})
    del without["reference_sync"]
    for cfg, name in ((with_key, "a"), (without, "b")):
        preference.train(cfg, tmp_path / name, devices=ONE)
    for a, b in zip(jax.tree.leaves(final_params(tmp_path / "a")), jax.tree.leaves(final_params(tmp_path / "b"))):
        np.testing.assert_array_equal(a, b)
    identity = [json.loads((tmp_path / name / "run_identity.json").read_text()) for name in "ab"]
    assert identity[0] == identity[1] and "reference_sync" not in json.dumps(identity[0])
    assert set(checkpoint_item(tmp_path / "a", 3)) == {"opt_state", "step", "rng"}


def test_sync_reference_is_the_identity_when_off_or_not_due():
    reference = {"w": np.full((3,), 2.0, np.float32)}
    params = {"w": np.full((3,), 4.0, np.float32)}
    assert sync_reference(reference, params, np.int32(4), ReferenceSync(0, 0.5)) is reference
    np.testing.assert_array_equal(sync_reference(reference, params, np.int32(3), ReferenceSync(2, 0.5))["w"], 2.0)
    np.testing.assert_array_equal(sync_reference(reference, params, np.int32(4), ReferenceSync(2, 0.5))["w"], 3.0)


# ------------------------------------------------------------------------------------------------ resume
def test_resume_across_a_sync_is_bit_exact(tmp_path):
    """every=2, α=0.6, 6 steps: the checkpoint of step 3 holds the reference synced at step 2; resumed from it
    (checkpoints 4-6 removed), the run crosses the syncs at 4 and 6 and ends with the uninterrupted run's policy
    and reference, bit for bit."""
    cfg = sync_config(
        tmp_path,
        **{
            "reference_sync.every": 2,
            "reference_sync.mix": 0.6,
            "train.checkpoint_every": 1,
            "train.keep_checkpoints": 10,
            "train.async_checkpointing": False,
        },
    )
    workdir = tmp_path / "run"
    preference.train(cfg, workdir, devices=ONE)
    params, state = final_params(workdir), checkpoint_item(workdir, 6)
    at2, at3 = checkpoint_item(workdir, 2, "params"), checkpoint_item(workdir, 3)["reference"]
    initial_ref = checkpoint_item(workdir, 1)["reference"]
    for ref3, ref1, theta2 in zip(jax.tree.leaves(at3), jax.tree.leaves(initial_ref), jax.tree.leaves(at2)):
        np.testing.assert_allclose(ref3, np.float32(0.4) * ref1 + np.float32(0.6) * theta2, rtol=0, atol=1e-6)
    for step in (4, 5, 6):
        shutil.rmtree(workdir / "checkpoints" / str(step))
    preference.train(cfg, workdir, devices=ONE)
    assert steps_saved(workdir)[-1] == 6
    for a, b in zip(jax.tree.leaves(final_params(workdir)), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    resumed = checkpoint_item(workdir, 6)
    for a, b in zip(jax.tree.leaves(resumed["reference"]), jax.tree.leaves(state["reference"])):
        np.testing.assert_array_equal(a, b)
    assert len([m for m in read_metrics(workdir) if "train/loss" in m]) == 6  # steps 4-6 replayed once


def test_iterated_in_step_training_resumes_exactly_inside_an_iteration(tmp_path):
    """train.iterations=3 × 2 steps with in-step references: the reference (the policy at step 4) is in the
    checkpoint of step 5, so resuming there — refused with cached references — ends bit for bit where the
    uninterrupted run does."""
    cfg = sync_config(
        tmp_path,
        **{
            "train.steps": 2,
            "train.iterations": 3,
            "reference_mode": "in_step",
            "train.checkpoint_every": 1,
            "train.keep_checkpoints": 10,
            "train.async_checkpointing": False,
        },
    )
    workdir = tmp_path / "run"
    preference.train(cfg, workdir, devices=ONE)
    uninterrupted = final_params(workdir)
    for ref5, theta4 in zip(
        jax.tree.leaves(checkpoint_item(workdir, 5)["reference"]),
        jax.tree.leaves(checkpoint_item(workdir, 4, "params")),
    ):
        np.testing.assert_array_equal(ref5, theta4)  # iteration 3's reference: the policy at its start
    shutil.rmtree(workdir / "checkpoints" / "6")
    preference.train(cfg, workdir, devices=ONE)
    for a, b in zip(jax.tree.leaves(final_params(workdir)), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------ refused
def test_cached_references_are_refused(tmp_path):
    cfg = sync_config(tmp_path, **{"reference_sync.every": 2, "reference_mode": "cache"})
    with pytest.raises(
        ValueError,
        match=r"^config.reference_sync.every=2 needs references scored in the step: "
        r"reference_mode='cache'",
    ) as info:
        preference.build_run(cfg, tmp_path / "run", devices=ONE)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"reference_sync.every": -1}, r"config.reference_sync.every=-1: expected ≥ 0$"),
        ({"reference_sync.every": 2, "reference_sync.mix": 0.0}, r"config.reference_sync.mix=0.0: expected > 0.0$"),
        ({"reference_sync.every": 2, "reference_sync.mix": 1.5}, r"config.reference_sync.mix=1.5: expected ≤ 1.0$"),
        (
            {"reference_sync.every": 2, "loss.name": "simpo", "loss.hparams": {"beta": 2.0, "gamma": 0.5}},
            r"config.reference_sync.every=2: loss 'simpo' uses no reference",
        ),
        (
            {"reference_sync.every": 2, "reference_sync.mix": 0.6, "model.lora.rank": 8},
            r"config.reference_sync.mix=0.6 with LoRA \(config.model.lora\): only mix=1 is exact",
        ),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_field(tmp_path, overrides, message):
    cfg = sync_config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=f"^{message}") as info:
        programs.reference_sync_of(cfg)
    assert "\n" not in str(info.value)


def test_a_primary_reference_of_other_shapes_is_refused():
    policy = {"w": np.zeros((4, 8), np.float32)}
    other = Reference("other/checkpoint", "fp", None, {"w": np.zeros((4, 6), np.float32)}, None, {}, "tok")
    with pytest.raises(
        ValueError,
        match=r"^config.reference_sync with the primary reference config.references\[0\] "
        r"\(other/checkpoint\): its parameters are not shaped as the policy's",
    ):
        preference.check_mixable(other, policy, "config.reference_sync")
    preference.check_mixable(dataclasses.replace(other, params={"w": np.ones((4, 8), np.float32)}), policy, "x")


def test_other_modes_refuse_reference_sync(tmp_path):
    from rpo_jax.train.cli.train import run_job

    cfg = sync_config(tmp_path, **{"mode": "online", "reference_sync.every": 4})
    with pytest.raises(
        ValueError,
        match=r"^config.reference_sync.every=4: reference sync \(TR-DPO\) is a setting of "
        r"preference training; config.mode='online'",
    ):
        run_job(cfg, str(tmp_path / "run"))


# ------------------------------------------------------------------------------------------------ LoRA
def test_lora_reference_is_a_second_adapter_set_copied_at_each_sync(tmp_path):
    """LoRA + sync (mix = 1, the exact case): the reference is a second adapter set on the policy's base, all
    zeros at the start — it scores bit for bit as the base with the adapters off (LoRA's reference), also
    against a policy whose adapters have moved — and each sync makes it a bit-exact copy of the policy's
    adapters. Only adapters are held twice: the reference has the adapters' leaves, not the base's."""
    from rpo_jax.train.build.model import adapters_off_graphdef
    from rpo_jax.train.step.steps import make_scorer

    cfg = sync_config(tmp_path, **{"model.lora.rank": 4, "model.lora.alpha": 8.0, "reference_sync.every": 2})
    run = preference.build_run(cfg, tmp_path / "run", devices=ONE)
    assert run.in_step_refs and run.references[0].params is None and run.references[0].graphdef is run.graphdef
    state = run.state
    assert jax.tree.structure(state["reference"]) == jax.tree.structure(state["params"])
    assert all(not np.any(x) for x in host(state["reference"]))
    task = preference.preference_task(run)
    state = task.advance(state, 0).state
    theta1, ref1 = host(state["params"]), host(state["reference"])
    assert all(not np.any(x) for x in ref1)  # no sync after step 1

    ds = run.datasets["train"]
    batch = {k: v for k, v in ds.collate(list(range(8))).items() if k != "index"}
    treedef = jax.tree.structure(state["params"])
    as_tree = lambda leaves: jax.tree.unflatten(treedef, [jax.numpy.asarray(x) for x in leaves])  # noqa: E731
    score = lambda graphdef, params: np.asarray(
        make_scorer(
            graphdef,
            run.rest,
            run.mesh,  # noqa: E731
            compute_dtype=run.dtype,
        )(as_tree(params), batch)
    )
    base = score(adapters_off_graphdef(run.graphdef, as_tree(theta1), run.rest), theta1)
    np.testing.assert_array_equal(score(run.graphdef, ref1), base)
    assert np.abs(score(run.graphdef, theta1) - base).max() > 1e-5  # the policy's adapters have moved

    state = task.advance(state, 1).state
    for got, want in zip(host(state["reference"]), host(state["params"])):
        np.testing.assert_array_equal(got, want)  # synced after step 2: a copy of the adapters


# ------------------------------------------------------------------------------------------------ TRL
def test_reference_and_policy_after_syncs_equal_trl(tmp_path):
    """TRL 1.16's DPOTrainer with sync_ref_model (ref_model_sync_steps=2, ref_model_mixup_alpha=0.6, 5 steps:
    syncs after steps 2 and 4) and `rpo-train --from-trl`'s mapping of the same DPOConfig, on the same tiny
    checkpoint and data (CPU, float32): the same loss at every step (steps 3-5 score against synced references)
    and the same policy and reference weights at the end (the reference read from the last checkpoint). The
    tolerance tells the timing apart: the mix of our recorded policies with syncs one step later (after 3 and
    5), or at 2 or 4 only, is checked to be further than it from TRL's reference."""
    pytest.importorskip("torch")
    pytest.importorskip("trl")
    from .test_trl_parity import dpo_config, records_of, rpo_config, tiny_policy, trl_trainer, write_jsonl

    model_dir, tok = tiny_policy(tmp_path)
    lines = records_of("standard", 20, seed=5)
    args, fields = dpo_config(
        tmp_path, max_steps=5, max_length=20, sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.6
    )
    trainer = trl_trainer(model_dir, tok, lines, args)
    trainer.train()
    history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for name, module in (("policy", trainer.model), ("reference", trainer.ref_model)):
        module.save_pretrained(tmp_path / f"trl_{name}")
    assert len(history) == 5

    cfg = rpo_config(
        fields,
        model_dir,
        write_jsonl(tmp_path / "train.jsonl", lines),
        **{"train.checkpoint_every": 1, "train.async_checkpointing": False, "train.keep_checkpoints": 10},
    )
    assert dict(cfg.reference_sync) == {"every": 2, "mix": 0.6} and cfg.reference_mode == "in_step"
    workdir = tmp_path / "run"
    preference.train(cfg, workdir, devices=ONE)
    ours_loss = [m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m]
    np.testing.assert_allclose(ours_loss, history, rtol=1e-4)

    theirs_policy, theirs_ref, initial = (
        trainable_leaves(tmp_path / "trl_policy"),
        trainable_leaves(tmp_path / "trl_reference"),
        trainable_leaves(model_dir),
    )
    ours_policy = [np.asarray(x) for x in jax.tree.leaves(final_params(workdir))]
    ours_ref = [np.asarray(x) for x in jax.tree.leaves(checkpoint_item(workdir, 5)["reference"])]
    moved = max(float(np.abs(a - b).max()) for a, b in zip(theirs_ref, initial))
    assert moved > 1e-3  # TRL's reference moved well beyond the tolerance
    for what, ours, theirs in (("policy", ours_policy, theirs_policy), ("reference", ours_ref, theirs_ref)):
        assert [x.shape for x in ours] == [x.shape for x in theirs]
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4, err_msg=what)
        print(
            f"\n{what} after 5 steps with syncs at 2 and 4: max |rpo_jax - TRL| = "
            f"{max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs)):.2e} (reference moved {moved:.2e})"
        )
    policies = [initial] + [
        [np.asarray(x) for x in jax.tree.leaves(checkpoint_item(workdir, k, "params"))] for k in range(1, 6)
    ]

    def mixed(steps):
        ref = policies[0]
        for k in steps:
            ref = [r * np.float32(0.4) + t * np.float32(0.6) for r, t in zip(ref, policies[k])]
        return max(float(np.abs(a - b).max()) for a, b in zip(ref, theirs_ref))

    assert mixed((2, 4)) <= 1e-6  # the closed form of our recorded policies is TRL's reference
    wrong = {steps: mixed(steps) for steps in ((3, 5), (2,), (4,))}
    assert min(wrong.values()) > 2e-4, wrong  # other timings are further from TRL's than the tolerance
    print(
        "reference with other sync steps: max |difference to TRL| = "
        + ", ".join(f"{steps}: {d:.1e}" for steps, d in wrong.items())
    )


def trainable_leaves(model_dir: pathlib.Path) -> list[np.ndarray]:
    """The trainable leaves of the Hugging Face checkpoint `model_dir` as loaded by rpo_jax."""
    from rpo_jax.models import load_hf
    from rpo_jax.train.build.model import split_trainable

    model, _ = load_hf(str(model_dir), dtype=np.float32, param_dtype=np.float32)
    return [np.asarray(x) for x in jax.tree.leaves(split_trainable(model)[1])]
