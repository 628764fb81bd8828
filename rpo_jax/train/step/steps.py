"""The jit-compiled train and eval steps: policy log-probs → PreferenceLogps → loss → optax update.

The train state is a plain pytree `{"params", "opt_state", "step", "rng"}` (plus `"reference"`, the primary
reference's parameters, when they move or are reset during the run).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rpo_jax.losses import LossOutput, PreferenceLogps
from rpo_jax.train.runtime.global_batches import replicated
from rpo_jax.train.step.logprobs import (
    Batch,
    preference_inputs,
    response_and_sequence_logps,
    response_logps,
    step_reference_logps,
)


class WithFrozen:
    """A jitted `fn(*args, frozen=...)` called as `self(*args)` (and lowered as `self.lower(*args)`): the frozen
    variables (a model's `rest`: with LoRA the whole base) are an argument of the compiled program on every call.
    Closed over instead, `jax.jit` would bake them into the program as constants (an 8B base in the HLO)."""

    def __init__(self, jitted: Callable, frozen: Any):
        self.jitted, self.frozen = jitted, frozen

    def __call__(self, *args):
        return self.jitted(*args, frozen=self.frozen)

    def lower(self, *args):
        return self.jitted.lower(*args, frozen=self.frozen)


def make_scorer(
    graphdef: nnx.GraphDef,
    rest: Any,
    mesh,
    *,
    compute_dtype,
    vocab_chunk_size: int | None = None,
    score_window: int | None = None,
) -> Callable[[Any, Batch], jax.Array]:
    """`scorer(params, batch) -> [B, K]` response log-probs (`response_logps`, jitted; `rest` an argument of
    the program, `WithFrozen`) of the model `graphdef` with `params`, replicated on every device of `mesh` (every
    process reads every row). One per model, shared by every batch (compiled once per length bucket)."""
    return WithFrozen(
        jax.jit(
            lambda params, batch, frozen: response_logps(
                graphdef,
                params,
                frozen,
                batch,
                compute_dtype=compute_dtype,
                vocab_chunk_size=vocab_chunk_size,
                score_window=score_window,
            ),
            out_shardings=replicated(mesh),
        ),
        rest,
    )


def split_micro_batches(batch: Batch, micro_batches: int) -> dict[str, jax.Array]:
    """[B, ...] → [M, B/M, ...], micro-batch m taking rows m, m+M, ... (each device keeps its own rows). A packed
    batch is split the same way, rows and examples alike: it must have been packed for M micro-batches
    (`rpo_jax.data.packing.pack_batch(..., micro_batches=M)`: micro-batch m's rows are rows m, m+M, ...)."""

    def split(x):
        b = x.shape[0]
        if b % micro_batches:
            raise ValueError(f"batch size {b} is not divisible by data.micro_batches={micro_batches}")
        return x.reshape(b // micro_batches, micro_batches, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, dict(batch))


GradFn = Callable[..., tuple[tuple[jax.Array, dict[str, jax.Array]], Any]]

#: folded into the train state's RNG for the LoRA dropout masks of a step (a stream of its own)
DROPOUT_STREAM = 0x10DA


def dropout_rng(state: Mapping[str, Any]) -> jax.Array:
    """The key of this step's LoRA dropout masks: fold_in(state["rng"], DROPOUT_STREAM) (the state's RNG moves
    on every step, so each step draws new masks, and a resumed run draws the same ones)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), DROPOUT_STREAM)


def accumulate_gradients(
    grad_fn: GradFn, params: Any, batch: Batch, micro_batches: int, rng: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """Gradient accumulation: `(loss, metrics, grads)` of `grad_fn(params, micro_batch) -> ((loss, metrics),
    grads)` averaged over `micro_batches` equal slices of `batch` (`split_micro_batches`), taken in a `lax.scan`
    so that only one micro-batch's activations are live at a time:

        loss = (1/M) Σ_m loss_m,   grads = (1/M) Σ_m ∇loss_m,   metrics = (1/M) Σ_m metrics_m

    With M = 1 it is `grad_fn(params, batch)` itself. With `rng` (LoRA dropout), micro-batch m is
    `grad_fn(params, micro_batch, fold_in(rng, m))`.
    """

    def call(micro_batch, m):
        return grad_fn(params, micro_batch) if rng is None else grad_fn(params, micro_batch, jax.random.fold_in(rng, m))

    if micro_batches == 1:
        (loss, metrics), grads = call(batch, 0)
        return loss, metrics, grads

    def body(carry, xs):
        grads_sum, loss_sum = carry
        (loss, metrics), grads = call(*xs)
        return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss), metrics = jax.lax.scan(
        body, (zeros, jnp.float32(0)), (split_micro_batches(batch, micro_batches), jnp.arange(micro_batches))
    )
    grads = jax.tree.map(lambda g: g / micro_batches, grads)
    return loss / micro_batches, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics), grads


def apply_gradients(
    state: dict[str, Any],
    grads: Any,
    loss: jax.Array,
    metrics: Mapping[str, jax.Array],
    tx: optax.GradientTransformation,
    lr_schedule=None,
    *,
    skip_nonfinite: bool = False,
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
    new_state = {
        "params": new_params,
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "rng": jax.random.fold_in(state["rng"], state["step"]),
    }
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "nonfinite": 1.0 - finite.astype(jnp.float32)}
    if lr_schedule is not None:
        metrics["learning_rate"] = lr_schedule(state["step"])
    return new_state, metrics


def policy_inputs(
    graphdef, params, base, batch: Batch, ref, key, sequence_nll: bool, logps: Callable, compute_dtype, vocab_chunk_size
) -> PreferenceLogps:
    """The loss's `PreferenceLogps` of a micro-batch: the policy's response log-probs (`logps(graphdef, params,
    base, batch[, key])`), or with `sequence_nll` also its prompt + response ones (`response_and_sequence_logps`)."""
    if not sequence_nll:
        policy = logps(graphdef, params, base, batch) if key is None else logps(graphdef, params, base, batch, key)
        return preference_inputs(policy, batch, ref)
    policy, sequence, counts = response_and_sequence_logps(
        graphdef, params, base, batch, compute_dtype=compute_dtype, vocab_chunk_size=vocab_chunk_size, dropout_rng=key
    )
    return preference_inputs(policy, batch, ref, (sequence, counts))


class ReferenceSync(NamedTuple):
    """The primary reference held in the train state (`state["reference"]`, parameters shaped as the policy's)
    and how it moves: every `every` optimizer steps it becomes `mix·θ + (1 − mix)·θ_ref` (`sync_reference`);
    `every = 0`: it never moves in the step (iterated training resets it between steps)."""

    every: int = 0
    mix: float = 1.0


def sync_reference(reference: Any, params: Any, step: jax.Array, sync: ReferenceSync) -> Any:
    """TR-DPO's reference update (Gorbatovski et al. 2024, TRL's `SyncRefModelCallback`), pure and jit-able.

    `step`: the step count after the optimizer step that produced `params` (TRL's `global_step` in
    `on_step_end`). When `sync.every > 0` and `step % sync.every == 0`, every leaf becomes

        θ_ref ← θ_ref·(1 − α) + θ·α      (α = `sync.mix`; TRL's `mul_(1 − α).add_(θ, alpha=α)`; α = 1: θ itself)

    otherwise `reference` is returned as it is. Leaves keep the reference's dtype.
    """
    if sync.every <= 0:
        return reference
    due = step % sync.every == 0
    alpha = float(sync.mix)

    def leaf(ref, theta):
        mixed = theta if alpha == 1.0 else ref * (1.0 - alpha) + theta * alpha
        return jnp.where(due, mixed.astype(ref.dtype), ref)

    return jax.tree.map(leaf, reference, params)


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: Any,
    loss_fn: Callable[[PreferenceLogps], LossOutput],
    tx: optax.GradientTransformation,
    *,
    compute_dtype,
    micro_batches: int = 1,
    vocab_chunk_size: int | None = None,
    ref_graphdefs: tuple = (),
    lr_schedule=None,
    score_window: int | None = None,
    skip_nonfinite: bool = False,
    reference_sync: ReferenceSync | None = None,
    sequence_nll: bool = False,
):
    """Build `train_step(state, batch, ref_params, frozen=None) -> (state, metrics)` (jit it with donated state).

    `ref_params`: a tuple of R reference parameter pytrees scored in the step (the reference graphdefs are
    `ref_graphdefs`), or `()` when `batch["ref_logps"]` is cached or the loss needs no reference; an entry None
    (and a `ref_graphdefs` rest None) is the policy's own (`step_reference_logps`: LoRA's base reference).
    `frozen`: the policy's `rest` as an argument (`WithFrozen`; None: the `rest` given here, closed over — fine
    when it is empty, as without LoRA). A policy with LoRA dropout draws its masks from `dropout_rng(state)`.
    `score_window`: see `response_logps` (`resolve_score_window` picks it; one compiled step per value).
    `skip_nonfinite`: see `apply_gradients` (`config.train.on_nonfinite = "skip_step"`).
    `reference_sync`: the primary reference (graphdef `ref_graphdefs[0]`) is the state's `"reference"`, not an
    entry of `ref_params` (which then holds the other R − 1), and after the update it moves as `sync_reference`
    says (`config.reference_sync`); the new state carries it on.
    `sequence_nll`: the policy's forward also gives each sequence's prompt + response log-probs
    (`response_and_sequence_logps`, every position: `score_window` does not apply), for `orpo`'s NLL.
    """

    def logps(gd, params, rest_, mb, key=None):
        return response_logps(
            gd,
            params,
            rest_,
            mb,
            compute_dtype=compute_dtype,
            vocab_chunk_size=vocab_chunk_size,
            score_window=score_window,
            dropout_rng=key,
        )

    def micro_loss(params, base, mb, ref, key):
        out = loss_fn(
            policy_inputs(graphdef, params, base, mb, ref, key, sequence_nll, logps, compute_dtype, vocab_chunk_size)
        )
        return out.loss, out.metrics

    value_and_grad = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, batch, ref_params=(), frozen=None):
        base = rest if frozen is None else frozen
        if reference_sync is not None:
            ref_params = (state["reference"], *ref_params)

        def grad_fn(params, mb, key):  # the references are scored outside the differentiated function
            ref = step_reference_logps(logps, ref_graphdefs, ref_params, mb, policy=(params, base))
            return value_and_grad(params, base, mb, ref, key)

        loss, metrics, grads = accumulate_gradients(
            grad_fn, state["params"], batch, micro_batches, rng=dropout_rng(state)
        )
        new_state, metrics = apply_gradients(
            state, grads, loss, metrics, tx, lr_schedule, skip_nonfinite=skip_nonfinite
        )
        if reference_sync is not None:
            new_state["reference"] = sync_reference(
                state["reference"], new_state["params"], new_state["step"], reference_sync
            )
        return new_state, metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef,
    rest: Any,
    loss_fn: Callable[[PreferenceLogps], LossOutput],
    *,
    compute_dtype,
    vocab_chunk_size: int | None = None,
    ref_graphdefs: tuple = (),
    score_window: int | None = None,
    sequence_nll: bool = False,
):
    """Build `eval_step(params, batch, ref_params, frozen=None) -> (Σ weight·per_example, Σ weight, metrics)`;
    the weight of an example is 1 when any of its responses is valid (padding examples weigh 0). `score_window`:
    see `response_logps`; `ref_params`, `frozen`, `sequence_nll`: as `make_train_step`'s (no dropout here)."""

    def logps(gd, p, r, b):
        return response_logps(
            gd, p, r, b, compute_dtype=compute_dtype, vocab_chunk_size=vocab_chunk_size, score_window=score_window
        )

    def eval_step(params, batch, ref_params=(), frozen=None):
        base = rest if frozen is None else frozen
        ref = step_reference_logps(logps, ref_graphdefs, ref_params, batch, policy=(params, base))
        out = loss_fn(
            policy_inputs(
                graphdef, params, base, batch, ref, None, sequence_nll, logps, compute_dtype, vocab_chunk_size
            )
        )
        weight = jnp.any(batch["valid"], axis=-1).astype(jnp.float32)
        return jnp.sum(out.per_example * weight), jnp.sum(weight), out.metrics

    return eval_step
