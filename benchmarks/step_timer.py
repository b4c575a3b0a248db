"""A torchtune metric logger that timestamps every logged step, for the throughput benchmark.

Both our recipes and torchtune's built-in ``lora_dpo_single_device`` call ``log_dict(..., step=N)`` once per
optimizer step (``log_every_n_steps: 1``), right after the step; the time between two calls is one step,
data loading included. ``close()`` writes ``<log_dir>/timing.json``: the timestamps, the process's peak RSS and,
on a GPU, ``torch.cuda.max_memory_allocated``. Selected with
``metric_logger._component_=benchmarks.step_timer.StepTimerLogger`` (the repository root on ``PYTHONPATH``).
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path
from typing import Any

import torch


class StepTimerLogger:
    def __init__(self, log_dir: str, **kwargs: Any) -> None:
        self._path = Path(log_dir) / "timing.json"
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._created = time.perf_counter()
        self._steps: list[tuple[int, float]] = []
        self._last: dict[str, float] = {}

    def log_config(self, config: Any) -> None:
        pass

    def log(self, name: str, data: Any, step: int) -> None:
        self.log_dict({name: data}, step)

    def log_dict(self, payload: dict[str, Any], step: int) -> None:
        if not self._steps or self._steps[-1][0] != step:
            self._steps.append((step, time.perf_counter() - self._created))
        self._last = {k: float(v) for k, v in payload.items() if isinstance(v, (int, float, torch.Tensor))}

    def close(self) -> None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        result = {
            "steps": self._steps,
            "closed": time.perf_counter() - self._created,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "cuda_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "last_metrics": self._last,
        }
        self._path.write_text(json.dumps(result, indent=1))
