"""Train-step throughput: tokens/s, step time, MFU against the measured matmul peak, and peak memory.

    python benchmarks/train_step.py --model ~/.cache/rpo_jax/smollm2-135m-instruct \
        --batch 4 --k 2 --prompt-len 64 --response-len 64 --loss dpo --reference both

`--reference in_step` scores the frozen reference inside the step (what TRL's DPOTrainer does by default);
`cached` feeds precomputed reference log-probs (rpo_jax's reference cache); `both` runs the two and prints
the speed-up. FLOPs per token follow rpo_jax.train.metrics (6·P + 12·L·T·d, plus 2·P + 4·L·T·d per in-step
reference), counting the output head only over the positions where it is computed. By default the step is the
trainer's: the head runs on every position (`--score-window 0`). Two opt-in speed paths that the trainer does not
use yet: `--score-window auto` runs the head and its log-softmax on the response positions only
(`rpo_jax.train.step.score_window_for`: 64 of the 127 logit positions for 64 + 64 tokens; counted there only,
`rpo_jax.train.step.train_flops_per_token`), and `RPO_JAX_HUGEPAGE_MALLOC=1` restarts the script once with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages for malloc on Linux/glibc ≥ 2.35, see
`rpo_jax.train.step.reexec_with_hugepage_malloc`). The peak is a large matmul in the compute dtype, measured in
the same run.
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
from rpo_jax.train.metrics import measure_matmul_peak
from rpo_jax.train.optim import make_optimizer
from rpo_jax.train.step import (
    make_train_step,
    reexec_with_hugepage_malloc,
    response_logps,
    score_window_for,
    train_flops_per_token,
)

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
    p.add_argument("--score-window", default="0",
                   help="logit positions per response given to the output head: auto (from the loss mask), "
                        "0 (all positions), or a number")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)

    platform = jax.devices()[0].platform
    dtype = (jnp.float32 if platform == "cpu" else jnp.bfloat16) if args.dtype == "auto" else jnp.dtype(args.dtype)
    if args.model:
        model, config = load_hf(args.model, dtype=dtype, param_dtype=jnp.float32, remat=args.remat,
                                scan_unroll=args.scan_unroll)
    else:
        config = ModelConfig.from_hf_dict(TINY, remat=args.remat, scan_unroll=args.scan_unroll)
        model = create_model(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = make_loss(args.loss)
    tx, _ = make_optimizer({"name": "adamw", "learning_rate": 1e-6, "schedule": "constant"}, 100)
    batch = synthetic_batch(np.random.default_rng(0), args.batch, args.k, args.prompt_len, args.response_len,
                            config.vocab_size)
    t = args.prompt_len + args.response_len
    tokens_per_step = args.batch * args.k * t
    peaks = [measure_matmul_peak(dtype)]  # measured again after the steps; MFU uses the higher (a ceiling)
    chunk = args.vocab_chunk or None
    window = (score_window_for(batch["loss_mask"]) if args.score_window == "auto"
              else int(args.score_window) or None)
    print(f"device: {jax.devices()[0].device_kind} ({platform}), compute {jnp.dtype(dtype).name}, "
          f"matmul peak before the steps {peaks[0] / 1e9:.1f} GFLOP/s")
    print(f"malloc: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    print(f"model: {args.model or 'random SmolLM2-135M shape'} ({config.num_params() / 1e6:.1f} M params), "
          f"batch {args.batch}×K={args.k}×T={t} = {tokens_per_step} tokens/step, loss {args.loss}, remat {args.remat}, "
          f"scan_unroll {args.scan_unroll}, output head on {window or t - 1} of {t - 1} logit positions")

    modes = ["in_step", "cached"] if args.reference == "both" else [args.reference]
    results = {}
    for mode in modes:
        state = {"params": jax.tree.map(jnp.copy, params), "opt_state": tx.init(params),
                 "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(0))}
        b = {k: jnp.asarray(v) for k, v in batch.items()}
        ref_params = ()
        ref_graphdefs = ()
        if mode == "cached":
            b["ref_logps"] = jax.jit(lambda p, x: response_logps(graphdef, p, rest, x, compute_dtype=dtype,
                                                                   vocab_chunk_size=chunk, score_window=window))(params, b)
        else:
            ref_params, ref_graphdefs = (params,), ((graphdef, rest),)
            if not loss_fn.requires_reference:
                ref_params, ref_graphdefs = (), ()
        step = jax.jit(make_train_step(graphdef, rest, loss_fn, tx, compute_dtype=dtype, vocab_chunk_size=chunk,
                                       ref_graphdefs=ref_graphdefs, score_window=window), donate_argnums=(0,))
        for _ in range(args.warmup):
            state, metrics = step(state, b, ref_params)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, metrics = step(state, b, ref_params)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        step_time = float(np.median(times))
        n_refs = 1 if ref_params else 0
        flops = tokens_per_step * train_flops_per_token(config, t, num_references=n_refs, score_window=window)
        stats = jax.devices()[0].memory_stats() or {}
        memory = (stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        results[mode] = {"step_time_s": step_time, "tokens_per_s": tokens_per_step / step_time,
                         "tflops_per_step": flops / 1e12, "peak_memory_gib": memory, "loss": float(metrics["loss"])}
        where = "device" if "peak_bytes_in_use" in stats else "RSS"
    peaks.append(measure_matmul_peak(dtype))
    peak = max(peaks)
    print(f"matmul peak after the steps {peaks[1] / 1e9:.1f} GFLOP/s; MFU below is against {peak / 1e9:.1f}")
    for mode, r in results.items():
        r["mfu"] = r["tflops_per_step"] * 1e12 / r["step_time_s"] / peak
        r["peak_flops"] = peak
        print(f"[{mode:8s}] step {r['step_time_s']:.3f} s (median of {args.steps}), {r['tokens_per_s']:.1f} tokens/s, "
              f"MFU {100 * r['mfu']:.1f}% of the measured peak, {r['tflops_per_step']:.3f} TFLOP/step, "
              f"peak memory {r['peak_memory_gib']:.2f} GiB ({where})")
    if len(results) == 2:
        print(f"cached vs in-step: {results['in_step']['step_time_s'] / results['cached']['step_time_s']:.2f}× faster steps")
    print(json.dumps(results))


if __name__ == "__main__":
    if os.environ.get("RPO_JAX_HUGEPAGE_MALLOC") == "1":  # opt-in: the trainer does not do this (yet)
        reexec_with_hugepage_malloc()
    main()
