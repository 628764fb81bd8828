"""Recipes load and name valid losses; mesh sizes resolve; schedules and weight-decay masks are right."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from rpo_jax.losses import available_losses
from rpo_jax.models.config import REMAT_POLICIES
from rpo_jax.models.sharding import resolve_mesh_shape
from rpo_jax.train.build.data import load_records
from rpo_jax.train.build.optim import make_optimizer, make_schedule, weight_decay_mask
from rpo_jax.train.build.state import build_loss
from rpo_jax.train.config.defaults import base_config
from rpo_jax.train.runtime.performance import flops_per_token

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[2] / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_loads_and_builds_its_loss(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    assert cfg.loss.name in available_losses()
    assert cfg.model.remat in REMAT_POLICIES
    assert cfg.model.dtype in ("auto", "float32", "bfloat16")
    loss_fn = build_loss(cfg)
    assert callable(loss_fn)
    assert math.prod(s for a, s in dict(cfg.mesh).items() if a != "processes" and s > 0) >= 1


def test_mesh_shape_fills_minus_one_and_refuses_bad_shapes():
    assert resolve_mesh_shape({"data": -1}, 8) == (8, 1, 1, 1)
    assert resolve_mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2, 1)
    assert resolve_mesh_shape({"data": -1, "context": 4}, 8) == (2, 1, 1, 4)
    with pytest.raises(ValueError, match="multiply to 4"):
        resolve_mesh_shape({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="only one axis"):
        resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        resolve_mesh_shape({"model": 2}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        resolve_mesh_shape({"data": -1, "tensor": 3}, 8)


def test_warmup_then_cosine_schedule_values():
    lr = make_schedule(1.0, total_steps=110, warmup_steps=10, schedule="cosine", end_lr_factor=0.1)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 1.0, rtol=1e-6)
    # halfway through the decay: 0.1 + 0.9 · (1 + cos(π/2)) / 2 = 0.55
    np.testing.assert_allclose(float(lr(60)), 0.55, rtol=1e-5)
    np.testing.assert_allclose(float(lr(110)), 0.1, rtol=1e-5)
    linear = make_schedule(2.0, total_steps=10, schedule="linear")
    np.testing.assert_allclose([float(linear(i)) for i in (0, 5, 10)], [2.0, 1.0, 0.0], atol=1e-6)
    assert float(make_schedule(3.0, 10, schedule="constant")(7)) == 3.0
    with pytest.raises(ValueError, match="schedule"):
        make_schedule(1.0, 10, schedule="exp")


def test_weight_decay_spares_norms_and_vectors():
    params = {
        "layers": {"attn_in_norm": jnp.ones((2, 4)), "q_proj": jnp.ones((2, 4, 4))},
        "embed": jnp.ones((8, 4)),
        "final_norm": jnp.ones((4,)),
    }
    mask = weight_decay_mask("matrices")(params)
    assert mask == {"layers": {"attn_in_norm": False, "q_proj": True}, "embed": True, "final_norm": False}
    tx, _ = make_optimizer(
        {"name": "adamw", "learning_rate": 0.1, "weight_decay": 0.5, "schedule": "constant", "grad_clip_norm": None}, 10
    )
    state = tx.init(params)
    zeros = {
        "layers": {"attn_in_norm": jnp.zeros((2, 4)), "q_proj": jnp.zeros((2, 4, 4))},
        "embed": jnp.zeros((8, 4)),
        "final_norm": jnp.zeros((4,)),
    }
    updates, _ = tx.update(zeros, state, params)
    # zero gradient: only decoupled weight decay moves parameters, by -lr·wd·p = -0.05 on matrices
    np.testing.assert_allclose(updates["embed"], -0.05)
    np.testing.assert_allclose(updates["layers"]["q_proj"], -0.05)
    np.testing.assert_allclose(updates["layers"]["attn_in_norm"], 0.0)
    np.testing.assert_allclose(updates["final_norm"], 0.0)


def test_global_norm_clipping_and_other_optax_optimizers():
    tx, _ = make_optimizer({"name": "sgd", "learning_rate": 1.0, "schedule": "constant", "grad_clip_norm": 1.0}, 5)
    g = {"w": jnp.asarray([3.0, 4.0])}
    updates, _ = tx.update(g, tx.init(g), g)
    np.testing.assert_allclose(updates["w"], [-0.6, -0.8], rtol=1e-6)
    with pytest.raises(ValueError, match="not an optax optimizer"):
        make_optimizer({"name": "nope"}, 5)
    with pytest.raises(ValueError, match="weight_decay"):
        make_optimizer({"name": "sgd", "weight_decay": 0.1}, 5)


def test_flops_per_token_formula():
    # 6·P + 12·L·T·d for training; each in-step reference adds 2·P + 4·L·T·d
    assert flops_per_token(100, 2, 8, 4) == 6 * 100 + 12 * 2 * 8 * 4
    assert flops_per_token(100, 2, 8, 4, num_references=1) == 8 * 100 + 16 * 2 * 8 * 4


def test_data_pairs_counts_and_logs_records_whose_rewards_all_tie(tmp_path, caplog):
    rows = [
        {"prompt": "p0", "responses": ["a", "b", "c"], "rewards": [1.0, 0.0, 0.5]},
        {"prompt": "p1", "responses": ["a", "b", "c"], "rewards": [0.2, 0.2, 0.2]},  # all tie: no pair
        {"prompt": "p2", "responses": ["a", "b"], "rewards": [0.0, 1.0]},
    ]
    path = tmp_path / "k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = base_config()
    cfg.data.train, cfg.data.pairs = str(path), "all"
    with caplog.at_level("WARNING"):
        splits = load_records(cfg)
    # all_pairs: 3 pairs from the first record (1 > 0.5 > 0), 1 from the third, none from the tied one
    assert [(r.source[1], r.rewards) for r in splits["train"]] == [
        (1, (1.0, 0.0)),
        (1, (1.0, 0.5)),
        (1, (0.5, 0.0)),
        (3, (1.0, 0.0)),
    ]
    assert "train data: 1 of 3 records give no pair under data.pairs='all'" in caplog.text
