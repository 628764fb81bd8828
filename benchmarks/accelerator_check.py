"""Accelerator check: the fused attention kernels against XLA, and a 1B-class DPO train step with packing off and
on — tokens/s, MFU, peak memory — through the one program builder, in a few minutes, ending with one JSON line.

    python benchmarks/accelerator_check.py               # on a GPU or TPU (under 5 minutes)
    python benchmarks/accelerator_check.py --reduced     # tiny model, short rows, 1 step (automatic on a CPU)
    python benchmarks/accelerator_check.py --config.data.batch_size=16 --prompt-len 1024 --response-len 1024

(a) Attention. Every implementation of `rpo_jax.models.attention` (`ATTENTION_IMPLEMENTATIONS`: "cudnn" on an
NVIDIA GPU, "splash" on a TPU, "blockwise" everywhere) against "xla", in float32 and bfloat16, on a causal row
and on rows with padding and packed segments: the outputs and the gradients of q, k and v (a random cotangent on
the real query rows), as max |Δ| and max |Δ| ÷ max |xla|. A kernel the backend cannot run (`unsupported_reason`:
cuDNN off NVIDIA GPUs or in float32, splash off TPUs) is reported as skipped with the reason, not failed. Then
the same through the builder: a small decoder's run per implementation (`config.model.attention`, the same
initial weights), its per-response log-probs and their gradient (`response_logps`, the function the train step
differentiates), and the metrics of one train step (`jitted_steps`, as the trainer runs it) — each against XLA's.

(b) Train step. The recipe (default benchmarks/configs/llama3_2_1b_shape.py: Llama-3.2-1B's shape, random
weights, bfloat16 compute, DPO, remat full, the reference log-probs cached as the trainer does by default) on a
synthetic file of `config.data.batch_size` records of `--k` responses, prompts of `--prompt-len` / 4 to
`--prompt-len` tokens and responses of `--response-len` / 4 to `--response-len` (uniform), once with
`data.packing=False` (padded [B, K, T]) and once with `data.packing=True` (packed rows, shared prompts): each its
own run (`build_run`), its train step from `jitted_steps`, compiled once, `--warmup` untimed and `--steps` timed
steps on the same batch. Printed per mode: real tokens/s (prompt + response tokens of the batch), MFU =
FLOPs per step (`rpo_jax.train.runtime.performance.batch_flops`: `train_flops_per_token` × the slots the step
computes) ÷ (step time × peak FLOP/s per chip × chips), the peak from `config.metrics.peak_flops` when set, else
the table `PEAK_FLOPS` for the device (dense bfloat16), else `measure_matmul_peak`; memory: XLA's buffer
assignment of the compiled step (arguments + outputs + temporaries − donated) and the device's
`peak_bytes_in_use` so far (where the backend reports it).

`--reduced` (the default on a CPU): attention rows of 256 tokens in float32 only, the decoder comparison without
its train step (the train part runs the builder's step), the train step's model a tiny Llama (float32 on the
CPU), 2 records with prompts and responses of up to 16 tokens, 1 timed step — well under a minute of CPU time,
so the test suite runs it (tests/benchmarks). Every `--config.KEY=VALUE` override applies on top (in reduced
mode too). `--skip attention,decoder,train` leaves parts out.
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import tempfile
import time

import common
import jax
import jax.numpy as jnp
import numpy as np

#: Dense bfloat16 peak FLOP/s per chip, matched in order against `device_kind` (case-insensitive substrings).
PEAK_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("h800", 989e12),
    ("gh200", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("l4", 121e12),
    ("a10g", 125e12),
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v6", 918e12),
    ("tpu v4", 275e12),
)

#: The model of the reduced check and of the decoder comparison on a CPU.
TINY = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 512,
}
#: The decoder comparison's model on an accelerator.
SMALL = {
    **TINY,
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 2048,
}


def peak_of(device) -> float | None:
    """The table's dense bfloat16 peak FLOP/s of `device` (None: not in `PEAK_FLOPS`)."""
    kind = device.device_kind.lower()
    return next((flops for name, flops in PEAK_FLOPS if name in kind), None)


def implementations() -> list[str]:
    """The attention implementations compared with "xla" (every resolved one the package has)."""
    from rpo_jax.models.attention import IMPLEMENTATIONS

    return [name for name in IMPLEMENTATIONS if name not in ("auto", "xla")]


def differences(got, want, where=None) -> tuple[float, float]:
    """(max |got − want|, that ÷ max |want|) over the leaves of two pytrees (rows `where` only, when given)."""
    worst, scale = 0.0, 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if where is not None:
            g, w = g[where], w[where]
        worst = max(worst, float(np.max(np.abs(g - w), initial=0.0)))
        scale = max(scale, float(np.max(np.abs(w), initial=0.0)))
    return worst, worst / scale if scale else worst


# ------------------------------------------------------------------------------------------------ (a) attention
def attention_cases(n: int, t: int):
    """name → `MaskSpec` of the rows compared: causal only, and padding + two packed segments per row."""
    from rpo_jax.models.attention import MaskSpec

    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (n, t))
    valid = jnp.arange(t)[None, :] < jnp.array([t, 3 * t // 4])[:n, None]
    half = t // 2
    segments = jnp.broadcast_to((jnp.arange(t) >= half).astype(jnp.int32), (n, t))
    seg_positions = jnp.where(jnp.arange(t) >= half, jnp.arange(t) - half, jnp.arange(t)).astype(jnp.int32)
    return {
        "causal": MaskSpec(positions),
        "padded_segments": MaskSpec(jnp.broadcast_to(seg_positions, (n, t)), valid, segments),
    }


def check_attention(reduced: bool) -> dict:
    """`rpo_jax.models.attention.attend` of every implementation against "xla": outputs and q/k/v gradients."""
    from rpo_jax.models import attention

    backend = jax.default_backend()
    n, t, h, kv, hd = (2, 256, 4, 2, 16) if reduced else (2, 2048, 16, 4, 64)
    keys = jax.random.split(jax.random.key(0), 4)
    q32 = jax.random.normal(keys[0], (n, t, h, hd), jnp.float32)
    k32 = jax.random.normal(keys[1], (n, t, kv, hd), jnp.float32)
    v32 = jax.random.normal(keys[2], (n, t, kv, hd), jnp.float32)
    ct32 = jax.random.normal(keys[3], (n, t, h, hd), jnp.float32)
    scale = hd**-0.5
    out = {}
    for case, spec in attention_cases(n, t).items():
        rows = np.ones((n, t), bool) if spec.valid is None else np.asarray(spec.valid)
        for dtype in (jnp.float32,) if reduced else (jnp.float32, jnp.bfloat16):
            q, k, v = (x.astype(dtype) for x in (q32, k32, v32))
            ct = (ct32 * rows[:, :, None, None]).astype(dtype)  # padding query rows: no cotangent

            def run(impl, q=q, k=k, v=v, ct=ct, spec=spec):
                f = jax.jit(
                    lambda q_, k_, v_: attention.attend(
                        impl,
                        q_,
                        k_,
                        v_,
                        spec=spec,
                        mask=attention.dense_mask(spec),
                        window=None,
                        scale=scale,
                        softcap=None,
                    )
                )
                y, vjp = jax.vjp(f, q, k, v)
                return jax.device_get((y, vjp(ct)))

            reference = run("xla")
            for impl in implementations():
                name = f"{jnp.dtype(dtype).name}/{case}/{impl}"
                reason = attention.unsupported_reason(
                    impl, backend=backend, dtype=dtype, seq_len=t, has_parents=False, softcap=None, devices=1
                )
                if reason is not None:
                    out[name] = {"skipped": reason}
                    continue
                try:
                    y, grads = run(impl)
                except Exception as e:  # noqa: BLE001 - a kernel that fails here is the finding: report it
                    out[name] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
                    continue
                oa, orel = differences(y, reference[0], where=rows)
                ga, grel = differences(grads, reference[1])
                out[name] = {"out_abs": oa, "out_rel": orel, "grad_abs": ga, "grad_rel": grel}
    return {"shape": {"N": n, "T": t, "H": h, "K": kv, "head_dim": hd}, "results": out}


def check_decoder(cfg, tmp: pathlib.Path, reduced: bool, devices) -> dict:
    """A small decoder's run per attention implementation through the builder (`build_run`, `jitted_steps`):
    per-response log-probs and their gradient, and one train step's metrics, each against XLA's run."""
    from rpo_jax.models.attention import unsupported_reason
    from rpo_jax.train.build.state import compute_dtype
    from rpo_jax.train.step.logprobs import response_logps

    p, r = (16, 16) if reduced else (64, 64)
    data = common.uniform_file(tmp / "decoder", 2, 2, p, r)
    small = TINY if reduced or jax.default_backend() == "cpu" else SMALL
    base = common.with_overrides(
        cfg,
        {
            "model.path": "",
            "model.architecture": None,
            "model.init": dict(small),
            "model.vocab_chunk_size": 0,
            "model.remat": "none",
            "data.batch_size": 2,
            "data.micro_batches": 1,
            "data.packing": False,
            "data.share_prompt": False,
            "reference_mode": "in_step",
            "loss.name": "dpo",
            "loss.hparams": {"beta": 0.1},
        },
    )
    base = common.synthetic_config(base, data, max_length=p + r, max_prompt_length=p)
    out, reference = {}, None
    for impl in ["xla", *implementations()]:
        cfg_i = common.with_overrides(base, {"model.attention": impl})
        dtype = compute_dtype(cfg_i.model.dtype)
        reason = unsupported_reason(
            impl,
            backend=jax.default_backend(),
            dtype=dtype,
            seq_len=p + r,
            has_parents=False,
            softcap=None,
            devices=len(devices),
        )
        if reason is not None:
            out[impl] = {"skipped": reason}
            continue
        try:
            run = common.build_benchmark_run(cfg_i, tmp / f"decoder_{impl}", devices=devices)
            inputs, refs = common.step_arguments(run, common.host_batch(run))

            def total(params, run=run, inputs=inputs):
                logps = response_logps(
                    run.graphdef, params, run.rest, inputs, compute_dtype=run.dtype, score_window=run.score_window
                )
                return jnp.sum(logps), logps

            grads, logps = jax.device_get(jax.jit(jax.grad(total, has_aux=True))(run.state["params"]))
            figures = {"logps": logps, "grads": grads}
            if not reduced:  # (reduced: the train part below runs the builder's step)
                train_step, _ = common.trainer_steps(run)
                _, metrics = train_step(run.state, inputs, refs)
                figures["metrics"] = {k: float(metrics[k]) for k in ("loss", "grad_norm")}
        except Exception as e:  # noqa: BLE001 - reported, not fatal: the other implementations still run
            out[impl] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
            continue
        if impl == "xla":
            reference = figures
            out[impl] = {"dtype": jnp.dtype(dtype).name, **figures.get("metrics", {})}
            continue
        if reference is None:
            out[impl] = {"error": "no XLA run to compare with"}
            continue
        la, lrel = differences(figures["logps"], reference["logps"])
        ga, grel = differences(figures["grads"], reference["grads"])
        metrics = {
            f"{k}_rel": abs(v - reference["metrics"][k]) / max(abs(reference["metrics"][k]), 1e-30)
            for k, v in figures.get("metrics", {}).items()
        }
        out[impl] = {
            "dtype": jnp.dtype(dtype).name,
            "logps_abs": la,
            "logps_rel": lrel,
            "grad_abs": ga,
            "grad_rel": grel,
            **metrics,
        }
    return {
        "model": {k: small[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")},
        "tokens": [2, 2, p + r],
        "results": out,
    }


# ------------------------------------------------------------------------------------------------ (b) train step
def varied_file(directory: pathlib.Path, n: int, k: int, prompt_len: int, response_len: int, seed: int = 0):
    """`n` records of K responses, prompt tokens uniform in [prompt_len/4, prompt_len], each response's in
    [response_len/4, response_len] (the longest at the maximum, so the padded rows are prompt + response)."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(max(2, prompt_len // 4), prompt_len + 1, n)
    responses = rng.integers(max(2, response_len // 4), response_len + 1, (n, k))
    prompts[0], responses[0, 0] = prompt_len, response_len
    return common.write_synthetic(
        pathlib.Path(directory) / "varied.jsonl", prompts.tolist(), responses.tolist(), seed=seed
    )


def check_train(cfg, args, tmp: pathlib.Path, devices) -> tuple[dict, dict]:
    """(per mode: tokens/s, MFU, memory; the peak used) of the train step with packing off and on."""
    from rpo_jax.data import real_tokens
    from rpo_jax.train.runtime.performance import measure_matmul_peak

    data = varied_file(tmp / "train", cfg.data.batch_size, args.k, args.prompt_len, args.response_len)
    cfg = common.synthetic_config(
        cfg, data, max_length=args.prompt_len + args.response_len, max_prompt_length=args.prompt_len
    )
    chips = len(devices)
    peak, source = None, ""
    results = {}
    for label, packing in (("packing off", False), ("packing on", True)):
        t0 = time.perf_counter()
        run = common.build_benchmark_run(
            common.with_overrides(cfg, {"data.packing": packing}), tmp / label.replace(" ", "_"), devices=devices
        )
        host = common.host_batch(run)
        inputs, refs = common.step_arguments(run, host)
        train_step, _ = common.trainer_steps(run)
        step = common.CompiledStep(train_step, run.state, inputs, refs)
        setup_s = time.perf_counter() - t0
        if peak is None:
            if cfg.metrics.peak_flops:
                peak, source = float(cfg.metrics.peak_flops), "config.metrics.peak_flops"
            elif peak_of(devices[0]) and jnp.dtype(run.dtype) == jnp.bfloat16:
                peak, source = peak_of(devices[0]), f"table (dense bfloat16, {devices[0].device_kind})"
            else:
                n = 1024 if args.reduced else None
                peak = measure_matmul_peak(run.dtype, n=n, repeats=2 if args.reduced else 5)
                source = f"measured ({jnp.dtype(run.dtype).name} matmul)"
        state = run.state
        for _ in range(args.warmup):
            state, metrics = step(state, inputs, refs)
        jax.block_until_ready(state)
        times = []
        for _ in range(args.steps):
            t1 = time.perf_counter()
            state, metrics = step(state, inputs, refs)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t1)
        step_s = float(np.median(times))
        flops = common.step_flops(run, inputs)
        tokens = real_tokens(host)
        stats = devices[0].memory_stats() or {}
        memory = step.memory()
        results[label] = {
            "layout": common.layout_text(inputs),
            "step_s": step_s,
            "tokens_per_step": tokens,
            "tokens_per_s": tokens / step_s,
            "tflops_per_step": flops / 1e12,
            "mfu": flops / (step_s * peak * chips),
            "step_memory_gib": memory["peak"] / 2**30,
            "step_temporaries_gib": memory["temporaries"] / 2**30,
            "device_peak_gib": stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
            "loss": float(metrics["loss"]),
            "setup_s": setup_s,
        }
        r = results[label]
        print(
            f"[{label}] {r['layout']}: step {step_s * 1e3:.1f} ms (median of {args.steps}), "
            f"{r['tokens_per_s']:,.0f} tokens/s, {r['tflops_per_step']:.3f} TFLOP/step, MFU {100 * r['mfu']:.1f}%, "
            f"step program {r['step_memory_gib']:.2f} GiB"
            + (f", device peak so far {r['device_peak_gib']:.2f} GiB" if r["device_peak_gib"] is not None else "")
            + f" (set-up and compile {setup_s:.0f} s)",
            flush=True,
        )
        del run, state, step, inputs, refs, train_step
        gc.collect()  # the next mode's run fits beside nothing of this one
    if "packing off" in results and "packing on" in results:
        off, on = results["packing off"], results["packing on"]
        print(
            f"packing on vs off: {on['tokens_per_s'] / off['tokens_per_s']:.2f}× tokens/s, "
            f"{on['tflops_per_step'] / off['tflops_per_step']:.2f}× FLOPs per step"
        )
    return results, {"peak_flops_per_chip": peak, "peak_source": source, "chips": chips}


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--reduced",
        action="store_true",
        help="tiny model, short rows, 1 step (automatic on a CPU): seconds, for the test suite",
    )
    p.add_argument("--k", type=int, default=2, help="responses per record of the train step's synthetic file")
    p.add_argument("--prompt-len", type=int, default=None, help="longest prompt, tokens (default 512; reduced 16)")
    p.add_argument("--response-len", type=int, default=None, help="longest response, tokens (default 512; reduced 16)")
    p.add_argument("--steps", type=int, default=None, help="timed train steps per mode (default 3; reduced 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed train steps per mode")
    p.add_argument("--devices", type=int, default=1, help="devices of the train step's mesh (0: all local devices)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: attention, decoder, train")
    args, cfg, given = common.parse_args(p, argv, common.LLAMA_1B_SHAPE)
    platform = jax.default_backend()
    args.reduced = args.reduced or platform == "cpu"
    args.prompt_len = args.prompt_len or (16 if args.reduced else 512)
    args.response_len = args.response_len or (16 if args.reduced else 512)
    args.steps = args.steps or (1 if args.reduced else 3)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.reduced:  # the tiny version, under the command line's own overrides
        reduced = {
            "model.path": "",
            "model.architecture": None,
            "model.init": dict(TINY),
            "model.dtype": "auto",
            "model.remat": "none",
            "model.vocab_chunk_size": 0,
            "data.batch_size": 2,
            "data.micro_batches": 1,
            "data.eval_batch_size": 2,
        }
        cfg = common.with_overrides(cfg, {k: v for k, v in reduced.items() if k not in given})
    try:
        common.reject_synthetic_overrides(given)
    except ValueError as e:
        p.error(str(e))
    devices = common.devices_of(args.devices)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="accelerator_check_"))
    t0 = time.perf_counter()
    device = devices[0]
    print(
        f"device: {device.device_kind} ({platform}), {len(jax.devices())} device(s), reduced={args.reduced}; "
        f"config {common.display(args.config)}" + (f" with {given}" if given else ""),
        flush=True,
    )
    report = {
        "device": device.device_kind,
        "platform": platform,
        "reduced": bool(args.reduced),
        "config": common.display(args.config),
        "overrides": {k: str(v) for k, v in given.items()},
    }

    seconds = report["seconds"] = {}
    if "attention" not in skip:
        report["attention"] = check_attention(args.reduced)
        seconds["attention"] = time.perf_counter() - t0
        for name, r in report["attention"]["results"].items():
            print(
                f"attention {name}: "
                + (
                    f"skipped ({r['skipped']})"
                    if "skipped" in r
                    else r.get("error")
                    or f"out max|Δ| {r['out_abs']:.2e} (rel {r['out_rel']:.1e}), grad max|Δ| {r['grad_abs']:.2e} "
                    f"(rel {r['grad_rel']:.1e})"
                ),
                flush=True,
            )
    if "decoder" not in skip:
        t1 = time.perf_counter()
        report["decoder"] = check_decoder(cfg, tmp, args.reduced, devices[:1])
        seconds["decoder"] = time.perf_counter() - t1
        for impl, r in report["decoder"]["results"].items():
            if "skipped" in r or "error" in r:
                print(f"decoder {impl}: {'skipped (' + r['skipped'] + ')' if 'skipped' in r else r['error']}")
            elif impl == "xla":
                print(
                    f"decoder xla ({r['dtype']})"
                    + (f": train step loss {r['loss']:.6f}, grad norm {r['grad_norm']:.6f}" if "loss" in r else "")
                )
            else:
                print(
                    f"decoder {impl} ({r['dtype']}) vs xla: log-probs max|Δ| {r['logps_abs']:.2e} (rel "
                    f"{r['logps_rel']:.1e}), their gradient max|Δ| {r['grad_abs']:.2e} (rel {r['grad_rel']:.1e})"
                    + (
                        f", train step loss rel {r['loss_rel']:.1e}, grad norm rel {r['grad_norm_rel']:.1e}"
                        if "loss_rel" in r
                        else ""
                    ),
                    flush=True,
                )
    if "train" not in skip:
        from rpo_jax.train.build.state import build_loss

        print(
            f"train step: {cfg.loss.name}, {cfg.data.batch_size} records × K={args.k}, prompts ≤ {args.prompt_len}, "
            f"responses ≤ {args.response_len} tokens, reference "
            f"{'in the step' if cfg.reference_mode == 'in_step' else 'cached'}"
            f"{'' if build_loss(cfg).spec.requires_reference else ' (none: reference-free loss)'}",
            flush=True,
        )
        t1 = time.perf_counter()
        report["train"], report["mfu"] = check_train(cfg, args, tmp, devices)
        seconds["train"] = time.perf_counter() - t1
        m = report["mfu"]
        report["mfu"]["formula"] = (
            "MFU = batch_flops(model, step input shape) ÷ (step time × peak FLOP/s per chip "
            "× chips); batch_flops = slots × train_flops_per_token (6·P' + 12·L·T·d_attn + "
            "6·V·D·W/T, + 2·P' + 4·L·T·d_attn + 2·V·D·W/T per in-step reference)"
        )
        print(
            f"{m['formula']}; peak {m['peak_flops_per_chip'] / 1e12:.3g} TFLOP/s per chip ({m['peak_source']}), "
            f"{m['chips']} chip(s)"
        )
    seconds["total"] = time.perf_counter() - t0
    print(json.dumps(report, default=float), flush=True)
    return report


if __name__ == "__main__":
    main()
