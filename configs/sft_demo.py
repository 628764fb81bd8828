"""Supervised fine-tuning on the demo task: the starting policy of the online recipe (configs/online_demo.py).

    rpo-train --config configs/sft_demo.py --workdir runs/sft_demo      # ~1 min on a 2-core CPU

The `sft` loss trains on the best-rewarded response of each demo prompt (the sorted digits). Few steps on
purpose: the policy's samples should still vary in judge reward, so that online RPO has something to learn.
"""

from rpo_jax.train.config.defaults import base_config

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 128,
}


def get_config():
    c = base_config()
    c.model.init = dict(TINY_LLAMA)
    c.data.train = "demo"
    c.data.eval = "demo"
    c.data.max_length = 64
    c.data.max_prompt_length = 32
    c.data.batch_size = 16
    c.data.eval_batch_size = 40
    c.loss.name = "sft"
    c.loss.hparams = {}
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 10
    c.train.steps = 150
    c.train.log_every = 25
    c.train.eval_every = 0
    c.train.checkpoint_every = 150
    return c
