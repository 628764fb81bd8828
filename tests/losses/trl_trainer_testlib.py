"""Running TRL 1.16's own ORPO / CPO / KTO loss code in PyTorch without building a trainer: a trainer object made
with ``object.__new__`` and the attributes its loss methods read, a stand-in accelerator (one process) and a
stand-in model returning fixed logits / per-token log-probs. Also the token batches and their log-probs."""

from __future__ import annotations

import collections
import dataclasses
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")


class OneProcessAccelerator:
    """What TRL's loss code asks of ``accelerate.Accelerator`` in a single process."""

    device = torch.device("cpu")
    use_distributed = False
    num_processes = 1

    @staticmethod
    def gather_for_metrics(x):
        return x


def trainer(cls, **attributes):
    """An instance of TRL trainer ``cls`` without running ``__init__``: just ``attributes`` and one process."""
    obj = object.__new__(cls)
    obj.accelerator = OneProcessAccelerator()
    obj.aux_loss_enabled = False
    obj.is_encoder_decoder = False
    for key, value in attributes.items():
        setattr(obj, key, value)
    return obj


MODEL_METRICS = {"logits/chosen", "logits/rejected"}  # mean logits: the model's, not the loss's


def assert_metrics_equal(ours: dict, trl_metrics: dict, skip=frozenset(MODEL_METRICS)) -> None:
    """Every metric to 1e-6 relative; the differences ``rewards/margins`` and ORPO's ``log_odds_chosen`` relative
    to the magnitude of what they subtract (rewards; average log-probs): a float32 difference of two numbers is
    exact only to their magnitude, in TRL's float32 odds-ratio code as here."""
    assert set(ours) >= set(trl_metrics) - set(skip)
    operands = {"rewards/margins": ("rewards/chosen", "rewards/rejected"), "log_odds_chosen": ("logps/chosen",)}
    for key, value in trl_metrics.items():
        if key in skip:
            continue
        scale = max((abs(trl_metrics[k]) for k in operands.get(key, ())), default=0.0)
        np.testing.assert_allclose(ours[key], value, rtol=1e-6, atol=max(1e-6 * scale, 1e-9), err_msg=key)


# ----------------------------------------------------------------------------------------------------------------
# Paired token batches (ORPO, CPO): right-padded chosen/rejected sequences, prompt-masked labels, random logits.


@dataclasses.dataclass
class PairTokens:
    """``B`` prompt + chosen / prompt + rejected sequences, right-padded to one width ``T`` (pad id 0), as TRL's
    ``concatenated_inputs`` lays them out: rows ``0..B-1`` chosen, ``B..2B-1`` rejected."""

    input_ids: np.ndarray  # [2B, T]
    attention_mask: np.ndarray  # [2B, T]
    labels: np.ndarray  # [2B, T], -100 on prompt and padding
    logits: np.ndarray  # [2B, T, V] float64

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def trl_batch(self) -> dict:
        """The ``chosen_*`` / ``rejected_*`` tensors of TRL's ORPO/CPO collator."""
        b = self.num_pairs
        out = {}
        for prefix, rows in (("chosen", slice(0, b)), ("rejected", slice(b, 2 * b))):
            out[f"{prefix}_input_ids"] = torch.tensor(self.input_ids[rows])
            out[f"{prefix}_attention_mask"] = torch.tensor(self.attention_mask[rows])
            out[f"{prefix}_labels"] = torch.tensor(self.labels[rows])
        return out


def pair_tokens(seed: int, *, b: int = 5, vocab: int = 13, scale: float = 2.0) -> PairTokens:
    rng = np.random.default_rng(seed)
    rows, prompts = [], []
    for _ in range(b):
        prompt = list(rng.integers(1, vocab, size=int(rng.integers(2, 6))))
        prompts.append(prompt)
        rows.append(prompt + list(rng.integers(1, vocab, size=int(rng.integers(1, 6)))))
    for prompt in prompts:
        rows.append(prompt + list(rng.integers(1, vocab, size=int(rng.integers(1, 6)))))
    width = max(len(r) for r in rows)
    ids = np.zeros((2 * b, width), np.int64)
    mask = np.zeros((2 * b, width), np.int64)
    labels = np.full((2 * b, width), -100, np.int64)
    for i, row in enumerate(rows):
        prompt_len = len(prompts[i % b])
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
        labels[i, prompt_len : len(row)] = row[prompt_len:]
    logits = rng.normal(scale=scale, size=(2 * b, width, vocab))
    return PairTokens(ids, mask, labels, logits)


def token_logps(logits, ids, xp=np):
    """Per-token ``log softmax(logits[:, t])[ids[:, t + 1]]`` ``[N, T − 1]`` (``xp``: numpy or jax.numpy)."""
    shifted = logits[:, :-1, :]
    logz = xp.log(xp.sum(xp.exp(shifted - shifted.max(-1, keepdims=True)), -1)) + shifted.max(-1)
    picked = xp.take_along_axis(shifted, ids[:, 1:, None], axis=-1)[..., 0]
    return picked - logz


def pair_logps(tokens: PairTokens, logits=None, xp=np) -> dict:
    """The ``PreferenceLogps`` fields ``[B, 2]`` (chosen, rejected) of ``tokens`` (under ``logits``, default its
    own): response sums and counts (labels ≠ −100), prompt + response sums and counts (attention mask), each over
    the predicted positions 1..T−1."""
    logits = tokens.logits if logits is None else logits
    per_token = token_logps(logits, tokens.input_ids, xp)
    response = tokens.labels[:, 1:] != -100
    sequence = tokens.attention_mask[:, 1:] == 1
    b = tokens.num_pairs

    def pairs(x):
        return xp.stack([x[:b], x[b:]], axis=1)

    return {
        "policy_logps": pairs(xp.sum(xp.where(response, per_token, 0.0), -1)),
        "lengths": pairs(response.sum(-1).astype(np.float32)),
        "sequence_logps": pairs(xp.sum(xp.where(sequence, per_token, 0.0), -1)),
        "sequence_lengths": pairs(sequence.sum(-1).astype(np.float32)),
    }


def run_pair_trainer(obj, tokens: PairTokens):
    """TRL's ``get_batch_loss_metrics`` on ``tokens`` with a stand-in model returning ``tokens.logits``: (loss,
    metrics, ∂loss/∂logits)."""
    logits = torch.tensor(tokens.logits, dtype=torch.float64, requires_grad=True)
    expected_ids = torch.tensor(tokens.input_ids)

    def model(input_ids, attention_mask=None, use_cache=None, **kwargs):
        assert torch.equal(input_ids, expected_ids) and not kwargs
        return types.SimpleNamespace(logits=logits)

    loss, metrics = obj.get_batch_loss_metrics(model, tokens.trl_batch(), train_eval="train")
    loss.backward()
    return float(loss), dict(metrics), logits.grad.numpy()


# ----------------------------------------------------------------------------------------------------------------
# KTO: TRL's `_compute_loss` on fixed completion log-probs (precomputed reference log-probs, as
# `precompute_ref_log_probs=True` feeds them).


def run_kto(policy, ref, kl_policy, kl_ref, labels, *, loss_type="kto", beta=0.1, desirable=1.0, undesirable=1.0):
    """TRL 1.16's ``KTOTrainer._compute_loss`` on per-row summed log-probs: (loss, logged metrics, ∂loss/∂policy).

    The stand-in model returns each row's log-prob as its only per-token log-prob (sequences of two tokens), the
    mismatched (``KL_*``) rows marked by input id 1."""
    from trl import KTOTrainer

    n = len(labels)
    obj = trainer(
        KTOTrainer,
        model=types.SimpleNamespace(training=True),
        precompute_ref_logps=True,
        calculate_KL=loss_type == "kto",
        loss_type=loss_type,
        beta=beta,
        desirable_weight=desirable,
        undesirable_weight=undesirable,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    policy_t = torch.tensor(np.asarray(policy, np.float64), requires_grad=True)
    kl_policy_t = torch.tensor(np.asarray(kl_policy, np.float64))
    ones = torch.ones((n, 2), dtype=torch.int64)
    batch = {
        "input_ids": torch.zeros((n, 2), dtype=torch.int64),
        "attention_mask": ones,
        "completion_mask": ones,
        "label": torch.tensor(np.asarray(labels, bool)),
        "ref_logps": torch.tensor(np.asarray(ref, np.float64)),
    }
    if loss_type == "kto":
        batch.update(
            KL_input_ids=torch.ones((n, 2), dtype=torch.int64),
            KL_attention_mask=ones,
            KL_completion_mask=ones,
            ref_KL_logps=torch.tensor(np.asarray(kl_ref, np.float64)),
        )

    def model(input_ids, attention_mask=None, labels=None, fused_lm_head=None, use_cache=None):
        assert fused_lm_head
        values = kl_policy_t if bool(input_ids[0, 0] == 1) else policy_t
        zeros = torch.zeros((n, 1), dtype=torch.float64)
        return types.SimpleNamespace(log_probs=values[:, None], entropy=zeros, mean_logits=zeros)

    loss = obj._compute_loss(model, batch, return_outputs=False)
    loss.backward()
    metrics = {key: values[-1] for key, values in obj._metrics["train"].items()}
    return float(loss), metrics, policy_t.grad.numpy()


# ----------------------------------------------------------------------------------------------------------------
# BCO: TRL's last BCOTrainer (huggingface/trl 3b0ecdf8, trl/experimental/bco/bco_trainer.py; TRL 1.16 ships none).


class TrlRunningMoments:
    """TRL's ``RunningMoments`` on one process, written here from its source: mean 0, variance 1 and count 1e-24 at
    the start; each batch's float32 mean and biased variance merged in (Chan et al.), the moments kept as Python
    floats."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, xs):
        n = xs.numel()
        batch_var, batch_mean = (t.float() for t in torch.var_mean(xs, unbiased=False))
        gap = batch_mean - self.mean
        total = self.count + n
        merged = self.var * self.count + gap**2 * self.count * n / total + batch_var * n
        self.mean += (gap * n / total).item()
        self.var = (merged / total).item()
        self.count = total
