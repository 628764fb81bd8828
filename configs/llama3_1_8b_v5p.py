"""Llama-3.1-8B-Instruct, DPO with an SFT term, on a TPU v5p-64 pod slice (32 chips, 8 hosts): FSDP × TP.

On every host of the slice (gcloud ... tpu-vm ssh --worker=all):
    rpo-train --config configs/llama3_1_8b_v5p.py --workdir /mnt/shared/runs/llama8b \
        --config.data.train=/mnt/shared/data/train.jsonl
jax.distributed initialises itself from the TPU metadata; each host reads its data shard and parameter shards.
"""

from rpo_jax.train.config.defaults import base_config


def get_config():
    c = base_config()
    c.model.path = "meta-llama/Llama-3.1-8B-Instruct"
    # The published config.json of meta-llama/Llama-3.1-8B-Instruct, for rpo-plan on a machine without the hub:
    # https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct/blob/main/config.json
    c.model.architecture = "configs/architectures/llama-3.1-8b-instruct.json"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"  # rpo-plan: dots_saveable keeps every layer's [T, T] attention scores (does not fit)
    c.model.vocab_chunk_size = 16384
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
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 4, "context": 1}
    c.metrics.peak_flops = 459e12  # one TPU v5p chip's bf16 peak; MFU = FLOP/s ÷ (peak × chips)
    return c
