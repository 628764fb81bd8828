"""KTO (Ethayarajh et al. 2024) on thumbs-up / thumbs-down data: the demo task unpaired, tiny Llama, CPU minutes.

    rpo-train --config configs/kto_demo.py --workdir runs/kto_demo
    rpo-train --config configs/kto_demo.py --config.data.train=feedback.jsonl --config.data.pairs= \\
              --config.data.unpair=False --config.data.eval_fraction=0.05 --workdir runs/kto   # your own file

Your own data: one `{"prompt": ..., "completion": ..., "label": true | false}` per line (TRL's unpaired format,
plain strings or chat messages); a file of labelled pairs (`chosen` / `rejected`) with `data.unpair=True` (each
pair a desirable and an undesirable record, TRL's `unpair_preference_dataset`). The demo's records hold 4 rated
responses: `data.pairs="best_vs_worst"` + `data.unpair=True` make each one a desirable (best) and an undesirable
(worst) completion, in TRL's order per block of `data.unpair_block` pairs (their desirable completions, then their
undesirable ones). TRL's blocks are of 1000: in file order a run would then see one label only for 62 steps at a
time, which drives every log-prob down in the undesirable stretches (KTO's loss saturates and the desirable terms
cannot pull them back); blocks of 8 put both labels in every batch of 16.

KTO's reference point is estimated from mismatched completions: each record's prompt with the completion of the
record before it in its micro-batch, in file order, as TRL's KTOTrainer (`data.shuffle=False`, which TRL requires;
shuffle the file beforehand). `loss.name="apo_zero_unpaired"` is TRL's KTO without that term (then shuffling is
allowed). `rpo-train` logs the desirable / undesirable balance and TRL's advice for `desirable_weight` /
`undesirable_weight` when it is off the KTO paper's range.
"""

from rpo_jax.train.config.quickstart import get_config as quickstart


def get_config():
    c = quickstart()  # the quickstart's tiny Llama from a random init, demo data, batches and schedule
    c.data.pairs = "best_vs_worst"
    c.data.unpair = True
    c.data.unpair_block = 8  # 8 pairs' desirable, then their undesirable completions: both labels in every batch
    c.data.shuffle = False
    c.data.batch_size = 16  # a micro-batch of 16 records: each with the previous record's completion
    c.loss.name = "kto"
    c.loss.hparams = {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    c.optimizer.learning_rate = 1e-3
    c.train.steps = 200
    return c
