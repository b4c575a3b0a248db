"""benchmarks/dpo_throughput.py keeps working: its smoke preset runs torchtune's built-in recipe and ours."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


@pytest.mark.recipe
def test_throughput_harness_smoke(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/dpo_throughput.py", "--preset", "smoke", "--work-dir", str(tmp_path),
         "--json", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = {r["row"]: r for r in json.loads(out.read_text())["results"]}
    rows = ["torchtune", "ours", "ours+cache+group+prefix", "ours+cache+prefix+pack+tokens128"]
    assert list(results) == rows, proc.stdout[-3000:]
    for r in results.values():
        assert r["tokens_per_s"] > 0 and r["peak_memory_gib"] > 0
        assert 0.6 < r["final_loss"] < 0.8  # a few steps from ln 2 on a random model: each run really trained
    # what each layout computes: the standard rows pad, the grouped shared rows hold each prompt once
    assert results["ours"]["padding"] == results["torchtune"]["padding"] > 0
    assert results["ours+cache+group+prefix"]["padding"] < results["ours"]["padding"]
    packed = results["ours+cache+prefix+pack+tokens128"]  # random order, packed, in micro-batches by tokens
    assert packed["padding"] < 0.5 * results["ours"]["padding"]
    # the MFU column: useful FLOPs over the GEMM peak measured in the same process
    assert all(0 < r["tflops_per_s"] < json.loads(out.read_text())["peak_tflops"] for r in results.values())
    assert "| MFU |" in proc.stdout and "GEMM peak" in proc.stdout
    assert "| torchtune |" in proc.stdout and "x torchtune" in proc.stdout
