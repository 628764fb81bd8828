"""Train-step throughput: tokens/s, step time, MFU against the measured matmul peak, and peak memory.

    python benchmarks/train_step.py --model ~/.cache/rpo_jax/smollm2-135m-instruct \
        --batch 4 --k 2 --prompt-len 64 --response-len 64 --loss dpo --reference both

`--reference in_step` scores the frozen reference inside the step (what TRL's DPOTrainer does by default);
`cached` feeds precomputed reference log-probs (rpo_jax's reference cache); `both` runs the two, alternating one
step of each so both see the same machine (a shared 2-core VM drifts by tens of percent over minutes), and prints the
speed-up. The step is the trainer's (`rpo_jax.train.step.make_train_step`), with the output head on the response
positions only (`--score-window auto`, the trainer's default `config.model.score_window`: 64 of the 127 logit
positions for 64 + 64 tokens; `0` puts it on every position). FLOPs per token follow
`rpo_jax.train.performance.train_flops_per_token`: 6·P' + 12·L·T·d plus 2·P' + 4·L·T·d per in-step reference, P' the
non-embedding parameters, plus the output head 6·V·D (2·V·D per reference) × the fraction of positions where it
runs. The peak is a 4096² matmul in the compute dtype, measured before the steps and after every round of steps;
MFU is against the highest of these (a ceiling, so MFU errs low); also printed, the median over rounds of each
step's MFU against the higher of the two samples taken just before and after it (same machine state). Peak
memory is the process's (device peak, or the peak RSS on CPU) over everything run; run one `--reference` mode
alone for that mode's. On the CPU the script first calls `rpo_jax.train.host.reuse_cpu_step_memory`, as
`rpo-train` does, so XLA:CPU's per-step temporary buffer stays mapped between steps; `--cpu-memory fresh` leaves
JAX's defaults (a fresh mapping faulted in every step) for comparison; the minor page faults and kernel time of
each step (getrusage, median over steps) are printed with it.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rpo_jax.losses import make_loss
from rpo_jax.models import ModelConfig, create_model, load_hf
from rpo_jax.train.host import reuse_cpu_step_memory
from rpo_jax.train.optim import make_optimizer
from rpo_jax.train.performance import measure_matmul_peak, train_flops_per_token
from rpo_jax.train.setup import split_trainable
from rpo_jax.train.step import make_train_step, resolve_score_window, response_logps

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
                   help="reuse: rpo_jax.train.host.reuse_cpu_step_memory (rpo-train's default); fresh: JAX's defaults")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    reused = args.cpu_memory == "reuse" and reuse_cpu_step_memory()  # before the first computation

    platform = jax.devices()[0].platform
    dtype = (jnp.float32 if platform == "cpu" else jnp.bfloat16) if args.dtype == "auto" else jnp.dtype(args.dtype)
    if args.model:
        model, config = load_hf(args.model, dtype=dtype, param_dtype=jnp.float32, remat=args.remat,
                                scan_unroll=args.scan_unroll)
    else:
        config = ModelConfig.from_hf_dict(TINY, remat=args.remat, scan_unroll=args.scan_unroll)
        model = create_model(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32)
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
    for _ in range(args.steps):  # one step of each mode per round, then a peak sample
        for mode, r in runs.items():
            u0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            r["state"], r["metrics"] = r["step"](r["state"], r["batch"], r["ref_params"])
            jax.block_until_ready(r["metrics"])
            u1 = resource.getrusage(resource.RUSAGE_SELF)
            r["times"].append(time.perf_counter() - t0)
            r["faults"].append(u1.ru_minflt - u0.ru_minflt)
            r["kernel_s"].append(u1.ru_stime - u0.ru_stime)
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
    print(json.dumps(results))


if __name__ == "__main__":
    main()
