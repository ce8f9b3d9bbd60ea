#!/usr/bin/env bash
# Every GPU check of the speed issues for the device tool, in stages, most important first:
#   bench        the benchmark at Phi-3-mini's shape, bf16: eager, sdpa, compiled, int8 and compiled
#                int8 vs transformers' eager, sdpa and compiled (static cache + torch.compile); the
#                profile, ending with where a compiled step's time goes (the loop, the step alone,
#                its kernels and the idle gaps between them). Stopped by its timeout, it still
#                reports the runs it finished (but no profile).           ~6-7 min (4 compilations)
#   int8_memory  the whole Phi-3-mini loaded as int8, generating 100 tokens (target: <= 4.3 GB);
#                then the same checkpoint loaded as int4 (reported)
#   load_memory  peak GPU memory and host memory while loading a bf16 checkpoint onto the GPU
#                                                          these two: ~2 min
#   parity       full-size parity against transformers' eager attention, fp32 then bf16: eager,
#                compiled, int8 and the bf16-weights yardstick (two compilations) ~3 min
#   attention    the compiled step with torch's fused attention against the written-out one
#                (a lead for the compiled step's speed)                   ~2-3 min
#   int4         compiled int4 against compiled int8 (same run) and int4's parity at full size
#                (its memory is measured by int8_memory)                  ~3-4 min
# With no argument it runs them all, more than one 10-minute device call holds. A session has 15
# device minutes, the machine's start (~30 s) included, and a fresh start needs 4 minutes left, so
# two calls fit, the second made at once, while the machine is warm:
#   bash scripts/gpu_checks.sh bench                       (timeout_s 560)
#   bash scripts/gpu_checks.sh int8_memory                 (timeout_s: what is left, about 280)
# and the next session with a GPU:
#   bash scripts/gpu_checks.sh parity attention            (timeout_s 480)
#   bash scripts/gpu_checks.sh int4 load_memory            (timeout_s 360)
# Under $OUT (the device tool brings back at most 8 files): bench.jsonl, BENCHMARKS.md, profile.txt,
# load_memory.jsonl, parity.jsonl, attention.jsonl, int4.jsonl and log.txt (card, versions, timeline,
# stderr).
# Try it on the CPU first: PYTHON=.venv/bin/python CONFIG=micro MINI_LAYERS=1 INT8_LAYERS=1 DEVICE=cpu OUT=/tmp/out bash scripts/gpu_checks.sh
set -uo pipefail  # no -e: one failing step must not cost the others their (scarce) GPU time
PY=${PYTHON:-python3}
CONFIG=${CONFIG:-phi3-mini}  # Phi-3-mini-4k-instruct's shape, built into phi3_scratch/benchmark.py
MINI_LAYERS=${MINI_LAYERS:-8}  # the loading check's checkpoint: Phi-3-mini's widths, this many layers
OUT=$(mkdir -p "${OUT:-/tmp/gpu-checks}" && cd "${OUT:-/tmp/gpu-checks}" && pwd) || exit 1  # absolute: the script cds
STAGES=${*:-bench int8_memory load_memory parity attention int4}
LOG="$OUT/log.txt"
DEVICE=${DEVICE:-cuda}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCH_LOGS=${TORCH_LOGS:-perf_hints,recompiles}  # why CUDA graphs were skipped, why a step recompiled
stamp() { echo "== $(date +%T) $*" >> "$LOG"; }
wanted() { [[ " $STAGES " == *" $1 "* ]]; }
stamp "start: $STAGES"
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$LOG" 2>&1
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$LOG" 2>&1
if wanted bench; then
  stamp bench
  cp docs/BENCHMARKS.md "$OUT/BENCHMARKS.md" 2>/dev/null  # keeps the CPU sections; this card's is added
  timeout "${BENCH_TIMEOUT:-500}" $PY scripts/bench.py --config "$CONFIG" --device "$DEVICE" --runs 3 \
    --markdown "$OUT/BENCHMARKS.md" --profile "$OUT/profile.txt" > "$OUT/bench.jsonl" 2>> "$LOG" || stamp "bench failed: exit $?"
fi
if wanted int8_memory; then
  stamp int8_memory
  CKPT=$(mktemp -d)
  timeout 130 $PY scripts/load_memory.py make "$CKPT" --mini-layers "${INT8_LAYERS:-32}" --dtype bfloat16 2>> "$LOG" \
    && timeout 80 $PY scripts/load_memory.py measure "$CKPT" --device "$DEVICE" --quantize int8 >> "$OUT/load_memory.jsonl" 2>> "$LOG" \
    || stamp "int8_memory failed: exit $?"
  [ -f "$CKPT/config.json" ] && { timeout 50 $PY scripts/load_memory.py measure "$CKPT" --device "$DEVICE" --quantize int4 \
    >> "$OUT/load_memory.jsonl" 2>> "$LOG" || stamp "int4 memory failed: exit $?"; }
  rm -rf "$CKPT"
fi
if wanted load_memory; then
  stamp load_memory
  CKPT=$(mktemp -d)
  timeout 60 $PY scripts/load_memory.py make "$CKPT" --mini-layers "$MINI_LAYERS" --dtype bfloat16 2>> "$LOG" \
    && timeout 30 $PY scripts/load_memory.py measure "$CKPT" --device "$DEVICE" >> "$OUT/load_memory.jsonl" 2>> "$LOG" \
    || stamp "load_memory failed: exit $?"
  rm -rf "$CKPT"
fi
if wanted parity; then
  stamp parity
  timeout 240 $PY scripts/parity.py --config "$CONFIG" --device "$DEVICE" --seq-len 256 --dtypes fp32 bf16 \
    --paths eager compiled int8 bf16-weights >> "$OUT/parity.jsonl" 2>> "$LOG" || stamp "parity failed: exit $?"
fi
if wanted attention; then
  stamp attention
  timeout 210 $PY scripts/bench.py --config "$CONFIG" --device "$DEVICE" --runs 3 --prefill --transformers eager \
    --ours phi3_scratch-compiled phi3_scratch-compiled-sdpa > "$OUT/attention.jsonl" 2>> "$LOG" \
    || stamp "attention failed: exit $?"
fi
if wanted int4; then
  stamp int4
  timeout 200 $PY scripts/bench.py --config "$CONFIG" --device "$DEVICE" --runs 3 --prefill --transformers eager \
    --ours phi3_scratch-compiled-int8 phi3_scratch-compiled-int4 > "$OUT/int4.jsonl" 2>> "$LOG" \
    || stamp "int4 bench failed: exit $?"
  timeout 60 $PY scripts/parity.py --config "$CONFIG" --device "$DEVICE" --seq-len 256 --dtypes bf16 \
    --paths int4 >> "$OUT/parity.jsonl" 2>> "$LOG" || stamp "int4 parity failed: exit $?"
fi
stamp done
