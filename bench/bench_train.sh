#!/usr/bin/env bash
# Training speed of dsv3 against a PyTorch implementation of the same model
# (bench/torch_deepseek_v3.py): both train configs/bench-20m.json (~20M parameters, MLA,
# DeepSeekMoE, MTP) in float32 on the same token windows, with the same batch, sequence,
# steps and threads, and the same OpenBLAS core type. Prints tokens/s of each, the ratio,
# and the MFU of each against the machine's fp32 GEMM peak measured in the same run
# (bench_gemm: dsv3::matmul = OpenBLAS sgemm, all threads). Everything lands in out/bench-train/.
#   bench/bench_train.sh [--batch 8] [--seq 256] [--steps 30] [--threads nproc] [--rounds 2]
# Rounds alternate dsv3 and PyTorch; each side's best round is reported (the machine may be
# shared). Tokens/s leave out the first 3 steps of every run.
set -euo pipefail
cd "$(dirname "$0")/.."

B=8 S=256 N=30 T=$(nproc) ROUNDS=2 WARMUP=3
while (($#)); do
  case "$1" in
    --batch) B=$2; shift 2 ;;
    --seq) S=$2; shift 2 ;;
    --steps) N=$2; shift 2 ;;
    --threads) T=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    *) echo "usage: bench/bench_train.sh [--batch B] [--seq S] [--steps N] [--threads T] [--rounds R]" >&2; exit 1 ;;
  esac
done
((N > WARMUP)) || { echo "--steps must be more than $WARMUP (the warm-up steps left out)" >&2; exit 1; }

PY=/usr/bin/python3  # Debian's Python: python3-torch is installed for it, not for pyenv's
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "== installing python3-torch (Debian's PyTorch; only this benchmark needs it)"
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-torch >/dev/null
fi
scripts/setup.sh --target dsv3 bench_gemm

CONFIG=configs/bench-20m.json
OUT=out/bench-train
CORPUS=data/kjv-verses.txt.gz
mkdir -p "$OUT"
echo "== data: the demo's 2048-token BPE and shards of $CORPUS"
build/dsv3 train-tokenizer --input "$CORPUS" --vocab-size 2048 --out "$OUT/tokenizer" >/dev/null
build/dsv3 data --tokenizer "$OUT/tokenizer" --input "$CORPUS" --txt-docs line --val-fraction 0.02 \
  --out "$OUT/shards" 2>/dev/null | tail -1

gemm_peak() {  # best GFLOP/s of bench_gemm; its output goes to $OUT/gemm-$1.txt
  build/bench/bench_gemm --threads "$T" > "$OUT/gemm-$1.txt"
  sed -n 's/^peak: \([0-9.]*\) .*/\1/p' "$OUT/gemm-$1.txt"
}
echo "== fp32 GEMM peak (bench_gemm, $T threads)"
PEAK_BEFORE=$(gemm_peak before)
cat "$OUT/gemm-before.txt"
# The peer gets the core type dsv3 chose: Debian's torch multiplies through libblas.so.3 =
# the same OpenBLAS, which otherwise obeys the environment's OPENBLAS_CORETYPE as it is.
CORE=$(sed -n 's/.*OpenBLAS core \([A-Za-z0-9]*\).*/\1/p' "$OUT/gemm-before.txt")
export OMP_NUM_THREADS=$T

# dsv3's tokens/s over steps WARMUP+1..N: tokens / the sum of the step times in metrics.csv.
csv_tok_s() {
  awk -F, -v w="$WARMUP" 'NR > 1 && $1 > w { n++; tokens += $2 - prev; t += ($2 - prev) / $9 } { if (NR > 1) prev = $2 }
    END { if (t > 0) printf "%.1f", tokens / t }' "$1"
}
csv_loss() { awk -F, -v s="$2" 'NR > 1 && $1 == s { print $4 }' "$1"; }

DSV3_BEST=0 TORCH_BEST=0
for ((r = 1; r <= ROUNDS; r++)); do
  echo "== round $r/$ROUNDS: dsv3 train ($N steps of $B x $S tokens, $T threads)"
  rm -rf "$OUT/dsv3-run"
  build/dsv3 train --config "$CONFIG" --data "$OUT/shards" --out "$OUT/dsv3-run" --steps "$N" --batch "$B" --seq "$S" \
    --threads "$T" --eval-every 0 --save-every 0 --fp32-moments --log-every "$N" 2> "$OUT/dsv3-round$r.log"
  grep -E "^(step|cost)" "$OUT/dsv3-round$r.log" | cut -c1-160
  tok=$(csv_tok_s "$OUT/dsv3-run/metrics.csv")
  echo "dsv3 round $r: $tok tok/s (steps $((WARMUP + 1))-$N)"
  if awk -v a="$tok" -v b="$DSV3_BEST" 'BEGIN { exit !(a > b) }'; then
    DSV3_BEST=$tok
    DSV3_FIRST=$(csv_loss "$OUT/dsv3-run/metrics.csv" 1) DSV3_LAST=$(csv_loss "$OUT/dsv3-run/metrics.csv" "$N")
  fi

  echo "== round $r/$ROUNDS: PyTorch (same config, data order, batch, seq, steps, threads; OPENBLAS_CORETYPE=$CORE)"
  OPENBLAS_CORETYPE=$CORE "$PY" bench/torch_deepseek_v3.py --config "$CONFIG" --data "$OUT/shards" --steps "$N" \
    --batch "$B" --seq "$S" --threads "$T" --warmup-steps "$WARMUP" > "$OUT/torch-round$r.log"
  grep -E "^(torch|blas|result)" "$OUT/torch-round$r.log"
  tok=$(sed -n 's/^result: tokens_per_s \([0-9.]*\).*/\1/p' "$OUT/torch-round$r.log")
  if awk -v a="$tok" -v b="$TORCH_BEST" 'BEGIN { exit !(a > b) }'; then
    TORCH_BEST=$tok
    TORCH_FIRST=$(sed -n 's/^result: first_loss //p' "$OUT/torch-round$r.log")
    TORCH_LAST=$(sed -n 's/^result: last_loss //p' "$OUT/torch-round$r.log")
  fi
done

PEAK_AFTER=$(gemm_peak after)
echo "== fp32 GEMM peak again: $PEAK_AFTER GFLOP/s (before: $PEAK_BEFORE); the higher one is the peak"
FLOPS=$(build/dsv3 cost --config "$CONFIG" --seq "$S" --json | "$PY" -c "import json, sys; print(json.load(sys.stdin)['train_flops_per_token'])")

"$PY" - "$DSV3_BEST" "$TORCH_BEST" "$FLOPS" "$PEAK_BEFORE" "$PEAK_AFTER" "$B" "$S" "$N" "$T" "$CORE" \
  "$DSV3_FIRST" "$DSV3_LAST" "$TORCH_FIRST" "$TORCH_LAST" "$(cat /proc/loadavg | cut -d' ' -f1-3)" <<'EOF'
import math, sys
d, t, flops, p1, p2 = map(float, sys.argv[1:6])
B, S, N, T, core, d_first, d_last, t_first, t_last, load = sys.argv[6:]
peak = max(p1, p2)
print(f"\ndsv3 vs PyTorch: configs/bench-20m.json, {N} steps of {B} x {S} tokens, {T} threads, fp32 "
      f"(weights, activations, AdamW moments), OpenBLAS core {core} for both; best of the rounds, "
      f"steps after the first 3; load average at the end {load}\n")
print("| trainer | tok/s | vs PyTorch | MFLOP/token | GFLOP/s | MFU | first loss | last loss |")
print("|---|---|---|---|---|---|---|---|")
for name, tok, first, last in (("dsv3", d, d_first, d_last), ("PyTorch", t, t_first, t_last)):
    print(f"| {name} | {tok:.0f} | {tok / t:.2f}x | {flops / 1e6:.1f} | {tok * flops / 1e9:.1f} | "
          f"{100 * tok * flops / 1e9 / peak:.1f} % | {float(first):.3f} | {float(last):.3f} |")
print(f"\nMFLOP/token: dsv3 cost --seq {S} (6 x active matmul weights + causal attention + MTP). "
      f"MFU against the fp32 GEMM peak measured here: {peak:.1f} GFLOP/s (bench_gemm, {T} threads; "
      f"{p1:.1f} before, {p2:.1f} after the runs). ln(vocab) = {math.log(2048):.3f}.")
# The speed issue's target (issue 12): 55 % of the sgemm peak; the ratio to PyTorch is reported.
print(f"target: MFU >= 55 % of the sgemm peak: {'met' if d * flops / 1e9 >= 0.55 * peak else 'MISSED'} "
      f"({100 * d * flops / 1e9 / peak:.1f} %); dsv3 / PyTorch: {d / t:.2f}x")
EOF
