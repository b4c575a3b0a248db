"""Online and iterative DPO (``recipes/online_dpo_single_device.py``): everything a round needs, in one room.

    rounds.py       the ``online`` settings, a round's prompts and samples, pairs from scored samples, the round's
                    files (what the recipe shares with tests and studies; the module docstring has the rules)
    round_maker.py  ``RoundMaker``: a round as one component (sample, score, pair, write, the reference table; or
                    read a finished round back) and the round's optimizer steps; the rounds' part of output_dir
    rewards.py      ``reward_fn``: a Python function of the texts, or a Hugging Face reward model
    prompts.py      ``prompt_dataset``: the prompts to sample for (the YAML ``prompt_dataset._component_``)

The names below are the room's public API (``dpo_components.online.prompt_dataset`` and
``dpo_components.online.text_reward`` in a config).
"""

from dpo_components.online.prompts import PromptDataset, prompt_dataset
from dpo_components.online.rewards import HFRewardModel, RewardError, TextReward, score, text_reward
from dpo_components.online.rounds import (
    PAIR_RULES,
    REFERENCES,
    OnlineSettings,
    build_pairs,
    fixed_samples,
    pairs_dataset,
    preference_rows,
    read_jsonl,
    round_dir,
    round_figures,
    round_prompt_indices,
    round_samples_of,
    sample_round,
    sampling_seed,
    write_atomic,
    write_jsonl,
)

__all__ = [
    "PAIR_RULES", "REFERENCES", "HFRewardModel", "OnlineSettings", "PromptDataset", "RewardError", "TextReward",
    "build_pairs", "fixed_samples", "pairs_dataset", "preference_rows", "prompt_dataset", "read_jsonl", "round_dir",
    "round_figures", "round_prompt_indices", "round_samples_of", "sample_round", "sampling_seed", "score",
    "text_reward", "write_atomic", "write_jsonl",
]  # fmt: skip
