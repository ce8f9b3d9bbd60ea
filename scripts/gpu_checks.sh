#!/usr/bin/env bash
# Every GPU check of the speed issue in one run, for the device tool:
#   run: bash scripts/gpu_checks.sh        (writes JSON lines and BENCHMARKS.md under $OUT)
# Try it on the CPU first: CONFIG=micro OUT=/tmp/out bash scripts/gpu_checks.sh
set -euo pipefail
CONFIG=${CONFIG:-phi3-mini}  # Phi-3-mini-4k-instruct's shape, built into bench.py
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/card.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/card.txt"
python -c "import torch, transformers; print(torch.__version__, transformers.__version__)" > "$OUT/versions.txt"
python scripts/parity.py --config "$CONFIG" --seq-len 512 | tee "$OUT/parity.jsonl"
cp docs/BENCHMARKS.md "$OUT/BENCHMARKS.md" 2>/dev/null || true
python scripts/bench.py --config "$CONFIG" --runs 3 --markdown "$OUT/BENCHMARKS.md" | tee "$OUT/bench.jsonl"
