"""Quickstart: pairwise RPO (bwd-KL, all pairs of K = 4) on the bundled demo task, tiny Llama, CPU minutes.

The same recipe `rpo-train` runs with no arguments (it lives in the package so an installed wheel has it).
"""

from rpo_jax.train.config.quickstart import get_config  # noqa: F401
