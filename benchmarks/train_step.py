"""Train-step throughput: tokens/s, step time, MFU against the measured matmul peak, and peak memory.

    python benchmarks/train_step.py                      # SmolLM2-135M's shape (random weights), cached vs in-step
    python benchmarks/train_step.py --config configs/smollm2_demo.py --config.data.batch_size=4 \
        --k 2 --prompt-len 64 --response-len 64 --reference both --peer trl
    python benchmarks/train_step.py --lora 8,64 --config.data.batch_size=2 --steps 3 --warmup 1
    python benchmarks/train_step.py --reference cached --vary model.remat=none,full --k 2 --prompt-len 128 \
        --response-len 192 --config.data.batch_size=4   # modes differing in one field, alternating
    python benchmarks/train_step.py --config configs/quickstart.py --k 4 --prompt-len 16 --response-len 16 \
        --steps 1 --warmup 1                             # seconds, a smoke run

The step is the trainer's: each mode is a run built as `rpo-train` builds it (`--config RECIPE` plus
`--config.KEY=VALUE` overrides, default benchmarks/configs/smollm2_shape.py: the SmolLM2 recipe with random
weights), on a synthetic file of `config.data.batch_size` records of `--k` responses, every prompt `--prompt-len`
and every response `--response-len` tokens (`benchmarks/common.py`), and its train step comes from the one
program builder (`rpo_jax.train.build.programs.jitted_steps`, as `preference_task` calls it: the state donated,
its shardings kept), fed `train_batch(run, batch)` — the same batch every step — and compiled once ahead of
the timed steps. What the trainer decides, the benchmark inherits: the score window (`config.model.score_window`,
"auto": the response length rounded up to 16), packing (`config.data.packing`, "auto"; the layout each mode
ran is printed), the compute dtype (`config.model.dtype`), remat, scan unrolling, vocabulary chunks, LoRA.

`--reference in_step` scores the frozen reference inside the step (what TRL's DPOTrainer does by default:
`--config.reference_mode=in_step`); `cached` feeds reference log-probs precomputed by the trainer's cache fill
(`reference_mode=cache`); `both` runs the two, alternating one step of each so both see the same machine (a
shared 2-core VM drifts by tens of percent over minutes), and prints the speed-up. FLOPs per step are the
trainer's (`rpo_jax.train.runtime.performance.batch_flops`): per token 6·P' + 12·L·T·d plus 2·P' + 4·L·T·d per
in-step reference, P' the non-embedding parameters, plus the output head 6·V·D (2·V·D per reference) × the
fraction of positions where it runs. The peak is `config.metrics.peak_flops` when set, else a 4096² matmul in the
compute dtype, measured before the steps and after every round of steps; MFU is against the highest of these (a
ceiling, so MFU errs low); also printed, the median over rounds of each step's MFU against the higher of the two
samples taken just before and after it (same machine state). Memory: each mode's compiled step (XLA's buffer
assignment: arguments + outputs + temporaries − donated) and the process's peak (device peak, or the peak RSS on
CPU) over everything run; run one `--reference` mode alone for that mode's. On the CPU, `config.cpu_reuse_memory`
(default True, as `rpo-train`) calls `rpo_jax.train.runtime.cpu_memory.reuse_cpu_step_memory` first, so XLA:CPU's
per-step temporary buffer stays mapped between steps; `--config.cpu_reuse_memory=False` leaves JAX's defaults (a
fresh mapping faulted in every step) for comparison; the minor page faults and kernel time of each step
(getrusage, median over steps) are printed with it.

`--peer trl` (needs torch and trl, `--config.model.path` a checkpoint, `--k 2`, `config.loss.name` dpo) also
times TRL's `DPOTrainer` step (`benchmarks/trl_peer.py`: float32, transformers' default attention) on the same
checkpoint and the same batch — the prompt and the two responses of rpo_jax's pair, TRL's collator padding
nothing — one step of each rpo_jax mode and then one TRL step per round (TRL's default: its reference model's
forward in the step), and prints every round's tokens/s, the rpo_jax / TRL ratios of that round and the load
average: peer figures only from the same run, on the same machine state.

`--lora 8,64` compares full fine-tuning, LoRA at each rank (`--config.model.lora.rank=R`, alpha 2·R, the
recipe's targets) and QLoRA (`model.lora.base_dtype`, `--qlora int8,int4`, at the first rank) instead, each with
an in-step reference (`reference_mode=in_step`: for full fine-tuning a frozen copy of the initial weights, for
(Q)LoRA the policy's base with the adapters off), modes alternating, and prints each mode's step memory and
tokens/s (`compare_lora`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import tempfile
import time

import common
import jax
import jax.numpy as jnp
import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=2, help="responses per record of the synthetic file")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens of every prompt of the synthetic file")
    p.add_argument("--response-len", type=int, default=64, help="tokens of every response of the synthetic file")
    p.add_argument(
        "--reference",
        choices=["in_step", "cached", "both"],
        default="both",
        help="reference_mode of the timed run(s): in_step, cache, or both alternating",
    )
    p.add_argument(
        "--lora",
        default="",
        metavar="RANKS",
        help="compare full fine-tuning, LoRA at each rank of this comma-separated list (alpha = 2·rank) "
        "and QLoRA (--qlora) at the first rank, in-step reference, modes alternating; prints each "
        "mode's step memory and tokens/s (see compare_lora)",
    )
    p.add_argument("--qlora", default="int8,int4", help="with --lora: the quantized bases compared ('' for none)")
    p.add_argument(
        "--peer",
        choices=["none", "trl"],
        default="none",
        help="trl: also time TRL's DPOTrainer step on the same checkpoint and batch, alternating",
    )
    p.add_argument("--steps", type=int, default=5, help="timed rounds (one step of each mode per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each mode first")
    p.add_argument("--devices", type=int, default=1, help="devices of the run's mesh (0: all local devices)")
    p.add_argument(
        "--vary",
        default="",
        metavar="KEY=V1,V2,...",
        help="modes that differ in one config field (e.g. model.remat=none,full), alternating, each with the "
        "one --reference mode given (in_step or cached)",
    )
    args, cfg, given = common.parse_args(p, argv, common.SMOLLM2_SHAPE)
    if args.peer == "trl" and (not cfg.model.path or args.k != 2 or cfg.loss.name != "dpo" or args.lora):
        p.error(
            "--peer trl needs a checkpoint (--config.model.path or a recipe with one), --k 2 and "
            "config.loss.name=dpo, without --lora"
        )
    reused = False
    if cfg.cpu_reuse_memory:  # before the first computation, as rpo-train
        from rpo_jax.train.runtime.cpu_memory import reuse_cpu_step_memory

        reused = reuse_cpu_step_memory()

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="train_step_"))
    data = common.uniform_file(tmp, cfg.data.batch_size, args.k, args.prompt_len, args.response_len)
    try:
        cfg = common.synthetic_config(
            cfg,
            data,
            max_length=args.prompt_len + args.response_len,
            max_prompt_length=args.prompt_len,
            overrides=given,
        )
    except ValueError as e:
        p.error(str(e))
    if args.lora:
        return compare_lora(args, cfg, tmp)

    from rpo_jax.train.build.state import build_loss

    if args.vary:
        try:
            modes = vary_modes(args.vary, args.reference, build_loss(cfg).spec.requires_reference)
        except ValueError as e:
            p.error(str(e))
    elif not build_loss(cfg).spec.requires_reference:
        modes = {"no reference": {}}
    else:
        both = {"in_step": {"reference_mode": "in_step"}, "cached": {"reference_mode": "cache"}}
        modes = both if args.reference == "both" else {args.reference: both[args.reference]}
    runs = {label: prepare(label, common.with_overrides(cfg, o), tmp, args) for label, o in modes.items()}
    first = next(iter(runs.values()))
    run = first["run"]
    dtype = run.dtype
    platform = jax.local_devices()[0].platform
    peaks = [cfg.metrics.peak_flops or common_peak(dtype)]
    print(
        f"device: {jax.local_devices()[0].device_kind} ({platform}) × {run.mesh.size}, compute "
        f"{jnp.dtype(dtype).name}, {'configured peak' if cfg.metrics.peak_flops else 'matmul peak before the steps'} "
        f"{peaks[0] / 1e9:.1f} GFLOP/s"
    )
    print(f"CPU step memory: {'reused (reuse_cpu_step_memory)' if reused else 'fresh every step (JAX defaults)'}")
    t = args.prompt_len + args.response_len
    with_text = " with " + ", ".join(f"{k}={v}" for k, v in given.items()) if given else ""
    print(f"config {common.display(args.config)}{with_text}")
    print(
        f"model: {cfg.model.path or 'random init (config.model.init)'} "
        f"({run.model_config.num_params() / 1e6:.1f} M params), batch {cfg.data.batch_size}×K={args.k}×T={t} = "
        f"{first['tokens']} tokens/step, loss {cfg.loss.name}, remat {cfg.model.remat}, scan_unroll "
        f"{cfg.model.scan_unroll}, score window {run.score_window or 'off (every position)'}"
    )
    for label, r in runs.items():
        print(
            f"[{label:8s}] {r['run'].layout.scoring.value} references; step inputs "
            f"{common.layout_text(r['inputs'])}; compiled in {r['compile_s']:.1f} s"
        )

    for r in runs.values():
        for _ in range(args.warmup):
            r["state"], r["metrics"] = r["step"](r["state"], r["inputs"], r["refs"])
        jax.block_until_ready(r["state"])
    peer = start_trl_peer(args, cfg, first["host"]) if args.peer == "trl" else None
    for round_index in range(args.steps):  # one step of each mode per round, then a peak sample
        for r in runs.values():
            u0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            r["state"], r["metrics"] = r["step"](r["state"], r["inputs"], r["refs"])
            jax.block_until_ready(r["metrics"])
            u1 = resource.getrusage(resource.RUSAGE_SELF)
            r["times"].append(time.perf_counter() - t0)
            r["faults"].append(u1.ru_minflt - u0.ru_minflt)
            r["kernel_s"].append(u1.ru_stime - u0.ru_stime)
        if peer is not None:
            time_trl_round(peer, runs, first["tokens"], round_index)
        peaks.append(cfg.metrics.peak_flops or common_peak(dtype, repeats=2))
    memory, where = common.process_peak_memory()
    peak = max(peaks)
    print(
        f"peak over {len(peaks)} samples: {min(peaks) / 1e9:.1f} to {peak / 1e9:.1f} GFLOP/s; "
        f"MFU below is against {peak / 1e9:.1f} × {run.mesh.size} chip(s)"
    )
    results = {}
    chips = run.mesh.size
    for mode, r in runs.items():
        step_time = float(np.median(r["times"]))
        flops = r["flops"]
        # round i ran between peak samples i and i+1: its MFU against the higher of the two
        local = [flops / dt / max(peaks[i], peaks[i + 1]) / chips for i, dt in enumerate(r["times"])]
        results[mode] = {
            "step_time_s": step_time,
            "tokens_per_s": r["tokens"] / step_time,
            "tflops_per_step": flops / 1e12,
            "mfu": flops / step_time / peak / chips,
            "peak_flops": peak,
            "mfu_adjacent_peak": float(np.median(local)),
            "peak_memory_gib": memory,
            "step_peak_memory_gib": r["memory"]["peak"] / 2**30,
            "layout": common.layout_text(r["inputs"]),
            "cpu_step_memory_reused": bool(reused),
            "page_faults_per_step": float(np.median(r["faults"])),
            "kernel_s_per_step": float(np.median(r["kernel_s"])),
            "loss": float(r["metrics"]["loss"]),
        }
        res = results[mode]
        print(
            f"[{mode:8s}] step {step_time:.3f} s (median of {args.steps}), {res['tokens_per_s']:.1f} tokens/s, "
            f"MFU {100 * res['mfu']:.1f}% of the highest peak sample ({100 * res['mfu_adjacent_peak']:.1f}% "
            f"of the samples around each step, median), {res['tflops_per_step']:.3f} TFLOP/step, step program "
            f"{res['step_peak_memory_gib']:.2f} GiB, {res['page_faults_per_step']:.0f} page faults and "
            f"{res['kernel_s_per_step']:.2f} s kernel time per step"
        )
    print(f"peak memory {memory:.2f} GiB ({where}, the whole run)")
    if set(results) == {"in_step", "cached"}:
        speedup = results["in_step"]["step_time_s"] / results["cached"]["step_time_s"]
        print(f"cached vs in-step: {speedup:.2f}× faster steps")
    if peer is not None:
        results["trl"] = summarize_trl(peer, runs, first["tokens"])
    print(json.dumps(results))
    return results


def vary_modes(vary: str, reference: str, requires_reference: bool) -> dict[str, dict]:
    """`--vary KEY=V1,V2,...` → one mode per value ({"KEY=V1": {KEY: V1}, ...}), each with the single reference
    mode `reference` (in_step → reference_mode "in_step", cached → "cache"). Values are parsed as Python literals
    where they are one (`8`, `False`), else kept as strings (`full`)."""
    import ast

    key, sep, values = vary.partition("=")
    if not sep or not key or not values:
        raise ValueError(f"--vary {vary!r}: expected KEY=V1,V2,... (e.g. model.remat=none,full)")
    if requires_reference and reference == "both":
        raise ValueError("--vary needs one --reference mode (in_step or cached), not both")

    def literal(text: str):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text

    fixed = {"reference_mode": "in_step" if reference == "in_step" else "cache"} if requires_reference else {}
    return {f"{key}={v}": {**fixed, key: literal(v)} for v in values.split(",")}


def common_peak(dtype, repeats: int = 5) -> float:
    from rpo_jax.train.runtime.performance import measure_matmul_peak

    return measure_matmul_peak(dtype, repeats=repeats)


def prepare(label: str, cfg, tmp: pathlib.Path, args) -> dict:
    """One mode: the trainer's run for `cfg` (reference cache filled when cached), its train step from the builder
    (`common.trainer_steps`) compiled for the first train batch, and that batch's inputs, FLOPs and real tokens."""
    from rpo_jax.data import real_tokens

    run = common.build_benchmark_run(cfg, tmp / label.replace(" ", "_"), devices=common.devices_of(args.devices))
    common.check_lengths(run, args.prompt_len, args.response_len)
    host = common.host_batch(run)
    inputs, refs = common.step_arguments(run, host)
    train_step, _ = common.trainer_steps(run)
    t0 = time.perf_counter()
    step = common.CompiledStep(train_step, run.state, inputs, refs)
    return {
        "run": run,
        "step": step,
        "state": run.state,
        "inputs": inputs,
        "refs": refs,
        "host": host,
        "flops": common.step_flops(run, inputs),
        "tokens": real_tokens(host),
        "memory": step.memory(),
        "compile_s": time.perf_counter() - t0,
        "times": [],
        "faults": [],
        "kernel_s": [],
    }


def start_trl_peer(args, cfg, batch):
    """TRL's trainer with its default in-step reference (`benchmarks/trl_peer.py`), warmed up like rpo_jax's."""
    from trl_peer import TrlPeer  # torch and trl: only for --peer trl

    peer = TrlPeer(os.path.expanduser(cfg.model.path), np.asarray(batch["tokens"]), args.prompt_len)
    if peer.tokens_per_step() != np.asarray(batch["tokens"]).size:
        raise SystemExit(
            f"TRL's batch has {peer.tokens_per_step()} tokens, rpo_jax's "
            f"{np.asarray(batch['tokens']).size}: not the same batch"
        )
    for _ in range(args.warmup):
        peer.step()
    peer.timed = []
    print(
        f"TRL peer: DPOTrainer (trl {__import__('trl').__version__}, torch {peer.torch.__version__}, "
        f"{peer.torch.get_num_threads()} threads), reference model in the step, set-up "
        f"{peer.setup_s:.0f} s"
    )
    return peer


def time_trl_round(peer, runs, tokens_per_step: int, round_index: int) -> None:
    """One TRL step, then this round's tokens/s of TRL and of each rpo_jax mode, and their ratios."""
    t0 = time.perf_counter()
    peer.step()
    peer.timed.append(time.perf_counter() - t0)
    theirs = tokens_per_step / peer.timed[-1]
    line = [f"TRL {theirs:.1f} tokens/s"]
    for mode, r in runs.items():
        ours = tokens_per_step / r["times"][-1]
        line.append(f"rpo_jax {mode} {ours:.1f} = {ours / theirs:.2f}×")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())  # other processes on the machine skew both sides
    print(f"round {round_index + 1}: " + "; ".join(line) + f" (load average {load})", flush=True)


def summarize_trl(peer, runs, tokens_per_step: int) -> dict:
    """TRL's median tokens/s, and per rpo_jax mode the rpo_jax / TRL ratio of every round (each round's own pair)."""
    out = {
        "trl_tokens_per_s": tokens_per_step / float(np.median(peer.timed)),
        "trl_step_time_s": float(np.median(peer.timed)),
    }
    print(f"TRL DPOTrainer: {out['trl_tokens_per_s']:.1f} tokens/s (median of {len(peer.timed)})")
    for mode, r in runs.items():
        ratios = [trl_s / ours_s for ours_s, trl_s in zip(r["times"], peer.timed)]
        out[mode] = {"ratio_per_round": ratios, "ratio_median": float(np.median(ratios))}
        print(
            f"[{mode:8s}] rpo_jax / TRL per round: {', '.join(f'{x:.2f}×' for x in ratios)} (median "
            f"{out[mode]['ratio_median']:.2f}×, range {min(ratios):.2f}–{max(ratios):.2f}×)"
        )
    return out


def lora_modes(args) -> dict[str, dict]:
    """label → the config overrides of every mode `--lora` compares (rank 0 = full fine-tuning), each with an
    in-step reference."""
    ranks = [int(r) for r in args.lora.split(",") if r.strip()]
    bases = [d for d in args.qlora.split(",") if d.strip()]
    mode = lambda rank, base="": {
        "reference_mode": "in_step",
        "model.lora.rank": rank,  # noqa: E731
        "model.lora.alpha": 2.0 * rank if rank else 16.0,
        "model.lora.base_dtype": base,
    }
    return {
        "full": mode(0),
        **{f"lora r{r}": mode(r) for r in ranks},
        **{f"qlora {d} r{ranks[0]}": mode(ranks[0], d) for d in bases},
    }


def compare_lora(args, cfg, tmp: pathlib.Path):
    """Full fine-tuning vs LoRA vs QLoRA on one machine in one run (`--lora 8,64`): each mode a run of its own
    (`model.lora.rank`, `model.lora.base_dtype` overrides) and the trainer's train step (DPO-family loss with an
    in-step reference: for full fine-tuning a frozen copy of the initial weights, for (Q)LoRA the policy's own
    base with the adapters off), the frozen base an argument of the program (`WithFrozen`), one step of each mode
    per round. Memory per mode: XLA's buffer assignment of the compiled step (`step_memory`: the live bytes of one
    step, state and base included), exact and independent of the other modes in the process; the process's peak
    (RSS on CPU) is printed once."""
    from flax import nnx

    from rpo_jax.models.quantize import parameter_bytes
    from rpo_jax.train.build.state import build_loss

    if not build_loss(cfg).spec.requires_reference:
        raise SystemExit(f"--lora compares modes with an in-step reference; loss {cfg.loss.name} needs none")
    runs = {}
    for label, overrides in lora_modes(args).items():
        r = runs[label] = prepare(label, common.with_overrides(cfg, overrides), tmp, args)
        run = r["run"]
        r["base_bytes"] = parameter_bytes(nnx.merge(run.graphdef, run.state["params"], run.rest))["total"]
        r["trained_params"] = sum(x.size for x in jax.tree.leaves(run.state["params"]))
    first = next(iter(runs.values()))
    run = first["run"]
    print(
        f"device: {jax.local_devices()[0].device_kind}, compute {jnp.dtype(run.dtype).name}, model "
        f"{cfg.model.path or 'random init (config.model.init)'} ({run.model_config.num_params() / 1e6:.1f} M "
        f"params), batch {cfg.data.batch_size}×K={args.k}×T={args.prompt_len + args.response_len} = "
        f"{first['tokens']} tokens/step, loss {cfg.loss.name}, in-step reference, remat {cfg.model.remat}, step "
        f"inputs {common.layout_text(first['inputs'])}"
    )
    for r in runs.values():
        for _ in range(args.warmup):
            r["state"], r["metrics"] = r["step"](r["state"], r["inputs"], r["refs"])
        jax.block_until_ready(r["state"])
    for _ in range(args.steps):  # one step of each mode per round
        for r in runs.values():
            t0 = time.perf_counter()
            r["state"], r["metrics"] = r["step"](r["state"], r["inputs"], r["refs"])
            jax.block_until_ready(r["metrics"])
            r["times"].append(time.perf_counter() - t0)
    full = runs["full"]["memory"]["peak"]
    results = {}
    print(
        f"{'mode':18s} {'trained params':>15s} {'base (MiB)':>11s} {'step peak (MiB)':>16s} {'vs full':>8s} "
        f"{'tokens/s':>9s}"
    )
    for label, r in runs.items():
        step_time = float(np.median(r["times"]))
        res = results[label] = {
            "trained_params": r["trained_params"],
            "base_mib": r["base_bytes"] / 2**20,
            "step_peak_mib": r["memory"]["peak"] / 2**20,
            "step_temporaries_mib": r["memory"]["temporaries"] / 2**20,
            "peak_vs_full": r["memory"]["peak"] / full,
            "step_time_s": step_time,
            "tokens_per_s": r["tokens"] / step_time,
            "loss": float(r["metrics"]["loss"]),
        }
        print(
            f"{label:18s} {res['trained_params']:15,d} {res['base_mib']:11.1f} {res['step_peak_mib']:16.1f} "
            f"{res['peak_vs_full']:8.2f} {res['tokens_per_s']:9.1f}"
        )
    memory, where = common.process_peak_memory()
    print(
        f"step peak: XLA's buffer assignment of each compiled step (arguments + outputs + temporaries - donated); "
        f"base: the stored weights other than adapters (parameter_bytes; int4 counted packed, 4 bits); "
        f"tokens/s: median of {args.steps} steps; process peak memory {memory:.2f} GiB ({where}, all modes together)"
    )
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
