#!/usr/bin/env bash
# The GPU checks and benchmarks of benchmarks/README.md, as one command for a machine with one CUDA GPU whose
# Python already has torch (the device tool's machines). Wheels of what torchtune needs and that machine lacks
# travel in .whl/ (see benchmarks/README.md). Results go to $OUT (default outputs/gpu).
# Env: ROWS (default: the gpu preset's rows), SKIP_CHECKS=1, BENCH_TIMEOUT (s, default 320).
set -uo pipefail
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, torchtune, torchao; print('torch', torch.__version__, 'torchtune', torchtune.__version__, 'torchao', torchao.__version__)"
  date -u; } 2>&1 | grep -v "Skipping\|Warning\|Configuration class" | tee "$OUT/machine.txt"
if [ -z "${SKIP_CHECKS:-}" ]; then
  timeout 100 python3 benchmarks/gpu_checks.py 2>&1 | grep -v Skipping | tee "$OUT/checks.txt"
fi
TORCH_LOGS=recompiles timeout "${BENCH_TIMEOUT:-320}" python3 benchmarks/dpo_throughput.py --preset gpu \
  ${ROWS:+--rows "$ROWS"} --row-timeout 100 --work-dir /tmp/bench_gpu --json "$OUT/throughput.json" 2>&1 \
  | grep -v "Skipping\|Warning\|Configuration class" | tee "$OUT/throughput.txt"
for log in /tmp/bench_gpu/runs_*/*.log; do
  echo "$(basename "$log"): $(grep -c 'Recompiling' "$log") recompiles; $(grep -m1 -o 'dynamic flex_attention compile failed.*' "$log")"
done | tee -a "$OUT/throughput.txt"
cp /tmp/bench_gpu/runs_*/*prefix*.log "$OUT/" 2>/dev/null
timeout 60 python3 benchmarks/logprobs_memory.py --device cuda --dtype bfloat16 --vocab 128256 --dim 2048 --seqs 4 \
  --length 2048 2>&1 | grep -v "Skipping\|Warning\|Configuration class" | tee "$OUT/logprobs_memory.txt"
