"""rpo_jax.train: the trainer, in rooms (each a sub-package).

- `config`: recipe defaults, the typed schema every module reads, `--from-trl`, the quickstart.
- `core`: the run skeleton every job plugs into — work dir, identity, checkpoints, metrics, export.
- `build`: what a run is made of — data, models, LoRA, optimizer, state, references, and the one program builder.
- `step`: the jitted steps — log-probs, gradient accumulation, the update.
- `jobs`: preference training, online RPO, reward models — only what is specific to each.
- `runtime`: host rows → global arrays, packed rows, processes, XLA:CPU memory, the FLOP model and throughput.
- `plan`: TPU slices, ahead-of-time compilation, HLO analysis, the report of `rpo-plan`.
- `cli`: `rpo-train`, `rpo-export`, `rpo-plan` (thin: parse, validate, call a job).

Layering (a room imports only rooms listed before it): config → runtime → step → build → core → jobs → plan → cli.

The public entries, one per job: `train_preference(cfg, workdir)` (the main job), `train_online(cfg, workdir)`,
`train_reward_model(cfg, workdir)`; and `base_config()`, `build_programs(cfg, devices)` (what `rpo-plan`
compiles), `export_workdir(workdir, out_dir)` (what `rpo-export` writes).
"""

import importlib

#: The public entry of each job (and of the config, the plan and the export), imported on first use so that
#: importing a room (e.g. `rpo_jax.train.cli`) does not import every job before `jax.distributed.initialize`.
_ENTRIES = {
    "base_config": ("rpo_jax.train.config.defaults", "base_config"),
    "train_preference": ("rpo_jax.train.jobs.preference", "train"),
    "train_online": ("rpo_jax.train.jobs.online", "train_online"),
    "train_reward_model": ("rpo_jax.train.jobs.reward_model", "train_reward_model"),
    "export_workdir": ("rpo_jax.train.core.export", "export_workdir"),
    "build_programs": ("rpo_jax.train.build.plans", "build_programs"),
}
__all__ = sorted(_ENTRIES)


def __getattr__(name: str):
    if name not in _ENTRIES:
        raise AttributeError(f"module 'rpo_jax.train' has no attribute {name!r}")
    module, attr = _ENTRIES[name]
    return getattr(importlib.import_module(module), attr)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
