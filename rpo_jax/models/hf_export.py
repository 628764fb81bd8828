"""`Decoder` → Hugging Face checkpoint, streamed: `save_hf` writes Hugging Face's sharded safetensors layout one
piece of one tensor at a time, so the model is never whole in host memory — neither on the writing process nor
on any other.

Layout (what `save_pretrained` writes): tensors in the order embed, layer 0 … layer L−1, final norm, lm_head,
extra tensors (a reward model's `score.weight`), split into shards by `huggingface_hub`'s rule (a tensor that would
take a shard past `max_shard_size` starts a new one; one larger than it gets a shard of its own): one shard is
`model.safetensors`; n > 1 are `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`
({"metadata": {"total_parameters", "total_size"}, "weight_map"}). `max_shard_size` is a size string ("5GB",
"500MB": 10^9 and 10^6 bytes, as transformers reads it) or a byte count; the default, "50GB", is
`save_pretrained`'s.

Streaming: each shard's header is written first (every tensor's dtype and shape are known without its values),
then each tensor's bytes, in pieces of at most `GATHER_BYTES` rows: for each piece one compiled program takes the
rows [r, r + c) of the tensor in Hugging Face's layout (the layer picked from a stacked parameter, transposed /
reshaped) from the sharded array and replicates them on its mesh; the writing process (process 0) copies them to
host memory and writes them. Every process runs the same programs in the same order (they are collectives), only
the writer touches files. Extra host memory on the writer: one piece (≤ GATHER_BYTES) — and, on CPU devices, whose
memory is host memory, one per local device.

Files are written into `out_dir` (local, or a URL through fsspec) with config.json last: a directory without
config.json is not a checkpoint (loaders, and `rpo_jax.train.core.export`'s atomic rename, rely on it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from rpo_jax.models.config import ModelConfig
from rpo_jax.models.hf_io import LM_HEAD_RULE, KeyRule, key_table, to_hf_layout
from rpo_jax.models.model import Decoder
from rpo_jax.models.safetensors_io import filesystem, is_url, safetensors_dtype

#: transformers' `save_pretrained(max_shard_size=...)` default.
DEFAULT_MAX_SHARD_SIZE = "50GB"
#: the largest piece of a tensor gathered to the writing process at once (bytes).
GATHER_BYTES = 16 << 20
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str, field: str = "max_shard_size") -> int:
    """Bytes of a size: an int as is; a string "<number><unit>" with unit B, KB, MB, GB, TB (powers of 10, as
    transformers and huggingface_hub read them) or KiB, MiB, GiB, TiB (powers of 2), case-insensitive. A
    ValueError naming `field` for anything else or a size < 1."""
    if isinstance(size, bool):
        raise ValueError(f"{field}={size!r}: expected a size such as '5GB' or a number of bytes")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(
                f"{field}={size!r}: expected a size such as '5GB', '500MB' or '2GiB' (units B, KB, MB, GB, TB, "
                "KiB, MiB, GiB, TiB) or a number of bytes"
            )
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value < 1:
        raise ValueError(f"{field}={size!r}: expected at least 1 byte")
    return value


# ----------------------------------------------------------------------------------------------- what is written
@dataclasses.dataclass(frozen=True)
class ExportTensor:
    """One tensor of the export: its Hugging Face `name`, `shape` and `dtype`, and where its values are:
    `source` (a jax or numpy array in our layout), `layer` (the index into a stacked parameter's layer axis, or
    None) and `transform` (the `KeyRule` transform to Hugging Face's layout)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    source: Any = None
    layer: int | None = None
    transform: str = "identity"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def _hf_name(rule: KeyRule) -> str:
    return rule.hf_name if rule.path == ("lm_head",) else "model." + rule.hf_name


def _rules(config: ModelConfig) -> list[KeyRule]:
    return key_table(config) + ([] if config.tie_word_embeddings else [LM_HEAD_RULE])


def ordered_rules(config: ModelConfig) -> list[tuple[KeyRule, int | None]]:
    """(rule, layer) of every Hugging Face tensor in `save_pretrained`'s order: the embedding, each layer's
    tensors, the final norm, lm_head (untied models)."""
    rules = _rules(config)
    head = [(r, None) for r in rules if not r.stacked and r.path == ("embed",)]
    layers = [(r, i) for i in range(config.num_layers) for r in rules if r.stacked]
    tail = [(r, None) for r in rules if not r.stacked and r.path != ("embed",)]
    return head + layers + tail


def _shape_in_hf(shape: Sequence[int], transform: str) -> tuple[int, ...]:
    """Our per-tensor shape (no layer axis) → Hugging Face's (the transforms of `KeyRule`)."""
    return tuple(to_hf_layout(np.empty(tuple(shape), np.uint8), transform).shape)


def tensors_of(model: Decoder, config: ModelConfig, extra_tensors: Mapping[str, Any] | None = None):
    """Every tensor `save_hf` writes for `model`, in order (`ordered_rules`, then `extra_tensors`: name → jax or
    numpy array, written as they are); ValueError for an extra name that collides with a decoder tensor."""
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    out = []
    for rule, layer in ordered_rules(config):
        value = flat[rule.path].get_value()
        shape = value.shape[1:] if rule.stacked else value.shape
        name = _hf_name(rule).format(i=layer)
        out.append(
            ExportTensor(name, _shape_in_hf(shape, rule.transform), np.dtype(value.dtype), value, layer, rule.transform)
        )
    names = {t.name for t in out}
    for name, value in (extra_tensors or {}).items():
        if name in names:
            raise ValueError(f"save_hf: extra tensor {name!r} collides with a decoder tensor")
        out.append(ExportTensor(name, tuple(value.shape), np.dtype(value.dtype), value))
    return out


def abstract_tensors(config: ModelConfig, param_dtype, extra: Mapping[str, tuple[int, ...]] | None = None):
    """The `ExportTensor`s (without values) `save_hf` writes for a `config` model stored in `param_dtype`, plus
    `extra` (name → shape, same dtype): what an export writes, known before any weight exists (`rpo-plan`)."""
    from rpo_jax.models.model import Decoder as _Decoder

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: _Decoder(config, rngs=nnx.Rngs(0), param_dtype=param_dtype))
    flat = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    out = []
    for rule, layer in ordered_rules(config):
        value = flat[rule.path].get_value()
        shape = value.shape[1:] if rule.stacked else value.shape
        out.append(
            ExportTensor(_hf_name(rule).format(i=layer), _shape_in_hf(shape, rule.transform), np.dtype(param_dtype))
        )
    out += [ExportTensor(name, tuple(shape), np.dtype(param_dtype)) for name, shape in (extra or {}).items()]
    return out


def shard_plan(tensors: Sequence[ExportTensor], max_shard_size: int | str) -> list[tuple[str, list[str]]]:
    """(file name, tensor names) of each shard, as `save_pretrained` splits the same tensors
    (`huggingface_hub.serialization.split_state_dict_into_shards_factory`, given their byte sizes)."""
    from huggingface_hub.serialization import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(
        {t.name: t for t in tensors},
        get_storage_size=lambda t: t.nbytes,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=parse_size(max_shard_size),
    )
    return [(name, list(names)) for name, names in split.filename_to_tensors.items()]


def safetensors_header(tensors: Sequence[ExportTensor], metadata: Mapping[str, str]) -> bytes:
    """The first bytes of a safetensors file holding `tensors` in order: the 8-byte little-endian length N, then N
    bytes of JSON (dtype, shape, data_offsets of each tensor; `metadata` as "__metadata__"), padded with spaces so
    that the data starts at a multiple of 8 — as the safetensors library writes it."""
    fields: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in tensors:
        fields[t.name] = {
            "dtype": safetensors_dtype(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(fields, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


# ----------------------------------------------------------------------------------------------- gathering
@functools.lru_cache(maxsize=256)
def _piece_program(transform: str, stacked: bool, rows: int, out_sharding):
    def piece(x, layer, start):
        t = jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False) if stacked else x
        t = to_hf_layout(t, transform)
        return jax.lax.dynamic_slice_in_dim(t, start, rows, axis=0)

    return jax.jit(piece, out_shardings=out_sharding)


def rows_per_piece(tensor: ExportTensor, piece_bytes: int = GATHER_BYTES) -> int:
    """Rows (leading-axis entries of the Hugging Face tensor) per gathered piece: ⌊piece_bytes / row bytes⌋,
    at least 1, at most all."""
    n = tensor.shape[0] if tensor.shape else 1
    row = max(1, tensor.nbytes // max(1, n))
    return max(1, min(n, piece_bytes // row))


def host_pieces(tensor: ExportTensor, *, fetch: bool, piece_bytes: int = GATHER_BYTES) -> Iterator[np.ndarray]:
    """The tensor's values in Hugging Face's layout as consecutive row blocks (numpy, on this process when
    `fetch`; otherwise the same programs run — they are collectives — and nothing is yielded). A numpy source is
    sliced in place; a jax array goes through `_piece_program` (rows [s, s + c) with s = min(r, n − c), so one
    program serves every piece of a tensor, the last overlapping the one before)."""
    source = tensor.source
    if not isinstance(source, jax.Array):
        array = np.asarray(source)
        array = array[tensor.layer] if tensor.layer is not None else array
        array = np.ascontiguousarray(to_hf_layout(array, tensor.transform)).reshape(tensor.shape)
        if fetch:
            yield array
        return
    if not tensor.shape:
        if fetch:
            yield np.asarray(jax.device_get(source)).reshape(())
        return
    n, rows = tensor.shape[0], rows_per_piece(tensor, piece_bytes)
    sharding = source.sharding
    out = (
        jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        if isinstance(sharding, jax.sharding.NamedSharding)
        else None
    )
    program = _piece_program(tensor.transform, tensor.layer is not None, rows, out)
    layer = np.int32(tensor.layer or 0)
    position = 0
    while position < n:
        start = min(position, n - rows)
        piece = program(source, layer, np.int32(start))
        if fetch:
            values = np.asarray(piece)[position - start :]
            del piece
            yield values
            del values  # before the next piece is gathered: one piece on the host at a time
        else:
            piece.block_until_ready()
            del piece
        position = start + rows


# ----------------------------------------------------------------------------------------------- writing
class Target:
    """Where an export's files go: a local directory or a URL (fsspec); `open(name)` a file for writing,
    `put(local_file, name)` an upload. Nothing is done on a process that does not write (`writes` False)."""

    def __init__(self, out_dir: str | os.PathLike, writes: bool):
        self.out, self.writes = out_dir, writes
        self.url = is_url(out_dir)

    def path(self, name: str) -> str:
        return f"{os.fspath(self.out).rstrip('/')}/{name}" if self.url else os.path.join(self.out, name)

    def open(self, name: str):
        if self.url:
            fs, path = filesystem(self.path(name))
            return fs.open(path, "wb")
        return open(self.path(name), "wb")

    def put(self, local: str, name: str) -> None:
        fs, path = filesystem(self.path(name))
        fs.put_file(local, path)


def write_shards(
    tensors: Sequence[ExportTensor], target: Target, max_shard_size: int | str, piece_bytes: int = GATHER_BYTES
) -> list[str]:
    """Write `tensors` as `shard_plan` splits them (and the index when there are several shards); returns the
    file names. Every process calls it (the pieces are gathered collectively), only `target.writes` writes."""
    plan = shard_plan(tensors, max_shard_size)
    by_name = {t.name: t for t in tensors}
    sharded = len(plan) > 1
    files = []
    for generated, names in plan:
        name = generated if sharded else SINGLE_FILE
        shard = [by_name[n] for n in names]
        handle = target.open(name) if target.writes else None
        try:
            if handle is not None:
                handle.write(safetensors_header(shard, {"format": "pt"}))
            for tensor in shard:
                for values in host_pieces(tensor, fetch=handle is not None, piece_bytes=piece_bytes):
                    handle.write(memoryview(np.ascontiguousarray(values).view(np.uint8)).cast("B"))
                    del values
        finally:
            if handle is not None:
                handle.close()
        files.append(name)
    if sharded and target.writes:
        index = {
            "metadata": {
                "total_parameters": sum(math.prod(t.shape) for t in tensors),
                "total_size": sum(t.nbytes for t in tensors),
            },
            "weight_map": {n: f for f, names in plan for n in names},
        }
        with target.open(INDEX_FILE) as f:
            f.write((json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        files.append(INDEX_FILE)
    return files


def _check_directory(out: pathlib.Path, files: Sequence[str]) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory; save_hf writes a checkpoint directory")
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(  # the index first
        (
            p.name
            for p in out.iterdir()
            if (p.name == INDEX_FILE or p.name.endswith(".safetensors")) and p.name not in files
        ),
        key=lambda name: (not name.endswith(".json"), name),
    )
    if stale:
        raise ValueError(
            f"{out}: holds another safetensors checkpoint {list(stale[:8])}{' ...' if len(stale) > 8 else ''}, which "
            f"loaders would read instead of (or beside) the {', '.join(files)} written here; expected a new or empty "
            "directory (or one with an earlier export of the same layout)"
        )


def save_hf(
    model: Decoder,
    config: ModelConfig,
    out_dir: str | os.PathLike,
    tokenizer=None,
    *,
    extra_tensors: Mapping[str, Any] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    config_updates: Mapping[str, Any] | None = None,
    piece_bytes: int = GATHER_BYTES,
) -> pathlib.Path | str:
    """Writes `config.json` (transformers-5 format, updated with `config_updates`) + the safetensors weights
    (module docstring: one `model.safetensors`, or shards and an index past `max_shard_size`) (+ tokenizer files)
    to `out_dir`, a local directory or a URL; returns it. Every process of a multi-process run calls it (the
    pieces of each tensor are gathered collectively); process 0 writes.

    `extra_tensors` (name → jax or numpy array) are written as they are after the decoder's tensors (e.g. a reward
    model's `score.weight`); a name that collides with a decoder tensor is a ValueError. Tensors are stored in the
    model's parameter dtype with Hugging Face names for `XForCausalLM` (a Gemma 3 multimodal checkpoint is
    exported as its text tower, `Gemma3ForCausalLM`).

    A local `out_dir` is created (with its parents) when missing; an existing directory is written into, unless
    it holds safetensors files or an index this export does not write (which loaders would read instead: a
    ValueError naming them). Files get the process's normal mode, 0o666 & ~umask. config.json is written last.

    Args:
        model: the `Decoder`.
        config: its `ModelConfig`.
        out_dir: a local directory or a URL.
        tokenizer: also save this tokenizer's files (`None`: none).
        extra_tensors: name → array, written after the decoder's tensors.
        max_shard_size: bytes (or `"50GB"`-style) per safetensors shard.
        config_updates: fields merged into config.json.
        piece_bytes: how much of a tensor is gathered to the host at a time.

    Returns:
        `out_dir`.
    """
    quantized = [
        n for n, v in vars(model.layers).items() if isinstance(v, nnx.Variable) and not isinstance(v, nnx.Param)
    ]
    if quantized:
        raise ValueError(
            f"save_hf: the base is quantized ({', '.join(quantized[:2])}, ...: rpo_jax.models.quantize) "
            "and is not written as a float checkpoint; call quantize.dequantize_base(model) first to "
            "export the quantized weights explicitly"
        )
    tensors = tensors_of(model, config, extra_tensors)
    plan = shard_plan(tensors, max_shard_size)
    files = [f for f, _ in plan] + [INDEX_FILE] if len(plan) > 1 else [SINGLE_FILE]
    writes = jax.process_index() == 0
    target = Target(out_dir, writes)
    if writes and not target.url:
        _check_directory(pathlib.Path(out_dir), files)
    write_shards(tensors, target, max_shard_size, piece_bytes)
    if writes:
        hf = config.to_hf_dict()
        hf["dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
            str(model.param_dtype), "float32"
        )
        hf.update(config_updates or {})
        if tokenizer is not None:
            save_tokenizer(tokenizer, target)
        with target.open("config.json") as f:
            f.write((json.dumps(hf, indent=2) + "\n").encode())
    return out_dir if target.url else pathlib.Path(out_dir)


def save_tokenizer(tokenizer, target: Target) -> None:
    """`tokenizer.save_pretrained` into the target (through a local temporary directory for a URL)."""
    if not target.url:
        tokenizer.save_pretrained(os.fspath(target.out))
        return
    with tempfile.TemporaryDirectory(prefix="rpo_jax-tokenizer-") as local:
        tokenizer.save_pretrained(local)
        for name in sorted(os.listdir(local)):
            if os.path.isfile(os.path.join(local, name)) and name != "config.json":
                target.put(os.path.join(local, name), name)


def piece_size(tensor: ExportTensor, piece_bytes: int = GATHER_BYTES) -> int:
    """Bytes of the largest piece of `tensor` gathered at once: rows_per_piece · row bytes."""
    n = tensor.shape[0] if tensor.shape else 1
    return rows_per_piece(tensor, piece_bytes) * (tensor.nbytes // max(1, n))


def export_memory(tensors: Sequence[ExportTensor], local_cpu_devices: int = 0, piece_bytes: int = GATHER_BYTES) -> int:
    """Extra host bytes the writing process needs for an export of `tensors`: the largest piece gathered
    (`piece_size`), once in host memory and once per local CPU device (whose memory is host memory; 0 on
    accelerators). Independent of the model's size beyond its largest tensor."""
    largest = max((piece_size(t, piece_bytes) for t in tensors), default=0)
    return largest * (1 + local_cpu_devices)
