"""Tokenization of preference records with a Hugging Face tokenizer, truncation, and bucketed [B, K, T] batches.

Rule (as in TRL):

* conversational records (message lists): ``prompt = chat_template(prompt, add_generation_prompt=True)`` and
  ``full_k = chat_template(prompt + response_k)``, both rendered to text and tokenized without extra special
  tokens (the template writes them). The prompt's tokens must be a prefix of ``full_k``'s tokens, else a
  :class:`~rpo_jax.data.records.RecordError` names the record. Response tokens are ``full_k[len(prompt):]``,
  exactly as the template ends them: nothing is appended (TRL 1.16 does the same; a template that writes the
  EOS, or an end-of-turn token, after each assistant message is what ends a response).
* standard records (plain strings): ``prompt = tok(prompt)`` (with the tokenizer's special tokens, e.g. BOS),
  ``full_k = tok(prompt + response_k)``; same prefix check; EOS appended unless the response already ends with
  it (TRL 1.16 appends the EOS text to a response that does not end with it: the same ids).

TRL 1.16 does not refuse a prompt whose tokens are not a prefix: it starts the completion where the two
diverge and trains on a prompt cut short. rpo_jax keeps the error (or, with ``on_error="skip"``, skips and
counts the record): the cut prompt is a context the model never sees at inference.

The loss mask covers the response tokens and the EOS only. Sequences longer than ``max_length`` follow the
truncation policy; prompts longer than ``max_prompt_length`` are cut from the left (policy ``drop``: dropped):

* ``"drop"``: records with a prompt over ``max_prompt_length`` or any prompt + response over ``max_length``
  are left out (counted).
* ``"truncate_prompt"``: the prompt keeps its last ``min(max_prompt_length, max_length - longest response)``
  tokens (at least one; otherwise the record is dropped, counted).
* ``"truncate_response"``: each response keeps its first ``max_length - prompt`` tokens (the EOS may go).
* ``"keep_start"``: TRL 1.16's truncation (``truncation_mode="keep_start"``, TRL's only non-deprecated mode):
  each ``prompt + response`` keeps its first ``max_length`` tokens, i.e. ``"truncate_response"``, except that a
  prompt of ``max_length`` tokens or more drops the record (counted), as TRL drops it, instead of a problem.

A prompt of ``max_length`` tokens or more (after ``max_prompt_length``) is a problem, except under
``truncate_prompt`` and ``keep_start``. Batches are padded to the smallest static length bucket that fits their
longest sequence.

Roles: a conversational record's messages must have a role of :data:`~rpo_jax.data.records.ROLES`; a ``tool``
message needs a chat template that mentions ``tool`` (the word, as in ``message['role'] == 'tool'``), else a
:class:`~rpo_jax.data.records.RecordError` names the record and message
(``data.jsonl:3: prompt[1].role: role 'tool', but the tokenizer's chat template never mentions 'tool'``; a
response's message is ``responses[k][j].role``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from rpo_jax.data.records import ROLES, Messages, OnError, PreferenceRecord, Problem, RecordError

Truncation = Literal["drop", "truncate_prompt", "truncate_response", "keep_start"]
#: How a record longer than `max_length` is handled: dropped (counted), its prompt cut from the left, its
#: responses cut from the right, or TRL 1.16's `keep_start` (the first `max_length` tokens of prompt + response).
TRUNCATION_POLICIES = ("drop", "truncate_prompt", "truncate_response", "keep_start")


def default_buckets(max_length: int, *, min_bucket: int = 16) -> tuple[int, ...]:
    """Powers of two from `min_bucket` below `max_length`, then `max_length` itself.

    >>> default_buckets(100)
    (16, 32, 64, 100)
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    out, b = [], min_bucket
    while b < max_length:
        out.append(b)
        b *= 2
    return tuple(out) + (max_length,)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ≥ `length`; ValueError when none fits."""
    for b in sorted(buckets):
        if b >= length:
            return b
    raise ValueError(f"sequence of {length} tokens exceeds the largest bucket {max(buckets)}")


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """One record's tokens: for each of its K responses, ``prompt + response (+EOS)`` and where scoring starts.

    Attributes:
      index: position of the record in the tokenized split (``TokenizedDataset.records``).
      sequences: K int32 arrays ``[n_k]``.
      prompt_lengths: K ints; tokens ``[prompt_lengths[k], n_k)`` of sequence k are scored (loss mask).
      rewards: the record's rewards or None.
    """

    index: int
    sequences: tuple[np.ndarray, ...]
    prompt_lengths: tuple[int, ...]
    rewards: tuple[float, ...] | None


@dataclasses.dataclass
class TokenizeReport:
    """Counts and every problem of :func:`tokenize_records` (token lengths are before truncation)."""

    num_records: int = 0
    num_examples: int = 0
    num_dropped: int = 0
    num_prompts_truncated: int = 0
    num_responses_truncated: int = 0
    num_skipped: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)
    prompt_lengths: list[int] = dataclasses.field(default_factory=list)
    sequence_lengths: list[int] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """One line of counts."""
        return (
            f"{self.num_examples}/{self.num_records} records kept; dropped {self.num_dropped} (too long); "
            f"prompts truncated {self.num_prompts_truncated}; responses truncated "
            f"{self.num_responses_truncated}; skipped {self.num_skipped} with problems"
        )


_TOOL_WORD = re.compile(r"\btool\b")


def template_knows_tool(tokenizer: Any) -> bool:
    """True when the tokenizer's chat template (any of them, for a dict of named templates) mentions the word
    ``tool`` (``tools`` and ``tool_calls`` do not count): the test for accepting ``tool`` messages."""
    template = getattr(tokenizer, "chat_template", None) or ""
    texts = template.values() if isinstance(template, dict) else [template]
    return any(isinstance(t, str) and _TOOL_WORD.search(t) for t in texts)


def check_roles(source: tuple[str, int], fields: Sequence[tuple[str, Messages]], tokenizer: Any) -> None:
    """Refuse a message whose role is not in ``ROLES``, or a ``tool`` message the chat template cannot render.

    Args:
      source: the record's ``(file, line)``.
      fields: ``(field, messages)`` pairs, e.g. ``[("prompt", record.prompt), ("responses[0]", ...)]``.

    Raises:
      RecordError: naming ``file:line`` and ``field[i].role``.
    """
    for field, messages in fields:
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ROLES:
                raise RecordError(
                    Problem(
                        *source,
                        f"{field}[{i}].role",
                        f"unknown role {role!r} (expected one of {', '.join(repr(r) for r in ROLES)})",
                    )
                )
            if role == "tool" and not template_knows_tool(tokenizer):
                raise RecordError(
                    Problem(
                        *source,
                        f"{field}[{i}].role",
                        "role 'tool', but the tokenizer's chat "
                        "template never mentions 'tool' (it cannot render tool messages)",
                    )
                )


def _render(tokenizer: Any, messages: Sequence[dict], *, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
    )


def record_texts(record: PreferenceRecord, tokenizer: Any) -> tuple[list[str], bool]:
    """``([prompt_text, full_text_0, ..., full_text_{K-1}], add_special_tokens)`` to tokenize for a record.

    Conversational: chat-template renderings (the template writes the special tokens, so
    ``add_special_tokens=False``). Standard: ``prompt`` and ``prompt + response_k`` (``add_special_tokens=True``).
    """
    if record.conversational:
        if not getattr(tokenizer, "chat_template", None):
            raise RecordError(
                Problem(*record.source, "prompt", "conversational record, but the tokenizer has no chat_template")
            )
        check_roles(
            record.source,
            [("prompt", record.prompt)] + [(f"responses[{k}]", r) for k, r in enumerate(record.responses)],
            tokenizer,
        )
        texts = [_render(tokenizer, record.prompt, add_generation_prompt=True)]
        texts += [_render(tokenizer, record.prompt + r, add_generation_prompt=False) for r in record.responses]
        return texts, False
    prompt_text = record.prompt_text
    return [prompt_text] + [prompt_text + record.response_text(k) for k in range(record.num_responses)], True


def split_prompt_responses(
    record: PreferenceRecord, ids: Sequence[Sequence[int]], eos_id: int
) -> tuple[list[int], list[list[int]]]:
    """From the token ids of :func:`record_texts` to ``(prompt_ids, [response_ids_k (+EOS)])``.

    Raises RecordError when the prompt's ids are not a prefix of a full sequence's ids.
    """
    prompt_ids = list(ids[0])
    responses = []
    for k, full in enumerate(ids[1:]):
        full = list(full)
        if full[: len(prompt_ids)] != prompt_ids:
            at = next(i for i, (a, b) in enumerate(zip(prompt_ids + [None], full + [None])) if a != b)
            raise RecordError(
                Problem(
                    *record.source,
                    f"responses[{k}]",
                    f"the prompt's tokens are not a prefix of prompt + response's tokens "
                    f"(they differ at token {at}); the tokenizer merges across the boundary",
                )
            )
        resp = full[len(prompt_ids) :]
        if not record.conversational and resp[-1:] != [eos_id]:
            resp = resp + [eos_id]
        responses.append(resp)
    return prompt_ids, responses


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token")
    return int(tokenizer.eos_token_id)


def encode_record(record: PreferenceRecord, tokenizer: Any) -> tuple[list[int], list[list[int]]]:
    """The untruncated `(prompt_ids, [response_ids_k (+EOS)])` of one record (rule in the module docstring).

    Args:
        record: the record.
        tokenizer: a Hugging Face tokenizer (with a chat template for conversational records).

    Returns:
        The prompt's ids and each response's ids.

    Raises:
        RecordError: when the prompt's tokens are not a prefix of prompt + response's tokens, or the record is
            conversational and the tokenizer has no chat template, or a message's role is unknown or `tool`
            without a chat template that knows it (`check_roles`).
    """
    texts, add_special_tokens = record_texts(record, tokenizer)
    ids = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return split_prompt_responses(record, ids, _eos_id(tokenizer))


def encode_prompt(prompt: Any, tokenizer: Any) -> list[int]:
    """Token ids of a prompt to generate from.

    Conversational: the chat template with the generation prompt (the template writes the special tokens).
    Standard: the prompt's text with the tokenizer's special tokens — the same ids `encode_record` gives a
    record's prompt.

    Args:
        prompt: a `PromptRecord` or `PreferenceRecord`.
        tokenizer: a Hugging Face tokenizer.

    Returns:
        The token ids.
    """
    if prompt.conversational:
        if not getattr(tokenizer, "chat_template", None):
            raise RecordError(
                Problem(*prompt.source, "prompt", "conversational record, but the tokenizer has no chat_template")
            )
        check_roles(prompt.source, [("prompt", prompt.prompt)], tokenizer)
        text, special = _render(tokenizer, prompt.prompt, add_generation_prompt=True), False
    else:
        text, special = prompt.prompt_text, True
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _encode_many(
    records: Sequence[PreferenceRecord], tokenizer: Any, eos_id: int, chunk: int = 256
) -> list[tuple[list[int], list[list[int]]] | RecordError]:
    """:func:`encode_record` for many records, calling the tokenizer once per chunk and special-token mode."""
    out: list[Any] = []
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        texts: list[tuple[list[str], bool] | RecordError] = []
        for r in part:
            try:
                texts.append(record_texts(r, tokenizer))
            except RecordError as e:
                texts.append(e)
        ids: dict[int, list[list[int]]] = {}
        for add in (False, True):
            members = [i for i, t in enumerate(texts) if not isinstance(t, RecordError) and t[1] == add]
            flat = [text for i in members for text in texts[i][0]]
            if not flat:
                continue
            encoded = tokenizer(flat, add_special_tokens=add)["input_ids"]
            pos = 0
            for i in members:
                n = len(texts[i][0])
                ids[i] = encoded[pos : pos + n]
                pos += n
        for i, r in enumerate(part):
            if isinstance(texts[i], RecordError):
                out.append(texts[i])
                continue
            try:
                out.append(split_prompt_responses(r, ids[i], eos_id))
            except RecordError as e:
                out.append(e)
    return out


def truncate_sequences(
    prompt: list[int],
    responses: list[list[int]],
    *,
    max_length: int,
    max_prompt_length: int | None,
    truncation: str,
    source: tuple[str, int],
    report: TokenizeReport,
) -> tuple[list[int], list[list[int]]] | None:
    """Apply the truncation policy (module docstring) to a prompt and its responses: ``(prompt, responses)`` as
    kept, or None when dropped (counted in ``report``). RecordError for an unusable prompt."""
    file, line = source
    longest = max(len(r) for r in responses)
    if truncation == "drop":
        if len(prompt) >= max_length:
            raise RecordError(
                Problem(
                    file,
                    line,
                    "prompt",
                    f"prompt has {len(prompt)} tokens, max_length {max_length} leaves no room for a response",
                )
            )
        if (max_prompt_length is not None and len(prompt) > max_prompt_length) or len(prompt) + longest > max_length:
            report.num_dropped += 1
            return None
        return prompt, responses
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[len(prompt) - max_prompt_length :]
        report.num_prompts_truncated += 1
        truncated_prompt = True
    else:
        truncated_prompt = False
    if truncation == "truncate_prompt":
        keep = min(len(prompt), max_length - longest)
        if keep < 1:
            report.num_dropped += 1
            return None
        if keep < len(prompt):
            prompt = prompt[len(prompt) - keep :]
            report.num_prompts_truncated += 0 if truncated_prompt else 1
        return prompt, responses
    if len(prompt) >= max_length:
        if truncation == "keep_start":
            report.num_dropped += 1
            return None
        raise RecordError(
            Problem(
                file,
                line,
                "prompt",
                f"prompt has {len(prompt)} tokens, max_length {max_length} leaves no room for a response",
            )
        )
    room = max_length - len(prompt)
    out = []
    for r in responses:
        if len(r) > room:
            report.num_responses_truncated += 1
            r = r[:room]
        out.append(r)
    return prompt, out


@dataclasses.dataclass
class TokenizedDataset:
    """Tokenized examples of one split, and everything needed to collate ``[B, K, T]`` batches.

    ``index`` in a batch is the record's position in ``records`` (``num_records`` = N of a reference log-prob
    cache ``[N, K, R]``), the same for every tokenizer applied to the same records.
    """

    records: list[PreferenceRecord]
    examples: list[TokenizedExample]
    k_max: int
    buckets: tuple[int, ...]
    pad_id: int
    max_length: int
    has_rewards: bool
    report: TokenizeReport

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_records(self) -> int:
        """N: records in the split (including records dropped or skipped at tokenization)."""
        return len(self.records)

    @property
    def max_scored_span(self) -> int:
        """The most scored tokens (loss-mask positions past token 0) in any one sequence of the split: a
        response's tokens are contiguous, so this many logit positions per sequence score all of them."""
        return max(
            (len(s) - max(p, 1) for e in self.examples for s, p in zip(e.sequences, e.prompt_lengths)), default=0
        )

    @property
    def indices(self) -> np.ndarray:
        """``[len(self)] int32``: the record index of each kept example."""
        return np.asarray([e.index for e in self.examples], np.int32)

    def collate(self, positions: Sequence[int | None]) -> dict[str, np.ndarray]:
        """The batch of examples at ``positions`` (into ``examples``; None = an all-invalid padding example).

        Returns the contract batch (B = len(positions), T = smallest bucket fitting the longest sequence):
          tokens [B,K,T] int32, attention_mask [B,K,T] bool, loss_mask [B,K,T] bool, lengths [B,K] int32,
          valid [B,K] bool, rewards [B,K] float32 (only if ``has_rewards``), index [B] int32 (-1 for padding).
        """
        return collate_examples(
            [None if p is None else self.examples[p] for p in positions],
            k_max=self.k_max,
            buckets=self.buckets,
            pad_id=self.pad_id,
            with_rewards=self.has_rewards,
        )

    def batch_for_indices(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The batch for record ``indices`` (e.g. another tokenizer's batch ``["index"]``; -1 = padding).

        Raises ValueError for an index this tokenization dropped or skipped.
        """
        where = {e.index: i for i, e in enumerate(self.examples)}
        positions: list[int | None] = []
        for idx in np.asarray(indices).tolist():
            if idx < 0:
                positions.append(None)
            elif idx in where:
                positions.append(where[idx])
            else:
                src = self.records[idx].source if 0 <= idx < len(self.records) else ("?", 0)
                raise ValueError(f"{src[0]}:{src[1]}: record {idx} was dropped or skipped by this tokenization")
        return self.collate(positions)


def collate_examples(
    examples: Sequence[TokenizedExample | None], *, k_max: int, buckets: Sequence[int], pad_id: int, with_rewards: bool
) -> dict[str, np.ndarray]:
    """Pad examples into the contract batch (see `TokenizedDataset.collate`).

    Valid slots hold `prompt + response` right-padded with `pad_id`; padded K slots and padding examples are
    all-zero tokens with `valid` False. `loss_mask[b, k, t]` is True for `prompt_len <= t < n`.

    Args:
        examples: B examples; `None` for a padding example.
        k_max: K, response slots per example.
        buckets: the static lengths T; the batch takes the smallest that fits its longest sequence.
        pad_id: the padding token id.
        with_rewards: include the `rewards [B, K]` array.

    Returns:
        `tokens`, `attention_mask`, `loss_mask` `[B, K, T]`, `lengths`, `valid` (`rewards`) `[B, K]`, `index [B]`.
    """
    batch_size = len(examples)
    longest = max((len(s) for e in examples if e is not None for s in e.sequences), default=1)
    t = bucket_for(longest, buckets)
    tokens = np.zeros((batch_size, k_max, t), np.int32)
    attention = np.zeros((batch_size, k_max, t), bool)
    loss = np.zeros((batch_size, k_max, t), bool)
    valid = np.zeros((batch_size, k_max), bool)
    rewards = np.zeros((batch_size, k_max), np.float32)
    index = np.full((batch_size,), -1, np.int32)
    for b, e in enumerate(examples):
        if e is None:
            continue
        index[b] = e.index
        for k, (seq, p) in enumerate(zip(e.sequences, e.prompt_lengths)):
            n = len(seq)
            tokens[b, k] = pad_id
            tokens[b, k, :n] = seq
            attention[b, k, :n] = True
            loss[b, k, p:n] = True
            valid[b, k] = True
        if with_rewards:
            if e.rewards is None:
                raise ValueError(f"record {e.index} has no rewards but the batch carries rewards")
            rewards[b, : len(e.rewards)] = e.rewards
    batch = {
        "tokens": tokens,
        "attention_mask": attention,
        "loss_mask": loss,
        "lengths": loss.sum(-1).astype(np.int32),
        "valid": valid,
        "index": index,
    }
    if with_rewards:
        batch["rewards"] = rewards
    return batch


def tokenize_records(
    records: Sequence[PreferenceRecord],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: Truncation = "drop",
    buckets: Sequence[int] | None = None,
    k_max: int | None = None,
    pad_id: int | None = None,
    on_error: OnError = "raise",
) -> TokenizedDataset:
    """Tokenize a split of records into a `TokenizedDataset`.

    Args:
        records: the split (its order defines `index`).
        tokenizer: a Hugging Face tokenizer (`transformers.AutoTokenizer`), with an EOS token, a pad token (or
            `pad_id`) and, for conversational records, a chat template.
        max_length: the longest `prompt + response` in tokens.
        max_prompt_length: the longest prompt (`None`: only `max_length` applies).
        truncation: `"drop"` | `"truncate_prompt"` | `"truncate_response"` | `"keep_start"` (module docstring).
        buckets: static sequence lengths T (default `default_buckets`); the largest must be ≥ `max_length`.
        k_max: K of every batch (default: the largest K among kept records); padded slots are invalid.
        pad_id: overrides `tokenizer.pad_token_id`.
        on_error: `"raise"` the first problem (`RecordError` naming file, line, field) or `"skip"` records with
            problems (counted in `report.num_skipped`, listed in `report.problems`).

    Returns:
        The `TokenizedDataset` (its `report` counts kept, dropped, truncated and skipped records).
    """
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_prompt_length is not None and not 1 <= max_prompt_length < max_length:
        raise ValueError(f"max_prompt_length must be in [1, max_length), got {max_prompt_length}")
    buckets = tuple(sorted(buckets)) if buckets is not None else default_buckets(max_length)
    if max(buckets) < max_length:
        raise ValueError(f"the largest bucket {max(buckets)} is below max_length {max_length}")
    pad = tokenizer.pad_token_id if pad_id is None else pad_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token or pass pad_id")
    report = TokenizeReport(num_records=len(records))
    examples: list[TokenizedExample] = []
    encoded = _encode_many(records, tokenizer, _eos_id(tokenizer))
    for index, (record, enc) in enumerate(zip(records, encoded)):
        try:
            if isinstance(enc, RecordError):
                raise enc
            prompt, responses = enc
            report.prompt_lengths.append(len(prompt))
            report.sequence_lengths += [len(prompt) + len(r) for r in responses]
            cut = truncate_sequences(
                prompt,
                responses,
                max_length=max_length,
                max_prompt_length=max_prompt_length,
                truncation=truncation,
                source=record.source,
                report=report,
            )
        except RecordError as e:
            if on_error == "raise":
                raise
            report.num_skipped += 1
            report.problems.append(e.problem)
            continue
        if cut is None:
            continue
        prompt, responses = cut
        examples.append(
            TokenizedExample(
                index=index,
                sequences=tuple(np.asarray(prompt + r, np.int32) for r in responses),
                prompt_lengths=(len(prompt),) * len(responses),
                rewards=record.rewards,
            )
        )
    report.num_examples = len(examples)
    largest_k = max((len(e.sequences) for e in examples), default=2)
    if k_max is None:
        k_max = largest_k
    elif k_max < largest_k:
        raise ValueError(f"k_max={k_max} but a record has {largest_k} responses")
    has_rewards = bool(examples) and all(e.rewards is not None for e in examples)
    return TokenizedDataset(
        records=list(records),
        examples=examples,
        k_max=k_max,
        buckets=buckets,
        pad_id=pad,
        max_length=max_length,
        has_rewards=has_rewards,
        report=report,
    )
