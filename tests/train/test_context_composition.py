"""What composes with a context mesh (`config.mesh.context` > 1, ring attention) in the trainers, against the
same runs with the rows whole on each device (mesh {data: 8}) on 8 simulated CPU devices: LoRA and QLoRA
preference training (cached base reference, evaluation), the reward-model trainer; and what does not, refused at
validation with one line naming the setting (online RPO, generation-based evaluation, splash / cuDNN attention, a
numeric score window). The score window on a context mesh: the same values as one device (the head runs on every
position, one shard per device), and "auto" resolves to every position there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rpo_jax.models import make_mesh
from rpo_jax.models.logprobs import sequence_logps
from rpo_jax.train.config.validation import validate
from rpo_jax.train.jobs import preference, reward_model
from tests.train.test_lora_training import lora_config
from tests.train.test_packed_training import GEMMA2, split
from tests.train.test_reward_model_training import tiny_config as reward_config
from tests.train.trainer_testlib import read_metrics, save_tiny_base, set_fields, tiny_config

CONTEXT = {"data": 4, "fsdp": 1, "tensor": 1, "context": 2}
WHOLE = {"data": 8, "fsdp": 1, "tensor": 1}


def _losses(workdir) -> tuple[list[float], list[float]]:
    metrics = read_metrics(workdir)
    return [m["train/loss"] for m in metrics if "train/loss" in m], [
        m["eval/loss"] for m in metrics if "eval/loss" in m
    ]


def _needs_8_devices():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")


@pytest.mark.slow
@pytest.mark.parametrize("base_dtype,reference_mode", [("", "in_step"), ("int8", "cache")], ids=["lora", "qlora"])
def test_lora_and_qlora_with_a_context_axis_take_the_one_device_steps(tmp_path, base_dtype, reference_mode):
    """LoRA with the base (adapters off) as the reference scored in the step, and QLoRA (the base stored int8)
    with it cached: three steps' losses and the eval loss at mesh {data 4, context 2} equal mesh {data 8}'s."""
    _needs_8_devices()
    base = save_tiny_base(tmp_path)
    runs = {}
    for name, mesh in (("whole", WHOLE), ("context", CONTEXT)):
        cfg = lora_config(
            base,
            **{
                "model.lora.base_dtype": base_dtype,
                "reference_mode": reference_mode,
                "data.packing": False,
                "data.max_length": 128,
                "train.steps": 3,
                "train.checkpoint_every": 0,
                "train.eval_every": 3,
                "mesh": mesh,
            },
        )
        preference.train(cfg, tmp_path / name)
        runs[name] = _losses(tmp_path / name)
    (want, want_eval), (got, got_eval) = runs["whole"], runs["context"]
    assert len(want) == 3 and len(want_eval) == 1 and want[-1] != want[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_eval, want_eval, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_reward_model_trainer_with_a_context_axis_takes_the_one_device_steps(tmp_path):
    """The Bradley–Terry trainer (a reward model scoring each conversation's last real token): four steps' losses
    and the held-out loss and accuracy at mesh {data 4, context 2} equal mesh {data 8}'s."""
    _needs_8_devices()
    out = {}
    for name, mesh in (("whole", WHOLE), ("context", CONTEXT)):
        cfg = reward_config(tmp_path / "data", **{"mesh": mesh, "train.checkpoint_every": 0})
        result = reward_model.train_reward_model(cfg, tmp_path / name)
        out[name] = ([m["train/loss"] for m in read_metrics(tmp_path / name) if "train/loss" in m], result["eval"])
    (want, want_eval), (got, got_eval) = out["whole"], out["context"]
    assert len(want) == 4 and want[-1] != want[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert sorted(got_eval) == sorted(want_eval) and "loss" in want_eval
    for key in want_eval:
        np.testing.assert_allclose(got_eval[key], want_eval[key], atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"mode": "online"}, r"^config\.mode='online' does not compose with config\.mesh\.context=2: sampling"),
        (
            {"eval.generation.every": 5},
            r"^config\.eval\.generation\.every=5 does not compose with config\.mesh\.context=2: sampling",
        ),
        ({"model.attention": "splash"}, r"^config\.model\.attention='splash' does not compose with config\.mesh"),
        ({"model.score_window": 64}, r"^config\.model\.score_window=64 with config\.mesh\.context=2: each context"),
    ],
    ids=["online", "generation_eval", "splash", "score_window"],
)
def test_what_does_not_compose_with_a_context_axis_is_one_line_at_validation(tmp_path, fields, match):
    cfg = tiny_config(tmp_path / "data", **{"mesh": CONTEXT, **fields})
    with pytest.raises(ValueError, match=match) as error:
        validate(cfg)
    assert "\n" not in str(error.value)
    if "mode" not in fields:  # the same settings without the context axis are valid
        validate(set_fields(cfg, {"mesh": WHOLE}))


def test_score_window_auto_is_every_position_on_a_context_mesh(tmp_path):
    """`score_window_of`: "auto" gives a window of the data's longest response on mesh {data 8}, and None (every
    position: the head runs on T/C positions per device) on mesh {data 4, context 2}."""
    _needs_8_devices()
    cfg = validate(tiny_config(tmp_path / "data"))
    datasets = {"train": type("Data", (), {"max_scored_span": 40})()}
    assert preference.score_window_of(cfg, datasets, make_mesh(WHOLE)) == 48
    assert preference.score_window_of(cfg, datasets, make_mesh(CONTEXT)) is None


@pytest.mark.slow
def test_a_score_window_on_a_context_mesh_gives_the_one_device_values():
    """`sequence_logps(score_window=W)` on mesh {data 4, context 2} (where the window is not used: every device
    unembeds its own T/C positions) equals one device's full values, and its windowed values for the rows whose
    scored tokens lie in the window; a row whose do not is NaN on one device (`sequence_logps`: loudly wrong) and
    its full value on the context mesh (nothing is truncated there)."""
    _needs_8_devices()
    graphdef, params, rest = split(GEMMA2, 0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 64, (8, 32)).astype(np.int32)
    loss_mask = np.zeros((8, 32), bool)
    for n in range(7):  # scored tokens within 12 positions of each row but the last
        start = int(rng.integers(2, 20))
        loss_mask[n, start : start + int(rng.integers(1, 12))] = True
    loss_mask[7, 2:30] = True  # 28 scored tokens: outside a window of 16 (NaN on one device)
    attention_mask = np.ones((8, 32), bool)

    def logps(p, t, m, a, window):
        return sequence_logps(nnx.merge(graphdef, p, rest), t, m, attention_mask=a, score_window=window)[0]

    args = (tokens, loss_mask, attention_mask)
    full = np.asarray(jax.jit(logps, static_argnums=4)(params, *args, None))
    windowed = np.asarray(jax.jit(logps, static_argnums=4)(params, *args, 16))
    mesh = make_mesh(CONTEXT)
    on_mesh = jax.device_put(
        (params, *map(jnp.asarray, args)), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    )
    context = np.asarray(jax.jit(logps, static_argnums=4)(*on_mesh, 16))
    assert np.isnan(windowed[7]) and np.all(np.isfinite(full))
    np.testing.assert_allclose(windowed[:7], full[:7], rtol=1e-5, atol=0)
    np.testing.assert_allclose(context, full, rtol=1e-5, atol=0)  # every row, the last one too: no window used
