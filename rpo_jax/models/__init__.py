"""Flax NNX Llama and Gemma (1, 2, 3 text) decoders with Hugging Face import/export and sequence log-probs.

Public API: `load_hf`, `save_hf`, `create_model`, `sequence_logps`, `generate`, `ModelConfig`, `DEFAULT_RULES`,
`make_mesh`.
"""

from rpo_jax.models.config import ModelConfig, RopeSpec
from rpo_jax.models.model import Decoder, create_model
from rpo_jax.models.generate import GenerateOutput, filter_logits, generate
from rpo_jax.models.hf_io import load_hf, save_hf
from rpo_jax.models.logprobs import sequence_logps, token_logps, token_logps_from_hidden
from rpo_jax.models.sharding import DEFAULT_RULES, logical_to_spec, make_mesh, shard_model, state_shardings

__all__ = [
    "DEFAULT_RULES",
    "Decoder",
    "GenerateOutput",
    "ModelConfig",
    "RopeSpec",
    "create_model",
    "filter_logits",
    "generate",
    "load_hf",
    "save_hf",
    "sequence_logps",
    "token_logps",
    "token_logps_from_hidden",
    "logical_to_spec",
    "make_mesh",
    "shard_model",
    "state_shardings",
]
