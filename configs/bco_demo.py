"""BCO (Jung et al. 2024) on thumbs-up / thumbs-down data, without UDM: the demo task unpaired, tiny Llama, CPU
minutes.

    rpo-train --config configs/bco_demo.py --workdir runs/bco_demo

A binary classifier of desirable vs undesirable completions on the implicit reward r = β(log π_θ − log π_ref),
shifted by δ, the running mean of every reward seen (updated with each micro-batch first, as TRL's BCOTrainer;
kept in the train state and its checkpoints). Data as configs/kto_demo.py (no mismatched completions here, so the
records may be shuffled). UDM (density-ratio weights from a classifier on prompt embeddings) is not implemented.
"""

from rpo_jax.train.config.quickstart import get_config as quickstart


def get_config():
    c = quickstart()
    c.data.pairs = "best_vs_worst"
    c.data.unpair = True
    c.loss.name = "bco"
    c.loss.hparams = {"beta": 0.1}
    c.optimizer.learning_rate = 1e-3
    c.train.steps = 200
    return c
