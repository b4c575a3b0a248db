"""Peak memory and time of the log-prob path: torchtune's full fp32 logits vs our chunked head.

    OMP_NUM_THREADS=1 python benchmarks/logprobs_memory.py [--vocab 128256 --dim 256 --seqs 8 --length 512]
    python benchmarks/logprobs_memory.py --device cuda --dtype bfloat16 --dim 2048 --seqs 8 --length 2048

Each method runs forward + backward of sum(sequence log-probs) from final hidden states [N, L, D] through an
output projection D -> V, in a fresh subprocess, and reports the growth of peak memory over the inputs' (peak RSS
on CPU, ``torch.cuda.max_memory_allocated`` on CUDA).
Half of every sequence is prompt (label -100), as in a DPO batch with a prompt as long as the response.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn


class OutputHead(nn.Module):
    """The tail of a torchtune TransformerDecoder: forward(h) = unembed(h) = output(norm(h)).float()."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.norm = nn.Identity()
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.unembed(h)

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h)).float()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_method(method: str, head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int):
    from dpo_components.logprobs import full_logits_sequence_logprobs, sequence_logprobs

    if method == "full_logits":
        return full_logits_sequence_logprobs(head(hidden), labels)[0]
    return sequence_logprobs(head, hidden, labels, chunk_size=chunk_size)[0]


def run_one(
    method: str, vocab: int, dim: int, seqs: int, length: int, chunk_size: int, device: str, dtype: str
) -> dict:
    torch.manual_seed(0)
    cuda = device == "cuda"
    head = OutputHead(dim, vocab).to(device, getattr(torch, dtype))
    hidden = torch.randn(seqs, length, dim, device=device, dtype=getattr(torch, dtype), requires_grad=True)
    labels = torch.randint(0, vocab, (seqs, length), device=device)
    labels[:, : length // 2] = -100
    if cuda:  # one small call first, so that the timing below is not CUDA's lazy start-up
        small = hidden[:1, -16:].detach().requires_grad_()
        run_method(method, head, small, labels[:1, -16:], chunk_size).sum().backward()
        head.zero_grad(set_to_none=True)  # its [V, D] gradient must not count as "before"
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if cuda else _current_rss_mb()
    start = time.perf_counter()
    sums = run_method(method, head, hidden, labels, chunk_size)
    sums.sum().backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()
    return {
        "method": method,
        "peak_mb": peak - before,
        "seconds": seconds,
        "checksum": float(sums.sum()),
        "grad_norm": float(hidden.grad.norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--seqs", type=int, default=8, help="rows in the batch: 2 x pairs")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="of head and hidden")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = (args.vocab, args.dim, args.seqs, args.length, args.chunk_size, args.device, args.dtype)
    if args.child:
        print(json.dumps(run_one(args.child, *sizes)))
        return

    rows = []
    for method in ("full_logits", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--child", method, "--vocab", str(args.vocab), "--dim",
                              str(args.dim), "--seqs", str(args.seqs), "--length", str(args.length), "--chunk-size",
                              str(args.chunk_size), "--device", args.device, "--dtype", args.dtype],
                             capture_output=True, text=True, check=True)  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    logits_mb = args.seqs * args.length * args.vocab * 4 / 2**20
    print(f"N={args.seqs} L={args.length} V={args.vocab} D={args.dim} chunk={args.chunk_size} "
          f"{args.dtype} on {args.device} (one fp32 [N, L, V] tensor = {logits_mb:.0f} MB), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")  # fmt: skip
    print(f"| {'method':<12} | {'peak MB over inputs':>19} | {'ratio':>5} | {'fwd+bwd s':>9} | {'sum of logps':>14} |")
    print(f"|{'-' * 14}|{'-' * 21}|{'-' * 7}|{'-' * 11}|{'-' * 16}|")
    for row in rows:
        ratio = row["peak_mb"] / rows[0]["peak_mb"]
        print(f"| {row['method']:<12} | {row['peak_mb']:>19.0f} | {ratio:>5.2f} | {row['seconds']:>9.2f} "
              f"| {row['checksum']:>14.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
