"""The tiny vision task: coloured shapes, a question about the picture, the true answer against a plausible wrong one.

Each image is a filled circle, square or triangle in one of six colours on a grey canvas of random size (so images
take one tile or two, tall or wide), at a random place and size. A pair asks what colour the shape is; chosen
answers with the true colour, rejected with another one. Every colour is chosen and rejected equally often, so the
text alone says nothing: only the image can rank a pair. Held-out pairs are new pictures, and shapes of colour and
kind combinations no training pair shows (:data:`HELD_OUT`).

torchtune starts every cross-attention gate at 0, so an untrained model cannot read its images. The ``prepare``
step (:func:`prepare_shapes_task`) therefore first fine-tunes the tiny vision model (every parameter) to describe
pictures, "a red circle." after "describe the picture.", on other pictures: it learns to see colours and shapes,
but never sees the question or the answer form of the pairs. DPO from there (``recipe_configs/tiny/
lora_dpo_vision.yaml``) has to learn to answer the question from the picture. The control (:func:`image_control`):
the same held-out pairs with the images shuffled between them, scored by the trained policy against the reference;
a policy that uses the image ranks them at chance.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 20)}  # fmt: skip
SHAPES = ("circle", "square", "triangle")
HELD_OUT = {("red", "triangle"), ("green", "circle"), ("blue", "square"), ("yellow", "triangle"),
            ("purple", "circle"), ("orange", "square")}  # fmt: skip
QUESTIONS = ("what colour is the shape?", "which colour is it?", "what colour do you see?")
ANSWER = "it is {colour}."
CAPTION_PROMPT = "describe the picture."
CAPTION = "a {colour} {shape}."
TILE_SIZE, MAX_NUM_TILES = 56, 2  # the tiny vision model's (dpo_components.tiny.vision_model)


def draw(colour: str, shape: str, rng: random.Random) -> Image.Image:
    """A ``colour`` ``shape`` on a grey canvas of random size (28-100 pixels a side), at a random place."""
    width, height = rng.randint(28, 100), rng.randint(28, 100)
    image = Image.new("RGB", (width, height), (128, 128, 128))
    side = rng.randint(max(10, min(width, height) // 2), min(width, height) - 2)
    x, y = rng.randint(0, width - side), rng.randint(0, height - side)
    box, fill, pen = (x, y, x + side, y + side), COLOURS[colour], ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    return image


def _combos(held_out: bool) -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if ((c, s) in HELD_OUT) == held_out]


def write_pairs(out_dir: Path, name: str, n: int, seed: int) -> Path:
    """``n`` pairs (RLAIF-V columns, image paths relative to the file) in ``out_dir/<name>.jsonl``, pictures in
    ``out_dir/images/<name>/``; chosen colours cycle through all six, each rejected colour drawn from the others."""
    rng = random.Random(seed)
    combos = _combos(held_out=name != "train")
    (out_dir / "images" / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = rng.choice([s for c, s in combos if c == colour])
        path = f"images/{name}/{i:05d}.png"
        draw(colour, shape, rng).save(out_dir / path)
        wrong = rng.choice([c for c in COLOURS if c != colour])
        rows.append({"image": path, "question": rng.choice(QUESTIONS), "chosen": ANSWER.format(colour=colour),
                     "rejected": ANSWER.format(colour=wrong), "colour": colour, "shape": shape})  # fmt: skip
    return _write_jsonl(out_dir / f"{name}.jsonl", rows)


def shuffled_images(path: Path, seed: int) -> Path:
    """The pairs of ``path`` with their images shuffled among them (each pair another pair's picture), beside it."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    images = [rows[k]["image"] for k in order]
    return _write_jsonl(path.with_name(f"{path.stem}_shuffled_images.jsonl"),
                        [{**row, "image": image} for row, image in zip(rows, images)])  # fmt: skip


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    from dpo_components.files import write_jsonl

    write_jsonl(path, rows)
    return path


# ------------------------------------------------------------------------------------------------ captions


def caption_batches(tokenizer: Any, n: int, seed: int, batch_size: int) -> list[list[dict[str, Any]]]:
    """``n`` captioned pictures of every combination (held-out ones too: the captions teach seeing, not the task)
    as batches of samples: ``prompt_ids`` (with the image token), ``response_ids``, tiles and aspect ratio."""
    from torchtune.data import Message

    from dpo_components.data.chat import generation_prompt
    from dpo_components.data.dataset import tokenize_responses
    from dpo_components.vision.images import ImageTiler

    rng, tiler = random.Random(seed), ImageTiler(TILE_SIZE, MAX_NUM_TILES)
    prompt = [Message("user", [{"type": "image", "content": 0}, {"type": "text", "content": CAPTION_PROMPT}])]
    assert generation_prompt(tokenizer, prompt).count(tokenizer.image_id) == 1
    samples = []
    for _ in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        caption = [Message("assistant", CAPTION.format(colour=colour, shape=shape))]
        prompt_ids, [(ids, masked)], _ = tokenize_responses(tokenizer, prompt, [caption], 64, None)
        tiles, ratio = tiler(draw(colour, shape, rng))
        samples.append({"prompt_ids": prompt_ids, "chosen_response_ids": ids,
                        "chosen_labels": [-100 if m else t for t, m in zip(ids, masked)],
                        "images": [tiles], "aspect_ratios": [ratio]})  # fmt: skip
    return [samples[i : i + batch_size] for i in range(0, n, batch_size)]


def caption_loss(model: torch.nn.Module, batch: list[dict[str, Any]], image_token_id: int) -> torch.Tensor:
    """Mean negative log-likelihood per caption token of ``batch`` (pictures and prompts given)."""
    from torch.nn.utils.rnn import pad_sequence

    from dpo_components.logprobs import sequence_logprobs
    from dpo_components.vision.collate import image_inputs

    rows = [torch.tensor(s["prompt_ids"] + s["chosen_response_ids"]) for s in batch]
    labels = [torch.tensor([-100] * len(s["prompt_ids"]) + s["chosen_labels"]) for s in batch]
    input_ids = pad_sequence(rows, batch_first=True, padding_value=0)
    images = image_inputs(batch, input_ids, torch.tensor([len(r) for r in rows]), torch.arange(len(batch)),
                          image_token_id, (TILE_SIZE // 14) ** 2 + 1)  # fmt: skip
    logps, tokens = sequence_logprobs(model, input_ids, pad_sequence(labels, batch_first=True, padding_value=-100),
                                      **images)  # fmt: skip
    return -logps.sum() / tokens.sum()


def caption_train(model: torch.nn.Module, tokenizer: Any, steps: int, batch_size: int, lr: float, seed: int,
                  ) -> list[float]:  # fmt: skip
    """Fine-tune every parameter of ``model`` (an ``ImagePairFusion``) to caption pictures; returns the losses."""
    batches = caption_batches(tokenizer, steps * batch_size, seed, batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    losses = []
    model.train()
    for batch in batches:
        loss = caption_loss(model, batch, tokenizer.image_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(float(loss.detach()))
    return losses


# ------------------------------------------------------------------------------------------------ prepare


def prepare_shapes_task(
    out_dir: str | Path,
    seed: int = 0,
    train_pairs: int = 1200,
    eval_pairs: int = 240,
    caption_steps: int = 300,
    caption_batch_size: int = 32,
    caption_lr: float = 2e-3,
) -> Path:
    """Build (or reuse) the task under ``out_dir`` (the ``prepare`` step of ``recipe_configs/tiny/
    lora_dpo_vision.yaml``); returns ``out_dir``:

        captioned_model/                   the tiny vision model fine-tuned to caption pictures (HF Mllama layout):
                                           the policy's base and the reference
        data/train.jsonl, data/eval.jsonl  the pairs (held-out: unseen colour and shape combinations)
        data/eval_shuffled_images.jsonl    the held-out pairs with their pictures shuffled among them
        manifest.json                      settings and the captioning losses, written last

    File-locked: the ranks of a distributed run build it once."""
    from dpo_components.tiny.prepare import build_lock

    out_dir = Path(out_dir).expanduser()
    settings = {"seed": seed, "train_pairs": train_pairs, "eval_pairs": eval_pairs, "caption_steps": caption_steps,
                "caption_batch_size": caption_batch_size, "caption_lr": caption_lr}  # fmt: skip
    with build_lock(out_dir):
        return _prepare_locked(out_dir, settings)


def _prepare_locked(out_dir: Path, settings: dict[str, Any]) -> Path:
    from dpo_components.files import write_json
    from dpo_components.models import apply_model_fixes
    from dpo_components.tiny.tokenizer import tiny_tokenizer
    from dpo_components.tiny.vision_model import save_hf_vision_checkpoint, tiny_llama_vision

    manifest_path = out_dir / "manifest.json"
    built = [out_dir / "captioned_model/model.safetensors", out_dir / "data/train.jsonl",
             out_dir / "data/eval.jsonl", out_dir / "data/eval_shuffled_images.jsonl"]  # fmt: skip
    if manifest_path.exists() and all(path.exists() for path in built):
        if json.loads(manifest_path.read_text()).get("settings") == settings:
            return out_dir
    manifest_path.unlink(missing_ok=True)
    seed = settings["seed"]
    write_pairs(out_dir / "data", "train", settings["train_pairs"], seed)
    shuffled_images(write_pairs(out_dir / "data", "eval", settings["eval_pairs"], seed + 1), seed + 2)

    start = time.perf_counter()
    with torch.random.fork_rng():  # the caller's RNG as it was: a run that prepares draws what one that reuses does
        torch.manual_seed(seed)
        fusion = tiny_llama_vision()
        losses = caption_train(apply_model_fixes(fusion), tiny_tokenizer(), settings["caption_steps"],
                               settings["caption_batch_size"], settings["caption_lr"], seed + 3)  # fmt: skip
    save_hf_vision_checkpoint(fusion, out_dir / "captioned_model")
    manifest = {"settings": settings, "caption_first_loss": losses[0],
                "caption_final_loss": sum(losses[-20:]) / len(losses[-20:]),
                "caption_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    write_json(manifest_path, manifest, "the task manifest")
    return out_dir


# ------------------------------------------------------------------------------------------ the image control


def load_vision_model(checkpoint_dir: str | Path) -> torch.nn.Module:
    """A tiny vision model from an HF-layout checkpoint (a task's captioned model, or a run's merged one), through
    torchtune's ``FullModelHFCheckpointer`` (``LLAMA3_VISION``), every key checked; in eval mode."""
    import tempfile

    from torchtune import training

    from dpo_components.models import apply_model_fixes
    from dpo_components.tiny.vision_model import tiny_llama_vision

    checkpoint_dir = Path(checkpoint_dir)
    files = sorted(p.name for p in checkpoint_dir.glob("*.safetensors"))
    with tempfile.TemporaryDirectory() as scratch:
        state = training.FullModelHFCheckpointer(checkpoint_dir=str(checkpoint_dir), checkpoint_files=files,
                                                 model_type="LLAMA3_VISION", output_dir=scratch).load_checkpoint()
    model = tiny_llama_vision()
    model.load_state_dict(state[training.MODEL_KEY], strict=True)
    return apply_model_fixes(model).eval()


@torch.no_grad()
def reward_accuracy(policy: torch.nn.Module, reference: torch.nn.Module, data_file: str | Path, beta: float,
                    batch_size: int = 32) -> tuple[float, float]:  # fmt: skip
    """(preference accuracy, mean margin) of the implicit reward beta * log(policy / reference) on the pairs of
    ``data_file``: the share of pairs whose chosen answer it ranks above the rejected one."""
    from dpo_components.data.collate import make_collator
    from dpo_components.logprobs import concatenated_logprobs
    from dpo_components.tiny.tokenizer import tiny_tokenizer
    from dpo_components.vision import vision_preference_dataset

    tokenizer = tiny_tokenizer()
    data = vision_preference_dataset(tokenizer, source="json", data_files=str(data_file), tile_size=TILE_SIZE,
                                     max_num_tiles=MAX_NUM_TILES, max_length=64)  # fmt: skip
    collate = make_collator(tokenizer.pad_id, policy.max_seq_len, datasets={"pairs": data})  # with the images
    margins = []
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        p, r = concatenated_logprobs(policy, batch), concatenated_logprobs(reference, batch)
        margins.append(beta * ((p.chosen_logps - r.chosen_logps) - (p.rejected_logps - r.rejected_logps)))
    margins = torch.cat(margins)
    return float((margins > 0).float().mean()), float(margins.mean())


def image_control(run_checkpoint: str | Path, task_dir: str | Path, beta: float) -> dict[str, float]:
    """Held-out preference accuracy of a run's merged checkpoint against the task's captioned model (the reference),
    on the held-out pairs and on the same pairs with their pictures shuffled among them."""
    policy, reference = load_vision_model(run_checkpoint), load_vision_model(Path(task_dir) / "captioned_model")
    data = Path(task_dir) / "data"
    accuracy, margin = reward_accuracy(policy, reference, data / "eval.jsonl", beta)
    shuffled, shuffled_margin = reward_accuracy(policy, reference, data / "eval_shuffled_images.jsonl", beta)
    return {"heldout_accuracy": accuracy, "heldout_margin": margin, "shuffled_images_accuracy": shuffled,
            "shuffled_images_margin": shuffled_margin}  # fmt: skip


def main() -> None:
    """Train the tiny vision config for each seed (``tune run``), then print the held-out and shuffled-image
    accuracies as a markdown table (docs/vision.md):

        python -m dpo_components.tiny.shapes_task --seeds 0 1 2
    """
    import argparse
    import subprocess
    import sys

    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default="recipe_configs/tiny/lora_dpo_vision.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        overrides = [f"seed={seed}", "overwrite_output_dir=true", *args.overrides]
        subprocess.run(["tune", "run", "recipes/lora_dpo_single_device.py", "--config", args.config, *overrides],
                       check=True)  # fmt: skip
        cfg = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(overrides))
        run_dir = Path(cfg.output_dir)
        last = max(run_dir.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        result = image_control(last, cfg.prepare.out_dir, cfg.loss.beta)
        rows.append((seed, last.name, result))
        print(json.dumps({"seed": seed, **result}), file=sys.stderr)
    print("| seed | checkpoint | held-out accuracy | margin | shuffled-images accuracy | margin |")
    print("|---|---|---|---|---|---|")
    for seed, name, r in rows:
        print(f"| {seed} | {name} | {r['heldout_accuracy']:.3f} | {r['heldout_margin']:.2f} | "
              f"{r['shuffled_images_accuracy']:.3f} | {r['shuffled_images_margin']:.2f} |")


if __name__ == "__main__":
    main()
