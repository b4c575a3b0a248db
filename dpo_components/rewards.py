"""Moved to :mod:`dpo_components.online.rewards`; this name stays so configs that say
``dpo_components.rewards.text_reward`` (or ``HFRewardModel``) still load."""

from dpo_components.online.rewards import HFRewardModel, Reward, RewardError, TextReward, score, text_reward

__all__ = ["HFRewardModel", "Reward", "RewardError", "TextReward", "score", "text_reward"]
