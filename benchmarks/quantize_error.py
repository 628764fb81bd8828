"""What quantizing the base costs (rpo_jax.models.quantize): weight and logit errors of SmolLM2-135M-Instruct for
int8 / int4, blocks of 64 vs one scale per output channel, and the exact stored bytes of SmolLM2-135M and
Llama-3.1-8B.

    python benchmarks/quantize_error.py --model ~/.cache/rpo_jax/smollm2-135m-instruct

Logits: float32, on two texts (a sentence and a code snippet, 48 tokens each, right-padded) against the float
model: max and mean |Δlogit| over the real tokens, the max |Δ log-prob| and the argmax agreement. Weights: the
relative error ‖ŵ − w‖ / ‖w‖ over all seven projections together. Bytes: `parameter_bytes` (int4 counted packed);
Llama-3.1-8B is built abstractly (`nnx.eval_shape`) from `configs/architectures/llama-3.1-8b-instruct.json`, in
bfloat16 like a 16-bit LoRA base.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rpo_jax.models import ModelConfig, create_model, load_hf
from rpo_jax.models.lora import INPUT_AXES
from rpo_jax.models.quantize import dequantized_weights, parameter_bytes, quantize_base

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower and fine food, and many tourists visit "
    "it every year.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
]
LLAMA_8B = pathlib.Path(__file__).resolve().parents[1] / "configs" / "architectures" / "llama-3.1-8b-instruct.json"
MiB = 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="SmolLM2-135M-Instruct checkpoint directory")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    enc = tok(TEXTS, padding="max_length", max_length=48, truncation=True, return_tensors="np")
    tokens, mask = jnp.asarray(enc["input_ids"], jnp.int32), np.asarray(enc["attention_mask"], bool)
    forward = nnx.jit(lambda m, t, a: m(t, a))
    model, config = load_hf(args.model)
    weights = {n: getattr(model.layers, n)[...] for n in INPUT_AXES}
    reference = np.asarray(forward(model, tokens, jnp.asarray(mask)))
    print(f"SmolLM2-135M float32: {parameter_bytes(model)['total'] / MiB:.1f} MiB stored")
    rows = {}
    for dtype in ("int8", "int4"):
        for block in (64, None):
            quantized = quantize_base(nnx.clone(model), dtype, block_size=block)
            w_hat = dequantized_weights(quantized)
            num = sum(float(jnp.sum((w_hat[n] - w) ** 2)) for n, w in weights.items())
            den = sum(float(jnp.sum(w**2)) for w in weights.values())
            logits = np.asarray(forward(quantized, tokens, jnp.asarray(mask)))
            delta = np.abs(logits - reference)[mask]
            logp = np.asarray(jax.nn.log_softmax(logits))[mask] - np.asarray(jax.nn.log_softmax(reference))[mask]
            row = rows[f"{dtype} {'block 64' if block else 'per channel'}"] = {
                "weight_rel_error": (num / den) ** 0.5,
                "max_abs_dlogit": float(delta.max()),
                "mean_abs_dlogit": float(delta.mean()),
                "max_abs_dlogp": float(np.abs(logp).max()),
                "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1))[mask].mean()),
                "stored_mib": parameter_bytes(quantized)["total"] / MiB,
            }
            print(
                f"{dtype} {'blocks of 64' if block else 'per channel':12s}: weights rel. error "
                f"{row['weight_rel_error']:.4f}; logits max |Δ| {row['max_abs_dlogit']:.3f} mean "
                f"{row['mean_abs_dlogit']:.4f}, max |Δ log p| {row['max_abs_dlogp']:.3f}, argmax agreement "
                f"{row['argmax_agreement']:.3f}; stored {row['stored_mib']:.1f} MiB"
            )
    llama = ModelConfig.from_hf_dict(json.loads(LLAMA_8B.read_text()))
    for dtype in ("", "int8", "int4"):

        def build(dtype=dtype):
            m = create_model(llama, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
            return quantize_base(m, dtype) if dtype else m

        with nnx.use_eager_sharding(False):
            counts = parameter_bytes(nnx.eval_shape(build))
        print(
            f"Llama-3.1-8B {dtype or 'bfloat16'}: quantized projections (codes + scales) "
            f"{(counts['codes'] + counts['scales']) / 2**30:.2f} GiB, float weights {counts['float'] / 2**30:.2f} "
            f"GiB, total {counts['total'] / 2**30:.2f} GiB"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
