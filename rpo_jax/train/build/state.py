"""The train state of a run: the compute dtype, the loss, the optimizer and its state's shardings, the
initial state on the mesh (`build_setup`) and its abstract twin for planning (`abstract_setup`), both a
`RunSetup`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from rpo_jax.losses import make_loss
from rpo_jax.models import ModelConfig
from rpo_jax.train.build.model import abstract_params, split_trainable, with_shardings, with_speed_settings
from rpo_jax.train.build.optim import make_optimizer
from rpo_jax.train.config.validation import with_settings
from rpo_jax.train.runtime.global_batches import replicated


# ------------------------------------------------------------------------------------------------ basics
def compute_dtype(name: str):
    """ "auto" → float32 on CPU, bfloat16 on GPU/TPU; otherwise the named dtype."""
    if name == "auto":
        return jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def build_loss(cfg: ml_collections.ConfigDict):
    """`make_loss` from `config.loss`: the main term (weight `loss.weight`, default 1) plus weighted `extra`
    terms."""
    main = (cfg.loss.name, float(cfg.loss.weight), dict(cfg.loss.hparams))
    extra = [tuple(e) if len(e) == 3 else (e[0], e[1], {}) for e in cfg.loss.extra]
    if not extra and main[1] == 1.0:
        return make_loss(main[0], **main[2])
    return make_loss([main, *extra])


# ------------------------------------------------------------------------------------------------ state
def on_mesh(tree: Any, mesh) -> Any:
    """Leaves already spread over `mesh` keep their sharding (parameters, moments that follow them); any other
    leaf (scalars such as the step or Adam's count) is replicated over the mesh. Every leaf comes back committed
    to its devices, as the jitted step's outputs are, so the step compiles once rather than twice."""
    devices = set(mesh.devices.flat)
    return jax.tree.map(
        lambda x: (
            jax.device_put(x, x.sharding)
            if getattr(x, "sharding", None) is not None and x.sharding.device_set == devices
            else jax.device_put(x, replicated(mesh))
        ),
        tree,
    )


@dataclasses.dataclass
class RunSetup:
    """What every mode builds before its first step; each mode's run adds what is specific to it.

    The train state is `{"params": trainable variables, "opt_state", "step": int32, "rng": key data}` on the
    mesh (`state_shardings` its shardings); `graphdef` and `rest` complete the trained model."""

    config: ml_collections.ConfigDict
    mesh: Any
    dtype: Any  # compute dtype of the step
    tokenizer: Any
    model_config: ModelConfig
    graphdef: Any
    rest: Any
    state: dict[str, Any]
    state_shardings: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule


def model_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The `ModelConfig` fields of dotted config `settings` ({"model.remat": "full", "data.micro_batches": 2} →
    {"remat": "full"})."""
    return {key.removeprefix("model."): value for key, value in settings.items() if key.startswith("model.")}


def lighter_setup(setup: RunSetup, settings: dict[str, Any]) -> RunSetup:
    """`setup` (any mode's run) with result-preserving `settings` (`rpo_jax.train.build.fit.lighter_settings`) in
    its config, its model config and its policy's graphdef (`with_speed_settings`); the same arrays."""
    model = model_settings(settings)
    graphdef = setup.graphdef
    if model:
        graphdef = with_speed_settings(graphdef, setup.state["params"], setup.rest, **model)
    return dataclasses.replace(
        setup,
        config=with_settings(setup.config, settings),
        model_config=dataclasses.replace(setup.model_config, **model),
        graphdef=graphdef,
    )


def optimizer_state_shardings(tx: optax.GradientTransformation, params: Any, mesh) -> Any:
    """Shardings of `tx.init(params)`: every leaf that mirrors a parameter (Adam's moments, ...) takes that
    parameter's sharding, anything else (counts) is replicated. (Left to itself, `jit(tx.init)` replicates the
    moments: zeros depend on no input, and XLA gives them no sharding — 8 bytes per parameter on every chip.)"""
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, params),
        param_shardings,
        transform_non_params=lambda _: replicated(mesh),
    )


def build_setup(
    cfg: ml_collections.ConfigDict,
    model: nnx.Module,
    model_config: ModelConfig,
    *,
    mesh,
    dtype,
    tokenizer,
    total_steps: int,
) -> RunSetup:
    """Split `model` into trainable parameters and the rest, build `config.optimizer` for `total_steps`, and place
    the initial train state (RNG from `config.seed`) on `mesh`."""
    graphdef, params, rest = split_trainable(model)
    tx, schedule = make_optimizer(cfg.optimizer, total_steps)
    opt_state = jax.jit(tx.init, out_shardings=optimizer_state_shardings(tx, params, mesh))(params)
    state = {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(cfg.seed)),
    }
    state = on_mesh(state, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return RunSetup(cfg, mesh, dtype, tokenizer, model_config, graphdef, rest, state, shardings, tx, schedule)


def abstract_setup(
    cfg: ml_collections.ConfigDict,
    model_config: ModelConfig,
    *,
    mesh,
    dtype,
    total_steps: int,
    reward_labels: int | None = None,
) -> RunSetup:
    """`build_setup`'s RunSetup with abstract values (`abstract_params` of the policy — or with `reward_labels`
    of a reward model — with its LoRA adapters when `config.model.lora` asks for them; the optimizer state's
    shapes with `optimizer_state_shardings`, the step and RNG replicated): every leaf of `state` (and of `rest`) a
    `jax.ShapeDtypeStruct` with a `NamedSharding`."""
    graphdef, params, rest = abstract_params(
        cfg, model_config, mesh=mesh, dtype=dtype, adapters=True, reward_labels=reward_labels
    )
    tx, schedule = make_optimizer(cfg.optimizer, total_steps)
    opt_state = with_shardings(jax.eval_shape(tx.init, params), optimizer_state_shardings(tx, params, mesh))
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(cfg.seed)))
    state = {
        "params": params,
        "opt_state": opt_state,
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh)),
        "rng": jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=replicated(mesh)),
    }
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return RunSetup(cfg, mesh, dtype, None, model_config, graphdef, rest, state, shardings, tx, schedule)
