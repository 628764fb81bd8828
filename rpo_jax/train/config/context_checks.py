"""What a context mesh (`config.mesh.context` other than 1: every row's tokens split over the context devices,
ring attention) does not run, refused at config validation with one line naming the setting.

Everything else composes and is tested against context = 1 (docs/guides/long_context.md): padded, packed and
shared-prompt batches, references in the step or cached, evaluation, LoRA and QLoRA, the reward-model trainer.
"""

from __future__ import annotations

from typing import Any

from rpo_jax.train.config.values import ConfigError


def check_context(cfg: Any) -> None:
    """Raise a one-line `ConfigError` when `cfg` (a `RunConfig`) splits rows over a context axis (`mesh.context`
    ≠ 1; -1 may) together with a setting that does not compose with it:

    * `model.attention` "splash" or "cudnn" (the ring runs XLA blocks on each shard);
    * `mode="online"`, `eval.generation.every` > 0: sampling decodes with KV caches, which are not split;
    * a numeric `model.score_window`: on a context mesh every device runs the output head on its own T/C
      positions, so there is no window to set ("auto" resolves to every position there, same values).
    """
    context = cfg.mesh.context
    if context == 1:
        return
    where = f"config.mesh.context={context}"
    if cfg.model.attention in ("splash", "cudnn"):
        raise ConfigError(
            f"config.model.attention={cfg.model.attention!r} does not compose with {where} yet (ring attention "
            "runs XLA blocks per shard); use 'auto'"
        )
    if cfg.mode == "online":
        raise ConfigError(
            f"config.mode='online' does not compose with {where}: sampling decodes with KV caches, which do not "
            "split the sequence; use context=1 (data / fsdp / tensor)"
        )
    if cfg.eval.generation.every:
        raise ConfigError(
            f"config.eval.generation.every={cfg.eval.generation.every} does not compose with {where}: sampling "
            "decodes with KV caches, which do not split the sequence; set it to 0 (or run rpo-eval on the export)"
        )
    if isinstance(cfg.model.score_window, int):
        raise ConfigError(
            f"config.model.score_window={cfg.model.score_window} with {where}: each context device runs the "
            "output head on its own T/C positions, there is no window to set; use 'auto' or 'off'"
        )
