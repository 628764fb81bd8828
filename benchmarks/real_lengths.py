"""Throughput on real-shaped preference data: padded buckets vs packed rows vs packed + shared prompt.

    python benchmarks/real_lengths.py --config configs/smollm2.py --config.data.batch_size=4 --k 2 4 \
        --steps 1 --rounds 2 --trl
    python benchmarks/real_lengths.py                    # SmolLM2-135M's shape, random weights
    python benchmarks/real_lengths.py --config configs/quickstart.py --max-length 128 --k 2 --steps 1 \
        --rounds 1                                       # a smoke run

Data: a synthetic preference file shaped like UltraFeedback — prompt tokens log-normal with median 120 and
σ = 0.9, response tokens log-normal with median 250 and σ = 0.8, clipped to [8, 1024] and [4, 1024] (so every
prompt + response fits max length 2048; `--max-length L` scales medians and bounds by L / 2048), random
characters of the demo's character tokenizer (`benchmarks/common.py`), `config.data.batch_size` × `--steps`
records per K. K = 2 trains the recipe's loss (DPO in the SmolLM2 recipes), K > 2 `--listwise-loss`
(`rpo_listwise`, random rewards), both against cached reference log-probs (`reference_mode=cache`, the
trainer's default; an override on the command line wins), with `model.remat=full` unless overridden (only
each layer's input kept for the backward pass: without it a 2048-token batch's attention residuals need tens
of GiB). Each mode is a run of its own, built as `rpo-train` builds it, and differs only by config overrides:

* padded: `data.packing=False`, the contract batch [B, K, T], T the smallest length bucket that fits the
  longest sequence, the output head on the trainer's score window (`config.model.score_window`, "auto");
* packed: `data.packing=True, data.share_prompt=False`: rows whose length is chosen per batch as the trainer
  chooses it (`data.pack_length=0`: the cheapest of 128·{1, 2, 3, 4, 6, ...} up to the bucket, attention
  weighed by `attention_key_cost`), the head on the scored slots (`rpo_jax.models.logprobs.scored_token_logps`);
* shared: `data.packing=True, data.share_prompt=True`: packed with one copy of each example's prompt before its
  K responses.

Every mode sees the same batches (the trainer's iterator over the same file). Its train step comes from the one
program builder (`jitted_steps`, via `common.trainer_steps`) fed `train_batch(run, batch)`; every distinct
(mode, shape) step is compiled ahead of time (not timed); then the modes alternate step by step for `--rounds`
rounds, so all see the same machine. Printed per mode: real tokens/s (prompt + response tokens of the valid
responses, the same count in every mode — a shared prompt still counts once per response), FLOPs per real token
(`rpo_jax.train.runtime.performance.batch_flops`, as the trainer counts them: every slot the step computes ÷
real tokens), fill ratio (real slots ÷ slots), the step program's peak memory (XLA's memory analysis of the
compiled step: arguments + outputs + temporaries − donated aliases), MFU against the highest matmul peak
measured (at start and before every round), and the max |Δ| (absolute, and relative to the log-prob) of the
per-response log-probs (each mode's cache-fill scorer, `rpo_jax.train.build.programs.scorer`) and of the
per-example losses (against the padded run's cached reference log-probs) against padded on the first batch
(initial parameters) — beside padded's own noise floor, the same examples padded one by one (each in its own
bucket): float32 sums of ~10⁴ in magnitude carry rounding of ~10⁻³ whatever the layout. With `--trl` (and trl
installed; `config.model.path` a checkpoint) TRL's `DPOTrainer` runs one K = 2 batch of the same examples with
`padding_free` False and True (TRL 1.16 documents that padding_free falls back to padding since its DPO
refactor), reference in the step — first, each in a fresh process (this one keeps the JAX steps' freed memory on
its heap, and both together do not fit 24 GiB at batch 4).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pathlib
import resource
import tempfile
import time

import common
import jax
import jax.numpy as jnp
import numpy as np

MODES = {
    "padded": {"data.packing": False},
    "packed": {"data.packing": True, "data.share_prompt": False},
    "shared": {"data.packing": True, "data.share_prompt": True},
}
#: What this benchmark sets unless the command line does.
DEFAULTS = {"model.remat": "full", "reference_mode": "cache"}


def lognormal_lengths(rng: np.random.Generator, n: int, median: float, sigma: float, low: int, high: int):
    """`n` ints: round(median · exp(σ·z)), z ~ N(0, 1), clipped to [low, high]."""
    return np.clip(np.round(median * np.exp(sigma * rng.normal(size=n))), low, high).astype(int)


def ultrafeedback_lengths(rng: np.random.Generator, n: int, k: int, max_length: int) -> tuple[list, list]:
    """(prompt lengths [n], response lengths [n][k]) like UltraFeedback's (module docstring), scaled to
    `max_length` (2048: UltraFeedback's)."""
    scale = max_length / 2048
    half = max_length // 2
    prompts = lognormal_lengths(rng, n, 120 * scale, 0.9, min(8, half), half)
    responses = lognormal_lengths(rng, n * k, 250 * scale, 0.8, min(4, half), half).reshape(n, k)
    return prompts.tolist(), responses.tolist()


def synthetic_file(directory: pathlib.Path, n: int, k: int, max_length: int, seed: int) -> pathlib.Path:
    prompts, responses = ultrafeedback_lengths(np.random.default_rng(seed), n, k, max_length)
    return common.write_synthetic(directory / f"ultrafeedback_like_k{k}.jsonl", prompts, responses, seed=seed)


def k_config(cfg, args, k: int, data: pathlib.Path):
    """The config of K: the recipe's loss for K = 2, `--listwise-loss` above; the synthetic file."""
    if k > 2:
        beta = float(cfg.loss.hparams.get("beta", 0.1))
        cfg = common.with_overrides(cfg, {"loss.name": args.listwise_loss, "loss.hparams": {"beta": beta}})
    return common.synthetic_config(cfg, data, max_length=args.max_length, max_prompt_length=args.max_length // 2)


def slots_of(inputs: dict) -> tuple[int, int]:
    """(real slots, slots) of a step's inputs (padded: valid responses' unmasked tokens)."""
    mask = np.asarray(inputs["attention_mask"])
    if "response_id" not in inputs:
        mask = mask & np.asarray(inputs["valid"])[..., None]
    return int(mask.sum()), int(np.asarray(inputs["attention_mask"]).size)


def run_k(args, cfg, k: int, tmp: pathlib.Path, peak: list[float]) -> dict:
    """Build, check equality and time the three modes on `args.steps` batches of K responses."""
    from rpo_jax.data import real_tokens
    from rpo_jax.train.build.programs import scorer
    from rpo_jax.train.jobs.preference import device_batch
    from rpo_jax.train.step.logprobs import preference_inputs

    data = synthetic_file(tmp, cfg.data.batch_size * args.steps, k, args.max_length, args.seed + k)
    kcfg = k_config(cfg, args, k, data)
    runs = {}
    for mode, overrides in MODES.items():
        run = common.build_benchmark_run(
            common.with_overrides(kcfg, overrides), tmp / f"k{k}_{mode}", devices=common.devices_of(args.devices)
        )
        hosts = common.host_batches(run, args.steps)
        runs[mode] = {"run": run, "hosts": hosts, "inputs": [common.step_arguments(run, h) for h in hosts]}

    # equality on the first batch, initial parameters: each mode's scorer (the cache fill's program)
    deltas, logps, losses = {}, {}, {}
    padded = runs["padded"]
    reference = np.asarray(padded["inputs"][0][0]["ref_logps"]) if "ref_logps" in padded["inputs"][0][0] else None
    for mode, r in runs.items():
        run = r["run"]
        score = scorer(run.config, run, run.graphdef, run.rest, run.score_window)
        batch = device_batch(run, r["hosts"][0], "train")
        logps[mode] = np.asarray(score(run.state["params"], batch))
        ref = None if reference is None else jnp.asarray(reference)
        losses[mode] = np.asarray(run.loss_fn(preference_inputs(jnp.asarray(logps[mode]), batch, ref)).per_example)
        r["score"] = score
    valid = np.asarray(padded["hosts"][0]["valid"])
    # the noise floor of padded batches: the same examples padded one by one (each to its own bucket, batch of 1)
    run, train = padded["run"], padded["run"].datasets["train"]
    logps["padded one by one"] = np.concatenate(
        [
            np.asarray(padded["score"](run.state["params"], device_batch(run, train.batch_for_indices([i]), "train")))
            for i in np.asarray(padded["hosts"][0]["index"]).tolist()
        ]
    )
    for mode in ("padded one by one", *list(MODES)[1:]):
        delta = np.abs(logps[mode] - logps["padded"])[valid]
        loss = float(np.abs(losses[mode] - losses["padded"]).max()) if mode in losses else float("nan")
        deltas[mode] = (float(delta.max()), float((delta / np.abs(logps["padded"][valid])).max()), loss)
    window = padded["run"].score_window
    if args.check_only:
        return {
            "k": k,
            "loss": kcfg.loss.name,
            "rows": {},
            "deltas": deltas,
            "compile_s": 0.0,
            "window": window,
            "tokens": 0.0,
        }

    compiled, memory = {}, {mode: 0.0 for mode in MODES}
    t0 = time.perf_counter()
    for mode, r in runs.items():
        train_step, _ = common.trainer_steps(r["run"])
        r["state"] = r["run"].state
        for inputs, refs in r["inputs"]:
            key = (mode, tuple(inputs["tokens"].shape))
            if key not in compiled:
                compiled[key] = common.CompiledStep(train_step, r["state"], inputs, refs)
                memory[mode] = max(memory[mode], compiled[key].memory()["peak"] / 2**30)
    compile_s = time.perf_counter() - t0
    print(f"K = {k}: compiled {len(compiled)} steps in {compile_s:.0f} s", flush=True)

    totals = {mode: {"time": 0.0, "tokens": 0, "flops": 0.0, "real_slots": 0, "slots": 0} for mode in MODES}
    for rnd, i in ((rnd, i) for rnd in range(args.rounds) for i in range(args.steps)):
        if i == 0 and rnd > 0:
            peak.append(measure_peak(args))  # the machine of this round (MFU against the highest)
        for mode, r in runs.items():
            inputs, refs = r["inputs"][i]
            step = compiled[(mode, tuple(inputs["tokens"].shape))]
            start = time.perf_counter()
            r["state"], metrics = step(r["state"], inputs, refs)
            jax.block_until_ready(metrics)
            t = totals[mode]
            t["time"] += time.perf_counter() - start
            t["tokens"] += real_tokens(r["hosts"][i])
            t["flops"] += common.step_flops(r["run"], inputs)
            real, slots = slots_of(inputs)
            t["real_slots"] += real
            t["slots"] += slots
    chips = padded["run"].mesh.size
    rows = {}
    for mode, t in totals.items():
        rows[mode] = {
            "tokens_per_s": t["tokens"] / t["time"],
            "flops_per_token": t["flops"] / t["tokens"],
            "fill": t["real_slots"] / t["slots"],
            "memory_gib": memory[mode],
            "mfu": t["flops"] / t["time"] / max(peak) / chips,
            "step_s": t["time"] / (args.steps * args.rounds),
            "shapes": sorted({tuple(x["tokens"].shape) for x, _ in runs[mode]["inputs"]}),
        }
    return {
        "k": k,
        "loss": kcfg.loss.name,
        "rows": rows,
        "deltas": deltas,
        "compile_s": compile_s,
        "window": window,
        "tokens": totals["padded"]["tokens"] / (args.steps * args.rounds),
    }


def measure_peak(args) -> float:
    from rpo_jax.train.build.state import compute_dtype
    from rpo_jax.train.runtime.performance import measure_matmul_peak

    return measure_matmul_peak(compute_dtype(args.dtype))


def trl_examples(args, cfg, tmp: pathlib.Path) -> list:
    """The tokenized examples of K = 2's first batch (the trainer's iterator over the same file and tokenizer)."""
    from rpo_jax.data import make_train_iterator, read_records, tokenize_records
    from rpo_jax.train.build.data import load_tokenizer

    data = synthetic_file(tmp, cfg.data.batch_size * args.steps, 2, args.max_length, args.seed + 2)
    records, _ = read_records([str(data)])
    ds = tokenize_records(
        records,
        load_tokenizer(common.demo_tokenizer_path()),
        max_length=args.max_length,
        max_prompt_length=args.max_length // 2,
    )
    first = next(make_train_iterator(ds, cfg.data.batch_size, seed=cfg.seed, shuffle=cfg.data.shuffle))
    where = {e.index: e for e in ds.examples}
    return [where[i] for i in np.asarray(first["index"]).tolist() if i >= 0]


def trl_tokens_per_s(model_dir: str, examples: list, padding_free: bool) -> float:
    """TRL 1.16 DPOTrainer: one timed optimizer step on these K = 2 examples (reference in the step, TRL's
    default; eager PyTorch needs no warm-up compile), as benchmarks/trl_peer.py steps it; real tokens/s as above."""
    import tempfile

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [
        {
            "prompt_ids": e.sequences[0][: e.prompt_lengths[0]].tolist(),
            "chosen_ids": e.sequences[0][e.prompt_lengths[0] :].tolist(),
            "rejected_ids": e.sequences[1][e.prompt_lengths[1] :].tolist(),
        }
        for e in examples
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = trl.DPOConfig(
            output_dir=tmp,
            use_cpu=True,
            bf16=False,
            report_to=[],
            save_strategy="no",
            per_device_train_batch_size=len(rows),
            max_length=None,
            beta=0.1,
            learning_rate=1e-6,
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            seed=0,
            dataloader_num_workers=0,
            padding_free=padding_free,
            max_steps=1000,
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        placeholder = Dataset.from_list([{"prompt": "Hi", "chosen": " yes", "rejected": " no"}])  # never trained on
        trainer = trl.DPOTrainer(
            model=model, args=cfg, processing_class=AutoTokenizer.from_pretrained(model_dir), train_dataset=placeholder
        )
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
    p.add_argument("--k", type=int, nargs="+", default=[2, 4], help="responses per record, one file per value")
    p.add_argument(
        "--max-length",
        type=int,
        default=2048,
        help="longest prompt + response of the synthetic file (2048: UltraFeedback's lengths; less scales "
        "them down) and config.data.max_length",
    )
    p.add_argument("--listwise-loss", default="rpo_listwise", help="config.loss.name for K > 2")
    p.add_argument("--steps", type=int, default=1, help="distinct batches (each a step per mode and round)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the batches, modes alternating")
    p.add_argument("--seed", type=int, default=0, help="of the synthetic lengths and characters")
    p.add_argument("--devices", type=int, default=1, help="devices of each run's mesh (0: all local devices)")
    p.add_argument("--check-only", action="store_true", help="only the log-prob / loss equality, no timing")
    p.add_argument("--trl", action="store_true", help="also time TRL's DPOTrainer (K = 2, needs a checkpoint)")
    args, cfg, given = common.parse_args(p, argv, common.SMOLLM2_SHAPE)
    try:
        common.reject_synthetic_overrides(given)
    except ValueError as e:
        p.error(str(e))
    cfg = common.with_overrides(cfg, {k: v for k, v in DEFAULTS.items() if k not in given})
    args.dtype = cfg.model.dtype
    reused = False
    if cfg.cpu_reuse_memory:  # before the first computation, as rpo-train
        from rpo_jax.train.runtime.cpu_memory import reuse_cpu_step_memory

        reused = reuse_cpu_step_memory()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="real_lengths_"))
    peak = [measure_peak(args)]
    print(
        f"config {common.display(args.config)}"
        + (f" with {given}" if given else "")
        + f"; model {cfg.model.path or 'random init (config.model.init)'}; batch {cfg.data.batch_size} prompts; "
        f"{args.steps} batches x {args.rounds} rounds per mode; remat {cfg.model.remat}; reference_mode "
        f"{cfg.reference_mode}; cpu step memory reused: {bool(reused)}"
    )
    if args.trl and cfg.model.path and 2 in args.k:  # first, each in a fresh process while this one is still small
        examples = trl_examples(args, cfg, tmp)
        for free in (False, True):
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                rate = pool.apply(trl_tokens_per_s, (os.path.expanduser(cfg.model.path), examples, free))
            print(
                f"TRL DPOTrainer padding_free={free}, K = 2 first batch: {rate:.0f} real tokens/s "
                "(reference in the step)",
                flush=True,
            )
    elif args.trl:
        print("--trl: skipped (needs K = 2 among --k and a checkpoint, config.model.path)")
    results = {}
    for k in args.k:
        out = results[k] = run_k(args, cfg, k, tmp, peak)
        print(
            f"\nK = {k} ({out['loss']}): {out['tokens']:.0f} real tokens per step; padded score window "
            f"{out['window']}; compile {out['compile_s']:.0f} s"
        )
        if out["rows"]:  # not with --check-only
            print(
                "| mode | real tokens/s | × padded | FLOPs / real token | fill | step peak memory GiB | MFU | "
                "step s | shapes |"
            )
            print("|---|---|---|---|---|---|---|---|---|")
            base = out["rows"]["padded"]["tokens_per_s"]
            for mode, r in out["rows"].items():
                shapes = " ".join("x".join(map(str, s)) for s in r["shapes"])
                print(
                    f"| {mode} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f} | "
                    f"{r['flops_per_token'] / 1e9:.2f} G | {r['fill']:.3f} | {r['memory_gib']:.2f} | "
                    f"{r['mfu']:.3f} | {r['step_s']:.1f} | {shapes} |"
                )
        print(f"matmul peak (highest of {len(peak)} so far) {max(peak) / 1e9:.1f} GFLOP/s")
        for mode, (dl, rel, dloss) in out["deltas"].items():
            loss_text = "not computed" if np.isnan(dloss) else f"{dloss:.2e}"
            print(f"max |Δ| vs padded, {mode}: log-probs {dl:.2e} (relative {rel:.1e}), per-example losses {loss_text}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nprocess peak RSS {rss:.2f} GiB (TRL's processes not included)")
    return results


if __name__ == "__main__":
    main()
