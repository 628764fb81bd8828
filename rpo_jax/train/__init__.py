"""rpo_jax.train: mesh and sharding, the jit train/eval step, reference cache, checkpoints, metrics, the loop.

`train(config, workdir)` (rpo_jax.train.loop) is the main job; `rpo-train` / `rpo-export` are its CLIs.
"""
