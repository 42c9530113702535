#!/usr/bin/env bash
# Pipeline parallelism measured (the multi-process issue): configs/bench-20m.json trained
# for the same steps on the same micro-batches by one process with 2 threads, and by 2
# processes of 1 thread as a pipeline under 1F1B, DualPipe (2 stages, each on both ranks)
# and DualPipeV (4 stages, two per rank). Prints for each
# the tokens/s (steps after the first), the bubble measured (the ranks' idle fraction of
# the pipeline's step) beside the one dist::simulate gives for the measured chunk times,
# the activations and gradients each rank sent per step, and the speed ratio to one process;
# checks that the runs end with the same weights (the schedules change no arithmetic).
# Everything lands in out/bench-pipeline/.
#   bench/pipeline.sh [--steps 12] [--batch 16] [--seq 128] [--micro-batches 8]
set -euo pipefail
cd "$(dirname "$0")/.."

N=12 B=16 S=128 M=8
while (($#)); do
  case "$1" in
    --steps) N=$2; shift 2 ;;
    --batch) B=$2; shift 2 ;;
    --seq) S=$2; shift 2 ;;
    --micro-batches) M=$2; shift 2 ;;
    *) echo "usage: bench/pipeline.sh [--steps N] [--batch B] [--seq S] [--micro-batches M]" >&2; exit 1 ;;
  esac
done
scripts/setup.sh --target dsv3
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 DSV3_ADAPT_THREADS=0
dsv3=build/dsv3
OUT=out/bench-pipeline
rm -rf "$OUT" && mkdir -p "$OUT"
{ zcat data/kjv-verses.txt.gz || true; } | head -n 12000 > "$OUT/corpus.txt"
"$dsv3" train-tokenizer --input "$OUT/corpus.txt" --vocab-size 2048 --out "$OUT/tok" >/dev/null 2>&1
"$dsv3" data --tokenizer "$OUT/tok" --input "$OUT/corpus.txt" --out "$OUT/shards" --val-fraction 0.02 >/dev/null 2>&1
train=(train --config configs/bench-20m.json --data "$OUT/shards" --steps "$N" --batch "$B" --seq "$S" --micro-batches "$M"
       --eval-every 0 --save-every "$N" --log-every 1)
"$dsv3" "${train[@]}" --threads 2 --out "$OUT/one" 2>"$OUT/one.log"
mpirun --oversubscribe --bind-to none -np 2 "$dsv3" "${train[@]}" --threads 1 --pp 2 --pp-schedule 1f1b --out "$OUT/1f1b" 2>"$OUT/1f1b.log"
mpirun --oversubscribe --bind-to none -np 2 "$dsv3" "${train[@]}" --threads 1 --pp 2 --pp-schedule dualpipe --out "$OUT/dualpipe" \
  2>"$OUT/dualpipe.log"
mpirun --oversubscribe --bind-to none -np 2 "$dsv3" "${train[@]}" --threads 1 --pp 2 --pp-schedule dualpipev --out "$OUT/dualpipev" \
  2>"$OUT/dualpipev.log"
for run in 1f1b dualpipe dualpipev; do
  cmp -s "$OUT/one/checkpoint-$(printf %07d "$N")/model.safetensors" "$OUT/$run/checkpoint-$(printf %07d "$N")/model.safetensors" ||
    { echo "$run's weights differ from one process's"; exit 1; }
done
python3 - "$OUT" "$M" <<'PY'
import csv, sys
out, M = sys.argv[1], int(sys.argv[2])
def rows(run):
    with open(f"{out}/{run}/metrics.csv") as f:
        return list(csv.DictReader(f))[1:]  # the first step allocates
def speed(rs):  # tokens over seconds
    return sum(int(r["batch"]) for r in rs) / sum(int(r["batch"]) / float(r["tokens_per_s"]) for r in rs)
one = rows("one")
base = speed(one)
print(f"one process, 2 threads, {M} micro-batches: {base:.0f} tok/s")
for run in ("1f1b", "dualpipe", "dualpipev"):
    rs = rows(run)
    bubble = sum(float(r["bubble"]) for r in rs) / len(rs)
    sim = sum(float(r["bubble_sim"]) for r in rs) / len(rs)
    sent = sum(float(r["p2p_mb"]) for r in rs) / len(rs)
    print(f"pp=2 {run:9s} (1 thread per rank): {speed(rs):.0f} tok/s = {speed(rs) / base:.2f} x one process; "
          f"bubble measured {100 * bubble:.1f}% vs simulated {100 * sim:.1f}%; "
          f"rank 0 sent {sent:.1f} MB of activations and gradients per step")
print("weights after the last step: identical in the four runs")
PY
