"""The train and eval steps of the unpaired losses (`kto`, `apo_zero_unpaired`, `bco`): one labelled completion per
row, `UnpairedLogps` for the loss, TRL's `KTOTrainer` (and last `BCOTrainer`) semantics per micro-batch.

Batch (`rpo_jax.data.unpaired_tokenize.UnpairedDataset`): the contract batch `[B, K, T]` of one prompt per row,
response 0 its own completion and, for `kto` (`spec.requires_kl_logps`), response 1 a mismatched completion (K = 2;
else K = 1), plus `labels [B]` bool and, with cached references, `ref_logps [B, K]`.

Per micro-batch (`config.data.micro_batches`, as TRL per per-device batch):

    ℓ_θ(y|x)   [B]  the own completion's summed log-probs, differentiated
    ℓ_θ(y'|x)  [B]  the mismatched completion's, under stop_gradient (TRL: torch.no_grad); padded batches run it
                    as a forward of its own outside the backward pass, packed rows in the same forward
    ℓ_ref      [B, K]  in the step (stop_gradient) or from the cache
    out = loss_fn(UnpairedLogps(...), state)        (`bco`: the state of the micro-batch before; TRL updates its
                                                     running moments in every micro-batch, in order)

The state of a stateful loss lives in the train state as `state["loss_state"]` (`{"mean", "var", "count"}`, a
`BCOState`'s fields: checkpointed with it, TRL's running.json) and is threaded through the micro-batches in order;
a step skipped for a non-finite loss (`train.on_nonfinite="skip_step"`) keeps the state it started from.
Evaluation calls the loss with `update_state=False` (δ is the current mean, the state unchanged).

Metrics (TRL's names and rules): a label's `rewards/*`, `logps/*` are the mean over the micro-batches that have
rows of it (TRL appends them only then), `count/chosen`, `count/rejected` the step's rows of each label (the run
skeleton's `log_filter` leaves a label's metrics out of a record whose step has none: `drop_empty_labels`),
`rewards/margins` the mean over the micro-batches with both labels (NaN, left out, when none has), `kl` / `delta`
the mean over the micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rpo_jax.losses import BCOState, LossOutput, UnpairedLogps
from rpo_jax.train.step.logprobs import Batch, response_logps, step_reference_logps
from rpo_jax.train.step.steps import ReferenceSync, apply_gradients, dropout_rng, split_micro_batches, sync_reference

LABELS = ("chosen", "rejected")
#: per-label metrics, averaged over the micro-batches (eval: the rows) that have rows of the label
LABEL_METRICS = {label: (f"rewards/{label}", f"logps/{label}") for label in LABELS}
MARGINS = "rewards/margins"
SLOT_KEYS = ("tokens", "attention_mask", "loss_mask", "valid", "lengths")


def state_of(loss_state: Mapping[str, Any] | None) -> BCOState | None:
    """The train state's `"loss_state"` dict as the loss's `BCOState` (None stays None)."""
    return None if loss_state is None else BCOState(**loss_state)


def state_dict(state: BCOState | None) -> dict[str, jax.Array] | None:
    """A loss's `BCOState` as the train state keeps it (`{"mean", "var", "count"}` float32 scalars)."""
    if state is None:
        return None
    return {k: jnp.asarray(getattr(state, k), jnp.float32) for k in ("mean", "var", "count")}


def response_slot(batch: Batch, k: int) -> dict[str, jax.Array]:
    """The padded batch reduced to response `k` (`[B, 1, ...]` arrays; `labels`, `ref_logps` left out)."""
    return {key: batch[key][:, k : k + 1] for key in SLOT_KEYS if key in batch}


def policy_logps(logps: Callable, params: Any, base: Any, batch: Batch, key, mismatched: bool):
    """(own completion's log-probs [B], differentiated; the mismatched completion's [B] under stop_gradient, or
    None). `logps(params, base, batch, key) -> [B, K]`."""
    if "response_id" in batch:  # packed rows: both completions in one forward
        both = logps(params, base, batch, key)
        return both[:, 0], (jax.lax.stop_gradient(both[:, 1]) if mismatched else None)
    own = logps(params, base, response_slot(batch, 0), key)[:, 0]
    if not mismatched:
        return own, None
    return own, jax.lax.stop_gradient(logps(params, base, response_slot(batch, 1), key)[:, 0])


def unpaired_inputs(own: jax.Array, mismatched: jax.Array | None, batch: Batch, ref: jax.Array | None) -> UnpairedLogps:
    """`UnpairedLogps` of a micro-batch: `ref` `[B, K]` or `[B, K, 1]` (column 0 the own completion's, 1 the
    mismatched one's), or None for a loss without a reference."""
    if ref is not None and ref.ndim == 3:
        ref = ref[..., 0]
    return UnpairedLogps(
        policy_logps=own,
        labels=batch["labels"],
        ref_logps=None if ref is None else ref[:, 0],
        kl_policy_logps=mismatched,
        kl_ref_logps=None if (ref is None or mismatched is None) else ref[:, 1],
        valid=batch["valid"][:, 0],
    )


def call_loss(loss_fn, inputs: UnpairedLogps, loss_state, *, update_state: bool = True) -> LossOutput:
    """`loss_fn(inputs)`, or with the state of a stateful loss (`loss_state`: the train state's dict)."""
    if loss_fn.spec.stateful:
        return loss_fn(inputs, state_of(loss_state), update_state=update_state)
    return loss_fn(inputs)


def combine_micro_metrics(stacked: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The step's metrics from the micro-batches' (each `[M]`), as TRL logs them (module docstring)."""
    out = {k: jnp.mean(v) for k, v in stacked.items()}
    present = {}
    for label, names in LABEL_METRICS.items():
        count = stacked[f"count/{label}"]
        present[label] = (count > 0).astype(jnp.float32)
        out[f"count/{label}"] = jnp.sum(count)
        for name in names:
            out[name] = jnp.sum(stacked[name] * present[label]) / jnp.maximum(jnp.sum(present[label]), 1.0)
    both = present["chosen"] * present["rejected"]
    margins = jnp.sum(stacked[MARGINS] * both) / jnp.maximum(jnp.sum(both), 1.0)
    out[MARGINS] = jnp.where(jnp.sum(both) > 0, margins, jnp.nan)
    return out


def drop_empty_labels(metrics: Mapping[str, float]) -> dict[str, float]:
    """A logged record of an unpaired loss (it has `count/chosen`) without the metrics of a label the step had no
    row of (`count/<label>` = 0), nor `rewards/margins` when it is not finite (no micro-batch had both labels), as
    TRL leaves them out. Any other record passes unchanged."""
    out = dict(metrics)
    if "count/chosen" not in out:
        return out
    for label, names in LABEL_METRICS.items():
        if out.get(f"count/{label}") == 0.0:
            for name in names:
                out.pop(name, None)
    if MARGINS in out and not math.isfinite(out[MARGINS]):
        del out[MARGINS]
    return out


def label_sums(metrics: Mapping[str, float], weight: float) -> dict[str, float]:
    """One eval batch's metrics as sums to add over the split: a label's metrics weighted by its rows
    (`count/<label>`), counts as they are, margins left out (`label_means` recomputes them), any other metric by
    the batch's `weight` (its valid examples): for a paired loss every metric × `weight`."""
    counted = {name: f"count/{label}" for label, names in LABEL_METRICS.items() for name in names}
    out = {}
    for key, value in metrics.items():
        if key.startswith("count/"):
            out[key] = float(value)
        elif key in counted and counted[key] in metrics:
            out[key] = float(value) * float(metrics[counted[key]])
        elif not (key == MARGINS and "count/chosen" in metrics):
            out[key] = float(value) * float(weight)
    return out


def label_means(totals: Mapping[str, float], weight: float) -> dict[str, float]:
    """`label_sums` added over a split → its metrics: a label's means over its rows (left out without any), the
    margin of those means when both labels have rows, counts as totals, the rest divided by `weight`."""
    out = {}
    counted = {name: f"count/{label}" for label, names in LABEL_METRICS.items() for name in names}
    for key, value in totals.items():
        if key.startswith("count/"):
            out[key] = value
        elif key in counted and counted[key] in totals:
            if totals[counted[key]] > 0:
                out[key] = value / totals[counted[key]]
        else:
            out[key] = value / weight
    if "count/chosen" in totals and "rewards/chosen" in out and "rewards/rejected" in out:
        out[MARGINS] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def accumulate_with_state(
    grad_fn: Callable, params: Any, batch: Batch, micro_batches: int, rng: jax.Array, loss_state: Any
) -> tuple[jax.Array, dict[str, jax.Array], Any, Any]:
    """`(loss, metrics, grads, loss_state)`: `grad_fn(params, micro_batch, key, loss_state) -> ((loss, (metrics,
    next state)), grads)` over the `micro_batches` slices of `split_micro_batches`, in order, in a `lax.scan`
    carrying the gradient sum, the loss sum and the state (loss and gradients the micro-batches' mean, metrics
    `combine_micro_metrics` of theirs; micro-batch m's key `fold_in(rng, m)`)."""
    if micro_batches == 1:
        (loss, (metrics, loss_state)), grads = grad_fn(params, batch, jax.random.fold_in(rng, 0), loss_state)
        stacked = jax.tree.map(lambda x: x[None], metrics)
        return loss, combine_micro_metrics(stacked), grads, loss_state

    def body(carry, xs):
        grads_sum, loss_sum, state = carry
        mb, m = xs
        (loss, (metrics, state)), grads = grad_fn(params, mb, jax.random.fold_in(rng, m), state)
        return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, state), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss, loss_state), stacked = jax.lax.scan(
        body,
        (zeros, jnp.float32(0), loss_state),
        (split_micro_batches(batch, micro_batches), jnp.arange(micro_batches)),
    )
    grads = jax.tree.map(lambda g: g / micro_batches, grads)
    return loss / micro_batches, combine_micro_metrics(stacked), grads, loss_state


def make_unpaired_train_step(
    graphdef: nnx.GraphDef,
    rest: Any,
    loss_fn,
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
):
    """Build `train_step(state, batch, ref_params, frozen=None) -> (state, metrics)` for an unpaired `loss_fn`
    (module docstring); arguments as `rpo_jax.train.step.steps.make_train_step`'s. A stateful loss reads and
    writes `state["loss_state"]`."""
    mismatched = loss_fn.spec.requires_kl_logps

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

    def micro_loss(params, base, mb, ref, key, loss_state):
        own, kl = policy_logps(lambda p, r, b, k: logps(graphdef, p, r, b, k), params, base, mb, key, mismatched)
        out = call_loss(loss_fn, unpaired_inputs(own, kl, mb, ref), loss_state)
        return out.loss, (out.metrics, state_dict(out.state))

    value_and_grad = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, batch, ref_params=(), frozen=None):
        base = rest if frozen is None else frozen
        if reference_sync is not None:
            ref_params = (state["reference"], *ref_params)

        def grad_fn(params, mb, key, loss_state):  # the references are scored outside the differentiated function
            ref = step_reference_logps(logps, ref_graphdefs, ref_params, mb, policy=(params, base))
            return value_and_grad(params, base, mb, ref, key, loss_state)

        loss, metrics, grads, loss_state = accumulate_with_state(
            grad_fn, state["params"], batch, micro_batches, dropout_rng(state), state.get("loss_state")
        )
        new_state, metrics = apply_gradients(
            state, grads, loss, metrics, tx, lr_schedule, skip_nonfinite=skip_nonfinite
        )
        if loss_state is not None:
            if skip_nonfinite:  # a skipped step keeps the state it started from
                keep = metrics["nonfinite"] > 0
                loss_state = jax.tree.map(lambda new, old: jnp.where(keep, old, new), loss_state, state["loss_state"])
            new_state["loss_state"] = loss_state
        if reference_sync is not None:
            new_state["reference"] = sync_reference(
                state["reference"], new_state["params"], new_state["step"], reference_sync
            )
        return new_state, metrics

    return train_step


def make_unpaired_eval_step(
    graphdef: nnx.GraphDef,
    rest: Any,
    loss_fn,
    *,
    compute_dtype,
    vocab_chunk_size: int | None = None,
    ref_graphdefs: tuple = (),
    score_window: int | None = None,
):
    """Build `eval_step(params, batch, ref_params, [loss_state,] frozen=None) -> (Σ per-row loss, Σ valid rows,
    metrics)` for an unpaired `loss_fn` (a stateful loss takes the train state's `loss_state`, not updated)."""

    def logps(gd, p, r, b, key=None):
        return response_logps(
            gd, p, r, b, compute_dtype=compute_dtype, vocab_chunk_size=vocab_chunk_size, score_window=score_window
        )

    def evaluate(params, batch, ref_params, loss_state, frozen):
        base = rest if frozen is None else frozen
        ref = step_reference_logps(logps, ref_graphdefs, ref_params, batch, policy=(params, base))
        own, kl = policy_logps(
            lambda p, r, b, k: logps(graphdef, p, r, b), params, base, batch, None, loss_fn.spec.requires_kl_logps
        )
        out = call_loss(loss_fn, unpaired_inputs(own, kl, batch, ref), loss_state, update_state=False)
        weight = batch["valid"][:, 0].astype(jnp.float32)
        return jnp.sum(out.per_example * weight), jnp.sum(weight), out.metrics

    if loss_fn.spec.stateful:

        def eval_step(params, batch, ref_params, loss_state, frozen=None):
            return evaluate(params, batch, ref_params, loss_state, frozen)

        return eval_step

    def eval_step(params, batch, ref_params=(), frozen=None):  # noqa: F811 - one of the two is returned
        return evaluate(params, batch, ref_params, None, frozen)

    return eval_step
