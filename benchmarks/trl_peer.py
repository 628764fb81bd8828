"""TRL's `DPOTrainer` train step on a given batch, for `benchmarks/train_step.py --peer trl`.

One step is what TRL's training loop does per optimizer step with one micro-batch: `Trainer.training_step`
(policy forward on chosen + rejected, its reference model's forward under no_grad — TRL's default — DPO loss,
backward), gradient clipping to `max_grad_norm`, AdamW step, scheduler step, zero_grad. float32 on the CPU,
transformers' default attention (SDPA), torch's default threads.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

PLACEHOLDER = [{"prompt": "Hi", "chosen": " yes", "rejected": " no"}]  # TRL's own dataset (never trained on)


def trl_examples(tokens: np.ndarray, prompt_len: int) -> list[dict]:
    """rpo_jax's synthetic pair batch tokens [B,2,T] → TRL's pre-tokenized examples: the prompt of response 0,
    response 0 as chosen and response 1 as rejected (same lengths, hence the same FLOPs, as rpo_jax's batch)."""
    return [
        {
            "prompt_ids": row[0, :prompt_len].tolist(),
            "chosen_ids": row[0, prompt_len:].tolist(),
            "rejected_ids": row[1, prompt_len:].tolist(),
        }
        for row in tokens
    ]


class TrlPeer:
    """A TRL 1.16 `DPOTrainer` on `model_dir` (its reference: a frozen copy of the model, TRL's default) and the
    batch `tokens` [B,2,T] collated by TRL's own collator."""

    def __init__(
        self, model_dir: str, tokens: np.ndarray, prompt_len: int, *, beta: float = 0.1, learning_rate: float = 1e-6
    ):
        import torch
        import trl
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        self.torch = torch
        self.tmp = tempfile.TemporaryDirectory()
        examples = trl_examples(tokens, prompt_len)
        args = trl.DPOConfig(
            output_dir=self.tmp.name,
            use_cpu=True,
            bf16=False,
            report_to=[],
            save_strategy="no",
            per_device_train_batch_size=len(examples),
            max_length=None,
            beta=beta,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            seed=0,
            dataloader_num_workers=0,
            max_steps=1000,
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        # TRL tokenizes text records itself; the timed batch is collated from our token ids by TRL's collator
        self.trainer = trl.DPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(PLACEHOLDER),
            processing_class=AutoTokenizer.from_pretrained(model_dir),
        )
        self.trainer.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
        self.trainer.model.train()
        self.trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets for one micro-batch a step
        self.batch = self.trainer.data_collator(examples)
        self.setup_s = time.perf_counter() - t0

    def tokens_per_step(self) -> int:
        """Tokens in the collated batch (chosen + rejected rows × their padded length)."""
        return int(self.batch["input_ids"].numel())

    def step(self) -> float:
        """One optimizer step; returns the loss."""
        trainer = self.trainer
        loss = trainer.training_step(trainer.model, self.batch)
        self.torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.model.zero_grad()
        return float(loss)
