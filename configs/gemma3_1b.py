"""Gemma-3-1B-it, SimPO (reference-free: no reference model, no cache) on one GPU or a TPU v5e/v5p host.

rpo-train --config configs/gemma3_1b.py --config.data.train=data/train.jsonl
"""

from rpo_jax.train.config.defaults import base_config


def get_config():
    c = base_config()
    c.model.path = "google/gemma-3-1b-it"
    # The published config.json of google/gemma-3-1b-it, for rpo-plan on a machine without the hub:
    # https://huggingface.co/google/gemma-3-1b-it/blob/main/config.json
    c.model.architecture = "configs/architectures/gemma-3-1b-it.json"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.model.vocab_chunk_size = 32768  # V = 262,144
    c.data.train = "data/train.jsonl"
    c.data.eval_fraction = 0.02
    c.data.max_length = 2048
    c.data.max_prompt_length = 1024
    c.data.batch_size = 32
    c.data.micro_batches = 4
    c.data.eval_batch_size = 16
    c.loss.name = "simpo"
    c.loss.hparams = {"beta": 2.0, "gamma": 1.0}
    c.optimizer.learning_rate = 5e-7
    c.optimizer.warmup_steps = 50
    c.train.steps = 2000
    c.mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    return c
