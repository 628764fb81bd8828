"""Llama-3.1-8B-Instruct, DPO with an SFT term on 32k-token pairs (prompt + response ≤ 32,768 tokens per
sequence), on a TPU v5p-64 pod slice (32 chips, 8 hosts): FSDP × context parallelism (ring attention).

Every row's 32,768 tokens are split over `mesh.context` = 4 chips (docs/guides/long_context.md); the parameters,
gradients and Adam moments over fsdp × context = 32 chips. Planned with rpo-plan (docs/guides/rpo_plan.md):
    rpo-plan --config configs/llama3_1_8b_long_v5p.py --topology v5p-64                        # fits
    rpo-plan --config configs/llama3_1_8b_long_v5p.py --topology v5p-64 --config.mesh.context=1  # does not fit
On every host of the slice (gcloud ... tpu-vm ssh --worker=all):
    rpo-train --config configs/llama3_1_8b_long_v5p.py --workdir /mnt/shared/runs/llama8b_long \
        --config.data.train=/mnt/shared/data/train.jsonl
"""

from rpo_jax.train.config.defaults import base_config


def get_config():
    c = base_config()
    c.model.path = "meta-llama/Llama-3.1-8B-Instruct"
    # The published config.json of meta-llama/Llama-3.1-8B-Instruct, for rpo-plan on a machine without the hub
    c.model.architecture = "configs/architectures/llama-3.1-8b-instruct.json"
    c.model.dtype = "bfloat16"
    # What "auto" is on a multi-chip TPU slice (splash is not partitioned over devices: rpo_jax.models.attention),
    # written out: the README's context=1 figure was planned with it (before rpo-plan traced "auto" for the slice
    # rather than its CPU host). With mesh.context > 1 the ring runs whatever this says.
    c.model.attention = "xla"
    c.model.remat = "full"  # one [tokens, 4096] residual per layer kept: 4 GiB per chip at 16,384 tokens per chip
    c.model.vocab_chunk_size = 16384
    c.data.train = "data/train.jsonl"
    c.data.eval_fraction = 0.02
    c.data.max_length = 32768  # a multiple of 2 × mesh.context (the zig-zag layout's chunks)
    c.data.max_prompt_length = 8192
    c.data.batch_size = 32  # 32 pairs × 2 × 32,768 = 2.1M tokens per optimizer step
    c.data.micro_batches = 4  # 8 pairs per micro-batch: one per fsdp rank, each row over 4 context chips
    c.data.eval_batch_size = 32  # a multiple of fsdp × data = 8 (and of 32, with --config.mesh.context=1)
    c.loss.name = "dpo"
    c.loss.hparams = {"beta": 0.1}
    c.loss.extra = [["sft", 0.05, {}]]
    c.optimizer.learning_rate = 5e-7
    c.optimizer.warmup_steps = 100
    c.train.steps = 1500
    c.train.log_every = 10
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 1, "context": 4}
    c.metrics.peak_flops = 459e12  # one TPU v5p chip's bf16 peak; MFU = FLOP/s ÷ (peak × chips)
    return c
