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
"""
