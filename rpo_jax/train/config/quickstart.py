"""The quickstart recipe (the default of `rpo-train`): listwise-free pairwise RPO (bwd-KL, all pairs of K = 4)
on the bundled "sort these digits" demo data, with a tiny Llama trained from a random init on a CPU.

It needs nothing but the package: the demo data, its judge-given rewards and its character tokenizer are
bundled. The reference is the initial policy, its log-probs cached once. At the end the trained policy's samples
are judged against the initial policy's (`config.eval.generation`: win rate with its interval).
"""

from rpo_jax.train.config.defaults import base_config


def get_config():
    c = base_config()
    c.model.path = ""
    c.model.init = {
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 256,
    }
    c.model.dtype = "auto"
    c.data.train = "demo"
    c.data.eval = "demo"
    c.data.max_length = 64
    c.data.max_prompt_length = 32
    c.data.batch_size = 16
    c.data.eval_batch_size = 40
    c.loss.name = "rpo_bwd_kl"
    c.loss.hparams = {"beta": 0.1, "eta": 10.0}
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.0
    c.train.steps = 200
    c.train.log_every = 25
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    # at the end: the 200 held-out prompts answered 4 times each by the trained and by the initial policy, judged by
    # the demo's judge (the initial policy's samples made once, before step 1)
    c.eval.generation.every = c.train.steps
    c.eval.generation.judge = "rpo_jax.data.demo:judge"
    c.eval.generation.baseline = "initial"
    c.eval.generation.num_prompts = 200
    c.eval.generation.samples_per_prompt = 4
    c.eval.generation.max_new_tokens = 16  # the longest ideal answer is 15 characters, then EOS
    return c
