"""Qwen3-8B, RPO (squared distance) on a TPU v5p-64 pod slice (32 chips, 8 hosts): FSDP × TP.

Qwen3: per-head RMS norm on queries and keys, explicit head_dim = 128, no q/k/v bias, untied embeddings, 32 query /
8 key-value heads (both divisible by tensor = 4), 36 layers, vocabulary 151,936.

On every host of the slice (gcloud ... tpu-vm ssh --worker=all):
    rpo-train --config configs/qwen3_8b_v5p.py --workdir /mnt/shared/runs/qwen3_8b \
        --config.data.train=/mnt/shared/data/train.jsonl
"""

from rpo_jax.train.config.defaults import base_config


def get_config():
    c = base_config()
    c.model.path = "Qwen/Qwen3-8B"
    # The config.json of Qwen/Qwen3-8B (https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json) as published,
    # written down from that page's contents as we know them (not downloaded here), for rpo-plan on a machine
    # without the hub. Loading model.path reads the real one.
    c.model.architecture = "configs/architectures/qwen3-8b.json"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"  # rpo-plan: dots_saveable keeps every layer's [T, T] attention scores (does not fit)
    c.model.vocab_chunk_size = 16384  # V = 151,936
    c.data.train = "data/train.jsonl"
    c.data.eval_fraction = 0.02
    c.data.max_length = 4096
    c.data.max_prompt_length = 2048
    c.data.batch_size = 128
    c.data.micro_batches = 4
    c.data.eval_batch_size = 32  # rpo-plan: an eval batch of 128 × 2 × 4096 tokens does not fit
    c.loss.name = "rpo_sq"
    c.loss.hparams = {"beta": 0.1, "eta": 1.0}
    c.optimizer.learning_rate = 5e-7
    c.optimizer.warmup_steps = 100
    c.train.steps = 3000
    c.train.log_every = 10
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 4}
    c.metrics.peak_flops = 459e12  # one TPU v5p chip's bf16 peak; MFU = FLOP/s ÷ (peak × chips)
    return c
