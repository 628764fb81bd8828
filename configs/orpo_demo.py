"""ORPO (Hong et al. 2024): SFT and preference in one stage, no reference model — the demo task's best-vs-worst
pairs, tiny Llama from a random init, CPU minutes.

    rpo-train --config configs/orpo_demo.py --workdir runs/orpo_demo

The loss is TRL's ORPOTrainer's: NLL of the chosen sequences (prompt and response tokens, `nll_tokens="sequence"`;
`"response"` for the response tokens only, the authors' `disable_prompt_loss=True`) − β · log σ(log odds ratio of
the average log-probs). No reference: nothing cached, nothing scored beside the policy. Batches are padded (the
prompt tokens of each sequence are read).
"""

from rpo_jax.train.config.quickstart import get_config as quickstart


def get_config():
    c = quickstart()
    c.data.pairs = "best_vs_worst"
    c.loss.name = "orpo"
    c.loss.hparams = {"beta": 0.1}
    c.optimizer.learning_rate = 1e-3
    c.train.steps = 200
    return c
