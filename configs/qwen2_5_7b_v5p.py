"""Qwen2.5-7B-Instruct, DPO with an SFT term, on a TPU v5p-64 pod slice (32 chips, 8 hosts): FSDP × TP.

Qwen2: biases on the q/k/v projections, untied embeddings, RoPE θ = 10⁶, 28 query / 4 key-value heads (both
divisible by tensor = 4), vocabulary 152,064.

On every host of the slice (gcloud ... tpu-vm ssh --worker=all):
    rpo-train --config configs/qwen2_5_7b_v5p.py --workdir /mnt/shared/runs/qwen7b \
        --config.data.train=/mnt/shared/data/train.jsonl
jax.distributed initialises itself from the TPU metadata; each host reads its data shard and parameter shards.
"""

from rpo_jax.train.config.defaults import base_config


def get_config():
    c = base_config()
    c.model.path = "Qwen/Qwen2.5-7B-Instruct"
    # The config.json of Qwen/Qwen2.5-7B-Instruct (https://huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json)
    # as published, written down from that page's contents as we know them (not downloaded here), for rpo-plan on a
    # machine without the hub. Loading model.path reads the real one.
    c.model.architecture = "configs/architectures/qwen2.5-7b-instruct.json"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"  # rpo-plan: dots_saveable keeps every layer's [T, T] attention scores (does not fit)
    c.model.vocab_chunk_size = 16384  # V = 152,064
    c.data.train = "data/train.jsonl"
    c.data.eval_fraction = 0.02
    c.data.max_length = 4096
    c.data.max_prompt_length = 2048
    c.data.batch_size = 128
    c.data.micro_batches = 4
    c.data.eval_batch_size = 32  # rpo-plan: an eval batch of 128 × 2 × 4096 tokens does not fit
    c.loss.name = "dpo"
    c.loss.hparams = {"beta": 0.1}
    c.loss.extra = [["sft", 0.05, {}]]
    c.optimizer.learning_rate = 5e-7
    c.optimizer.warmup_steps = 100
    c.train.steps = 3000
    c.train.log_every = 10
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 4}
    c.metrics.peak_flops = 459e12  # one TPU v5p chip's bf16 peak; MFU = FLOP/s ÷ (peak × chips)
    return c
