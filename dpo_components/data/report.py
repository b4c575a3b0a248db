"""The data report: what a dataset builder read, kept, skipped and cut, and how many tokens each response trains.

Every dataset builder attaches one (``dataset.report``); every recipe logs it at setup and writes it to
``<output_dir>/data_report.json`` (:func:`dpo_components.data.recipe_data.load_recipe_data`). A one-sided cut (the
rejected response cut while the chosen one is not, or the reverse) biases the pair's margin, so it warns above
:data:`ONE_SIDED_WARNING` of the pairs.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
ONE_SIDED_WARNING = 0.02  # warn when more than this fraction of pairs has exactly one response cut


def token_stats(counts: list[int]) -> dict[str, float]:
    """mean, p50, p95 and max of a list of token counts."""
    if not counts:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0}
    values = np.asarray(counts)
    return {"mean": round(float(values.mean()), 2), "p50": float(np.percentile(values, 50)),
            "p95": float(np.percentile(values, 95)), "max": int(values.max())}  # fmt: skip


@dataclass
class DataReport:
    """Counts of one dataset build. ``sides`` names the responses of a sample (chosen / rejected for pairs, the
    completion for unpaired rows); ``cut`` and ``trained_tokens`` are per side. ``skipped`` counts rows, except for
    unpaired data, where it counts the unrolled items (a pair whose one half is bad keeps the other)."""

    source: str
    rows_read: int
    rows_kept: int
    skipped: dict[str, int]
    max_length: int
    samples: int
    prompt_cut: int
    cut: dict[str, int]
    one_sided_cut: int | None
    trained_tokens: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def of(cls, dataset: Any, rows_read: int, cuts: list[Any], max_length: int) -> DataReport:
        """The report of a built dataset (``PreferenceDataset`` or ``UnpairedDataset``) from each sample's cuts
        (:class:`dpo_components.data.dataset.Cuts`, one per sample, in order)."""
        kind = dataset.data_kind  # "pairs", "unpaired" (KTO) or "prompts" (online DPO: no responses yet)
        sides = {"pairs": ("chosen", "rejected"), "unpaired": ("completion",), "prompts": ()}[kind]
        keys = ("chosen_labels", "rejected_labels")[: len(sides)]
        samples = [dataset[i] for i in range(len(dataset))]
        return cls(
            source=dataset.source,
            rows_read=rows_read,
            rows_kept=len(set(dataset.row_numbers)),
            skipped=dict(dataset.skipped.most_common()),
            max_length=max_length,
            samples=len(samples),
            prompt_cut=sum(c.prompt for c in cuts),
            cut={side: sum(c.responses[k] for c in cuts) for k, side in enumerate(sides)},
            one_sided_cut=sum(c.responses[0] != c.responses[1] for c in cuts) if kind == "pairs" else None,
            trained_tokens={side: token_stats([sum(t >= 0 for t in s[key]) for s in samples])  # -100: not trained
                            for side, key in zip(sides, keys)},  # fmt: skip
        )

    def lines(self) -> list[str]:
        """The report as log lines."""
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.items()) or "none"
        cut = "".join(f", {side} {n}" for side, n in self.cut.items())
        out = [f"{self.source}: {self.rows_read} rows read, {self.rows_kept} kept, skipped: {skipped}"]
        if not self.cut:  # prompts (online DPO): max_length is the prompt's
            out.append(f"  prompts cut to max_prompt_length={self.max_length or None}: {self.prompt_cut} of "
                       f"{self.samples}")  # fmt: skip
        else:
            out.append(f"  cut to max_length={self.max_length}: prompt {self.prompt_cut}{cut} of {self.samples}"
                       + (f" (one response only: {self.one_sided_cut})" if self.one_sided_cut is not None else ""))
        for side, stats in self.trained_tokens.items():
            out.append(f"  trained tokens per {side} response: mean {stats['mean']}, p50 {stats['p50']:g}, "
                       f"p95 {stats['p95']:g}, max {stats['max']}")  # fmt: skip
        return out

    def warning(self) -> str | None:
        """A warning when more than :data:`ONE_SIDED_WARNING` of the pairs have one response cut, else None."""
        if not self.one_sided_cut or self.one_sided_cut <= ONE_SIDED_WARNING * self.samples:
            return None
        return (f"{self.source}: {self.one_sided_cut} of {self.samples} pairs "
                f"({100 * self.one_sided_cut / self.samples:.1f}%) have one response cut by max_length="
                f"{self.max_length} and the other whole: the cut side loses log-probability mass it would have, "
                "which biases those pairs' margins. Raise max_length (or max_prompt_length lower), or filter long "
                "pairs")  # fmt: skip

    def log(self, logger: logging.Logger = log) -> None:
        for line in self.lines():
            logger.info(line)
        if warning := self.warning():
            logger.warning(warning)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
