"""Peak memory of `sequence_logps` (value, and value + gradient) chunked vs unchunked over the vocabulary.

Usage:  python benchmarks/logprobs_memory.py [--vocab 128256] [--seq 1024] [--hidden 64] [--chunks 0,4096,16384]
        [--rss]

Model: a 1-layer Llama with a Llama-3 sized vocabulary and a small hidden size, N = 1 sequence of T tokens, all
scored. Memory is XLA's compiled buffer plan (`jax.jit(f).lower(...).compile().memory_analysis()`): temporaries
(temp), plus arguments and outputs. With --rss each case also runs in a fresh process and reports its peak
resident set size (includes the Python/JAX runtime, about 0.5 GB). Chunk 0 = unchunked (the [N,T,V] float32 logits).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

GIB = 1024**3


def build(vocab: int, seq: int, hidden: int):
    import jax.numpy as jnp
    from flax import nnx

    from rpo_jax.models import ModelConfig, create_model

    config = ModelConfig(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=1,
        num_heads=4,
        num_kv_heads=4,
        head_dim=hidden // 4,
    )
    model = create_model(config, rngs=nnx.Rngs(0))
    tokens = (jnp.arange(seq, dtype=jnp.int32)[None] * 7919) % vocab
    mask = jnp.ones((1, seq), bool)
    return model, tokens, mask


def functions(chunk: int | None):
    from flax import nnx

    from rpo_jax.models import sequence_logps

    def value(model, tokens, mask):
        return sequence_logps(model, tokens, mask, vocab_chunk_size=chunk)[0].sum()

    return {"value": nnx.jit(value), "value+grad": nnx.jit(nnx.value_and_grad(value))}


def analyse(vocab: int, seq: int, hidden: int, chunk: int | None) -> dict[str, dict[str, float]]:
    model, tokens, mask = build(vocab, seq, hidden)
    out = {}
    for name, fn in functions(chunk).items():
        m = fn.lower(model, tokens, mask).compile().memory_analysis()
        out[name] = {
            "temp_GiB": m.temp_size_in_bytes / GIB,
            "args_GiB": m.argument_size_in_bytes / GIB,
            "out_GiB": m.output_size_in_bytes / GIB,
        }
    return out


def run_for_rss(vocab: int, seq: int, hidden: int, chunk: int | None, which: str) -> float:
    model, tokens, mask = build(vocab, seq, hidden)
    result = functions(chunk)[which](model, tokens, mask)
    import jax

    jax.block_until_ready(result)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--chunks", default="0,4096,16384")
    p.add_argument("--rss", action="store_true")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._child:
        chunk, which = a._child.split(":")
        print(json.dumps(run_for_rss(a.vocab, a.seq, a.hidden, int(chunk) or None, which)))
        return
    import jax

    print(f"sequence_logps memory, V={a.vocab}, T={a.seq}, N=1, hidden={a.hidden}, backend={jax.default_backend()}")
    print(f"[N,T,V] float32 logits alone = {a.seq * a.vocab * 4 / GIB:.3f} GiB")
    header = f"{'chunk':>8} {'pass':>11} {'temp GiB':>9} {'args GiB':>9} {'out GiB':>8}"
    print(header + (f" {'peak RSS GiB':>13}" if a.rss else ""))
    for chunk in [int(c) for c in a.chunks.split(",")]:
        stats = analyse(a.vocab, a.seq, a.hidden, chunk or None)
        for which, s in stats.items():
            line = f"{chunk or 'none':>8} {which:>11} {s['temp_GiB']:9.3f} {s['args_GiB']:9.3f} {s['out_GiB']:8.3f}"
            if a.rss:
                cmd = [
                    sys.executable,
                    __file__,
                    "--vocab",
                    str(a.vocab),
                    "--seq",
                    str(a.seq),
                    "--hidden",
                    str(a.hidden),
                    "--_child",
                    f"{chunk}:{which}",
                ]
                rss = json.loads(
                    subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                )
                line += f" {rss:13.3f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
