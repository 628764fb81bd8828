"""Where records come from: files, directories of shards and Hugging Face ``datasets``, each read as rows of
decoded JSON-like objects, with a name and a 1-based line (or row) number for problems.

Inputs (:func:`resolve_sources`; every row then goes through the same format detection and parsers):

* ``.jsonl`` / ``.jsonl.gz``: one JSON object per line (blank lines skipped, numbers are physical lines).
  Objects are strict: a key repeated in any object of a line — the record or a message inside it — is a
  problem naming the field (``data.jsonl:7: chosen: duplicate key 'chosen'``,
  ``data.jsonl:8: prompt[0].role: duplicate key 'role'``), never "last one wins".
* ``.parquet``: its rows.
* ``.arrow``: an Arrow file as ``datasets`` writes it (``data-00000-of-00001.arrow``, the IPC stream format)
  or an Arrow IPC file; its rows.
* a directory written by ``Dataset.save_to_disk`` (it holds ``state.json`` and ``dataset_info.json``).
* a directory written by ``DatasetDict.save_to_disk`` (it holds ``dataset_dict.json`` and one subdirectory per
  split): one split, chosen as ``DIR:split``, as ``DIR/split``, or with ``split=``; without one, a ValueError
  lists the splits. Its problems name ``DIR/split``.
* any other directory: its ``*.jsonl``, ``*.jsonl.gz`` and ``*.parquet`` files, recursively, in sorted order.
  ``.arrow`` files are read only when named, or inside a save_to_disk directory, so that a directory scan never
  mixes two splits of a saved dataset.
* in the Python API, a ``datasets.Dataset`` / ``IterableDataset`` (named ``<Dataset>`` / ``<IterableDataset>``)
  or a ``DatasetDict`` / ``IterableDatasetDict`` with ``split=`` (named ``<DatasetDict>[split]``), such as
  ``datasets.load_dataset(...)`` returns; several in-memory datasets in one list carry their 1-based position
  in it (``<Dataset #2>``).

Rows of Arrow-backed sources (Parquet, Arrow, ``datasets``) are numbered from 1 (row N is ``dataset[N - 1]``),
and a missing value is ``null``, validated like JSON's ``null``. ``datasets`` is imported only when such a
source is read, so this module needs neither JAX nor grain nor tfds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from rpo_jax.data import storage
from rpo_jax.data.problems import Problem

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
FILE_SUFFIXES = SHARD_SUFFIXES + (".arrow",)
_DATASET_CLASSES = ("Dataset", "IterableDataset", "DatasetDict", "IterableDatasetDict")
_BATCH = 1024


# ----------------------------------------------------------------------------------------------------------
# Strict JSON
# ----------------------------------------------------------------------------------------------------------


class DuplicateKeyError(ValueError):
    """A JSON object repeats a key; ``.field`` is its path in the line (``chosen``, ``prompt[0].role``)."""

    def __init__(self, field: str, key: str):
        super().__init__(f"{field}: duplicate key {key!r}")
        self.field = field
        self.key = key


class _DuplicateFound(Exception):
    pass


class _WithDuplicate(dict):
    duplicate: str = ""


def _pairs_fast(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateFound
    return obj


def _pairs_marking(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    marked = _WithDuplicate(obj)
    for key, _ in pairs:
        if key in seen:
            marked.duplicate = key
            break
        seen.add(key)
    return marked


def _find_duplicate(obj: Any, path: str) -> tuple[str, str] | None:
    if isinstance(obj, _WithDuplicate):
        return (f"{path}.{obj.duplicate}" if path else obj.duplicate), obj.duplicate
    if isinstance(obj, dict):
        children = ((f"{path}.{k}" if path else k, v) for k, v in obj.items())
    elif isinstance(obj, list):
        children = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for where, value in children:
        hit = _find_duplicate(value, where)
        if hit is not None:
            return hit
    return None


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses a repeated key in any object (the first one in document order is named).

    Raises:
      json.JSONDecodeError: malformed JSON.
      DuplicateKeyError: naming the repeated key's path, e.g. ``chosen`` or ``prompt[0].role``.
    """
    try:
        return json.loads(text, object_pairs_hook=_pairs_fast)
    except _DuplicateFound:
        pass
    hit = _find_duplicate(json.loads(text, object_pairs_hook=_pairs_marking), "")
    assert hit is not None  # the fast pass saw a duplicate, so the marking pass marked one
    raise DuplicateKeyError(*hit)


# ----------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """One input: ``name`` (as problems and :class:`~rpo_jax.data.problems.ReadReport` print it), ``kind``
    (``"jsonl"`` for .jsonl and .jsonl.gz, ``"parquet"``, ``"arrow"``, ``"dataset_dir"`` for a save_to_disk
    directory, ``"dataset"`` for an in-memory ``datasets`` object), and ``path`` or ``dataset``."""

    name: str
    kind: str
    path: str | None = None
    dataset: Any = None

    def __str__(self) -> str:
        return self.name


def is_hf_dataset(obj: Any) -> bool:
    """True for a ``datasets`` Dataset, IterableDataset, DatasetDict or IterableDatasetDict (without importing
    ``datasets``: such an object exists only once it is imported)."""
    module = sys.modules.get("datasets")
    return module is not None and isinstance(obj, tuple(getattr(module, c) for c in _DATASET_CLASSES))


def is_dataset_dir(path: str | os.PathLike) -> bool:
    """A directory written by ``Dataset.save_to_disk`` (``state.json`` and ``dataset_info.json``)."""
    p = storage.as_path(path)
    return (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def is_dataset_dict_dir(path: str | os.PathLike) -> bool:
    """A directory written by ``DatasetDict.save_to_disk`` (``dataset_dict.json``)."""
    return (storage.as_path(path) / "dataset_dict.json").is_file()


def dataset_dict_splits(path: str | os.PathLike) -> list[str]:
    """The splits listed in a saved DatasetDict's ``dataset_dict.json``; ValueError when it is unreadable."""
    try:
        splits = json.loads((storage.as_path(path) / "dataset_dict.json").read_text("utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable dataset_dict.json ({e})") from e
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise ValueError(f"{path}: dataset_dict.json: 'splits' is not a list of names")
    return splits


def _require_datasets(what: str) -> None:
    if importlib.util.find_spec("datasets") is None:
        raise ValueError(f"{what}: reading it needs the Hugging Face `datasets` package (pip install datasets)")


def _dict_split(base: str, split: str) -> Source:
    splits = dataset_dict_splits(base)
    if split not in splits:
        raise ValueError(f"{base}: no split {split!r} in this DatasetDict (available splits: {', '.join(splits)})")
    sub = os.path.join(base, split)
    if not is_dataset_dir(sub):
        raise ValueError(f"{sub}: the split's directory is missing or was not written by save_to_disk")
    _require_datasets(sub)
    return Source(sub, "dataset_dir", path=sub)


def _path_sources(p: str | os.PathLike, split: str | None) -> tuple[list[Source], bool]:
    """The sources of one path, and whether ``split`` chose a split of it."""
    if not isinstance(p, (str, os.PathLike)):
        raise TypeError(
            f"cannot read a {type(p).__name__}: expected a path, a datasets Dataset / DatasetDict, or a list of them"
        )
    path, text = storage.as_path(p), str(p)  # a local path or a URL (gs://…): JSONL / Parquet files, shard dirs
    if not path.exists() and ":" in text and not storage.is_url(text):
        base, _, chosen = text.rpartition(":")
        if base and chosen and is_dataset_dict_dir(base):
            if split is not None and split != chosen:
                raise ValueError(f"{text}: the path chooses split {chosen!r} but split={split!r}")
            return [_dict_split(base, chosen)], split is not None
    if path.is_dir():
        if is_dataset_dict_dir(path):
            if split is None:
                raise ValueError(
                    f"{path}: a DatasetDict saved with save_to_disk; choose a split as {path}:SPLIT, "
                    f"{path}/SPLIT or with split= (available splits: "
                    f"{', '.join(dataset_dict_splits(path))})"
                )
            return [_dict_split(text, split)], True
        if is_dataset_dir(path):
            _require_datasets(text)
            return [Source(text, "dataset_dir", path=text)], False
        shards = sorted(str(f) for f in storage.walk_files(path) if str(f).endswith(SHARD_SUFFIXES))
        if not shards:
            raise ValueError(
                f"{path}: directory holds no {', '.join(SHARD_SUFFIXES)} shards and was not written "
                "by datasets' save_to_disk"
            )
        return [Source(f, "parquet" if f.endswith(".parquet") else "jsonl", path=f) for f in shards], False
    if path.is_file():
        if not text.endswith(FILE_SUFFIXES):
            raise ValueError(f"{path}: unsupported file type (expected {', '.join(FILE_SUFFIXES)}, or a directory)")
        kind = "parquet" if text.endswith(".parquet") else "arrow" if text.endswith(".arrow") else "jsonl"
        if kind == "arrow":
            _require_datasets(text)
        return [Source(text, kind, path=text)], False
    raise ValueError(f"{path}: no such file or directory")


def _in_memory_source(obj: Any, split: str | None, tag: str) -> tuple[Source, bool]:
    cls = type(obj).__name__
    if isinstance(obj, dict):  # DatasetDict and IterableDatasetDict are dicts of splits
        if split is None:
            raise ValueError(
                f"<{cls}{tag}>: a {cls} holds splits; choose one with split= (available splits: {', '.join(obj)})"
            )
        if split not in obj:
            raise ValueError(f"<{cls}{tag}>: no split {split!r} (available splits: {', '.join(obj)})")
        return Source(f"<{cls}{tag}>[{split}]", "dataset", dataset=obj[split]), True
    return Source(f"<{cls}{tag}>", "dataset", dataset=obj), False


def source_list(paths: Any) -> list[Any]:
    """``paths`` as a list of inputs: one path, ``Source`` or ``datasets`` object becomes a list of one (a
    Dataset is iterable, a DatasetDict a dict: neither is taken for a list of paths)."""
    if isinstance(paths, (str, os.PathLike, Source)) or is_hf_dataset(paths):
        return [paths]
    return list(paths)


def resolve_sources(paths: Any, *, split: str | None = None) -> list[Source]:
    """Every source to read, in order (see the module docstring for the inputs and their names).

    Args:
        paths: a path, a `datasets` object, a `Source`, or a list of them.
        split: the split of every `DatasetDict` (object or save_to_disk directory) that has none in its path.

    Returns:
        The sources, as `Source` objects.

    Raises:
        ValueError: no input, a missing path, an unsupported file type, a directory without shards, a DatasetDict
            without a split (listing the splits), an unknown split, or `split` given where no input has splits.
    """
    items = source_list(paths)
    if not items:
        raise ValueError("no sources given (an empty list of paths)")
    in_memory = sum(is_hf_dataset(x) for x in items)
    out: list[Source] = []
    split_used = False
    for position, item in enumerate(items, start=1):
        if isinstance(item, Source):
            out.append(item)
            continue
        if is_hf_dataset(item):
            source, used = _in_memory_source(item, split, f" #{position}" if in_memory > 1 else "")
            out.append(source)
        else:
            sources, used = _path_sources(item, split)
            out += sources
        split_used |= used
    if split is not None and not split_used:
        raise ValueError(f"split={split!r} given, but no source is a DatasetDict (or a directory saved from one)")
    return out


def expand_sources(paths: Any, *, split: str | None = None) -> list[str]:
    """The names of the sources to read (`resolve_sources`).

    Args:
        paths: a path, a `datasets` object, a `Source`, or a list of them.
        split: the split of every `DatasetDict` that has none in its path.

    Returns:
        Each file itself, a directory's `*.jsonl`, `*.jsonl.gz`, `*.parquet` (sorted), a save_to_disk directory
        (`DIR/split` for a DatasetDict's split).

    Raises:
        ValueError: for a missing path, an unsupported suffix, or a directory without shards.
    """
    return [s.name for s in resolve_sources(paths, split=split)]


def as_source(file: str | os.PathLike | Source) -> Source:
    """One :class:`Source` for a file path (or a save_to_disk directory, or ``DIR:split``); a Source as is."""
    if isinstance(file, Source):
        return file
    sources = resolve_sources(file)
    if len(sources) != 1:
        raise ValueError(f"{file}: a directory of {len(sources)} shards; read it with read_records / resolve_sources")
    return sources[0]


# ----------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------


def iter_raw(file: str | os.PathLike | Source) -> Iterator[tuple[int, Any, Problem | None]]:
    """Yield ``(line, decoded_object, problem)`` for each non-blank line / row of one source.

    ``problem`` (a :class:`Problem`, object None) names an undecodable line (``<json>``, ``<bytes>``), a repeated
    key (its path, e.g. ``prompt[0].role``) or an unreadable source (``<file>``).
    """
    source = as_source(file)
    if source.kind == "jsonl":
        yield from _jsonl_rows(source.name)
    elif source.kind == "parquet":
        yield from _parquet_rows(source.name)
    else:
        yield from _dataset_rows(source)


def _jsonl_rows(file: str) -> Iterator[tuple[int, Any, Problem | None]]:
    i = 0
    try:
        with storage.open_binary(file) as f:
            for i, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield i, None, Problem(file, i, "<bytes>", f"invalid UTF-8 at byte {e.start} of the line")
                    continue
                try:
                    obj = loads_strict(text)
                except json.JSONDecodeError as e:
                    yield i, None, Problem(file, i, "<json>", f"malformed JSON: {e.msg} (column {e.colno})")
                    continue
                except DuplicateKeyError as e:
                    yield i, None, Problem(file, i, e.field, f"duplicate key {e.key!r}")
                    continue
                yield i, obj, None
    except (OSError, EOFError) as e:  # a corrupt or truncated .gz
        yield i + 1, None, Problem(file, i + 1, "<file>", f"cannot read: {e}")


def _parquet_rows(file: str) -> Iterator[tuple[int, Any, Problem | None]]:
    import pyarrow.parquet as pq

    try:
        with storage.as_path(file).open("rb") as f:
            rows = pq.read_table(f).to_pylist()
    except Exception as e:  # pyarrow raises several types for a corrupt file
        yield 0, None, Problem(file, 0, "<file>", f"cannot read parquet: {e}")
        return
    for i, row in enumerate(rows, start=1):
        yield i, row, None


def _arrow_table_rows(file: str) -> Iterator[dict]:
    """Rows of an Arrow IPC *file* (``ARROW1`` magic; ``datasets`` writes the stream format instead)."""
    import pyarrow as pa

    with pa.memory_map(file) as f:
        for batch in pa.ipc.open_file(f).read_all().to_batches(_BATCH):
            yield from batch.to_pylist()


def _hf_rows(ds: Any) -> Iterator[dict]:
    """Rows of a ``datasets`` Dataset / IterableDataset as plain Python objects (any set format undone)."""
    import datasets

    ds = ds.with_format(None)
    if not isinstance(ds, datasets.Dataset):
        yield from ds
        return
    for batch in ds.iter(batch_size=_BATCH):
        columns = list(batch)
        for j in range(len(batch[columns[0]]) if columns else 0):
            yield {c: batch[c][j] for c in columns}


def _dataset_rows(source: Source) -> Iterator[tuple[int, Any, Problem | None]]:
    """Rows of an ``.arrow`` file, a save_to_disk directory or an in-memory dataset; a failure to read is a
    ``<file>`` problem at the row it happened (0 before the first)."""
    i = 0
    try:
        with contextlib.ExitStack() as stack:
            # a file or directory in a bucket is read from a local copy (pyarrow memory-maps it)
            local = None if source.kind == "dataset" else stack.enter_context(storage.local_copy(source.path))
            if source.kind == "dataset":
                rows = _hf_rows(source.dataset)
            elif source.kind == "arrow":
                with open(local, "rb") as f:
                    is_ipc_file = f.read(6) == b"ARROW1"
                if is_ipc_file:
                    rows = _arrow_table_rows(local)
                else:
                    import datasets

                    rows = _hf_rows(datasets.Dataset.from_file(local))
            else:
                import datasets

                ds = datasets.load_from_disk(local)
                if not isinstance(ds, (datasets.Dataset, datasets.IterableDataset)):
                    raise ValueError(f"expected a saved Dataset, got a {type(ds).__name__}")
                rows = _hf_rows(ds)
            for i, row in enumerate(rows, start=1):
                yield i, row, None
    except Exception as e:  # pyarrow and datasets raise many types for a corrupt or foreign file
        what = {"arrow": "arrow file", "dataset_dir": "saved dataset"}.get(source.kind, "dataset")
        yield (
            i + 1 if i else 0,
            None,
            Problem(source.name, i + 1 if i else 0, "<file>", f"cannot read {what}: {type(e).__name__}: {e}"),
        )
