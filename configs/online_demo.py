"""Online RPO on the demo task: sample K = 4 answers per prompt, score them with the demo judge, update.

    rpo-train --config configs/sft_demo.py --workdir runs/sft_demo          # the starting policy (~1 min)
    rpo-train --config configs/online_demo.py --workdir runs/online_demo    # online RPO (~2 min)

Any loss and reference fit: `--config.loss.name=rloo --config.online.reference=current` is REINFORCE
leave-one-out; `--config.online.reference=previous_iterate` resets the reference every iteration;
`--config.online.sampler=initial` trains on samples of the starting policy only (offline).
"""

from rpo_jax.train.config.defaults import base_config


def get_config():
    c = base_config()
    c.mode = "online"
    c.model.path = "runs/sft_demo/export"
    c.data.train = "demo"
    c.data.eval = "demo"
    c.data.max_length = 64
    c.data.max_prompt_length = 32
    c.data.batch_size = 16
    c.loss.name = "rpo_bwd_kl"
    c.loss.hparams = {"beta": 0.1, "eta": 10.0}
    c.optimizer.learning_rate = 1e-3
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.online.iterations = 20
    c.online.prompts_per_iteration = 32
    c.online.num_samples = 4
    c.online.updates_per_iteration = 4
    c.online.max_new_tokens = 20
    c.online.reference = "initial"
    c.online.reward_judge = "rpo_jax.data.demo:judge"
    c.online.eval_prompts = 200
    c.online.eval_every = 5
    c.train.checkpoint_every = 5
    return c
