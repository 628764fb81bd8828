"""Safetensors files behind a URL (`gs://bucket/model/…`, or any fsspec URL): headers read once per process, then
only the byte ranges a caller asks for, fetched concurrently and retried on transient errors.

A safetensors file is

    [8 bytes: N, little-endian u64] [N bytes: JSON header] [data]

where the header maps each tensor name to {dtype, shape, data_offsets: [begin, end]} (offsets relative to the
start of the data, 8 + N) and tensors are stored row-major. A block of a tensor, index (a_0:b_0, …, a_{d-1}:b_{d-1}),
is therefore a set of equal-length runs of contiguous bytes (`byte_runs`): the trailing axes read whole make one
run per combination of the leading indices. `RemoteSafetensors.get_slice(name)[index]` reads exactly those runs
and nothing else, which is what lets each host of a pod read only its devices' slices of a checkpoint in a bucket
(`rpo_jax.models.hf_io.load_hf`).

Why fsspec (gcsfs for gs://) range reads rather than TensorStore: a safetensors file is one object whose tensors
are byte ranges of it; fsspec's `cat_ranges` fetches any list of ranges of any object concurrently (asyncio, one
HTTP range request each) on every filesystem fsspec knows, and gcsfs already retries GCS's transient answers
(429, 5xx, dropped connections) with backoff. TensorStore reads arrays in its own formats (zarr, N5, OCDBT) —
orbax's checkpoints — and would read a safetensors file only as raw key-value bytes, with nothing gained over a
range read; the package already reads and writes buckets through fsspec (`rpo_jax.data.storage`, `etils.epath`).
This module sits in `rpo_jax.models` and uses fsspec directly because models may not import `rpo_jax.data`.

On top of the filesystem's own retries, `RangeReader` retries the ranges that still failed (any error but a
missing object or a refused permission) `attempts` times with exponential backoff; a missing object is one line
naming it (`FileNotFoundError`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import struct
import threading
import time
from collections.abc import Sequence

import numpy as np

#: safetensors dtype names → numpy dtypes (BF16 and the 8-bit floats through ml_dtypes, as safetensors' numpy
#: reader returns them).
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a safetensors dtype name ("F32", "BF16", …); ValueError for an unknown name."""
    if name in _DTYPES:
        return np.dtype(_DTYPES[name])
    if name in _ML_DTYPES:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, _ML_DTYPES[name]))
    raise ValueError(f"unknown safetensors dtype {name!r}")


def safetensors_dtype(dtype) -> str:
    """The safetensors dtype name of a numpy / jax dtype (inverse of `numpy_dtype`)."""
    name = np.dtype(dtype).name
    for table in (_DTYPES, _ML_DTYPES):
        for key, value in table.items():
            if value == name:
                return key
    raise ValueError(f"dtype {name} has no safetensors name")


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store or other fsspec filesystem (`scheme://…`) rather than a local file."""
    return "://" in os.fspath(path)


def filesystem(url: str):
    """(fsspec filesystem, path inside it) of `url`."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def one_line(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:200]}"


# ----------------------------------------------------------------------------------------------- byte ranges
def byte_runs(shape: Sequence[int], itemsize: int, index: Sequence[tuple[int, int]]) -> tuple[np.ndarray, int]:
    """(starts [R] int64, run length in bytes) of the block `index` = ((a_0, b_0), …) of a row-major tensor of
    `shape`, relative to the tensor's first byte.

    With k the last axis not read whole (a_k > 0 or b_k < n_k; k = 0 when every axis is whole), each run is
    (b_k − a_k)·∏_{j>k} n_j elements and there are R = ∏_{j<k} (b_j − a_j) runs, starting at
    Σ_{j≤k} i_j·s_j with strides s_j = itemsize·∏_{l>j} n_l, i_j over a_j..b_j − 1 (i_k = a_k). An empty block has
    no runs; a scalar (shape ()) is one run of itemsize bytes.
    """
    shape = tuple(int(n) for n in shape)
    if not shape:
        return np.zeros(1, np.int64), itemsize
    index = [(int(a), int(b)) for a, b in index]
    if any(b <= a for a, b in index):
        return np.zeros(0, np.int64), 0
    strides = [itemsize * math.prod(shape[j + 1 :]) for j in range(len(shape))]
    k = max((j for j, (a, b) in enumerate(index) if (a, b) != (0, shape[j])), default=0)
    a_k, b_k = index[k]
    length = (b_k - a_k) * strides[k]
    starts = np.full((1,), a_k * strides[k], np.int64)
    for j in range(k - 1, -1, -1):  # outer axes, broadcast over the runs found so far
        a, b = index[j]
        starts = (np.arange(a, b, dtype=np.int64)[:, None] * strides[j] + starts[None, :]).reshape(-1)
    return starts, length


def split_runs(starts: np.ndarray, length: int, part_bytes: int) -> tuple[list[int], list[int]]:
    """(starts, ends) of the requests that read the runs `starts` of `length` bytes each, every run cut into
    parts of at most `part_bytes` (one request each, so that a large block is fetched concurrently)."""
    out_starts, out_ends = [], []
    for s in starts.tolist():
        for p in range(s, s + length, part_bytes):
            out_starts.append(p)
            out_ends.append(min(p + part_bytes, s + length))
    return out_starts, out_ends


# ----------------------------------------------------------------------------------------------- reading
class RangeReader:
    """Byte ranges of objects through fsspec's `cat_ranges` (concurrent on async filesystems such as gcsfs),
    each failed range retried up to `attempts` times in all (sleeping backoff·2^i s between rounds); a missing
    object is a FileNotFoundError naming it, a refused one a PermissionError; what still fails after the last
    attempt is an OSError naming the object, how many ranges failed and the last error."""

    def __init__(self, attempts: int = 5, backoff: float = 0.2, part_bytes: int = 8 << 20):
        self.attempts, self.backoff, self.part_bytes = attempts, backoff, part_bytes
        self.retried = 0  # ranges fetched again after an error (a count for logs and tests)

    def read(self, url: str, starts: Sequence[int], ends: Sequence[int]) -> list[bytes]:
        """The bytes [starts[i], ends[i]) of the object `url`, in order."""
        return self.read_many([url] * len(starts), starts, ends)

    def read_many(self, urls: Sequence[str], starts: Sequence[int], ends: Sequence[int]) -> list[bytes]:
        """The bytes [starts[i], ends[i]) of the objects `urls[i]` (all on one filesystem), in order."""
        if not urls:
            return []
        fs, _ = filesystem(urls[0])
        paths = [filesystem(u)[1] for u in urls]
        out: list[bytes | None] = [b"" if ends[i] <= starts[i] else None for i in range(len(urls))]
        pending = [i for i in range(len(urls)) if out[i] is None]
        last: BaseException | None = None
        for attempt in range(self.attempts):
            if not pending:
                break
            if attempt:
                self.retried += len(pending)
                time.sleep(self.backoff * 2 ** (attempt - 1))
            got = fs.cat_ranges(
                [paths[i] for i in pending], [starts[i] for i in pending], [ends[i] for i in pending], on_error="return"
            )
            failed = []
            for i, value in zip(pending, got, strict=True):
                if isinstance(value, FileNotFoundError):
                    raise FileNotFoundError(f"{urls[i]}: no such object") from None
                if isinstance(value, PermissionError):
                    raise PermissionError(f"{urls[i]}: access refused ({one_line(value)})") from None
                if isinstance(value, BaseException):
                    last = value
                    failed.append(i)
                elif len(value) != ends[i] - starts[i]:
                    last = OSError(f"short read: {len(value)} of {ends[i] - starts[i]} bytes at {starts[i]}")
                    failed.append(i)
                else:
                    out[i] = value
            pending = failed
        if pending:
            raise OSError(
                f"{urls[pending[0]]}: {len(pending)} byte range(s) still failed after {self.attempts} attempts "
                f"(last error {one_line(last)})"
            )
        return out  # type: ignore[return-value]


@functools.cache
def default_reader() -> RangeReader:
    """The process's `RangeReader` (5 attempts)."""
    return RangeReader()


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: dtype name, shape, absolute byte offsets [start, end) in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed header: `raw` (the N JSON bytes), `entries` (name → TensorEntry), `metadata`, `data_start` = 8 + N."""

    raw: bytes
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


def parse_header(raw: bytes, file_size: int, source: str) -> SafetensorsHeader:
    """The header `raw` (the JSON after the 8-byte length) of a file of `file_size` bytes; ValueError naming
    `source` when it is not JSON, a tensor entry is malformed or a tensor lies outside the file."""
    data_start = 8 + len(raw)
    try:
        fields = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{source}: not a readable safetensors file (its header is not JSON: {e})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{source}: not a readable safetensors file (its header is not a JSON object)")
    metadata = fields.pop("__metadata__", None) or {}
    entries = {}
    for name, spec in fields.items():
        try:
            begin, end = (int(x) for x in spec["data_offsets"])
            entry = TensorEntry(
                str(spec["dtype"]), tuple(int(n) for n in spec["shape"]), data_start + begin, data_start + end
            )
            numpy_dtype(entry.dtype)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: not a readable safetensors file (tensor {name!r}: {one_line(e)})") from None
        want = math.prod(entry.shape) * numpy_dtype(entry.dtype).itemsize
        if entry.end - entry.start != want or entry.end > file_size or entry.start < data_start:
            raise ValueError(
                f"{source}: not a readable safetensors file (tensor {name!r} at bytes {begin}..{end} of the data, "
                f"{want} bytes expected, file of {file_size} bytes; an interrupted download, copy or export "
                "leaves it truncated)"
            )
        entries[name] = entry
    return SafetensorsHeader(raw, entries, dict(metadata), data_start)


def object_size(url: str) -> tuple[int, str]:
    """(size in bytes, version tag) of the object `url` (its generation, etag or modification time, whichever the
    filesystem reports); FileNotFoundError naming it when there is none."""
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: no such object") from None
    version = next((str(info[k]) for k in ("generation", "etag", "ETag", "mtime", "updated") if info.get(k)), "")
    return int(info["size"]), version


_header_lock = threading.Lock()
_headers: dict[tuple[str, int, str], SafetensorsHeader] = {}  # (url, size, version) → header: once per process


def read_headers(urls: Sequence[str], sizes: Sequence[int], reader: RangeReader | None = None) -> list:
    """The parsed headers of the safetensors objects `urls` (of `sizes` bytes): every 8-byte length prefix in one
    concurrent round, then every header — two requests per file, and not one byte of tensor data."""
    reader = reader or default_reader()
    for url, size in zip(urls, sizes, strict=True):
        if size < 8:
            raise ValueError(f"{url}: not a readable safetensors file ({size} bytes, shorter than its header)")
    prefixes = reader.read_many(list(urls), [0] * len(urls), [8] * len(urls))
    lengths = [struct.unpack("<Q", p)[0] for p in prefixes]
    for url, size, n in zip(urls, sizes, lengths, strict=True):
        if n > size - 8 or n > 100_000_000:
            raise ValueError(
                f"{url}: not a readable safetensors file (header of {n} bytes in a file of {size} bytes); expected a "
                "complete safetensors file (an interrupted download, copy or export leaves it truncated)"
            )
    raws = reader.read_many(list(urls), [8] * len(urls), [8 + n for n in lengths])
    return [parse_header(raw, size, url) for raw, size, url in zip(raws, sizes, urls, strict=True)]


def headers_of(urls: Sequence[str]) -> list[SafetensorsHeader]:
    """The headers of the safetensors objects `urls`, each read once per process for each version of its object
    (the ones not read yet in two concurrent rounds, `read_headers`)."""
    keys = [(url, *object_size(url)) for url in urls]
    with _header_lock:
        missing = [k for k in dict.fromkeys(keys) if k not in _headers]
        if missing:
            read = read_headers([k[0] for k in missing], [k[1] for k in missing])
            _headers.update(zip(missing, read, strict=True))
        return [_headers[k] for k in keys]


def header_of(url: str) -> SafetensorsHeader:
    """The header of the safetensors object `url` (`headers_of`)."""
    return headers_of([url])[0]


def block_bounds(shape: Sequence[int], index) -> list[tuple[int, int]]:
    """[(a_j, b_j)] of a slice or tuple of slices (step 1) into `shape`; missing trailing axes read whole."""
    index = index if isinstance(index, tuple) else (index,)
    index = index + (slice(None),) * (len(shape) - len(index))
    bounds = []
    for s, n in zip(index, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"only contiguous slices (step 1) are read, got {s}")
        bounds.append((start, max(start, stop)))
    return bounds


def merge_runs(starts: np.ndarray, length: int) -> list[tuple[int, int]]:
    """The runs [s, s + length) for s in `starts` as sorted, disjoint [start, end) spans, touching or overlapping
    runs merged (no byte outside the runs is added)."""
    spans: list[list[int]] = []
    for s in sorted(set(starts.tolist())):
        if spans and s <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], s + length)
        else:
            spans.append([s, s + length])
    return [(a, b) for a, b in spans]


class RemoteSlice:
    """`safe_open(...).get_slice(name)`'s interface for one tensor of a remote file: `get_shape()`, `get_dtype()`
    and `[index]` (a slice or a tuple of slices, step 1) → numpy array, reading only the block's byte runs.

    `prefetch(indices)` reads the runs of several blocks at once (the runs of all of them merged where they touch,
    fetched concurrently) and keeps them until `forget()`; `[index]` of a prefetched block makes no request."""

    def __init__(self, url: str, entry: TensorEntry, reader: RangeReader):
        self.url, self.entry, self.reader = url, entry, reader
        self.spans: list[tuple[int, bytes]] = []  # prefetched (absolute start, bytes), sorted

    def get_shape(self) -> list[int]:
        return list(self.entry.shape)

    def get_dtype(self) -> str:
        return self.entry.dtype

    def runs(self, index) -> tuple[np.ndarray, int, tuple[int, ...]]:
        """(absolute starts, run length, block shape) of the block `index`."""
        bounds = block_bounds(self.entry.shape, index)
        starts, length = byte_runs(self.entry.shape, numpy_dtype(self.entry.dtype).itemsize, bounds)
        return starts + self.entry.start, length, tuple(b - a for a, b in bounds)

    def prefetch(self, indices: Sequence) -> None:
        """Read the blocks `indices` now (merged spans, `RangeReader.read`) and keep their bytes."""
        spans = []
        for index in indices:
            starts, length_i, _ = self.runs(index)
            spans += merge_runs(starts, length_i) if len(starts) else []
        merged: list[list[int]] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        req_starts, req_ends = [], []
        for a, b in merged:
            s, e = split_runs(np.asarray([a], np.int64), b - a, self.reader.part_bytes)
            req_starts += s
            req_ends += e
        pieces = self.reader.read(self.url, req_starts, req_ends)
        self.spans = sorted(zip(req_starts, pieces, strict=True))

    def forget(self) -> None:
        self.spans = []

    def _from_spans(self, starts: np.ndarray, length: int) -> np.ndarray | None:
        if not self.spans:
            return None
        import bisect

        firsts = [s for s, _ in self.spans]
        out = np.empty(len(starts) * length, np.uint8)
        pos = 0
        for s in starts.tolist():
            need, end = s, s + length
            while need < end:
                k = bisect.bisect_right(firsts, need) - 1
                if k < 0:
                    return None
                span_start, data = self.spans[k]
                if need >= span_start + len(data):
                    return None
                take = min(end, span_start + len(data)) - need
                out[pos : pos + take] = np.frombuffer(data, np.uint8, take, need - span_start)
                pos += take
                need += take
        return out

    def __getitem__(self, index) -> np.ndarray:
        starts, length, block = self.runs(index)
        dtype = numpy_dtype(self.entry.dtype)
        if not len(starts):
            return np.zeros(block, dtype)
        out = self._from_spans(starts, length)
        if out is None:
            req_starts, req_ends = split_runs(starts, length, self.reader.part_bytes)
            out = np.empty(sum(e - s for s, e in zip(req_starts, req_ends)), np.uint8)
            pos = 0
            for piece in self.reader.read(self.url, req_starts, req_ends):
                out[pos : pos + len(piece)] = np.frombuffer(piece, np.uint8)
                pos += len(piece)
        return out.view(dtype).reshape(block)


class RecordingSlice:
    """Stands in for a slice reader to learn which blocks a computation reads: `[index]` records the index and
    returns zeros of the block's shape (uint8)."""

    def __init__(self, shape: Sequence[int]):
        self.shape, self.indices = tuple(shape), []

    def __getitem__(self, index) -> np.ndarray:
        self.indices.append(index)
        return np.zeros(tuple(b - a for a, b in block_bounds(self.shape, index)), np.uint8)


class RemoteSafetensors:
    """`safe_open(url, "np")`'s interface (`keys()`, `metadata()`, `get_slice(name)`, `get_tensor(name)`) for a
    safetensors object at a URL; the header is read once per process (`header_of`)."""

    def __init__(self, url: str, reader: RangeReader | None = None, header: SafetensorsHeader | None = None):
        self.url = url
        self.reader = reader or default_reader()
        self.header = header or header_of(url)

    def keys(self) -> list[str]:
        return list(self.header.entries)

    def metadata(self) -> dict[str, str]:
        return dict(self.header.metadata)

    def get_slice(self, name: str) -> RemoteSlice:
        return RemoteSlice(self.url, self.header.entries[name], self.reader)

    def get_tensor(self, name: str) -> np.ndarray:
        return self.get_slice(name)[()]
