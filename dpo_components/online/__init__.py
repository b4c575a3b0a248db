"""Online and iterative DPO (``recipes/online_dpo_single_device.py``), everything a round needs in one room: the
``online`` settings and a round's pieces, ``RoundMaker`` (a round as one component), rewards, prompt data (each
module: ``docs/architecture.md``).

The names below are the room's public API (``dpo_components.online.prompt_dataset`` and
``dpo_components.online.text_reward`` in a config).
"""

from dpo_components.online.prompts import PromptDataset, prompt_dataset
from dpo_components.online.rewards import HFRewardModel, RewardError, TextReward, score, text_reward
from dpo_components.online.rounds import (
    PAIR_RULES,
    REFERENCES,
    ROUND_FILES,
    OnlineSettings,
    RoundFiles,
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
)

__all__ = [
    "PAIR_RULES", "REFERENCES", "ROUND_FILES", "HFRewardModel", "OnlineSettings", "PromptDataset", "RewardError",
    "RoundFiles", "TextReward",
    "build_pairs", "fixed_samples", "pairs_dataset", "preference_rows", "prompt_dataset", "read_jsonl", "round_dir",
    "round_figures", "round_prompt_indices", "round_samples_of", "sample_round", "sampling_seed", "score",
    "text_reward",
]  # fmt: skip
