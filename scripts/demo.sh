#!/usr/bin/env bash
# The main job on the bundled default: train a tiny DeepSeek-V3 (MLA, DeepSeekMoE with a
# shared and 4-of-16 routed experts, auxiliary-loss-free balancing, an MTP module) on the
# King James Bible with its own 2K-token BPE tokenizer for a few minutes on 2 cores, then
# generate from the checkpoint. Everything lands in out/demo/. Extra arguments go to
# `dsv3 train` (for example --steps 200 for a quicker run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --target dsv3
OUT=out/demo
CORPUS=data/kjv-verses.txt.gz
mkdir -p "$OUT"

echo "== 1. tokenizer: byte-level BPE, 2048 tokens, learnt from the corpus"
build/dsv3 train-tokenizer --input "$CORPUS" --vocab-size 2048 --out "$OUT/tokenizer"

echo "== 2. data: one verse per document, EOS between documents, 2% held out"
build/dsv3 data --tokenizer "$OUT/tokenizer" --input "$CORPUS" --txt-docs line --val-fraction 0.02 --out "$OUT/shards"

echo "== 3. train configs/tiny-demo.json"
rm -rf "$OUT/run"
build/dsv3 train --config configs/tiny-demo.json --data "$OUT/shards" --out "$OUT/run" \
  --steps 800 --batch 8 --seq 128 --lr 2e-3 --min-lr 2e-4 --eval-every 100 --save-every 200 --log-every 50 "$@"

CKPT=$(ls -d "$OUT"/run/checkpoint-* | sort | tail -1)
echo "== 4. generate from $CKPT"
for prompt in "And God said" "In the beginning" "The LORD is my shepherd"; do
  build/dsv3 generate --model "$CKPT" --prompt "$prompt" --max-tokens 48 --temperature 0.8 --top-p 0.95 --seed 7
  echo
done
echo "loss curve: $OUT/run/loss.svg   metrics: $OUT/run/metrics.csv"
