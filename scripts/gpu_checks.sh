#!/usr/bin/env bash
# Every GPU check of the speed issues in one run for the device tool, most important first:
#   1. the benchmark at Phi-3-mini's shape, bf16: eager, sdpa, compiled, int8 and compiled int8 vs
#      transformers' eager, sdpa and compiled (static cache + torch.compile); the profile
#   2. loading memory: peak GPU memory and host memory while loading a bf16 checkpoint onto the GPU;
#      then the whole Phi-3-mini loaded as int8 and generating 100 tokens (the target: <= 4.3 GB)
#   3. full-size parity, bf16 then fp32, eager and compiled paths
# Under $OUT, six files (the device tool brings back only a few): bench.jsonl, BENCHMARKS.md,
# profile.txt, parity.jsonl, load_memory.jsonl, and log.txt (card, versions, timeline, stderr).
#   run: bash scripts/gpu_checks.sh
# Try it on the CPU first: PYTHON=.venv/bin/python CONFIG=micro MINI_LAYERS=1 INT8_LAYERS=1 DEVICE=cpu OUT=/tmp/out bash scripts/gpu_checks.sh
set -uo pipefail  # no -e: one failing step must not cost the others their (scarce) GPU time
PY=${PYTHON:-python3}
CONFIG=${CONFIG:-phi3-mini}  # Phi-3-mini-4k-instruct's shape, built into phi3_scratch/benchmark.py
MINI_LAYERS=${MINI_LAYERS:-8}  # the loading check's checkpoint: Phi-3-mini's widths, this many layers
OUT=${OUT:-/tmp/gpu-checks}
LOG="$OUT/log.txt"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCH_LOGS=${TORCH_LOGS:-perf_hints,recompiles}  # why CUDA graphs were skipped, why a step recompiled
stamp() { echo "== $(date +%T) $*" >> "$LOG"; }
stamp start
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$LOG" 2>&1
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$LOG" 2>&1
cp docs/BENCHMARKS.md "$OUT/BENCHMARKS.md" 2>/dev/null  # keeps the CPU sections; this card's is added
stamp bench
timeout 450 $PY scripts/bench.py --config "$CONFIG" --runs 3 --markdown "$OUT/BENCHMARKS.md" \
  --profile "$OUT/profile.txt" > "$OUT/bench.jsonl" 2>> "$LOG" || stamp "bench failed: exit $?"
stamp load_memory
CKPT=$(mktemp -d)
timeout 60 $PY scripts/load_memory.py make "$CKPT" --mini-layers "$MINI_LAYERS" --dtype bfloat16 2>> "$LOG" \
  && timeout 30 $PY scripts/load_memory.py measure "$CKPT" --device "${DEVICE:-cuda}" > "$OUT/load_memory.jsonl" 2>> "$LOG" \
  || stamp "load_memory failed: exit $?"
rm -rf "$CKPT"
stamp int8_memory
CKPT=$(mktemp -d)
timeout 150 $PY scripts/load_memory.py make "$CKPT" --mini-layers "${INT8_LAYERS:-32}" --dtype bfloat16 2>> "$LOG" \
  && timeout 90 $PY scripts/load_memory.py measure "$CKPT" --device "${DEVICE:-cuda}" --quantize int8 >> "$OUT/load_memory.jsonl" 2>> "$LOG" \
  || stamp "int8_memory failed: exit $?"
rm -rf "$CKPT"
stamp parity
timeout 200 $PY scripts/parity.py --config "$CONFIG" --seq-len 256 --dtypes bf16 fp32 > "$OUT/parity.jsonl" \
  2>> "$LOG" || stamp "parity failed: exit $?"
stamp done
