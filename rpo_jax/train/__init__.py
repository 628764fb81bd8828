"""rpo_jax.train: the run skeleton (runner.py) and the three jobs that plug into it — preference training
(preference.py, the main job), online RPO (online.py) and Bradley–Terry reward models (reward_model.py) — with
what they share: set-up, mesh placement, the jit steps, the reference cache, checkpoints, metrics, performance
accounting, export and the CLIs `rpo-train` / `rpo-export` (cli.py).
"""
