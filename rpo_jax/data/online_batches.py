"""Prompt batches of online training: the prompts of an iteration (epoch permutations), prompts encoded and
left-padded for sampling, and prompt + sampled responses as a training batch (the `[B, K, T]` contract).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rpo_jax.data.pipeline import epoch_permutation
from rpo_jax.data.prompts import PromptRecord
from rpo_jax.data.tokenize import encode_prompt


# --------------------------------------------------------------------------------------------- prompts
def prompt_order(num_prompts: int, iteration: int, per_iteration: int, seed: int) -> np.ndarray:
    """Indices of the prompts of `iteration`: positions iteration·P … of the concatenated epoch permutations."""
    positions = np.arange(iteration * per_iteration, (iteration + 1) * per_iteration)
    out = np.empty_like(positions)
    for epoch in np.unique(positions // num_prompts):
        sel = positions // num_prompts == epoch
        out[sel] = epoch_permutation(num_prompts, seed, int(epoch), shuffle=True)[positions[sel] % num_prompts]
    return out


def encode_prompts(
    prompts: Sequence[PromptRecord], tokenizer, *, max_prompt_length: int, truncation: str
) -> tuple[list[PromptRecord], list[list[int]], int]:
    """(kept prompts, their token ids, number dropped): prompts longer than `max_prompt_length` are dropped
    (`truncation="drop"`, counted) or keep their last `max_prompt_length` tokens (other policies)."""
    kept, ids, dropped = [], [], 0
    for p in prompts:
        x = encode_prompt(p, tokenizer)
        if len(x) > max_prompt_length:
            if truncation == "drop":
                dropped += 1
                continue
            x = x[-max_prompt_length:]
        kept.append(p)
        ids.append(x)
    return kept, ids, dropped


def left_pad(prompt_ids: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts → left-padded `tokens [N, width]` int32 and `attention_mask [N, width]` bool."""
    tokens = np.full((len(prompt_ids), width), pad_id, np.int32)
    mask = np.zeros((len(prompt_ids), width), bool)
    for i, p in enumerate(prompt_ids):
        if p:
            tokens[i, width - len(p) :], mask[i, width - len(p) :] = p, True
    return tokens, mask


def sample_batch(
    prompt_ids: Sequence[Sequence[int]],
    responses: np.ndarray,
    response_mask: np.ndarray,
    rewards: np.ndarray | None,
    *,
    width: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Prompts [P] and their K sampled responses → a training batch (the `rpo_jax.data` contract).

    responses/response_mask [P, K, M]: generated tokens and which are real (up to and including EOS).
    Each row is prompt + response, right-padded to `width` tokens; `loss_mask` marks the response tokens,
    `lengths` counts them, `valid` is True for every sample with ≥ 1 token, `rewards [P, K]` when given.
    """
    p_count, k, _ = responses.shape
    tokens = np.full((p_count, k, width), pad_id, np.int32)
    attention = np.zeros((p_count, k, width), bool)
    loss_mask = np.zeros((p_count, k, width), bool)
    lengths = response_mask.sum(-1).astype(np.int32)
    for p, prompt in enumerate(prompt_ids):
        lp = len(prompt)
        for j in range(k):
            r = responses[p, j, : lengths[p, j]]
            end = lp + len(r)
            if end > width:
                raise ValueError(f"sample_batch: prompt {p} + response {j} has {end} tokens > width {width}")
            tokens[p, j, :lp], tokens[p, j, lp:end] = prompt, r
            attention[p, j, :end] = True
            loss_mask[p, j, lp:end] = True
    batch = {
        "tokens": tokens,
        "attention_mask": attention,
        "loss_mask": loss_mask,
        "lengths": lengths,
        "valid": lengths > 0,
    }
    if rewards is not None:
        batch["rewards"] = np.asarray(rewards, np.float32)
    return batch


def prompt_for_reward(p: PromptRecord):
    """What a RewardFn receives as the prompt: the messages of a conversational prompt, else its text."""
    return [dict(m) for m in p.prompt] if p.conversational else p.prompt_text
