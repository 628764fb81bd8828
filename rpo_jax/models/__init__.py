"""Flax NNX Llama and Gemma (1, 2, 3 text) decoders with Hugging Face import/export and sequence log-probs.

Public API: `load_hf`, `save_hf`, `create_model`, `sequence_logps`, `generate` (and
`truncate_at_stop_strings`), `ModelConfig`, `DEFAULT_RULES`,
`make_mesh`; reward models `load_reward_model`, `save_reward_model`, `create_reward_model`, `RewardModel`
(`rpo_jax.models.reward`) and the reward functions `reward_model_fn`, `judge_fn`, `dataset_rewards_fn`
(`RewardFn`) with `encode_conversation` (`rpo_jax.models.reward_functions`); generation-based evaluation: pairwise
judges (`reward_judge`, `llm_judge`: `rpo_jax.models.judges`) and their statistics (`win_rate`,
`paired_bootstrap_ci`, `lc_win_rate`, ...: `rpo_jax.models.win_rates`).
"""

from rpo_jax.models.config import ModelConfig, RopeSpec
from rpo_jax.models.generate import GenerateOutput, filter_logits, generate, truncate_at_stop_strings
from rpo_jax.models.hf_export import save_hf
from rpo_jax.models.hf_io import load_hf
from rpo_jax.models.judges import Judgment, PairJudge, decoder_next_token_logps, llm_judge, position_bias, reward_judge
from rpo_jax.models.logprobs import sequence_logps, token_logps, token_logps_from_hidden
from rpo_jax.models.model import Decoder, create_model
from rpo_jax.models.reward import RewardModel, create_reward_model, load_reward_model, save_reward_model
from rpo_jax.models.reward_functions import RewardFn, dataset_rewards_fn, encode_conversation, judge_fn, reward_model_fn
from rpo_jax.models.sharding import DEFAULT_RULES, logical_to_spec, make_mesh, shard_model, state_shardings
from rpo_jax.models.win_rates import distinct_n, kl_estimate, lc_win_rate, length_ratio, paired_bootstrap_ci, win_rate

__all__ = [
    "DEFAULT_RULES",
    "Decoder",
    "GenerateOutput",
    "Judgment",
    "PairJudge",
    "ModelConfig",
    "RewardFn",
    "RewardModel",
    "RopeSpec",
    "create_model",
    "create_reward_model",
    "dataset_rewards_fn",
    "decoder_next_token_logps",
    "distinct_n",
    "encode_conversation",
    "filter_logits",
    "generate",
    "judge_fn",
    "kl_estimate",
    "lc_win_rate",
    "length_ratio",
    "llm_judge",
    "load_hf",
    "load_reward_model",
    "paired_bootstrap_ci",
    "position_bias",
    "reward_judge",
    "reward_model_fn",
    "save_hf",
    "save_reward_model",
    "sequence_logps",
    "token_logps",
    "token_logps_from_hidden",
    "truncate_at_stop_strings",
    "win_rate",
    "logical_to_spec",
    "make_mesh",
    "shard_model",
    "state_shardings",
]
