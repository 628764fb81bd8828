"""Pairs for reward-model training: K-response records → (chosen, rejected) pair records, each response's
full conversation (the chat template of prompt + response, the text a reward model scores) tokenized into a
K = 2 `TokenizedDataset`, and a pipeline batch → the pair step's inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from rpo_jax.data.problems import Problem, RecordError
from rpo_jax.data.records import PreferenceRecord
from rpo_jax.data.selection import to_pairs
from rpo_jax.data.tokenize import TokenizedDataset, TokenizedExample, TokenizeReport, default_buckets

PairMode = Literal["all_pairs", "best_vs_worst"]
#: `preference_pairs`'s modes: `to_pairs`'s (`config.reward_model.pairs`, `config.data.pairs`) ...
PAIR_MODES = ("best_vs_worst", "all_pairs")
#: ... and their older spellings, accepted and normalised.
PAIR_ALIASES = {"best_worst": "best_vs_worst", "all": "all_pairs"}


# ------------------------------------------------------------------------------------------------- pairs
def preference_pairs(
    records: Sequence[PreferenceRecord], *, mode: PairMode = "all_pairs", pairs_from: str = "labels"
) -> tuple[list[PreferenceRecord], int]:
    """K-response records → pair records (response 0 chosen, 1 rejected) and the number of records giving no pair.

    * a labelled pair (TRL / NeMo formats, `PreferenceRecord.labelled`) with `pairs_from="labels"`: as labelled,
      whatever its scores (as TRL's RewardTrainer trains it); with `pairs_from="rewards"` like any record below;
    * with rewards: the pairs (i, j) with r_i > r_j — all of them (`mode="all_pairs"`, alias "all") or best vs
      worst (`"best_vs_worst"`, alias "best_worst"; first index wins ties); equal rewards give no pair (so an
      all-tied record gives none);
    * K = 2 without rewards: (0, 1), response 0 chosen (the formats' convention);
    * K > 2 without rewards: a `RecordError` (ValueError) naming file:line — a preference is never invented.
    """
    if PAIR_ALIASES.get(mode, mode) not in PAIR_MODES:
        raise ValueError(f"reward_model.pairs={mode!r}: expected one of {PAIR_MODES} (aliases {tuple(PAIR_ALIASES)})")
    mode = PAIR_ALIASES.get(mode, mode)
    out: list[PreferenceRecord] = []
    without_pair = 0
    for r in records:
        if r.labelled and pairs_from == "labels":
            out.append(r)
            continue
        if r.rewards is None:
            if r.num_responses != 2:
                raise RecordError(
                    Problem(
                        *r.source,
                        "rewards",
                        f"{r.num_responses} responses without rewards: a "
                        "reward model needs a preference, which only K = 2 records (response 0 "
                        "chosen) or explicit rewards give",
                    )
                )
            out.append(r)
            continue
        pairs = to_pairs([r], mode=mode)
        without_pair += not pairs
        out.extend(pairs)
    return out, without_pair


# ------------------------------------------------------------------------------------------------- tokens
def _conversation(record: PreferenceRecord, k: int) -> list[dict[str, str]]:
    return [dict(m) for m in record.prompt] + [dict(m) for m in record.responses[k]]


def conversation_ids(records: Sequence[PreferenceRecord], tokenizer) -> list[list[list[int]]]:
    """Token ids of every (record, response): the chat template of prompt + response messages, tokenized without
    extra special tokens. For a response that is one assistant message this is `encode_conversation(tokenizer,
    prompt, response_text)` — the text `reward_model_fn` scores. Identical conversations are encoded once."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "reward-model training scores the chat template of prompt + response (as reward_model_fn "
            "does), but the tokenizer has no chat_template; set config.model.tokenizer to one that has"
        )
    texts: dict[str, int] = {}
    where: list[list[int]] = []
    for r in records:
        row = []
        for k in range(r.num_responses):
            text = tokenizer.apply_chat_template(_conversation(r, k), tokenize=False)
            row.append(texts.setdefault(text, len(texts)))
        where.append(row)
    unique = list(texts)
    ids = tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
    return [[list(ids[i]) for i in row] for row in where]


def check_truncation(truncation: str) -> None:
    """ValueError unless `truncation` is "drop" or "truncate_prompt" (the policies that keep the scored token)."""
    if truncation not in ("drop", "truncate_prompt"):
        raise ValueError(
            f"data.truncation={truncation!r}: reward-model training supports 'drop' and "
            "'truncate_prompt' (keep the last max_length tokens); 'truncate_response' would drop the "
            "token whose hidden state is scored"
        )


def tokenize_pairs(
    pairs: Sequence[PreferenceRecord], tokenizer, *, max_length: int, pad_id: int, truncation: str = "drop"
) -> TokenizedDataset:
    """Pair records → a `TokenizedDataset` of K = 2 full conversations (see `conversation_ids`), padded with
    `pad_id` (the reward model's `pad_token_id`) into buckets up to `max_length`.

    `truncation`: "drop" leaves out a pair when either conversation exceeds `max_length` tokens (counted);
    "truncate_prompt" keeps the last `max_length` tokens (the scored end survives; `reward_model_fn(...,
    truncation="left")`). "truncate_response" would cut off the scored last token: a ValueError.
    The batch's `loss_mask` is empty (no token is scored by a language-model loss).
    """
    check_truncation(truncation)
    report = TokenizeReport(num_records=len(pairs))
    examples = []
    for index, (record, ids) in enumerate(zip(pairs, conversation_ids(pairs, tokenizer))):
        report.sequence_lengths += [len(s) for s in ids]
        if any(len(s) > max_length for s in ids):
            if truncation == "drop":
                report.num_dropped += 1
                continue
            report.num_prompts_truncated += 1
            ids = [s[-max_length:] for s in ids]
        sequences = tuple(np.asarray(s, np.int32) for s in ids)
        examples.append(
            TokenizedExample(
                index=index,
                sequences=sequences,
                prompt_lengths=tuple(len(s) for s in sequences),
                rewards=record.rewards,
            )
        )
    report.num_examples = len(examples)
    has_rewards = bool(examples) and all(e.rewards is not None for e in examples)
    return TokenizedDataset(
        records=list(pairs),
        examples=examples,
        k_max=2,
        buckets=default_buckets(max_length),
        pad_id=int(pad_id),
        max_length=max_length,
        has_rewards=has_rewards,
        report=report,
    )


def pair_batch(batch: Mapping[str, np.ndarray], margin_scale: float = 0.0) -> dict[str, np.ndarray]:
    """A `[B, 2, T]` pipeline batch → the step's inputs: tokens, attention_mask, weight [B] (1 for a real pair,
    0 for eval padding) and margin [B] = margin_scale · (r_chosen − r_rejected) (0 without a margin)."""
    weight = (batch["valid"][:, 0] & batch["valid"][:, 1]).astype(np.float32)
    margin = np.zeros_like(weight)
    if margin_scale:
        margin = (margin_scale * (batch["rewards"][:, 0] - batch["rewards"][:, 1]) * weight).astype(np.float32)
    return {"tokens": batch["tokens"], "attention_mask": batch["attention_mask"], "weight": weight, "margin": margin}
