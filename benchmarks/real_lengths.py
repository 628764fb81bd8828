"""Throughput on real-shaped preference data: padded buckets (today) vs packed rows vs packed + shared prompt.

    python benchmarks/real_lengths.py --model ~/.cache/rpo_jax/smollm2-135m-instruct --k 2 4 --batch 4 4 \
        --steps 1 --rounds 2 --trl

Data: a synthetic preference set shaped like UltraFeedback — prompt tokens log-normal with median 120 and
σ = 0.9, response tokens log-normal with median 250 and σ = 0.8, clipped to [8, 1024] and [4, 1024] (so every
prompt + response fits max length 2048), token ids uniform over the vocabulary. K = 2 trains DPO (response 0
preferred), K = 4 listwise RPO (`rpo_listwise`, random rewards), both against cached reference log-probs (the
trainer's default), float32. Each step's batch is the same B examples in every mode:

* padded: the contract batch [B, K, T], T the smallest length bucket (powers of two up to 2048) that fits the
  longest sequence, the output head on the trainer's default score window (`score_window="auto"`);
* packed: `rpo_jax.data.packing.pack_batch` into rows whose length is chosen per batch as the trainer chooses it
  (`data.pack_length = 0`: the cheapest of 128·{1, 2, 3, 4, 6, ...} up to the bucket, attention weighed by
  `attention_key_cost`), the head on every slot;
* shared: packed with one copy of each example's prompt before its K responses (`share_prompt=True`).

Every distinct (mode, shape) step is compiled ahead of time (not timed); then the modes alternate step by step on
the same state for `--rounds` rounds, so all see the same machine. The model runs with `remat="full"` (only each
layer's input kept for the backward pass): without it a 2048-token batch's attention residuals need tens of GiB. Printed per mode: real tokens/s (prompt + response tokens of the
valid responses, the same count in every mode — a shared prompt still counts once per response), FLOPs per real
token (`rpo_jax.train.core.performance.batch_flops`: every slot the step computes ÷ real tokens), fill ratio (real
slots ÷ slots), the step program's peak memory (XLA's memory analysis of the compiled step: arguments + outputs +
temporaries − donated aliases), MFU against the highest matmul peak measured (at start and before every round),
and the max |Δ| (absolute, and relative to the log-prob) of the per-response log-probs and the per-example losses
against padded on the first batch (initial parameters) — beside today's own noise floor, the same examples padded
one by one (each in its own bucket): float32 sums of ~10⁴ in magnitude (random token ids score about −11 each)
carry rounding of ~10⁻³ whatever the layout. With `--trl` (and trl
installed) TRL's `DPOTrainer` runs one K = 2 batch of the same examples with `padding_free` False and True
(TRL 1.16 documents that padding_free falls back to padding since its DPO refactor), reference in the step —
first, each in a fresh process (this one keeps the JAX steps' freed memory on its heap, and both together do
not fit 24 GiB at batch 4).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rpo_jax.data.packing import Packing, pack_batch, real_tokens
from rpo_jax.data.tokenize import TokenizedExample, collate_examples, default_buckets
from rpo_jax.losses import make_loss
from rpo_jax.models import ModelConfig, create_model, load_hf
from rpo_jax.train.build.model import split_trainable
from rpo_jax.train.build.optim import make_optimizer
from rpo_jax.train.core.performance import attention_key_cost, batch_flops, measure_matmul_peak
from rpo_jax.train.runtime.cpu_memory import reuse_cpu_step_memory
from rpo_jax.train.step.logprobs import preference_inputs, resolve_score_window, response_logps
from rpo_jax.train.step.steps import make_train_step

TWIN = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "tie_word_embeddings": True, "rms_norm_eps": 1e-5}  # SmolLM2-135M's shape, random weights
MODES = ("padded", "packed", "shared")
MAX_LENGTH = 2048


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, low: int, high: int):
    """`n` ints: round(median · exp(σ·z)), z ~ N(0, 1), clipped to [low, high]."""
    return np.clip(np.round(median * np.exp(sigma * rng.normal(size=n))), low, high).astype(int)


def ultrafeedback_like(rng: np.random.Generator, n: int, k: int, vocab: int) -> list[TokenizedExample]:
    """`n` examples of K responses with UltraFeedback-like lengths (module docstring); rewards random."""
    prompts = lognormal_lengths(rng, n, 120, 0.9, 8, 1024)
    responses = lognormal_lengths(rng, n * k, 250, 0.8, 4, 1024).reshape(n, k)
    out = []
    for i in range(n):
        prompt = rng.integers(0, vocab, prompts[i])
        seqs = tuple(np.concatenate([prompt, rng.integers(0, vocab, r)]).astype(np.int32) for r in responses[i])
        out.append(TokenizedExample(i, seqs, (int(prompts[i]),) * k, tuple(rng.normal(size=k).tolist())))
    return out


def mode_batch(padded: dict, mode: str, key_cost: float) -> dict:
    """The batch of `mode`: the contract batch, or packed with rows chosen per batch as the trainer does
    (`data.pack_length = 0`, attention weighed by the model's `attention_key_cost`)."""
    if mode == "padded":
        return padded
    return pack_batch(padded, Packing(0, share_prompt=mode == "shared", key_cost=key_cost))


def step_memory_gib(compiled) -> float:
    """Arguments + outputs + temporaries − donated aliases of a compiled step, GiB (XLA's memory analysis)."""
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes) / 2**30


def run_k(args, model, config, k: int, batch_size: int, peak: list[float]) -> dict:
    """Compile, check equality and time the three modes on `args.steps` batches of `batch_size` examples."""
    rng = np.random.default_rng(args.seed + k)
    examples = ultrafeedback_like(rng, batch_size * args.steps, k, config.vocab_size)
    loss_fn = make_loss("dpo") if k == 2 else make_loss("rpo_listwise")
    graphdef, params, rest = split_trainable(model)
    span = max(len(s) - p for e in examples for s, p in zip(e.sequences, e.prompt_lengths))
    window = resolve_score_window("auto", span)
    buckets = default_buckets(MAX_LENGTH, min_bucket=64)
    padded = [collate_examples(examples[i * batch_size:(i + 1) * batch_size], k_max=k, buckets=buckets, pad_id=0,
                               with_rewards=k > 2) for i in range(args.steps)]
    # cached reference log-probs: the initial policy's, as the trainer's reference cache holds them
    score = jax.jit(lambda p, b: response_logps(graphdef, p, rest, b, compute_dtype=jnp.float32,
                                                score_window=window))
    for b in padded:
        b["ref_logps"] = np.asarray(score(params, {k_: jnp.asarray(v) for k_, v in b.items()}))
    batches = {mode: [mode_batch(b, mode, attention_key_cost(config)) for b in padded] for mode in MODES}

    # equality on the first batch, initial parameters
    deltas = {}
    first = {mode: {k_: jnp.asarray(v) for k_, v in batches[mode][0].items()} for mode in MODES}
    logps = {mode: np.asarray(score(params, first[mode])) for mode in MODES}
    losses = {mode: np.asarray(loss_fn(preference_inputs(jnp.asarray(logps[mode]), first[mode],
                                                         first[mode]["ref_logps"])).per_example) for mode in MODES}
    valid = padded[0]["valid"]
    # today's own noise floor: the same examples padded one by one (each to its own bucket, batch of 1)
    alone = np.concatenate([np.asarray(score(params, {k_: jnp.asarray(v) for k_, v in collate_examples(
        [e], k_max=k, buckets=buckets, pad_id=0, with_rewards=k > 2).items()})) for e in examples[:batch_size]])
    logps["padded one by one"] = alone
    for mode in ("padded one by one",) + MODES[1:]:
        delta = np.abs(logps[mode] - logps["padded"])[valid]
        loss = (float(np.abs(losses[mode] - losses["padded"]).max()) if mode in losses else float("nan"))
        deltas[mode] = (float(delta.max()), float((delta / np.abs(logps["padded"][valid])).max()), loss)

    if args.check_only:
        return {"k": k, "rows": {}, "deltas": deltas, "compile_s": 0.0, "window": window, "tokens": 0.0}
    tx = make_optimizer_for_bench(args)
    step = make_train_step(graphdef, rest, loss_fn, tx, compute_dtype=jnp.float32, score_window=window)
    state = {"params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params), "step": jnp.int32(0),
             "rng": jax.random.key_data(jax.random.key(0))}
    compiled, memory = {}, {mode: 0.0 for mode in MODES}
    t0 = time.perf_counter()
    for mode in MODES:
        for b in batches[mode]:
            inputs = {k_: jnp.asarray(v) for k_, v in b.items() if k_ != "index"}
            key = (mode, tuple(inputs["tokens"].shape))
            if key not in compiled:
                compiled[key] = jax.jit(step, donate_argnums=(0,)).lower(state, inputs).compile()
                memory[mode] = max(memory[mode], step_memory_gib(compiled[key]))
    compile_s = time.perf_counter() - t0
    print(f"K = {k}: compiled {len(compiled)} steps in {compile_s:.0f} s", flush=True)

    totals = {mode: {"time": 0.0, "tokens": 0, "flops": 0.0, "real_slots": 0, "slots": 0} for mode in MODES}
    for r, i in ((r, i) for r in range(args.rounds) for i in range(args.steps)):
        if i == 0 and r > 0:
            peak.append(measure_matmul_peak(jnp.float32))  # the machine of this round (MFU against the highest)
        for mode in MODES:
            b = batches[mode][i]
            inputs = {k_: jnp.asarray(v) for k_, v in b.items() if k_ != "index"}
            fn = compiled[(mode, tuple(inputs["tokens"].shape))]
            start = time.perf_counter()
            state, metrics = fn(state, inputs)
            jax.block_until_ready(metrics)
            t = totals[mode]
            t["time"] += time.perf_counter() - start
            t["tokens"] += real_tokens(b)
            t["flops"] += batch_flops(config, b["tokens"].shape, score_window=window if mode == "padded" else None)
            t["real_slots"] += int(np.sum(b["attention_mask"] & (b["valid"][..., None] if mode == "padded" else True)))
            t["slots"] += int(np.size(b["attention_mask"]))
    rows = {}
    for mode, t in totals.items():
        rows[mode] = {"tokens_per_s": t["tokens"] / t["time"], "flops_per_token": t["flops"] / t["tokens"],
                      "fill": t["real_slots"] / t["slots"], "memory_gib": memory[mode],
                      "mfu": t["flops"] / t["time"] / max(peak), "step_s": t["time"] / (args.steps * args.rounds),
                      "shapes": sorted({tuple(b["tokens"].shape) for b in batches[mode]})}
    return {"k": k, "rows": rows, "deltas": deltas, "compile_s": compile_s, "window": window,
            "tokens": totals["padded"]["tokens"] / (args.steps * args.rounds)}


def make_optimizer_for_bench(args):
    """AdamW at a constant 1e-6 with global-norm clipping at 1 (TRL's defaults for DPO)."""
    return make_optimizer({"name": "adamw", "learning_rate": 1e-6, "schedule": "constant",
                           "grad_clip_norm": 1.0}, total_steps=1000)[0]


def trl_tokens_per_s(model_dir: str, examples: list[TokenizedExample], padding_free: bool) -> float:
    """TRL 1.16 DPOTrainer: one timed optimizer step on these K = 2 examples (reference in the step, TRL's
    default; eager PyTorch needs no warm-up compile), as benchmarks/trl_peer.py steps it; real tokens/s as above."""
    import tempfile

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"prompt_ids": e.sequences[0][:e.prompt_lengths[0]].tolist(),
             "chosen_ids": e.sequences[0][e.prompt_lengths[0]:].tolist(),
             "rejected_ids": e.sequences[1][e.prompt_lengths[1]:].tolist()} for e in examples]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = trl.DPOConfig(output_dir=tmp, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                            per_device_train_batch_size=len(rows), max_length=None, beta=0.1, learning_rate=1e-6,
                            lr_scheduler_type="constant", max_grad_norm=1.0, seed=0, dataloader_num_workers=0,
                            padding_free=padding_free, max_steps=1000)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        placeholder = Dataset.from_list([{"prompt": "Hi", "chosen": " yes", "rejected": " no"}])  # never trained on
        trainer = trl.DPOTrainer(model=model, args=cfg, processing_class=AutoTokenizer.from_pretrained(model_dir),
                                 train_dataset=placeholder)
        trainer.create_optimizer_and_scheduler(num_training_steps=cfg.max_steps)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        batch = trainer.data_collator(rows)
        start = time.perf_counter()
        trainer.training_step(trainer.model, batch)
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.model.zero_grad()
        seconds = time.perf_counter() - start
    return sum(len(e.sequences[0]) + len(e.sequences[1]) for e in examples) / seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="HF checkpoint dir; empty: SmolLM2-135M's shape, random weights")
    p.add_argument("--k", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch", type=int, nargs="+", default=[4, 4],
                   help="examples (prompts) per step, one per --k value (or one for all)")
    p.add_argument("--remat", default="full", help="config.remat of the model (full: only layer inputs kept; "
                   "without it a 2048-token batch's attention residuals need tens of GiB)")
    p.add_argument("--steps", type=int, default=1, help="distinct batches (each a step per mode and round)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the batches, modes alternating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-only", action="store_true", help="only the log-prob / loss equality, no timing")
    p.add_argument("--trl", action="store_true", help="also time TRL's DPOTrainer (K = 2, needs --model)")
    args = p.parse_args(argv)
    reused = reuse_cpu_step_memory()
    if args.model:
        model, config = load_hf(os.path.expanduser(args.model), dtype=jnp.float32, remat=args.remat)
    else:
        config = ModelConfig.from_hf_dict(TWIN, remat=args.remat)
        model = create_model(config, rngs=nnx.Rngs(0))
    peak = [measure_matmul_peak(jnp.float32)]
    print(f"model {args.model or 'SmolLM2-135M twin (random)'}; batch {args.batch} prompts; {args.steps} batches x "
          f"{args.rounds} rounds per mode; remat {args.remat}; cpu step memory reused: {bool(reused)}")
    batches = args.batch * len(args.k) if len(args.batch) == 1 else args.batch
    if args.trl and args.model and 2 in args.k:  # first, each in a fresh process while this one is still small
        batch = batches[args.k.index(2)]
        rng = np.random.default_rng(args.seed + 2)  # run_k's K = 2 examples: its first batch
        examples = ultrafeedback_like(rng, batch * args.steps, 2, config.vocab_size)[:batch]
        for free in (False, True):
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                rate = pool.apply(trl_tokens_per_s, (os.path.expanduser(args.model), examples, free))
            print(f"TRL DPOTrainer padding_free={free}, K = 2 first batch: {rate:.0f} real tokens/s "
                  "(reference in the step)", flush=True)
    for k, batch in zip(args.k, batches, strict=True):
        out = run_k(args, model, config, k, batch, peak)
        print(f"\nK = {k} ({'dpo' if k == 2 else 'rpo_listwise'}): {out['tokens']:.0f} real tokens per step; "
              f"padded score window {out['window']}; compile {out['compile_s']:.0f} s")
        if out["rows"]:  # not with --check-only
            print("| mode | real tokens/s | × padded | FLOPs / real token | fill | step peak memory GiB | MFU | "
                  "step s | shapes |")
            print("|---|---|---|---|---|---|---|---|---|")
            base = out["rows"]["padded"]["tokens_per_s"]
            for mode, r in out["rows"].items():
                print(f"| {mode} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f} | "
                      f"{r['flops_per_token'] / 1e9:.2f} G | {r['fill']:.3f} | {r['memory_gib']:.2f} | {r['mfu']:.3f} | "
                      f"{r['step_s']:.1f} | {' '.join('x'.join(map(str, s)) for s in r['shapes'])} |")
        print(f"matmul peak (highest of {len(peak)} so far) {max(peak) / 1e9:.1f} GFLOP/s")
        for mode, (dl, rel, dloss) in out["deltas"].items():
            loss_text = "not computed" if np.isnan(dloss) else f"{dloss:.2e}"
            print(f"max |Δ| vs padded, {mode}: log-probs {dl:.2e} (relative {rel:.1e}), per-example losses "
                  f"{loss_text}")
    print(f"\nprocess peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (TRL's processes "
          "not included)")


if __name__ == "__main__":
    main()
