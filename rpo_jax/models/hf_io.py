"""Hugging Face checkpoints ↔ `Decoder`: a declarative key table, `load_hf` (sharded, slice-wise) and `save_hf`.

Only safetensors are read (no pickle, no remote code). With a mesh every tensor is built with
`jax.make_array_from_callback`, each device reading only its own slice through `safe_open(...).get_slice`,
so the model is never gathered on one device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rpo_jax.models.config import ModelConfig
from rpo_jax.models.model import Decoder
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
    `stacked` parameters have a leading layer axis; their HF tensors exist once per layer.
    """

    path: tuple[str, ...]
    hf_name: str
    transform: str = "identity"
    stacked: bool = False


def key_table(config: ModelConfig) -> list[KeyRule]:
    """The full mapping for `config`, with HF names relative to the decoder prefix (e.g. "model.")."""
    gemma_sandwich = config.sandwich_norms
    rules = [
        KeyRule(("embed",), "embed_tokens.weight"),
        KeyRule(("final_norm",), "norm.weight"),
    ]
    layer = "layers.{i}."
    per_layer = [
        ("q_proj", "self_attn.q_proj.weight", "heads_in"),
        ("k_proj", "self_attn.k_proj.weight", "heads_in"),
        ("v_proj", "self_attn.v_proj.weight", "heads_in"),
        ("o_proj", "self_attn.o_proj.weight", "heads_out"),
        ("gate_proj", "mlp.gate_proj.weight", "transpose"),
        ("up_proj", "mlp.up_proj.weight", "transpose"),
        ("down_proj", "mlp.down_proj.weight", "transpose"),
        ("attn_in_norm", "input_layernorm.weight", "identity"),
    ]
    if gemma_sandwich:  # Gemma 2/3: post_attention_layernorm is the attention output norm
        per_layer += [
            ("attn_out_norm", "post_attention_layernorm.weight", "identity"),
            ("mlp_in_norm", "pre_feedforward_layernorm.weight", "identity"),
            ("mlp_out_norm", "post_feedforward_layernorm.weight", "identity"),
        ]
    else:  # Llama, Gemma 1: post_attention_layernorm is the MLP input norm
        per_layer += [("mlp_in_norm", "post_attention_layernorm.weight", "identity")]
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
    raise ValueError(f"unknown transform {transform!r}")


def _to_hf_layout(array: np.ndarray, transform: str) -> np.ndarray:
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
    raise ValueError(f"unknown transform {transform!r}")


# ----------------------------------------------------------------------------------------------- files


def resolve_checkpoint_dir(path_or_repo_id: str | os.PathLike) -> pathlib.Path:
    """A local directory as is; otherwise a hub id downloaded with `huggingface_hub.snapshot_download`."""
    s = str(path_or_repo_id)
    path = pathlib.Path(s).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"checkpoint path {s!r} is not a directory")
    if s.startswith(("/", ".", "~")) or s.count("/") != 1:
        raise FileNotFoundError(f"checkpoint directory {s!r} does not exist (and is not a hub id 'owner/name')")
    try:
        from huggingface_hub import snapshot_download

        return pathlib.Path(
            snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"])
        )
    except Exception as e:
        raise FileNotFoundError(f"{s!r} is not a local directory and could not be downloaded from the hub: {e}") from e


class SafetensorsIndex:
    """Maps tensor names to open `safe_open` handles across single or sharded (`*.index.json`) checkpoints."""

    def __init__(self, directory: pathlib.Path):
        from safetensors import safe_open

        self.directory = directory
        index_file = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index_file.exists():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files, weight_map = ["model.safetensors"], None
        else:
            pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
            if pickles:
                raise ValueError(
                    f"{directory}: only safetensors checkpoints are supported; found pickle files {pickles} "
                    "(convert them with transformers `save_pretrained(..., safe_serialization=True)`)"
                )
            raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")
        self.handles = {}
        for name in files:
            if not (directory / name).exists():
                raise FileNotFoundError(f"{index_file}: shard {name} is missing")
            self.handles[name] = safe_open(str(directory / name), framework="np")
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self.handles["model.safetensors"].keys()}
        self.weight_map: dict[str, str] = weight_map

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def file_of(self, key: str) -> str:
        return str(self.directory / self.weight_map[key])

    def get_slice(self, key: str):
        return self.handles[self.weight_map[key]].get_slice(key)


def _decoder_prefix(keys: set[str], directory) -> str:
    for prefix in _DECODER_PREFIXES:
        if prefix + "embed_tokens.weight" in keys:
            return prefix
    raise ValueError(
        f"{directory}: no embedding tensor found (looked for {[p + 'embed_tokens.weight' for p in _DECODER_PREFIXES]})"
    )


# ----------------------------------------------------------------------------------------------- load


def load_hf(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype=jnp.float32,
    param_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
    extra_tensors: Collection[str] = (),
    **config_overrides: Any,
) -> tuple[Decoder, ModelConfig]:
    """Loads a Hugging Face Llama / Gemma 1/2/3 checkpoint directory (or hub id) into a `Decoder`.

    `dtype` is the compute dtype, `param_dtype` the storage dtype (default `dtype`). With `mesh`, each parameter
    is created directly in its `rules` sharding. `config_overrides` replace ModelConfig fields (e.g. remat="full").
    `extra_tensors`: names of checkpoint tensors the caller reads itself (e.g. a reward model's `score.weight`);
    they are not loaded here and not reported as unexpected.
    Raises ValueError for unknown model types, missing / unexpected tensors (named), shape mismatches and pickles.
    """
    directory = resolve_checkpoint_dir(path_or_repo_id)
    config_file = directory / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{directory}: config.json is missing")
    hf_config = json.loads(config_file.read_text())
    config = ModelConfig.from_hf_dict(hf_config, source=str(config_file), **config_overrides)
    param_dtype = jnp.dtype(param_dtype or dtype)
    tensors = SafetensorsIndex(directory)
    keys = tensors.keys()
    prefix = _decoder_prefix(keys, directory)

    table = key_table(config)
    lm_head_name = next((n for n in _LM_HEAD_NAMES if n in keys), None)
    if not config.tie_word_embeddings:
        if lm_head_name is None:
            raise ValueError(f"{directory}: missing tensor lm_head.weight (tie_word_embeddings is False)")
        table.append(dataclasses.replace(LM_HEAD_RULE, hf_name=lm_head_name))

    def hf_names(rule: KeyRule) -> list[str]:
        name = rule.hf_name if rule.path == ("lm_head",) else prefix + rule.hf_name
        return [name.format(i=i) for i in range(config.num_layers)] if rule.stacked else [name]

    expected = {n for rule in table for n in hf_names(rule)}
    missing = sorted(expected - keys)
    if missing:
        raise ValueError(f"{directory}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    ignorable = {lm_head_name} if config.tie_word_embeddings and lm_head_name else set()
    ignorable |= set(extra_tensors)
    unexpected = sorted(
        k
        for k in keys - expected - ignorable
        if not k.endswith("rotary_emb.inv_freq")
        and not (hf_config.get("model_type") == "gemma3" and k.startswith(_MULTIMODAL_IGNORED))
    )
    if unexpected:
        raise ValueError(f"{directory}: unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")

    build = lambda: Decoder(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)  # noqa: E731
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules) if mesh is not None else None
    flat_abstract = dict(nnx.to_flat_state(abstract_state))
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}

    values: dict[tuple[str, ...], jax.Array] = {}
    for rule in table:
        target = flat_abstract[rule.path]
        names = hf_names(rule)
        per_tensor_shape = target.shape[1:] if rule.stacked else target.shape
        want = _hf_shape(per_tensor_shape, rule.transform)
        for name in names:
            got = tuple(tensors.get_slice(name).get_shape())
            if got != want:
                raise ValueError(
                    f"{tensors.file_of(name)}: tensor {name} has shape {list(got)}, expected {list(want)} for {config.model_type} config"
                )
        readers = [tensors.get_slice(n) for n in names]

        def read(index, rule=rule, readers=readers, per_tensor_shape=per_tensor_shape):
            if rule.stacked:
                layers = range(*index[0].indices(config.num_layers))
                blocks = [_read_block(readers[i], rule.transform, per_tensor_shape, index[1:]) for i in layers]
                block = np.stack(blocks) if blocks else np.zeros((0,), np.float32)
            else:
                block = _read_block(readers[0], rule.transform, per_tensor_shape, index)
            return np.ascontiguousarray(block.astype(param_dtype))

        if mesh is None:
            full = tuple(slice(None) for _ in target.shape)
            values[rule.path] = jnp.asarray(read(full))
        else:
            sharding = flat_shardings[rule.path].get_value()
            values[rule.path] = jax.make_array_from_callback(target.shape, sharding, read)

    state = nnx.from_flat_state([(path, var.replace(values[path])) for path, var in flat_abstract.items()])
    return nnx.merge(graphdef, state), config


# ----------------------------------------------------------------------------------------------- save


def save_hf(
    model: Decoder,
    config: ModelConfig,
    out_dir: str | os.PathLike,
    tokenizer=None,
    *,
    extra_tensors: Mapping[str, np.ndarray] | None = None,
) -> pathlib.Path:
    """Writes `config.json` (transformers-5 format) + `model.safetensors` (+ tokenizer files) to `out_dir`.

    `extra_tensors` (name → array) are written as they are next to the decoder's tensors (e.g. a reward
    model's `score.weight`); a name that collides with a decoder tensor is a ValueError.

    Tensors are stored in the model's parameter dtype with Hugging Face names for `XForCausalLM` (a Gemma 3
    multimodal checkpoint is exported as its text tower, `Gemma3ForCausalLM`).
    """
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    table = key_table(config) + ([] if config.tie_word_embeddings else [LM_HEAD_RULE])
    tensors: dict[str, np.ndarray] = {}
    for rule in table:
        array = np.asarray(jax.device_get(flat[rule.path].get_value()))
        name = rule.hf_name if rule.path == ("lm_head",) else "model." + rule.hf_name
        if rule.stacked:
            for i in range(config.num_layers):
                tensors[name.format(i=i)] = np.ascontiguousarray(_to_hf_layout(array[i], rule.transform))
        else:
            tensors[name] = np.ascontiguousarray(_to_hf_layout(array, rule.transform))
    for name, array in (extra_tensors or {}).items():
        if name in tensors:
            raise ValueError(f"save_hf: extra tensor {name!r} collides with a decoder tensor")
        tensors[name] = np.ascontiguousarray(np.asarray(array))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = config.to_hf_dict()
    hf["dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        str(model.param_dtype), "float32"
    )
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
