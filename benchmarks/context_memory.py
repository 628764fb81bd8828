"""Per-device memory of the compiled train step as the context axis grows: one long preference batch split over
1, 2, 4, 8 devices by sequence (ring attention), XLA's memory analysis of each compiled program.

Usage:  python benchmarks/context_memory.py [--contexts 1,2,4,8] [--prompt-len 1024] [--response-len 7168]
        [--k 2] [--config RECIPE] [--config.KEY=VALUE ...]

Each context size C is its own run of the trainer's builder (`common.build_benchmark_run` on the first C CPU
devices, `config.mesh = {data: 1, fsdp: 1, tensor: 1, context: C}`, `trainer_steps`: the program `rpo-train`
runs), compiled ahead of time for the first batch of a synthetic file of `batch_size` records of K responses of
prompt + response tokens (default: one pair of 8,192-token sequences, 16,384 tokens a step). Nothing runs: the
figures are the compiled program's buffer plan (`compiled.memory_analysis()`, per device): temporaries,
arguments (the train state and the batch) and the peak (arguments + outputs + temporaries - donated).
Defaults: SmolLM2-135M's shape with random weights (`benchmarks/configs/smollm2_shape.py`), float32 on CPU,
remat="full", DPO with the reference scored in the step (no cache fill to run first).
Needs XLA_FLAGS=--xla_force_host_platform_device_count=8 on a CPU machine (set here when absent).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

MIB = 2**20


def measure(cfg, context: int, workdir: pathlib.Path) -> dict[str, float]:
    """The compiled train step's memory (MiB per device) for `cfg` with the sequence split over `context` devices."""
    cfg = common.with_overrides(cfg, {"mesh": {"data": 1, "fsdp": 1, "tensor": 1, "context": context}})
    run = common.build_benchmark_run(cfg, workdir / f"context_{context}", devices=common.devices_of(context))
    train_step, _ = common.trainer_steps(run)
    inputs, refs = common.step_arguments(run, common.host_batch(run))
    start = time.perf_counter()
    memory = common.CompiledStep(train_step, run.state, inputs, refs).memory()
    return {
        **{k: v / MIB for k, v in memory.items()},
        "compile_s": time.perf_counter() - start,
        "layout": common.layout_text(inputs),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="1,2,4,8", help="context sizes, comma-separated (each ≤ the devices)")
    p.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens of every record")
    p.add_argument("--response-len", type=int, default=7168, help="response tokens of every response")
    p.add_argument("--k", type=int, default=2, help="responses per record")
    args, cfg, given = common.parse_args(p, argv, common.SMOLLM2_SHAPE)
    common.reject_synthetic_overrides(given)
    defaults = {"model.remat": "full", "data.batch_size": 1, "reference_mode": "in_step", "data.packing": False}
    cfg = common.with_overrides(cfg, {k: v for k, v in defaults.items() if k not in given})
    contexts = [int(c) for c in args.contexts.split(",")]
    length = args.prompt_len + args.response_len
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        rows = int(cfg.data.batch_size)
        data = common.uniform_file(tmp, rows, args.k, args.prompt_len, args.response_len)
        cfg = common.synthetic_config(cfg, data, max_length=length, max_prompt_length=args.prompt_len)
        print(f"# {rows} × {args.k} × {length} tokens a step; model {common.display(args.config)}; per device (MiB)")
        print("context | layout | temporaries | arguments | peak | temporaries / context=1 | compile s")
        base = None
        for context in contexts:
            m = measure(cfg, context, tmp)
            base = base or (m["temporaries"] if context == 1 else None)
            ratio = f"{m['temporaries'] / base:.3f}" if base else "-"
            print(
                f"{context} | {m['layout']} | {m['temporaries']:.1f} | {m['arguments']:.1f} | {m['peak']:.1f} | "
                f"{ratio} | {m['compile_s']:.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
