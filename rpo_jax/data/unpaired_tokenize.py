"""Tokenization of unpaired records (KTO, BCO) as TRL 1.16's ``KTOTrainer`` prepares them, into the contract batch.

Rule (TRL's ``KTOTrainer._prepare_dataset``):

* conversational records: ``prompt = chat_template(prompt, add_generation_prompt=True)`` and ``full =
  chat_template(prompt + completion)``, rendered to text and tokenized without extra special tokens (the template
  writes them);
* standard records: the EOS token's *text* is appended to a completion that does not end with it, then ``prompt =
  tok(prompt)`` and ``full = tok(prompt + completion)`` (with the tokenizer's special tokens, e.g. BOS);
* the completion's tokens are ``full[len(prompt):]``. TRL starts the completion where the two diverge when the
  prompt's tokens are not a prefix of ``full``'s (and warns once); here, as for pairs
  (:mod:`rpo_jax.data.tokenize`), that is a :class:`~rpo_jax.data.records.RecordError` naming the record (or,
  with ``on_error="skip"``, a counted skip): the cut prompt is a context the model never sees at inference;
* truncation: ``truncate_sequences`` of :mod:`rpo_jax.data.tokenize` with the run's policy; TRL's is
  ``"keep_start"`` (``prompt + completion`` keeps its first ``max_length`` tokens; a prompt of ``max_length``
  tokens or more drops the record, counted, as TRL's filter drops it).

Mismatched completions (KTO's KL reference point, ``mismatched_block`` = B ≥ 2): TRL's ``add_kl_completion_ids``
on the kept records in order, in blocks of B (its ``per_device_train_batch_size``): in each block the mismatched
completion of record ``i`` is the (untruncated) completion of record ``i − 1`` of the block, the first record taking
the block's last; the sequence ``prompt_i + completion_{i−1}`` keeps its first ``max_length`` tokens (TRL's collator
truncation), whatever the truncation policy (the sequence only estimates the reference point).

Each example of the :class:`UnpairedDataset` is the contract's K responses of one prompt: response 0 its own
completion, response 1 (with ``mismatched_block``) the mismatched one; ``collate`` adds ``labels [B]`` (True:
desirable; False on padding rows).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from rpo_jax.data.records import OnError, Problem, RecordError
from rpo_jax.data.tokenize import (
    TRUNCATION_POLICIES,
    TokenizedDataset,
    TokenizedExample,
    TokenizeReport,
    Truncation,
    check_roles,
    default_buckets,
    truncate_sequences,
)
from rpo_jax.data.unpaired import LabelBalance, UnpairedRecord, label_balance

__all__ = ["UnpairedDataset", "common_prefix_length", "encode_unpaired", "tokenize_unpaired", "mismatched_sources"]


@dataclasses.dataclass
class UnpairedDataset(TokenizedDataset):
    """Tokenized unpaired records: a :class:`~rpo_jax.data.tokenize.TokenizedDataset` whose examples hold one
    completion (K = 1) or their own and a mismatched one (K = 2), plus the records' labels.

    ``labels [N]`` bool: each record's label, by record index; ``balance``: the desirable / undesirable counts of
    the kept examples (TRL counts them after its ``max_length`` filter)."""

    labels: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), bool))
    balance: LabelBalance = LabelBalance(0, 0)

    def collate(self, positions: Sequence[int | None]) -> dict[str, np.ndarray]:
        """The contract batch (:meth:`TokenizedDataset.collate`) plus ``labels [B]`` bool (False on padding)."""
        batch = super().collate(positions)
        index = batch["index"]
        batch["labels"] = (
            np.where(index >= 0, self.labels[np.maximum(index, 0)], False)
            if len(self.labels)
            else (np.zeros(index.shape, bool))
        )
        return batch


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """The number of leading tokens ``a`` and ``b`` share (TRL's ``common_prefix_length``)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def unpaired_texts(record: UnpairedRecord, tokenizer: Any) -> tuple[list[str], bool]:
    """``([prompt_text, full_text], add_special_tokens)`` of one record (module docstring)."""
    if record.conversational:
        if not getattr(tokenizer, "chat_template", None):
            raise RecordError(
                Problem(*record.source, "prompt", "conversational record, but the tokenizer has no chat_template")
            )
        check_roles(record.source, [("prompt", record.prompt), ("completion", record.completion)], tokenizer)
        render = lambda messages, generation: tokenizer.apply_chat_template(  # noqa: E731
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation
        )
        return [render(record.prompt, True), render(record.prompt + record.completion, False)], False
    completion = record.completion_text
    eos = tokenizer.eos_token or ""
    if eos and not completion.endswith(eos):
        completion += eos
    return [record.prompt_text, record.prompt_text + completion], True


def split_completion(record: UnpairedRecord, prompt_ids: list[int], full_ids: list[int]) -> list[int]:
    """The completion's token ids ``full_ids[len(prompt_ids):]``; RecordError when the prompt's ids are not a
    prefix of ``full_ids`` or nothing follows them."""
    shared = common_prefix_length(prompt_ids, full_ids)
    if shared < len(prompt_ids):
        raise RecordError(
            Problem(
                *record.source,
                "completion",
                f"the prompt's tokens are not a prefix of prompt + completion's tokens (they differ at token "
                f"{shared}); the tokenizer merges across the boundary or the chat template renders the prompt "
                "differently alone",
            )
        )
    completion = list(full_ids[len(prompt_ids) :])
    if not completion:
        raise RecordError(Problem(*record.source, "completion", "no completion tokens after the prompt's"))
    return completion


def encode_unpaired(
    records: Sequence[UnpairedRecord], tokenizer: Any, chunk: int = 256
) -> list[tuple[list[int], list[int]] | RecordError]:
    """Untruncated ``(prompt_ids, completion_ids)`` of each record (or its RecordError), the tokenizer called once
    per chunk and special-token mode."""
    out: list[Any] = []
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        texts: list[Any] = []
        for r in part:
            try:
                texts.append(unpaired_texts(r, tokenizer))
            except RecordError as e:
                texts.append(e)
        ids: dict[int, list] = {}
        for add in (False, True):
            members = [i for i, t in enumerate(texts) if not isinstance(t, RecordError) and t[1] == add]
            if members:
                encoded = tokenizer([s for i in members for s in texts[i][0]], add_special_tokens=add)["input_ids"]
                for j, i in enumerate(members):
                    ids[i] = encoded[2 * j : 2 * j + 2]
        for i, r in enumerate(part):
            if isinstance(texts[i], RecordError):
                out.append(texts[i])
                continue
            try:
                prompt = list(ids[i][0])
                out.append((prompt, split_completion(r, prompt, list(ids[i][1]))))
            except RecordError as e:
                out.append(e)
    return out


def mismatched_sources(count: int, block: int) -> np.ndarray:
    """``[count]``: the position whose completion each position is paired with (TRL's rotation by one within each
    block of ``block`` consecutive positions: ``i − 1``, the block's first taking its last)."""
    positions = np.arange(count)
    start = positions - positions % block
    size = np.minimum(block, count - start)
    return start + (positions - start - 1) % size


def tokenize_unpaired(
    records: Sequence[UnpairedRecord],
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation: Truncation = "keep_start",
    mismatched_block: int | None = None,
    on_error: OnError = "raise",
) -> UnpairedDataset:
    """Tokenize unpaired records (module docstring) into an :class:`UnpairedDataset`.

    Args:
      records: the split (its order defines ``index`` and the mismatched pairs).
      tokenizer: a Hugging Face tokenizer with an EOS token, a pad token and, for conversational records, a chat
        template.
      max_length, max_prompt_length, truncation: as :func:`~rpo_jax.data.tokenize.tokenize_records`.
      mismatched_block: B ≥ 2: add each example's mismatched sequence (K = 2) from blocks of B kept examples;
        None: one sequence per example (K = 1).
      on_error: ``"raise"`` the first problem, or ``"skip"`` records with problems (counted, listed).

    Returns:
      The `UnpairedDataset`.
    """
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    if mismatched_block is not None and mismatched_block < 2:
        raise ValueError(
            f"mismatched_block must be >= 2 (a row's mismatched completion is another's), got {mismatched_block}"
        )
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token")
    report = TokenizeReport(num_records=len(records))
    kept: list[tuple[int, list[int], list[int], list[int]]] = []  # (index, prompt, completion kept, completion)
    for index, (record, enc) in enumerate(zip(records, encode_unpaired(records, tokenizer))):
        try:
            if isinstance(enc, RecordError):
                raise enc
            prompt, completion = enc
            report.prompt_lengths.append(len(prompt))
            report.sequence_lengths.append(len(prompt) + len(completion))
            cut = truncate_sequences(
                prompt,
                [completion],
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
        if cut is not None:
            kept.append((index, cut[0], cut[1][0], completion))
    sources = mismatched_sources(len(kept), mismatched_block) if mismatched_block else None
    examples = []
    for i, (index, prompt, completion, _) in enumerate(kept):
        sequences = [np.asarray(prompt + completion, np.int32)]
        if sources is not None:
            sequences.append(np.asarray((prompt + kept[sources[i]][3])[:max_length], np.int32))
        examples.append(TokenizedExample(index, tuple(sequences), (len(prompt),) * len(sequences), None))
    report.num_examples = len(examples)
    return UnpairedDataset(
        records=list(records),
        examples=examples,
        k_max=1 if sources is None else 2,
        buckets=default_buckets(max_length),
        pad_id=tokenizer.pad_token_id,
        max_length=max_length,
        has_rewards=False,
        report=report,
        labels=np.asarray([r.label for r in records], bool),
        balance=label_balance([records[e.index] for e in examples]),
    )
