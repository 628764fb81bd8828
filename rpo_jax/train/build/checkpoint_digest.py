"""What names a checkpoint's weights in a run's identity, cheaply by default (`config.train.verify_weights`):

* "fingerprint" (default): sha256 over config.json and model.safetensors.index.json (whole), and for every
  `*.safetensors` file its name, size and header (every tensor's name, dtype, shape and byte offsets, and the
  metadata), plus `SAMPLES` ranges of `SAMPLE_BYTES` bytes of every tensor's data — its first bytes, its last, and
  evenly spaced ones between (`sample_ranges`). It reads a few KB per tensor: milliseconds on a local disk, one
  round of concurrent range requests in a bucket. Prefixed "fingerprint:".
* "full": sha256 over config.json and every byte of every `*.safetensors` file (the identity before
  verify_weights existed, unchanged): the whole checkpoint read on every process at every start.

What "fingerprint" cannot see (docs/guides/tpu_pods.md): a change to a tensor's values that keeps the file's size
and header and leaves its sampled bytes alone — e.g. a few elements edited in place in the middle of a tensor, or
two tensors of one shape and dtype swapped between the same offsets that happen to agree in the sampled bytes. A
tensor rewritten as a whole (fine-tuned, re-initialised, re-quantized, converted) changes its sampled bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

from rpo_jax.models.safetensors_io import default_reader, filesystem, headers_of, is_url, object_size

#: bytes in each sampled range, and ranges per tensor (first, last and evenly spaced between).
SAMPLE_BYTES = 64
SAMPLES = 4
METHODS = ("fingerprint", "full")


def sample_ranges(start: int, end: int, samples: int = SAMPLES, size: int = SAMPLE_BYTES) -> list[tuple[int, int]]:
    """The byte ranges sampled from a tensor stored at [start, end): with n = end − start and b = min(size, n),
    the ranges [start + ⌊k·(n − b)/(samples − 1)⌋, … + b) for k = 0 … samples − 1, duplicates removed (a tensor of
    at most `size` bytes is read whole; an empty one not at all)."""
    n = end - start
    if n <= 0:
        return []
    b = min(size, n)
    firsts = sorted({start + (k * (n - b)) // max(1, samples - 1) for k in range(samples)})
    return [(s, s + b) for s in firsts]


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if is_url(root) else os.path.join(root, name)


def checkpoint_files(root: str) -> tuple[list[str], list[str]]:
    """(JSON files hashed whole: config.json, model.safetensors.index.json where present; the `*.safetensors`
    files), names sorted, of the checkpoint directory `root` (local or a URL)."""
    fs, path = filesystem(root)
    try:
        names = sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        raise FileNotFoundError(f"{root}: no such checkpoint directory") from None
    whole = [n for n in ("config.json", "model.safetensors.index.json") if n in names]
    return whole, [n for n in names if n.endswith(".safetensors")]


def fingerprint(root: str) -> str:
    """`"fingerprint:" + sha256` of the checkpoint directory `root` (module docstring), local or a URL."""
    whole, weights = checkpoint_files(root)
    h = hashlib.sha256()
    reader = default_reader()
    fs, _ = filesystem(root)
    for name in whole:
        h.update(name.encode() + b"\0" + fs.cat_file(filesystem(_join(root, name))[1]))
    urls = [_join(root, n) for n in weights]
    headers = headers_of(urls)
    sampled_urls, starts, ends = [], [], []
    for url, header in zip(urls, headers, strict=True):
        for entry in header.entries.values():
            for s, e in sample_ranges(entry.start, entry.end):
                sampled_urls.append(url)
                starts.append(s)
                ends.append(e)
    samples = iter(reader.read_many(sampled_urls, starts, ends))
    for name, url, header in zip(weights, urls, headers, strict=True):
        size = object_size(url)[0]
        h.update(json.dumps({"file": name, "size": size}).encode() + header.raw)
        for entry in header.entries.values():
            for _ in sample_ranges(entry.start, entry.end):
                h.update(next(samples))
    return "fingerprint:" + h.hexdigest()


def _file_state(root: str) -> tuple:
    whole, weights = checkpoint_files(root)
    return tuple((n, *object_size(_join(root, n))) for n in whole + weights)


@functools.lru_cache(maxsize=16)
def _full_digest(root: str, state: tuple) -> str:
    del state  # part of the cache key only: a file rewritten in place is hashed again
    fs, _ = filesystem(root)
    whole, weights = checkpoint_files(root)
    h = hashlib.sha256()
    for name in [n for n in whole if n == "config.json"] + weights:
        h.update(name.encode())
        with fs.open(filesystem(_join(root, name))[1], "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def full_hash(root: str) -> str:
    """sha256 over config.json and the bytes of every safetensors file of the checkpoint directory `root` (local
    or a URL; computed once per process for files whose sizes and versions have not changed)."""
    return _full_digest(root, _file_state(root))


def digest(path: str | os.PathLike, method: str = "fingerprint") -> str:
    """The checkpoint directory `path` named by `method` ("fingerprint" or "full", `config.train.verify_weights`)."""
    if method not in METHODS:
        raise ValueError(f"config.train.verify_weights={method!r}: expected one of {METHODS}")
    root = os.fspath(path) if is_url(path) else os.path.realpath(os.fspath(path))
    return fingerprint(root) if method == "fingerprint" else full_hash(root)
