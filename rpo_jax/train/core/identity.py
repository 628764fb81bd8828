"""What makes a run the run it is, and the fingerprints it is made of.

A run's identity (`run_identity`) is recorded in WORKDIR/run_identity.json when the run starts; resuming the work
directory compares it with the identity of the new invocation (`identity_differences`) and refuses a different run
(`config.train.resume`, `rpo_jax.train.core.runner`). It holds what changes the trained model:

    mode          preference | online | reward_model
    model         the architecture (ModelConfig; speed-only switches left out) and the weights it starts from
    tokenizer     its vocabulary and chat template
    objective     the loss and its hyperparameters, references, and the mode's own settings
    data          a fingerprint of every split's tokenized examples (or prompts)
    settings      seed, global batch, parameter dtype, optimizer

and not what only decides how long, how fast or where it runs (steps / iterations, mesh, compute dtype, remat,
log / eval / checkpoint cadence). The same fingerprints key the reference log-prob cache.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import ml_collections
import pydantic

from rpo_jax.train.build.fingerprints import checkpoint_fingerprint, tokenizer_fingerprint, weights_fingerprint
from rpo_jax.train.build.lora import lora_enabled

#: ModelConfig fields that change speed only (same results), not the model.
SPEED_ONLY = ("remat", "scan_unroll", "attention")


def _json_value(value: Any) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        return value.to_dict()
    if isinstance(value, pydantic.BaseModel):  # a section of a validated RunConfig: its keys as they were given
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def _plain(value: Any) -> Any:
    """A JSON value (ConfigDicts, config sections and dataclasses at any depth → dicts, tuples → lists)."""
    return json.loads(json.dumps(value, sort_keys=True, default=_json_value))


def run_identity(
    cfg: ml_collections.ConfigDict,
    mode: str,
    model_config,
    tokenizer,
    *,
    objective: Mapping[str, Any],
    data: Mapping[str, str],
) -> dict[str, Any]:
    """The identity of a run (module docstring): `objective` and `data` (split → fingerprint) come from the
    mode; the rest from the config, the model config and the tokenizer."""
    architecture = {k: v for k, v in _plain(model_config).items() if k not in SPEED_ONLY}
    model = {"architecture": architecture, "weights": weights_fingerprint(cfg.model.path, cfg, len(tokenizer))}
    if lora_enabled(cfg):  # only then, so that the identities of full fine-tuning runs stay as they were
        model["lora"] = lora_identity(cfg)
    return _plain(
        {
            "mode": mode,
            "model": model,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "objective": dict(objective),
            "data": dict(data),
            "settings": {
                "seed": cfg.seed,
                "batch_size": cfg.data.batch_size,
                "param_dtype": cfg.model.param_dtype,
                "optimizer": cfg.optimizer,
            },
        }
    )


def lora_identity(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config.model.lora`'s settings, with the starting adapter's fingerprint (`checkpoint_fingerprint` of
    `init_from`) in place of its path."""
    lora = dict(cfg.model.lora)
    if lora.get("init_from"):
        lora["init_from"] = checkpoint_fingerprint(lora["init_from"])
    return lora


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def identity_differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`"key: recorded → now"` for every leaf that differs between two identities (dotted keys, sorted)."""
    old, new = _flatten(recorded), _flatten(current)
    missing = object()
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            show = lambda x: "(absent)" if x is missing else json.dumps(x)[:80]  # noqa: E731
            out.append(f"{key}: {show(a)} → {show(b)}")
    return out
