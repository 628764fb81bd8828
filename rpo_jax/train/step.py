"""The jit-compiled train and eval steps: policy log-probs → PreferenceLogps → loss → optax update.

The train state is a plain pytree `{"params", "opt_state", "step", "rng"}`; parameters are float32 master
weights, cast to the compute dtype inside the step (mixed precision); log-probs and the loss are float32.
A step takes a global batch (see `rpo_jax.data`: tokens/loss_mask/attention_mask [B,K,T], valid/lengths
[B,K], rewards [B,K] when present, ref_logps [B,K,R] when cached) and accumulates gradients over
`micro_batches` slices inside the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rpo_jax.losses import LossOutput, PreferenceLogps
from rpo_jax.models import sequence_logps

Batch = Mapping[str, jax.Array]


def cast_floating(tree: Any, dtype) -> Any:
    """Cast every floating-point leaf of `tree` to `dtype` (integer leaves untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def response_logps(graphdef: nnx.GraphDef, params: Any, rest: Any, batch: Batch, *, compute_dtype,
                   vocab_chunk_size: int | None = None) -> jax.Array:
    """Σ log π over the response tokens of every response: `[B, K]` float32 (0 on invalid slots)."""
    model = nnx.merge(graphdef, cast_floating(params, compute_dtype), rest)
    tokens = batch["tokens"]
    b, k, t = tokens.shape
    flat = lambda x: x.reshape(b * k, t)  # noqa: E731
    # Empty response slots are all padding: let their first token attend to itself so no softmax row is empty.
    attention_mask = flat(batch["attention_mask"]).at[:, 0].set(True)
    logp, _ = sequence_logps(model, flat(tokens), flat(batch["loss_mask"]), attention_mask=attention_mask,
                             vocab_chunk_size=vocab_chunk_size or None)
    return jnp.where(batch["valid"], logp.reshape(b, k), 0.0)


def preference_inputs(policy_logps: jax.Array, batch: Batch, ref_logps: jax.Array | None) -> PreferenceLogps:
    return PreferenceLogps(policy_logps=policy_logps, ref_logps=ref_logps, lengths=batch["lengths"],
                           rewards=batch.get("rewards"), valid=batch["valid"])


def _split_micro(batch: Batch, micro_batches: int) -> Batch:
    """[B, ...] → [M, B/M, ...], micro-batch m taking rows m, m+M, ... (each device keeps its own rows)."""
    def split(x):
        b = x.shape[0]
        if b % micro_batches:
            raise ValueError(f"batch size {b} is not divisible by data.micro_batches={micro_batches}")
        return x.reshape(b // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, dict(batch))


def make_train_step(graphdef: nnx.GraphDef, rest: Any, loss_fn: Callable[[PreferenceLogps], LossOutput],
                    tx: optax.GradientTransformation, *, compute_dtype, micro_batches: int = 1,
                    vocab_chunk_size: int | None = None, ref_graphdefs: tuple = (), lr_schedule=None):
    """Build `train_step(state, batch, ref_params) -> (state, metrics)` (jit it with donated state).

    `ref_params`: a tuple of R reference parameter pytrees scored in the step (the reference graphdefs are
    `ref_graphdefs`), or `()` when `batch["ref_logps"]` is cached or the loss needs no reference.
    """
    def logps(gd, params, rest_, mb):
        return response_logps(gd, params, rest_, mb, compute_dtype=compute_dtype, vocab_chunk_size=vocab_chunk_size)

    def micro_loss(params, mb, ref_params):
        ref = mb.get("ref_logps")
        if ref_params:
            ref = jnp.stack([jax.lax.stop_gradient(logps(gd, p, r, mb)) for (gd, r), p in zip(ref_graphdefs, ref_params)],
                            axis=-1)
        out = loss_fn(preference_inputs(logps(graphdef, params, rest, mb), mb, ref))
        return out.loss, out.metrics

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, batch, ref_params=()):
        params = state["params"]
        if micro_batches == 1:
            (loss, metrics), grads = grad_fn(params, batch, ref_params)
        else:
            def body(carry, mb):
                g_acc, l_acc = carry
                (l, m), g = grad_fn(params, mb, ref_params)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l), m
            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, loss), metrics = jax.lax.scan(body, (zeros, jnp.float32(0)), _split_micro(batch, micro_batches))
            grads = jax.tree.map(lambda g: g / micro_batches, grads)
            loss = loss / micro_batches
            metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                     "step": state["step"] + 1, "rng": jax.random.fold_in(state["rng"], state["step"])}
        metrics = {**metrics, "loss": loss, "grad_norm": optax.global_norm(grads)}
        if lr_schedule is not None:
            metrics["learning_rate"] = lr_schedule(state["step"])
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, rest: Any, loss_fn: Callable[[PreferenceLogps], LossOutput], *,
                   compute_dtype, vocab_chunk_size: int | None = None, ref_graphdefs: tuple = ()):
    """Build `eval_step(params, batch, ref_params) -> (Σ weight·per_example, Σ weight, metrics)`; the weight of
    an example is 1 when any of its responses is valid (padding examples weigh 0)."""
    def eval_step(params, batch, ref_params=()):
        lp = lambda gd, p, r: response_logps(gd, p, r, batch, compute_dtype=compute_dtype,  # noqa: E731
                                             vocab_chunk_size=vocab_chunk_size)
        ref = batch.get("ref_logps")
        if ref_params:
            ref = jnp.stack([lp(gd, p, r) for (gd, r), p in zip(ref_graphdefs, ref_params)], axis=-1)
        out = loss_fn(preference_inputs(lp(graphdef, params, rest), batch, ref))
        weight = jnp.any(batch["valid"], axis=-1).astype(jnp.float32)
        return jnp.sum(out.per_example * weight), jnp.sum(weight), out.metrics
    return eval_step
