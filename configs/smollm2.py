"""SmolLM2-135M-Instruct, DPO on your preference file: a real checkpoint, settings for real data.

    bash ../shared/models/make_smollm2.sh     # builds the checkpoint offline into ~/.cache/rpo_jax/ (else the hub)
    rpo-train --config configs/smollm2.py --workdir runs/smollm2 \
        --config.data.train=prefs.jsonl [--config.data.eval=heldout.jsonl]

Any format rpo-train reads (docs/guides/data.md: prompt/chosen/rejected, TRL's conversational form, K rewarded
responses, ...). Lengths as TRL's DPOConfig defaults (prompt + response ≤ 1024 tokens, prompt ≤ 512; longer
records are dropped and counted, `data.truncation` to cut them instead); 2 % of the file held out for evaluation
unless `data.eval` names a file; one epoch; the reference's log-probs cached by a precompute pass (the package
default). The demo form (bundled data, short sequences, 30 steps): `configs/smollm2_demo.py`.
"""

import os

from rpo_jax.train.config.defaults import base_config

LOCAL = os.path.expanduser("~/.cache/rpo_jax/smollm2-135m-instruct")  # where make_smollm2.sh writes it


def get_config():
    c = base_config()
    c.model.path = LOCAL if os.path.isdir(LOCAL) else "HuggingFaceTB/SmolLM2-135M-Instruct"
    c.model.dtype = "auto"  # float32 on CPU, bfloat16 on GPU/TPU
    # Each layer's activations recomputed in the backward pass: on real lengths (512-token pairs, batch 4) the step's
    # temporaries fall from 8.6 to about 1.1 GiB and, with packing, the run's peak to 4.6-5.1 GiB (padded without remat:
    # 10.8 GiB) at 1.18x its real tokens/s (docs/benchmarks.md, "Real data in memory"). With remat the layer scan is not
    # unrolled (rpo_jax.models.model: unrolled copies of a rematerialised layer keep their activations).
    c.model.remat = "full"
    c.data.train = "data/train.jsonl"
    c.data.eval_fraction = 0.02  # used when data.eval is empty
    c.data.max_length = 1024
    c.data.max_prompt_length = 512
    c.data.batch_size = 8
    c.data.eval_batch_size = 8
    c.loss.name = "dpo"
    c.loss.hparams = {"beta": 0.1}
    c.optimizer.learning_rate = 1e-6
    c.optimizer.warmup_ratio = 0.1
    c.train.epochs = 1.0
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    return c
