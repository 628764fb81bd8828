"""SmolLM2-135M-Instruct, DPO on the demo task's best-vs-worst pairs: a real checkpoint, sized for a CPU.

The demo form of `configs/smollm2.py` (that recipe trains on your own file): the bundled demo data, short
sequences, the reference scored in the step (no precompute pass over the 2,000 training pairs on a CPU), 30 steps.
Build the checkpoint offline first:  bash ../shared/models/make_smollm2.sh   (prints its directory)
    rpo-train --config configs/smollm2_demo.py --config.model.path=$HOME/.cache/rpo_jax/smollm2-135m-instruct
"""

import os

from rpo_jax.train.config.defaults import base_config


def get_config():
    c = base_config()
    c.model.path = os.path.expanduser("~/.cache/rpo_jax/smollm2-135m-instruct")
    c.model.dtype = "auto"  # float32 on CPU, bfloat16 on GPU/TPU
    c.model.scan_unroll = 30  # all 30 layers unrolled: ~6 s more compile, 5-13 % faster CPU steps
    c.data.train = "demo"
    c.data.eval = "demo"
    c.data.pairs = "best_worst"
    c.data.max_length = 128
    c.data.max_prompt_length = 64
    c.data.batch_size = 4
    c.data.eval_batch_size = 8
    c.loss.name = "dpo"
    c.loss.hparams = {"beta": 0.1}
    c.reference_mode = "in_step"  # no precompute pass over the 2,000 training pairs on a CPU
    c.optimizer.learning_rate = 5e-6
    c.optimizer.warmup_steps = 5
    c.train.steps = 30
    c.train.log_every = 5
    c.train.eval_every = 0  # held-out evaluation at the end only
    c.train.checkpoint_every = 10
    return c
