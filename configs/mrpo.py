"""MRPO with two references on the demo task: the initial policy (primary) and a second checkpoint.

The second reference may use another tokenizer: it scores the response text with its own tokenizer and chat
template. Both references' log-probs are precomputed once ([N, K, 2]) and cached.

    rpo-train --config configs/mrpo.py \\
        --config.references='[{"path": "", "tokenizer": ""}, {"path": "/ckpt/other", "tokenizer": ""}]'
Here the second reference defaults to the quickstart's exported policy (run `rpo-train` once first).
"""

from rpo_jax.train.config.quickstart import get_config as quickstart


def get_config():
    c = quickstart()
    c.references = [{"path": "", "tokenizer": ""}, {"path": "runs/quickstart/export", "tokenizer": ""}]
    c.loss.name = "mrpo"
    c.loss.hparams = {"beta": 0.1, "alpha": None, "epsilon": 0.1, "epsilon_mode": "adaptive"}
    c.data.pairs = "best_worst"
    return c
