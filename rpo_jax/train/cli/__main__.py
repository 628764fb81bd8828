"""`python -m rpo_jax.train.cli`: `rpo-train`."""

from rpo_jax.train.cli.train import main

main()
