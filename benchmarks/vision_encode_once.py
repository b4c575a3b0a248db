"""Vision DPO: each pair's images encoded once (ImagePairFusion) against the image repeated for both responses
(torchtune's DeepFusionModel on every text row, as TRL, LLaMA-Factory and ms-swift feed it), same batches.

    python benchmarks/vision_encode_once.py                 # CPU preset, about 4 minutes on 2 cores
    python benchmarks/vision_encode_once.py --preset gpu    # one CUDA GPU

Each row runs in its own process (peak memory is the process's: RSS on CPU, ``torch.cuda.max_memory_allocated`` on
a GPU) on the same model (a Llama-3.2-Vision architecture built with torchtune's component builders, random
weights, cross-attention gates at 1 so the images count, every parameter trainable), the same pairs and pictures
(one 4-tile image per pair) and the same loss (DPO, beta 0.1, reference log-probs fixed): forward, backward, SGD step.
tokens/s counts the text tokens of both responses' rows (prompt + chosen + prompt + rejected), the same for every
row; ``encoder images / step`` is what the encoder was given, counted by a forward hook.

Rows: ``per row`` (the baseline) repeats each pair's image for its chosen and rejected rows; ``once`` encodes it
once and feeds both rows; ``once+prefix`` also puts each pair in one [prompt | chosen | rejected] row
(``prefix_sharing``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

PRESETS = {
    "cpu": dict(tile=224, tiles=4, clip_dim=256, clip_layers=4, dim=512, layers=4, vocab=32768, pairs=4,
                prompt=96, response=48, steps=6, warmup=2, device="cpu"),
    "gpu": dict(tile=448, tiles=4, clip_dim=1024, clip_layers=16, dim=2048, layers=16, vocab=128256, pairs=8,
                prompt=256, response=128, steps=10, warmup=3, device="cuda"),
}  # fmt: skip
ROWS = ("per row", "once", "once+prefix")


def build(p: dict) -> torch.nn.Module:
    from torchtune.modules.model_fusion import DeepFusionModel
    from torchtune.modules.tanh_gate import TanhGate

    from dpo_components.models.llama3_2_vision import llama3_2_vision_decoder, llama3_2_vision_encoder

    encoder = llama3_2_vision_encoder(
        patch_size=14, tile_size=p["tile"], max_num_tiles=p["tiles"], clip_embed_dim=p["clip_dim"], num_heads=8,
        clip_num_layers=p["clip_layers"], clip_hidden_states=[1, p["clip_layers"] - 1], num_layers_projection=2,
        decoder_embed_dim=p["dim"], in_channels=3,
    )  # fmt: skip
    decoder = llama3_2_vision_decoder(
        vocab_size=p["vocab"], num_layers=p["layers"], fusion_interval=2, num_special_tokens=8, num_heads=8,
        num_kv_heads=2, embed_dim=p["dim"], max_seq_len=2048, encoder_max_seq_len=4 * 1025,
        intermediate_dim=4 * p["dim"],
    )  # fmt: skip
    model = DeepFusionModel(encoder=encoder, decoder=decoder, encoder_trainable=True, decoder_trainable=True)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TanhGate):
                module.scale.fill_(1.0)
    return model


def pairs(p: dict, image_token: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(0, p["vocab"] - 1, (n,), generator=g).tolist()
    out = []
    for i in range(p["pairs"] * (p["steps"] + p["warmup"])):
        tiles = torch.randn(p["tiles"], 3, p["tile"], p["tile"], generator=g)
        chosen, rejected = tokens(p["response"]), tokens(p["response"])
        out.append({"prompt_ids": [1, image_token] + tokens(p["prompt"] - 2), "chosen_response_ids": chosen,
                    "chosen_labels": chosen, "rejected_response_ids": rejected, "rejected_labels": rejected,
                    "images": [tiles], "aspect_ratios": [torch.tensor([2, 2])], "index": i % p["pairs"]})  # fmt: skip
    return out


def run_row(row: str, preset: str) -> dict:
    from torchtune.data import padded_collate_tiled_images_and_mask  # noqa: F401 (the per-row layout's origin)

    from dpo_components.data.collate import preference_collator
    from dpo_components.logprobs import concatenated_logprobs
    from dpo_components.losses import DPOLoss, SequenceLogProbs
    from dpo_components.vision.collate import VisionPreferenceCollator
    from dpo_components.vision.model import ImagePairFusion

    p = PRESETS[preset]
    torch.manual_seed(0)
    device = torch.device(p["device"])
    fusion = build(p).to(device)
    image_token = p["vocab"]  # the first fusion token, as <|image|> is in Llama 3.2 Vision
    data = pairs(p, image_token)
    tokens_per_tile = (p["tile"] // 14) ** 2 + 1
    collate = VisionPreferenceCollator(preference_collator(0, prefix_sharing=row == "once+prefix"), image_token,
                                       tokens_per_tile)  # fmt: skip
    model = ImagePairFusion(fusion)
    images_seen = []
    fusion.encoder.register_forward_hook(lambda m, a, kw, out: images_seen.append(kw["images"].shape[0]),
                                         with_kwargs=True)  # fmt: skip
    loss_fn, optimizer = DPOLoss(beta=0.1), torch.optim.SGD(fusion.parameters(), lr=1e-4)
    times, text_tokens = [], 0
    for step in range(p["steps"] + p["warmup"]):
        batch = collate(data[step * p["pairs"] : (step + 1) * p["pairs"]])
        if row == "per row":  # the image repeated: each text row carries its pair's image to the encoder
            batch = {**batch, "images": batch["images"][batch["image_rows"]],
                     "aspect_ratio": batch["aspect_ratio"][batch["image_rows"]], "image_rows": None}  # fmt: skip
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        policy = concatenated_logprobs(model, {k: v for k, v in batch.items() if v is not None})
        zeros = torch.zeros_like(policy.chosen_logps)
        reference = SequenceLogProbs(zeros, zeros, policy.chosen_tokens, policy.rejected_tokens)
        loss_fn(policy, reference).losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= p["warmup"]:
            times.append(time.perf_counter() - start)
            text_tokens += 2 * p["prompt"] * p["pairs"] + 2 * p["response"] * p["pairs"]
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # fmt: skip
    return {"row": row, "s_per_step": sorted(times)[len(times) // 2], "tokens_per_s": text_tokens / sum(times),
            "peak_gib": peak / 2**30, "encoder_images_per_step": images_seen[-1], "encoder_calls_per_step": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # one row, in a child process
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args.preset)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    results = []
    for row in ROWS:
        out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--row", row], env=env, check=True,
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results[0]
    limit = (torch.cuda.get_device_properties(0).total_memory if args.preset == "gpu"
             else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))  # fmt: skip
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"preset {args.preset}, {PRESETS[args.preset]}, CPU capability {cpu}, torch {torch.__version__}")
    print("| row | s/step (median) | tokens/s | x per row | peak memory | x per row | of the machine's "
          "| encoder images / step |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} "
              f"| {r['tokens_per_s'] / base['tokens_per_s']:.2f} | {r['peak_gib']:.2f} GiB "
              f"| {r['peak_gib'] / base['peak_gib']:.2f} | {r['peak_gib'] * 2**30 / limit:.0%} "
              f"| {r['encoder_images_per_step']} in {r['encoder_calls_per_step']} call |")


if __name__ == "__main__":
    main()
