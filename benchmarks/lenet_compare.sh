#!/usr/bin/env bash
# Tuned against untuned LeNet training steps (issue: "tuning pays off in training"), the README's
# table. For each thread count and batch size: `autotune search lenet` (products, then the layer
# check) into a fresh cache, then RUNS separate `train_lenet.py --compare` processes (each 256
# interleaved steps of three modes: untuned, tuned, torch's layers with the flat optimizer), and
# the median ratio of those runs with their range. Run it on a quiet machine: parallel work makes
# 2-thread torch timings meaningless.
#
#   benchmarks/lenet_compare.sh [THREADS=1,2] [BATCHES=1,16,64] [TRIALS=12] [RUNS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-1,2}
BATCHES=${2:-1,16,64}
TRIALS=${3:-12}
RUNS=${4:-3}
STEPS=${STEPS:-256}
BIN=${BIN:-.venv/bin}
OUT=${OUT:-results/lenet-compare}
rm -rf "$OUT" && mkdir -p "$OUT"
printf "%-8s %-6s %-22s %-22s %s\n" threads batch "tuned/untuned (range)" "flat optimizer alone" "layers on our kernels (step check)"
for t in ${THREADS//,/ }; do
  for b in ${BATCHES//,/ }; do
    cache="$OUT/cache-${t}t"
    "$BIN/autotune" search lenet --batch "$b" --threads "$t" --trials "$TRIALS" --cache-dir "$cache" --json \
      > "$OUT/search-${t}t-b$b.json" 2> "$OUT/search-${t}t-b$b.err"
    for run in $(seq 1 "$RUNS"); do
      "$BIN/python" examples/train_lenet.py --tuned --compare --compare-steps "$STEPS" --batch-size "$b" \
        --threads "$t" --cache-dir "$cache" --policy cached --epochs 0 --no-progress \
        --summary-json "$OUT/compare-${t}t-b$b-run$run.json" > "$OUT/compare-${t}t-b$b-run$run.txt" 2>&1
    done
    "$BIN/python" - "$OUT/search-${t}t-b$b.json" "$t" "$b" "$OUT"/compare-"${t}"t-b"$b"-run*.json <<'PY'
import json, statistics, sys
search = json.load(open(sys.argv[1]))
runs = [json.load(open(path))["compare"] for path in sys.argv[4:]]
tuned = sorted(r["ratio"] for r in runs)
flat = statistics.median(r["flat_optimizer_ratio"] for r in runs)
step = search.get("step_check")
ours = {json.dumps(e["problem"]) for e in search["layers"] if e["algorithm"] != "vendor"}
kept = (f"{', '.join(layer.split(' ')[1] for layer in step['layers_kept']) or 'none'} "
        f"(step with ours {step['ratio']:.2f}x torch's)" if step else "")
cell = f"{statistics.median(tuned):.3f} ({tuned[0]:.3f}-{tuned[-1]:.3f})"
print(f"{sys.argv[2]:<8} {sys.argv[3]:<6} {cell:<22} {flat:<22.3f} {kept or ('none' if not ours else '')}")
PY
  done
done
