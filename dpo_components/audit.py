"""Which preference pairs will pull their chosen response down: the data audit.

Per pair, the CHES score of the reference model (Razin et al. 2024, "Unintentional Unalignment", arXiv 2410.08847,
Sec. 5), the length-normalised form:

    CHES(x, y+, y-) = <mean h+, mean h-> - ||mean h+||^2

with h the final hidden states (after the last norm, what the output projection sees) at the positions that
predict the response's tokens, from the last prompt token to the second-to-last response token. High CHES: the two
responses look alike to the model, and pushing the rejected one down drags the chosen one with it (likelihood
displacement). Also per pair, in tokens: the edit distance of the two responses and the length of their shared
prefix.

Two ways to get it, one computation: a precomputed reference's pass (``reference.mode: precomputed``) collects
the hidden states in the same forward (:class:`ResponseHiddenSums` is the log-prob head's ``hidden_sink``), keeps
CHES in the cache beside the log-probs, and the recipe writes ``<output_dir>/data_audit.json`` at setup;
``python -m dpo_components.tools.audit --config ...`` makes the same report on any config before training.
docs/losses.md#likelihood-displacement says what to do with it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchtune.modules.transforms.tokenizers import ModelTokenizer
from tqdm import tqdm

from dpo_components.data import PreferenceDataset, decode_text
from dpo_components.files import write_json
from dpo_components.logprobs import concatenated_logprobs

EDIT_DISTANCE_MAX_TOKENS = 2048  # longer responses: the edit distance is left out (None), the rest is computed


class ResponseHiddenSums:
    """A ``hidden_sink`` for the log-prob head (``logprobs.scored_logprobs``): per sequence of the last forward,
    the sum of the final hidden states over the positions that predict its response tokens (fp32), and their
    count. Any batch layout (standard, prefix-shared, packed): the head scores exactly those positions."""

    def __init__(self) -> None:
        self.sums: Tensor | None = None
        self.counts: Tensor | None = None

    def __call__(self, hidden: Tensor, sequence_ids: Tensor, num_sequences: int) -> None:
        sums = torch.zeros(num_sequences, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
        for h, ids in zip(hidden.detach().split(4096), sequence_ids.split(4096)):  # fp32 a slice at a time
            sums.index_add_(0, ids, h.float())
        self.sums, self.counts = sums, torch.bincount(sequence_ids, minlength=num_sequences)

    def pair_ches(self) -> Tensor:
        """CHES per pair of a concatenated batch (sequence i chosen, i + B rejected), [B] fp32."""
        b = len(self.sums) // 2
        return ches(self.sums[:b], self.sums[b:], self.counts[:b], self.counts[b:])


def ches(chosen_sum: Tensor, rejected_sum: Tensor, chosen_count: Tensor, rejected_count: Tensor) -> Tensor:
    """Length-normalised CHES per pair: <mean h+, mean h-> - ||mean h+||^2 (Razin et al. 2024)."""
    chosen = chosen_sum / chosen_count.clamp(min=1).unsqueeze(-1)
    rejected = rejected_sum / rejected_count.clamp(min=1).unsqueeze(-1)
    return (chosen * rejected).sum(-1) - (chosen * chosen).sum(-1)


def edit_distance(a: list[int], b: list[int]) -> int | None:
    """Levenshtein distance of two token sequences (a row of the table at a time in numpy); None above
    :data:`EDIT_DISTANCE_MAX_TOKENS` tokens."""
    if max(len(a), len(b)) > EDIT_DISTANCE_MAX_TOKENS:
        return None
    if not a or not b:
        return max(len(a), len(b))
    target = np.asarray(b)
    steps = np.arange(len(b) + 1)
    previous = steps.copy()
    for i, token in enumerate(a, 1):
        current = np.empty_like(previous)
        current[0] = i
        current[1:] = np.minimum(previous[1:] + 1, previous[:-1] + (target != token))  # deletion, substitution
        current = np.minimum.accumulate(current - steps) + steps  # insertions, left to right
        previous = current
    return int(previous[-1])


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def audit_pairs(
    model: nn.Module,
    dataset: PreferenceDataset,
    collate: Callable,
    batch_size: int,
    device: torch.device,
    chunk_size: int = 256,
    flex_attention: bool = True,
) -> list[float]:
    """Every pair's CHES under ``model`` (one no-grad forward per batch, the model in eval mode), by dataset index;
    the standalone pass (a precomputed reference's pass computes the same values on the way)."""
    was_training = model.training
    model.eval()
    values = torch.zeros(len(dataset), dtype=torch.float32)
    for start in tqdm(range(0, len(dataset), batch_size), desc="audit", dynamic_ncols=True):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        sink = ResponseHiddenSums()
        concatenated_logprobs(model, {k: v.to(device) for k, v in batch.items()}, chunk_size, flex_attention, sink)
        values[batch["index"]] = sink.pair_ches().cpu()
    model.train(was_training)
    return values.tolist()


def _summary(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)),
            "p95": float(np.percentile(array, 95)), "max": float(array.max())}  # fmt: skip


def audit_report(
    dataset: PreferenceDataset,
    ches_values: list[float],
    tokenizer: ModelTokenizer | None,
    top: int = 20,
    every_edit_distance: bool = True,
) -> dict[str, Any]:
    """The report of a dataset's CHES values: a summary, the ``top`` pairs with the highest CHES (with their text
    when a ``tokenizer`` is given), and every pair's figures (``index``, source ``row``, ``ches``,
    ``edit_distance``, ``shared_prefix``, response lengths). ``every_edit_distance`` False: the edit distance
    (quadratic in the response length) only for the ``top`` pairs, as a recipe's setup computes it."""
    pairs = []
    for i, score in enumerate(ches_values):
        chosen, rejected = dataset[i]["chosen_response_ids"], dataset[i]["rejected_response_ids"]
        pairs.append({"index": i, "row": dataset.row_numbers[i], "ches": score,
                      "edit_distance": edit_distance(chosen, rejected) if every_edit_distance else None,
                      "shared_prefix": shared_prefix(chosen, rejected), "chosen_tokens": len(chosen),
                      "rejected_tokens": len(rejected)})  # fmt: skip
    most_similar = []
    for p in sorted(pairs, key=lambda p: -p["ches"])[:top]:
        item = dataset[p["index"]]
        chosen, rejected = item["chosen_response_ids"], item["rejected_response_ids"]
        p["edit_distance"] = edit_distance(chosen, rejected)
        text = {} if tokenizer is None else {
            "prompt": decode_text(tokenizer, item["prompt_ids"]), "chosen": decode_text(tokenizer, chosen),
            "rejected": decode_text(tokenizer, rejected),
        }  # fmt: skip
        most_similar.append({**p, **text})
    distances = [p["edit_distance"] for p in pairs if p["edit_distance"] is not None]
    return {
        "source": dataset.source, "pairs": len(pairs), "ches": _summary([p["ches"] for p in pairs]),
        "edit_distance": _summary(distances) if distances and every_edit_distance else None,
        "shared_prefix": _summary([p["shared_prefix"] for p in pairs]),
        "most_similar": most_similar, "per_pair": pairs,
    }  # fmt: skip


def write_audit(path: str | Path, report: dict[str, Any]) -> None:
    write_json(path, report, "the data audit")
    report["path"] = str(path)


def describe(report: dict[str, Any]) -> str:
    """The report's summary, a few lines for the log."""
    c, e, s = report["ches"], report["edit_distance"], report["shared_prefix"]
    lines = [f"data audit: {report['pairs']} pairs of {report['source']}; per pair:",
             f"  CHES (length-normalised; high: the responses look alike to the model): mean {c['mean']:.3g}, "
             f"p50 {c['p50']:.3g}, p95 {c['p95']:.3g}, max {c['max']:.3g}",
             f"  shared prefix, tokens: mean {s['mean']:.1f}, p50 {s['p50']:.0f}, max {s['max']:.0f}"]  # fmt: skip
    if e:
        lines.append(f"  edit distance, tokens: mean {e['mean']:.1f}, p50 {e['p50']:.0f}, p95 {e['p95']:.0f}")
    lines.append(f"the {len(report['most_similar'])} most similar pairs (highest CHES), with their rows: "
                 f"{report.get('path')} (docs/losses.md#likelihood-displacement)")  # fmt: skip
    return "\n".join(lines)
