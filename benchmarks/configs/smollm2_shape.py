"""SmolLM2-135M's shape with random weights, DPO, 4 prompts a step: the benchmarks' default model, for a machine
without the checkpoint (the SmolLM2 recipes' model settings: float32 on CPU / bfloat16 elsewhere, all 30 layers
unrolled).

    python benchmarks/train_step.py --config benchmarks/configs/smollm2_shape.py --config.data.batch_size=8
    python benchmarks/train_step.py --config configs/smollm2.py     # the real checkpoint instead

hidden 576, 30 layers, 9 heads (3 key/value heads, head_dim 64), MLP 1536, vocabulary 49,152, tied embeddings,
rope_theta 100,000 (SmolLM2-135M-Instruct's config.json).
"""

from rpo_jax.train.config.defaults import base_config

SMOLLM2_135M = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
}


def get_config():
    c = base_config()
    c.model.path = ""
    c.model.init = dict(SMOLLM2_135M)
    c.model.dtype = "auto"  # float32 on CPU, bfloat16 on GPU/TPU
    c.model.scan_unroll = 30  # as configs/smollm2.py: ~6 s more compile, 5-13 % faster CPU steps
    c.data.max_length = 128
    c.data.max_prompt_length = 64
    c.data.batch_size = 4
    c.data.eval_batch_size = 8
    c.loss.name = "dpo"
    c.loss.hparams = {"beta": 0.1}
    c.optimizer.learning_rate = 5e-6
    c.optimizer.warmup_steps = 5
    c.train.steps = 30
    return c
