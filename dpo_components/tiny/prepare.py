"""Prepare the tiny demo/test setup: an SFT'd tiny model and the synthetic preference data, all from a seed.

    python -m dpo_components.tiny.prepare --out-dir ~/.cache/dpo_recipes/tiny

writes (and on later calls reuses, when the manifest matches):

    <out-dir>/sft_model/   config.json, model.safetensors, tokenizer files   (HF layout, the DPO starting point)
    <out-dir>/data/train.jsonl, eval.jsonl                                  (explicit-format preference pairs)
    <out-dir>/manifest.json                                                 (settings, SFT loss, sample reward)

Like the DPO paper's IMDb experiment, the model is first fine-tuned (SFT) on the task's neutral responses, so
it writes well-formed reviews with mean sentiment reward near 0; DPO then has something to move.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from torchtune.data import Message
from torchtune.modules import TransformerDecoder
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from dpo_components.logprobs import IGNORE_INDEX, sequence_logprobs
from dpo_components.samples import decode_response, generate_padded
from dpo_components.tiny import synthetic
from dpo_components.tiny.model import TINY_LLAMA_ARGS, save_hf_checkpoint, tiny_llama
from dpo_components.tiny.tokenizer import ASSET_DIR as TOKENIZER_DIR
from dpo_components.tiny.tokenizer import tiny_tokenizer

DEFAULTS: dict[str, Any] = {
    "seed": 0, "sft_examples": 8000, "sft_steps": 250, "sft_batch_size": 16, "sft_lr": 3e-3,
    "train_pairs": 2000, "eval_pairs": 200,
}  # fmt: skip


def _sft_batch(tokenizer: ModelTokenizer, rows: list[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, labels = [], []
    for row in rows:
        messages = [Message("user", row["prompt"], masked=True), Message("assistant", row["response"])]
        tokens, mask = tokenizer.tokenize_messages(messages)
        inputs.append(torch.tensor(tokens))
        labels.append(torch.tensor([IGNORE_INDEX if m else t for t, m in zip(tokens, mask)]))
    return (
        pad_sequence(inputs, batch_first=True, padding_value=tokenizer.pad_id),
        pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
    )


def sft_train(
    model: TransformerDecoder, tokenizer: ModelTokenizer, rows: list[dict[str, str]], *,
    steps: int, batch_size: int, lr: float, seed: int,
) -> list[float]:  # fmt: skip
    """Plain SFT (token-mean NLL of the response) with AdamW and warmup + cosine decay; returns the losses."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses = []
    model.train()
    for _ in range(steps):
        input_ids, labels = _sft_batch(tokenizer, rng.sample(rows, batch_size))
        logps, counts = sequence_logprobs(model, input_ids, labels)
        loss = -logps.sum() / counts.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def sample_responses(
    model: TransformerDecoder, tokenizer: ModelTokenizer, prompts: list[str], *,
    max_new_tokens: int = 40, temperature: float = 1.0, seed: int = 0,
) -> list[str]:  # fmt: skip
    """Sample one response per prompt in chat format with torchtune's ``generate`` (KV-cached), until end of turn.

    Prompts are batched by token length, so no padding enters the attention.
    """
    generator = torch.Generator().manual_seed(seed)
    by_length: dict[int, list[int]] = {}
    encoded = []
    for i, prompt in enumerate(prompts):
        messages = [Message("user", prompt), Message("assistant", "")]
        tokens, _ = tokenizer.tokenize_messages(messages, add_end_tokens=False)
        encoded.append(tokens)
        by_length.setdefault(len(tokens), []).append(i)
    responses = [""] * len(prompts)
    for indices in by_length.values():
        sampled = generate_padded(model, [encoded[i] for i in indices], pad_id=tokenizer.pad_id,
                                  stop_tokens=tokenizer.stop_tokens, max_new_tokens=max_new_tokens,
                                  temperature=temperature, rng=generator)  # fmt: skip
        for i, ids in zip(indices, sampled):
            responses[i] = decode_response(tokenizer, ids)
    return responses


def mean_sampled_reward(model: TransformerDecoder, tokenizer: ModelTokenizer, n: int = 256, seed: int = 1) -> float:
    """Mean ``sentiment_reward`` of responses sampled (temperature 1) for ``n`` fresh task prompts."""
    rng = random.Random(seed)
    prompts = [synthetic.sample_prompt(rng) for _ in range(n)]
    responses = sample_responses(model, tokenizer, prompts, seed=seed)
    return sum(map(synthetic.sentiment_reward, responses)) / n


def prepare_tiny(out_dir: str | Path, force: bool = False, **overrides: Any) -> Path:
    """Create (or reuse) the SFT'd tiny model and the preference data under ``out_dir``; returns ``out_dir``.

    Safe to call from several processes at once (the ranks of a distributed run): a file lock beside ``out_dir``
    lets one build while the others wait and then reuse it. The manifest is written last, so a killed build is
    redone on the next call.
    """
    out_dir = Path(out_dir).expanduser()
    with build_lock(out_dir):
        return _prepare_locked(out_dir, force, {**DEFAULTS, **overrides})


@contextlib.contextmanager
def build_lock(out_dir: Path) -> Iterator[None]:
    """An exclusive file lock beside ``out_dir`` for the block: the ranks of a distributed run that all prepare the
    same directory build it once (the first) and then reuse it (the others, after waiting)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _built_with() -> dict[str, Any]:
    """What else the cached model depends on: an older cache (another tokenizer or model size) is rebuilt."""
    tokenizer = hashlib.sha256((TOKENIZER_DIR / "tokenizer.model").read_bytes()).hexdigest()[:16]
    return {"tokenizer": tokenizer, "model": TINY_LLAMA_ARGS}


def _prepare_locked(out_dir: Path, force: bool, settings: dict[str, Any]) -> Path:
    manifest_path = out_dir / "manifest.json"
    files = [out_dir / "sft_model/model.safetensors", out_dir / "data/train.jsonl", out_dir / "data/eval.jsonl"]
    if not force and manifest_path.exists() and all(f.exists() for f in files):
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") == settings and manifest.get("built_with") == _built_with():
            return out_dir
    manifest_path.unlink(missing_ok=True)

    seed = settings["seed"]
    synthetic.write_jsonl(synthetic.preference_pairs(settings["train_pairs"], seed + 1), out_dir / "data/train.jsonl")
    synthetic.write_jsonl(synthetic.preference_pairs(settings["eval_pairs"], seed + 2), out_dir / "data/eval.jsonl")

    torch.manual_seed(seed)
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    start = time.perf_counter()
    losses = sft_train(
        model, tokenizer, synthetic.sft_examples(settings["sft_examples"], seed + 3),
        steps=settings["sft_steps"], batch_size=settings["sft_batch_size"], lr=settings["sft_lr"], seed=seed,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    save_hf_checkpoint(model, out_dir / "sft_model")
    manifest = {
        "settings": settings,
        "built_with": _built_with(),
        "sft_first_loss": losses[0],
        "sft_final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "sft_seconds": round(seconds, 1),
        "sft_sampled_reward": mean_sampled_reward(model, tokenizer),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir


def noisy_train_file(out_dir: str | Path, label_noise: float) -> Path:
    """The training pairs of a prepared ``out_dir`` with a share ``label_noise`` of them flipped (chosen and
    rejected swapped; :func:`dpo_components.tiny.synthetic.preference_pairs`), written beside ``data/train.jsonl``."""
    out_dir = Path(out_dir)
    settings = json.loads((out_dir / "manifest.json").read_text())["settings"]
    path = out_dir / f"data/train_noise{label_noise:g}.jsonl"
    rows = synthetic.preference_pairs(settings["train_pairs"], settings["seed"] + 1, label_noise=label_noise)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp.name, path)  # concurrent runs may write it at once: each writes whole, identical rows
    return path


UNPAIRED_VARIANTS = ("imbalanced_1to4", "no_pairs")


def unpaired_train_file(out_dir: str | Path, variant: str) -> Path:
    """Unpaired rows ``{"prompt", "completion", "label"}`` from the training pairs of a prepared ``out_dir``, for the
    KTO study (:mod:`dpo_components.tools.frontier`), written beside ``data/train.jsonl``:

    - ``"imbalanced_1to4"``: every rejected response (undesirable) and the chosen responses of the first quarter of
      the pairs (desirable): 1 desirable to 4 undesirable, the KTO paper's setting of discarded desirable data.
    - ``"no_pairs"``: no prompt has both labels. The task's prompt texts are split in two halves; desirable rows are
      the chosen responses of pairs whose prompt is in one half, undesirable rows the rejected responses of pairs
      whose prompt is in the other. Drawn from twice the training pairs (the first ones are ``train.jsonl``'s), so
      there are about as many rows as the unrolled pairs.
    """
    out_dir = Path(out_dir)
    settings = json.loads((out_dir / "manifest.json").read_text())["settings"]
    n = settings["train_pairs"]
    if variant == "imbalanced_1to4":
        pairs = synthetic.preference_pairs(n, settings["seed"] + 1)
        rows = [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in pairs]
        rows += [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in pairs[: n // 4]]
        random.Random(settings["seed"]).shuffle(rows)  # the file order; the recipe shuffles again per epoch
    elif variant == "no_pairs":
        pairs = synthetic.preference_pairs(2 * n, settings["seed"] + 1)
        prompts = sorted({p["prompt"] for p in pairs})
        desirable_prompts = set(prompts[::2])
        rows = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} if p["prompt"] in desirable_prompts
                else {"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in pairs]  # fmt: skip
    else:
        raise ValueError(f"unknown unpaired variant {variant!r}; expected one of {UNPAIRED_VARIANTS}")
    path = out_dir / f"data/train_{variant}.jsonl"
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp.name, path)  # concurrent runs may write it at once: each writes whole, identical rows
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Prepare the SFT'd tiny model and synthetic preference data.")
    parser.add_argument("--out-dir", default="~/.cache/dpo_recipes/tiny")
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching cache exists")
    parser.add_argument("--sft-steps", type=int, default=DEFAULTS["sft_steps"])
    args = parser.parse_args()
    out_dir = prepare_tiny(args.out_dir, force=args.force, sft_steps=args.sft_steps)
    print(json.dumps(json.loads((out_dir / "manifest.json").read_text()), indent=2))


if __name__ == "__main__":
    main()
