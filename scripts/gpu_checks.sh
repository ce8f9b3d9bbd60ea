#!/usr/bin/env bash
# The GPU checks that exist so far for the speed issue (full-size parity, the benchmark), in one
# run for the device tool; the compiled decode path and the loading-memory checks are still to come:
#   run: bash scripts/gpu_checks.sh        (writes JSON lines and BENCHMARKS.md under $OUT)
# Try it on the CPU first: CONFIG=micro OUT=/tmp/out bash scripts/gpu_checks.sh
set -uo pipefail  # no -e: one failing step must not cost the others their (scarce) GPU time
PY=${PYTHON:-python3}
CONFIG=${CONFIG:-phi3-mini}  # Phi-3-mini-4k-instruct's shape, built into bench.py
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/card.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/card.txt"
$PY -c "import torch, transformers; print(torch.__version__, transformers.__version__)" > "$OUT/versions.txt"
$PY scripts/parity.py --config "$CONFIG" --seq-len 512 | tee "$OUT/parity.jsonl" || echo "parity failed" >> "$OUT/failed.txt"
cp docs/BENCHMARKS.md "$OUT/BENCHMARKS.md" 2>/dev/null
$PY scripts/bench.py --config "$CONFIG" --runs 3 --markdown "$OUT/BENCHMARKS.md" | tee "$OUT/bench.jsonl" \
  || echo "bench failed" >> "$OUT/failed.txt"
