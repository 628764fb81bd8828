"""Unpaired preference records — one completion labelled desirable or undesirable — for KTO and BCO.

TRL's *unpaired preference* format, standard or conversational, from every source :mod:`rpo_jax.data.records`
reads (``.jsonl``, ``.jsonl.gz``, ``.parquet``, ``.arrow``, directories, Hugging Face ``datasets``)::

    {"prompt": "The sky is", "completion": " blue.", "label": true}
    {"prompt": [{"role": "user", "content": "..."}], "completion": [{"role": "assistant", "content": "..."}],
     "label": false}

Validated like paired records, one problem per line as ``file:line: field: message``: a missing or empty
``prompt``/``completion`` (``completion: empty``), a ``completion`` of the other kind than its prompt, and a
``label`` that is missing or not a JSON boolean (``"true"``, ``1`` and ``null`` are refused, never guessed).
Nothing is dropped silently: ``on_error="skip"`` counts and lists every problem (:class:`~rpo_jax.data.problems.
ReadReport`).

Paired files become unpaired on request (``unpair=True``, or :func:`unpair_records`) exactly as TRL's
``unpair_preference_dataset``: each labelled pair (TRL's formats, NeMo's) gives a desirable record (the chosen
response) and an undesirable one (the rejected), with the pair's prompt; in TRL's order, which KTO's mismatched
KL pairs depend on: ``datasets.map(batched=True)`` takes the rows in blocks of 1000 and emits each block's chosen
completions, then its rejected ones. Scores (``score_chosen`` ...) are not carried: no unpaired loss reads them.
K-response records have no chosen/rejected label and are refused.

Balance: :func:`label_balance` counts desirable and undesirable records; :func:`kto_weight_advice` returns the
warning TRL's ``KTOTrainer`` logs when the counts and ``desirable_weight``/``undesirable_weight`` are outside the
KTO paper's range (arXiv:2402.01306, Eq. 8: ``λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]``), with TRL's arithmetic (counts
clamped at 1, bounds rounded to 2 decimals); :func:`one_class_warning` says when a file holds one label only —
TRL trains on it (it only logs that imbalance warning), so this is a warning too, not an error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from rpo_jax.data.records import (
    PAIR_FORMATS,
    FieldProblems,
    Messages,
    OnError,
    PreferenceRecord,
    Problem,
    ReadReport,
    Source,
    detect_format,
    iter_raw,
    parse_messages,
    read_sources,
    record_problems,
    type_name,
)

__all__ = [
    "UNPAIRED_FORMAT",
    "TRL_MAP_BATCH_SIZE",
    "UnpairedRecord",
    "LabelBalance",
    "is_unpaired_object",
    "parse_unpaired",
    "read_unpaired_records",
    "unpair_records",
    "label_balance",
    "kto_weight_advice",
    "one_class_warning",
]

UNPAIRED_FORMAT = "unpaired"
#: ``datasets.Dataset.map``'s default batch size: the block size of TRL's ``unpair_preference_dataset``.
TRL_MAP_BATCH_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class UnpairedRecord:
    """One prompt with one completion and its label.

    Attributes:
      prompt: chat messages; a plain-string prompt becomes one user message.
      completion: the completion's (assistant) messages; a plain string becomes one assistant message.
      label: True for a desirable completion, False for an undesirable one (TRL's ``label``).
      conversational: True when the source used message lists (tokenize with the chat template).
      source: ``(file, line)`` of the record — of the pair it came from, for an unpaired pair.
    """

    prompt: Messages
    completion: Messages
    label: bool
    conversational: bool
    source: tuple[str, int] = ("<memory>", 0)

    @property
    def prompt_text(self) -> str:
        """The content of the prompt's messages joined by newlines."""
        return "\n".join(m["content"] for m in self.prompt)

    @property
    def completion_text(self) -> str:
        """The content of the completion's messages joined by newlines."""
        return "\n".join(m["content"] for m in self.completion)


def is_unpaired_object(obj: Any) -> bool:
    """Whether a decoded JSON object looks like an unpaired record (it has ``completion`` or ``label``)."""
    return isinstance(obj, Mapping) and ("completion" in obj or "label" in obj)


def _field(obj: Mapping[str, Any], field: str) -> Any:
    if field not in obj:
        raise FieldProblems([(field, "missing field")])
    return obj[field]


def _label(obj: Mapping[str, Any]) -> bool:
    value = _field(obj, "label")
    if not isinstance(value, bool):
        raise FieldProblems([("label", f"expected true or false (a boolean), got {type_name(value)} {value!r}")])
    return value


def parse_unpaired(obj: Any, source: tuple[str, int]) -> UnpairedRecord | list[Problem]:
    """The :class:`UnpairedRecord` of one decoded JSON object, or every problem found in it."""
    file, line = source
    if not isinstance(obj, Mapping):
        return [Problem(file, line, "<record>", f"expected a JSON object, got {type_name(obj)}")]
    problems: list[tuple[str, str]] = []
    prompt = completion = label = None
    conversational = False
    try:
        prompt, conversational = parse_messages(_field(obj, "prompt"), "prompt", default_role="user")
    except FieldProblems as e:
        problems += e.problems
    try:
        raw = _field(obj, "completion")
        if isinstance(obj.get("prompt"), (list, tuple)) and isinstance(raw, str):
            raise FieldProblems([("completion", "expected a list of messages (the prompt is a list of messages)")])
        string_prompt = isinstance(obj.get("prompt"), str)
        completion, _ = parse_messages(raw, "completion", default_role="assistant", require_str=string_prompt)
    except FieldProblems as e:
        problems += e.problems
    try:
        label = _label(obj)
    except FieldProblems as e:
        problems += e.problems
    if problems:
        return [Problem(file, line, field, message) for field, message in problems]
    return UnpairedRecord(prompt, completion, label, conversational, (file, line))


@dataclasses.dataclass(frozen=True)
class _Pair:
    """A labelled pair read with ``unpair=True``, unpaired after reading (TRL's block order)."""

    record: PreferenceRecord


def _items(source: Source, unpair: bool) -> Iterator[tuple[str | None, Any]]:
    """``(format, UnpairedRecord | _Pair | problems)`` per row; a source is unpaired or paired by its first
    object, and a row of the other kind is a problem."""
    kind = None
    for line, obj, problem in iter_raw(source):
        where = (source.name, line)
        if problem is not None:
            yield kind, [problem]
            continue
        if kind is None and isinstance(obj, Mapping):
            kind = UNPAIRED_FORMAT if is_unpaired_object(obj) else "paired"
        if kind == "paired":
            if is_unpaired_object(obj):
                yield kind, [Problem(*where, "<record>", "an unpaired record in a file of pairs")]
            else:
                yield kind, _pair_item(obj, where, unpair)
        elif isinstance(obj, Mapping) and not is_unpaired_object(obj) and _is_pair(obj):
            yield kind, [Problem(*where, "<record>", "a paired record in a file of unpaired records")]
        else:
            yield kind, parse_unpaired(obj, where)


def _is_pair(obj: Mapping[str, Any]) -> bool:
    try:
        detect_format(obj)
    except ValueError:
        return False
    return True


def _pair_item(obj: Any, where: tuple[str, int], unpair: bool) -> _Pair | list[Problem]:
    try:
        fmt = detect_format(obj)
    except ValueError as e:
        return [Problem(*where, "<record>", str(e))]
    if fmt not in PAIR_FORMATS:
        return [Problem(*where, "<record>", f"a {fmt} record has no chosen/rejected label to unpair")]
    if not unpair:
        return [
            Problem(
                *where,
                "<record>",
                f"a paired record ({fmt}); pass unpair=True (rpo-data validate --unpair) to read each pair as a "
                "desirable and an undesirable record, as TRL's unpair_preference_dataset",
            )
        ]
    parsed = record_problems(obj, "trl" if fmt.startswith("trl_") and fmt != "trl_implicit" else fmt, where)
    return _Pair(parsed) if isinstance(parsed, PreferenceRecord) else parsed


def unpair_records(
    records: Sequence[PreferenceRecord], *, batch_size: int = TRL_MAP_BATCH_SIZE
) -> list[UnpairedRecord]:
    """TRL's ``unpair_preference_dataset`` on labelled pairs: per block of ``batch_size`` pairs, every chosen
    response (label True), then every rejected one (label False), each with its pair's prompt and source.

    Args:
        records: labelled pairs.
        batch_size: TRL's `map` batch size (the block).

    Returns:
        The unpaired records.

    Raises:
        ValueError: a record that is not a labelled pair (K-response records, pairs built from rewards).
    """
    for r in records:
        if not (r.labelled and r.num_responses == 2):
            raise ValueError(
                f"{r.source[0]}:{r.source[1]}: <record>: only labelled pairs (TRL / NeMo formats) can be unpaired"
            )
    out: list[UnpairedRecord] = []
    for start in range(0, len(records), batch_size):
        block = records[start : start + batch_size]
        for k, label in ((0, True), (1, False)):
            out += [UnpairedRecord(r.prompt, r.responses[k], label, r.conversational, r.source) for r in block]
    return out


def read_unpaired_records(
    paths: Any,
    *,
    unpair: bool = False,
    on_error: OnError = "raise",
    split: str | None = None,
    batch_size: int = TRL_MAP_BATCH_SIZE,
) -> tuple[list[UnpairedRecord], ReadReport]:
    """Read unpaired records (and, with ``unpair=True``, labelled pairs as two records each).

    Args:
      paths: what :func:`~rpo_jax.data.records.read_records` reads (files, directories, Hugging Face datasets).
      unpair: read paired sources too, each pair as a desirable and an undesirable record (:func:`unpair_records`;
        consecutive pairs in read order form TRL's blocks of ``batch_size``). Without it a pair is a problem.
      on_error: ``"raise"``: the first problem raises :class:`~rpo_jax.data.problems.RecordError` (``file:line:
        field: message``); ``"skip"``: bad records are counted and listed in the report, and
        :class:`~rpo_jax.data.problems.NoRecordsError` when none is left.
      split: the split of a ``DatasetDict`` without one in its path.

    Returns:
      ``(records, report)`` in source order; ``report.formats`` names each source ``unpaired`` or ``paired``;
      ``report.num_records`` counts the records returned (two per unpaired pair).
    """
    items, report = read_sources(paths, on_error, lambda s: _items(s, unpair), (UnpairedRecord, _Pair), split=split)
    out: list[UnpairedRecord] = []
    run: list[PreferenceRecord] = []
    for item in [*items, None]:
        if isinstance(item, _Pair):
            run.append(item.record)
            continue
        out += unpair_records(run, batch_size=batch_size)
        run = []
        if item is not None:
            out.append(item)
    report.num_records = len(out)
    return out, report


@dataclasses.dataclass(frozen=True)
class LabelBalance:
    """How many records are desirable and undesirable."""

    desirable: int
    undesirable: int

    @property
    def total(self) -> int:
        return self.desirable + self.undesirable

    def summary(self) -> str:
        """``desirable 6, undesirable 2 (75.0% desirable)``."""
        share = 100.0 * self.desirable / self.total if self.total else 0.0
        return f"desirable {self.desirable}, undesirable {self.undesirable} ({share:.1f}% desirable)"


def label_balance(records: Sequence[UnpairedRecord]) -> LabelBalance:
    """The desirable / undesirable counts of unpaired records.

    Args:
        records: the records.

    Returns:
        A `LabelBalance`.
    """
    desirable = sum(1 for r in records if r.label)
    return LabelBalance(desirable, len(records) - desirable)


def kto_weight_advice(
    balance: LabelBalance, *, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> str | None:
    """The warning TRL 1.16's ``KTOTrainer`` logs for this balance and these weights, or None when it logs none.

    As TRL (``_prepare_dataset``): ``n_D = max(desirable, 1)``, ``n_U = max(total − n_D, 1)``; no advice when
    ``n_D = n_U``; else the KTO paper's range ``λ_D n_D / (λ_U n_U) ∈ [1, 4/3]`` (arXiv:2402.01306, Eq. 8) solved
    for each weight, bounds rounded to 2 decimals, and the advice when *neither* weight is inside its bounds.

    Args:
        balance: the label balance.
        desirable_weight: λ_D.
        undesirable_weight: λ_U.

    Returns:
        The warning text, or `None`.
    """
    n_desirable = max(balance.desirable, 1)
    n_undesirable = max(balance.total - n_desirable, 1)
    if n_desirable == n_undesirable:
        return None
    desirable_low = round((n_undesirable * undesirable_weight / n_desirable) * 1, 2)
    desirable_high = round((n_undesirable * undesirable_weight / n_desirable) * 1.33, 2)
    undesirable_low = round((n_desirable * desirable_weight / n_undesirable) / 1.33, 2)
    undesirable_high = round((n_desirable * desirable_weight / n_undesirable) / 1, 2)
    if desirable_low <= desirable_weight <= desirable_high or undesirable_low <= undesirable_weight <= undesirable_high:
        return None
    return (
        "You have different amounts of desirable/positive and undesirable/negative examples but the weights on the "
        "desirable and undesirable losses don't seem to be in an ideal range. Based on your data, we recommend "
        f"EITHER desirable_weight in [{desirable_low}, {desirable_high}] or undesirable_weight in "
        f"[{undesirable_low}, {undesirable_high}] (but NOT BOTH). See the documentation on how to optimally set "
        "these weights."
    )


def one_class_warning(balance: LabelBalance) -> str | None:
    """A warning when every record has the same label.

    Args:
        balance: the label balance.

    Returns:
        The warning text, or `None` (also for no record at all).
    """
    if balance.total == 0 or (balance.desirable and balance.undesirable):
        return None
    label, other = ("desirable", "undesirable") if balance.desirable else ("undesirable", "desirable")
    return (
        f"all {balance.total} records are {label} and none is {other}: KTO and BCO train on them (TRL only warns), "
        f"but only the {label} term of the loss ever applies"
    )
