"""Train-step throughput: tokens/s, step time, MFU against the measured matmul peak, and peak memory.

    python benchmarks/train_step.py --model ~/.cache/rpo_jax/smollm2-135m-instruct \
        --batch 4 --k 2 --prompt-len 64 --response-len 64 --loss dpo --reference both

`--reference in_step` scores the frozen reference inside the step (what TRL's DPOTrainer does by default);
`cached` feeds precomputed reference log-probs (rpo_jax's reference cache); `both` runs the two, alternating one
step of each so both see the same machine (a shared 2-core VM drifts by tens of percent over minutes), and prints the
speed-up. The step is the trainer's (`rpo_jax.train.step.steps.make_train_step`), with the output head on the response
positions only (`--score-window auto`, the trainer's default `config.model.score_window`: 64 of the 127 logit
positions for 64 + 64 tokens; `0` puts it on every position). FLOPs per token follow
`rpo_jax.train.core.performance.train_flops_per_token`: 6·P' + 12·L·T·d plus 2·P' + 4·L·T·d per in-step reference, P' the
non-embedding parameters, plus the output head 6·V·D (2·V·D per reference) × the fraction of positions where it
runs. The peak is a 4096² matmul in the compute dtype, measured before the steps and after every round of steps;
MFU is against the highest of these (a ceiling, so MFU errs low); also printed, the median over rounds of each
step's MFU against the higher of the two samples taken just before and after it (same machine state). Peak
memory is the process's (device peak, or the peak RSS on CPU) over everything run; run one `--reference` mode
alone for that mode's. On the CPU the script first calls `rpo_jax.train.runtime.cpu_memory.reuse_cpu_step_memory`, as
`rpo-train` does, so XLA:CPU's per-step temporary buffer stays mapped between steps; `--cpu-memory fresh` leaves
JAX's defaults (a fresh mapping faulted in every step) for comparison; the minor page faults and kernel time of
each step (getrusage, median over steps) are printed with it.

`--peer trl` (needs torch and trl, `--model` a checkpoint, `--k 2`, `--loss dpo`) also times TRL's `DPOTrainer`
step (`benchmarks/trl_peer.py`: float32, transformers' default attention) on the same checkpoint and the same
batch — the prompt and the two responses of rpo_jax's pair, TRL's collator padding nothing — one step of each
rpo_jax mode and then one TRL step per round (TRL's default: its reference model's forward in the step), and
prints every round's tokens/s, the rpo_jax / TRL ratios of that round and the load average: peer figures only
from the same run, on the same machine state.

`--lora 8,64` compares full fine-tuning, LoRA at each rank (all-linear) and QLoRA (`--qlora int8,int4`, at the
first rank) instead, each with an in-step reference, modes alternating, and prints each mode's step memory
(XLA's buffer assignment of its compiled step) and tokens/s (`compare_lora`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rpo_jax.losses import make_loss
from rpo_jax.models import ModelConfig, create_model, load_hf
from rpo_jax.train.build.model import split_trainable
from rpo_jax.train.build.optim import make_optimizer
from rpo_jax.train.core.performance import measure_matmul_peak, train_flops_per_token
from rpo_jax.train.runtime.cpu_memory import reuse_cpu_step_memory
from rpo_jax.train.step.logprobs import resolve_score_window, response_logps
from rpo_jax.train.step.steps import make_train_step

TINY = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "tie_word_embeddings": True, "rms_norm_eps": 1e-5}  # SmolLM2-135M's shape, random weights


def synthetic_batch(rng: np.random.Generator, b: int, k: int, prompt_len: int, response_len: int, vocab: int):
    t = prompt_len + response_len
    tokens = rng.integers(0, vocab, size=(b, k, t), dtype=np.int32)
    loss_mask = np.zeros((b, k, t), bool)
    loss_mask[..., prompt_len:] = True
    return {"tokens": tokens, "attention_mask": np.ones((b, k, t), bool), "loss_mask": loss_mask,
            "lengths": np.full((b, k), response_len, np.int32), "valid": np.ones((b, k), bool),
            "rewards": rng.normal(size=(b, k)).astype(np.float32)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="HF checkpoint dir; empty: SmolLM2-135M's shape, random init")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--loss", default="dpo")
    p.add_argument("--reference", choices=["in_step", "cached", "both"], default="both")
    p.add_argument("--dtype", default="auto", help="compute dtype; auto = float32 on CPU, bfloat16 elsewhere")
    p.add_argument("--remat", default="none")
    p.add_argument("--scan-unroll", type=int, default=1, help="layers per scan iteration (rpo_jax.models)")
    p.add_argument("--vocab-chunk", type=int, default=0)
    p.add_argument("--score-window", default="auto",
                   help="logit positions per response given to the output head: auto (the response length, "
                        "rounded up to 16), 0 (every position), or a number")
    p.add_argument("--cpu-memory", choices=["reuse", "fresh"], default="reuse",
                   help="reuse: rpo_jax.train.runtime.cpu_memory.reuse_cpu_step_memory (rpo-train's default); fresh: JAX's defaults")
    p.add_argument("--lora", default="", metavar="RANKS",
                   help="compare full fine-tuning, LoRA at each rank of this comma-separated list (all-linear, "
                        "alpha = 2·rank) and QLoRA (--qlora) at the first rank, in-step reference, modes "
                        "alternating; prints each mode's step memory and tokens/s (see compare_lora)")
    p.add_argument("--qlora", default="int8,int4", help="with --lora: the quantized bases compared ('' for none)")
    p.add_argument("--peer", choices=["none", "trl"], default="none",
                   help="trl: also time TRL's DPOTrainer step on the same checkpoint and batch, alternating")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    if args.peer == "trl" and (not args.model or args.k != 2 or args.loss != "dpo" or args.lora):
        p.error("--peer trl needs --model (a checkpoint directory), --k 2 and --loss dpo, without --lora")
    reused = args.cpu_memory == "reuse" and reuse_cpu_step_memory()  # before the first computation

    platform = jax.devices()[0].platform
    dtype = (jnp.float32 if platform == "cpu" else jnp.bfloat16) if args.dtype == "auto" else jnp.dtype(args.dtype)
    if args.model:
        model, config = load_hf(args.model, dtype=dtype, param_dtype=jnp.float32, remat=args.remat,
                                scan_unroll=args.scan_unroll)
    else:
        config = ModelConfig.from_hf_dict(TINY, remat=args.remat, scan_unroll=args.scan_unroll)
        model = create_model(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32)
    if args.lora:
        return compare_lora(args, model, config, dtype)
    graphdef, params, rest = split_trainable(model)
    loss_fn = make_loss(args.loss)
    tx, _ = make_optimizer({"name": "adamw", "learning_rate": 1e-6, "schedule": "constant"}, 100)
    batch = synthetic_batch(np.random.default_rng(0), args.batch, args.k, args.prompt_len, args.response_len,
                            config.vocab_size)
    t = args.prompt_len + args.response_len
    tokens_per_step = args.batch * args.k * t
    peaks = [measure_matmul_peak(dtype)]  # sampled again after every round of steps; MFU uses the highest
    chunk = args.vocab_chunk or None
    window = resolve_score_window(args.score_window, args.response_len)
    window = None if window is not None and window >= t - 1 else window
    print(f"device: {jax.devices()[0].device_kind} ({platform}), compute {jnp.dtype(dtype).name}, "
          f"matmul peak before the steps {peaks[0] / 1e9:.1f} GFLOP/s")
    print(f"CPU step memory: {'reused (reuse_cpu_step_memory)' if reused else 'fresh every step (JAX defaults)'}")
    print(f"model: {args.model or 'random SmolLM2-135M shape'} ({config.num_params() / 1e6:.1f} M params), "
          f"batch {args.batch}×K={args.k}×T={t} = {tokens_per_step} tokens/step, loss {args.loss}, remat {args.remat}, "
          f"scan_unroll {args.scan_unroll}, output head on {window or t - 1} of {t - 1} logit positions")

    modes = ["in_step", "cached"] if args.reference == "both" else [args.reference]
    runs = {}
    for mode in modes:
        state = {"params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params),
                 "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
        b = {k: jnp.asarray(v) for k, v in batch.items()}
        ref_params, ref_graphdefs = (), ()
        if mode == "cached":
            b["ref_logps"] = jax.jit(lambda p, x: response_logps(graphdef, p, rest, x, compute_dtype=dtype,
                                                                   vocab_chunk_size=chunk, score_window=window))(params, b)
        elif loss_fn.requires_reference:
            ref_params, ref_graphdefs = (params,), ((graphdef, rest),)
        step = jax.jit(make_train_step(graphdef, rest, loss_fn, tx, compute_dtype=dtype, vocab_chunk_size=chunk,
                                       ref_graphdefs=ref_graphdefs, score_window=window), donate_argnums=(0,))
        r = runs[mode] = {"step": step, "state": state, "batch": b, "ref_params": ref_params, "times": [],
                           "faults": [], "kernel_s": []}
        for _ in range(args.warmup):
            r["state"], r["metrics"] = step(r["state"], b, ref_params)
        jax.block_until_ready(r["state"])
    peer = start_trl_peer(args, batch) if args.peer == "trl" else None
    for round_index in range(args.steps):  # one step of each mode per round, then a peak sample
        for mode, r in runs.items():
            u0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            r["state"], r["metrics"] = r["step"](r["state"], r["batch"], r["ref_params"])
            jax.block_until_ready(r["metrics"])
            u1 = resource.getrusage(resource.RUSAGE_SELF)
            r["times"].append(time.perf_counter() - t0)
            r["faults"].append(u1.ru_minflt - u0.ru_minflt)
            r["kernel_s"].append(u1.ru_stime - u0.ru_stime)
        if peer is not None:
            time_trl_round(peer, runs, tokens_per_step, round_index)
        peaks.append(measure_matmul_peak(dtype, repeats=2))
    stats = jax.devices()[0].memory_stats() or {}
    memory, where = ((stats["peak_bytes_in_use"] / 2**30, "device") if "peak_bytes_in_use" in stats
                     else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "RSS"))
    peak = max(peaks)
    print(f"matmul peak over {len(peaks)} samples: {min(peaks) / 1e9:.1f} to {peak / 1e9:.1f} GFLOP/s; "
          f"MFU below is against {peak / 1e9:.1f}")
    results = {}
    for mode, r in runs.items():
        step_time = float(np.median(r["times"]))
        n_refs = len(r["ref_params"])
        flops = tokens_per_step * train_flops_per_token(config, t, num_references=n_refs, score_window=window)
        # round i ran between peak samples i and i+1: its MFU against the higher of the two
        local = [flops / dt / max(peaks[i], peaks[i + 1]) for i, dt in enumerate(r["times"])]
        results[mode] = {"step_time_s": step_time, "tokens_per_s": tokens_per_step / step_time,
                         "tflops_per_step": flops / 1e12, "mfu": flops / step_time / peak, "peak_flops": peak,
                         "mfu_adjacent_peak": float(np.median(local)), "peak_memory_gib": memory,
                         "cpu_step_memory_reused": bool(reused), "page_faults_per_step": float(np.median(r["faults"])),
                         "kernel_s_per_step": float(np.median(r["kernel_s"])),
                         "loss": float(r["metrics"]["loss"])}
        res = results[mode]
        print(f"[{mode:8s}] step {step_time:.3f} s (median of {args.steps}), {res['tokens_per_s']:.1f} tokens/s, "
              f"MFU {100 * res['mfu']:.1f}% of the highest peak sample ({100 * res['mfu_adjacent_peak']:.1f}% "
              f"of the samples around each step, median), {res['tflops_per_step']:.3f} TFLOP/step, "
              f"{res['page_faults_per_step']:.0f} page faults and {res['kernel_s_per_step']:.2f} s kernel time per step")
    print(f"peak memory {memory:.2f} GiB ({where}, the whole run)")
    if len(results) == 2:
        print(f"cached vs in-step: {results['in_step']['step_time_s'] / results['cached']['step_time_s']:.2f}× faster steps")
    if peer is not None:
        results["trl"] = summarize_trl(peer, runs, tokens_per_step)
    print(json.dumps(results))


def start_trl_peer(args, batch):
    """TRL's trainer with its default in-step reference (`benchmarks/trl_peer.py`), warmed up like rpo_jax's."""
    from trl_peer import TrlPeer  # torch and trl: only for --peer trl

    peer = TrlPeer(args.model, batch["tokens"], args.prompt_len)
    if peer.tokens_per_step() != batch["tokens"].size:
        raise SystemExit(f"TRL's batch has {peer.tokens_per_step()} tokens, rpo_jax's {batch['tokens'].size}: "
                         "not the same batch")
    for _ in range(args.warmup):
        peer.step()
    peer.timed = []
    print(f"TRL peer: DPOTrainer (trl {__import__('trl').__version__}, torch {peer.torch.__version__}, "
          f"{peer.torch.get_num_threads()} threads), reference model in the step, set-up "
          f"{peer.setup_s:.0f} s")
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
    out = {"trl_tokens_per_s": tokens_per_step / float(np.median(peer.timed)),
           "trl_step_time_s": float(np.median(peer.timed))}
    print(f"TRL DPOTrainer: {out['trl_tokens_per_s']:.1f} tokens/s (median of {len(peer.timed)})")
    for mode, r in runs.items():
        ratios = [trl_s / ours_s for ours_s, trl_s in zip(r["times"], peer.timed)]
        out[mode] = {"ratio_per_round": ratios, "ratio_median": float(np.median(ratios))}
        print(f"[{mode:8s}] rpo_jax / TRL per round: {', '.join(f'{x:.2f}×' for x in ratios)} (median "
              f"{out[mode]['ratio_median']:.2f}×, range {min(ratios):.2f}–{max(ratios):.2f}×)")
    return out


def lora_modes(args) -> list[tuple[str, int, str]]:
    """(label, rank, base dtype) of every mode `--lora` compares: rank 0 = full fine-tuning."""
    ranks = [int(r) for r in args.lora.split(",") if r.strip()]
    bases = [d for d in args.qlora.split(",") if d.strip()]
    return ([("full", 0, "")] + [(f"lora r{r}", r, "") for r in ranks]
            + [(f"qlora {d} r{ranks[0]}", ranks[0], d) for d in bases])


def step_memory(compiled) -> dict[str, int]:
    """Bytes XLA's buffer assignment gives one compiled step: arguments (state, batch, frozen base), outputs,
    temporaries; peak = arguments + outputs + temporaries − donated (aliased) outputs."""
    m = compiled.memory_analysis()
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    return {"arguments": m.argument_size_in_bytes, "temporaries": m.temp_size_in_bytes, "peak": peak}


def compare_lora(args, model, config, dtype):
    """Full fine-tuning vs LoRA vs QLoRA on one machine in one run (`--lora 8,64`): each mode's train step (the
    trainer's, `make_train_step`, DPO-family loss with an in-step reference: for full fine-tuning a frozen copy of
    the initial weights, for (Q)LoRA the policy's own base with the adapters off, `adapters_off_graphdef`), the
    frozen base an argument of the program (`WithFrozen`), one step of each mode per round. Memory per mode: XLA's
    buffer assignment of the compiled step (`step_memory`: the live bytes of one step, state and base included),
    exact and independent of the other modes in the process; the process's peak (RSS on CPU) is printed once."""
    from rpo_jax.models.lora import LoraConfig, attach_lora
    from rpo_jax.models.quantize import parameter_bytes, quantize_base
    from rpo_jax.train.build.model import adapters_off_graphdef
    from rpo_jax.train.step.steps import WithFrozen

    loss_fn = make_loss(args.loss)
    if not loss_fn.requires_reference:
        raise SystemExit(f"--lora compares modes with an in-step reference; --loss {args.loss} needs none")
    tx, _ = make_optimizer({"name": "adamw", "learning_rate": 1e-6, "schedule": "constant"}, 100)
    batch = synthetic_batch(np.random.default_rng(0), args.batch, args.k, args.prompt_len, args.response_len,
                            config.vocab_size)
    t = args.prompt_len + args.response_len
    tokens_per_step = args.batch * args.k * t
    window = resolve_score_window(args.score_window, args.response_len)
    window = None if window is not None and window >= t - 1 else window
    chunk = args.vocab_chunk or None
    print(f"device: {jax.devices()[0].device_kind}, compute {jnp.dtype(dtype).name}, model "
          f"{args.model or 'random SmolLM2-135M shape'} ({config.num_params() / 1e6:.1f} M params), batch "
          f"{args.batch}×K={args.k}×T={t} = {tokens_per_step} tokens/step, loss {args.loss}, in-step reference, "
          f"remat {args.remat}")
    runs = {}
    for label, rank, base in lora_modes(args):
        m = nnx.clone(model)  # shares the arrays with `model`: the trained ones are copied below (donated)
        if base:
            quantize_base(m, base)
        if rank:
            attach_lora(m, LoraConfig(rank=rank, alpha=2.0 * rank), rngs=nnx.Rngs(1))
        graphdef, params, rest = split_trainable(m)
        if rank:  # the base with the adapters off: the policy's own parameters and rest (None)
            ref_graphdefs, ref_params = ((adapters_off_graphdef(graphdef, params, rest), None),), (None,)
        else:  # a frozen copy of the initial policy, as rpo-train keeps it
            ref_graphdefs, ref_params = ((graphdef, rest),), (jax.tree.map(jnp.copy, params),)
        step = WithFrozen(jax.jit(make_train_step(graphdef, rest, loss_fn, tx, compute_dtype=dtype,
                                                  vocab_chunk_size=chunk, ref_graphdefs=ref_graphdefs,
                                                  score_window=window), donate_argnums=(0,)), rest)
        state = {"params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params),
                 "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
        b = {k: jnp.asarray(v) for k, v in batch.items()}
        memory = step_memory(step.lower(state, b, ref_params).compile())
        stored = parameter_bytes(m)
        trained = sum(x.size for x in jax.tree.leaves(params))
        runs[label] = r = {"step": step, "state": state, "batch": b, "ref_params": ref_params, "times": [],
                           "memory": memory, "base_bytes": stored["total"], "trained_params": trained}
        for _ in range(args.warmup):
            r["state"], r["metrics"] = step(r["state"], b, ref_params)
        jax.block_until_ready(r["state"])
    for _ in range(args.steps):  # one step of each mode per round
        for r in runs.values():
            t0 = time.perf_counter()
            r["state"], r["metrics"] = r["step"](r["state"], r["batch"], r["ref_params"])
            jax.block_until_ready(r["metrics"])
            r["times"].append(time.perf_counter() - t0)
    full = runs["full"]["memory"]["peak"]
    results = {}
    print(f"{'mode':18s} {'trained params':>15s} {'base (MiB)':>11s} {'step peak (MiB)':>16s} {'vs full':>8s} "
          f"{'tokens/s':>9s}")
    for label, r in runs.items():
        step_time = float(np.median(r["times"]))
        res = results[label] = {"trained_params": r["trained_params"], "base_mib": r["base_bytes"] / 2**20,
                                "step_peak_mib": r["memory"]["peak"] / 2**20,
                                "step_temporaries_mib": r["memory"]["temporaries"] / 2**20,
                                "peak_vs_full": r["memory"]["peak"] / full, "step_time_s": step_time,
                                "tokens_per_s": tokens_per_step / step_time, "loss": float(r["metrics"]["loss"])}
        print(f"{label:18s} {res['trained_params']:15,d} {res['base_mib']:11.1f} {res['step_peak_mib']:16.1f} "
              f"{res['peak_vs_full']:8.2f} {res['tokens_per_s']:9.1f}")
    stats = jax.devices()[0].memory_stats() or {}
    memory, where = ((stats["peak_bytes_in_use"] / 2**30, "device") if "peak_bytes_in_use" in stats
                     else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "RSS"))
    print(f"step peak: XLA's buffer assignment of each compiled step (arguments + outputs + temporaries - donated); "
          f"base: the stored weights other than adapters (parameter_bytes; int4 counted packed, 4 bits); "
          f"tokens/s: median of {args.steps} steps; process peak memory {memory:.2f} GiB ({where}, all modes together)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
