"""LoRA adapters on the scanned `Decoder`: configuration, attach / switch off / merge, PEFT adapters in and out.

A LoRA-adapted projection computes y = x·W + s·(x·A)·B with s = alpha / rank, A [in, r] (random) and B [r, out]
(zeros at creation, so a fresh adapter changes nothing); Hu et al. 2021, arXiv:2106.09685. Targets are named in
Hugging Face terms (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).

Why neither library's LoRA is used as it is, and what is used from them:

* `qwix.LoraProvider` / `qwix.apply_lora_to_model` (0.1.8) intercepts `dot_general` / `einsum` calls made inside an
  nnx Module's method and recognises the weight operand by identity with one of that module's `nnx.Param`s
  (`qwix._src.utils.flax_util.find_param`). The `Decoder` runs its layers in `jax.lax.scan` over stacked [L, ...]
  arrays inside pure functions: the operand of each matmul is a per-layer slice traced by the scan, not a module
  parameter, so qwix finds no weight and adds no adapter (and a per-layer adapter would in any case have to be
  stacked along L, which qwix does not create).
* `nnx.LoRA` is a module for one 2-D kernel [in, out] called as `lora(x)`; it has no scale, no leading layer axis,
  and no way to live inside our scan body, whose per-layer parameters are plain arrays.

So the adapters are `nnx.LoRAParam` variables (Flax's own type: a subclass of `nnx.Param`, so a trainer selects
them alone with the filter `nnx.LoRAParam` and the frozen base with `nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))`),
stacked along the layer axis, held by `LoraAdapters` at `model.lora`, scanned beside the weights they adapt
(`Decoder.adapter_arrays`) and applied by `layers.lora_delta` in the activation path — so remat and the sharding
rules apply to them unchanged. A is sharded by the weight's input axes, B by its output axes (the rank axis is
replicated).

Layouts (per layer; A [L, *in, r], B [L, r, *out]): q/k/v_proj in (D,) out (heads, hd); o_proj in (H, hd) out (D,);
gate/up_proj in (D,) out (F,); down_proj in (F,) out (D,). PEFT's `lora_A.weight` is [r, in] and `lora_B.weight`
[out, r] with in / out flattened in our (row-major) order, as Hugging Face's projection weights are.

LoRA dropout (training only): inside `lora_dropout(model, key)` every adapted projection computes
y = x·W + s·(drop(x)·A)·B with inverted dropout drop(x) = x ⊙ m / (1 − p), m ~ Bernoulli(1 − p) elementwise,
p = `LoraConfig.dropout` (PEFT's `lora_dropout`: one independent mask per adapted module, on the adapter's input
only; the base path x·W sees x). Each (target, layer) draws its mask from its own key (`dropout_keys`). Outside
the block (evaluation, references, sampling, exports) dropout is the identity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rpo_jax.models.hf_io import PROJECTION_MODULES
from rpo_jax.models.model import Decoder
from rpo_jax.models.sharding import Rules, state_shardings

#: adaptable projection (our parameter name = Hugging Face module name) → module path inside a decoder layer
TARGET_MODULES: dict[str, str] = PROJECTION_MODULES
#: number of input (contracted) axes of each projection's per-layer weight; the remaining axes are outputs
INPUT_AXES: dict[str, int] = {name: 2 if name == "o_proj" else 1 for name in TARGET_MODULES}
ALL_LINEAR = "all-linear"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model.layers"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (scale s = alpha / r), dropout (training only), targets: "all-linear" (every projection
    above), a regular expression fully matched against each module path "model.layers.{i}.self_attn.q_proj", or a
    tuple of module names ("q_proj", "v_proj") each matching a path that equals it or ends in "." + it (PEFT's
    `target_modules` rules)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: str | tuple[str, ...] = ALL_LINEAR

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be a number in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, (list, tuple)):
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError(f"lora.targets must be a non-empty list of module names, got {self.targets!r}")
            object.__setattr__(self, "targets", tuple(self.targets))
        elif isinstance(self.targets, str):
            try:
                re.compile(self.targets)
            except re.error as e:
                raise ValueError(f"lora.targets: invalid regular expression {self.targets!r}: {e}") from None
        else:
            raise ValueError(
                f"lora.targets must be 'all-linear', a regex or a list of module names, got {self.targets!r}"
            )

    @property
    def scale(self) -> float:
        """s = alpha / rank."""
        return self.alpha / self.rank


def _matches(targets: str | tuple[str, ...], path: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def resolve_targets(targets: str | tuple[str, ...], num_layers: int) -> tuple[str, ...]:
    """The adapted projections (names of TARGET_MODULES, in its order) that `targets` selects.

    The layers' weights are stacked, so a selection must be the same in every layer; one that picks a module in
    some layers only (e.g. "model.layers.0.self_attn.q_proj") is a ValueError, as is a selection of nothing.
    """
    if targets == ALL_LINEAR:
        return tuple(TARGET_MODULES)
    if not isinstance(targets, str):
        paths = [f"model.layers.0.{sub}" for sub in TARGET_MODULES.values()]
        unknown = [t for t in targets if not any(_matches((t,), p) for p in paths)]
        if unknown:
            raise ValueError(
                f"lora.targets: {unknown} name no adaptable module; choose among "
                f"{list(TARGET_MODULES)} (or 'all-linear')"
            )
    chosen = []
    for name, sub in TARGET_MODULES.items():
        hits = [_matches(targets, f"model.layers.{i}.{sub}") for i in range(num_layers)]
        if any(hits) and not all(hits):
            layers_hit = [i for i, h in enumerate(hits) if h]
            raise ValueError(
                f"lora.targets {targets!r} selects {sub} in layers {layers_hit} only; rpo_jax stacks "
                f"the {num_layers} layers' weights, so a target must be chosen in every layer"
            )
        if all(hits):
            chosen.append(name)
    if not chosen:
        raise ValueError(
            f"lora.targets {targets!r} selects no module; module paths are "
            f"model.layers.{{i}}.<{' | '.join(TARGET_MODULES.values())}>"
        )
    return tuple(chosen)


def factor_layout(name: str, shape: Sequence[int], axes: Sequence[str | None], rank: int):
    """Shapes and logical axes of the factors for a stacked weight `shape` [L, *in, *out] with axes `axes`:
    A [L, *in, r] on (layers, *in axes, None), B [L, r, *out] on (layers, None, *out axes)."""
    n_in = INPUT_AXES[name]
    a_shape = (shape[0], *shape[1 : 1 + n_in], rank)
    b_shape = (shape[0], rank, *shape[1 + n_in :])
    a_axes = (axes[0], *axes[1 : 1 + n_in], None)
    b_axes = (axes[0], None, *axes[1 + n_in :])
    return a_shape, b_shape, a_axes, b_axes


class LoraAdapters(nnx.Module):
    """The adapter set of one `Decoder`: for each target `<name>_lora_a` [L, *in, r] (he-uniform over the input
    features) and `<name>_lora_b` [L, r, *out] (zeros), both `nnx.LoRAParam`. `enabled` (static) switches them on
    and off."""

    def __init__(self, model: Decoder, config: LoraConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = config
        self.enabled = True
        self.dropout_key = None  # a `DropoutKey` inside `lora_dropout`, else None (dropout off)
        self.targets = resolve_targets(config.targets, model.config.num_layers)
        for name in self.targets:
            weight = getattr(model.layers, name)
            axes = weight.get_metadata().get("out_sharding") or (None,) * weight.ndim
            a_shape, b_shape, a_axes, b_axes = factor_layout(name, weight.shape, axes, config.rank)
            n_in = INPUT_AXES[name]
            init = jax.nn.initializers.he_uniform(in_axis=tuple(range(1, 1 + n_in)), out_axis=-1, batch_axis=(0,))
            setattr(
                self, f"{name}_lora_a", nnx.LoRAParam(init(rngs.params(), a_shape, param_dtype), out_sharding=a_axes)
            )
            setattr(self, f"{name}_lora_b", nnx.LoRAParam(jnp.zeros(b_shape, param_dtype), out_sharding=b_axes))

    def factors(self, name: str) -> tuple[nnx.LoRAParam, nnx.LoRAParam]:
        """The variables (A, B) of target `name`."""
        return getattr(self, f"{name}_lora_a"), getattr(self, f"{name}_lora_b")

    def arrays(self) -> dict[str, jax.Array]:
        """ "<name>_lora_a" → A and "<name>_lora_b" → s·B, stacked along layers, for the decoder's scan; inside
        `lora_dropout` (with p > 0) also "<name>_lora_key" [L, *key] (each layer's dropout key, `dropout_keys`)
        and "lora_keep" [L] (1 − p)."""
        out = {}
        for name in self.targets:
            a, b = self.factors(name)
            out[f"{name}_lora_a"], out[f"{name}_lora_b"] = a[...], b[...] * jnp.asarray(self.config.scale, b.dtype)
        if self.dropout_key is not None and self.config.dropout > 0:
            num_layers = out[f"{self.targets[0]}_lora_a"].shape[0]
            out.update(dropout_keys(self.dropout_key.key, self.targets, num_layers))
            out["lora_keep"] = jnp.full((num_layers,), 1.0 - self.config.dropout, jnp.float32)
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class DropoutKey:
    """Holds the dropout key while `lora_dropout` is active (a plain holder: a Module attribute may not be an
    array)."""

    key: jax.Array


def dropout_keys(key: jax.Array, targets: Sequence[str], num_layers: int) -> dict[str, jax.Array]:
    """ "<name>_lora_key" → [L, *key data] for every target: layer i of target j draws its mask from
    split(fold_in(key, j), L)[i] (raw key data, so that the decoder's scan can slice them)."""
    key = key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
    return {
        f"{name}_lora_key": jax.random.key_data(jax.random.split(jax.random.fold_in(key, j), num_layers))
        for j, name in enumerate(targets)
    }


def attach_lora(
    model: Decoder,
    config: LoraConfig,
    *,
    rngs: nnx.Rngs,
    param_dtype=jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
) -> Decoder:
    """Adds a fresh adapter set (B = 0: the logits do not change) to `model` as `model.lora`, in place; returns
    `model`. With `mesh`, the factors are placed in their rule-given shardings."""
    if getattr(model, "lora", None) is not None:
        raise ValueError("attach_lora: the model already has LoRA adapters (model.lora)")
    with nnx.use_eager_sharding(False):
        adapters = LoraAdapters(model, config, rngs=rngs, param_dtype=param_dtype)
    if mesh is not None:
        state = nnx.state(adapters)
        nnx.update(adapters, jax.device_put(state, state_shardings(state, mesh, rules)))
    model.lora = adapters
    return model


def lora_adapters(model: Decoder) -> LoraAdapters:
    """`model.lora`, or a ValueError naming the call that adds it."""
    adapters = getattr(model, "lora", None)
    if adapters is None:
        raise ValueError("the model has no LoRA adapters; add them with attach_lora or load_peft_adapter")
    return adapters


@contextlib.contextmanager
def adapters_disabled(model: Decoder) -> Iterator[Decoder]:
    """Within the block `model` runs without its adapters: exactly the base model's program and logits (the
    primary reference of LoRA training). Restores the previous state on exit."""
    adapters = lora_adapters(model)
    previous = adapters.enabled
    adapters.enabled = False
    try:
        yield model
    finally:
        adapters.enabled = previous


@contextlib.contextmanager
def lora_dropout(model: Decoder, key: jax.Array | None) -> Iterator[Decoder]:
    """Within the block `model`'s adapters apply dropout (module docstring) with masks drawn from `key` (a typed
    key or raw key data); `key=None` or dropout 0 leave the forward pass exactly as it is. For training steps."""
    adapters = lora_adapters(model)
    previous = adapters.dropout_key
    adapters.dropout_key = None if key is None else DropoutKey(key)
    try:
        yield model
    finally:
        adapters.dropout_key = previous


def merged_weights(model: Decoder) -> dict[str, jax.Array]:
    """target name → W + s·A·B [L, *in, *out], computed in float32 and stored in W's dtype."""
    adapters = lora_adapters(model)
    out = {}
    for name in adapters.targets:
        if not isinstance(getattr(model.layers, name), nnx.Param):
            raise ValueError(
                f"merge_lora: the base's {name} is quantized (rpo_jax.models.quantize); merge onto the "
                "original float checkpoint, or call quantize.dequantize_base(model) first to merge "
                "onto the quantized weights explicitly"
            )
        w = getattr(model.layers, name)[...]
        a, b = (v[...].astype(jnp.float32) for v in adapters.factors(name))
        rank = a.shape[-1]
        delta = jnp.matmul(a.reshape(a.shape[0], -1, rank), b.reshape(b.shape[0], rank, -1)).reshape(w.shape)
        merged = (w.astype(jnp.float32) + adapters.config.scale * delta).astype(w.dtype)
        sharding = getattr(w, "sharding", None)
        out[name] = merged if sharding is None else jax.device_put(merged, sharding)
    return out


def merge_lora(model: Decoder) -> Decoder:
    """A plain `Decoder` (no adapters) whose adapted weights are W + (alpha / rank)·B·A, e.g. for `save_hf`;
    `model` itself is left unchanged."""
    weights = merged_weights(model)
    merged = nnx.clone(model)
    for name, value in weights.items():
        getattr(merged.layers, name)[...] = value
    del merged.lora
    return merged


# ------------------------------------------------------------------------------------------------ PEFT format


def peft_tensors(model: Decoder) -> dict[str, np.ndarray]:
    """The adapters under PEFT's names: `{PEFT_PREFIX}.{i}.<path>.lora_A.weight` [r, in] and `.lora_B.weight`
    [out, r] for every layer i and target (B without the scale: PEFT applies lora_alpha / r itself)."""
    adapters = lora_adapters(model)
    tensors = {}
    for name in adapters.targets:
        a, b = (np.asarray(jax.device_get(v[...]), np.float32) for v in adapters.factors(name))
        rank = a.shape[-1]
        for i in range(a.shape[0]):
            key = f"{PEFT_PREFIX}.{i}.{TARGET_MODULES[name]}"
            tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T)
            tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
    return tensors


def save_peft_adapter(model: Decoder, out_dir: str | os.PathLike, base_model_name_or_path: str) -> pathlib.Path:
    """Writes a PEFT LoRA adapter directory: `adapter_config.json` (peft_type LORA, task_type CAUSAL_LM,
    base_model_name_or_path, r, lora_alpha, lora_dropout, target_modules, ...) and `adapter_model.safetensors`
    (float32, PEFT's key names), loadable with `peft.PeftModel.from_pretrained(base, out_dir)`."""
    from safetensors.numpy import save_file

    adapters = lora_adapters(model)
    cfg = adapters.config
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path),
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": list(adapters.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(peft_tensors(model), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out


#: adapter_config.json fields rpo_jax cannot honour → the only value accepted (None / False / empty = feature off)
_UNSUPPORTED_FIELDS = {
    "use_rslora": False,
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
}


def read_peft_config(directory: pathlib.Path) -> LoraConfig:
    """LoraConfig from `directory/adapter_config.json`; a ValueError naming the file and field otherwise."""
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no PEFT adapter config (expected {ADAPTER_CONFIG} in {directory})")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"{path}: field 'peft_type' must be 'LORA', got {raw.get('peft_type')!r}")
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{path}: field 'task_type' must be 'CAUSAL_LM', got {raw.get('task_type')!r}")
    for field, allowed in _UNSUPPORTED_FIELDS.items():
        value = raw.get(field, allowed)
        if value != allowed and not (allowed is None and value in ([], {})):
            raise ValueError(f"{path}: field {field!r} = {value!r} is not supported (only {allowed!r})")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in raw:
            raise ValueError(f"{path}: missing field {field!r}")
    try:
        return LoraConfig(
            rank=raw["r"], alpha=raw["lora_alpha"], dropout=raw.get("lora_dropout", 0.0), targets=raw["target_modules"]
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_peft_adapter(
    model: Decoder,
    directory: str | os.PathLike,
    *,
    param_dtype=jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
) -> Decoder:
    """Attaches the PEFT LoRA adapter in `directory` (adapter_config.json + adapter_model.safetensors, e.g. saved
    by TRL / PEFT) to `model` in place and returns it; with `mesh` the factors are in their rule-given shardings.
    Every target's lora_A / lora_B must be present for every layer with the shapes the model implies; any other
    tensor is an error."""
    from safetensors.numpy import load_file

    directory = pathlib.Path(directory)
    config = read_peft_config(directory)
    weights_path = directory / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: missing (only safetensors PEFT adapters are read)")
    tensors = load_file(str(weights_path))
    try:
        attach_lora(model, config, rngs=nnx.Rngs(0), param_dtype=param_dtype, mesh=mesh, rules=rules)
        adapters = model.lora
    except ValueError as e:
        raise ValueError(f"{directory / ADAPTER_CONFIG}: {e}") from None
    expected = peft_tensors(model)  # the fresh factors: the right shapes under the right names
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        del model.lora
        raise ValueError(
            f"{weights_path}: tensors rpo_jax cannot place: {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}"
        )
    for key, like in expected.items():
        if key not in tensors or tensors[key].shape != like.shape:
            del model.lora
            found = "missing" if key not in tensors else f"shape {tensors[key].shape}"
            raise ValueError(f"{weights_path}: tensor {key!r}: expected shape {like.shape}, {found}")
    for name in adapters.targets:
        a_var, b_var = adapters.factors(name)
        rank = config.rank
        keys = [f"{PEFT_PREFIX}.{i}.{TARGET_MODULES[name]}" for i in range(a_var.shape[0])]
        a = np.stack([tensors[f"{k}.lora_A.weight"].T for k in keys]).reshape(a_var.shape)
        b = np.stack([tensors[f"{k}.lora_B.weight"].T for k in keys]).reshape(a_var.shape[0], rank, -1)
        for var, value in ((a_var, a), (b_var, b.reshape(b_var.shape))):
            var[...] = jax.device_put(jnp.asarray(value, var.dtype), var[...].sharding)
    return model


def count_adapter_parameters(model: Decoder) -> int:
    """Number of adapter scalars (Σ over targets of L·r·(in + out))."""
    return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(lora_adapters(model), nnx.LoRAParam)))
