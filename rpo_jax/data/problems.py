"""Problems found while reading data, and how they are reported: ``file:line: field: message``.

The shared vocabulary of :mod:`rpo_jax.data.records` (which re-exports every name here), :mod:`rpo_jax.data.sources`
and :mod:`rpo_jax.data.prompts`; needs neither JAX nor grain nor tfds. For tabular sources (Parquet, Arrow,
Hugging Face ``datasets``) the number after the colon is the 1-based row (row N is ``dataset[N - 1]``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

OnError = Literal["raise", "skip"]

#: How many problems (and files) :func:`no_records_message` quotes before "and N more".
QUOTED_PROBLEMS = 3
QUOTED_FILES = 5


@dataclasses.dataclass(frozen=True)
class Problem:
    """One validation problem, printed as ``file:line: field: message``."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class RecordError(ValueError):
    """A bad input record; ``.problem`` names the file, line and field."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


@dataclasses.dataclass
class ReadReport:
    """What :func:`~rpo_jax.data.records.read_records` saw: per-source format, counts, and every problem (never
    silent). ``files`` holds each source's name as problems print it (a path, ``DIR/split`` for a split of a
    saved ``DatasetDict``, ``<Dataset>`` / ``<DatasetDict>[split]`` for in-memory Hugging Face datasets)."""

    files: list[str] = dataclasses.field(default_factory=list)
    formats: dict[str, str] = dataclasses.field(default_factory=dict)
    num_lines: int = 0
    num_records: int = 0
    num_skipped: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def summary(self) -> str:
        """One line: records kept, records skipped, problems."""
        return (
            f"{self.num_records} records from {len(self.files)} file(s); {self.num_skipped} skipped; "
            f"{len(self.problems)} problem(s)"
        )


class NoRecordsError(ValueError):
    """``on_error="skip"`` left no record at all (every record was bad, or every file empty).

    Raised by :func:`~rpo_jax.data.records.read_records` and :func:`~rpo_jax.data.prompts.read_prompts` instead
    of returning an empty list; ``.report`` is the full :class:`ReadReport` (every problem), for callers such as
    ``rpo-data validate`` that list them. The message is :func:`no_records_message`.
    """

    def __init__(self, report: ReadReport):
        super().__init__(no_records_message(report))
        self.report = report


def _quoted(items: Sequence[Any], limit: int, sep: str) -> str:
    shown = sep.join(str(x) for x in items[:limit])
    return shown + (f"{sep}and {len(items) - limit} more" if len(items) > limit else "")


def no_records_message(report: ReadReport) -> str:
    """The one-line message of :class:`NoRecordsError`, e.g.

    ``a.jsonl, b.jsonl: all 12 records were skipped (first problems: a.jsonl:1: prompt: missing field;
    a.jsonl:2: ...; a.jsonl:3: ...; and 9 more)`` — or, when every file was empty,
    ``a.jsonl: no records at all (first problems: a.jsonl:0: <file>: no records (the file is empty))``.
    """
    files = _quoted(report.files, QUOTED_FILES, ", ")
    problems = _quoted(report.problems, QUOTED_PROBLEMS, "; ")
    if report.num_skipped:
        n = report.num_skipped
        what = f"all {n} records were skipped" if n != 1 else "its only record was skipped"
    else:
        what = "no records at all"
    return f"{files}: {what} (first problems: {problems})"


class FieldProblems(Exception):
    """The problems of one record as ``(field, message)`` pairs, raised by the field parsers (e.g.
    :func:`~rpo_jax.data.records.parse_messages`); callers turn them into :class:`Problem` s naming the file and
    line."""

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__(problems)
        self.problems = problems


def type_name(x: Any) -> str:
    """The JSON-ish type name used in problem messages: ``"null"`` for None, else the Python type name."""
    return "null" if x is None else type(x).__name__
