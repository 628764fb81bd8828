"""`config.eval.generation` paths checked against what they claim: a reward-model directory as the judge (its
rewards are transformers' scores), `baseline="chosen"` (the data's chosen response of exactly the evaluated
prompts), `baseline="reference"` (the reference model's samples) and the baseline cache read back on resume."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from rpo_jax.train.jobs import preference
from tests.train.test_generation_eval import crash_first_evaluation
from tests.train.test_generation_eval import gen_config as generation_eval_config
from tests.train.trainer_testlib import read_metrics, save_tiny_base, tiny_config


def gen_config(tmp_path, **overrides):
    """`test_generation_eval.gen_config` without the PNG."""
    return generation_eval_config(tmp_path, **{"eval.generation.plot": False, **overrides})


def records(workdir: pathlib.Path, step: int) -> list[dict]:
    return [json.loads(x) for x in (workdir / "generations" / f"step_{step}.jsonl").read_text().splitlines()]


def baseline_file(workdir: pathlib.Path) -> tuple[dict, list[list[str]]]:
    """(key, [P][S] responses) of WORKDIR/generations/baseline.jsonl."""
    lines = [json.loads(x) for x in (workdir / "generations" / "baseline.jsonl").read_text().splitlines()]
    return lines[0]["key"], [x["responses"] for x in lines[1:]]


# --------------------------------------------------------------------------------------------- reward-model judge
@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny random LlamaForSequenceClassification (transformers) with the demo tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rpo_jax.train.build.data import load_tokenizer, tokenizer_path

    out = tmp_path_factory.mktemp("rm")
    tok = load_tokenizer(tokenizer_path(tiny_config(out / "data")))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)  # scores that differ between responses
    model.save_pretrained(str(out / "rm"))
    tok.save_pretrained(str(out / "rm"))
    return out / "rm"


def test_a_reward_model_directory_judges_with_transformers_scores(tmp_path, reward_model_dir):
    """judge = a reward-model directory: each record's rewards are transformers' scores of the chat template of
    prompt + response, the preference is which is higher (a tie 0.5), and the metrics are their means."""
    from transformers import AutoTokenizer

    from tests.train.test_reward_model_training import hf_scores

    workdir = tmp_path / "run"
    preference.train(gen_config(tmp_path, **{"eval.generation.judge": str(reward_model_dir)}), workdir)
    rows = records(workdir, 6)
    assert len(rows) == 8
    tok = AutoTokenizer.from_pretrained(str(reward_model_dir))
    tok.padding_side = "right"
    prompts = [r["prompt"] for r in rows]
    expected = hf_scores(reward_model_dir, tok, prompts, [[r["policy"], r["baseline"]] for r in rows])
    got = np.array([[r["policy_reward"], r["baseline_reward"]] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert len(set(np.round(got.ravel(), 4))) > 2  # the scores vary: the comparison below is not trivial
    np.testing.assert_array_equal([r["preference"] for r in rows], (np.sign(got[:, 0] - got[:, 1]) + 1) / 2)
    final = [m for m in read_metrics(workdir) if "eval/generation/win_rate" in m][-1]
    assert final["eval/generation/reward"] == pytest.approx(got[:, 0].mean(), abs=1e-6)
    assert final["eval/generation/baseline_reward"] == pytest.approx(got[:, 1].mean(), abs=1e-6)
    assert final["eval/generation/win_rate"] == pytest.approx(np.mean([r["preference"] for r in rows]))


# --------------------------------------------------------------------------------------------- baselines
def test_chosen_baseline_is_the_datas_chosen_response_of_each_evaluated_prompt(tmp_path):
    """baseline = "chosen": every record's baseline is the highest-reward response of the held-out record with
    that prompt (read here from the raw file), for 8 distinct prompts of the held-out split; no baseline file."""
    workdir = tmp_path / "run"
    cfg = gen_config(tmp_path, **{"eval.generation.baseline": "chosen"})
    preference.train(cfg, workdir)
    raw = [json.loads(x) for x in pathlib.Path(cfg.data.eval).read_text().splitlines()]
    chosen = {json.dumps(r["prompt"]): r["responses"][int(np.argmax(r["rewards"]))] for r in raw}
    for step in (3, 6):
        rows = records(workdir, step)
        keys = [json.dumps(r["prompt"]) for r in rows]
        assert len(rows) == 8 and len(set(keys)) == 8 and set(keys) <= set(chosen)
        assert [r["baseline"] for r in rows] == [chosen[k] for k in keys]
    assert [json.dumps(r["prompt"]) for r in records(workdir, 3)] == [json.dumps(r["prompt"]) for r in rows]
    assert not (workdir / "generations" / "baseline.jsonl").exists()


def test_reference_baseline_samples_the_reference_model(tmp_path):
    """baseline = "reference" with config.references[0] a directory: the reference's samples. A reference with
    the initial policy's weights samples what baseline = "initial" samples (the same key); one with other weights
    samples something else."""
    same = save_tiny_base(tmp_path / "same") / "base"  # the weights tiny_config's policy starts from
    other = save_tiny_base(tmp_path / "other", **{"model.init_seed": 7}) / "base"
    texts = {}
    for name, fields in {
        "initial": {},
        "same": {"eval.generation.baseline": "reference", "references": [{"path": str(same)}]},
        "other": {"eval.generation.baseline": "reference", "references": [{"path": str(other)}]},
    }.items():
        workdir = tmp_path / name
        preference.train(gen_config(tmp_path, **{"train.steps": 3, **fields}), workdir)
        key, texts[name] = baseline_file(workdir)
        assert key["baseline"] == {"initial": "initial", "same": str(same), "other": str(other)}[name]
        assert [r["baseline"] for r in records(workdir, 3)] == [row[0] for row in texts[name]]
    assert texts["same"] == texts["initial"]
    assert texts["other"] != texts["initial"]


def test_the_baseline_cache_is_read_on_resume_and_remade_when_its_key_differs(tmp_path, monkeypatch):
    """A run whose evaluation at step 3 crashes (after the checkpoint at step 2) resumes with the cached baseline
    — the file's responses, replaced here by markers, are what the records show; a cache whose key names other
    settings is generated again, the same samples as the first time."""
    workdir = tmp_path / "run"
    cfg = gen_config(tmp_path)
    crash_first_evaluation(monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        preference.train(cfg, workdir)
    path = workdir / "generations" / "baseline.jsonl"
    key, generated = baseline_file(workdir)
    markers = [[f"cached {i}"] for i in range(len(generated))]
    path.write_text("".join(json.dumps(x) + "\n" for x in [{"key": key}] + [{"responses": m} for m in markers]))
    preference.train(cfg, workdir)
    for step in (3, 6):
        assert [r["baseline"] for r in records(workdir, step)] == [m[0] for m in markers]

    path.write_text(path.read_text().replace(f'"seed": {cfg.seed}', f'"seed": {cfg.seed + 1}', 1))
    preference.train(cfg, workdir)  # a finished run started again evaluates once more
    assert baseline_file(workdir) == (key, generated)
    assert [r["baseline"] for r in records(workdir, 6)] == [g[0] for g in generated]


def test_online_chosen_baseline_and_a_run_without_held_out_prompts(tmp_path):
    """Online mode, baseline = "chosen": the records' baselines are the held-out file's chosen responses of their
    prompts; without a held-out split (no data.eval, a training file) the evaluation is a one-line error."""
    from rpo_jax.train.jobs.online import train_online
    from tests.train.test_generation_eval import online_gen_config

    policy = save_tiny_base(tmp_path / "base") / "base"
    workdir = tmp_path / "run"
    cfg = online_gen_config(
        policy,
        tmp_path,
        **{"eval.generation.baseline": "chosen", "online.iterations": 1, "eval.generation.plot": False},
    )
    train_online(cfg, workdir)
    raw = [json.loads(x) for x in pathlib.Path(cfg.data.eval).read_text().splitlines()]
    chosen = {json.dumps(r["prompt"]): r["responses"][int(np.argmax(r["rewards"]))] for r in raw}
    rows = records(workdir, 1)
    assert len(rows) == 8 and [r["baseline"] for r in rows] == [chosen[json.dumps(r["prompt"])] for r in rows]

    cfg = online_gen_config(policy, tmp_path, **{"data.eval": "", "online.iterations": 1})
    with pytest.raises(ValueError, match=r"no held-out split: set data\.eval, or config\.eval\.generation\.prompts"):
        train_online(cfg, tmp_path / "no_eval")
