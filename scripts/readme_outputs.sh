#!/usr/bin/env bash
# Runs every command whose output README.md and docs/WALKTHROUGH.md show, on the tiny model made
# from an empty cache, and writes each output to a file under OUT (default /tmp/readme-outputs).
# The tiny model is retrained whenever a docstring or comment of the package changes (tiny.py
# hashes them), so after such a change the README's output is stale: run this, then copy the
# outputs into the code blocks (the tour's progress bars collapse to their last state).
#   bash scripts/readme_outputs.sh            (about 5 minutes on 2 cores)
set -u
cd "$(dirname "$0")/.."
P=${PHI3_SCRATCH:-$PWD/.venv/bin/phi3-scratch}
OUT=${OUT:-/tmp/readme-outputs}
rm -rf "$OUT"; mkdir -p "$OUT"
export PHI3_SCRATCH_CACHE="$OUT/cache"  # an empty cache: the tour trains the tiny model, as a new user's does
$P tour --model tiny > "$OUT/tour.txt" 2>&1
$P generate "What does stream_tokens do?" --chat --model tiny > "$OUT/generate.txt" 2>/dev/null
$P generate "What does stream_tokens do?" --chat --model tiny --temperature 0.8 --top-p 0.9 --seed 1 > "$OUT/generate-sampled.txt" 2>/dev/null
printf 'What does sample do?\nWhat does KVCache do?\n/reset\n/exit\n' | $P chat --model tiny --max-new-tokens 40 > "$OUT/chat.txt" 2>/dev/null
$P arch --model tiny > "$OUT/arch.txt" 2>/dev/null
$P next-token "The attention probabilities" --model tiny --top-k 5 > "$OUT/next-token.txt" 2>/dev/null
$P bench "The KV cache" --model tiny > "$OUT/bench.txt" 2>/dev/null
$P bench "The KV cache" --model tiny --compile > "$OUT/bench-compile.txt" 2>/dev/null
$P bench "The KV cache" --model tiny --vs-transformers --runs 3 > "$OUT/bench-vs-transformers.txt" 2>/dev/null
printf '\n1\nq\n' | $P step "The KV cache" --model tiny --top-k 4 > "$OUT/step.txt" 2>/dev/null
$P lens "What does generate do?" --chat --model tiny > "$OUT/lens.txt" 2>/dev/null
$P lens "The KV cache" --model tiny --all-positions > "$OUT/lens-all.txt" 2>/dev/null
(cd "$OUT" && $P attention "The KV cache keeps keys" --model tiny --layer all --out attention-all.png > attention.txt 2>/dev/null)
$P compare --model tiny > "$OUT/compare.txt" 2>/dev/null
$P generate "" --model tiny > "$OUT/error-empty.txt" 2>&1
$P generate hi --model tiny --max-new-tokens 0 > "$OUT/error-zero.txt" 2>&1
HF_HUB_OFFLINE=1 $P generate hi > "$OUT/error-offline.txt" 2>&1
echo "outputs in $OUT"
