"""CPO (Xu et al. 2024) and its SimPO / AlphaPO variants as TRL's CPOTrainer has them: reference-free pair losses
with an NLL term on the chosen responses — the demo task's best-vs-worst pairs, tiny Llama, CPU minutes.

    rpo-train --config configs/cpo_demo.py --workdir runs/cpo_demo
    rpo-train --config configs/cpo_demo.py --config.loss.hparams.loss_type=simpo \\
              --config.loss.hparams.simpo_gamma=0.5 --config.loss.hparams.beta=2.0 --workdir runs/cpo_simpo
    # AlphaPO (TRL's loss_type="alphapo"): loss_type=simpo, cpo_alpha=0, alpha=0.25 (averaged log-probs)

`loss_type`: "sigmoid" (CPO, summed log-probs), "hinge", "ipo", "simpo" (average log-probs, margin γ =
`simpo_gamma`); `cpo_alpha` weighs the NLL of the chosen responses (0: none); `alpha ≠ 0` reshapes the scores as
AlphaPO; `label_smoothing` for sigmoid / simpo.
"""

from rpo_jax.train.config.quickstart import get_config as quickstart


def get_config():
    c = quickstart()
    c.data.pairs = "best_vs_worst"
    c.loss.name = "cpo"
    c.loss.hparams = {"beta": 0.1, "loss_type": "sigmoid", "cpo_alpha": 1.0}
    c.optimizer.learning_rate = 1e-3
    c.train.steps = 200
    return c
