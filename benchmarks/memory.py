"""Peak memory beside real tokens/s, per mode, on a user's file: `rpo-train` as a user runs it (padded, packed,
the recipe's defaults, any `--config.*` of yours) and TRL's `DPOTrainer` on the same file, alternating, each in
a process of its own whose resident memory is watched (and killed past `--limit-gib`).

    python benchmarks/memory.py --config configs/smollm2.py --config.data.batch_size=4 \
        --config.reference_mode=in_step --modes padded default --trl        # the 512-token scenario (issue 30)
    python benchmarks/memory.py --config configs/smollm2.py --config.data.batch_size=4 --long --modes default
    python benchmarks/memory.py --config configs/smollm2.py --config.data.batch_size=4 --breakdown
    python benchmarks/memory.py --config configs/quickstart.py --pairs 8 --max-length 128 --modes padded default
                                                                         # a smoke run (seconds)

The file (`scenario_file`, deterministic): `--pairs` prompt / chosen / rejected records whose token counts are
drawn like UltraFeedback's (prompt log-normal with median 125 and σ 0.9, responses median 160 and σ 0.8, prompts
at most half of `--max-length`, each prompt + response cut at `--max-length`; seed `--seed`), written as words
the model's tokenizer encodes as one token each, so that the counts are exact (20 pairs, 512: 14,768 real
tokens, the longest sequence 512). `--long`: every sequence `--max-length` tokens (a quarter prompt), 2,048 by
default — the issue's "pairs of 2,048 tokens".

Modes (`MODES`, each `rpo-train` with these overrides on top of yours): padded (`data.packing=False`), packed
(`data.packing=True`), default (nothing: the recipe's settings), and any `--mode NAME=OVERRIDES` of yours. Each
runs the recipe for one epoch of the file (`data.batch_size` pairs a step), logging once at the end: real
tokens/s is the trainer's own `train/perf/tokens_per_s` (prompt + response tokens of every valid response, over
the steps after the first, so a compilation of a new shape after step 1 counts), the peak the watched process's
(its tree's RSS sampled every 0.2 s, and the kernel's `ru_maxrss` of the child), the export at the end included.
TRL (`--trl`): TRL 1.16's `DPOTrainer` on the same file and checkpoint, float32, `per_device_train_batch_size` =
`data.batch_size`, no gradient checkpointing (TRL 1.16's DPOConfig turns it on by default:
`--trl-checkpointing`), its defaults otherwise (reference model in the step, lengths 1024 / 512 as the recipe),
as many steps as rpo-train, real tokens (attention-mask ones) / s over the steps after the first. Rounds
(`--rounds`) run every mode once each, in turn, so all see the same machine.

`--breakdown`: where the memory goes in the default mode, from XLA's memory analysis: every program the run
compiles (the train step once per distinct batch shape of the epoch, the eval step, the reference cache's scorer)
with its arguments, outputs, temporaries and code (`rpo_jax.train.build.fit.program_memory`), the state and reference
bytes, and what the process holds besides its arrays (`host_overhead`), in a child process like the modes.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import common
import numpy as np
import rss_watch

MODES = {"padded": ["--config.data.packing=False"], "packed": ["--config.data.packing=True"], "default": []}
#: candidate words; those the tokenizer encodes as one token (with a leading space) write the file
WORDS = (
    "the of and to in is was for on that with as by at from it be this are an or which his her their have has had "
    "not but one all were been more also they can its other when who into time first two new after there some "
    "would than only most many made may over such these years used where between"
).split()


# ------------------------------------------------------------------------------------------------ the file
def lengths(pairs: int, max_length: int, seed: int, long: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens [pairs], response tokens [pairs, 2]): UltraFeedback-like (module docstring) or, `long`,
    every sequence `max_length` tokens with a prompt of a quarter of it."""
    if long:
        p = max_length // 4
        return np.full(pairs, p), np.full((pairs, 2), max_length - p)
    rng = np.random.default_rng(seed)
    prompts = np.clip(np.round(125 * np.exp(0.9 * rng.normal(size=pairs))), 8, max_length // 2).astype(int)
    responses = np.clip(np.round(160 * np.exp(0.8 * rng.normal(size=(pairs, 2)))), 4, max_length).astype(int)
    return prompts, np.minimum(responses, max_length - prompts[:, None])


def vocabulary(tokenizer) -> tuple[list[str], str]:
    """(units, separator) of text whose token count is exact: the `WORDS` that `tokenizer` encodes as one token
    each after a space (a BPE tokenizer), else the characters of `common.ALPHABET` side by side (a character
    tokenizer, as the demo's)."""
    words = [w for w in WORDS if len(tokenizer(" ".join([w] * 4), add_special_tokens=False)["input_ids"]) == 4]
    if len(words) >= 8:
        return words, " "
    return list(common.ALPHABET), ""


def token_overheads(tokenizer, unit: str, separator: str) -> common.Overheads:
    """Tokens the trainer's tokenization adds to a prompt (BOS) and to a response (EOS) of such text."""
    from rpo_jax.data import encode_record, parse_record

    four, three = separator.join([unit] * 4), separator.join([unit] * 3)
    obj = {"prompt": four, "chosen": separator + four, "rejected": separator + three}
    prompt, responses = encode_record(parse_record(obj, "trl_standard", ("probe", 1)), tokenizer)
    return common.Overheads(len(prompt) - 4, len(responses[0]) - 4)


def scenario_file(
    path: pathlib.Path, tokenizer, *, pairs: int, max_length: int, seed: int, long: bool = False
) -> tuple[pathlib.Path, int]:
    """Write the scenario's JSONL (module docstring) for `tokenizer`; returns (path, real tokens): Σ over the
    pairs' two sequences of prompt + response tokens, as the trainer counts them."""
    units, separator = vocabulary(tokenizer)
    units = np.array(units)
    overheads = token_overheads(tokenizer, units[0], separator)
    prompts, responses = lengths(pairs, max_length, seed, long)
    rng = np.random.default_rng(seed + 1)

    def text(n: int, lead: str) -> str:
        return lead + separator.join(rng.choice(units, n))

    with open(path, "w") as f:
        for p, (a, b) in zip(prompts.tolist(), responses.tolist()):
            record = {
                "prompt": text(p - overheads.prompt, ""),
                "chosen": text(a - overheads.response, separator),
                "rejected": text(b - overheads.response, separator),
            }
            f.write(json.dumps(record) + "\n")
    return pathlib.Path(path), int((2 * prompts + responses.sum(1)).sum())


# ------------------------------------------------------------------------------------------------ the runs
def rpo_train(args, overrides: list[str], data: pathlib.Path, workdir: pathlib.Path, steps: int) -> dict:
    """One `rpo-train` run of `overrides` on `data`, watched; its peak, speed and how it ended."""
    command = [
        sys.executable,
        "-m",
        "rpo_jax.train.cli",
        "--config",
        args.config,
        "--workdir",
        str(workdir),
        f"--config.data.train={data}",
        f"--config.train.log_every={steps}",
        "--config.train.progress_bar=False",
        *args.overrides,
        *overrides,
    ]
    log = workdir.with_suffix(".log")
    with open(log, "w") as out:
        seen = rss_watch.watch(command, limit_gib=args.limit_gib, stdout=out, stderr=subprocess.STDOUT, env=child_env())
    record = {}
    metrics = workdir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            r = json.loads(line)
            if "train/perf/tokens_per_s" in r:
                record = r
    return {
        "peak": seen.peak_gib,
        "tokens_per_s": record.get("train/perf/tokens_per_s"),
        "step_s": record.get("train/perf/step_time_s"),
        "seconds": seen.seconds,
        "result": outcome(seen, log),
    }


def outcome(seen: rss_watch.Watched, log: pathlib.Path) -> str:
    if seen.exceeded:
        return "killed past the limit"
    if seen.code:
        tail = [line for line in log.read_text().splitlines() if line.strip()][-1:] if log.exists() else []
        return f"exit {seen.code}" + (f": {tail[0][:100]}" if tail else "")
    return "done"


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def trl_run(args, data: pathlib.Path, steps: int, workdir: pathlib.Path) -> dict:
    """TRL's DPOTrainer on `data` in a watched child (`trl_child`)."""
    command = [sys.executable, __file__, "--trl-child", str(data), args.model, str(args.batch_size), str(steps)]
    command.append("checkpointing" if args.trl_checkpointing else "")
    log = workdir.with_suffix(".log")
    with open(log, "w") as out:
        seen = rss_watch.watch(command, limit_gib=args.limit_gib, stdout=out, stderr=subprocess.STDOUT)
    found = [json.loads(m) for m in re.findall(r"TRL: (\{[^}]*\})", log.read_text())]
    got = found[-1] if found else {}
    return {
        "peak": seen.peak_gib,
        "tokens_per_s": got.get("tokens_per_s"),
        "step_s": got.get("step_s"),
        "seconds": seen.seconds,
        "result": outcome(seen, log),
    }


def trl_child(data: str, model_dir: str, batch_size: int, steps: int, checkpointing: bool = False) -> None:
    """Train TRL 1.16's DPOTrainer for `steps` steps on `data` (float32 CPU, its defaults otherwise); print
    `TRL: {"tokens_per_s": ..., "step_s": ...}` over the steps after the first."""
    import tempfile

    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    times, tokens = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    class Counting(trl.DPOTrainer):
        def training_step(self, model, inputs, *a, **k):
            mask = inputs.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else 0)
            return super().training_step(model, inputs, *a, **k)

    with tempfile.TemporaryDirectory() as tmp:
        config = trl.DPOConfig(
            output_dir=tmp,
            use_cpu=True,
            bf16=False,
            report_to=[],
            save_strategy="no",
            per_device_train_batch_size=batch_size,
            max_steps=steps,
            max_length=1024,
            beta=0.1,
            learning_rate=1e-6,
            seed=0,
            dataloader_num_workers=0,
            logging_steps=steps,
            gradient_checkpointing=checkpointing,  # TRL 1.16's DPOConfig default: True; the issue's run: False
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        Counting(
            model=model,
            args=config,
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            train_dataset=load_dataset("json", data_files=data, split="train"),
            callbacks=[Timer()],
        ).train()
    timed = times[1:] or times
    print("TRL: " + json.dumps({"tokens_per_s": sum(tokens[1:] or tokens) / sum(timed), "step_s": np.mean(timed)}))


# ------------------------------------------------------------------------------------------------ breakdown
def breakdown_child(recipe: str, overrides: list[str], data: str) -> None:
    """Print where the default mode's memory goes (module docstring), from XLA's analysis: one line per program."""
    import jax

    from rpo_jax.data import make_train_iterator
    from rpo_jax.train.build.fit import GiB, program_memory, resident_bytes
    from rpo_jax.train.build.programs import scorer
    from rpo_jax.train.jobs.preference import device_batch, in_step_reference_params
    from rpo_jax.train.runtime.cpu_memory import reuse_cpu_step_memory
    from rpo_jax.train.runtime.global_batches import local_batch_size

    cfg, _ = common.load_config(
        recipe, [f"--config.data.train={data}", "--config.train.progress_bar=False", *overrides]
    )
    if cfg.cpu_reuse_memory:
        reuse_cpu_step_memory()
    with tempfile.TemporaryDirectory() as tmp:
        run = common.build_benchmark_run(cfg, tmp)
        arrays = sum(x.nbytes for x in jax.live_arrays())
        host = resident_bytes() - arrays
        train_step, eval_step = common.trainer_steps(run)
        iterator = make_train_iterator(
            run.datasets["train"],
            local_batch_size(cfg.data.batch_size, run.mesh),
            seed=cfg.seed,
            shuffle=cfg.data.shuffle,
        )
        shapes, programs = {}, []
        for _ in range(run.config.train.steps):
            inputs, refs = common.step_arguments(run, next(iterator))
            shapes.setdefault(tuple(inputs["tokens"].shape), (inputs, refs))
        for shape, (inputs, refs) in shapes.items():
            kind = "packed" if len(shape) == 2 else "padded"
            before = resident_bytes()
            compiled = train_step.lower(run.state, inputs, refs).compile()
            name = f"train step, {kind} {list(shape)} (compiling it: +{(resident_bytes() - before) / GiB:.2f} GiB RSS)"
            programs.append(program_memory(name, compiled))
        if "eval" in run.datasets:
            batch = device_batch(run, run.datasets["eval"].batch_for_indices([0]), "eval")
            refs = in_step_reference_params(run, run.state.get("reference"))
            programs.append(program_memory("eval step", eval_step.lower(run.state["params"], batch, refs).compile()))
        if run.references and not run.in_step_refs:
            score = scorer(cfg, run, run.graphdef, run.rest, run.score_window)
            indices = list(range(min(cfg.data.eval_batch_size, len(run.datasets["train"]))))
            batch = device_batch(run, run.datasets["train"].batch_for_indices(indices), "train")
            programs.append(program_memory("reference scorer", score.lower(run.state["params"], batch).compile()))
        state = sum(x.nbytes for x in jax.tree.leaves(run.state))
        refs = sum(x.nbytes for r in run.references if r.params is not None for x in jax.tree.leaves(r.params))
        print(f"BREAKDOWN the process besides its arrays (Python, libraries, tokenizer, data): {host / GiB:.2f} GiB")
        print(f"BREAKDOWN train state (parameters, optimizer state): {state / GiB:.2f} GiB")
        print(f"BREAKDOWN frozen references beside it: {refs / GiB:.2f} GiB; all arrays: {arrays / GiB:.2f} GiB")
        for p in programs:
            print(
                f"BREAKDOWN {p.name}: arguments {p.arguments / GiB:.2f}, outputs {p.outputs / GiB:.2f} (donated "
                f"{p.aliased / GiB:.2f}), temporaries {p.temporaries / GiB:.2f}, code {p.code / GiB:.3f} GiB"
            )
        print(f"BREAKDOWN executables alive: {len(programs)}; train step shapes {[list(s) for s in shapes]}")


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--trl-child"]:
        return trl_child(argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5:6] == ["checkpointing"])
    if argv[:1] == ["--breakdown-child"]:
        recipe, data, *overrides = argv[1:]
        return breakdown_child(recipe, overrides, data)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="*", default=["padded", "default"], choices=list(MODES), help="rpo-train modes")
    p.add_argument(
        "--mode",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="another rpo-train mode: a name and its comma-separated --config.* overrides, e.g. "
        "'remat=--config.model.remat=full' (repeatable)",
    )
    p.add_argument("--trl", action="store_true", help="also TRL's DPOTrainer (config.model.path a checkpoint)")
    p.add_argument(
        "--trl-checkpointing", action="store_true", help="TRL with gradient checkpointing (its DPOConfig default)"
    )
    p.add_argument("--pairs", type=int, default=20, help="records of the file")
    p.add_argument("--max-length", type=int, default=None, help="longest sequence (default 512; --long: 2048)")
    p.add_argument("--long", action="store_true", help="every sequence --max-length tokens (default 2048)")
    p.add_argument("--seed", type=int, default=104, help="of the file's lengths and words")
    p.add_argument("--rounds", type=int, default=1, help="rounds over the modes (and TRL), in turn")
    p.add_argument("--limit-gib", type=float, default=11.0, help="kill a run whose resident memory passes this")
    p.add_argument("--breakdown", action="store_true", help="XLA's memory analysis of the default mode's programs")
    args, cfg, given = common.parse_args(p, argv, common.QUICKSTART)
    args.overrides = [f"--config.{k}={v}" for k, v in given.items()]
    args.max_length = args.max_length or (2048 if args.long else 512)
    args.model = os.path.expanduser(cfg.model.path)
    args.batch_size = cfg.data.batch_size
    if args.long:
        args.overrides += [
            f"--config.data.max_length={args.max_length}",
            f"--config.data.max_prompt_length={args.max_length // 4}",
        ]
    from rpo_jax.train.build.data import load_tokenizer, tokenizer_path

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="memory_"))
    tokenizer = load_tokenizer(tokenizer_path(cfg))
    data, tokens = scenario_file(
        tmp / "pairs.jsonl", tokenizer, pairs=args.pairs, max_length=args.max_length, seed=args.seed, long=args.long
    )
    steps = -(-args.pairs // cfg.data.batch_size)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}; config {common.display(args.config)}"
        + (f" with {' '.join(args.overrides)}" if args.overrides else "")
        + f"; file: {args.pairs} pairs, {tokens} real tokens, sequences ≤ {args.max_length}; {os.cpu_count()} cores; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    if args.breakdown:
        command = [sys.executable, __file__, "--breakdown-child", args.config, str(data), *args.overrides]
        log = tmp / "breakdown.log"
        with open(log, "w") as out:
            seen = rss_watch.watch(
                command, limit_gib=args.limit_gib, stdout=out, stderr=subprocess.STDOUT, env=child_env()
            )
        for line in log.read_text().splitlines():
            if line.startswith("BREAKDOWN "):
                print(line[10:])
        print(f"(compiling them: peak {seen.peak_gib:.2f} GiB, {seen.seconds:.0f} s; {outcome(seen, log)})")
        return None
    extra = [(name, overrides.split(",")) for name, _, overrides in (m.partition("=") for m in args.mode)]
    runs = [(mode, MODES[mode]) for mode in args.modes] + extra + ([("TRL DPOTrainer", None)] if args.trl else [])
    results = {name: [] for name, _ in runs}
    for rnd in range(args.rounds):
        for name, overrides in runs:
            workdir = tmp / f"{name.split()[0]}_{rnd}"
            if overrides is None:
                out = trl_run(args, data, steps, workdir)
            else:
                out = rpo_train(args, overrides, data, workdir, steps)
            results[name].append(out)
            print(f"round {rnd + 1}, {name}: {json.dumps(out)}", flush=True)
    print("\n| run | peak RSS GiB | real tokens/s | s / step | wall s | result |")
    print("|---|---|---|---|---|---|")
    for name, outs in results.items():
        for out in outs:
            rate = f"{out['tokens_per_s']:.0f}" if out["tokens_per_s"] else "—"
            step = f"{out['step_s']:.1f}" if out["step_s"] else "—"
            print(f"| {name} | {out['peak']:.2f} | {rate} | {step} | {out['seconds']:.0f} | {out['result']} |")
    return results


if __name__ == "__main__":
    main()
