"""Gemma-2-9B-it, RPO (squared distance) on a TPU v5p-64 pod slice: FSDP × TP, soft-capped logits.

    rpo-train --config configs/gemma2_9b_v5p.py --workdir /mnt/shared/runs/gemma9b \
        --config.data.train=/mnt/shared/data/train.jsonl
"""

from rpo_jax.train.config.defaults import base_config


def get_config():
    c = base_config()
    c.model.path = "google/gemma-2-9b-it"
    # The published config.json of google/gemma-2-9b-it, for rpo-plan on a machine without the hub:
    # https://huggingface.co/google/gemma-2-9b-it/blob/main/config.json
    c.model.architecture = "configs/architectures/gemma-2-9b-it.json"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.model.vocab_chunk_size = 32768  # V = 256,000
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
