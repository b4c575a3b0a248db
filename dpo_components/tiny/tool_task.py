"""The tiny tool-use task's rows: tool definitions, a question, and two completions (a call, its result, an answer).

Each row has ``tools`` (``get_weather``, ``get_time``, ``get_population``, each taking a ``city``), a question about
one city, and two completions in TRL's conversational form: an assistant tool call, the tool's result (a ``tool``
turn) and the answer from it. The chosen completion calls the right tool for the question's city; the rejected one
calls a wrong tool for the same city. :func:`split_combos` holds out whole cities, so held-out pairs ask about
cities no training pair asks about (a model that learned "this city: that tool" would rank them below chance).

Rows are written in Llama 3.1+'s tool format (tools in the first user turn, JSON calls, ``ipython`` results;
:mod:`dpo_components.data.tools`) with a tokenizer trained on the task's text (:func:`corpus_lines`,
:func:`tool_task_tokenizer`), so a row is ~300 tokens instead of the ~1,400 the sentiment task's vocabulary would
need, within the tiny model's 512 positions. ``tests/components/test_tool_data.py`` checks on them that tool
results carry no loss. :func:`prepare_tool_task` builds a seed's tokenizer, untrained model and data for
``recipe_configs/tiny/full_dpo_tool_use.yaml`` (docs/data.md, "The tiny tool-use task").
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from dpo_components.models.chat_formats import llama3_1_instruct_tokenizer
from dpo_components.tiny.tokenizer import no_tiktoken_cache, train_tiny_tokenizer

CITIES = ("paris", "rome", "oslo", "lima", "cairo", "tokyo", "delhi", "quito", "dakar", "hanoi", "bern", "riga")
QUESTIONS = {
    "get_weather": ("what is the weather in {city} ?", "is it raining in {city} today ?"),
    "get_time": ("what time is it in {city} ?", "what is the local time in {city} ?"),
    "get_population": ("how many people live in {city} ?", "what is the population of {city} ?"),
}
# JSON-schema definitions in the bare form (no "type": "function" wrapper, no descriptions): Llama 3.1+ writes each
# indented by 4, ~40 tokens a tool here, ~85 with the wrapper, a description and "required"
TOOLS = [{"name": name, "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
         for name in QUESTIONS]  # fmt: skip
MAX_LENGTH = 360


def _digit(tool: str, city: str, n: int) -> int:
    return int(hashlib.sha256(f"{tool}/{city}".encode()).hexdigest(), 16) % n


def tool_result(tool: str, city: str) -> str:
    """What the tool says about the city (fixed per pair of them)."""
    if tool == "get_weather":
        return ("sunny", "rain", "snow", "cloudy")[_digit(tool, city, 4)]
    if tool == "get_time":
        return f"{_digit(tool, city, 24):02d}:00"
    return f"{100 + 50 * _digit(tool, city, 40)} thousand"


def answer(tool: str, city: str) -> str:
    """The final answer, from the tool's result."""
    result = tool_result(tool, city)
    return f"{result} people live in {city} ." if tool == "get_population" else f"it is {result} in {city} ."


def completion(tool: str, city: str) -> list[dict[str, Any]]:
    """A call of ``tool`` for ``city``, its result, and the answer from it."""
    call = {"type": "function", "function": {"name": tool, "arguments": {"city": city}}}
    return [{"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": tool_result(tool, city)},
            {"role": "assistant", "content": answer(tool, city)}]  # fmt: skip


def split_combos(seed: int, heldout_cities: int = 3) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) (tool, city) combinations: the held-out pairs ask about cities no training pair asks about
    (with every tool), so the city cannot stand in for the question (a model that learns "this city: that tool"
    from training pairs ranks held-out pairs below chance)."""
    held_cities = random.Random(seed).sample(CITIES, heldout_cities)
    combos = [(tool, city) for tool in QUESTIONS for city in CITIES]
    return [c for c in combos if c[1] not in held_cities], [c for c in combos if c[1] in held_cities]


def preference_rows(combos: list[tuple[str, str]], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` pairs asking about ``combos``: chosen calls the right tool, rejected a wrong one (same city)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tool, city = rng.choice(combos)
        wrong = rng.choice([t for t in QUESTIONS if t != tool])
        question = rng.choice(QUESTIONS[tool]).format(city=city)
        rows.append({"tools": TOOLS, "prompt": [{"role": "user", "content": question}],
                     "chosen": completion(tool, city), "rejected": completion(wrong, city)})  # fmt: skip
    return rows


def corpus_lines() -> list[str]:
    """The task's text for the tokenizer: the template's fixed parts, the tools as written, every question, call,
    result and answer."""
    from dpo_components.data.tools import LLAMA3_TOOLS_PREAMBLE, llama3_tools_text

    lines = [LLAMA3_TOOLS_PREAMBLE, llama3_tools_text(TOOLS), "Environment: ipython\nCutting Knowledge Date: "
             "December 2023\nToday Date: 26 Jul 2024\n\n"]  # fmt: skip
    for tool in QUESTIONS:
        for city in CITIES:
            calls = json.dumps({"name": tool, "parameters": {"city": city}})
            lines += [q.format(city=city) for q in QUESTIONS[tool]] + [calls, json.dumps(tool_result(tool, city)),
                                                                         answer(tool, city)]  # fmt: skip
    return lines * 20


def tool_task_tokenizer(path: str | Path, max_seq_len: int | None = None) -> Any:
    """Llama 3.1+ Instruct's chat format (:func:`llama3_1_instruct_tokenizer`) over the task's tokenizer files in
    ``path`` (a YAML ``_component_``)."""
    path = Path(path)
    with no_tiktoken_cache():
        return llama3_1_instruct_tokenizer(str(path / "tokenizer.model"), max_seq_len=max_seq_len,
                                           special_tokens_path=str(path / "tokenizer.json"))  # fmt: skip


def prepare_tool_task(out_dir: str | Path, seed: int = 0, train_pairs: int = 2000, eval_pairs: int = 200) -> Path:
    """Build (or reuse) the task's inputs under ``out_dir`` (the ``prepare`` step of
    ``recipe_configs/tiny/full_dpo_tool_use.yaml``); returns ``out_dir``:

        tokenizer/            the task's BPE (:func:`corpus_lines`), read by :func:`tool_task_tokenizer`
        base_model/           the tiny model with fresh weights from ``seed`` (HF layout), the policy's start and
                              the reference
        data/train.jsonl      ``train_pairs`` pairs on the cities :func:`split_combos` keeps for training
        data/eval.jsonl       ``eval_pairs`` pairs on the ``seed``'s held-out cities
        manifest.json         the settings and the held-out cities, written last (a killed build is redone)

    The model starts untrained: DPO alone has to learn which tool a question asks for, and the held-out accuracy
    says whether it learned that rather than something about the training cities.
    """
    from dpo_components.tiny.prepare import build_lock

    out_dir = Path(out_dir).expanduser()
    with build_lock(out_dir):  # every rank of a distributed run prepares: one builds, the others reuse
        return _prepare_tool_task_locked(out_dir, {"seed": seed, "train_pairs": train_pairs, "eval_pairs": eval_pairs})


def _prepare_tool_task_locked(out_dir: Path, settings: dict[str, int]) -> Path:
    import torch

    from dpo_components.files import write_json, write_jsonl
    from dpo_components.tiny.model import save_hf_checkpoint, tiny_llama

    seed = settings["seed"]
    manifest_path = out_dir / "manifest.json"
    built = [out_dir / "tokenizer/tokenizer.model", out_dir / "base_model/model.safetensors",
             out_dir / "data/train.jsonl", out_dir / "data/eval.jsonl"]  # fmt: skip
    if manifest_path.exists() and all(path.exists() for path in built):
        if json.loads(manifest_path.read_text()).get("settings") == settings:
            return out_dir
    manifest_path.unlink(missing_ok=True)
    train_tiny_tokenizer(out_dir / "tokenizer", corpus=corpus_lines())
    torch.manual_seed(seed)
    save_hf_checkpoint(tiny_llama(), out_dir / "base_model", tokenizer_dir=out_dir / "tokenizer")
    train, heldout = split_combos(seed)
    for name, combos, row_seed in (("train", train, seed), ("eval", heldout, seed + 1)):
        write_jsonl(out_dir / f"data/{name}.jsonl", preference_rows(combos, settings[f"{name}_pairs"], row_seed))
    heldout_cities = sorted({city for _, city in heldout})
    write_json(manifest_path, {"settings": settings, "heldout_cities": heldout_cities})
    return out_dir
