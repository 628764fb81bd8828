"""Reward-model (Bradley–Terry) train and eval steps: a `RewardModel` scores each pair's chosen and rejected
sequence, `rpo_jax.losses.bradley_terry_loss` compares them, and the optax update is the preference steps' own
(`rpo_jax.train.step.steps.accumulate_gradients` / `apply_gradients`). Jitted by the program builder
(`rpo_jax.train.build.programs.reward_steps`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rpo_jax.losses import bradley_terry_loss, bradley_terry_per_pair
from rpo_jax.models import RewardModel
from rpo_jax.train.step.logprobs import cast_floating, training_dropout
from rpo_jax.train.step.steps import accumulate_gradients, apply_gradients, dropout_rng


def pair_scores(
    model: RewardModel, tokens: jax.Array, attention_mask: jax.Array, label: int = 0
) -> tuple[jax.Array, jax.Array]:
    """tokens, attention_mask [B, 2, T] (index 0 chosen, 1 rejected) → (chosen [B], rejected [B]) float32:
    `model(tokens, attention_mask)[:, label]` of each conversation (the scores `reward_model_fn` gives)."""
    b, k, t = tokens.shape
    flat_mask = attention_mask.reshape(b * k, t)
    flat_mask = flat_mask.at[:, 0].set(True)  # all-padding slots: no empty attention row (their weight is 0)
    scores = model(tokens.reshape(b * k, t), flat_mask)[:, label].reshape(b, k)
    return scores[:, 0], scores[:, 1]


def _loss_inputs(graphdef, params, rest, batch, *, compute_dtype, label, dropout_rng=None):
    model = nnx.merge(graphdef, cast_floating(params, compute_dtype), rest)
    with training_dropout(model.backbone, dropout_rng):  # LoRA dropout in training steps only
        return pair_scores(model, batch["tokens"], batch["attention_mask"], label)


def make_reward_train_step(
    graphdef,
    rest,
    tx: optax.GradientTransformation,
    *,
    compute_dtype,
    label: int = 0,
    center_coefficient: float = 0.0,
    micro_batches: int = 1,
    lr_schedule=None,
    skip_nonfinite: bool = False,
):
    """`train_step(state, batch, frozen=None) -> (state, metrics)`: Bradley–Terry loss on `batch` (tokens,
    attention_mask [B,2,T], weight [B], margin [B]), gradients accumulated over `micro_batches` slices, one optax
    update (`rpo_jax.train.step.steps.accumulate_gradients` / `apply_gradients`). `pairs` counts the batch's pairs.
    `frozen`: the rest as an argument (`rpo_jax.train.step.steps.WithFrozen`; with LoRA the backbone's base); LoRA
    dropout masks come from `dropout_rng(state)`."""

    def micro_loss(params, base, mb, key):
        chosen, rejected = _loss_inputs(
            graphdef, params, base, mb, compute_dtype=compute_dtype, label=label, dropout_rng=key
        )
        return bradley_terry_loss(
            chosen, rejected, mb["weight"], center_coefficient=center_coefficient, margin=mb["margin"]
        )

    value_and_grad = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, batch, frozen=None):
        base = rest if frozen is None else frozen
        grad_fn = lambda params, mb, key: value_and_grad(params, base, mb, key)  # noqa: E731
        loss, metrics, grads = accumulate_gradients(
            grad_fn, state["params"], batch, micro_batches, rng=dropout_rng(state)
        )
        metrics = {**metrics, "pairs": jnp.sum(batch["weight"])}  # a count over the whole batch, not a mean
        return apply_gradients(state, grads, loss, metrics, tx, lr_schedule, skip_nonfinite=skip_nonfinite)

    return train_step


def make_reward_eval_step(graphdef, rest, *, compute_dtype, label: int = 0, center_coefficient: float = 0.0):
    """`eval_step(params, batch, frozen=None) -> sums`: Σ w·ℓ, Σ w, Σ w·[s_c > s_r], Σ w·(s_c − s_r), Σ w·s_c,
    Σ w·s_r (`frozen`: as `make_reward_train_step`'s)."""

    def eval_step(params, batch, frozen=None):
        chosen, rejected = _loss_inputs(
            graphdef, params, rest if frozen is None else frozen, batch, compute_dtype=compute_dtype, label=label
        )
        w = batch["weight"]
        per_pair = bradley_terry_per_pair(
            chosen, rejected, center_coefficient=center_coefficient, margin=batch["margin"]
        )
        return {
            "loss": jnp.sum(w * per_pair),
            "pairs": jnp.sum(w),
            "accuracy": jnp.sum(w * (chosen > rejected)),
            "margin": jnp.sum(w * (chosen - rejected)),
            "chosen_score": jnp.sum(w * chosen),
            "rejected_score": jnp.sum(w * rejected),
        }

    return eval_step
