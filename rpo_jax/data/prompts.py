"""Prompts alone (online training samples its own responses): read from any preference or prompt-only file,
validated with file/line/field like :mod:`rpo_jax.data.records`; needs neither JAX nor grain nor tfds."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

from rpo_jax.data.records import (FieldProblems, Messages, OnError, PreferenceRecord, Problem, ReadReport,
                                  detect_format, iter_raw, parse_messages, read_sources, record_problems, type_name)


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


def read_prompts(paths: str | os.PathLike | Iterable[str | os.PathLike], *, on_error: OnError = "raise"
                 ) -> tuple[list[PromptRecord], ReadReport]:
    """Read the prompts of ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` files (or directories of them).

    A line is any JSON object with a ``prompt`` (a string or a list of messages; other fields are ignored, so
    every preference file is also a prompt file), or a TRL implicit-prompt record (its common prefix).
    ``on_error`` as in :func:`~rpo_jax.data.records.read_records`: ``"raise"`` names file, line and field;
    ``"skip"`` counts.
    """
    def prompts_of(file: str):
        for line, obj, problem in iter_raw(file):
            yield None, (problem if problem is not None else _prompt_of(obj, (file, line)))
    return read_sources(paths, on_error, prompts_of, PromptRecord)
