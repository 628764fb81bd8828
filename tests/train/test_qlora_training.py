"""QLoRA in the trainer (`config.model.lora.base_dtype`): a short run on a quantized base trains the adapters only,
keeps the integer codes bit for bit, and its merged export (`WORKDIR/export`, the adapters merged onto the
dequantized base) is exactly the model it trained, as transformers computes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpo_jax.models.lora import adapters_disabled
from rpo_jax.models.quantize import QuantizedWeight, is_quantized
from rpo_jax.train.jobs import preference
from tests.hf_fixtures import hf_logits
from tests.train.test_lora_training import flat, lora_config, trained_policy
from tests.train.trainer_testlib import save_tiny_base

ONE = jax.devices()[:1]
TOKENS = np.random.default_rng(0).integers(3, 30, size=(2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face checkpoint with the demo tokenizer: the base to quantize."""
    return save_tiny_base(tmp_path_factory.mktemp("qlora_base"))


def test_qlora_run_trains_adapters_on_fixed_codes_and_exports_the_trained_model(base):
    cfg = lora_config(
        base,
        **{
            "model.lora.base_dtype": "int8",
            "train.steps": 3,
            "train.checkpoint_every": 3,
            "train.export_at_end": True,
            "reference_mode": "in_step",
        },
    )
    run = preference.build_run(cfg, base / "probe", devices=ONE)
    codes = {k: v for k, v in flat(run.rest).items() if v.dtype == np.int8}
    assert codes and all("lora" in k for k in flat(run.state["params"]))
    preference.train(cfg, base / "run", devices=ONE)
    step, policy = trained_policy(cfg, base / "run")
    assert step == 3 and is_quantized(policy)
    assert isinstance(policy.layers.q_proj, QuantizedWeight)
    after = {k: v for k, v in flat(jax.tree.map(np.array, policy.layers)).items() if v.dtype == np.int8}
    assert len(after) == len(codes)
    for (k, v), w in zip(sorted(codes.items()), (after[k] for k in sorted(after))):
        np.testing.assert_array_equal(v, w, err_msg=k)  # the codes a fresh load makes are the run's codes
    ours = np.asarray(policy(jnp.asarray(TOKENS)))
    with adapters_disabled(policy):
        base_only = np.asarray(policy(jnp.asarray(TOKENS)))
    assert np.abs(ours - base_only).max() > 1e-4  # the trained adapters change the model
    np.testing.assert_allclose(hf_logits(base / "run" / "export", TOKENS), ours, atol=1e-4)
