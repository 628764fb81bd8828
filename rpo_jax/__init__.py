"""rpo_jax: Reward-aware Preference Optimization for language models in JAX/Flax NNX.

Layers (each knows only the one below):
  rpo_jax.data    records -> validated, tokenized, fixed-shape batches [B, K, T]
  rpo_jax.models  Flax NNX Llama/Gemma, Hugging Face import/export, sequence log-probs
  rpo_jax.losses  pure losses on PreferenceLogps -> LossOutput
  rpo_jax.train   mesh, sharding, train step, reference cache, checkpoints, CLI
"""

__version__ = "0.1.0"
