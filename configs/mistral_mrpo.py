"""MRPO as the MRPO paper ran it: a Mistral policy, the policy's initial weights as the primary reference and a
model of another family, with its own tokenizer and chat template, as the second reference.

Policy and primary reference: teknium/OpenHermes-2.5-Mistral-7B (MistralForCausalLM, sliding window 4096, ChatML).
Second reference: Qwen/Qwen2.5-7B-Instruct (Qwen2ForCausalLM, its own 152k-token vocabulary and ChatML template):
it scores each response text under its own tokenization; both references' log-probs are precomputed once into
the [N, K, 2] cache (reference_mode "cache", the only mode for a reference with its own tokenizer).

On every host of a TPU v5p-64 slice (gcloud ... tpu-vm ssh --worker=all):
    rpo-train --config configs/mistral_mrpo.py --workdir /mnt/shared/runs/mistral_mrpo \
        --config.data.train=/mnt/shared/data/train.jsonl
The data needs K ≥ 2 responses with rewards (best/worst pairs are taken from them).
"""

from rpo_jax.train.config.defaults import base_config


def get_config():
    c = base_config()
    c.model.path = "teknium/OpenHermes-2.5-Mistral-7B"
    # The config.json of teknium/OpenHermes-2.5-Mistral-7B (https://huggingface.co/teknium/OpenHermes-2.5-Mistral-7B/
    # blob/main/config.json) as published, written down from that page's contents as we know them (not downloaded
    # here). The second reference names its own (`architecture`, read by rpo-plan only; training loads the
    # checkpoint's config.json).
    c.model.architecture = "configs/architectures/mistral-openhermes-2.5-7b.json"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"  # as the 7-8B v5p recipes, where rpo-plan found that dots_saveable does not fit
    c.model.vocab_chunk_size = 16002  # V = 32,002 (not divisible by tensor = 4: the vocabulary axis is replicated)
    c.references = [
        {"path": "", "tokenizer": ""},
        {
            "path": "Qwen/Qwen2.5-7B-Instruct",
            "tokenizer": "Qwen/Qwen2.5-7B-Instruct",
            "architecture": "configs/architectures/qwen2.5-7b-instruct.json",
        },
    ]
    c.reference_mode = "cache"
    c.loss.name = "mrpo"
    c.loss.hparams = {"beta": 0.1, "alpha": None, "epsilon": 0.1, "epsilon_mode": "adaptive"}
    c.data.train = "data/train.jsonl"
    c.data.pairs = "best_worst"
    c.data.eval_fraction = 0.02
    c.data.max_length = 2048
    c.data.max_prompt_length = 1024
    c.data.batch_size = 64
    c.data.micro_batches = 4
    c.data.eval_batch_size = 64
    c.optimizer.learning_rate = 5e-7
    c.optimizer.warmup_steps = 100
    c.train.steps = 2000
    c.train.log_every = 10
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 4}
    c.metrics.peak_flops = 459e12  # one TPU v5p chip's bf16 peak; MFU = FLOP/s ÷ (peak × chips)
    return c
