"""Llama-3.2-1B-Instruct, RPO (bwd-KL) on a preference file with rewards; a TPU v5p-8 slice or one GPU.

    rpo-train --config configs/llama3_2_1b.py --workdir /mnt/shared/runs/llama1b \
        --config.data.train=data/train.jsonl --config.data.eval=data/test.jsonl
"""

from rpo_jax.train.config.defaults import base_config


def get_config():
    c = base_config()
    c.model.path = "meta-llama/Llama-3.2-1B-Instruct"
    # The published config.json of meta-llama/Llama-3.2-1B-Instruct, for rpo-plan on a machine without the hub:
    # https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct/blob/main/config.json
    c.model.architecture = "configs/architectures/llama-3.2-1b-instruct.json"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"  # rpo-plan: dots_saveable keeps every layer's [T, T] attention scores
    c.model.vocab_chunk_size = 16384  # V = 128,256: never materialise [N, T, V] float32 log-probs
    c.data.train = "data/train.jsonl"
    c.data.eval = "data/test.jsonl"
    c.data.max_length = 2048
    c.data.max_prompt_length = 1024
    c.data.batch_size = 64
    c.data.micro_batches = 4
    c.data.eval_batch_size = 16
    c.loss.name = "rpo_bwd_kl"
    c.loss.hparams = {"beta": 0.1, "eta": 1.0}
    c.optimizer.learning_rate = 1e-6
    c.optimizer.warmup_steps = 50
    c.train.steps = 2000
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.checkpoint_every = 200
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    return c
