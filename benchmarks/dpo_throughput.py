"""LoRA DPO throughput and memory: our recipe (one row per speed switch) vs torchtune's built-in recipe vs TRL.

    python benchmarks/dpo_throughput.py                    # CPU preset: 22M-param Llama, vocab 32768, ~450 tokens
    python benchmarks/dpo_throughput.py --preset gpu       # Llama-3.2-1B architecture, bf16, ~2048 tokens
    python benchmarks/dpo_throughput.py --rows torchtune,ours,ours+cache

Every row trains the same randomly initialised Llama-architecture checkpoint with the same LoRA (rank 16 on
q/k/v/o and the MLP), optimizer, batch size and pairs, one after the other, each as its own ``tune run`` (or
TRL) process with ``OMP_NUM_THREADS=1`` on CPU. A metric logger (``benchmarks/step_timer.py``) timestamps each
optimizer step. Steps after the warm-up are timed; since the pairs of each step are known (file order, or our
length-grouped order rebuilt from the seed), throughput is exact:

    tokens/s = non-padding tokens of the timed steps' pairs (prompt + chosen + prompt + rejected) / their time

the same count for every row, whatever layout the row computes. MFU (model FLOPs utilisation) is the policy's
useful FLOPs per second over the GEMM peak of the same dtype, measured in this process (one thread on CPU), or
``--peak-tflops`` (a GPU card's dense peak). Per timed step, from the model's shapes (LoRA, frozen base, reference
cached, so a step is the forward and the backward's input gradients, twice the forward):

    FLOPs = 2 * (2 * N * T + 4 * d * layers * C + 2 * d * V * S)

with N the linear layers' weights (q, k, v, o, MLP; LoRA's rank-16 adapters, norms, RoPE and softmax left out),
T the data positions the layout computes (a shared prompt once), C the sum over them of the causal context each
attends to within its own sequence (masked and padded scores not counted), d the width, V the vocabulary and S
the response tokens the chunked head scores. Rows without the cached reference also run the reference forward,
counted as one more forward. Padding and the masked scores a dense mask still computes count as waste.

Peak memory is the process's peak RSS on CPU
and ``torch.cuda.max_memory_allocated`` on GPU. The pairs are synthetic text of random length (prompt 128-384
tokens, each response 64-320 on CPU; four times that on GPU); the model's vocabulary is 32768 (CPU) or 128256
(GPU) while the text uses the tiny tokenizer's 551 ids, which changes nothing in the cost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from dpo_components.data import preference_dataset  # noqa: E402
from dpo_components.data.collate import PreferenceCollator  # noqa: E402
from dpo_components.data.micro_batches import plan_micro_batches  # noqa: E402
from dpo_components.data.order import length_grouped_order  # noqa: E402
from dpo_components.data.packing import pack_rows  # noqa: E402
from dpo_components.data.prefix_sharing import packed_lengths  # noqa: E402
from dpo_components.tiny.model import save_hf_checkpoint  # noqa: E402
from dpo_components.tiny.synthetic import corpus_lines  # noqa: E402
from dpo_components.tiny.tokenizer import tiny_tokenizer  # noqa: E402

PRESETS = {
    "cpu": {
        # max_seq_len 8192 (Llama 3's): the longest packed row (packing_row_tokens: null); it costs nothing else
        "model": dict(vocab_size=32768, num_layers=6, num_heads=6, num_kv_heads=2, embed_dim=384, max_seq_len=8192,
                      intermediate_dim=1024, rope_base=500_000, norm_eps=1e-5, scale_factor=32),
        "prompt": (128, 384), "response": (64, 320), "batch_size": 4, "steps": 10, "warmup": 3,
        "device": "cpu", "dtype": "fp32",
        "rows": "torchtune,trl,ours,ours+cache,ours+cache+group,ours+cache+group+prefix,ours+cache+group+compile",
    },
    "smoke": {  # a few seconds a row: for the test that keeps this script working, not for measuring
        "model": dict(vocab_size=1024, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=128, max_seq_len=512,
                      intermediate_dim=256, rope_base=500_000, norm_eps=1e-5, scale_factor=32),
        "prompt": (8, 40), "response": (4, 30), "batch_size": 2, "steps": 4, "warmup": 1,
        "device": "cpu", "dtype": "fp32",
        "rows": "torchtune,ours,ours+cache+group+prefix,ours+cache+prefix+pack+tokens128",
    },
    "gpu": {  # Llama-3.2-1B's architecture, random weights
        "model": dict(vocab_size=128256, num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048,
                      max_seq_len=8192, intermediate_dim=8192, rope_base=500_000, norm_eps=1e-5, scale_factor=32),
        "prompt": (512, 1536), "response": (256, 1280), "batch_size": 2, "steps": 12, "warmup": 4,
        "device": "cuda", "dtype": "bf16",
        "rows": "torchtune,ours,ours+cache,ours+cache+group,ours+cache+group+prefix,ours+cache+group+prefix+sdpa,"
        "ours+cache+group+prefix+qlora,trl",
    },
}  # fmt: skip

# Our recipe's switches per row name part ("rows<N>": packing_row_tokens N; "tokens<N>": max_micro_batch_tokens N,
# the step's pairs in micro-batches of at most N computed positions); "ours" alone is the recipe as the tiny config
# ships it.
SWITCHES = {
    "cache": {"reference.mode": "precomputed"},
    "group": {"group_by_length": True, "shuffle": True},
    "prefix": {"prefix_sharing": True},
    "compile": {"compile": True, "pad_to_multiple_of": 128},
    "qlora": {"model.quantize_base": True},
    "sdpa": {"prefix_sharing_attention": "sdpa"},  # shared rows through SDPA by document instead of flex (CUDA)
    "pack": {"packing": True},  # the batch's pairs packed into rows of up to max_seq_len (data/packing.py)
}


def switch_settings(switch: str) -> dict:
    """A row name part's config keys: SWITCHES, ``rows<N>`` for ``packing_row_tokens: N`` or ``tokens<N>`` for
    ``max_micro_batch_tokens: N``."""
    for prefix, key in (("rows", "packing_row_tokens"), ("tokens", "max_micro_batch_tokens")):
        if switch.startswith(prefix) and switch[len(prefix) :].isdigit():
            return {key: int(switch[len(prefix) :])}
    return SWITCHES[switch]
LORA = {"lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": True,
        "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0}  # fmt: skip


# ----------------------------------------------------------------------------------------------- inputs


def make_inputs(preset: dict, work: Path, seed: int = 0) -> tuple[Path, Path]:
    """The random-weight checkpoint and the synthetic pairs (built once per preset, then reused)."""
    from torchtune.models.llama3_2._component_builders import llama3_2

    n_pairs = preset["batch_size"] * preset["steps"]
    model_dir, data_file = work / "model", work / "data" / f"train_{n_pairs}.jsonl"
    if not (model_dir / "model.safetensors").is_file():
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = llama3_2(**preset["model"])
        torch.nn.init.normal_(model.tok_embeddings.weight, std=0.02)
        if preset["dtype"] == "bf16":
            model = model.to(torch.bfloat16)
        save_hf_checkpoint(model, model_dir, args=preset["model"])
    if not data_file.is_file():
        data_file.parent.mkdir(parents=True, exist_ok=True)
        tokenizer, rng = tiny_tokenizer(), random.Random(seed)
        lines = [(line, len(tokenizer.encode(line, add_bos=False, add_eos=False))) for line in corpus_lines(seed)]

        def text(tokens: int) -> str:
            words, total = [], 0
            while total < tokens:
                line, n = rng.choice(lines)
                words.append(line)
                total += n + 1
            return " ".join(words)

        with open(data_file, "w") as f:
            for _ in range(n_pairs):
                prompt = text(rng.randint(*preset["prompt"]))
                chosen, rejected = (text(rng.randint(*preset["response"])) for _ in range(2))
                row = {side: [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
                       for side, answer in (("chosen", chosen), ("rejected", rejected))}  # fmt: skip
                f.write(json.dumps(row) + "\n")
    return model_dir, data_file


def pair_stats(data_file: Path, preset: dict) -> dict:
    data = preference_dataset(tiny_tokenizer(), source="json", data_files=str(data_file), split="train",
                              max_length=8192, max_prompt_length=4096)  # fmt: skip
    samples = [data[i] for i in range(len(data))]
    tokens = [2 * len(s["prompt_ids"]) + len(s["chosen_response_ids"]) + len(s["rejected_response_ids"])
              for s in samples]  # fmt: skip
    documents = [[len(s["prompt_ids"]) + len(s[f"{side}_response_ids"]) for side in ("chosen", "rejected")]
                 for s in samples]  # fmt: skip
    parts = [(len(s["prompt_ids"]), len(s["chosen_response_ids"]), len(s["rejected_response_ids"])) for s in samples]
    return {"tokens": tokens, "lengths": data.sample_lengths(), "packed": packed_lengths(data), "documents": documents,
            "parts": parts}  # fmt: skip


# ------------------------------------------------------------------------------------------------- rows


def common_overrides(preset: dict, model_dir: Path, data_file: Path, out: Path) -> dict:
    max_len = 2 * preset["model"]["max_seq_len"]
    return {
        "output_dir": str(out),
        "model": {"_component_": "torchtune.models.llama3_2.lora_llama3_2", **preset["model"], **LORA,
                  "apply_lora_to_output": False},  # fmt: skip
        "tokenizer": {"_component_": "dpo_components.tiny.tokenizer.tiny_tokenizer", "max_seq_len": max_len},
        "checkpointer": {"_component_": "torchtune.training.FullModelHFCheckpointer",
                         "checkpoint_dir": str(model_dir), "checkpoint_files": ["model.safetensors"],
                         "model_type": "LLAMA3_2", "output_dir": str(out)},  # fmt: skip
        "batch_size": preset["batch_size"], "gradient_accumulation_steps": 1, "epochs": 1,
        "max_steps_per_epoch": preset["steps"], "shuffle": False, "seed": 0,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": 1e-4, "weight_decay": 0.0},
        "lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                         "num_warmup_steps": 2},  # fmt: skip
        "metric_logger": {"_component_": "benchmarks.step_timer.StepTimerLogger", "log_dir": str(out / "logs")},
        "log_every_n_steps": 1, "device": preset["device"], "dtype": preset["dtype"], "compile": False,
        "enable_activation_checkpointing": False,
    }  # fmt: skip


def torchtune_command(preset: dict, model_dir: Path, data_file: Path, out: Path) -> list[str]:
    cfg = common_overrides(preset, model_dir, data_file, out)
    cfg.update({
        "dataset": {"_component_": "torchtune.datasets.preference_dataset", "source": "json",
                    "data_files": str(data_file), "split": "train"},
        "loss": {"_component_": "torchtune.rlhf.loss.DPOLoss", "beta": 0.1},
        "resume_from_checkpoint": False, "save_adapter_weights_only": True, "log_peak_memory_stats": False,
        "enable_activation_offloading": False,
    })  # fmt: skip
    path = out.parent / f"{out.name}.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    return ["tune", "run", "lora_dpo_single_device", "--config", str(path)]


def ours_command(preset: dict, model_dir: Path, data_file: Path, out: Path, switches: list[str]) -> list[str]:
    cfg = OmegaConf.load(REPO_ROOT / "recipe_configs/tiny/lora_dpo_single_device.yaml")
    max_len = preset["model"]["max_seq_len"]
    cfg = OmegaConf.merge(cfg, common_overrides(preset, model_dir, data_file, out), {
        "dataset": {"data_files": str(data_file), "max_length": max_len, "max_prompt_length": max_len // 2},
        "eval_dataset": None, "eval_every_n_steps": None, "save_every_n_steps": None,
        "reference": {"mode": "model", "cache_dir": str(out / "reference_cache")},
    })  # fmt: skip
    for switch in switches:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in switch_settings(switch).items()]))
    path = out.parent / f"{out.name}.yaml"
    OmegaConf.save(cfg, path)
    return ["tune", "run", "recipes/lora_dpo_single_device.py", "--config", str(path)]


def trl_command(preset: dict, model_dir: Path, data_file: Path, out: Path) -> list[str] | None:
    try:
        import peft  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, str(REPO_ROOT / "benchmarks/trl_dpo.py"), "--model-dir", str(model_dir),
            "--data", str(data_file), "--out", str(out), "--batch-size", str(preset["batch_size"]),
            "--steps", str(preset["steps"]), "--max-length", str(2 * preset["model"]["max_seq_len"]),
            "--dtype", preset["dtype"]]  # fmt: skip


# ------------------------------------------------------------------------------------------- measuring


def step_orders(row: str, stats: dict, preset: dict) -> list[list[int]]:
    """The pairs of each step, as the row's recipe draws them."""
    b, n = preset["batch_size"], preset["steps"]
    parts = row.split("+")
    if "group" in parts:
        order = length_grouped_order(stats["packed" if "prefix" in parts else "lengths"], b, seed=0, epoch=0)
    else:
        order = list(range(len(stats["tokens"])))  # shuffle off: file order (the file itself is random)
    return [order[i * b : (i + 1) * b] for i in range(n)]


def computed_positions(row: str, stats: dict, batch: list[int], preset: dict) -> int:
    parts = row.split("+")
    settings = {k: v for part in parts[1:] for k, v in switch_settings(part).items()}
    if settings.get("max_micro_batch_tokens"):  # the step in micro-batches by tokens, as the recipe splits it
        collate = PreferenceCollator(0, settings.get("pad_to_multiple_of", 1), settings.get("prefix_sharing", False),
                                     settings.get("packing", False),
                                     settings.get("packing_row_tokens") or preset["model"]["max_seq_len"])
        samples = [{"prompt_ids": [0] * p, "chosen_response_ids": [0] * c, "rejected_response_ids": [0] * r}
                   for p, c, r in (stats["parts"][i] for i in batch)]  # fmt: skip
        micro_batches = plan_micro_batches(samples, len(batch), settings["max_micro_batch_tokens"], collate)
        return sum(collate.computed_positions([samples[i] for i in members]) for members in micro_batches)
    multiple = SWITCHES["compile"]["pad_to_multiple_of"] if "compile" in parts else 1
    if "pack" in parts:  # the recipe's layout: documents in rows of up to max_seq_len, as pack_rows fills them
        docs = [stats["packed"][i] for i in batch] if "prefix" in parts else [n for i in batch for n in
                                                                               stats["documents"][i]]  # fmt: skip
        budget = next((int(p[4:]) for p in parts if p.startswith("rows") and p[4:].isdigit()), None)
        rows = pack_rows(docs, budget or preset["model"]["max_seq_len"])
        longest = max(sum(docs[d] for d in r) for r in rows)
        return len(rows) * (longest + (-longest % multiple))
    if "prefix" in parts:
        rows, longest = len(batch), max(stats["packed"][i] for i in batch)
    else:
        rows, longest = 2 * len(batch), max(stats["lengths"][i] for i in batch)
    return rows * (longest + (-longest % multiple))


def step_flops(row: str, stats: dict, batch: list[int], preset: dict) -> float:
    """The useful FLOPs of one training step (the formula in the module docstring)."""
    m = preset["model"]
    d, layers, vocab = m["embed_dim"], m["num_layers"], m["vocab_size"]
    kv = d // m["num_heads"] * m["num_kv_heads"]
    weights = layers * (d * (2 * d + 2 * kv) + 3 * d * m["intermediate_dim"])

    def tri(n: int) -> int:  # the causal contexts of n tokens: 1 + 2 + ... + n
        return n * (n + 1) // 2

    positions = context = scored = 0
    for i in batch:
        p, c, r = stats["parts"][i]
        scored += c + r
        if "prefix" in row.split("+"):  # the prompt once; each response attends to the prompt and itself
            positions += p + c + r
            context += tri(p) + c * p + tri(c) + r * p + tri(r)
        else:
            positions += 2 * p + c + r
            context += tri(p + c) + tri(p + r)
    forward = 2 * weights * positions + 4 * d * layers * context + 2 * d * vocab * scored
    return (2 if "cache" in row.split("+") else 3) * forward


def gemm_peak_tflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """The best of ``repeats`` timed [n, n] @ [n, n] products in this process and thread count, in TFLOP/s."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def measure(row: str, command: list[str], stats: dict, preset: dict, out: Path, timeout: float | None) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TORCH_LOGS": "recompiles"}  # fmt: skip
    if preset["device"] == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    timing_file = out / "logs" / "timing.json"
    if proc.returncode != 0 or not timing_file.is_file():
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"row {row} failed (exit {proc.returncode}):\n{tail}")
    timing = json.loads(timing_file.read_text())
    times = dict((int(step), t) for step, t in timing["steps"])
    warm = preset["warmup"]
    steps = list(range(warm + 1, preset["steps"] + 1))
    durations = [times[s] - times[s - 1] for s in steps]
    batches = step_orders(row, stats, preset)
    tokens = sum(stats["tokens"][i] for s in steps for i in batches[s - 1])
    held = stats["packed"] if "prefix" in row.split("+") else stats["tokens"]  # shared rows hold a prompt once
    data_positions = sum(held[i] for s in steps for i in batches[s - 1])
    computed = sum(computed_positions(row, stats, batches[s - 1], preset) for s in steps)
    flops = sum(step_flops(row, stats, batches[s - 1], preset) for s in steps)
    memory = timing["cuda_max_allocated_gib"] if preset["device"] == "cuda" else timing["peak_rss_gib"]
    return {
        "row": row, "command": " ".join(command), "s_per_step": statistics.median(durations),
        "tokens_per_s": tokens / sum(durations), "peak_memory_gib": memory,
        "padding": 1 - data_positions / computed, "tflops_per_s": flops / sum(durations) / 1e12,
        "first_step_s": times[1], "wall_s": wall,
        "final_loss": timing["last_metrics"].get("loss"),
        "recompiles": (proc.stdout + proc.stderr).count("Recompiling function"),
    }  # fmt: skip


def table(results: list[dict], memory_kind: str, peak_tflops: float | None = None) -> str:
    base = next((r for r in results if r["row"] == "torchtune"), None)
    lines = [
        f"| row | s/step (median) | tokens/s | x torchtune | peak memory ({memory_kind}) | x torchtune "
        "| padding | MFU | startup + 1st step (s) | recompiles |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        mfu = f"{100 * r['tflops_per_s'] / peak_tflops:.0f}%" if peak_tflops and "tflops_per_s" in r else "-"
        mem = f"{r['peak_memory_gib'] / base['peak_memory_gib']:.2f}" if base else "-"
        lines.append(
            f"| {r['row']} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} | {speed} | "
            f"{r['peak_memory_gib']:.2f} GiB | {mem} | {100 * r['padding']:.0f}% | {mfu} | {r['first_step_s']:.1f} | "
            f"{r.get('recompiles', '-')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--rows", help="comma-separated rows (default: the preset's)")
    parser.add_argument("--work-dir", default=None, help="default outputs/bench_<preset>")
    parser.add_argument("--steps", type=int, help="override the preset's step count")
    parser.add_argument("--json", help="also write the results here (after every row)")
    parser.add_argument("--row-timeout", type=float, help="seconds; a row that takes longer is reported as failed")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="override the preset's dtype (bf16 on CPU: AMX)")
    parser.add_argument("--peak-tflops", type=float, help="the dense peak for MFU (default: measured GEMM, CPU)")
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset])
    if args.steps:
        preset["steps"] = args.steps
    if args.dtype:
        preset["dtype"] = args.dtype
    work = Path(args.work_dir or REPO_ROOT / f"outputs/bench_{args.preset}").resolve()
    model_dir, data_file = make_inputs(preset, work)
    stats = pair_stats(data_file, preset)
    runs = work / f"runs_{time.strftime('%Y%m%d_%H%M%S')}"
    runs.mkdir(parents=True)
    print(f"{len(stats['tokens'])} pairs, {sum(stats['tokens']) / len(stats['tokens']):.0f} tokens per pair "
          f"(chosen + rejected, prompt in both); timing steps {preset['warmup'] + 1}-{preset['steps']}")  # fmt: skip

    results = []
    for row in (args.rows or preset["rows"]).split(","):
        out = runs / row.replace("+", "_")
        if row == "torchtune":
            command = torchtune_command(preset, model_dir, data_file, out)
        elif row == "trl":
            command = trl_command(preset, model_dir, data_file, out)
            if command is None:
                print("trl: skipped (pip install -e '.[bench]' to include it)")
                continue
        else:
            command = ours_command(preset, model_dir, data_file, out, row.split("+")[1:])
        print(f"{row}: {' '.join(command)}", flush=True)
        try:
            results.append(measure(row, command, stats, preset, out, args.row_timeout))
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            print(f"  FAILED: {error}", flush=True)
            continue
        if args.json:
            Path(args.json).write_text(json.dumps({"preset": args.preset, "results": results}, indent=1))
        r = results[-1]
        print(
            f"  {r['s_per_step']:.3f} s/step, {r['tokens_per_s']:.0f} tokens/s, "
            f"{r['peak_memory_gib']:.2f} GiB, loss {r['final_loss']}",
            flush=True,
        )

    peak = args.peak_tflops
    if peak is None and preset["device"] == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the rows' OMP_NUM_THREADS=1
        peak = gemm_peak_tflops(torch.bfloat16 if preset["dtype"] == "bf16" else torch.float32)
        torch.set_num_threads(threads)
    memory_kind = "cuda max allocated" if preset["device"] == "cuda" else "RSS"
    device = torch.cuda.get_device_name() if preset["device"] == "cuda" else f"CPU, {os.cpu_count()} cores, 1 thread"
    print(f"\n{args.preset} preset on {device}, torch {torch.__version__}\n")
    print(table(results, memory_kind, peak))
    if peak:
        print(f"\nMFU against {peak:.3f} TFLOP/s ({preset['dtype']} GEMM peak, 2048^3, 1 thread)")
    if args.json:
        summary = {"preset": args.preset, "device": device, "dtype": preset["dtype"], "peak_tflops": peak}
        Path(args.json).write_text(json.dumps({**summary, "results": results}, indent=1))


if __name__ == "__main__":
    main()
