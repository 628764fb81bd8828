"""The benchmarks time the trainer's programs: their train step lowers to the trainer's HLO, their command line
is rpo-train's (`--config RECIPE` + `--config.KEY=VALUE`), and benchmarks/accelerator_check.py runs (reduced) on
the CPU."""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:  # the benchmarks import each other as scripts do (`import common`)
    sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402

from rpo_jax.train.jobs import preference  # noqa: E402


def quickstart_run(tmp_path, *overrides: str, k: int = 4, prompt_len: int = 12, response_len: int = 12):
    """The quickstart recipe (tiny Llama) with `overrides` on a synthetic file, built as the benchmarks build it."""
    cfg, given = common.load_config(common.QUICKSTART, ["--config.data.batch_size=4", *overrides])
    data = common.uniform_file(tmp_path, 4, k, prompt_len, response_len)
    cfg = common.synthetic_config(
        cfg, data, max_length=prompt_len + response_len, max_prompt_length=prompt_len, overrides=given
    )
    run = common.build_benchmark_run(cfg, tmp_path / "run", devices=jax.devices()[:2])
    common.check_lengths(run, prompt_len, response_len)
    return run


@pytest.mark.parametrize(
    "overrides",
    [
        ["--config.reference_mode=cache"],
        ["--config.reference_mode=in_step"],
        ["--config.reference_mode=in_step", "--config.model.lora.rank=4"],
    ],
    ids=["cached", "in_step", "lora"],
)
def test_benchmark_train_step_is_the_trainers(tmp_path, monkeypatch, overrides):
    """The train step the benchmarks time (`common.trainer_steps`) and the one `preference_task` builds for
    `rpo-train` lower to the same HLO on the same run and arguments (a mesh of 2 devices); the same function
    jitted without the trainer's out_shardings (what benchmarks/train_step.py timed before) does not."""
    run = quickstart_run(tmp_path, *overrides)
    built = []

    def recording(*args, **kwargs):
        built.append(jitted_steps(*args, **kwargs))
        return built[-1]

    jitted_steps = preference.jitted_steps
    monkeypatch.setattr(preference, "jitted_steps", recording)
    preference.preference_task(run)
    assert len(built) == 1
    trainers = built[0][0]
    benchmarks = common.trainer_steps(run)[0]
    assert benchmarks is not trainers
    inputs, refs = common.step_arguments(run, common.host_batch(run))
    assert ("ref_logps" in inputs) == (overrides[0].endswith("cache"))
    theirs = trainers.lower(run.state, inputs, refs).as_text()
    ours = benchmarks.lower(run.state, inputs, refs).as_text()
    assert ours == theirs
    plain = jax.jit(trainers.jitted.__wrapped__, donate_argnums=(0,))  # the step function, jitted naively
    assert plain.lower(run.state, inputs, refs, frozen=trainers.frozen).as_text() != theirs


def test_command_line_is_rpo_trains():
    """`--config RECIPE` and `--config.KEY=VALUE` / `--config.KEY VALUE` overrides, by ml_collections; an unknown
    field is a one-line error; the synthetic file's fields are refused as overrides."""
    overrides, rest = common.split_overrides(
        ["--steps", "2", "--config.model.remat", "full", "--config.data.batch_size=8", "--k", "4"]
    )
    assert overrides == ["--config.model.remat=full", "--config.data.batch_size=8"]
    assert rest == ["--steps", "2", "--k", "4"]
    cfg, given = common.load_config(common.SMOLLM2_SHAPE, overrides)
    assert (cfg.model.remat, cfg.data.batch_size, cfg.model.init.hidden_size) == ("full", 8, 576)
    assert given == {"model.remat": "full", "data.batch_size": 8}
    with pytest.raises(ValueError, match="does not have: 'nope'"):
        common.load_config(common.QUICKSTART, ["--config.data.nope=1"])
    with pytest.raises(ValueError, match="--config.data.max_length: the synthetic file sets"):
        common.reject_synthetic_overrides({"data.max_length": 64})
    import judge_ablation  # its arms' configs take the same overrides (no training here: parse only)

    args, recipe, given = judge_ablation.parse(["--smoke", "--config.online.max_new_tokens=64"])
    assert given == {"online.max_new_tokens": 64} and recipe.online.max_new_tokens == 64
    arm = judge_ablation.arm_config(
        "online_rpo_sq", 0, judge_ablation.SIZES["smoke"], {"policy": "P", "judge": judge_ablation.JUDGE}, recipe, given
    )
    assert (arm.online.max_new_tokens, arm.loss.name, arm.model.path) == (64, "rpo_sq", "P")
    with pytest.raises(SystemExit):
        judge_ablation.parse(["--set", "online.max_new_tokens=64"])  # the old syntax is gone


def test_judge_ablation_arms_and_paired_comparisons():
    """The ablation's arms evaluate with the win-rate module after the last iteration (π₀ as the baseline, sampled
    as in training); the R = 1 arm on MRPO's second reference validates; the pooled win rate, its interval and the
    paired differences of two arms are the win-rate module's on the per-prompt preferences."""
    import judge_ablation

    from rpo_jax.models.win_rates import paired_bootstrap_ci
    from rpo_jax.train.config.validation import validate

    _, recipe, given = judge_ablation.parse(["--smoke"])
    size = judge_ablation.SIZES["smoke"]
    pieces = {"policy": "P", "judge": judge_ablation.JUDGE, "second_reference": "S"}
    cfg = validate(judge_ablation.arm_config("online_rpo_bwd_ref2", 0, size, pieces, recipe, given))
    gen = cfg.eval.generation
    assert (gen.every, gen.baseline, gen.judge, gen.num_prompts) == (size["iterations"], "initial", pieces["judge"], 16)
    assert gen.max_new_tokens == cfg.online.max_new_tokens and gen.temperature == cfg.online.temperature
    assert [r.path for r in cfg.references] == ["", "S"]
    assert tuple(cfg.loss.hparams["alpha"]) == (0.0, 1.0) and cfg.loss.hparams["epsilon"] is None

    rng = np.random.default_rng(0)
    prompts = [f"p{i}" for i in range(40)]

    def run(arm, seed, prefs):
        n = len(prefs)
        per_prompt = {
            "prompt": prompts,
            "preference": list(prefs),
            "policy_length": [3] * n,
            "baseline_length": [3] * n,
            "policy_reward": list(prefs * 2),
            "reward_gain": list(prefs * 2 - 1),
        }
        generation = {"win_rate": float(np.mean(prefs)), "kl": 1.0}
        final = {"judge_reward": 0.5, "kl_to_initial": 1.0, "response_length": 3.0, "reward": 0.5}
        trajectory = [{"judge_reward": 0.4}]
        return {
            "arm": arm,
            "seed": seed,
            "per_prompt": per_prompt,
            "generation": generation,
            "final": final,
            "trajectory": trajectory,
        }

    a = rng.integers(1, 3, size=(40, 2)) / 2  # preferences 0.5 (a tie) or 1: better than b's 0 or 1
    b = rng.integers(0, 2, size=(40, 2)) * 1.0
    results = [run("online_mrpo", s, a[:, s]) for s in range(2)] + [run("online_rpo_bwd", s, b[:, s]) for s in range(2)]
    results.append(run("online_rpo_bwd", 2, b[:, 0]))  # a seed the other arm lacks: not in the paired difference
    table = judge_ablation.summarize(results)
    assert table["online_mrpo"]["win_rate"] == pytest.approx(a.mean())
    assert table["online_mrpo"]["win_rate_ci"] == pytest.approx(paired_bootstrap_ci(a))
    assert table["online_mrpo"]["lc_win_rate"] == pytest.approx(a.mean())  # equal lengths: LC = raw
    assert table["online_mrpo"]["wins_ties_losses"] == pytest.approx(((a == 1).mean(), (a == 0.5).mean(), 0.0))
    (row,) = judge_ablation.compare(results)
    assert (row["arm"], row["against"]) == ("online_mrpo", "online_rpo_bwd")
    assert row["delta"] == pytest.approx((a - b).mean())
    assert row["ci"] == pytest.approx(paired_bootstrap_ci(a - b))
    assert row["ci"][0] > 0 and row["verdict"] == "better"
    assert row["per_seed"] == pytest.approx((a - b).mean(axis=0))
    assert row["reward_delta"] == pytest.approx(2 * (a - b).mean())
    assert row["reward_ci"] == pytest.approx(paired_bootstrap_ci(2 * (a - b))) and row["reward_verdict"] == "better"
    assert table["online_mrpo"]["reward_gain_ci"] == pytest.approx(paired_bootstrap_ci(2 * a - 1))


def test_accelerator_check_reduced_runs_on_cpu(capsys):
    """`accelerator_check --reduced` in-process on the CPU: one JSON line with every part; XLA vs blockwise
    attention within 1e-5 in float32; kernels the CPU lacks (cuDNN, splash) reported as skipped."""
    import accelerator_check

    accelerator_check.main(["--reduced", "--devices", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(last)
    assert {"device", "platform", "reduced", "attention", "decoder", "train", "mfu", "seconds"} <= set(report)
    assert report["reduced"] is True
    attention = report["attention"]["results"]
    compared = {name: r for name, r in attention.items() if name.startswith("float32/") and "skipped" not in r}
    for name, r in attention.items():
        assert "error" not in r, (name, r)
        if "/cudnn" in name or "/splash" in name:
            assert "skipped" in r, (name, r)
    if "blockwise" in accelerator_check.implementations():
        assert compared, attention
    for name, r in compared.items():
        assert r["out_abs"] <= 1e-5 and r["grad_abs"] <= 1e-5, (name, r)
    decoder = report["decoder"]["results"]
    assert decoder["xla"]["dtype"] == "float32"
    for impl, r in decoder.items():
        assert "error" not in r, (impl, r)
        if impl != "xla" and "skipped" not in r:
            assert r["logps_rel"] <= 1e-5 and r["grad_rel"] <= 1e-4, (impl, r)
    train = report["train"]
    assert set(train) == {"packing off", "packing on"}
    assert train["packing off"]["layout"].startswith("padded") and train["packing on"]["layout"].startswith("packed")
    for r in train.values():
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["step_memory_gib"] > 0
    assert report["mfu"]["peak_flops_per_chip"] > 0 and "formula" in report["mfu"]
