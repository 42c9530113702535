#!/usr/bin/env bash
# The FP8 experiment over several seeds: one seed cannot separate a real cost of E4M3 from
# the trajectory noise of a small MoE run (bf16 from another seed already ends 1.2 % away), so
# this trains bf16, fp8 and fp32 (RUNS) from each of SEEDS, paired: the same seed gives
# every run the same initialisation and the same batches, and fp32 against bf16 measures how
# far a run moves when only rounding changes. Each (seed, run) is one
# bench/fp8_experiment.sh instance with THREADS=1 in OUT/seed-S; JOBS of them share the cores.
# Each run's final checkpoint is then scored twice:
#   - validation loss: the validation shards (the corpus's tail, Revelation: 24.6K tokens
#     of another book than most of the training text), as the runs log it in metrics.csv;
#   - held-out loss: `dsv3 perplexity --split unseen`, the training windows the seed's runs
#     never reached (244K tokens, 10x more, from the training distribution): RUN/heldout.csv.
# `dsv3 plot` groups the runs by label and reports, per label, the mean final loss and the
# paired gap to bf16, mean ± standard error and 95 % interval over the seeds (only seeds
# where every run in RUNS finished):
#   REPORT.md (validation), REPORT-heldout.md (held-out), REPORT-val_loss.csv / .svg (mean
#   curves, ± sd bands), REPORT-gap.svg (each label's gap to bf16 by step).
# Defaults (the README's rows for 10 seeds): 10 seeds x (bf16, fp8, fp32) at 250 steps of
# 32 x 128 tokens, about 4 hours of CPU (one thread: an fp8 run ~8-12 minutes, bf16 and fp32
# ~5), so ~2 hours on 2 cores; the held-out scoring adds ~20 s a run. The README's 20-seed
# rows: SEEDS="$(seq -s ' ' 1234 1253)" RUNS="bf16 fp8" REPORT=out/fp8-seeds/all20.
# Interrupted runs continue where they stopped; finished ones are not run again.
#   SEEDS="1234 1235" RUNS="bf16 fp8" JOBS=2 OUT=out/fp8-seeds REPORT=out/fp8-seeds/table \
#     DSV3=build/dsv3 bench/fp8_seeds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1234 1235 1236 1237 1238 1239 1240 1241 1242 1243"}
RUNS=${RUNS:-"bf16 fp8 fp32"}
JOBS=${JOBS:-2}
OUT=${OUT:-out/fp8-seeds}
REPORT=${REPORT:-$OUT/table}
DSV3=${DSV3:-build/dsv3}
DATA=out/demo/shards  # where bench/fp8_experiment.sh makes the demo's shards
STEPS=${STEPS:-250}
export STEPS BATCH=${BATCH:-32} LR=${LR:-1e-3} DSV3
[[ " $RUNS " == *" bf16 "* ]] || { echo "RUNS must include bf16 (the baseline)" >&2; exit 2; }
if [ "$DSV3" = build/dsv3 ]; then scripts/setup.sh --target dsv3; fi
mkdir -p "$OUT"

# The slow runs first within each seed, so that the lanes stay busy to the end.
for seed in $SEEDS; do for run in $(tr ' ' '\n' <<<"$RUNS" | sort -r); do echo "$seed $run"; done; done |
  xargs -P "$JOBS" -L 1 bash -c 'OUT="$0/seed-$1" SEED=$1 THREADS=1 bench/fp8_experiment.sh "$2" >"$0/seed-$1-$2.log" 2>&1 ||
    echo "seed $1 $2 failed: see $0/seed-$1-$2.log" >&2' "$OUT"

# The seeds where every run in RUNS ended in FILE at step STEPS (one that lacks a run would
# unpair the groups).
finished() {  # FILE (metrics.csv or heldout.csv)
  local seed run ok
  for seed in $SEEDS; do
    ok=1
    for run in $RUNS; do
      [ "$(tail -1 "$OUT/seed-$seed/$run/$1" 2>/dev/null | cut -d, -f1)" = "$STEPS" ] || ok=0
    done
    if [ $ok = 1 ]; then echo "$seed"; else echo "seed $seed: not every run of ($RUNS) has $1 at step $STEPS: left out" >&2; fi
  done
}
group() {  # RUN FILE SEEDS...: the comma-joined FILE of RUN over SEEDS
  local run=$1 file=$2 paths=() seed
  shift 2
  for seed in "$@"; do paths+=("$OUT/seed-$seed/$run/$file"); done
  (IFS=,; echo "${paths[*]}")
}
report() {  # FILE COLUMN TABLE [dsv3 plot options]: the seed groups' table of FILE's COLUMN
  local file=$1 column=$2 table=$3 seeds args=() run
  shift 3
  mapfile -t seeds < <(finished "$file")
  [ ${#seeds[@]} -gt 0 ] || { echo "no seed has every run's $file" >&2; return 1; }
  for run in $RUNS; do args+=("$run=$(group "$run" "$file" "${seeds[@]}")"); done
  "$DSV3" plot "${args[@]}" --column "$column" --baseline bf16 "$@" | tee "$table"
  echo "seeds: ${seeds[*]}"
}

title="tiny-demo (5.2M), $STEPS steps of $BATCH x 128 tokens"
echo "## final validation loss (validation shards: the corpus's tail)"
report metrics.csv val_loss "$REPORT.md" --from-step $((STEPS / 10)) --title "validation loss over seeds, $title" \
  --out "$REPORT-val_loss.svg" --csv "$REPORT-val_loss.csv" --gap-out "$REPORT-gap.svg"

# Held-out loss of each finished run's final checkpoint, scored again when the run has moved
# on since; a scoring that fails leaves its run out of the held-out table.
for seed in $(finished metrics.csv 2>/dev/null); do for run in $RUNS; do
  [ "$(tail -1 "$OUT/seed-$seed/$run/heldout.csv" 2>/dev/null | cut -d, -f1)" = "$STEPS" ] || echo "$OUT/seed-$seed/$run"
done; done | xargs -P "$JOBS" -I{} bash -c '"$0" perplexity -m "$(ls -d "$1"/checkpoint-* | tail -1)" -d "$2" \
  --split unseen --seq 128 -t 1 --csv "$1/heldout.csv" >/dev/null 2>"$1/heldout.log" ||
  echo "held-out scoring of $1 failed: see $1/heldout.log" >&2' "$DSV3" {} "$DATA"
echo "## final held-out loss (training windows the runs never reached; tokens = tokens scored)"
report heldout.csv loss "$REPORT-heldout.md"
echo "tables: $REPORT.md $REPORT-heldout.md  curves: $REPORT-val_loss.svg $REPORT-gap.svg $REPORT-val_loss.csv"
