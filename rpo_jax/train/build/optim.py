"""Optimizer and learning-rate schedule from the config (optax).

Config (`config.optimizer`):
  name            "adamw" (default), or any optax optimizer by name ("adam", "sgd", "lion", "adafactor", ...)
  learning_rate   peak learning rate
  schedule        "cosine" | "linear" | "constant" (after a linear warm-up of `warmup_steps` from 0; the
                  formulas of transformers' schedules of the same names, `constant_with_warmup` for "constant")
  warmup_ratio    >0: warm up over ceil(warmup_ratio · total steps) instead of `warmup_steps`
  end_lr_factor   final learning rate as a fraction of the peak (cosine/linear)
  weight_decay    decoupled weight decay (adamw, lion, ...), applied only where `weight_decay_mask` allows
  weight_decay_mask  "matrices" (default: decay ≥2-D weights, not norms/biases/scalars) | "all" | "none"
  grad_clip_norm  global-norm clipping threshold (0 or None: off)
  kwargs          extra keyword arguments for the optax optimizer (b1, b2, eps, momentum, ...)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import optax

from rpo_jax.train.config.schema import WEIGHT_DECAY_OPTIMIZERS, OptimizerSection
from rpo_jax.train.config.validation import validate_section


def make_schedule(
    learning_rate: float, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine", end_lr_factor: float = 0.0
) -> optax.Schedule:
    """Linear warm-up 0 → lr over `warmup_steps`, then cosine/linear decay to lr·end_lr_factor, or constant."""
    warmup_steps = max(0, min(int(warmup_steps), total_steps))
    decay_steps = max(1, total_steps - warmup_steps)
    end = learning_rate * end_lr_factor
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_lr_factor)
    elif schedule == "linear":
        decay = optax.linear_schedule(learning_rate, end, decay_steps)
    elif schedule == "constant":
        decay = optax.constant_schedule(learning_rate)
    else:
        raise ValueError(f"optimizer.schedule={schedule!r}: expected 'cosine', 'linear' or 'constant'")
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def weight_decay_mask(kind: str):
    """A mask function for optax weight decay (True = decays).

    "matrices": weights with ≥ 2 dimensions whose path names no norm, scale or bias (stacked layers make norm
    scales 2-D, so the path decides, not the shape); "all"; "none".
    """
    if kind == "all":
        return None
    if kind == "none":
        return lambda params: jax.tree.map(lambda _: False, params)
    if kind == "matrices":

        def is_matrix(path, p) -> bool:
            names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()
            return getattr(p, "ndim", 0) >= 2 and not re.search(r"norm|scale|bias", names)

        return lambda params: jax.tree_util.tree_map_with_path(is_matrix, params)
    raise ValueError(f"optimizer.weight_decay_mask={kind!r}: expected 'matrices', 'all' or 'none'")


def make_optimizer(cfg: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule) from `config.optimizer` (keys in the module docstring; a mapping of
    some of them takes the others' defaults, and is checked as the schema checks `config.optimizer`)."""
    opt = validate_section(OptimizerSection, cfg, "config.optimizer")
    warmup = opt.warmup_steps
    if opt.warmup_ratio > 0:
        warmup = math.ceil(total_steps * opt.warmup_ratio)  # transformers' get_warmup_steps
    lr = make_schedule(opt.learning_rate, total_steps, warmup, opt.schedule, opt.end_lr_factor)
    kwargs = dict(opt.kwargs)
    wd, name = opt.weight_decay, opt.name
    mask = weight_decay_mask(opt.weight_decay_mask)
    factory = getattr(optax, name)
    if name in WEIGHT_DECAY_OPTIMIZERS:
        tx = (
            factory(learning_rate=lr, weight_decay=wd, mask=mask, **kwargs)
            if name != "adafactor"
            else factory(learning_rate=lr, weight_decay_rate=wd or None, weight_decay_mask=mask, **kwargs)
        )
    else:  # the schema refuses a weight decay here
        tx = factory(learning_rate=lr, **kwargs)
    if opt.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
    return tx, lr
