"""Hugging Face checkpoints → `Decoder`: a declarative key table and `load_hf` (sharded, slice-wise); the way
back, `save_hf`, streams tensors into sharded safetensors (`rpo_jax.models.hf_export`).

Only safetensors are read (no pickle, no remote code). With a mesh every tensor is built with
`jax.make_array_from_callback`, each device reading only its own slice through `safe_open(...).get_slice`,
so the model is never gathered on one device. A checkpoint directory may be a URL (`gs://bucket/model`, any
fsspec URL): config.json and the index are read whole, each safetensors header once per process, and each
device's slice by byte range (`rpo_jax.models.safetensors_io`) — a process reads its devices' slices and the
headers, nothing else (a slice shared by several of its devices is read once).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from rpo_jax.models.config import ModelConfig, check_architectures
from rpo_jax.models.model import Decoder
from rpo_jax.models.safetensors_io import RecordingSlice, RemoteSafetensors, headers_of, is_url
from rpo_jax.models.sharding import Rules, state_shardings

# ----------------------------------------------------------------------------------------------- key table


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """One parameter: our nnx state path ← Hugging Face tensor name (`{i}` = layer index) and a layout transform.

    Transforms (HF layout → ours):
      identity:   same layout
      transpose:  [a, b] → [b, a]                     (nn.Linear weight [out, in] → kernel [in, out])
      heads_in:   [heads·hd, D] → [D, heads, hd]       (q/k/v projections)
      heads_out:  [D, heads·hd] → [heads, hd, D]       (attention output projection)
      heads_bias: [heads·hd] → [heads, hd]             (q/k/v projection biases, Qwen2)
    `stacked` parameters have a leading layer axis; their HF tensors exist once per layer.
    """

    path: tuple[str, ...]
    hf_name: str
    transform: str = "identity"
    stacked: bool = False


#: each projection of a decoder layer (our parameter name = Hugging Face module name) → its module path inside a
#: Hugging Face decoder layer (also the names LoRA targets and PEFT keys use: `rpo_jax.models.lora`)
PROJECTION_MODULES: dict[str, str] = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
PROJECTION_TRANSFORMS = {
    "q_proj": "heads_in",
    "k_proj": "heads_in",
    "v_proj": "heads_in",
    "o_proj": "heads_out",
    "gate_proj": "transpose",
    "up_proj": "transpose",
    "down_proj": "transpose",
}


def key_table(config: ModelConfig) -> list[KeyRule]:
    """The full mapping for `config`, with HF names relative to the decoder prefix (e.g. "model.")."""
    gemma_sandwich = config.sandwich_norms
    rules = [KeyRule(("embed",), "embed_tokens.weight"), KeyRule(("final_norm",), "norm.weight")]
    layer = "layers.{i}."
    per_layer = [(name, f"{module}.weight", PROJECTION_TRANSFORMS[name]) for name, module in PROJECTION_MODULES.items()]
    per_layer += [("attn_in_norm", "input_layernorm.weight", "identity")]
    if gemma_sandwich:  # Gemma 2/3: post_attention_layernorm is the attention output norm
        per_layer += [
            ("attn_out_norm", "post_attention_layernorm.weight", "identity"),
            ("mlp_in_norm", "pre_feedforward_layernorm.weight", "identity"),
            ("mlp_out_norm", "post_feedforward_layernorm.weight", "identity"),
        ]
    else:  # Llama, Gemma 1: post_attention_layernorm is the MLP input norm
        per_layer += [("mlp_in_norm", "post_attention_layernorm.weight", "identity")]
    if config.qkv_bias:
        per_layer += [
            ("q_bias", "self_attn.q_proj.bias", "heads_bias"),
            ("k_bias", "self_attn.k_proj.bias", "heads_bias"),
            ("v_bias", "self_attn.v_proj.bias", "heads_bias"),
        ]
    if config.qk_norm:
        per_layer += [
            ("q_norm", "self_attn.q_norm.weight", "identity"),
            ("k_norm", "self_attn.k_norm.weight", "identity"),
        ]
    rules += [KeyRule(("layers", ours), layer + theirs, tr, stacked=True) for ours, theirs, tr in per_layer]
    return rules


LM_HEAD_RULE = KeyRule(("lm_head",), "lm_head.weight", "identity")

# Decoder prefixes, in order of preference: causal LM, multimodal Gemma 3 (transformers 5), (transformers 4).
_DECODER_PREFIXES = ("model.", "model.language_model.", "language_model.model.")
_LM_HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")
_MULTIMODAL_IGNORED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _hf_shape(ours: Sequence[int], transform: str) -> tuple[int, ...]:
    if transform == "identity":
        return tuple(ours)
    if transform == "transpose":
        return tuple(reversed(ours))
    if transform == "heads_in":
        d, h, hd = ours
        return (h * hd, d)
    if transform == "heads_out":
        h, hd, d = ours
        return (d, h * hd)
    if transform == "heads_bias":
        h, hd = ours
        return (h * hd,)
    raise ValueError(f"unknown transform {transform!r}")


def _read_block(slice_reader, transform: str, ours_shape: Sequence[int], index: tuple[slice, ...]) -> np.ndarray:
    """Reads the block `index` (in our layout, no layer axis) of one HF tensor, reading only what is needed."""
    idx = tuple(slice(*s.indices(n)) for s, n in zip(index, ours_shape, strict=True))
    if transform == "identity":
        return slice_reader[idx]
    if transform == "transpose":
        return slice_reader[idx[1], idx[0]].T
    if transform == "heads_in":
        sd, sh, shd = idx
        hd = ours_shape[2]
        block = slice_reader[slice(sh.start * hd, sh.stop * hd), sd]
        block = block.reshape(sh.stop - sh.start, hd, -1).transpose(2, 0, 1)
        return block[:, :, shd]
    if transform == "heads_out":
        sh, shd, sd = idx
        hd = ours_shape[1]
        block = slice_reader[sd, slice(sh.start * hd, sh.stop * hd)]
        block = block.reshape(-1, sh.stop - sh.start, hd).transpose(1, 2, 0)
        return block[:, shd, :]
    if transform == "heads_bias":
        sh, shd = idx
        hd = ours_shape[1]
        return slice_reader[slice(sh.start * hd, sh.stop * hd)].reshape(sh.stop - sh.start, hd)[:, shd]
    raise ValueError(f"unknown transform {transform!r}")


def to_hf_layout(array, transform: str):
    """`array` (numpy or jax, our layout) in Hugging Face's layout (the inverse of the `KeyRule` transform)."""
    if transform == "identity":
        return array
    if transform == "transpose":
        return array.T
    if transform == "heads_in":
        d, h, hd = array.shape
        return array.transpose(1, 2, 0).reshape(h * hd, d)
    if transform == "heads_out":
        h, hd, d = array.shape
        return array.transpose(2, 0, 1).reshape(d, h * hd)
    if transform == "heads_bias":
        return array.reshape(-1)
    raise ValueError(f"unknown transform {transform!r}")


# ----------------------------------------------------------------------------------------------- files


def resolve_checkpoint_dir(path_or_repo_id: str | os.PathLike) -> pathlib.Path:
    """A local directory as is; a URL (`gs://…`) as an `epath.Path` (read through fsspec, nothing downloaded);
    otherwise a hub id downloaded with `huggingface_hub.snapshot_download`."""
    s = str(path_or_repo_id)
    if is_url(s):
        return epath.Path(s.rstrip("/"))
    path = pathlib.Path(s).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(
            f"checkpoint path {s!r} is not a directory (expected a Hugging Face checkpoint directory with "
            "config.json and model.safetensors)"
        )
    if s.startswith(("/", ".", "~")) or s.count("/") != 1:
        raise FileNotFoundError(f"checkpoint directory {s!r} does not exist (and is not a hub id 'owner/name')")
    try:
        from huggingface_hub import snapshot_download

        return pathlib.Path(
            snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"])
        )
    except Exception as e:
        raise FileNotFoundError(f"{s!r} is not a local directory and could not be downloaded from the hub: {e}") from e


def _listing(directory: pathlib.Path) -> str:
    try:
        names = sorted(p.name for p in directory.iterdir())
    except OSError:  # a URL prefix with no object under it
        names = []
    return f"found {names[:12]}{' ...' if len(names) > 12 else ''}" if names else "the directory is empty"


_JSON_TYPES = {
    dict: "an object",
    list: "a JSON array",
    str: "a JSON string",
    int: "a JSON number",
    float: "a JSON number",
    bool: "a JSON boolean",
    type(None): "JSON null",
}


def _read_json_object(path: pathlib.Path) -> dict:
    """The JSON object in `path`; ValueError naming the file (and the line and column of a syntax error)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected a JSON file") from e
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object {{...}}, found {_JSON_TYPES.get(type(value), type(value))}")
    return value


def read_config_json(directory: pathlib.Path) -> tuple[pathlib.Path, dict[str, Any]]:
    """(path, fields) of `directory`/config.json: FileNotFoundError when it is missing, ValueError naming the file
    when it is not a JSON object (with the line and column of a JSON syntax error)."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{directory}: config.json is missing (expected a Hugging Face checkpoint: config.json and "
            f"model.safetensors; {_listing(directory)})"
        )
    return config_file, _read_json_object(config_file)


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _open_safetensors(path: pathlib.Path, header=None):
    from safetensors import safe_open

    try:
        if is_url(path):
            return RemoteSafetensors(os.fspath(path), header=header)
        return safe_open(str(path), framework="np")
    except Exception as e:  # SafetensorError (truncated, garbage), OSError (a directory, unreadable)
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(
            f"{path}: not a readable safetensors file ({reason}); expected a complete safetensors file "
            "(an interrupted download, copy or export leaves it truncated)"
        ) from e


class SafetensorsIndex:
    """Maps tensor names to open `safe_open` handles across single or sharded (`*.index.json`) checkpoints.

    `source` is the file that lists the tensors: `model.safetensors.index.json` when present (it wins over a
    `model.safetensors` next to it), else `model.safetensors`. Every error names the directory or file and what was
    expected: no safetensors (pickles named), an unreadable file, an index that is not a {"weight_map": {tensor:
    shard}} object, a missing shard, a shard without a tensor the index puts in it, or with tensors it does not list.
    """

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        index_file = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index_file.exists():
            weight_map = _read_json_object(index_file).get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and pathlib.PurePath(v).name == v and v
                for k, v in weight_map.items()
            ):
                raise ValueError(
                    f"{index_file}: weight_map is missing or malformed; expected an object "
                    '{"tensor name": "shard file name in this directory", ...}'
                )
            files = sorted(set(weight_map.values()))
            self.source = index_file
        elif single.exists():
            files, weight_map = ["model.safetensors"], None
            self.source = single
        else:
            pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
            if pickles:
                raise ValueError(
                    f"{directory}: only safetensors checkpoints are supported; found pickle files {pickles} "
                    "(convert them with transformers `save_pretrained(..., safe_serialization=True)`)"
                )
            raise FileNotFoundError(
                f"{directory}: no model.safetensors or model.safetensors.index.json ({_listing(directory)}); "
                "expected the safetensors weights that transformers' save_pretrained writes"
            )
        self.handles = {}
        for name in files:
            if not (directory / name).is_file():
                listed = sorted(k for k, v in weight_map.items() if v == name)
                raise FileNotFoundError(
                    f"{index_file}: shard {name} is missing ({len(listed)} tensors of weight_map, e.g. {listed[0]}, "
                    f"are in it); expected the file {directory / name}"
                )
        headers = [None] * len(files)
        if is_url(directory):  # every shard's header in two concurrent rounds (once per process)
            try:
                headers = headers_of([os.fspath(directory / name) for name in files])
            except ValueError as e:
                raise ValueError(f"{e}") from None
        for name, header in zip(files, headers, strict=True):
            self.handles[name] = _open_safetensors(directory / name, header)
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self.handles["model.safetensors"].keys()}
        else:
            held = {name: set(handle.keys()) for name, handle in self.handles.items()}
            for name in files:
                absent = sorted(k for k, v in weight_map.items() if v == name and k not in held[name])
                if absent:
                    raise ValueError(
                        f"{directory / name}: tensors {absent[:8]}{' ...' if len(absent) > 8 else ''} are missing "
                        f"({index_file.name} puts them in this shard)"
                    )
            for name in files:
                unlisted = sorted(k for k in held[name] if weight_map.get(k) != name)
                if unlisted:
                    raise ValueError(
                        f"{directory / name}: tensors {unlisted[:8]}{' ...' if len(unlisted) > 8 else ''} are not "
                        f"listed for this shard in {index_file} (expected every tensor of a shard in its weight_map)"
                    )
        self.weight_map: dict[str, str] = weight_map

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def file_of(self, key: str) -> str:
        return str(self.directory / self.weight_map[key])

    def get_slice(self, key: str):
        return self.handles[self.weight_map[key]].get_slice(key)


def _decoder_prefix(keys: set[str], source) -> str:
    for prefix in _DECODER_PREFIXES:
        if prefix + "embed_tokens.weight" in keys:
            return prefix
    raise ValueError(
        f"{source}: no embedding tensor found (looked for {[p + 'embed_tokens.weight' for p in _DECODER_PREFIXES]}; "
        f"found {sorted(keys)[:6]}{' ...' if len(keys) > 6 else ''})"
    )


def _names(names: Sequence[str]) -> str:
    return f"{list(names[:8])}{' ...' if len(names) > 8 else ''}"


# ----------------------------------------------------------------------------------------------- load
def _index_key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


@functools.cache
def _reading_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="rpo_jax-read")


def _read_blocks(rule, readers, shape, sharding, num_layers, per_tensor_shape, pool) -> dict[tuple, np.ndarray]:
    """index key → the block (file dtype, our layout) of every distinct index this process's devices hold of one
    parameter (all of it without a sharding): a block several local devices share is read once; with `pool`,
    the byte runs of all blocks of each tensor are read at once, merged where they touch, the tensors concurrently
    (`RemoteSlice.prefetch`)."""
    if sharding is None:
        indices = [tuple(slice(None) for _ in shape)]
    else:
        indices = list(
            {_index_key(i): i for i in sharding.addressable_devices_indices_map(tuple(shape)).values()}.values()
        )
    jobs = []
    for index in indices:
        layers = range(*index[0].indices(num_layers)) if rule.stacked else [None]
        jobs += [(index, i) for i in layers]

    def one(job, readers=readers):
        index, layer = job
        if layer is None:
            return _read_block(readers[0], rule.transform, per_tensor_shape, index)
        return _read_block(readers[layer], rule.transform, per_tensor_shape, index[1:])

    if pool is not None:  # learn the blocks every job reads, then read each tensor's blocks at once (merged)
        recorders = [RecordingSlice(r.get_shape()) for r in readers]
        for job in jobs:
            one(job, recorders)
        list(pool.map(lambda rr: rr[0].prefetch(rr[1].indices), zip(readers, recorders, strict=True)))
    blocks = list(map(one, jobs))
    for reader in readers if pool is not None else ():
        reader.forget()
    out: dict[tuple, list] = {}
    for (index, layer), block in zip(jobs, blocks, strict=True):
        out.setdefault(_index_key(index), []).append(block)
    return {
        key: (np.stack(parts) if rule.stacked else parts[0]) if parts else np.zeros((0,), np.float32)
        for key, parts in out.items()
    } | {_index_key(i): np.zeros((0,) + tuple(shape[1:]), np.float32) for i in indices if _index_key(i) not in out}


def load_hf(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
    extra_tensors: Collection[str] = (),
    task: str = "causal_lm",
    **config_overrides: Any,
) -> tuple[Decoder, ModelConfig]:
    """Loads a Hugging Face Llama, Gemma 1/2/3, Qwen2, Qwen3 or Mistral checkpoint directory (or hub id) into a
    `Decoder`.

    `dtype` is the compute dtype, `param_dtype` the storage dtype (default `dtype`). With `mesh`, each parameter
    is created directly in its `rules` sharding. `config_overrides` replace ModelConfig fields (e.g. remat="full").
    `extra_tensors`: names of checkpoint tensors the caller reads itself (e.g. a reward model's `score.weight`);
    they are not loaded here and not reported as unexpected. `task`: what config.json's `architectures` must
    declare, "causal_lm" (`CAUSAL_LM_ARCHITECTURES`) or "sequence_classification" (for `load_reward_model`).
    Every broken input is an error naming its directory or file, what is wrong and what was expected.

    Args:
        path_or_repo_id: a local directory, a URL (`gs://…`), or a hub id `"owner/name"`.
        dtype: the compute dtype.
        param_dtype: the storage dtype (default `dtype`).
        mesh: create each parameter directly in its `rules` sharding on this mesh.
        rules: logical axis → mesh axis; default `DEFAULT_RULES`.
        extra_tensors: checkpoint tensors the caller reads itself (not loaded, not reported as unexpected).
        task: `"causal_lm"` or `"sequence_classification"`, what `architectures` must declare.
        **config_overrides: `ModelConfig` fields to replace, e.g. `remat="full"`.

    Returns:
        `(model, config)`: the `Decoder` and its `ModelConfig`.

    Raises:
        FileNotFoundError: a missing directory, config.json or safetensors file.
        ValueError: a config.json that is not a JSON object or lacks a required field, `architectures`
            contradicting `model_type` or naming another task, unknown model types, unreadable (truncated)
            safetensors, missing / unexpected tensors, wrong shapes or non-float dtypes, pickles.
    """
    directory = resolve_checkpoint_dir(path_or_repo_id)
    config_file, hf_config = read_config_json(directory)
    config = ModelConfig.from_hf_dict(hf_config, source=str(config_file), **config_overrides)
    check_architectures(hf_config, str(config_file), task)
    param_dtype = jnp.dtype(param_dtype or dtype)
    tensors = SafetensorsIndex(directory)
    keys = tensors.keys()
    prefix = _decoder_prefix(keys, tensors.source)

    build = lambda: Decoder(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)  # noqa: E731
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    flat_abstract = dict(nnx.to_flat_state(abstract_state))

    table = key_table(config)
    lm_head_name = next((n for n in _LM_HEAD_NAMES if n in keys), None)
    hint = (
        "; score.weight is a sequence-classification head: load a reward model with load_reward_model"
        if "score.weight" in keys and "score.weight" not in extra_tensors
        else ""
    )
    if not config.tie_word_embeddings:
        if lm_head_name is None:
            raise ValueError(
                f"{tensors.source}: missing tensor lm_head.weight {[config.vocab_size, config.hidden_size]} "
                f"({config_file} has tie_word_embeddings=False, so an untied output projection is expected{hint})"
            )
        table.append(dataclasses.replace(LM_HEAD_RULE, hf_name=lm_head_name))

    def hf_names(rule: KeyRule) -> list[str]:
        name = rule.hf_name if rule.path == ("lm_head",) else prefix + rule.hf_name
        return [name.format(i=i) for i in range(config.num_layers)] if rule.stacked else [name]

    def per_tensor_shape(rule: KeyRule) -> tuple[int, ...]:
        shape = flat_abstract[rule.path].shape
        return tuple(shape[1:] if rule.stacked else shape)

    expected = {n: _hf_shape(per_tensor_shape(rule), rule.transform) for rule in table for n in hf_names(rule)}
    missing = sorted(set(expected) - keys)
    if missing:
        raise ValueError(
            f"{tensors.source}: missing tensors {_names(missing)} (expected shapes "
            f"{[list(expected[n]) for n in missing[:8]]} for the {config.model_type} model of {config_file})"
        )
    ignorable = {lm_head_name} if config.tie_word_embeddings and lm_head_name else set()
    ignorable |= set(extra_tensors)
    unexpected = sorted(
        k
        for k in keys - set(expected) - ignorable
        if not k.endswith("rotary_emb.inv_freq")
        and not (hf_config.get("model_type") == "gemma3" and k.startswith(_MULTIMODAL_IGNORED))
    )
    if unexpected:
        raise ValueError(
            f"{tensors.source}: unexpected tensors {_names(unexpected)} (not part of the {config.model_type} model "
            f"that {config_file} describes{hint})"
        )
    for name, want in expected.items():
        tensor = tensors.get_slice(name)
        got = tuple(tensor.get_shape())
        if got != want:
            raise ValueError(
                f"{tensors.file_of(name)}: tensor {name} has shape {list(got)}, expected {list(want)} for "
                f"{config.model_type} config {config_file}"
            )
        if tensor.get_dtype() not in _FLOAT_DTYPES:
            raise ValueError(
                f"{tensors.file_of(name)}: tensor {name} has dtype {tensor.get_dtype()}, expected a floating-point "
                f"dtype ({', '.join(_FLOAT_DTYPES)})"
            )

    shardings = state_shardings(abstract_state, mesh, rules) if mesh is not None else None
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}

    values: dict[tuple[str, ...], jax.Array] = {}
    pool = _reading_pool() if is_url(directory) else None  # a bucket: every block of a parameter at once
    for rule in table:
        target = flat_abstract[rule.path]
        names = hf_names(rule)
        readers = [tensors.get_slice(n) for n in names]

        sharding = flat_shardings[rule.path].get_value() if mesh is not None else None
        cache = _read_blocks(rule, readers, target.shape, sharding, config.num_layers, per_tensor_shape(rule), pool)

        def read(index, cache=cache):
            return np.ascontiguousarray(cache[_index_key(index)].astype(param_dtype))

        if mesh is None:
            values[rule.path] = jnp.asarray(read(tuple(slice(None) for _ in target.shape)))
        else:
            values[rule.path] = jax.make_array_from_callback(target.shape, sharding, read)
        cache.clear()

    state = nnx.from_flat_state([(path, var.replace(values[path])) for path, var in flat_abstract.items()])
    return nnx.merge(graphdef, state), config
