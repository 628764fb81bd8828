"""`ModelConfig`: one frozen, hashable description of every supported decoder (Llama, Gemma 1/2/3, Qwen2 /
Qwen2.5, Qwen3 and Mistral).

The Hugging Face `config.json` is parsed with transformers' own configuration classes (so that defaults omitted
from hub files, the transformers-4 `rope_theta`/`rope_scaling` keys and the transformers-5 `rope_parameters`
keys, flat or nested per layer type, are all read exactly as transformers reads them) and then reduced to the
handful of switches the generic decoder needs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

#: model_type values that `from_hf_dict` accepts; "gemma3" is the multimodal wrapper whose `text_config` is read.
SUPPORTED_MODEL_TYPES = ("llama", "gemma", "gemma2", "gemma3_text", "gemma3", "qwen2", "qwen3", "mistral")

RematPolicy = Literal["none", "full", "dots", "dots_saveable", "dots_with_no_batch_dims_saveable"]
REMAT_POLICIES = ("none", "full", "dots", "dots_saveable", "dots_with_no_batch_dims_saveable")
#: `ModelConfig.attention`: how attention runs (rpo_jax.models.attention) — a speed choice, never written to config.json
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "blockwise")

#: Fields a config.json must state (transformers would silently fill in its defaults, e.g. hidden_size 4096).
#: A Gemma 3 multimodal `text_config` need only state the first three: hub configs (gemma-3-4b-it) rely on
#: Gemma3TextConfig's defaults for the others.
REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_REQUIRED_TEXT_CONFIG_FIELDS = REQUIRED_FIELDS[:3]

#: Hugging Face causal-LM architectures → the model_type their config.json must have.
CAUSAL_LM_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Gemma3ForConditionalGeneration": "gemma3",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}
#: Hugging Face sequence-classification (reward model) architectures → the model_type their config must have.
SEQUENCE_CLASSIFICATION_ARCHITECTURES: dict[str, str] = {
    "LlamaForSequenceClassification": "llama",
    "GemmaForSequenceClassification": "gemma",
    "Gemma2ForSequenceClassification": "gemma2",
    "Gemma3TextForSequenceClassification": "gemma3_text",
    "Qwen2ForSequenceClassification": "qwen2",
    "Qwen3ForSequenceClassification": "qwen3",
    "MistralForSequenceClassification": "mistral",
}
_TASKS = {
    "causal_lm": ("causal language model", CAUSAL_LM_ARCHITECTURES, "load_hf"),
    "sequence_classification": (
        "sequence-classification (reward) model",
        SEQUENCE_CLASSIFICATION_ARCHITECTURES,
        "load_reward_model",
    ),
}


def check_architectures(hf: dict[str, Any], source: str, task: str = "causal_lm") -> None:
    """Checks config.json's `architectures` against its `model_type` for `task` ("causal_lm" or
    "sequence_classification"). An absent or empty list is accepted (model_type decides). Raises ValueError
    naming `source`, both values and the expected pairing for: a value that is not a list of one class name, an
    architecture of the other task, an unknown architecture, or one that contradicts model_type."""
    if task not in _TASKS:
        raise ValueError(f"task={task!r} is not one of {sorted(_TASKS)}")
    what, table, loader = _TASKS[task]
    archs = hf.get("architectures")
    if archs is None or archs == []:
        return
    model_type = hf.get("model_type")
    expected = [a for a, t in table.items() if t == model_type]
    if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
        raise ValueError(f"{source}: architectures={archs!r}; expected a list of one class name, e.g. {expected}")
    arch = archs[0]
    for other, (other_what, other_table, other_loader) in _TASKS.items():
        if other != task and arch in other_table:
            raise ValueError(
                f"{source}: architectures={archs!r} is a {other_what}, not a {what}; load it with {other_loader}"
            )
    if arch not in table:
        raise ValueError(
            f"{source}: architectures={archs!r} is not a supported {what}; expected one of "
            f"{', '.join(sorted(table))} (for model_type={model_type!r}: {expected})"
        )
    if table[arch] != model_type:
        pairing = (
            f"model_type {model_type!r} with {', '.join(expected)}"
            if expected
            else (f"model_type {model_type!r} with no {what} class")
        )
        raise ValueError(
            f"{source}: architectures={archs!r} contradicts model_type={model_type!r}; {arch} goes with "
            f"model_type {table[arch]!r}, and {pairing}"
        )


def _check_required(hf: Any, fields: Sequence[str], source: str, where: str = "") -> None:
    """Every field of `fields` present in `hf` as a positive int (ValueError naming `source` and the field)."""
    if not isinstance(hf, dict):  # only a nested config gets here (from_hf_dict checks the top level)
        raise ValueError(f"{source}: {where[:-1]}={hf!r}; expected a JSON object with {', '.join(fields)}")
    missing = sorted(where + f for f in fields if f not in hf)
    if missing:
        s = "s" if len(missing) > 1 else ""
        verb = "are" if s else "is"
        raise ValueError(
            f"{source}: required field{s} {', '.join(missing)} {verb} missing (expected a positive "
            "integer; transformers' default would not describe this checkpoint)"
        )
    for f in fields:
        value = hf[f]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{source}: {where}{f}={value!r}; expected a positive integer")


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one layer type, in Hugging Face's split-half layout.

    `rope_type` is "default", "linear" (inv_freq / factor) or "llama3" (Llama 3.1 band-wise scaling).
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, params: dict[str, Any], *, where: str) -> "RopeSpec":
        """Builds a spec from one standardized transformers `rope_parameters` dict."""
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"{where}: rope_type {rope_type!r} is not supported (default, linear, llama3)")
        if float(params.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
            raise ValueError(f"{where}: partial_rotary_factor != 1 is not supported")
        if params.get("rope_theta") is None:
            raise ValueError(f"{where}: rope_theta is missing from the rope parameters {params}")
        spec = cls(rope_type=rope_type, theta=float(params["rope_theta"]))
        if rope_type == "linear":
            spec = dataclasses.replace(spec, factor=float(params["factor"]))
        elif rope_type == "llama3":
            spec = dataclasses.replace(
                spec,
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
        return spec

    def to_hf(self) -> dict[str, Any]:
        """The transformers-5 `rope_parameters` dict of this spec."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        if self.rope_type == "linear":
            out["factor"] = self.factor
        elif self.rope_type == "llama3":
            out.update(
                factor=self.factor,
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (Llama, Gemma 1, Gemma 2, Gemma 3 text, Qwen2, Qwen3, Mistral).

    One frozen description serves every family; the family switches below are all set by `from_hf_dict`.

    Attributes:
        norm_plus_one: Gemma RMSNorm multiplies by (1 + w) in float32; Llama multiplies by w after the cast.
        scale_embeddings: embeddings multiplied by sqrt(hidden_size) cast to the compute dtype (Gemma).
        sandwich_norms: extra RMSNorm after attention and after the MLP (Gemma 2 and 3).
        qk_norm: RMSNorm on queries and keys per head (Gemma 3, Qwen3).
        qkv_bias: biases on the query, key and value projections (Qwen2 / Qwen2.5), added after the matmul.
        query_pre_attn_scalar: attention scale is `query_pre_attn_scalar**-0.5` (else `head_dim**-0.5`).
        layer_types: per layer "full_attention" or "sliding_attention" (window `sliding_window`, keys with
            `q_index - k_index < sliding_window`). Mistral: every layer sliding when `sliding_window` is set;
            Qwen2/3: layers i ≥ max_window_layers when use_sliding_window (transformers' `layer_types`).
        rope: one `RopeSpec` per layer type (Gemma 3: local and global bases).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    activation: Literal["silu", "gelu_tanh"] = "silu"
    tie_word_embeddings: bool = False
    norm_plus_one: bool = False
    scale_embeddings: bool = False
    sandwich_norms: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    rope: tuple[tuple[str, RopeSpec], ...] = ((FULL_ATTENTION, RopeSpec()),)
    max_position_embeddings: int = 8192
    bos_token_id: int | tuple[int, ...] | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    remat: RematPolicy = "none"
    scan_unroll: int = 1  # layers per scan iteration (speed knob, same results; 1 under remat: model.scan_unroll)
    attention: str = "auto"  # "auto" | "xla" | "cudnn" | "splash" | "blockwise" (rpo_jax.models.attention; speed knob)

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL_ATTENTION,) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        for t in self.layer_types:
            if t not in (FULL_ATTENTION, SLIDING_ATTENTION):
                raise ValueError(f"layer type {t!r} is not supported ({FULL_ATTENTION}, {SLIDING_ATTENTION})")
            if t not in dict(self.rope):
                raise ValueError(f"no rope parameters for layer type {t!r}")
        if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a positive sliding_window")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if not (isinstance(self.scan_unroll, int) and 1 <= self.scan_unroll):
            raise ValueError(f"scan_unroll={self.scan_unroll!r} must be a positive int")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
        if self.activation not in ("silu", "gelu_tanh"):
            raise ValueError(f"activation={self.activation!r} is not supported (silu, gelu_tanh)")

    # ------------------------------------------------------------------ derived quantities
    @property
    def attention_scale(self) -> float:
        """Multiplier of q·k: query_pre_attn_scalar**-0.5 (Gemma 2/3) or head_dim**-0.5."""
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return float(base) ** -0.5

    @property
    def rope_by_type(self) -> dict[str, RopeSpec]:
        return dict(self.rope)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Number of parameters (the tied unembedding counted once).

        Per layer: D·(H + 2K)·hd (q, k, v) + H·hd·D (o) + 3·D·F (MLP) + norms (2 or 4 of D, + 2·hd for QK-norm)
        + (H + 2K)·hd (q/k/v biases).
        """
        d, hd, f = self.hidden_size, self.head_dim, self.intermediate_size
        attn = d * (self.num_heads + 2 * self.num_kv_heads) * hd + self.num_heads * hd * d
        norms = d * (4 if self.sandwich_norms else 2) + (2 * hd if self.qk_norm else 0)
        biases = (self.num_heads + 2 * self.num_kv_heads) * hd if self.qkv_bias else 0
        per_layer = attn + 3 * d * f + norms + biases
        total = self.num_layers * per_layer + d  # + final norm
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return total

    # ------------------------------------------------------------------ Hugging Face conversion
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json", **overrides) -> "ModelConfig":
        """Reads a Hugging Face `config.json` dict (transformers 4 or 5 format).

        Raises ValueError naming `source` and the field for: a value that is not a dict, an unknown model type, a
        missing or non-positive `REQUIRED_FIELDS` entry (for "gemma3": `text_config` and its hidden_size,
        intermediate_size and num_hidden_layers), values transformers rejects and unsupported features.
        """
        if not isinstance(hf, dict):
            raise ValueError(f"{source}: expected a JSON object of config fields, found {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type == "gemma3":
            _check_required(hf.get("text_config"), _REQUIRED_TEXT_CONFIG_FIELDS, source, "text_config.")
        else:
            _check_required(hf, REQUIRED_FIELDS, source)
        from transformers import AutoConfig  # local import: transformers is heavy

        hf = {k: v for k, v in hf.items() if k not in ("transformers_version", "architectures", "auto_map")}
        try:
            tc = AutoConfig.for_model(**hf)
        except Exception as e:  # transformers' own validation (strict dataclasses)
            reason = " ".join(str(e).split())  # one line
            raise ValueError(f"{source}: transformers rejected the configuration: {reason}") from e
        if model_type == "gemma3":
            tc = tc.text_config
            model_type = "gemma3_text"
        for flag in ("attention_bias", "mlp_bias"):  # (Qwen2's q/k/v biases are not a flag: always there)
            if getattr(tc, flag, False):
                raise ValueError(f"{source}: {flag}=True is not supported (biases on the output or MLP projections)")
        if getattr(tc, "use_bidirectional_attention", False):
            raise ValueError(f"{source}: use_bidirectional_attention=True is not supported")
        num_heads = int(tc.num_attention_heads)
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // num_heads
        num_kv = getattr(tc, "num_key_value_heads", None) or num_heads
        act = getattr(tc, "hidden_activation", None) or getattr(tc, "hidden_act", None)
        act_map = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
        if act not in act_map:
            raise ValueError(f"{source}: hidden activation {act!r} is not supported ({', '.join(act_map)})")

        rope_params = tc.rope_parameters
        layer_types = tuple(getattr(tc, "layer_types", None) or (FULL_ATTENTION,) * tc.num_hidden_layers)
        if model_type in ("llama", "gemma"):
            if getattr(tc, "layer_types", None) and set(layer_types) != {FULL_ATTENTION}:
                raise ValueError(f"{source}: layer_types other than full_attention are not supported for {model_type}")
            layer_types = (FULL_ATTENTION,) * tc.num_hidden_layers
        elif model_type == "mistral":
            layer_types = mistral_layer_types(hf, tc.sliding_window, int(tc.num_hidden_layers), source)
        if isinstance(rope_params, dict) and set(rope_params) <= {FULL_ATTENTION, SLIDING_ATTENTION} and rope_params:
            rope = tuple(
                (t, RopeSpec.from_hf(rope_params[t], where=f"{source}: rope_parameters[{t!r}]"))
                for t in sorted(set(layer_types))
            )
        else:
            spec = RopeSpec.from_hf(rope_params, where=f"{source}: rope_parameters")
            rope = tuple((t, spec) for t in sorted(set(layer_types)))

        gemma = model_type.startswith("gemma")
        kwargs: dict[str, Any] = dict(
            model_type=model_type,
            vocab_size=int(tc.vocab_size),
            hidden_size=int(tc.hidden_size),
            intermediate_size=int(tc.intermediate_size),
            num_layers=int(tc.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=int(num_kv),
            head_dim=int(head_dim),
            rms_norm_eps=float(tc.rms_norm_eps),
            activation=act_map[act],
            tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
            norm_plus_one=gemma,
            scale_embeddings=gemma,
            sandwich_norms=model_type in ("gemma2", "gemma3_text"),
            qk_norm=model_type in ("gemma3_text", "qwen3"),
            qkv_bias=model_type == "qwen2",
            query_pre_attn_scalar=(
                float(tc.query_pre_attn_scalar) if model_type in ("gemma2", "gemma3_text") else None
            ),
            # transformers' Gemma 3 attention ignores attn_logit_softcapping; so do we.
            attn_logit_softcap=_opt_float(getattr(tc, "attn_logit_softcapping", None))
            if model_type == "gemma2"
            else None,
            final_logit_softcap=_opt_float(getattr(tc, "final_logit_softcapping", None)),
            sliding_window=(int(tc.sliding_window) if SLIDING_ATTENTION in layer_types and tc.sliding_window else None),
            layer_types=layer_types,
            rope=rope,
            max_position_embeddings=int(getattr(tc, "max_position_embeddings", 8192) or 8192),
            bos_token_id=_opt_ids(getattr(tc, "bos_token_id", None)),
            eos_token_id=_opt_ids(getattr(tc, "eos_token_id", None)),
            pad_token_id=getattr(tc, "pad_token_id", None),
        )
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ValueError as e:  # __post_init__'s checks, which do not know the file
            where = f"{source} (with overrides {sorted(overrides)})" if overrides else source
            raise ValueError(f"{where}: {e}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 `config.json` dict that `AutoModelForCausalLM.from_pretrained` loads."""
        arch = {t: a for a, t in CAUSAL_LM_ARCHITECTURES.items() if t != "gemma3"}[self.model_type]
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": _ids_json(self.bos_token_id),
            "eos_token_id": _ids_json(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
            "attention_bias": False,
        }
        act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[self.activation]
        if self.model_type in ("qwen2", "qwen3", "mistral"):
            out.update(self._windowed_family_hf_fields())
            out["hidden_act"] = act
            out["rope_parameters"] = self.rope_by_type[self.layer_types[0]].to_hf()
            if self.model_type != "qwen3":
                del out["attention_bias"]  # Qwen2's q/k/v biases are unconditional; Mistral has none
        elif self.model_type in ("llama", "gemma"):
            out["hidden_act"] = act
            out["rope_parameters"] = self.rope_by_type[FULL_ATTENTION].to_hf()
            if self.model_type == "llama":
                out["mlp_bias"] = False
        else:
            out["hidden_activation"] = act
            qpas = self.query_pre_attn_scalar
            out["query_pre_attn_scalar"] = int(qpas) if qpas is not None and float(qpas).is_integer() else qpas
            out["final_logit_softcapping"] = self.final_logit_softcap
            out["attn_logit_softcapping"] = self.attn_logit_softcap
            out["sliding_window"] = self.sliding_window or 4096
            out["layer_types"] = list(self.layer_types)
            if self.model_type == "gemma2":
                out["rope_parameters"] = self.rope_by_type[self.layer_types[0]].to_hf()
            else:
                specs = self.rope_by_type
                out["rope_parameters"] = {
                    t: specs.get(t, specs[self.layer_types[0]]).to_hf() for t in (FULL_ATTENTION, SLIDING_ATTENTION)
                }
        return out

    def _windowed_family_hf_fields(self) -> dict[str, Any]:
        """Qwen2/3: use_sliding_window, sliding_window, max_window_layers, layer_types; Mistral: sliding_window
        (every layer sliding, or none)."""
        sliding = [i for i, t in enumerate(self.layer_types) if t == SLIDING_ATTENTION]
        if self.model_type == "mistral":
            if sliding and len(sliding) != self.num_layers:
                raise ValueError("mistral: sliding_window applies to every layer; mixed layer_types cannot be saved")
            return {"sliding_window": self.sliding_window if sliding else None}
        return {
            "use_sliding_window": bool(sliding),
            "sliding_window": self.sliding_window if sliding else None,
            "max_window_layers": sliding[0] if sliding else self.num_layers,
            "layer_types": list(self.layer_types),
        }


def mistral_layer_types(
    hf: dict[str, Any], sliding_window: int | None, num_layers: int, source: str
) -> tuple[str, ...]:
    """Mistral's layer types: every layer "sliding_attention" when `sliding_window` is set (transformers'
    MistralModel windows all layers alike), else "full_attention". A `layer_types` entry in config.json, which
    MistralModel ignores, must agree (ValueError naming `source` otherwise)."""
    derived = (SLIDING_ATTENTION if sliding_window else FULL_ATTENTION,) * num_layers
    given = hf.get("layer_types")
    if given is not None and tuple(given) != derived:
        raise ValueError(
            f"{source}: layer_types={given!r} disagrees with sliding_window={sliding_window!r}; transformers' "
            "MistralModel ignores layer_types and windows every layer when sliding_window is set"
        )
    return derived


def _opt_float(x) -> float | None:
    return None if x is None else float(x)


def _opt_ids(x):
    if isinstance(x, (list, tuple)):
        return tuple(int(i) for i in x)
    return None if x is None else int(x)


def _ids_json(x):
    return list(x) if isinstance(x, tuple) else x


def embedding_scale(config: ModelConfig) -> float:
    """sqrt(hidden_size) for Gemma, 1 otherwise."""
    return math.sqrt(config.hidden_size) if config.scale_embeddings else 1.0
