"""Preference records: one canonical schema, every common on-disk format, validation with file/line/field.

A *record* is one prompt with K >= 2 responses and (optionally) one explicit reward per response:

    PreferenceRecord(prompt=({"role": "user", "content": "..."},),
                     responses=(({"role": "assistant", "content": "..."},), ...),   # K responses
                     rewards=(r_1, ..., r_K) | None,
                     conversational=True | False,
                     source=("file.jsonl", line))

Formats (auto-detected per file from the keys of its first JSON object, or declared with ``format=``):

* ``trl_standard``       ``{"prompt": str, "chosen": str, "rejected": str}``
* ``trl_conversational`` ``{"prompt": [msg...], "chosen": [msg...], "rejected": [msg...]}``
* ``trl_implicit``       ``{"chosen": [msg...], "rejected": [msg...]}``; prompt = longest common message prefix
* ``nemo``               ``{"prompt": str, "chosen_response": str, "rejected_response": str,
                           "chosen_reward": float, "rejected_reward": float}`` (rewards optional, both or none)
* ``k_responses``        ``{"prompt": str | [msg...], "responses": [str | [msg...], ...], "rewards": [float, ...]}``

TRL formats may carry UltraFeedback-style ``score_chosen`` / ``score_rejected`` (both or none) as rewards.
For pairs, response 0 is *chosen* and response 1 *rejected*: the label, kept whatever the scores say
(``labelled=True``; :mod:`rpo_jax.data.selection` counts ties and label/score disagreements and decides, with
``data.pairs_from``, whether a loss sees the labels or the scores). Rewards are never invented: a record without
rewards has ``rewards=None`` and :func:`rpo_jax.data.selection.require_rewards` refuses it before a reward-aware
loss trains on it. Prompts alone are read by :mod:`rpo_jax.data.prompts` with the public helpers here.

Sources (:mod:`rpo_jax.data.sources`): ``.jsonl``, ``.jsonl.gz``, ``.parquet``, ``.arrow``, directories of shards,
Hugging Face ``datasets`` (objects, and ``save_to_disk`` directories; a ``DatasetDict``'s split as ``DIR:split``,
``DIR/split`` or ``split=``). JSON objects are strict: a repeated key is a problem, never "last one wins".

Chat roles: every message's ``role`` is one of :data:`ROLES` (``system``, ``user``, ``assistant``, ``tool``),
exactly; anything else (``"usr"``, ``"bot"``, ``""``) is a problem naming the field (``prompt[0].role``).
``tool`` messages are accepted here and checked at tokenization: a tokenizer whose chat template never mentions
``tool`` refuses them (:mod:`rpo_jax.data.tokenize`).

With ``on_error="skip"``, a read that leaves no record at all raises :class:`NoRecordsError` (a ValueError:
``a.jsonl: all 12 records were skipped (first problems: a.jsonl:1: prompt: missing field; ...)``) instead of
returning an empty list.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from rpo_jax.data.problems import (
    FieldProblems,
    NoRecordsError,
    OnError,
    Problem,
    ReadReport,
    RecordError,
    no_records_message,
    type_name,
)
from rpo_jax.data.sources import Source, as_source, expand_sources, iter_raw, resolve_sources

__all__ = [
    "FORMATS",
    "PAIR_FORMATS",
    "ROLES",
    "FieldProblems",
    "Message",
    "Messages",
    "NoRecordsError",
    "OnError",
    "PreferenceRecord",
    "Problem",
    "ReadReport",
    "RecordError",
    "Source",
    "detect_format",
    "expand_sources",
    "iter_file_records",
    "iter_raw",
    "no_records_message",
    "parse_messages",
    "parse_record",
    "read_records",
    "read_sources",
    "record_problems",
    "resolve_sources",
    "type_name",
]

Message = dict[str, str]
Messages = tuple[Message, ...]

#: The on-disk record formats `read_records` reads (detected from a record's keys, or declared with `format=`).
FORMATS = ("trl_standard", "trl_conversational", "trl_implicit", "nemo", "k_responses")
#: Formats whose two responses are labelled chosen / rejected (``PreferenceRecord.labelled``).
PAIR_FORMATS = ("trl_standard", "trl_conversational", "trl_implicit", "nemo")
_FORMAT_ALIASES = {
    "trl": "trl",
    "standard": "trl_standard",
    "conversational": "trl_conversational",
    "implicit": "trl_implicit",
    "implicit_prompt": "trl_implicit",
    "nemo_aligner": "nemo",
    "k": "k_responses",
    "responses": "k_responses",
}
#: The chat roles a message may have (``tool`` only with a chat template that knows it; see the docstring).
ROLES = ("system", "user", "assistant", "tool")


# ----------------------------------------------------------------------------------------------------------
# Canonical record and problems
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PreferenceRecord:
    """One prompt with K >= 2 responses.

    Attributes:
      prompt: the prompt as chat messages ``({"role", "content"}, ...)``; a plain-string prompt becomes one
        user message.
      responses: K responses, each a tuple of (assistant) messages; plain strings become one assistant message.
      rewards: K explicit rewards (finite floats), or None when the source has none. Never invented.
      conversational: True when the source used message lists (tokenize with the chat template); False for
        plain strings (tokenize ``prompt + response + EOS``).
      source: ``(file, line)`` the record came from (line is 1-based; the row number for Parquet, Arrow and
        Hugging Face datasets, whose "file" is the name :mod:`rpo_jax.data.sources` gives them).
      labelled: True for a *pair format* (``trl_*``, ``nemo``), whose order is a label: response 0 was chosen
        over response 1, whatever its scores say. False for K-response records (their order means nothing; only
        rewards rank them) and for pairs derived from rewards (:func:`rpo_jax.data.selection.to_pairs`).
    """

    prompt: Messages
    responses: tuple[Messages, ...]
    rewards: tuple[float, ...] | None
    conversational: bool
    source: tuple[str, int] = ("<memory>", 0)
    labelled: bool = False

    @property
    def num_responses(self) -> int:
        """K, the number of responses."""
        return len(self.responses)

    @property
    def prompt_text(self) -> str:
        """The prompt's text: the content of its messages joined by newlines (its only message, usually)."""
        return "\n".join(m["content"] for m in self.prompt)

    def response_text(self, k: int) -> str:
        """The text of response ``k`` (its messages' contents joined by newlines)."""
        return "\n".join(m["content"] for m in self.responses[k])

    def content_key(self) -> tuple:
        """Everything but ``source``: equal for the same content read from different formats or files."""
        return (_freeze(self.prompt), _freeze(self.responses), self.rewards, self.conversational)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (the TFDS builder stores this as text); inverse of :meth:`from_json`."""
        return {
            "prompt": [dict(m) for m in self.prompt],
            "responses": [[dict(m) for m in r] for r in self.responses],
            "rewards": None if self.rewards is None else list(self.rewards),
            "conversational": self.conversational,
            "source": [self.source[0], self.source[1]],
            "labelled": self.labelled,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "PreferenceRecord":
        """Rebuild a record written by :meth:`to_json` (trusted input: no validation beyond types)."""
        return cls(
            prompt=tuple(dict(m) for m in obj["prompt"]),
            responses=tuple(tuple(dict(m) for m in r) for r in obj["responses"]),
            rewards=None if obj["rewards"] is None else tuple(float(x) for x in obj["rewards"]),
            conversational=bool(obj["conversational"]),
            source=(str(obj["source"][0]), int(obj["source"][1])),
            labelled=bool(obj.get("labelled", False)),
        )  # written before labels were kept: unlabelled


def _freeze(x: Any) -> Any:
    if isinstance(x, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x


# ----------------------------------------------------------------------------------------------------------
# Field parsers (each raises FieldProblems with (field, message))
# ----------------------------------------------------------------------------------------------------------


def _get(obj: Mapping[str, Any], field: str) -> Any:
    if field not in obj:
        raise FieldProblems([(field, "missing field")])
    return obj[field]


def _is_empty_text(s: str) -> bool:
    return not s.strip()


def parse_messages(
    value: Any, field: str, *, default_role: str | None, require_str: bool = False
) -> tuple[Messages, bool]:
    """A string (-> one message of ``default_role``) or a list of ``{"role", "content"}`` dicts.

    Returns (messages, was_conversational). Empty strings / lists / all-blank contents are problems.

    Raises:
      FieldProblems: naming ``field`` (or a sub-field such as ``prompt[0].role``).
    """
    if require_str and not isinstance(value, str):
        raise FieldProblems([(field, f"expected str (the prompt is a string), got {type_name(value)}")])
    if isinstance(value, str):
        if default_role is None:
            raise FieldProblems([(field, "expected a list of messages, got str")])
        if _is_empty_text(value):
            raise FieldProblems([(field, "empty")])
        return ({"role": default_role, "content": value},), False
    if not isinstance(value, (list, tuple)):
        raise FieldProblems([(field, f"expected a string or a list of messages, got {type_name(value)}")])
    if not value:
        raise FieldProblems([(field, "empty")])
    messages = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, Mapping):
            raise FieldProblems([(where, f"expected a message {{role, content}}, got {type_name(m)}")])
        for key in ("role", "content"):
            if key not in m:
                raise FieldProblems([(f"{where}.{key}", "missing field")])
            if not isinstance(m[key], str):
                raise FieldProblems([(f"{where}.{key}", f"expected str, got {type_name(m[key])}")])
        if m["role"] not in ROLES:
            raise FieldProblems(
                [(f"{where}.role", f"unknown role {m['role']!r} (expected one of {', '.join(repr(r) for r in ROLES)})")]
            )
        messages.append({"role": m["role"], "content": m["content"]})
    if all(_is_empty_text(m["content"]) for m in messages):
        raise FieldProblems([(field, "empty")])
    return tuple(messages), True


def _parse_reward(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldProblems([(field, f"expected a number, got {type_name(value)}")])
    value = float(value)
    if not math.isfinite(value):
        raise FieldProblems([(field, f"reward is not finite ({value})")])
    return value


def _optional_reward_pair(obj: Mapping[str, Any], chosen_key: str, rejected_key: str) -> tuple[float, float] | None:
    has = [k in obj and obj[k] is not None for k in (chosen_key, rejected_key)]
    if not any(has):
        return None
    if not all(has):
        missing = rejected_key if has[0] else chosen_key
        raise FieldProblems([(missing, f"missing field (both {chosen_key} and {rejected_key}, or neither)")])
    problems, values = [], []
    for key in (chosen_key, rejected_key):
        try:
            values.append(_parse_reward(obj[key], key))
        except FieldProblems as e:
            problems += e.problems
    if problems:
        raise FieldProblems(problems)
    return values[0], values[1]


def _check_distinct(responses: Sequence[Messages], field: str, names: Sequence[str] | None = None) -> None:
    seen: dict[Any, int] = {}
    for k, r in enumerate(responses):
        key = _freeze(r)
        if key in seen:
            if names is not None:
                raise FieldProblems([(field, f"{names[seen[key]]} and {names[k]} are identical")])
            raise FieldProblems([(field, f"responses {seen[key]} and {k} are identical")])
        seen[key] = k


def _collect(parsers: Sequence[tuple[str, Any]]) -> list[Any]:
    """Run each parser thunk, collecting every problem rather than stopping at the first."""
    out, problems = [], []
    for _, thunk in parsers:
        try:
            out.append(thunk())
        except FieldProblems as e:
            problems += e.problems
            out.append(None)
    if problems:
        raise FieldProblems(problems)
    return out


def _parse_trl(obj: Mapping[str, Any], *, want: str | None) -> tuple:
    """TRL standard (strings) or conversational (message lists) with an explicit prompt."""
    prompt_raw = _get(obj, "prompt")
    if not isinstance(prompt_raw, (str, list, tuple)):
        raise FieldProblems([("prompt", f"expected a string or a list of messages, got {type_name(prompt_raw)}")])
    conv = not isinstance(prompt_raw, str)
    if want == "trl_standard" and conv:
        raise FieldProblems([("prompt", f"expected str (trl_standard), got {type_name(prompt_raw)}")])
    if want == "trl_conversational" and not conv:
        raise FieldProblems([("prompt", "expected a list of messages (trl_conversational), got str")])
    role = None if conv else "assistant"  # standard: responses must be strings, like the prompt

    def response(field: str) -> tuple[Messages, bool]:
        return parse_messages(_get(obj, field), field, default_role=role, require_str=not conv)

    (prompt, _), (chosen, _), (rejected, _), rewards = _collect(
        [
            ("prompt", lambda: parse_messages(prompt_raw, "prompt", default_role="user")),
            ("chosen", lambda: response("chosen")),
            ("rejected", lambda: response("rejected")),
            ("score", lambda: _optional_reward_pair(obj, "score_chosen", "score_rejected")),
        ]
    )
    _check_distinct([chosen, rejected], "rejected", names=("chosen", "rejected"))
    return prompt, (chosen, rejected), rewards, conv


def _parse_trl_implicit(obj: Mapping[str, Any]) -> tuple:
    """TRL implicit prompt: ``chosen``/``rejected`` conversations; prompt = their longest common prefix."""
    if "prompt" in obj:
        raise FieldProblems([("prompt", "implicit-prompt records carry no prompt field")])
    (chosen, _), (rejected, _), rewards = _collect(
        [
            ("chosen", lambda: parse_messages(_get(obj, "chosen"), "chosen", default_role=None)),
            ("rejected", lambda: parse_messages(_get(obj, "rejected"), "rejected", default_role=None)),
            ("score", lambda: _optional_reward_pair(obj, "score_chosen", "score_rejected")),
        ]
    )
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise FieldProblems([("chosen", "chosen and rejected share no prompt prefix (implicit prompt)")])
    if n == len(chosen) and n == len(rejected):
        raise FieldProblems([("rejected", "chosen and rejected are identical")])
    if n == len(chosen) or n == len(rejected):
        field = "chosen" if n == len(chosen) else "rejected"
        raise FieldProblems([(field, "empty (the whole conversation is the shared prompt)")])
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    for field, msgs in (("chosen", c), ("rejected", r)):
        if all(_is_empty_text(m["content"]) for m in msgs):
            raise FieldProblems([(field, "empty")])
    return prompt, (c, r), rewards, True


def _parse_nemo(obj: Mapping[str, Any]) -> tuple:
    """NeMo-Aligner DPO/RPO: prompt, chosen_response, rejected_response (+ both rewards, or neither)."""
    (prompt, conv), (chosen, _), (rejected, _), rewards = _collect(
        [
            ("prompt", lambda: parse_messages(_get(obj, "prompt"), "prompt", default_role="user")),
            (
                "chosen_response",
                lambda: parse_messages(_get(obj, "chosen_response"), "chosen_response", default_role="assistant"),
            ),
            (
                "rejected_response",
                lambda: parse_messages(_get(obj, "rejected_response"), "rejected_response", default_role="assistant"),
            ),
            ("reward", lambda: _optional_reward_pair(obj, "chosen_reward", "rejected_reward")),
        ]
    )
    _check_distinct([chosen, rejected], "rejected_response", names=("chosen_response", "rejected_response"))
    return prompt, (chosen, rejected), rewards, conv


def _parse_k(obj: Mapping[str, Any]) -> tuple:
    """K responses: prompt, responses (list, K >= 2), rewards (list of K numbers, optional)."""
    prompt_raw = _get(obj, "prompt")
    responses_raw = _get(obj, "responses")
    problems: list[tuple[str, str]] = []
    prompt, conv = None, False
    try:
        prompt, conv = parse_messages(prompt_raw, "prompt", default_role="user")
    except FieldProblems as e:
        problems += e.problems
    responses: list[Messages] = []
    if not isinstance(responses_raw, (list, tuple)):
        problems.append(("responses", f"expected a list, got {type_name(responses_raw)}"))
    else:
        if len(responses_raw) < 2:
            problems.append(("responses", f"fewer than 2 responses ({len(responses_raw)})"))
        for k, r in enumerate(responses_raw):
            try:
                responses.append(parse_messages(r, f"responses[{k}]", default_role="assistant")[0])
            except FieldProblems as e:
                problems += e.problems
    rewards = None
    if obj.get("rewards") is not None:
        rewards_raw = obj["rewards"]
        if not isinstance(rewards_raw, (list, tuple)):
            problems.append(("rewards", f"expected a list of numbers, got {type_name(rewards_raw)}"))
        else:
            values = []
            for k, v in enumerate(rewards_raw):
                try:
                    values.append(_parse_reward(v, f"rewards[{k}]"))
                except FieldProblems as e:
                    problems += e.problems
            if isinstance(responses_raw, (list, tuple)) and len(rewards_raw) != len(responses_raw):
                problems.append(("rewards", f"{len(rewards_raw)} rewards for {len(responses_raw)} responses"))
            rewards = tuple(values)
    if problems:
        raise FieldProblems(problems)
    _check_distinct(responses, "responses")
    return prompt, tuple(responses), rewards, conv


def detect_format(obj: Mapping[str, Any]) -> str:
    """The format of one JSON object, from its keys (see the module docstring). ValueError if none fits (saying so
    for an unpaired record, `{prompt, completion, label}`: `rpo_jax.data.unpaired` reads those).

    Args:
        obj: one decoded record.

    Returns:
        One of `FORMATS`.
    """
    if "responses" in obj:
        return "k_responses"
    if "chosen_response" in obj or "rejected_response" in obj:
        return "nemo"
    if "chosen" in obj or "rejected" in obj:
        if "prompt" not in obj:
            return "trl_implicit"
        return "trl_standard" if isinstance(obj["prompt"], str) else "trl_conversational"
    if "completion" in obj or "label" in obj:
        raise ValueError(
            f"an unpaired record (keys {sorted(obj)}): read it with rpo_jax.data.read_unpaired_records "
            "(rpo-data validate detects unpaired files); a preference loss needs one of the paired formats "
            f"{FORMATS}"
        )
    raise ValueError(f"unknown record format (keys {sorted(obj)}); expected one of {FORMATS}")


def _normalise_format(format: str | None) -> str | None:
    if format is None:
        return None
    f = _FORMAT_ALIASES.get(format, format)
    if f != "trl" and f not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS} (or 'trl', or None to detect)")
    return f


def parse_record(obj: Any, format: str, source: tuple[str, int]) -> PreferenceRecord:
    """Parse one decoded JSON object into a `PreferenceRecord` (a `RecordError` naming `source` and the field for
    the first problem found).

    Args:
        obj: the decoded object.
        format: one of `FORMATS`.
        source: `(file, line)`, named in errors and kept on the record.

    Returns:
        The record.
    """
    problems = record_problems(obj, format, source)
    if isinstance(problems, PreferenceRecord):
        return problems
    raise RecordError(problems[0])


def record_problems(obj: Any, format: str, source: tuple[str, int]) -> PreferenceRecord | list[Problem]:
    """The parsed record, or every problem found in it (as :class:`Problem` naming file, line, field)."""
    file, line = source
    if not isinstance(obj, Mapping):
        return [Problem(file, line, "<record>", f"expected a JSON object, got {type_name(obj)}")]
    try:
        if format in ("trl", "trl_standard", "trl_conversational"):
            prompt, responses, rewards, conv = _parse_trl(obj, want=None if format == "trl" else format)
        elif format == "trl_implicit":
            prompt, responses, rewards, conv = _parse_trl_implicit(obj)
        elif format == "nemo":
            prompt, responses, rewards, conv = _parse_nemo(obj)
        elif format == "k_responses":
            prompt, responses, rewards, conv = _parse_k(obj)
        else:
            raise ValueError(f"unknown format {format!r}")
    except FieldProblems as e:
        return [Problem(file, line, field, msg) for field, msg in e.problems]
    return PreferenceRecord(
        prompt=prompt,
        responses=tuple(responses),
        rewards=None if rewards is None else tuple(rewards),
        conversational=conv,
        source=(file, line),
        labelled=format in PAIR_FORMATS + ("trl",),
    )


# ----------------------------------------------------------------------------------------------------------
# Reading (sources: rpo_jax.data.sources)
# ----------------------------------------------------------------------------------------------------------


def iter_file_records(
    file: str | os.PathLike | Source, *, format: str | None = None
) -> Iterator[tuple[str | None, PreferenceRecord | list[Problem]]]:
    """``(format, record_or_problems)`` for each line/row of one source (a file path or a
    :class:`~rpo_jax.data.sources.Source`); the format is detected from the first JSON object (None until
    then)."""
    fmt = _normalise_format(format)
    source = as_source(file)
    name = source.name
    for line, obj, problem in iter_raw(source):
        if problem is not None:
            yield fmt, [problem]
            continue
        if fmt is None:
            if not isinstance(obj, Mapping):
                yield fmt, [Problem(name, line, "<record>", f"expected a JSON object, got {type_name(obj)}")]
                continue
            try:
                fmt = detect_format(obj)
            except ValueError as e:
                yield fmt, [Problem(name, line, "<record>", str(e))]
                continue
            if fmt in ("trl_standard", "trl_conversational"):
                fmt = "trl"  # a TRL file may mix string and conversational lines; each line is typed itself
        yield fmt, record_problems(obj, fmt, (name, line))


def read_records(
    paths: Any, *, format: str | None = None, on_error: OnError = "raise", split: str | None = None
) -> tuple[list[PreferenceRecord], ReadReport]:
    """Read, validate and normalise preference records from files or Hugging Face datasets.

    Args:
      paths: a file (``.jsonl``, ``.jsonl.gz``, ``.parquet``, ``.arrow``), a directory of shards, a directory
        written by ``save_to_disk`` (a ``DatasetDict``'s split as ``DIR:split`` or ``DIR/split``), a
        ``datasets.Dataset`` / ``DatasetDict`` object, or a list of them (:mod:`rpo_jax.data.sources`).
      format: None to detect per source, or one of ``FORMATS`` (also ``"trl"``: standard or conversational).
      on_error: ``"raise"``: the first problem raises :class:`RecordError` (a ValueError naming file, line and
        field). ``"skip"``: records with problems are left out, counted in ``report.num_skipped`` and every
        problem listed in ``report.problems``; if no record at all is left, :class:`NoRecordsError`.
      split: the split of every ``DatasetDict`` input without one in its path (ValueError when none has splits).

    Returns:
      ``(records, report)``, records in source order.

    Raises:
      RecordError: ``on_error="raise"`` and a bad record (``file:line: field: message``).
      NoRecordsError: ``on_error="skip"`` and every record was bad or every source empty (a ValueError:
        ``a.jsonl, b.jsonl: all 12 records were skipped (first problems: a.jsonl:1: prompt: missing field; ...)``).
      ValueError: no input, a missing path, an unsupported file, a DatasetDict without a split.
    """
    return read_sources(
        paths, on_error, lambda source: iter_file_records(source, format=format), PreferenceRecord, split=split
    )


def read_sources(
    paths: Any, on_error: OnError, items_of_file, kind: type, *, split: str | None = None
) -> tuple[list, ReadReport]:
    """The reading loop of :func:`read_records` and :func:`rpo_jax.data.prompts.read_prompts`.

    Every :class:`~rpo_jax.data.sources.Source` of `paths` (:func:`~rpo_jax.data.sources.resolve_sources` with
    `split`), each row's ``(format or None, item)`` from ``items_of_file(source)``; items of type `kind` are
    kept, any other item (a Problem or a list of them) raises :class:`RecordError` (``on_error="raise"``) or is
    counted and reported (``"skip"``). Returns ``(kept items, ReadReport)``.

    Raises:
      NoRecordsError: ``on_error="skip"`` left no item at all (its ``.report`` lists every problem).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    report = ReadReport()
    kept: list = []
    for source in resolve_sources(paths, split=split):
        name = source.name
        report.files.append(name)
        lines_before = report.num_lines
        for fmt, item in items_of_file(source):
            report.num_lines += 1
            if fmt is not None:
                report.formats[name] = fmt
            if isinstance(item, kind):
                kept.append(item)
                continue
            problems = item if isinstance(item, list) else [item]
            if on_error == "raise":
                raise RecordError(problems[0])
            report.num_skipped += 1
            report.problems += problems
        if report.num_lines == lines_before:
            empty = Problem(name, 0, "<file>", "no records (the file is empty)")
            if on_error == "raise":
                raise RecordError(empty)
            report.problems.append(empty)
    report.num_records = len(kept)
    if not kept:
        raise NoRecordsError(report)
    return kept, report
