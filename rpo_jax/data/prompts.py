"""Prompts alone (online training samples its own responses): read from any preference or prompt-only file,
validated with file/line/field like :mod:`rpo_jax.data.records`; needs neither JAX nor grain nor tfds."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from rpo_jax.data.records import (
    FieldProblems,
    Messages,
    OnError,
    PreferenceRecord,
    Problem,
    ReadReport,
    detect_format,
    iter_raw,
    parse_messages,
    read_sources,
    record_problems,
    type_name,
)
from rpo_jax.data.sources import Source


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt: chat messages, whether the source was conversational, and ``(file, line)``."""

    prompt: Messages
    conversational: bool
    source: tuple[str, int] = ("<memory>", 0)

    @property
    def prompt_text(self) -> str:
        """The content of the prompt's messages joined by newlines."""
        return "\n".join(m["content"] for m in self.prompt)


def _prompt_of(obj: Any, source: tuple[str, int]) -> PromptRecord | Problem:
    file, line = source
    if not isinstance(obj, Mapping):
        return Problem(file, line, "<record>", f"expected a JSON object, got {type_name(obj)}")
    if "prompt" in obj:
        try:
            messages, conv = parse_messages(obj["prompt"], "prompt", default_role="user")
        except FieldProblems as e:
            return Problem(file, line, *e.problems[0])
        return PromptRecord(messages, conv, source)
    try:  # a preference record whose prompt is implicit (TRL's chosen/rejected conversations)
        fmt = detect_format(obj)
    except ValueError as e:
        return Problem(file, line, "prompt", f"missing field ({e})")
    parsed = record_problems(obj, fmt, source)
    if isinstance(parsed, PreferenceRecord):
        return PromptRecord(parsed.prompt, parsed.conversational, source)
    return parsed[0]


def read_prompts(
    paths: Any, *, on_error: OnError = "raise", split: str | None = None
) -> tuple[list[PromptRecord], ReadReport]:
    """Read the prompts of any source :func:`~rpo_jax.data.records.read_records` reads (``.jsonl``,
    ``.jsonl.gz``, ``.parquet``, ``.arrow``, directories, Hugging Face ``datasets`` objects and save_to_disk
    directories; ``split`` chooses a ``DatasetDict``'s split).

    A line is any JSON object with a ``prompt`` (a string or a list of messages; other fields are ignored, so
    every preference file is also a prompt file), or a TRL implicit-prompt record (its common prefix).
    ``on_error`` as in :func:`~rpo_jax.data.records.read_records`: ``"raise"`` names file, line and field;
    `"skip"` counts, and raises `NoRecordsError` when no prompt is left.

    Args:
        paths: what `read_records` reads.
        on_error: `"raise"` or `"skip"`.
        split: a `DatasetDict`'s split.

    Returns:
        `(prompts, report)`.
    """

    def prompts_of(source: Source):
        for line, obj, problem in iter_raw(source):
            yield None, (problem if problem is not None else _prompt_of(obj, (source.name, line)))

    return read_sources(paths, on_error, prompts_of, PromptRecord, split=split)
