"""The run configuration: one `ml_collections.ConfigDict`, every field documented here.

Recipes in `configs/NAME.py` start from `base_config()` and override fields; the command line overrides any
field: `rpo-train --config configs/smollm2.py --config.loss.name=rpo_bwd_kl --config.loss.hparams.eta=2`.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # The policy: a Hugging Face checkpoint directory (or hub id), or a random init from `model.init`.
    c.model = ml_collections.ConfigDict()
    c.model.path = ""                 # HF directory / hub id; empty: random init from model.init (quickstart)
    c.model.init = ml_collections.ConfigDict({"model_type": "llama"})  # HF-style config fields for random init
    c.model.init_seed = 0
    c.model.tokenizer = ""            # tokenizer directory / hub id; empty: model.path
    c.model.dtype = "auto"            # compute dtype: "auto" = float32 on CPU, bfloat16 on GPU/TPU
    c.model.param_dtype = "float32"   # master weights (and optimizer state) dtype
    c.model.remat = "none"            # "none" | "full" | "dots_saveable" | ... (see rpo_jax.models)
    c.model.scan_unroll = 1           # layers per iteration of the layer scan (speed only; same results)
    c.model.vocab_chunk_size = 0      # >0: chunked log-softmax over the vocabulary (large V)

    # References. Empty list: one reference, a frozen copy of the initial policy. Otherwise R entries, each
    # {"path": HF dir ("" = initial policy), "tokenizer": dir ("" = its path)}; index 0 is the primary.
    c.references = []
    c.reference_mode = "auto"         # "cache" (precompute [N,K,R] once) | "in_step" | "auto" (cache)
    c.reference_cache_dir = ""        # where cached reference log-probs live; empty: WORKDIR/ref_cache

    c.data = ml_collections.ConfigDict()
    c.data.train = ""                 # file(s)/dir, comma-separated; "demo": the bundled demo task
    c.data.eval = ""                  # held-out file(s); empty: the demo test split when train is "demo", else
                                      # `eval_fraction` of train (split by `seed`), else no evaluation
    c.data.eval_fraction = 0.0
    c.data.format = ""                # "" = auto-detect per file
    c.data.pairs = ""                 # "" keep K responses | "best_worst" | "all": derive pairs from K
    c.data.max_length = 512
    c.data.max_prompt_length = 256
    c.data.truncation = "drop"        # "drop" | "truncate_prompt" | "truncate_response"
    c.data.on_error = "raise"         # "raise" | "skip" (counted and reported)
    c.data.batch_size = 8             # global batch (prompts) per optimizer step
    c.data.micro_batches = 1          # gradient accumulation inside the step
    c.data.eval_batch_size = 16
    c.data.shuffle = True

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "dpo"               # any name of rpo_jax.losses.available_losses()
    c.loss.hparams = ml_collections.ConfigDict({"beta": 0.1})
    c.loss.extra = []                 # weighted extra terms: [["sft", 0.05, {}], ...]; main term has weight 1

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-6
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 0
    c.optimizer.end_lr_factor = 0.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.weight_decay_mask = "matrices"
    c.optimizer.grad_clip_norm = 1.0
    c.optimizer.kwargs = ml_collections.ConfigDict()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100
    c.train.iterations = 1            # >1: iterated training, reference reset to the previous iterate
    c.train.log_every = 10
    c.train.eval_every = 50           # 0: only at the end
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 3
    c.train.async_checkpointing = True
    c.train.export_at_end = True      # write WORKDIR/export (HF directory with tokenizer)
    c.train.progress_bar = True

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    c.metrics = ml_collections.ConfigDict()
    c.metrics.peak_flops = 0.0        # FLOP/s for MFU; 0: measure a matmul once at start-up
    c.metrics.tensorboard = True
    return c
