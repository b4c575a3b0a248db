"""Moved to :mod:`dpo_components.online.rewards`. This name stays because a reward's ``_component_`` is part of an
online run's fingerprint: a run started with ``dpo_components.rewards.text_reward`` resumes with its own config."""

from dpo_components.online.rewards import HFRewardModel, Reward, RewardError, TextReward, score, text_reward

__all__ = ["HFRewardModel", "Reward", "RewardError", "TextReward", "score", "text_reward"]
