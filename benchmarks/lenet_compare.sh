#!/usr/bin/env bash
# Tuned against untuned LeNet training steps (issue: "tuning pays off in training"), the README's
# table. For each thread count and batch size: `autotune search lenet` (products, then the layer
# check) into a fresh cache, then `train_lenet.py --compare` (interleaved blocks, 256 steps each).
# Run it on a quiet machine: parallel work makes 2-thread torch timings meaningless.
#
#   benchmarks/lenet_compare.sh [THREADS=1,2] [BATCHES=1,16,64] [TRIALS=12]
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-1,2}
BATCHES=${2:-1,16,64}
TRIALS=${3:-12}
BIN=${BIN:-.venv/bin}
OUT=${OUT:-results/lenet-compare}
rm -rf "$OUT" && mkdir -p "$OUT"
printf "%-8s %-6s %-10s %-12s %-6s %s\n" threads batch tuned_ms untuned_ms ratio "convs on our kernels (step check)"
for t in ${THREADS//,/ }; do
  for b in ${BATCHES//,/ }; do
    cache="$OUT/cache-${t}t"
    "$BIN/autotune" search lenet --batch "$b" --threads "$t" --trials "$TRIALS" --cache-dir "$cache" --json \
      > "$OUT/search-${t}t-b$b.json" 2> "$OUT/search-${t}t-b$b.err"
    "$BIN/python" examples/train_lenet.py --tuned --compare --compare-steps 256 --batch-size "$b" --threads "$t" \
      --cache-dir "$cache" --policy cached --epochs 0 --no-progress --summary-json "$OUT/compare-${t}t-b$b.json" \
      > "$OUT/compare-${t}t-b$b.txt" 2>&1
    "$BIN/python" - "$OUT/compare-${t}t-b$b.json" "$OUT/search-${t}t-b$b.json" "$t" "$b" <<'EOF'
import json, sys
compare = json.load(open(sys.argv[1]))["compare"]
search = json.load(open(sys.argv[2]))
step = search.get("step_check")
ours = {json.dumps(e["problem"]) for e in search["layers"] if e["algorithm"] != "vendor"}
kept = (f"{', '.join(layer.split(' ')[1] for layer in step['layers_kept']) or 'none'} "
        f"(step with ours {step['ratio']:.2f}x torch's)" if step else "")
print(f"{sys.argv[3]:<8} {sys.argv[4]:<6} {compare['tuned_ms']:<10.3f} {compare['untuned_ms']:<12.3f} "
      f"{compare['ratio']:<6.3f} {kept or ('none' if not ours else '')}")
EOF
  done
done
