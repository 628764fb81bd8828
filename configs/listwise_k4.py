"""Listwise RPO with K = 4 scored responses per prompt: KL(softmax(η r*) ‖ softmax(implicit rewards)).

rpo-train --config configs/listwise_k4.py
"""

from rpo_jax.train.config.quickstart import get_config as quickstart


def get_config():
    c = quickstart()
    c.loss.name = "rpo_listwise"
    c.loss.hparams = {"beta": 0.1, "eta": 10.0}
    return c
