"""The one reward interface (`RewardFn`) and its constructors: reward functions and judges.

``reward_fn(prompts, responses) -> rewards [B, K] float32`` where ``prompts[b]`` is a list of chat messages
``{"role", "content"}`` (a plain string is one user message) and ``responses[b]`` a list of K_b response strings;
rows with fewer than K = max_b K_b responses are padded with 0 (the padded slots are not responses: the caller's
`valid` mask says so). Constructors: `reward_model_fn` (a reward model, `rpo_jax.models.reward.RewardModel`, on
the chat template of prompt + response), `judge_fn` (a Python judge on the last user message's text and the
response), `dataset_rewards_fn` (rewards already in the records; never invented).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rpo_jax.models.reward import RewardModel

Message = Mapping[str, str]
#: What scores responses: `reward_fn(prompts, responses) -> np.ndarray [B, K] float32`, `prompts[b]` a list of chat
#: messages (or a string: one user message), `responses[b]` a list of response strings (missing ones scored 0).
RewardFn = Callable[[Sequence[Sequence[Message] | str], Sequence[Sequence[str]]], np.ndarray]


def _as_messages(prompt: Sequence[Message] | str, b: int) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = []
    for i, m in enumerate(prompt):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"prompts[{b}][{i}]: expected a message dict with str 'role' and 'content', got {m!r}")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _check_batch(prompts: Sequence, responses: Sequence) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
    for b, rs in enumerate(responses):
        if isinstance(rs, str):
            raise ValueError(f"responses[{b}] is a str; expected a list of response strings")
        for k, r in enumerate(rs):
            if not isinstance(r, str):
                raise ValueError(f"responses[{b}][{k}]: expected a str, got {type(r).__name__}")


def _to_matrix(values: Sequence[Sequence[float]]) -> np.ndarray:
    """Ragged rows → [B, max K] float32, missing slots 0."""
    out = np.zeros((len(values), max((len(v) for v in values), default=0)), np.float32)
    for b, row in enumerate(values):
        out[b, : len(row)] = row
    return out


def last_user_text(prompt: Sequence[Message] | str, b: int = 0) -> str:
    """The content of the last message with role "user" (a str prompt is itself); ValueError when none."""
    users = [m["content"] for m in _as_messages(prompt, b) if m["role"] == "user"]
    if not users:
        raise ValueError(f"prompts[{b}] has no user message")
    return users[-1]


def judge_fn(judge: Callable[[str, str], float]) -> RewardFn:
    """A `RewardFn` scoring each response with a judge function.

    A non-finite or non-numeric judgement is a ValueError naming `[b][k]`.

    Args:
        judge: `judge(last user message text, response) -> float`, e.g. `rpo_jax.data.judge`.

    Returns:
        The `RewardFn`.
    """

    def reward(prompts, responses) -> np.ndarray:
        _check_batch(prompts, responses)
        rows = []
        for b, (prompt, rs) in enumerate(zip(prompts, responses)):
            text = last_user_text(prompt, b)
            row = []
            for k, r in enumerate(rs):
                value = judge(text, r)
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"judge returned {value!r} for responses[{b}][{k}]; expected a float") from None
                if not math.isfinite(value):
                    raise ValueError(f"judge returned {value} for responses[{b}][{k}]")
                row.append(value)
            rows.append(row)
        return _to_matrix(rows)

    return reward


def _prompt_key(messages: Sequence[Message]) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in messages)


def dataset_rewards_fn(records: Sequence[Any]) -> RewardFn:
    """A `RewardFn` looking up the explicit rewards of `records` by (prompt messages, response text).

    Rewards are never invented: the returned function raises ValueError (naming `[b][k]`) for a pair that no
    record holds.

    Args:
        records: `rpo_jax.data.PreferenceRecord` objects, or an object with a `records` attribute.

    Returns:
        The `RewardFn`.

    Raises:
        ValueError: for records without rewards (naming file:line) and for the same (prompt, response) carrying
            different rewards in two records.
    """
    recs = list(getattr(records, "records", records))
    if not recs:
        raise ValueError("dataset_rewards_fn: no records")
    lacking = [f"{r.source[0]}:{r.source[1]}" for r in recs if r.rewards is None]
    if lacking:
        more = f" (and {len(lacking) - 5} more)" if len(lacking) > 5 else ""
        raise ValueError(
            "dataset_rewards_fn: records without rewards (rewards are never invented): " + ", ".join(lacking[:5]) + more
        )
    table: dict[tuple, tuple[float, str]] = {}
    for r in recs:
        where = f"{r.source[0]}:{r.source[1]}"
        prompt = _prompt_key(r.prompt)
        for k, reward in enumerate(r.rewards):
            key = (prompt, r.response_text(k))
            if key in table and table[key][0] != float(reward):
                raise ValueError(
                    f"dataset_rewards_fn: response {k} of {where} has reward {reward} but the same prompt and "
                    f"response has reward {table[key][0]} at {table[key][1]}"
                )
            table.setdefault(key, (float(reward), where))

    def reward(prompts, responses) -> np.ndarray:
        _check_batch(prompts, responses)
        rows = []
        for b, (prompt, rs) in enumerate(zip(prompts, responses)):
            key_prompt = _prompt_key(_as_messages(prompt, b))
            row = []
            for k, r in enumerate(rs):
                hit = table.get((key_prompt, r))
                if hit is None:
                    raise ValueError(
                        f"responses[{b}][{k}]: no record holds a reward for this prompt and response "
                        f"(prompt {key_prompt!r}, response {r!r})"
                    )
                row.append(hit[0])
            rows.append(row)
        return _to_matrix(rows)

    return reward


@nnx.jit
def _score_batch(model: RewardModel, tokens: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return model(tokens, attention_mask)


def _bucket(length: int, max_length: int) -> int:
    """Padded length: the next power of two ≥ length (at least 16), at most max_length (fewer recompiles)."""
    return min(max(16, 1 << (max(length, 1) - 1).bit_length()), max_length)


def encode_conversation(tokenizer, prompt: Sequence[Message] | str, response: str, b: int = 0) -> list[int]:
    """Token ids of the chat template of prompt + [assistant response], as transformers reward models are used.

    No generation prompt and no extra special tokens: the template supplies them.

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        prompt: chat messages, or a string (one user message).
        response: the assistant's response text.
        b: the row index named in errors.

    Returns:
        The token ids.
    """
    messages = _as_messages(prompt, b) + [{"role": "assistant", "content": response}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def reward_model_fn(
    model: RewardModel,
    tokenizer,
    *,
    max_length: int,
    batch_size: int,
    label: int = 0,
    truncation: Literal["error", "left"] = "error",
) -> RewardFn:
    """A `RewardFn` scoring each (prompt, response) with a reward model.

    The score is `scores[:, label]` of the chat template of prompt + assistant response, right-padded with the
    model's `pad_token_id` into batches of `batch_size` rows and lengths padded to powers of two (≤ `max_length`).

    Args:
        model: a `RewardModel`.
        tokenizer: its tokenizer (with a chat template).
        max_length: the longest conversation in tokens.
        batch_size: rows per scoring batch.
        label: the score column.
        truncation: `"error"`: a longer conversation is a ValueError naming `[b][k]`; `"left"`: keep its last
            `max_length` tokens (the scored last token is kept).

    Returns:
        The `RewardFn`.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("reward_model_fn: the tokenizer has no chat_template")
    if not 0 <= label < model.num_labels:
        raise ValueError(f"reward_model_fn: label={label} but the model has {model.num_labels} labels")
    if truncation not in ("error", "left"):
        raise ValueError(f"reward_model_fn: truncation={truncation!r} is not 'error' or 'left'")
    if max_length < 1 or batch_size < 1:
        raise ValueError(f"reward_model_fn: max_length={max_length} and batch_size={batch_size} must be >= 1")
    pad = model.pad_token_id if model.pad_token_id is not None else 0

    def reward(prompts, responses) -> np.ndarray:
        _check_batch(prompts, responses)
        sequences, slots = [], []
        for b, (prompt, rs) in enumerate(zip(prompts, responses)):
            for k, r in enumerate(rs):
                ids = encode_conversation(tokenizer, prompt, r, b)
                if len(ids) > max_length:
                    if truncation == "error":
                        raise ValueError(
                            f"responses[{b}][{k}]: the conversation has {len(ids)} tokens > max_length={max_length}"
                        )
                    ids = ids[-max_length:]
                sequences.append(ids)
                slots.append((b, k))
        scores = np.zeros((len(sequences),), np.float32)
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            width = _bucket(max(len(s) for s in chunk), max_length)
            tokens = np.full((batch_size, width), pad, np.int32)
            mask = np.zeros((batch_size, width), bool)
            for i in range(batch_size):
                ids = chunk[i] if i < len(chunk) else chunk[0][:1]  # filler rows: one real token, discarded
                tokens[i, : len(ids)] = ids
                mask[i, : len(ids)] = True
            out = np.asarray(jax.device_get(_score_batch(model, jnp.asarray(tokens), jnp.asarray(mask))))
            scores[start : start + len(chunk)] = out[: len(chunk), label]
        rows = [[0.0] * len(rs) for rs in responses]
        for (b, k), s in zip(slots, scores):
            rows[b][k] = float(s)
        return _to_matrix(rows)

    return reward
