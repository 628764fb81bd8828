"""Tiny random Hugging Face checkpoints built at test time with transformers + torch `save_pretrained`.

Every builder returns the checkpoint directory. All weights (norms included) are random so that each feature
(e.g. Gemma's (1 + w) norms, QK-norm) changes the logits. Usable by any test module:

    from tests.hf_fixtures import make_tiny_llama, hf_logits
    path = make_tiny_llama(tmp_path / "llama", num_key_value_heads=1)
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

LLAMA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

GEMMA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
)


def _randomize(model, seed: int, norm_plus_one: bool) -> None:
    """Overwrites every parameter with random values: matrices N(0, 0.08²); biases N(0, 0.1²); norms 1+N(0,0.1²)
    (Llama, Qwen, Mistral) or N(0, 0.1²) (Gemma, whose norms multiply by 1 + w)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1:
                value = 0.1 * noise if norm_plus_one or name.endswith(".bias") else 1.0 + 0.1 * noise
            else:
                value = 0.08 * noise
            p.copy_(value.to(p.dtype))


def _save(model, out_dir, *, dtype: str, max_shard_size: str | None) -> pathlib.Path:
    import torch

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(out), **kwargs)
    return out


def make_tiny_llama(
    out_dir, *, seed: int = 0, dtype: str = "float32", max_shard_size: str | None = None, **config_overrides
) -> pathlib.Path:
    """A tiny random `LlamaForCausalLM` checkpoint (defaults: LLAMA_DEFAULTS; any LlamaConfig field overrides,
    e.g. rope_scaling / rope_parameters, tie_word_embeddings, num_key_value_heads, head_dim)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**LLAMA_DEFAULTS, **config_overrides})
    model = LlamaForCausalLM(cfg).eval()
    _randomize(model, seed, norm_plus_one=False)
    return _save(model, out_dir, dtype=dtype, max_shard_size=max_shard_size)


def make_tiny_gemma(
    out_dir,
    *,
    version: int = 1,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    multimodal: bool = False,
    **config_overrides,
) -> pathlib.Path:
    """A tiny random Gemma `version` 1, 2 or 3 (text) checkpoint; `multimodal=True` (version 3 only) saves a
    `Gemma3ForConditionalGeneration` with a tiny vision tower, whose text tower is what rpo_jax loads."""
    import torch
    import transformers as tr

    torch.manual_seed(seed)
    base = {**GEMMA_DEFAULTS, **config_overrides}
    if version == 1:
        model = tr.GemmaForCausalLM(tr.GemmaConfig(**base))
    elif version == 2:
        base = {"sliding_window": 4, "query_pre_attn_scalar": 24, **base}
        model = tr.Gemma2ForCausalLM(tr.Gemma2Config(**base))
    elif version == 3 and not multimodal:
        base = {"sliding_window": 4, "query_pre_attn_scalar": 24, **base}
        model = tr.Gemma3ForCausalLM(tr.Gemma3TextConfig(**base))
    elif version == 3:
        base = {"sliding_window": 4, "query_pre_attn_scalar": 24, **base}
        text = tr.Gemma3TextConfig(**base)
        vision = tr.SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        cfg = tr.Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=4,
            image_token_index=255,
            boi_token_index=253,
            eoi_token_index=254,
        )
        model = tr.Gemma3ForConditionalGeneration(cfg)
    else:
        raise ValueError(f"unknown Gemma version {version}")
    model = model.eval()
    _randomize(model, seed, norm_plus_one=True)
    return _save(model, out_dir, dtype=dtype, max_shard_size=max_shard_size)


#: Qwen2 / Qwen2.5 (q/k/v biases, a large RoPE base), Qwen3 (QK-norm, explicit head_dim) and Mistral bases.
QWEN2_DEFAULTS: dict[str, Any] = dict(LLAMA_DEFAULTS, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
QWEN3_DEFAULTS: dict[str, Any] = dict(QWEN2_DEFAULTS, head_dim=24)  # ≠ hidden / heads = 16
MISTRAL_DEFAULTS: dict[str, Any] = dict(LLAMA_DEFAULTS, sliding_window=None)
_FAMILIES = {
    "qwen2": ("Qwen2", QWEN2_DEFAULTS),
    "qwen3": ("Qwen3", QWEN3_DEFAULTS),
    "mistral": ("Mistral", MISTRAL_DEFAULTS),
}


def make_tiny_family(
    out_dir,
    family: str,
    *,
    seed: int = 0,
    dtype: str = "float32",
    task: str = "causal_lm",
    num_labels: int = 1,
    **config_overrides,
) -> pathlib.Path:
    """A tiny random Qwen2 / Qwen3 / Mistral (`family` "qwen2", "qwen3", "mistral") checkpoint: `XForCausalLM`, or
    with task="sequence_classification" an `XForSequenceClassification` reward model with `num_labels` scores.
    Any config field overrides the defaults (QWEN2_DEFAULTS, QWEN3_DEFAULTS, MISTRAL_DEFAULTS), e.g.
    use_sliding_window / sliding_window / max_window_layers, tie_word_embeddings, head_dim, num_key_value_heads."""
    import torch
    import transformers as tr

    prefix, defaults = _FAMILIES[family]
    torch.manual_seed(seed)
    extra = {"num_labels": num_labels} if task == "sequence_classification" else {}
    cfg = getattr(tr, f"{prefix}Config")(**{**defaults, **extra, **config_overrides})
    head = "ForSequenceClassification" if task == "sequence_classification" else "ForCausalLM"
    model = getattr(tr, prefix + head)(cfg).eval()
    _randomize(model, seed, norm_plus_one=False)
    return _save(model, out_dir, dtype=dtype, max_shard_size=None)


def rewrite_config_t4(checkpoint_dir) -> dict:
    """Rewrites `config.json` in the transformers-4 format: `rope_theta` + `rope_scaling` (Gemma 3:
    `rope_local_base_freq`, and `rope_scaling` for the global layers) instead of `rope_parameters`."""
    path = pathlib.Path(checkpoint_dir) / "config.json"
    cfg = json.loads(path.read_text())
    target = cfg.get("text_config", cfg)
    rope = target.pop("rope_parameters")
    if "full_attention" in rope and isinstance(rope["full_attention"], dict):
        full, local = rope["full_attention"], rope.get("sliding_attention") or {}
        target["rope_theta"] = full["rope_theta"]
        if "rope_theta" in local:
            target["rope_local_base_freq"] = local["rope_theta"]
        scaling = {k: v for k, v in full.items() if k != "rope_theta"}
        target["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    else:
        target["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        target["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    path.write_text(json.dumps(cfg, indent=2))
    return cfg


def load_torch_model(checkpoint_dir):
    """The checkpoint as a float32 transformers model with eager attention (reference for parity)."""
    import torch
    import transformers as tr

    cfg = json.loads((pathlib.Path(checkpoint_dir) / "config.json").read_text())
    cls = tr.Gemma3ForConditionalGeneration if cfg.get("model_type") == "gemma3" else tr.AutoModelForCausalLM
    return cls.from_pretrained(str(checkpoint_dir), dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(model_or_dir, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """transformers logits [N,T,V] float32 for `tokens` (a model from `load_torch_model` or a directory)."""
    import torch

    model = load_torch_model(model_or_dir) if isinstance(model_or_dir, (str, pathlib.Path)) else model_or_dir
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask, dtype=np.int64))
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(tokens, dtype=np.int64)), **kwargs)
    return out.logits.float().numpy()


def copy_checkpoint(src, dst) -> pathlib.Path:
    """A copy of the checkpoint directory `src` at `dst` (to break without touching a shared fixture)."""
    import shutil

    return pathlib.Path(shutil.copytree(src, dst))


def edit_config(checkpoint_dir, *, drop: tuple[str, ...] = (), **changes) -> dict:
    """Rewrites `config.json` of `checkpoint_dir` with the fields `drop` removed and `changes` set; returns it."""
    path = pathlib.Path(checkpoint_dir) / "config.json"
    cfg = json.loads(path.read_text())
    for key in drop:
        cfg.pop(key, None)
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2))
    return cfg
