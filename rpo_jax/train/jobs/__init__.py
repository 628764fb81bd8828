"""The three jobs that plug into the run skeleton (`rpo_jax.train.core.runner`): preference training
(`preference`, the main job), online RPO (`online`) and Bradley–Terry reward models (`reward_model`) — only what is
specific to each.
"""
