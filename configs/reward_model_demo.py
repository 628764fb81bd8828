"""A tiny Bradley–Terry reward model on the bundled demo task ("sort the digits"): random-init Llama, all pairs
(i, j) of the K = 4 judge-scored responses with r_i > r_j, held-out pair accuracy on the demo test split.

    rpo-train --config configs/reward_model_demo.py --workdir runs/rm_demo
    # WORKDIR/export: a LlamaForSequenceClassification checkpoint with the demo tokenizer
    #   rm, _ = rpo_jax.models.load_reward_model("runs/rm_demo/export")
    #   reward = rpo_jax.models.reward_model_fn(rm, tokenizer, max_length=48, batch_size=64)
"""

from rpo_jax.train.config.defaults import base_config


def get_config():
    c = base_config()
    c.mode = "reward_model"
    c.model.path = ""
    c.model.init = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 128,
    }
    c.model.tokenizer = ""  # the demo tokenizer (model.path is empty)
    c.model.dtype = "auto"
    c.data.train = "demo"
    c.data.eval = "demo"  # the 200 held-out demo prompts
    c.data.max_length = 48  # the longest demo conversation has 42 tokens (buckets 16, 32, 48)
    c.data.batch_size = 32  # pairs per step
    c.data.eval_batch_size = 128
    c.reward_model.pairs = "all"
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.0
    c.train.steps = 200
    c.train.log_every = 50
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    return c
