"""Generation-based evaluation (`config.eval.generation`, `rpo-eval`): metrics and records in training, the
baseline cache, resume after an interrupted evaluation, rpo-eval's files, its one-line errors, a model against
itself, and 1 vs 8 devices."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from rpo_jax.data.demo import judge as demo_judge
from rpo_jax.train.cli import evaluate as eval_cli
from rpo_jax.train.jobs import preference
from rpo_jax.train.jobs.generation_eval import TrainingEval
from tests.train.trainer_testlib import demo_slice, read_metrics, save_tiny_base, subprocess_env, tiny_config

KEYS = ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "lc_win_rate", "length_ratio", "kl", "reward")
JUDGE = "rpo_jax.data.demo:judge"


def gen_config(tmp_path, **overrides):
    return tiny_config(
        tmp_path / "data",
        **{
            "eval.generation.every": 3,
            "eval.generation.judge": JUDGE,
            "eval.generation.num_prompts": 8,
            "eval.generation.samples_per_prompt": 1,
            "eval.generation.max_new_tokens": 12,
            **overrides,
        },
    )


def crash_first_evaluation(monkeypatch) -> None:
    """The first generation evaluation of the process raises "killed during the evaluation" (a crash inside it);
    later ones run."""
    calls = {"n": 0}
    original = TrainingEval.__call__

    def crashing(self, params, step):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("killed during the evaluation")
        return original(self, params, step)

    monkeypatch.setattr(TrainingEval, "__call__", crashing)


def assert_generation_records(records) -> None:
    """Every generation metric (`KEYS`) in each logged record, the win rate inside its interval."""
    for r in records:
        for k in KEYS:
            assert f"eval/generation/{k}" in r, k
        assert r["eval/generation/win_rate_ci_low"] <= r["eval/generation/win_rate"]
        assert r["eval/generation/win_rate"] <= r["eval/generation/win_rate_ci_high"]


def test_training_logs_generation_metrics_and_records(tmp_path):
    workdir = tmp_path / "run"
    preference.train(gen_config(tmp_path), workdir)
    records = [r for r in read_metrics(workdir) if "eval/generation/win_rate" in r]
    assert [r["step"] for r in records] == [3, 6]
    assert_generation_records(records)
    lines = [json.loads(x) for x in (workdir / "generations" / "step_6.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and {"prompt", "policy", "baseline", "preference", "policy_reward"} <= set(lines[0])
    # the win rate is the records' mean preference
    assert records[1]["eval/generation/win_rate"] == pytest.approx(sum(x["preference"] for x in lines) / 8)
    assert (workdir / "generations" / "win_rate.png").stat().st_size > 0
    # the baseline's samples are cached: a second evaluation set-up reads them, the same texts
    cached = (workdir / "generations" / "baseline.jsonl").read_text()
    assert [json.loads(x)["responses"][0] for x in cached.splitlines()[1:]] == [x["baseline"] for x in lines]


def test_an_interrupted_evaluation_resumes_without_duplicated_records(tmp_path, monkeypatch):
    """The evaluation at step 3 fails after its checkpoint at step 2 (a crash inside the evaluation); the run
    started again resumes at step 2 and metrics.jsonl holds one record per step and prefix."""
    workdir = tmp_path / "run"
    cfg = gen_config(tmp_path)
    crash_first_evaluation(monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        preference.train(cfg, workdir)
    preference.train(cfg, workdir)
    seen = [(r["step"], tuple(sorted(k.split("/")[0] for k in r if "/" in k))) for r in read_metrics(workdir)]
    assert len(seen) == len(set(seen)), seen
    assert [r["step"] for r in read_metrics(workdir) if "eval/generation/win_rate" in r] == [3, 6]


def run_eval(*args: str):
    return subprocess.run(
        [sys.executable, "-m", "rpo_jax.train.cli.evaluate", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=pathlib.Path(__file__).resolve().parents[2],
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("eval")) / "base"


def test_rpo_eval_of_a_model_against_itself(exported, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--policy", str(exported), "--baseline", str(exported), "--prompts", "demo", "--judge", JUDGE]
    eval_cli.main(
        argv + ["--out", str(out), "--num-prompts", "40", "--max-new-tokens", "12", "--max-prompt-length", "32"]
    )
    assert capsys.readouterr().out.startswith("rpo-eval: win rate")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["win_rate_ci_low"] <= 0.5 <= summary["win_rate_ci_high"]
    assert summary["kl"] == pytest.approx(0.0, abs=1e-4)  # the same model scores its samples the same
    assert len((out / "samples.jsonl").read_text().splitlines()) == 40
    assert (out / "evaluation.png").stat().st_size > 0


@pytest.mark.parametrize(
    "change, message",
    [
        (["--judge", "nope"], "rpo-eval: error: judge 'nope': not a 'module:function'"),
        (["--judge", "llm:/no/such/dir"], "rpo-eval: error: judge 'llm:/no/such/dir': /no/such/dir is not a model"),
        (["--baseline", "/no/such/dir"], "rpo-eval: error: --baseline /no/such/dir: not a model directory"),
    ],
)
def test_rpo_eval_bad_input_is_one_line(exported, tmp_path, change, message):
    args = {"--policy": str(exported), "--baseline": "chosen", "--prompts": "demo", "--judge": JUDGE}
    args.update(dict(zip(change[::2], change[1::2])))
    result = run_eval(*[x for kv in args.items() for x in kv], "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr


def test_rpo_eval_names_the_bad_prompt_line_and_template(exported, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "sort: 1 2"}\n{"prompt": 3}\n')
    result = run_eval(
        "--policy",
        str(exported),
        "--baseline",
        str(exported),
        "--prompts",
        str(bad),
        "--judge",
        JUDGE,
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode == 1 and f"{bad}:2" in result.stderr.splitlines()[-1], result.stderr
    template = tmp_path / "t.txt"
    template.write_text("{prompt} {response_a}")
    result = run_eval(
        "--policy",
        str(exported),
        "--baseline",
        "chosen",
        "--prompts",
        "demo",
        "--judge",
        f"llm:{exported}",
        "--judge-template",
        str(template),
        "--out",
        str(tmp_path / "o"),
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"rpo-eval: error: {template}: the judge template lacks the placeholder(s) {{response_b}}"
    )


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_judgments(exported, tmp_path):
    outs = []
    for devices in (1, 8):
        out = tmp_path / f"d{devices}"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "rpo_jax.train.cli.evaluate",
                "--policy",
                str(exported),
                "--baseline",
                str(exported),
                "--prompts",
                "demo",
                "--judge",
                JUDGE,
                "--out",
                str(out),
                "--num-prompts",
                "20",
                "--max-new-tokens",
                "12",
                "--max-prompt-length",
                "32",
            ],
            capture_output=True,
            text=True,
            env=subprocess_env(devices),
            cwd=pathlib.Path(__file__).resolve().parents[2],
        )
        assert result.returncode == 0, result.stderr
        outs.append((out / "samples.jsonl").read_text())
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_smollm2_as_llm_judge_runs_end_to_end(exported, smollm2_dir, tmp_path):
    """SmolLM2-135M-Instruct judges the tiny model's samples against the demo's chosen responses in both orders:
    every preference and the position bias in range, and both recorded per prompt."""
    out = tmp_path / "out"
    result = run_eval(
        "--policy",
        str(exported),
        "--baseline",
        "chosen",
        "--prompts",
        "demo",
        "--judge",
        f"llm:{smollm2_dir}",
        "--out",
        str(out),
        "--num-prompts",
        "6",
        "--max-new-tokens",
        "12",
        "--max-prompt-length",
        "32",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["win_rate"] <= 1 and -1 <= summary["position_bias"] <= 1
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(0 <= r["preference"] <= 1 and 0 <= r["first_position"] <= 1 for r in rows)


@pytest.mark.slow
def test_kill_9_during_an_in_training_evaluation_resumes_without_duplicated_records(tmp_path):
    """`kill -9` of rpo-train while it evaluates at step 3 (after its checkpoint at step 2); the same command again
    resumes, and metrics.jsonl and the generation files hold each record once."""
    import os
    import signal
    import time

    from tests.train.trainer_testlib import train_command, write_config

    workdir = tmp_path / "run"
    command = train_command(write_config(gen_config(tmp_path), tmp_path / "cfg.py"), workdir)
    log = tmp_path / "log.txt"
    env = subprocess_env(RPO_JAX_QUIET="1")
    with open(log, "w") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    while "evaluating at step 3" not in log.read_text() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, log.read_text()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    seen = [(r["step"], tuple(sorted(k.split("/")[0] for k in r if "/" in k))) for r in read_metrics(workdir)]
    assert len(seen) == len(set(seen)), seen
    assert [r["step"] for r in read_metrics(workdir) if "eval/generation/win_rate" in r] == [3, 6]
    for step in (3, 6):
        assert len((workdir / "generations" / f"step_{step}.jsonl").read_text().splitlines()) == 8


# --------------------------------------------------------------------------------------------- online runs
def user_text(prompt) -> str:
    """A record's prompt as the demo judge reads it: the last user message of a conversation, else the text."""
    return prompt if isinstance(prompt, str) else [m["content"] for m in prompt if m["role"] == "user"][-1]


def online_gen_config(policy, tmp_path, **overrides):
    """configs/online_demo.py on a tiny policy: 2 iterations × 2 updates, a generation eval every iteration."""
    from tests.train.trainer_testlib import load_recipe, set_fields

    train, evaluation = demo_slice(tmp_path / "data")
    c = load_recipe("online_demo")
    c.model.path = str(policy)
    c.data.train, c.data.eval = train, evaluation
    c.data.batch_size = 8
    c.online.iterations = 2
    c.online.prompts_per_iteration = 8
    c.online.updates_per_iteration = 2
    c.online.max_new_tokens = 12
    c.online.eval_every = 0
    c.online.eval_prompts = 8
    c.train.checkpoint_every = 1
    c.train.progress_bar = False
    c.train.export_at_end = False
    c.train.async_checkpointing = False
    c.metrics.tensorboard = False
    c.metrics.peak_flops = 1e11
    fields = {
        "eval.generation.every": 1,
        "eval.generation.judge": JUDGE,
        "eval.generation.num_prompts": 8,
        "eval.generation.max_new_tokens": 12,
        **overrides,
    }
    return set_fields(c, fields)


def test_online_training_logs_generation_metrics_records_and_resumes_without_duplicates(
    exported, tmp_path, monkeypatch
):
    """config.eval.generation in online mode: eval/generation/… at every iteration (the metrics' step) and the
    end, step_N.jsonl whose mean preference is the win rate; an evaluation that crashes (after the checkpoint of
    iteration 1) is done again on resume, once."""
    from rpo_jax.train.jobs.online import train_online

    workdir = tmp_path / "run"
    cfg = online_gen_config(exported, tmp_path)
    crash_first_evaluation(monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        train_online(cfg, workdir)
    train_online(cfg, workdir)
    metrics = read_metrics(workdir)
    seen = [(r["step"], tuple(sorted(k.split("/")[0] for k in r if "/" in k))) for r in metrics]
    assert len(seen) == len(set(seen)), seen
    records = [r for r in metrics if "eval/generation/win_rate" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert_generation_records(records)
    for r in records:
        lines = [json.loads(x) for x in (workdir / "generations" / f"step_{r['step']}.jsonl").read_text().splitlines()]
        assert len(lines) == 8 and all(x["step"] == r["step"] for x in lines)
        assert r["eval/generation/win_rate"] == pytest.approx(sum(x["preference"] for x in lines) / 8)
        # the demo judge's rewards, recomputed here from the records' texts
        assert r["eval/generation/reward"] == pytest.approx(
            sum(demo_judge(user_text(x["prompt"]), x["policy"]) for x in lines) / 8
        )
    assert (workdir / "generations" / "win_rate.png").stat().st_size > 0


def test_reward_model_mode_refuses_a_generation_eval(tmp_path):
    from rpo_jax.train.config.validation import validate

    with pytest.raises(ValueError, match="trains no policy that writes"):
        validate(
            tiny_config(
                tmp_path, **{"mode": "reward_model", "eval.generation.every": 1, "eval.generation.judge": JUDGE}
            )
        )
