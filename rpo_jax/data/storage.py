"""Where run and data files live: a local path or any fsspec URL (`gs://bucket/run`, `s3://…`), one helper for
every file the package reads or writes there.

Paths are `etils.epath.Path`s: a local path is an ordinary file, a URL goes through fsspec (gcsfs for `gs://`),
chosen by the path alone, so no code below asks which it is except where object stores differ from a
filesystem (chosen over a hand-written storage client: epath and fsspec are what orbax, TFDS and grain use).
Orbax writes checkpoints to `gs://` itself (TensorStore), tensorboardX writes event files there itself.

What an object store is not, and how this module copes:

* no append: a record log is rewritten as a whole object (`rpo_jax.train.core.metrics`); `write_atomically`
  replaces a file or object in one step (a local file through a temporary file and a rename; an object is
  replaced whole by a single upload, never seen half-written);
* renames are copies: `move` copies and deletes on object stores (an interrupted move can leave both);
* listing can be eventually consistent: what a run must find again is named, not listed, where it can be
  (checkpoint steps are listed by orbax, which also writes a commit marker per checkpoint).

Tests run against a local GCS emulator (`tests/gcs_emulator.py`); on Google Cloud the same URLs use
application-default credentials.
"""

from __future__ import annotations

import atexit
import contextlib
import gzip
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
    """Whether `path` names an object store (`scheme://…`) rather than a local file."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    """`path` as an `epath.Path` (a local path as given, relative or not; a URL unchanged)."""
    return path if isinstance(path, epath.Path) else epath.Path(path)


def location(path: PathLike) -> str:
    """`path` as a string, absolute when local (what orbax and other libraries taking a directory are given)."""
    return os.fspath(path) if is_url(path) else os.path.abspath(os.fspath(path))


def open_binary(path: PathLike):
    """`path` opened for reading bytes (a local file or an object), decompressed when it ends in `.gz`."""
    handle = as_path(path).open("rb")
    return gzip.GzipFile(fileobj=handle, mode="rb") if os.fspath(path).endswith(".gz") else handle


def write_atomically(path: PathLike, data: str | bytes) -> None:
    """Replace the file or object `path` with `data` so that a reader sees the old content or the new, never a
    part: locally written beside it and renamed over it, on an object store one upload of the whole object."""
    path = as_path(path)
    if is_url(path):
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
    os.replace(tmp, path)


def move(source: PathLike, target: PathLike) -> None:
    """Move a file or directory to `target`, replacing a file there (a copy and a delete on object stores)."""
    source, target = as_path(source), as_path(target)
    if not is_url(source) and not is_url(target):
        os.replace(source, target)
        return
    if source.is_dir():
        copy_tree(source, target)
        remove_tree(source)
        return
    source.copy(target, overwrite=True)
    source.unlink()


def copy_tree(source: PathLike, target: PathLike, *, last: str | None = None) -> None:
    """Copy every file under the directory `source` to the same relative name under `target` (files named `last`
    copied after all others: a reader that waits for that file sees a complete directory)."""
    source, target = as_path(source), as_path(target)
    for file in sorted(walk_files(source), key=lambda f: (f.name == last, os.fspath(f))):
        dest = target / os.path.relpath(os.fspath(file), os.fspath(source))
        dest.parent.mkdir(parents=True, exist_ok=True)
        file.copy(dest, overwrite=True)


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
    """A local path holding what `path` holds: `path` itself when local, else a temporary copy of the object or
    of every object under the directory (removed on exit), for readers that need a local file (`datasets`' Arrow
    files and `save_to_disk` directories, memory-mapped by pyarrow)."""
    if not is_url(path):
        yield os.fspath(path)
        return
    source = as_path(path)
    with tempfile.TemporaryDirectory(prefix="rpo_jax_copy_") as tmp:
        target = epath.Path(tmp) / source.name
        if source.is_dir():
            copy_tree(source, target)
        else:
            source.copy(target)
        yield os.fspath(target)


#: names of weight files, which `cached_copy` leaves where they are by default
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_copies: dict[tuple[str, tuple[str, ...]], str] = {}
_copies_lock = threading.Lock()


def cached_copy(url: PathLike, *, skip_suffixes: tuple[str, ...] = WEIGHT_SUFFIXES) -> str:
    """A local directory holding the files directly under the directory `url` (not in its subdirectories), except
    those whose names end in `skip_suffixes` (weights): each file read whole, once per process; the copy lives in a
    temporary directory removed when the process exits. A local path is returned as it is. For small files read
    by libraries that need a local directory: tokenizers (`AutoTokenizer.from_pretrained`), PEFT adapters. A
    URL with no such file is a FileNotFoundError naming it."""
    if not is_url(url):
        return os.fspath(url)
    key = (os.fspath(url).rstrip("/"), tuple(skip_suffixes))
    with _copies_lock:
        if key in _copies:
            return _copies[key]
        source = as_path(key[0])
        try:
            files = [p for p in source.iterdir() if not p.name.endswith(skip_suffixes) and p.is_file()]
        except (FileNotFoundError, NotADirectoryError):
            files = []
        if not files:
            raise FileNotFoundError(f"{key[0]}: no such directory, or no file in it to read")
        local = tempfile.mkdtemp(prefix="rpo_jax_files_")
        atexit.register(shutil.rmtree, local, True)
        for file in files:
            (epath.Path(local) / file.name).write_bytes(file.read_bytes())
        _copies[key] = local
        return local


def remove_tree(path: PathLike) -> None:
    """Delete the directory `path` and everything under it (nothing when it does not exist)."""
    path = as_path(path)
    if not is_url(path):
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.rmtree()


def walk_files(root: PathLike) -> Iterator[epath.Path]:
    """Every file under the directory `root`, recursively, as paths starting with `root`."""
    root = as_path(root)
    prefix = os.fspath(root)
    for directory, _, files in root.walk():
        directory = os.fspath(directory)
        if is_url(prefix) and not is_url(directory):  # fsspec walks return paths without the scheme
            directory = prefix.split("://", 1)[0] + "://" + directory
        for name in files:
            yield epath.Path(directory) / name
