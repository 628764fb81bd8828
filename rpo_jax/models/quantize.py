"""QLoRA's frozen base: the decoder layers' projection weights stored as int8 / int4 with `qwix`, dequantized one
layer at a time inside the layer scan (Dettmers et al. 2023, arXiv:2305.14314, with linear integer codes).

What is quantized: the seven stacked projection weights of `DecoderLayers` (q/k/v/o_proj, gate/up/down_proj,
[L, *in, *out]) — the big matmuls, 79 % of SmolLM2-135M's parameters and 87 % of Llama-3.1-8B's. What stays
in the parameter dtype: the embedding and a separate `lm_head` (a gather, and the output head whose log-probs
every preference loss reads directly; bitsandbytes' QLoRA also leaves the output embeddings unquantized), the
norms and q/k/v biases (tiny). Adapters (`rpo_jax.models.lora`) stay float and are applied on top.

Scheme (qwix `quantize`, `calibration_method="absmax"`, symmetric, no zero point): for each block of
`block_size` consecutive features of the last input (contracted) axis, per layer and per output channel,

    s = max|w| over the block / (q_max + 0.5),   q = clip(round(w / s), -q_max - 1, q_max),   ŵ = q · s

(q_max = 127 for int8, 7 for int4; round half to even), so |ŵ − w| ≤ s / 2 = max|w| / (2·q_max + 1) per element.
Blocks of 64 (QLoRA's block size; the largest divisor of the axis below 64 where 64 does not divide it,
`block_length`) are the default: on SmolLM2-135M they cut the weights' error of one scale per output channel
(`block_size=None`) by a quarter (docs/guides/lora.md, "QLoRA"). Scales are float32 [L, *in / block, *out] (an input
axis other than the blocked one has size 1).

Storage (`QuantizedLayers`): `<name>` is a `QuantizedWeight` (the integer codes, the float weight's shape and
logical axes, so the sharding rules place it exactly like the weight and `attach_lora` sees the weight's layout)
and `<name>_scale` a `QuantizationScale` with the same logical axes (a dimension of size 1, or one the mesh axis
does not divide, is replicated). Neither is an `nnx.Param`: a trainer's `nnx.Param` / `nnx.LoRAParam` filters never
select them (integer codes have no gradient). `QuantizedLayers.arrays()` hands the scan a `qwix.QArray` per
projection; `model.dense_weight` dequantizes the current layer's slice in the layer body, so only one layer's float
weights are live at a time. A quantized base always rematerializes its dequantized weights in the backward pass:
with `remat="none"` the layer body runs under the "dots" policy (matmul outputs saved, everything else recomputed),
since saving everything would keep every layer's float weights for the backward pass.

Exports: a quantized base is never written as if it were the float model — `save_hf` and `merge_lora` refuse it.
`dequantize_base(model)` (explicit) turns it back into float parameters holding ŵ; the trainer's merged export of
a QLoRA run does that first (`rpo_jax.train.core.export.save_policy`), so it is the model the run trained, while its
PEFT adapter names the original float checkpoint as its base.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rpo_jax.models.lora import INPUT_AXES
from rpo_jax.models.model import Decoder, DecoderLayers

#: base_dtype → the integer type of the codes
QUANTIZED_DTYPES = {"int8": jnp.int8, "int4": jnp.int4}
DEFAULT_BLOCK_SIZE = 64
SCALE_SUFFIX = "_scale"


class QuantizedWeight(nnx.Variable):
    """Integer codes q of a quantized projection weight [L, *in, *out] (int8 / int4), frozen."""


class QuantizationScale(nnx.Variable):
    """float32 scales s of a quantized projection weight [L, *in / block, *out] (ŵ = q · s, broadcast per block)."""


class QuantizedLayers(nnx.Module):
    """`DecoderLayers` with its projections quantized: the same attributes, each projection `<name>` a
    `QuantizedWeight` plus `<name>_scale`; the norms and biases stay `nnx.Param`."""

    def __init__(self, variables: dict[str, nnx.Variable]):
        for name, variable in variables.items():
            setattr(self, name, variable)

    def arrays(self) -> dict[str, jax.Array | qwix.QArray]:
        """name → stacked array for the scan: float parameters as they are, each projection a `qwix.QArray`
        (codes [L, *in, *out], scales [L, *in / block, *out]), which the scan slices per layer."""
        out = {}
        for name, variable in vars(self).items():
            if isinstance(variable, nnx.Param):
                out[name] = variable[...]
            elif isinstance(variable, QuantizedWeight):
                out[name] = qwix.QArray(variable[...], getattr(self, name + SCALE_SUFFIX)[...])
        return out

    def projections(self) -> tuple[str, ...]:
        """Names of the quantized projections."""
        return tuple(name for name, v in vars(self).items() if isinstance(v, QuantizedWeight))


def quantization_axes(name: str, shape: tuple[int, ...], block_size: int | None) -> tuple[tuple[int, ...], dict]:
    """(channel-wise axes, {tiled axis: block}) for qwix of a stacked projection weight [L, *in, *out]
    (`INPUT_AXES[name]` input axes): channel-wise on the layer axis, the output axes and any input axis but the last
    (o_proj's heads); the last input axis in blocks of `block_length(size, block_size)` (None: one block)."""
    last_in = INPUT_AXES[name]
    channelwise = (0, *range(1, last_in), *range(1 + last_in, len(shape)))
    if block_size is None:
        return channelwise, {}
    return channelwise, {last_in: block_length(shape[last_in], block_size)}


def block_length(size: int, block_size: int) -> int:
    """Features per block along an input axis of `size`: the largest divisor of `size` that is at most
    `block_size` (64 for every axis of the supported checkpoints; e.g. 16 for a head_dim of 16)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"quantize_base: block_size must be a positive integer or None, got {block_size!r}")
    return max(b for b in range(1, min(size, block_size) + 1) if size % b == 0)


def quantize_weight(w: jax.Array, name: str, dtype: str, block_size: int | None) -> qwix.QArray:
    """ŵ = q · s for one stacked projection weight (module docstring), computed in float32: codes `QUANTIZED_DTYPES[
    dtype]` of w's shape, float32 scales."""
    channelwise, tiled = quantization_axes(name, w.shape, block_size)
    return qwix.quantize(
        w.astype(jnp.float32),
        QUANTIZED_DTYPES[dtype],
        channelwise_axes=channelwise,
        tiled_axes=tiled,
        calibration_method="absmax",
    )


def scale_sharding(weight_sharding, scale_shape) -> NamedSharding | None:
    """The weight's NamedSharding carried over to its scales: a dimension keeps its mesh axes when they divide the
    scale's (smaller) size, else it is replicated. None when the weight has no NamedSharding."""
    if not isinstance(weight_sharding, NamedSharding):
        return None
    mesh, spec = weight_sharding.mesh, tuple(weight_sharding.spec) + (None,) * len(scale_shape)
    kept = []
    for axes, size in zip(spec, scale_shape):
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        kept.append(axes if size % math.prod(mesh.shape[a] for a in names) == 0 else None)
    return NamedSharding(mesh, PartitionSpec(*kept))


def quantize_base(model: Decoder, dtype: str, *, block_size: int | None = DEFAULT_BLOCK_SIZE) -> Decoder:
    """Stores `model`'s projection weights quantized to `dtype` ("int8" | "int4"), in place; returns `model`.

    `model.layers` becomes a `QuantizedLayers` (module docstring). On a mesh the codes keep the float weights'
    shardings and the scales follow them. Works on an abstract model too (inside `nnx.eval_shape`). Adapters may
    be attached before or after. A ValueError for an unknown dtype or an already quantized model.
    """
    if dtype not in QUANTIZED_DTYPES:
        raise ValueError(f"quantize_base: dtype must be one of {sorted(QUANTIZED_DTYPES)}, got {dtype!r}")
    if is_quantized(model):
        raise ValueError("quantize_base: the model's base is already quantized")
    variables = {}
    for name, variable in vars(model.layers).items():
        if not isinstance(variable, nnx.Variable):
            continue
        if name not in INPUT_AXES:
            variables[name] = variable
            continue
        w = variable[...]
        axes = variable.get_metadata().get("out_sharding")
        q = quantize_weight(w, name, dtype, block_size)
        codes, scale = q.qvalue, q.scale
        sharding = None if isinstance(w, jax.core.Tracer) else getattr(w, "sharding", None)
        if isinstance(sharding, NamedSharding):
            codes = jax.device_put(codes, sharding)
            scale = jax.device_put(scale, scale_sharding(sharding, scale.shape))
        with nnx.use_eager_sharding(False):
            variables[name] = QuantizedWeight(codes, out_sharding=axes)
            variables[name + SCALE_SUFFIX] = QuantizationScale(scale, out_sharding=axes)
    model.layers = QuantizedLayers(variables)
    return model


def is_quantized(model: Decoder) -> bool:
    """Whether `model`'s projection weights are stored quantized (`quantize_base`)."""
    return isinstance(model.layers, QuantizedLayers)


def base_dtype(model: Decoder) -> str:
    """ "int8" / "int4" for a quantized base, "" otherwise (the values of `config.model.lora.base_dtype`)."""
    if not is_quantized(model):
        return ""
    codes = {jnp.dtype(getattr(model.layers, name).dtype) for name in model.layers.projections()}
    (found,) = [k for k, v in QUANTIZED_DTYPES.items() if jnp.dtype(v) in codes]
    return found


def dequantized_weights(model: Decoder) -> dict[str, jax.Array]:
    """projection name → ŵ = q · s [L, *in, *out] in the model's parameter dtype, with the codes' sharding."""
    if not is_quantized(model):
        raise ValueError("dequantized_weights: the model's base is not quantized")
    out = {}
    for name, q in model.layers.arrays().items():
        if isinstance(q, qwix.QArray):
            w = qwix.dequantize(q).astype(model.param_dtype)
            sharding = getattr(q.qvalue, "sharding", None)
            out[name] = w if sharding is None else jax.device_put(w, sharding)
    return out


def dequantize_base(model: Decoder) -> Decoder:
    """Replaces a quantized base by float parameters holding ŵ = q · s (in the parameter dtype), in place; returns
    `model`. The result is an ordinary `Decoder` (its `DecoderLayers` again): its logits are the quantized
    model's, and `merge_lora` / `save_hf` accept it — the explicit way to export a QLoRA model merged onto the
    quantized base."""
    weights = dequantized_weights(model)
    with nnx.use_eager_sharding(False):  # shapes only: the values are set below
        layers = nnx.eval_shape(lambda: DecoderLayers(model.config, rngs=nnx.Rngs(0), param_dtype=model.param_dtype))
    for name, variable in vars(layers).items():
        if isinstance(variable, nnx.Param):
            source = getattr(model.layers, name)
            variable.set_value(weights[name] if name in weights else source[...])
    model.layers = layers
    return model


def parameter_bytes(model: Decoder) -> dict[str, int]:
    """Exact storage of the model's base, in bytes: {"codes": Σ numel · bits / 8 over the quantized projections
    (int4 packed two to a byte, as on TPU / GPU), "scales": float32 scales, "float": every other non-adapter
    variable (embedding, lm_head, norms, biases, or the float projections of an unquantized base), "total"}."""
    codes = scales = floats = 0
    state = nnx.state(model, nnx.Not(nnx.LoRAParam))
    for variable in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        numel = math.prod(variable.shape)
        if isinstance(variable, QuantizedWeight):
            codes += numel * jnp.iinfo(variable.dtype).bits // 8
        elif isinstance(variable, QuantizationScale):
            scales += numel * jnp.dtype(variable.dtype).itemsize
        else:
            floats += numel * jnp.dtype(variable.dtype).itemsize
    return {"codes": codes, "scales": scales, "float": floats, "total": codes + scales + floats}
