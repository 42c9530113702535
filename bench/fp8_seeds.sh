#!/usr/bin/env bash
# The FP8 experiment over several seeds: one seed cannot separate a real cost of E4M3 from
# the trajectory noise of a small MoE run (bf16 from another seed already ends 1.2 % away), so
# this trains bf16, fp8 and fp32 (RUNS) from each of SEEDS, paired: the same seed gives
# every run the same initialisation and the same batches, and fp32 against bf16 measures how
# far a run moves when only rounding changes. Each (seed, run) is one
# bench/fp8_experiment.sh instance with THREADS=1 in OUT/seed-S; JOBS of them share the cores.
# Then `dsv3 plot` groups the runs by label and reports, per label, the mean final validation
# loss and the paired gap to bf16, mean ± standard error and 95 % interval over the seeds:
#   OUT/table.md, OUT/val_loss.csv, OUT/val_loss.svg (mean curves, ± sd bands),
#   OUT/gap.svg (each label's gap to bf16 by step, paired mean ± s.e.).
# Defaults (the README's table): 10 seeds x (bf16, fp8, fp32) at 250 steps of 32 x 128
# tokens, about 4 hours of CPU (one thread: an fp8 run ~13 minutes, bf16 and fp32 ~5), so
# ~2 hours on 2 cores.
# Interrupted runs continue where they stopped; finished ones are not run again.
#   SEEDS="1234 1235" RUNS="bf16 fp8" JOBS=2 OUT=out/fp8-seeds DSV3=build/dsv3 bench/fp8_seeds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1234 1235 1236 1237 1238 1239 1240 1241 1242 1243"}
RUNS=${RUNS:-"bf16 fp8 fp32"}
JOBS=${JOBS:-2}
OUT=${OUT:-out/fp8-seeds}
DSV3=${DSV3:-build/dsv3}
STEPS=${STEPS:-250}
export STEPS BATCH=${BATCH:-32} LR=${LR:-1e-3} DSV3
[[ " $RUNS " == *" bf16 "* ]] || { echo "RUNS must include bf16 (the baseline)" >&2; exit 2; }
if [ "$DSV3" = build/dsv3 ]; then scripts/setup.sh --target dsv3; fi
mkdir -p "$OUT"

# The slow runs first within each seed, so that the lanes stay busy to the end.
for seed in $SEEDS; do for run in $(tr ' ' '\n' <<<"$RUNS" | sort -r); do echo "$seed $run"; done; done |
  xargs -P "$JOBS" -L 1 bash -c 'OUT="$0/seed-$1" SEED=$1 THREADS=1 bench/fp8_experiment.sh "$2" >"$0/seed-$1-$2.log" 2>&1 ||
    echo "seed $1 $2 failed: see $0/seed-$1-$2.log" >&2' "$OUT"

args=()
for run in $RUNS; do
  paths=()
  for seed in $SEEDS; do
    if [ "$(tail -1 "$OUT/seed-$seed/$run/metrics.csv" 2>/dev/null | cut -d, -f1)" = "$STEPS" ]; then
      paths+=("$OUT/seed-$seed/$run")
    else
      echo "seed $seed $run did not finish: left out" >&2
    fi
  done
  [ ${#paths[@]} -gt 0 ] && args+=("$run=$(IFS=,; echo "${paths[*]}")")
done
"$DSV3" plot "${args[@]}" --column val_loss --baseline bf16 --from-step $((STEPS / 10)) \
  --title "validation loss over seeds ($SEEDS), tiny-demo (5.2M), $BATCH x 128 tokens per step" \
  --out "$OUT/val_loss.svg" --csv "$OUT/val_loss.csv" --gap-out "$OUT/gap.svg" | tee "$OUT/table.md"
echo "curves: $OUT/val_loss.svg $OUT/gap.svg $OUT/val_loss.csv  table: $OUT/table.md"
