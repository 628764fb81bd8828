"""The jit-compiled train and eval steps: policy log-probs → PreferenceLogps → loss → optax update.

The train state is a plain pytree `{"params", "opt_state", "step", "rng"}` (plus `"reference"`, the primary
reference's parameters, when they move: `ReferenceSync`); parameters are float32 master
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

import contextlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rpo_jax.losses import LossOutput, PreferenceLogps
from rpo_jax.models import sequence_logps
from rpo_jax.models.lora import lora_dropout
from rpo_jax.models.logprobs import packed_token_logps, segment_logp_sums
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


def training_dropout(model: nnx.Module, key: jax.Array | None):
    """LoRA dropout with masks from `key` for the block (`rpo_jax.models.lora.lora_dropout`) when `model` has
    adapters and `key` is given; otherwise nothing changes (evaluation, references, models without LoRA)."""
    if key is None or getattr(model, "lora", None) is None:
        return contextlib.nullcontext(model)
    return lora_dropout(model, key)


def response_logps(graphdef: nnx.GraphDef, params: Any, rest: Any, batch: Batch, *, compute_dtype,
                   vocab_chunk_size: int | None = None, score_window: int | None = None,
                   dropout_rng: jax.Array | None = None) -> jax.Array:
    """Σ log π over the response tokens of every response: `[B, K]` float32 (0 on invalid slots).

    `dropout_rng`: a training step's key for LoRA dropout (`training_dropout`); None everywhere else.

    `score_window` (static): unembed only that many positions per response (see `sequence_logps`); a response
    with a scored token outside its window gets NaN. A packed batch (`rpo_jax.data.packing`, it has
    `response_id`) goes through `packed_response_logps` (`score_window` does not apply there).
    """
    if "response_id" in batch:
        return packed_response_logps(graphdef, params, rest, batch, compute_dtype=compute_dtype,
                                     vocab_chunk_size=vocab_chunk_size, dropout_rng=dropout_rng)
    model = nnx.merge(graphdef, cast_floating(params, compute_dtype), rest)
    tokens = batch["tokens"]
    b, k, t = tokens.shape
    flat = lambda x: x.reshape(b * k, t)  # noqa: E731
    # Empty response slots are all padding: let their first token attend to itself so no softmax row is empty.
    attention_mask = flat(batch["attention_mask"]).at[:, 0].set(True)
    with training_dropout(model, dropout_rng):
        logp, _ = sequence_logps(model, flat(tokens), flat(batch["loss_mask"]), attention_mask=attention_mask,
                                 vocab_chunk_size=vocab_chunk_size or None, score_window=score_window or None)
    return jnp.where(batch["valid"], logp.reshape(b, k), 0.0)


def packed_response_logps(graphdef: nnx.GraphDef, params: Any, rest: Any, batch: Batch, *, compute_dtype,
                          vocab_chunk_size: int | None = None, dropout_rng: jax.Array | None = None) -> jax.Array:
    """`response_logps` of a packed batch: rows tokens/positions/segment_ids/source/response_id (+ parent_ids
    with shared prompts) [R,T], valid [B,K]. policy[b, k] = Σ_{slots with response_id = 1 + b·K + k} log p, the
    per-slot log-probs from `packed_token_logps`; 0 on invalid slots, as in the padded path."""
    model = nnx.merge(graphdef, cast_floating(params, compute_dtype), rest)
    with training_dropout(model, dropout_rng):
        logps = packed_token_logps(model, batch["tokens"], batch["source"], attention_mask=batch["attention_mask"],
                                   positions=batch["positions"], segment_ids=batch["segment_ids"],
                                   parent_ids=batch.get("parent_ids"), vocab_chunk_size=vocab_chunk_size or None)
    b, k = batch["valid"].shape
    sums = segment_logp_sums(logps, batch["response_id"], b * k).reshape(b, k)
    return jnp.where(batch["valid"], sums, 0.0)


def preference_inputs(policy_logps: jax.Array, batch: Batch, ref_logps: jax.Array | None) -> PreferenceLogps:
    return PreferenceLogps(policy_logps=policy_logps, ref_logps=ref_logps, lengths=batch["lengths"],
                           rewards=batch.get("rewards"), valid=batch["valid"])


def step_reference_logps(logps: Callable, ref_graphdefs: tuple, ref_params: tuple, batch: Batch,
                         policy: tuple[Any, Any] | None = None) -> jax.Array | None:
    """`[B,K,R]` log-probs of the in-step references, `logps(graphdef, params, rest, batch)` each (a forward
    only, under stop_gradient), or the cached `batch["ref_logps"]` (None if absent) when `ref_params` is empty.

    A reference whose parameters (or rest) are None shares the policy's, `policy = (params, rest)` of this
    step: LoRA's base reference is the policy's own weights under a graphdef with the adapters switched off
    (`rpo_jax.models.lora.adapters_disabled`), so nothing is copied."""
    if not ref_params:
        return batch.get("ref_logps")
    own = lambda x, i: policy[i] if x is None else x  # noqa: E731
    return jax.lax.stop_gradient(
        jnp.stack([logps(gd, own(p, 0), own(r, 1), batch) for (gd, r), p in zip(ref_graphdefs, ref_params)],
                  axis=-1))


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


def make_scorer(graphdef: nnx.GraphDef, rest: Any, mesh, *, compute_dtype, vocab_chunk_size: int | None = None,
                score_window: int | None = None) -> Callable[[Any, Batch], jax.Array]:
    """`scorer(params, batch) -> [B, K]` response log-probs (`response_logps`, jitted; `rest` an argument of
    the program, `WithFrozen`) of the model `graphdef` with `params`, replicated on every device of `mesh` (every
    process reads every row). One per model, shared by every batch (compiled once per length bucket)."""
    return WithFrozen(jax.jit(lambda params, batch, frozen: response_logps(
        graphdef, params, frozen, batch, compute_dtype=compute_dtype, vocab_chunk_size=vocab_chunk_size,
        score_window=score_window), out_shardings=replicated(mesh)), rest)


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


def accumulate_gradients(grad_fn: GradFn, params: Any, batch: Batch, micro_batches: int, rng: jax.Array | None = None
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
    (grads, loss), metrics = jax.lax.scan(body, (zeros, jnp.float32(0)),
                                          (split_micro_batches(batch, micro_batches), jnp.arange(micro_batches)))
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


def make_train_step(graphdef: nnx.GraphDef, rest: Any, loss_fn: Callable[[PreferenceLogps], LossOutput],
                    tx: optax.GradientTransformation, *, compute_dtype, micro_batches: int = 1,
                    vocab_chunk_size: int | None = None, ref_graphdefs: tuple = (), lr_schedule=None,
                    score_window: int | None = None, skip_nonfinite: bool = False,
                    reference_sync: ReferenceSync | None = None):
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
    """
    def logps(gd, params, rest_, mb, key=None):
        return response_logps(gd, params, rest_, mb, compute_dtype=compute_dtype, vocab_chunk_size=vocab_chunk_size,
                              score_window=score_window, dropout_rng=key)

    def micro_loss(params, base, mb, ref, key):
        out = loss_fn(preference_inputs(logps(graphdef, params, base, mb, key), mb, ref))
        return out.loss, out.metrics

    value_and_grad = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, batch, ref_params=(), frozen=None):
        base = rest if frozen is None else frozen
        if reference_sync is not None:
            ref_params = (state["reference"], *ref_params)

        def grad_fn(params, mb, key):  # the references are scored outside the differentiated function
            ref = step_reference_logps(logps, ref_graphdefs, ref_params, mb, policy=(params, base))
            return value_and_grad(params, base, mb, ref, key)
        loss, metrics, grads = accumulate_gradients(grad_fn, state["params"], batch, micro_batches,
                                                    rng=dropout_rng(state))
        new_state, metrics = apply_gradients(state, grads, loss, metrics, tx, lr_schedule,
                                             skip_nonfinite=skip_nonfinite)
        if reference_sync is not None:
            new_state["reference"] = sync_reference(state["reference"], new_state["params"], new_state["step"],
                                                    reference_sync)
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, rest: Any, loss_fn: Callable[[PreferenceLogps], LossOutput], *,
                   compute_dtype, vocab_chunk_size: int | None = None, ref_graphdefs: tuple = (),
                   score_window: int | None = None):
    """Build `eval_step(params, batch, ref_params, frozen=None) -> (Σ weight·per_example, Σ weight, metrics)`;
    the weight of an example is 1 when any of its responses is valid (padding examples weigh 0). `score_window`:
    see `response_logps`; `ref_params`, `frozen`: as `make_train_step`'s (no dropout here)."""
    def logps(gd, p, r, b):
        return response_logps(gd, p, r, b, compute_dtype=compute_dtype, vocab_chunk_size=vocab_chunk_size,
                              score_window=score_window)

    def eval_step(params, batch, ref_params=(), frozen=None):
        base = rest if frozen is None else frozen
        ref = step_reference_logps(logps, ref_graphdefs, ref_params, batch, policy=(params, base))
        out = loss_fn(preference_inputs(logps(graphdef, params, base, batch), batch, ref))
        weight = jnp.any(batch["valid"], axis=-1).astype(jnp.float32)
        return jnp.sum(out.per_example * weight), jnp.sum(weight), out.metrics
    return eval_step
