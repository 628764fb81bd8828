"""The jit-compiled train and eval steps: policy log-probs → PreferenceLogps → loss → optax update.

The train state is a plain pytree `{"params", "opt_state", "step", "rng"}`; parameters are float32 master
weights, cast to the compute dtype inside the step (mixed precision); log-probs and the loss are float32.
A step takes a global batch (see `rpo_jax.data`: tokens/loss_mask/attention_mask [B,K,T], valid/lengths
[B,K], rewards [B,K] when present, ref_logps [B,K,R] when cached) and accumulates gradients over
`micro_batches` slices inside the step (`accumulate_gradients`, shared with the reward-model step), then takes
one optax update (`apply_gradients`).

Speed: with `score_window` = W the output head (and its log-softmax over the vocabulary) runs only on the W
logit positions per response that can be scored (see `rpo_jax.models.logprobs.sequence_logps`), not on the
prompt; `resolve_score_window` turns `config.model.score_window` into W for a run (the trainer's default, "auto",
is the longest response of the data) and `rpo_jax.train.performance.train_flops_per_token` counts FLOPs to
match.
In-step references are scored outside the differentiated function: a pure forward, no residuals kept.
On the CPU, `rpo_jax.train.host.reuse_cpu_step_memory` (called by `rpo-train` before JAX starts) keeps the
step's multi-GiB temporary buffer mapped between steps instead of faulting it in afresh every step.
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
from rpo_jax.train.mesh import replicated

Batch = Mapping[str, jax.Array]


def cast_floating(tree: Any, dtype) -> Any:
    """Cast every floating-point leaf of `tree` to `dtype` (integer leaves untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def resolve_score_window(setting: str | int | None, max_span: int, *, multiple: int = 16) -> int | None:
    """`config.model.score_window` → the static W for a run whose longest scored span is `max_span`.

    "auto": `max_span` rounded up to a multiple of `multiple` (None when nothing is scored); "off", "", 0 or
    None: None (the head runs on every position); a number: that W, which must cover `max_span` (a smaller
    window would leave scored tokens outside it). A W ≥ T-1 for a batch of length T means every position.
    """
    text = str(setting).strip().lower() if setting is not None else "off"
    if text in ("off", "", "0", "none"):
        return None
    if text == "auto":
        return -(-max_span // multiple) * multiple if max_span > 0 else None
    try:
        width = int(text)
    except ValueError:
        raise ValueError(f"config.model.score_window={setting!r}: expected 'auto', 'off' or a number") from None
    if width < max(max_span, 1):
        raise ValueError(f"config.model.score_window={width} is shorter than the longest response in the data "
                         f"({max_span} scored tokens); use 'auto' or at least {max_span}")
    return width


def response_logps(graphdef: nnx.GraphDef, params: Any, rest: Any, batch: Batch, *, compute_dtype,
                   vocab_chunk_size: int | None = None, score_window: int | None = None) -> jax.Array:
    """Σ log π over the response tokens of every response: `[B, K]` float32 (0 on invalid slots).

    `score_window` (static): unembed only that many positions per response (see `sequence_logps`); a response
    with a scored token outside its window gets NaN.
    """
    model = nnx.merge(graphdef, cast_floating(params, compute_dtype), rest)
    tokens = batch["tokens"]
    b, k, t = tokens.shape
    flat = lambda x: x.reshape(b * k, t)  # noqa: E731
    # Empty response slots are all padding: let their first token attend to itself so no softmax row is empty.
    attention_mask = flat(batch["attention_mask"]).at[:, 0].set(True)
    logp, _ = sequence_logps(model, flat(tokens), flat(batch["loss_mask"]), attention_mask=attention_mask,
                             vocab_chunk_size=vocab_chunk_size or None, score_window=score_window or None)
    return jnp.where(batch["valid"], logp.reshape(b, k), 0.0)


def preference_inputs(policy_logps: jax.Array, batch: Batch, ref_logps: jax.Array | None) -> PreferenceLogps:
    return PreferenceLogps(policy_logps=policy_logps, ref_logps=ref_logps, lengths=batch["lengths"],
                           rewards=batch.get("rewards"), valid=batch["valid"])


def step_reference_logps(logps: Callable, ref_graphdefs: tuple, ref_params: tuple, batch: Batch) -> jax.Array | None:
    """`[B,K,R]` log-probs of the in-step references, `logps(graphdef, params, rest, batch)` each (a forward
    only, under stop_gradient), or the cached `batch["ref_logps"]` (None if absent) when `ref_params` is empty."""
    if not ref_params:
        return batch.get("ref_logps")
    return jax.lax.stop_gradient(
        jnp.stack([logps(gd, p, r, batch) for (gd, r), p in zip(ref_graphdefs, ref_params)], axis=-1))


def make_scorer(graphdef: nnx.GraphDef, rest: Any, mesh, *, compute_dtype, vocab_chunk_size: int | None = None,
                score_window: int | None = None) -> Callable[[Any, Batch], jax.Array]:
    """`jit(scorer)(params, batch) -> [B, K]` response log-probs (`response_logps`) of the model `graphdef` with
    `params`, replicated on every device of `mesh` (every process reads every row). One per model, shared by
    every batch (compiled once per length bucket)."""
    return jax.jit(lambda params, batch: response_logps(graphdef, params, rest, batch, compute_dtype=compute_dtype,
                                                        vocab_chunk_size=vocab_chunk_size,
                                                        score_window=score_window),
                   out_shardings=replicated(mesh))


def split_micro_batches(batch: Batch, micro_batches: int) -> dict[str, jax.Array]:
    """[B, ...] → [M, B/M, ...], micro-batch m taking rows m, m+M, ... (each device keeps its own rows)."""
    def split(x):
        b = x.shape[0]
        if b % micro_batches:
            raise ValueError(f"batch size {b} is not divisible by data.micro_batches={micro_batches}")
        return x.reshape(b // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, dict(batch))


GradFn = Callable[[Any, Batch], tuple[tuple[jax.Array, dict[str, jax.Array]], Any]]


def accumulate_gradients(grad_fn: GradFn, params: Any, batch: Batch, micro_batches: int
                         ) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """Gradient accumulation: `(loss, metrics, grads)` of `grad_fn(params, micro_batch) -> ((loss, metrics),
    grads)` averaged over `micro_batches` equal slices of `batch` (`split_micro_batches`), taken in a `lax.scan`
    so that only one micro-batch's activations are live at a time:

        loss = (1/M) Σ_m loss_m,   grads = (1/M) Σ_m ∇loss_m,   metrics = (1/M) Σ_m metrics_m

    With M = 1 it is `grad_fn(params, batch)` itself.
    """
    if micro_batches == 1:
        (loss, metrics), grads = grad_fn(params, batch)
        return loss, metrics, grads

    def body(carry, micro_batch):
        grads_sum, loss_sum = carry
        (loss, metrics), grads = grad_fn(params, micro_batch)
        return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss), metrics = jax.lax.scan(body, (zeros, jnp.float32(0)), split_micro_batches(batch, micro_batches))
    grads = jax.tree.map(lambda g: g / micro_batches, grads)
    return loss / micro_batches, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics), grads


def apply_gradients(state: dict[str, Any], grads: Any, loss: jax.Array, metrics: Mapping[str, jax.Array],
                    tx: optax.GradientTransformation, lr_schedule=None, *, skip_nonfinite: bool = False
                    ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One optax update of the train state `{"params", "opt_state", "step", "rng"}` → `(new state, metrics)`;
    the metrics gain `loss`, `grad_norm` (global norm of the gradients before clipping), `learning_rate` (the
    schedule at this step, when given) and `nonfinite` (1.0 when the loss or the gradient norm is NaN/±inf, else
    0.0: the run skeleton's divergence guard reads it when it next synchronises, so the check adds no host sync).

    `skip_nonfinite`: such a step leaves parameters and optimizer state as they were (`step` and `rng` still
    advance, so the data position and the step count stay in line)."""
    params = state["params"]
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    if skip_nonfinite:
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_params, opt_state = keep(new_params, params), keep(opt_state, state["opt_state"])
    new_state = {"params": new_params, "opt_state": opt_state,
                 "step": state["step"] + 1, "rng": jax.random.fold_in(state["rng"], state["step"])}
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "nonfinite": 1.0 - finite.astype(jnp.float32)}
    if lr_schedule is not None:
        metrics["learning_rate"] = lr_schedule(state["step"])
    return new_state, metrics


def make_train_step(graphdef: nnx.GraphDef, rest: Any, loss_fn: Callable[[PreferenceLogps], LossOutput],
                    tx: optax.GradientTransformation, *, compute_dtype, micro_batches: int = 1,
                    vocab_chunk_size: int | None = None, ref_graphdefs: tuple = (), lr_schedule=None,
                    score_window: int | None = None, skip_nonfinite: bool = False):
    """Build `train_step(state, batch, ref_params) -> (state, metrics)` (jit it with donated state).

    `ref_params`: a tuple of R reference parameter pytrees scored in the step (the reference graphdefs are
    `ref_graphdefs`), or `()` when `batch["ref_logps"]` is cached or the loss needs no reference.
    `score_window`: see `response_logps` (`resolve_score_window` picks it; one compiled step per value).
    `skip_nonfinite`: see `apply_gradients` (`config.train.on_nonfinite = "skip_step"`).
    """
    def logps(gd, params, rest_, mb):
        return response_logps(gd, params, rest_, mb, compute_dtype=compute_dtype, vocab_chunk_size=vocab_chunk_size,
                              score_window=score_window)

    def micro_loss(params, mb, ref):
        out = loss_fn(preference_inputs(logps(graphdef, params, rest, mb), mb, ref))
        return out.loss, out.metrics

    value_and_grad = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, batch, ref_params=()):
        def grad_fn(params, mb):  # the references are scored outside the differentiated function
            return value_and_grad(params, mb, step_reference_logps(logps, ref_graphdefs, ref_params, mb))
        loss, metrics, grads = accumulate_gradients(grad_fn, state["params"], batch, micro_batches)
        return apply_gradients(state, grads, loss, metrics, tx, lr_schedule, skip_nonfinite=skip_nonfinite)

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, rest: Any, loss_fn: Callable[[PreferenceLogps], LossOutput], *,
                   compute_dtype, vocab_chunk_size: int | None = None, ref_graphdefs: tuple = (),
                   score_window: int | None = None):
    """Build `eval_step(params, batch, ref_params) -> (Σ weight·per_example, Σ weight, metrics)`; the weight of
    an example is 1 when any of its responses is valid (padding examples weigh 0). `score_window`: see
    `response_logps`."""
    def logps(gd, p, r, b):
        return response_logps(gd, p, r, b, compute_dtype=compute_dtype, vocab_chunk_size=vocab_chunk_size,
                              score_window=score_window)

    def eval_step(params, batch, ref_params=()):
        ref = step_reference_logps(logps, ref_graphdefs, ref_params, batch)
        out = loss_fn(preference_inputs(logps(graphdef, params, rest, batch), batch, ref))
        weight = jnp.any(batch["valid"], axis=-1).astype(jnp.float32)
        return jnp.sum(out.per_example * weight), jnp.sum(weight), out.metrics
    return eval_step
