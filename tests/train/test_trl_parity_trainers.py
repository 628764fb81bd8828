"""Parity with TRL 1.16's other preference trainers, run for real (CPU, float32) on the tiny checkpoint, tokenizer and
JSONL of tests/train/test_trl_parity.py: `trl.KTOTrainer` (loss_type "kto", with its KL reference point from
mismatched completions, and "apo_zero_unpaired", without; unbalanced labels), `trl.experimental.orpo.ORPOTrainer`,
`trl.experimental.cpo.CPOTrainer` (sigmoid and simpo) — and for BCO, which TRL 1.16 no longer ships, a transcription
of the last BCOTrainer's loss and running moments (`TrlBCO`: `bco_loss` / `RunningMoments` of huggingface/trl
3b0ecdf8 on TRL 1.16 KTOTrainer's batches, the KTOTrainer that BCOTrainer was written from).

For each: the same token ids (prompt, completion, mismatched completion, completion mask; the records TRL drops),
the same per-row log-probs (≤ 1e-5), the same step-0 loss and logged metrics (≤ 1e-5 relative; a difference such as
`rewards/margins` relative to its operands), and after 3 AdamW steps of `rpo-train --from-trl`'s mapping of the same
config (`trainer: kto | orpo | cpo | bco`; linear schedule with warm-up, clipping, weight decay, sequential batches,
gradient accumulation for KTO and BCO) the same logged metrics per step and parameters (≤ 1e-6).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

import jax  # noqa: E402

from rpo_jax.data import read_unpaired_records, tokenize_unpaired  # noqa: E402
from rpo_jax.losses import PreferenceLogps, UnpairedLogps  # noqa: E402
from rpo_jax.train.build.state import build_loss  # noqa: E402
from rpo_jax.train.config.from_trl import trl_to_config  # noqa: E402
from rpo_jax.train.jobs import preference  # noqa: E402
from rpo_jax.train.step.logprobs import response_and_sequence_logps  # noqa: E402
from rpo_jax.train.step.steps import make_scorer  # noqa: E402
from tests.hf_fixtures import make_tiny_llama  # noqa: E402
from tests.losses.trl_trainer_testlib import TrlRunningMoments  # noqa: E402

from .test_trl_parity import TINY_LLAMA, load_torch, sentence, tiny_policy, write_jsonl  # noqa: E402
from .trainer_testlib import read_metrics, set_fields  # noqa: E402

ONE = jax.devices()[:1]
LOGPS_ATOL, METRICS_RTOL, PARAMS_ATOL = 1e-5, 1e-5, 1e-6
#: the unpaired trainers' loss metrics (TRL leaves a label's out of a step without rows of it)
UNPAIRED_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
)
#: what a metric subtracts, for its relative difference: the log-probs (× β for the rewards) of KTO's and BCO's
#: rewards β(ℓ_θ − ℓ_ref), KL point and δ; the rewards of a margin; ORPO's average log-probs of its log odds
OPERANDS = {
    "rewards/chosen": (("logps/chosen", "beta"),),
    "rewards/rejected": (("logps/rejected", "beta"),),
    "rewards/margins": (
        ("rewards/chosen", 1),
        ("rewards/rejected", 1),
        ("logps/chosen", "beta"),
        ("logps/rejected", "beta"),
    ),
    "kl": (("logps/chosen", 1), ("logps/rejected", 1)),
    "delta": (("logps/chosen", "beta"), ("logps/rejected", "beta")),
    "log_odds_chosen": (("logps/chosen", 1),),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_parity_trainers")
    model_dir, tokenizer = tiny_policy(root)
    return model_dir, tokenizer, make_tiny_llama(root / "reference", seed=1, **TINY_LLAMA)


# ------------------------------------------------------------------------------------------------ data, configs
def unpaired_lines(kind: str, n: int, seed: int, long_prompt_every: int = 0, long_words: int = 30) -> list[dict]:
    """`n` unpaired TRL records of `kind` ("standard" / "conversational"), about 2/3 desirable, the labels in no
    pattern (some batches of one label only); every `long_prompt_every`-th prompt `long_words` words long."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        long = long_prompt_every and i % long_prompt_every == long_prompt_every - 1
        prompt = sentence(rng, long_words if long else int(rng.integers(2, 7)))
        completion, label = sentence(rng, int(rng.integers(1, 10))), bool(rng.random() < 0.67)
        if kind == "standard":
            out.append({"prompt": prompt, "completion": " " + completion, "label": label})
        else:
            out.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": completion}],
                    "label": label,
                }
            )
    return out


def pair_lines(kind: str, n: int, seed: int) -> list[dict]:
    """`n` TRL pairs (prompts of 2-6 words, responses of 1-9)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = sentence(rng, int(rng.integers(2, 7)))
        chosen, rejected = sentence(rng, int(rng.integers(1, 10))), sentence(rng, int(rng.integers(1, 10)))
        if kind == "standard":
            out.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
        else:
            user = [{"role": "user", "content": prompt}]
            out.append(
                {
                    "prompt": user,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
    return out


def trl_fields(tmp: pathlib.Path, **fields) -> dict:
    """A CPU float32 run of 3 steps in file order (the fields a TRL config and `--from-trl` both take)."""
    base = dict(
        output_dir=str(tmp / "trl_out"),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        train_sampling_strategy="sequential",
        per_device_train_batch_size=4,
        max_length=20,
        beta=0.1,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=1,
        weight_decay=0.01,
        max_grad_norm=1.0,
        seed=0,
        max_steps=3,
        dataloader_num_workers=0,
    )
    return {**base, **fields}


def trl_config(trainer: str, fields: dict):
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    cls = {"kto": trl.KTOConfig, "bco": trl.KTOConfig, "orpo": ORPOConfig, "cpo": CPOConfig}[trainer]
    if trainer == "bco":  # the transcription runs on KTOTrainer's batches without mismatched completions
        fields = {**fields, "loss_type": "apo_zero_unpaired"}
    return cls(**fields)


def make_trainer(trainer: str, model_dir, tok, lines: list[dict], fields: dict, ref_dir=None):
    from datasets import Dataset

    torch.manual_seed(0)
    kwargs = dict(args=trl_config(trainer, fields), train_dataset=Dataset.from_list(lines), processing_class=tok)
    if trainer in ("kto", "bco"):
        cls = TrlBCO if trainer == "bco" else trl.KTOTrainer
        return cls(model=load_torch(model_dir), ref_model=None if ref_dir is None else load_torch(ref_dir), **kwargs)
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    return (ORPOTrainer if trainer == "orpo" else CPOTrainer)(model=load_torch(model_dir), **kwargs)


def our_config(trainer: str, fields: dict, model_dir, train_file, **overrides):
    """`rpo-train --from-trl`'s mapping of the same config (`trainer: ...`), the model and data as overrides."""
    given = {k: v for k, v in fields.items() if k != "use_cpu"}
    cfg, _ = trl_to_config({"trainer": trainer, **given}, source="test")
    return set_fields(
        cfg,
        {
            "model.path": str(model_dir),
            "data.train": str(train_file),
            "data.eval": "",
            "train.progress_bar": False,
            "metrics.tensorboard": False,
            "metrics.peak_flops": 1e11,
            "train.checkpoint_every": 1000,
            **overrides,
        },
    )


class TrlBCO(trl.KTOTrainer):
    """The last BCOTrainer's loss (huggingface/trl 3b0ecdf8: `bco_loss` without UDM, `RunningMoments` updated with
    every micro-batch's rewards before δ is read, `get_batch_loss_metrics`' metrics) in TRL 1.16's KTOTrainer (its
    data pipeline, collator, optimizer and logging), `loss_type="apo_zero_unpaired"` so that no mismatched
    completion is built."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.running = TrlRunningMoments()

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        width = inputs["input_ids"].size(1) - 1
        kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        logps = model(**kwargs, labels=labels, fused_lm_head=True).log_probs[:, -width:].sum(-1)
        with torch.no_grad():
            ref = self.ref_model(**kwargs, labels=labels, fused_lm_head=True).log_probs[:, -width:].sum(-1)
        chosen = torch.nonzero(inputs["label"]).view(-1)
        rejected = torch.nonzero(~inputs["label"]).view(-1)
        chosen_rewards = self.beta * (logps[chosen] - ref[chosen])
        rejected_rewards = self.beta * (logps[rejected] - ref[rejected])
        if mode == "train":
            self.running.update(torch.cat((chosen_rewards, rejected_rewards), 0).detach())
        delta = torch.as_tensor(self.running.mean)
        log_sigmoid = torch.nn.functional.logsigmoid
        losses = torch.cat((-log_sigmoid(chosen_rewards - delta), -log_sigmoid(-(rejected_rewards - delta))), 0)
        metrics = self._metrics[mode]
        metrics["delta"].append(delta.item())
        for split, rewards, rows in (("chosen", chosen_rewards, chosen), ("rejected", rejected_rewards, rejected)):
            if len(rows):
                metrics[f"rewards/{split}"].append(rewards.sum().item() / len(rows))
                metrics[f"logps/{split}"].append(logps[rows].sum().item() / len(rows))
        if len(chosen) and len(rejected):
            metrics["rewards/margins"].append(metrics["rewards/chosen"][-1] - metrics["rewards/rejected"][-1])
        return losses.nanmean()


# ------------------------------------------------------------------------------------------------ comparisons
def relative(ours: float, theirs: float, operands=()) -> float:
    """|ours − theirs| relative to |theirs| (or, for a difference, to the largest of its operands)."""
    scale = max([abs(theirs)] + [abs(x) for x in operands])
    return abs(ours - theirs) / max(scale, 1e-12)


def assert_metrics(ours: dict, theirs: dict, keys, where: str, beta: float, rtol: float = METRICS_RTOL) -> float:
    """Every metric of `keys` TRL logged equal to ours within `rtol`, and present in ours exactly when TRL logged
    it; the largest relative difference. A difference is relative to its operands (`OPERANDS`): a float32 difference
    of two numbers is exact only to their magnitude (KTO's rewards subtract log-probs of tens of nats), in TRL's
    float32 code as here."""
    worst = 0.0
    for key in keys:
        assert (key in ours) == (key in theirs), (where, key, sorted(ours), sorted(theirs))
        if key in theirs:
            operands = [theirs[k] * (beta if w == "beta" else w) for k, w in OPERANDS.get(key, ()) if k in theirs]
            err = relative(ours[key], theirs[key], operands)
            assert err <= rtol, (where, key, ours[key], theirs[key], err)
            worst = max(worst, err)
    return worst


def exported(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for shard in sorted((workdir / "export").glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def check_three_steps(trainer_name, model_dir, tok, tmp_path, lines, keys, **fields) -> tuple[float, float]:
    """TRL's trainer and `rpo-train --from-trl`'s mapping of the same config, 3 AdamW steps each: every logged
    metric of `keys` (and the loss, learning rate) per step, and the parameters after. Returns (largest metric
    difference, largest parameter difference)."""
    fields = trl_fields(tmp_path, **fields)
    trainer = make_trainer(trainer_name, model_dir, tok, lines, fields)
    initial = {k: v.detach().numpy().copy() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    theirs = {k: v.detach().numpy() for k, v in trainer.model.state_dict().items()}
    history = [h for h in trainer.state.log_history if "loss" in h]
    cfg = our_config(trainer_name, fields, model_dir, write_jsonl(tmp_path / "train.jsonl", lines))
    cfg = set_fields(cfg, {"train.export_at_end": True})
    preference.train(cfg, tmp_path / "run", devices=ONE)
    ours = exported(tmp_path / "run")
    moved = max(float(np.abs(theirs[k] - initial[k]).max()) for k in theirs)
    assert moved > 1e-3  # the three steps moved the parameters well beyond the tolerance
    theirs = {k: v for k, v in theirs.items() if k in ours or k != "lm_head.weight"}  # tied: saved once
    params = max(float(np.abs(ours[k] - theirs[k]).max()) for k in theirs)
    assert params <= PARAMS_ATOL, params
    logged = [m for m in read_metrics(tmp_path / "run") if "train/loss" in m]
    assert len(logged) == 3 == len(history)
    worst = 0.0
    for step, (ours_m, theirs_m) in enumerate(zip(logged, history)):
        ours_m = {k.removeprefix("train/"): v for k, v in ours_m.items()}
        tied = [k for k in keys if k.startswith("rewards/") or k in ("kl", "delta")]
        if all(theirs_m.get(k, 0.0) == 0.0 for k in tied):  # the policy is still the reference: see `assert_tied`
            assert_tied(ours_m, theirs_m, tied, fields["beta"], f"step {step}")
            keys_compared = [k for k in keys if k not in tied]
        else:
            keys_compared = keys
        compared = ("loss", "learning_rate", *keys_compared)
        worst = max(worst, assert_metrics(ours_m, theirs_m, compared, f"step {step}", fields["beta"]))
    assert not all(history[-1].get(k, 0.0) == 0.0 for k in tied)  # the last step compares every metric
    return worst, params


def assert_tied(ours: dict, theirs: dict, keys, beta: float, where: str) -> None:
    """Until the policy moves (step 0, and step 1 after a warm-up step at learning rate 0) it is the reference: in
    TRL every reward, the KL point and BCO's δ are exactly 0 (one model, the same forward twice). Ours subtract two
    compiled forwards, equal to float32 rounding of the log-probs: each must be 0 within 1e-6 · |ℓ| (float32 has 24
    bits; β · that for the rewards), and be logged when TRL logs it."""
    scale = 1e-6 * max(abs(theirs[k]) for k in ("logps/chosen", "logps/rejected") if k in theirs)
    for key in keys:
        assert (key in ours) == (key in theirs), (where, key)
        if key in theirs:
            assert abs(ours[key]) <= scale * (1.0 if key == "kl" else beta), (where, key, ours[key])


# ------------------------------------------------------------------------------------------------ KTO
@pytest.mark.parametrize("kind", ["standard", "conversational"])
def test_kto_token_ids_mismatched_completions_and_dropped_records_equal_trl(tiny, tmp_path, kind):
    model_dir, tok, _ = tiny
    lines = unpaired_lines(kind, 16, seed=1, long_prompt_every=7, long_words=20)
    trainer = make_trainer("kto", model_dir, tok, lines, trl_fields(tmp_path, max_length=14))
    assert len(trainer.train_dataset) == 14  # TRL dropped the two prompts that fill max_length
    theirs = trainer.data_collator([trainer.train_dataset[i] for i in range(14)])
    records, _ = read_unpaired_records(write_jsonl(tmp_path / "u.jsonl", lines))
    ds = tokenize_unpaired(records, tok, max_length=14, truncation="keep_start", mismatched_block=4)
    assert [e.index for e in ds.examples] == [i for i in range(16) if i % 7 != 6] and ds.report.num_dropped == 2
    assert ds.report.num_responses_truncated > 0  # the test exercises truncation
    ours = ds.collate(list(range(14)))
    for b in range(14):
        for k, prefix in enumerate(("", "KL_")):
            real = theirs[f"{prefix}attention_mask"][b] == 1
            n = int(ours["attention_mask"][b, k].sum())
            assert ours["tokens"][b, k, :n].tolist() == theirs[f"{prefix}input_ids"][b][real].tolist(), (b, prefix)
            assert ours["loss_mask"][b, k, :n].tolist() == theirs[f"{prefix}completion_mask"][b][real].bool().tolist()
    assert ours["labels"].tolist() == theirs["label"].tolist()


def unpaired_step0(trainer_name: str, tiny, tmp: pathlib.Path, **fields):
    """Per-row log-probs and the step-0 loss and metrics of TRL and of rpo_jax on 8 records, with a reference
    model other than the policy (so that the rewards and the KL point are not all zero)."""
    model_dir, tok, ref_dir = tiny
    lines = unpaired_lines("conversational", 8, seed=2)
    fields = trl_fields(tmp, per_device_train_batch_size=8, **fields)
    trainer = make_trainer(trainer_name, model_dir, tok, lines, fields, ref_dir=ref_dir)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    trainer.model.train()
    with torch.no_grad():
        theirs = [trainer.compute_ref_log_probs(m, batch) for m in (trainer.model, trainer.ref_model)]
        loss = float(trainer.compute_loss(trainer.model, batch))
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    reference = {"references": [{"path": str(ref_dir), "tokenizer": str(model_dir)}]}
    cfg = our_config(trainer_name, fields, model_dir, write_jsonl(tmp / "train.jsonl", lines), **reference)
    run = preference.build_run(cfg, tmp / "run", devices=ONE)
    ds = run.datasets["train"]
    ours_batch = ds.collate(list(range(len(ds))))
    inputs = {k: v for k, v in ours_batch.items() if k not in ("index", "labels")}
    scored = [
        np.asarray(make_scorer(graphdef, rest, run.mesh, compute_dtype=run.dtype)(params, inputs))
        for graphdef, params, rest in (
            (run.graphdef, run.state["params"], run.rest),
            (run.references[0].graphdef, run.references[0].params, run.references[0].rest),
        )
    ]
    mismatched = ds.k_max == 2
    loss_fn = build_loss(cfg)
    out_batch = UnpairedLogps(
        policy_logps=scored[0][:, 0],
        labels=ours_batch["labels"],
        ref_logps=scored[1][:, 0],
        kl_policy_logps=scored[0][:, 1] if mismatched else None,
        kl_ref_logps=scored[1][:, 1] if mismatched else None,
        valid=ours_batch["valid"][:, 0],
    )
    out = loss_fn(out_batch, loss_fn.init_state()) if loss_fn.spec.stateful else loss_fn(out_batch)
    ours = {"loss": float(out.loss), **{k: float(v) for k, v in out.metrics.items()}}
    for model, (own, kl) in zip(("policy", "reference"), theirs):
        np.testing.assert_allclose(scored[0 if model == "policy" else 1][:, 0], own.numpy(), rtol=0, atol=LOGPS_ATOL)
        if mismatched:
            np.testing.assert_allclose(scored[0 if model == "policy" else 1][:, 1], kl.numpy(), rtol=0, atol=LOGPS_ATOL)
    logps = max(float(np.abs(s[:, 0] - t[0].numpy()).max()) for s, t in zip(scored, theirs))
    return ours, {"loss": loss, **metrics}, logps


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_step0_logps_loss_and_metrics_equal_trl(tiny, tmp_path, loss_type):
    ours, theirs, logps = unpaired_step0("kto", tiny, tmp_path, loss_type=loss_type, desirable_weight=1.4)
    keys = ("loss", "kl", *UNPAIRED_METRICS)
    worst = assert_metrics(ours, theirs, keys, loss_type, 0.1)
    assert abs(theirs["rewards/margins"]) > 1e-3 and (loss_type != "kto" or theirs["kl"] > 0)  # not all zero
    print(f"\n{loss_type} step 0: log-probs max |Δ| {logps:.2e}; loss and metrics max relative Δ {worst:.2e}")


@pytest.mark.parametrize(
    "loss_type, fields",
    [
        ("kto", {"gradient_accumulation_steps": 2, "undesirable_weight": 1.6}),
        ("apo_zero_unpaired", {"precompute_ref_log_probs": True}),
    ],
)
def test_kto_three_adamw_steps_of_from_trl_equal_trl(tiny, tmp_path, loss_type, fields):
    """KTO with the KL point over 2 micro-batches per step (each its own mismatched completions and KL point, as
    TRL's per-device batches) and in-step references; APO-zero unpaired with cached references; 24 records of
    unbalanced labels (steps and micro-batches without rows of a label: their metrics left out, as TRL's)."""
    model_dir, tok, _ = tiny
    lines = unpaired_lines("standard", 24, seed=3)
    worst, params = check_three_steps(
        "kto", model_dir, tok, tmp_path, lines, ("kl", *UNPAIRED_METRICS), loss_type=loss_type, **fields
    )
    print(f"\n{loss_type} 3 steps: metrics max relative Δ {worst:.2e}; parameters max |Δ| {params:.2e}")


# ------------------------------------------------------------------------------------------------ BCO
def test_bco_step0_logps_loss_and_metrics_equal_the_last_bco_trainer(tiny, tmp_path):
    ours, theirs, logps = unpaired_step0("bco", tiny, tmp_path)
    worst = assert_metrics(ours, theirs, ("loss", "delta", *UNPAIRED_METRICS), "bco", 0.1)
    print(f"\nbco step 0: log-probs max |Δ| {logps:.2e}; loss and metrics max relative Δ {worst:.2e}")


def test_bco_three_adamw_steps_equal_the_last_bco_trainer_and_its_running_moments(tiny, tmp_path):
    """2 micro-batches per step: the running moments updated with each, in order (TRL's per-micro-batch update);
    the moments after the run, in the checkpoint, equal the transcription's."""
    import orbax.checkpoint as ocp

    model_dir, tok, _ = tiny
    lines = unpaired_lines("conversational", 24, seed=4)
    fields = dict(gradient_accumulation_steps=2, learning_rate=2e-3)
    worst, params = check_three_steps("bco", model_dir, tok, tmp_path, lines, ("delta", *UNPAIRED_METRICS), **fields)
    state = ocp.StandardCheckpointer().restore(tmp_path / "run" / "checkpoints" / "3" / "state")
    moments = {k: float(v) for k, v in state["loss_state"].items()}
    trainer = make_trainer("bco", model_dir, tok, lines, trl_fields(tmp_path, **fields))
    trainer.train()
    running = trainer.running
    # the moments of rewards β(ℓ_θ − ℓ_ref), each exact to 1e-5 · β|ℓ| (`OPERANDS`): the mean to that, the
    # variance to 2·std times that
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    reward_tol = METRICS_RTOL * fields.get("beta", 0.1) * max(abs(last[k]) for k in ("logps/chosen", "logps/rejected"))
    assert abs(moments["mean"] - running.mean) <= reward_tol, (moments, running.mean)
    assert abs(moments["var"] - running.var) <= 2 * np.sqrt(running.var) * reward_tol, (moments, running.var)
    assert moments["count"] == running.count == 24
    print(f"\nbco 3 steps: metrics max relative Δ {worst:.2e}; parameters max |Δ| {params:.2e}")


# ------------------------------------------------------------------------------------------------ ORPO, CPO
def pair_step0(trainer_name: str, tiny, tmp: pathlib.Path, kind: str, **fields):
    """TRL's tokenized pairs, per-example average log-probs, chosen NLL, step-0 loss and metrics, and ours."""
    model_dir, tok, _ = tiny
    lines = pair_lines(kind, 8, seed=5)
    fields = trl_fields(tmp, per_device_train_batch_size=8, max_length=14, **fields)
    trainer = make_trainer(trainer_name, model_dir, tok, lines, fields)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    trainer.model.train()
    with torch.no_grad():
        chosen, rejected, _, _, nll = trainer.concatenated_forward(trainer.model, batch)[:5]
        loss = float(trainer.compute_loss(trainer.model, batch))
    theirs = {"loss": loss, **{k: v[-1] for k, v in trainer._stored_metrics["train"].items()}}
    cfg = our_config(trainer_name, fields, model_dir, write_jsonl(tmp / "pairs.jsonl", lines))
    run = preference.build_run(cfg, tmp / "run", devices=ONE)
    ds = run.datasets["train"]
    ours_batch = ds.collate(list(range(len(ds))))
    for k, prefix in enumerate(("chosen", "rejected")):  # the same tokens and completion labels
        for b in range(8):
            real = batch[f"{prefix}_attention_mask"][b] == 1
            n = int(ours_batch["attention_mask"][b, k].sum())
            assert ours_batch["tokens"][b, k, :n].tolist() == batch[f"{prefix}_input_ids"][b][real].tolist()
            scored = (batch[f"{prefix}_labels"][b][real] != -100).tolist()
            assert ours_batch["loss_mask"][b, k, :n].tolist() == scored
    inputs = {k: v for k, v in ours_batch.items() if k != "index"}
    score = jax.jit(lambda p, x: response_and_sequence_logps(run.graphdef, p, run.rest, x, compute_dtype=run.dtype))
    policy, sequence, counts = (np.asarray(x) for x in score(run.state["params"], inputs))
    # the log-probs TRL compares: averages for ORPO and CPO's ipo / simpo, sums otherwise
    averaged = trainer_name == "orpo" or fields.get("loss_type") in ("ipo", "simpo")
    compared = policy / np.maximum(ours_batch["lengths"], 1) if averaged else policy
    np.testing.assert_allclose(compared, np.stack([chosen.numpy(), rejected.numpy()], -1), rtol=0, atol=LOGPS_ATOL)
    # ORPO's NLL: over the chosen sequences' prompt + response tokens; CPO's: over the chosen responses
    our_nll = -(
        sequence[:, 0].sum() / counts[:, 0].sum()
        if trainer_name == "orpo"
        else policy[:, 0].sum() / ours_batch["lengths"][:, 0].sum()
    )
    assert relative(our_nll, float(nll)) <= METRICS_RTOL
    out = build_loss(cfg)(
        PreferenceLogps(
            policy_logps=policy,
            lengths=ours_batch["lengths"],
            valid=ours_batch["valid"],
            sequence_logps=sequence,
            sequence_lengths=counts,
        )
    )
    ours = {"loss": float(out.loss), **{k: float(v) for k, v in out.metrics.items()}}
    logps = float(np.abs(compared - np.stack([chosen.numpy(), rejected.numpy()], -1)).max())
    return ours, theirs, logps


PAIR_CASES = {
    "orpo": ("orpo", "conversational", {}, ("log_odds_ratio", "log_odds_chosen")),
    "cpo_sigmoid": ("cpo", "standard", {"loss_type": "sigmoid", "cpo_alpha": 0.7}, ()),
    "cpo_simpo": ("cpo", "conversational", {"loss_type": "simpo", "simpo_gamma": 0.8, "beta": 2.0}, ()),
}


@pytest.mark.parametrize("case", sorted(PAIR_CASES))
def test_orpo_cpo_step0_tokens_logps_loss_and_metrics_equal_trl(tiny, tmp_path, case):
    trainer_name, kind, fields, extra = PAIR_CASES[case]
    ours, theirs, logps = pair_step0(trainer_name, tiny, tmp_path, kind, **fields)
    worst = assert_metrics(ours, theirs, ("loss", *PAIR_METRICS, *extra), case, fields.get("beta", 0.1))
    print(f"\n{case} step 0: log-probs max |Δ| {logps:.2e}; loss and metrics max relative Δ {worst:.2e}")


@pytest.mark.parametrize("case", sorted(PAIR_CASES))
def test_orpo_cpo_three_adamw_steps_of_from_trl_equal_trl(tiny, tmp_path, case):
    trainer_name, kind, fields, extra = PAIR_CASES[case]
    model_dir, tok, _ = tiny
    lines = pair_lines(kind, 12, seed=6)
    worst, params = check_three_steps(
        trainer_name, model_dir, tok, tmp_path, lines, (*PAIR_METRICS, *extra), max_length=16, **fields
    )
    print(f"\n{case} 3 steps: metrics max relative Δ {worst:.2e}; parameters max |Δ| {params:.2e}")
