"""Flax NNX Llama and Gemma (1, 2, 3 text) decoders with Hugging Face import/export and sequence log-probs.

Public API: `load_hf`, `save_hf`, `create_model`, `sequence_logps`, `generate` (and
`truncate_at_stop_strings`), `ModelConfig`, `DEFAULT_RULES`,
`make_mesh`; reward models `load_reward_model`, `save_reward_model`, `create_reward_model`, `RewardModel`
(`rpo_jax.models.reward`) and the reward functions `reward_model_fn`, `judge_fn`, `dataset_rewards_fn`
(`RewardFn`) with `encode_conversation` (`rpo_jax.models.reward_functions`).
"""

from rpo_jax.models.config import ModelConfig, RopeSpec
from rpo_jax.models.generate import GenerateOutput, filter_logits, generate, truncate_at_stop_strings
from rpo_jax.models.hf_export import save_hf
from rpo_jax.models.hf_io import load_hf
from rpo_jax.models.logprobs import sequence_logps, token_logps, token_logps_from_hidden
from rpo_jax.models.model import Decoder, create_model
from rpo_jax.models.reward import RewardModel, create_reward_model, load_reward_model, save_reward_model
from rpo_jax.models.reward_functions import RewardFn, dataset_rewards_fn, encode_conversation, judge_fn, reward_model_fn
from rpo_jax.models.sharding import DEFAULT_RULES, logical_to_spec, make_mesh, shard_model, state_shardings

__all__ = [
    "DEFAULT_RULES",
    "Decoder",
    "GenerateOutput",
    "ModelConfig",
    "RewardFn",
    "RewardModel",
    "RopeSpec",
    "create_model",
    "create_reward_model",
    "dataset_rewards_fn",
    "encode_conversation",
    "filter_logits",
    "generate",
    "judge_fn",
    "load_hf",
    "load_reward_model",
    "reward_model_fn",
    "save_hf",
    "save_reward_model",
    "sequence_logps",
    "token_logps",
    "token_logps_from_hidden",
    "truncate_at_stop_strings",
    "logical_to_spec",
    "make_mesh",
    "shard_model",
    "state_shardings",
]
