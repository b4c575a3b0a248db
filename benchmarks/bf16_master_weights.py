"""Do bf16 full-parameter runs train at DPO's learning rates? fp32 vs bf16 with fp32 master weights (the default)
vs bf16 stepped in place (``master_dtype: bf16``, the old behaviour), on Llama-3.2-1B shapes with random weights.

    OMP_NUM_THREADS=1 python benchmarks/bf16_master_weights.py [--layers 4] [--steps 10] [--lr 5e-7]

Each variant runs ``recipes/ipo_single_device.py`` (IPO loss, AdamW at a constant ``lr``, precomputed reference)
in its own process on the same random checkpoint (every weight matrix N(0, 0.02), rounded to bf16 so all variants
start from the same weights; the released 1B's shapes: embed 2048, 32 heads / 8 KV heads, MLP 8192, vocab 128,256,
``--layers`` of its 16 layers, so that fp32 AdamW fits a 24 GiB machine) and the tiny synthetic pairs. Printed per
variant: the logged loss at steps 2 and ``--steps`` (computed by the run, in its dtype, on that step's batch),
``unchanged_weight_share`` at the last step, tokens per second and peak host memory, with ratios against the fp32
run; then the IPO loss of the final weights in fp32 on 32 fixed training pairs (reference: the start), for the
weights the optimizer stepped and for the saved (HF, ``dtype``) weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = [("fp32", "fp32", "fp32"), ("bf16 + fp32 master weights (default)", "bf16", "fp32"),
            ("bf16 in place (master_dtype: bf16)", "bf16", "bf16")]  # fmt: skip

CHILD = """
import resource, runpy, sys, json
sys.argv = {argv!r}
try:
    runpy.run_path({recipe!r}, run_name="__main__")
except SystemExit:
    pass
print("PEAK_RSS_GIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""


def model_args(layers: int) -> dict:
    """Llama-3.2-1B's builder arguments with ``layers`` of its 16 layers."""
    from dpo_components.tiny.model import TINY_LLAMA_ARGS

    return {**TINY_LLAMA_ARGS, "vocab_size": 128_256, "num_layers": layers, "num_heads": 32, "num_kv_heads": 8,
            "embed_dim": 2048, "intermediate_dim": 8192, "max_seq_len": 512}  # fmt: skip


def random_checkpoint(out: Path, layers: int) -> Path:
    from torchtune.models.llama3_2 import llama3_2

    from dpo_components.tiny.model import save_hf_checkpoint

    args = model_args(layers)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = llama3_2(**args)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn_like(param).mul_(0.02).to(torch.bfloat16).float())
    for module in model.modules():
        if hasattr(module, "rope_init"):
            module.rope_init()
    return save_hf_checkpoint(model.to(torch.bfloat16), out, args=args)


def run_variant(name: str, dtype: str, master: str, ckpt: Path, data: Path, out: Path, args) -> dict:
    overrides = [f"output_dir={out}", f"checkpointer.checkpoint_dir={ckpt}", f"dataset.data_files={data}/train.jsonl",
                 "eval_dataset=null", "prepare=null", f"dtype={dtype}", f"master_dtype={master}",
                 f"optimizer.lr={args.lr}", "lr_scheduler.num_warmup_steps=0", f"max_steps_per_epoch={args.steps}",
                 "epochs=1", "batch_size=4", "log_every_n_steps=1", "eval_every_n_steps=null",
                 "save_every_n_steps=null", "eval_samples=0", "reference.mode=precomputed", "loss.beta=0.1",
                 "model._component_=torchtune.models.llama3_2.llama3_2", "model.vocab_size=128256",
                 f"model.num_layers={args.layers}", "model.num_heads=32", "model.num_kv_heads=8",
                 "model.embed_dim=2048", "model.intermediate_dim=8192", "model.max_seq_len=512",
                 "model.rope_base=500000", "model.norm_eps=1e-5", "model.scale_factor=32"]  # fmt: skip
    recipe = str(REPO / "recipes/ipo_single_device.py")
    argv = [recipe, "--config", str(REPO / "recipe_configs/tiny/ipo_single_device.yaml"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, "-c", CHILD.format(argv=argv, recipe=recipe)], cwd=REPO, env=env,
                          capture_output=True, text=True)  # fmt: skip
    peak = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_GIB")]
    if done.returncode != 0 or not peak:
        raise RuntimeError(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = {}
    for path in (out / "logs").glob("*.txt"):
        for line in path.read_text().splitlines():
            step, _, rest = line.partition(" | ")
            rows[int(step.split()[-1])] = {k: float(v) for k, _, v in (i.partition(":") for i in rest.split())}
    last = rows[max(rows)]
    seconds = sum(1 / rows[s]["tokens_per_second"] for s in rows if s > 1)  # per token; steps after the first
    return {"name": name, "loss_1": rows[1]["loss"], "loss_2": rows[2]["loss"], "loss_last": last["loss"],
            "unchanged": last["unchanged_weight_share"], "peak_gib": float(peak[0]),
            "tokens_per_second": 1 / (seconds / (len(rows) - 1))}  # fmt: skip


def fp32_losses(ckpt: Path, data: Path, weights: dict[str, dict], layers: int) -> dict[str, float]:
    """IPO loss (beta 0.1, per-token averaged log-probs) of each state in ``weights`` on the first 32 training pairs,
    computed in fp32 against the starting checkpoint's log-probs."""
    from torchtune.models.llama3_2 import llama3_2

    from dpo_components.data import preference_dataset
    from dpo_components.data.collate import preference_collator
    from dpo_components.logprobs import concatenated_logprobs
    from dpo_components.losses import IPOLoss
    from dpo_components.tiny.tokenizer import tiny_tokenizer

    model = llama3_2(**model_args(layers))
    pairs = preference_dataset(tiny_tokenizer(), source="json", data_files=str(data / "train.jsonl"), split="train",
                               max_length=96, max_prompt_length=32)  # fmt: skip
    collate = preference_collator(tiny_tokenizer().pad_id)
    batches = [collate([pairs[i] for i in range(start, start + 8)]) for start in (0, 8, 16, 24)]

    def logps(state):
        model.load_state_dict({k: v.float() for k, v in state.items()})
        with torch.no_grad():
            return [concatenated_logprobs(model, b, 256, False) for b in batches]

    reference = logps(load_hf(ckpt))
    loss = IPOLoss(beta=0.1, average_logprobs=True)
    return {name: sum(loss(p, r).losses.mean().item() for p, r in zip(logps(state), reference)) / len(batches)
            for name, state in weights.items()}  # fmt: skip


def load_hf(directory: Path) -> dict:
    from torchtune.training import FullModelHFCheckpointer

    files = sorted(p.name for p in directory.glob("model*.safetensors"))
    with tempfile.TemporaryDirectory() as out:
        checkpointer = FullModelHFCheckpointer(checkpoint_dir=str(directory), checkpoint_files=files,
                                               model_type="LLAMA3_2", output_dir=out)  # fmt: skip
        return checkpointer.load_checkpoint()["model"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=5e-7)
    args = parser.parse_args()
    from dpo_components.tiny.prepare import prepare_tiny

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pairs = max(64, 4 * args.steps)  # the reference pass covers them all; the fp32 evaluation takes the first 32
        data = prepare_tiny(tmp / "tiny", sft_steps=1, sft_examples=64, train_pairs=pairs, eval_pairs=16) / "data"
        ckpt = random_checkpoint(tmp / "random_1b_shapes", args.layers)
        results = [run_variant(n, d, m, ckpt, data, tmp / f"run{i}", args) for i, (n, d, m) in enumerate(VARIANTS)]
        final = [tmp / f"run{i}" / f"step_{args.steps}" for i in range(len(VARIANTS))]
        masters = torch.load(final[1] / "recipe_state.pt", weights_only=True)["master_weights"]
        evaluated = fp32_losses(ckpt, data, {"start": load_hf(ckpt), "fp32": load_hf(final[0]),
                                             "bf16 + fp32 master weights: the fp32 masters": masters,
                                             "bf16 + fp32 master weights: the saved bf16 weights": load_hf(final[1]),
                                             "bf16 in place: the saved bf16 weights": load_hf(final[2])}, args.layers)
    base = results[0]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"\nLlama-3.2-1B shapes, {args.layers} of 16 layers, random weights (std 0.02), IPO, AdamW lr {args.lr:g}, "
          f"{args.steps} steps of 4 pairs; {torch.get_num_threads()} thread(s), {total:.0f} GiB host memory\n")
    print(f"| variant | loss step 1 | step 2 | step {args.steps} | drop 1->{args.steps} (x fp32) | "
          f"unchanged_weight_share | tokens/s (x fp32) | peak host GiB (x fp32) |")
    print("|---|---|---|---|---|---|---|---|")
    drop32 = base["loss_1"] - base["loss_last"]
    for r in results:
        drop = r["loss_1"] - r["loss_last"]
        print(f"| {r['name']} | {r['loss_1']:.4f} | {r['loss_2']:.4f} | {r['loss_last']:.4f} | "
              f"{drop:.4f} ({drop / drop32:.2f}) | {r['unchanged']:.3f} | {r['tokens_per_second']:.0f} "
              f"({r['tokens_per_second'] / base['tokens_per_second']:.2f}) | {r['peak_gib']:.1f} "
              f"({r['peak_gib'] / base['peak_gib']:.2f}) |")  # fmt: skip
    start = evaluated.pop("start")
    print(f"\nIPO loss of the final weights in fp32 on 32 training pairs (start {start:.5f}):\n")
    print("| weights | loss | drop from the start (x fp32) |\n|---|---|---|")
    for name, value in evaluated.items():
        print(f"| {name} | {value:.5f} | {start - value:.5f} ({(start - value) / (start - evaluated['fp32']):.2f}) |")
    print(json.dumps({"runs": results, "fp32_eval": {"start": start, **evaluated}}))


if __name__ == "__main__":
    main()
