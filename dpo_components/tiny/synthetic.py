"""A synthetic preference task whose preference a program can check.

It follows the spirit of the DPO paper's IMDb controlled-sentiment experiment (Rafailov et al. 2023, Sec. 6.1):
the prompt is the opening of a short movie review ("the plot was"), the response continues it with a few
clauses, and the ground-truth reward is the review's sentiment. Here the sentiment is computed by a word list
instead of a sentiment classifier, so the reward is exact, cheap and needs no download:

    reward(y) = (#positive adjectives - #negative adjectives) / #adjectives      in [-1, 1]

Everything is generated from a seed:
- ``sft_examples``: (prompt, response) pairs drawn from a neutral "SFT policy" where each adjective is positive,
  negative or neutral with equal probability, so the mean SFT reward is 0;
- ``preference_pairs``: two responses sampled from that same policy for one prompt, the one with the higher
  reward is chosen, as the paper builds its pairs from SFT samples. Pairs whose rewards differ by less than
  ``min_reward_gap`` (0.5 by default) are re-drawn, so every pair has a clear winner: the reward is a ratio,
  and near-ties such as 1/3 vs 1/4 hinge on counting neutral words, which only adds label noise here.

DPO on these pairs should raise the reward of sampled responses towards +1 while an SFT model stays near 0.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

SUBJECTS = (
    "the film", "the plot", "the acting", "the music", "the ending", "the cast", "the script", "the story",
    "the dialogue", "the villain", "the hero", "the pacing", "the soundtrack", "the effects", "the humor",
    "the director",
)  # fmt: skip
VERBS = ("was", "felt", "seemed", "looked", "became", "stayed")
POSITIVE = (
    "great", "wonderful", "brilliant", "moving", "charming", "superb", "delightful", "beautiful", "clever",
    "gripping", "excellent", "fresh",
)  # fmt: skip
NEGATIVE = (
    "boring", "awful", "dull", "terrible", "clumsy", "weak", "bland", "painful", "silly", "messy", "tedious",
    "poor",
)  # fmt: skip
NEUTRAL = (
    "long", "quiet", "loud", "old", "french", "short", "slow", "dark", "simple", "strange", "familiar", "odd",
)  # fmt: skip
CONNECTORS = ("and", "but", "while", "although")

_POSITIVE = frozenset(POSITIVE)
_NEGATIVE = frozenset(NEGATIVE)
_ADJECTIVES = _POSITIVE | _NEGATIVE | frozenset(NEUTRAL)
_WORD = re.compile(r"[a-z]+")
TASK_WORDS = frozenset(" ".join(SUBJECTS + VERBS + POSITIVE + NEGATIVE + NEUTRAL + CONNECTORS).split()) | {"."}
_ALT = lambda words: "(?:" + "|".join(map(re.escape, words)) + ")"  # noqa: E731
# adjective, then any number of clauses "(connector | .) subject verb adjective", then a full stop
_WELL_FORMED = re.compile(
    rf"{_ALT(_ADJECTIVES)}(?: (?:{_ALT(CONNECTORS)}|\.) {_ALT(SUBJECTS)} {_ALT(VERBS)} {_ALT(_ADJECTIVES)})* \."
)


def sentiment_reward(response: str) -> float:
    """The task's ground-truth reward: (#positive - #negative) / #adjectives, 0.0 when there is no adjective.

    Words are matched case-insensitively; anything that is not one of the task's adjectives is ignored, so a
    degenerate response ("great great great") scores 1.0 by this reward, as a sentiment classifier would.
    """
    words = _WORD.findall(response.lower())
    adjectives = [w for w in words if w in _ADJECTIVES]
    if not adjectives:
        return 0.0
    positive = sum(w in _POSITIVE for w in adjectives)
    negative = sum(w in _NEGATIVE for w in adjectives)
    return (positive - negative) / len(adjectives)


def keyword_reward(response: str) -> float:
    """A reward that can be gamed, for studies of reward hacking: the number of positive adjectives that occur
    anywhere in the text, as substrings (inside glued non-words too: "greatful" counts), minus the negative ones.

    Unlike :func:`sentiment_reward` it is not a share: a response scores more for every positive word it adds, so
    longer responses and repeated or glued positive words pay, with no check of grammar or fluency.
    """
    text = response.lower()
    return float(sum(text.count(w) for w in POSITIVE) - sum(text.count(w) for w in NEGATIVE))


def task_word_share(response: str) -> float:
    """Fluency at the word level: the share of the response's words (split on spaces) that are words of the task.

    The SFT policy scores 1.0; a policy pushed far from it starts to glue sub-word pieces into non-words
    ("casterful"), which count as misses. 0.0 for an empty response.
    """
    words = response.lower().split()
    return sum(w in TASK_WORDS for w in words) / len(words) if words else 0.0


def is_well_formed(response: str) -> bool:
    """Fluency at the sentence level: does the response follow the task's grammar?

    ``adjective ((connector | .) subject verb adjective)* .``, e.g. "dull . the plot was great and the cast felt
    clever ." (any number of clauses, the SFT data has 1-3).
    """
    return _WELL_FORMED.fullmatch(" ".join(response.lower().split())) is not None


def sample_prompt(rng: random.Random) -> str:
    """The opening of a review: a subject and a verb, e.g. "the plot was"."""
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)}"


def _adjective(rng: random.Random) -> str:
    return rng.choice(rng.choice((POSITIVE, NEGATIVE, NEUTRAL)))


def sample_response(rng: random.Random) -> str:
    """A continuation from the neutral SFT policy: an adjective that completes the prompt, then 1-3 clauses."""
    parts = [_adjective(rng)]
    for _ in range(rng.randint(1, 3)):
        clause = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {_adjective(rng)}"
        parts.append(f"{rng.choice(CONNECTORS)} {clause}" if rng.random() < 0.5 else f". {clause}")
    return " ".join(parts) + " ."


def sft_examples(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` SFT rows ``{"prompt", "response"}`` drawn from the neutral policy."""
    rng = random.Random(seed)
    return [{"prompt": sample_prompt(rng), "response": sample_response(rng)} for _ in range(n)]


def preference_pairs(
    n: int, seed: int, min_reward_gap: float = 0.5, label_noise: float = 0.0
) -> list[dict[str, object]]:
    """``n`` explicit-format preference rows ``{"prompt", "chosen", "rejected"}`` labelled by ``sentiment_reward``.

    Both responses are drawn from the SFT policy for the same prompt; a pair whose rewards differ by less than
    ``min_reward_gap`` (or are equal) is re-drawn. Each row also carries both rewards (of its "chosen" and
    "rejected" response, so a flipped row shows ``chosen_reward < rejected_reward``).

    ``label_noise`` flips chosen and rejected in exactly ``round(label_noise * n)`` rows, picked at random: the
    noisy annotators that cDPO (label smoothing) and robust DPO are built for. The rows themselves are the same
    as without noise.
    """
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be a share in [0, 1], got {label_noise}")
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        prompt, a, b = sample_prompt(rng), sample_response(rng), sample_response(rng)
        reward_a, reward_b = sentiment_reward(a), sentiment_reward(b)
        if reward_a == reward_b or abs(reward_a - reward_b) < min_reward_gap:
            continue
        (chosen, r_chosen), (rejected, r_rejected) = sorted([(a, reward_a), (b, reward_b)], key=lambda x: -x[1])
        rows.append(
            {"prompt": prompt, "chosen": chosen, "rejected": rejected,
             "chosen_reward": r_chosen, "rejected_reward": r_rejected}
        )  # fmt: skip
    for i in random.Random(f"{seed}-noise").sample(range(n), round(label_noise * n)):
        row = rows[i]
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
        row["chosen_reward"], row["rejected_reward"] = row["rejected_reward"], row["chosen_reward"]
    return rows


def near_duplicate_pairs(n: int, seed: int) -> list[dict[str, object]]:
    """``n`` preference rows whose two responses differ in one word: the chosen response is drawn from the SFT
    policy (one with a positive adjective), the rejected one is the same text with one positive adjective swapped
    for a negative one. The data that displaces: chosen and rejected look alike to the model, so pushing the
    rejected one down drags the chosen one with it (docs/losses.md#likelihood-displacement)."""
    rng = random.Random(f"{seed}-near-duplicates")
    rows = []
    while len(rows) < n:
        prompt, chosen = sample_prompt(rng), sample_response(rng)
        words = chosen.split()
        positive = [i for i, w in enumerate(words) if w in _POSITIVE]
        if not positive:
            continue
        words[rng.choice(positive)] = rng.choice(NEGATIVE)
        rejected = " ".join(words)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "chosen_reward": sentiment_reward(chosen), "rejected_reward": sentiment_reward(rejected)})
    return rows


def corpus_lines(seed: int = 0, n: int = 2000, turns_apart: bool = False) -> Iterator[str]:
    """Plain-text lines covering every word of the task, used to train the tiny tokenizers.

    ``turns_apart=True`` yields prompt and response as separate lines, as a chat format tokenizes them: a
    response's first word then comes without a leading space ("awful", not " awful"), and a BPE trained on these
    lines learns it as one token too, instead of pieces ("a" "wful") a model can recombine into non-words.
    """
    for row in sft_examples(n, seed):
        if turns_apart:
            yield row["prompt"]
            yield row["response"]
        else:
            yield f"{row['prompt']} {row['response']}"
    yield " ".join(SUBJECTS + VERBS + POSITIVE + NEGATIVE + NEUTRAL + CONNECTORS)
    yield "system user assistant"  # the chat headers' role names


def write_jsonl(rows: list[dict[str, object]], path: str | Path) -> Path:
    """Write rows as JSON lines (the format ``datasets.load_dataset("json", ...)`` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
