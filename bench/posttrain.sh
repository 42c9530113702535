#!/usr/bin/env bash
# The post-training experiment (issue 16, item 5): pre-training, SFT, then GRPO, on 3-digit
# addition, with held-out accuracy after each stage. On 2 cores it takes about 25 minutes.
#   1. a 2.8M-parameter DeepSeek-V3 (configs/tiny-arith.json: MLA, 8 routed + 1 shared
#      experts, MTP) pre-trained on 60,000 lines of worked additions as plain text
#      ("What is 347 + 285? 7+5=12, 4+8+1=13, 3+2+1=6. #### 632"), byte-level tokenizer,
#      with a checkpoint every 50 steps. The base is the first checkpoint that solves 10% of
#      a development set (bare prompts, greedy): such a model learns the algorithm abruptly
#      (a few hundred steps take it from a few percent to nearly all), so a fixed number of
#      steps would leave later stages nothing to do or nothing to start from, depending on
#      the run; this rule gives them a model that has partly learnt it;
#   2. SFT on 1,000 such conversations in DeepSeek-V3's chat template, one epoch (the
#      answer format, the assistant's turn);
#   3. GRPO from the SFT checkpoint on 20,000 answer-only tasks (group 16, 16 prompts a step,
#      exact-match reward, DeepSeekMath's defaults otherwise);
#   and two controls: SFT alone continued on its 1,000 conversations to its plateau (the
#   best of its checkpoints), and GRPO from that plateau.
# Held-out: 500 tasks of the held-out split (no pair of numbers in it, in either order, is in
# any training file), greedy and sampled at temperature 1, with standard errors; the
# development set is 200 other held-out tasks. Prints a table and writes everything, with
# the GRPO curves, to out/posttrain/.
#   bench/posttrain.sh [--pretrain-steps 3000] [--grpo-steps 100] [--threads N]
set -euo pipefail
cd "$(dirname "$0")/.."

PRE=3000 RL=100 THREADS=0
while (($#)); do
  case "$1" in
    --pretrain-steps) PRE=$2; shift 2 ;;
    --grpo-steps) RL=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    *) echo "usage: bench/posttrain.sh [--pretrain-steps N] [--grpo-steps N] [--threads N]" >&2; exit 1 ;;
  esac
done
scripts/setup.sh --target dsv3
# A fixed thread count (no adapting to the machine's load): the same run on the same machine
# gives the same numbers.
export DSV3_ADAPT_THREADS=0
B="build/dsv3"
OUT=out/posttrain
rm -rf "$OUT"
mkdir -p "$OUT"
T="--threads $THREADS"
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start )) s"; }

echo "== 1. tasks: pre-training text, SFT conversations, GRPO tasks, held-out tasks"
$B tasks --op add --digits 3 --count 60000 --seed 11 --format text --out "$OUT/pretrain.txt"
$B tasks --op add --digits 3 --count 1000 --seed 12 --format sft --out "$OUT/sft.jsonl"
$B tasks --op add --digits 3 --count 200 --seed 15 --split heldout --format sft --out "$OUT/sft-val.jsonl"
$B tasks --op add --digits 3 --count 20000 --seed 13 --out "$OUT/grpo.jsonl"
$B tasks --op add --digits 3 --count 500 --seed 14 --split heldout --out "$OUT/heldout.jsonl"
$B tasks --op add --digits 3 --count 200 --seed 16 --split heldout --out "$OUT/dev.jsonl"

echo "== 2. byte-level tokenizer (no merges: one token per character, digits apart) and shards"
$B train-tokenizer --input "$OUT/pretrain.txt" --vocab-size 261 --out "$OUT/tokenizer"
$B data --tokenizer "$OUT/tokenizer" --input "$OUT/pretrain.txt" --txt-docs line --val-fraction 0.01 --out "$OUT/shards" -q

echo "== 3. pre-training ($PRE steps of 16 x 128 tokens, a checkpoint every 50)"
$B train --config configs/tiny-arith.json --data "$OUT/shards" --out "$OUT/pretrain" --steps "$PRE" --batch 16 --seq 128 \
  --lr 2e-3 --min-lr 2e-4 --eval-every 250 --save-every 50 --keep 0 --log-every 250 $T
BASE=""
for ck in "$OUT"/pretrain/checkpoint-*; do
  dev=$($B eval --model "$ck" --task "$OUT/dev.jsonl" --reward exact --max-tokens 48 --no-bos --json $T 2>/dev/null |
        sed -E 's/.*"exact_match":\{"stderr":[^,]*,"value":([^}]*)\}.*/\1/')
  echo "  $(basename "$ck"): solves $dev of the development set"
  if awk -v a="$dev" 'BEGIN { exit !(a >= 0.10) }'; then BASE=$ck; break; fi
done
[[ -n "$BASE" ]] || BASE=$(ls -d "$OUT"/pretrain/checkpoint-* | tail -1)
echo "  base: $BASE"
# The others are not needed (about 20 MB each).
for ck in "$OUT"/pretrain/checkpoint-*; do [[ $ck == "$BASE" ]] || rm -rf "$ck"; done

echo "== 4. SFT: 1,000 conversations, one epoch"
$B sft --model "$BASE" --data "$OUT/sft.jsonl" --val "$OUT/sft-val.jsonl" --out "$OUT/sft" --steps 60 --batch 16 --seq 96 \
  --lr 1e-3 --min-lr 1e-4 --eval-every 30 --save-every 60 --log-every 30 $T
SFT=$(ls -d "$OUT"/sft/checkpoint-* | tail -1)

echo "== 5. GRPO from the SFT checkpoint ($RL steps of 16 prompts x 16 answers)"
$B grpo --model "$SFT" --tasks "$OUT/grpo.jsonl" --eval-tasks "$OUT/heldout.jsonl" --eval-limit 200 --out "$OUT/grpo" \
  --steps "$RL" --prompts 16 --group 16 --max-new-tokens 48 --lr 1e-4 --min-lr 1e-4 --eval-every 10 --save-every "$RL" \
  --log-every 10 $T
GRPO=$(ls -d "$OUT"/grpo/checkpoint-* | tail -1)

echo "== 6. control: SFT alone, continued on its 1,000 conversations (600 steps, about 10 epochs)"
$B sft --model "$BASE" --data "$OUT/sft.jsonl" --val "$OUT/sft-val.jsonl" --out "$OUT/sft-long" --steps 600 --batch 16 \
  --seq 96 --lr 1e-3 --min-lr 1e-3 --warmup 0.03 --eval-every 100 --save-every 100 --keep 0 --log-every 100 $T

# exact_match of a checkpoint on the held-out tasks: "value stderr"
score() {  # MODEL TEMPERATURE [eval flags]
  local model=$1 temp=$2
  shift 2
  $B eval --model "$model" --task "$OUT/heldout.jsonl" --reward exact --max-tokens 48 --temperature "$temp" --seed 1 \
    --json "$@" $T 2>/dev/null | sed -E 's/.*"exact_match":\{"stderr":([^,]*),"value":([^}]*)\}.*/\2 \1/'
}
pct() { awk -v v="$1" -v e="$2" 'BEGIN { printf "%5.1f %% ± %4.1f", 100 * v, 100 * e }'; }

echo "== 7. held-out accuracy (500 tasks)"
best="" best_acc=-1
for ck in "$OUT"/sft-long/checkpoint-*; do
  read -r v e < <(score "$ck" 0 --chat)
  echo "  SFT alone, $(basename "$ck"): $(pct "$v" "$e")"
  if awk -v a="$v" -v b="$best_acc" 'BEGIN { exit !(a > b) }'; then best=$ck best_acc=$v; fi
done

echo "== 8. control: GRPO from SFT alone's best checkpoint ($(basename "$best"))"
$B grpo --model "$best" --tasks "$OUT/grpo.jsonl" --eval-tasks "$OUT/heldout.jsonl" --eval-limit 200 --out "$OUT/grpo-after-long-sft" \
  --steps "$RL" --prompts 16 --group 16 --max-new-tokens 48 --lr 1e-4 --min-lr 1e-4 --eval-every 10 --save-every "$RL" \
  --log-every 10 $T
GRPO2=$(ls -d "$OUT"/grpo-after-long-sft/checkpoint-* | tail -1)

{
  echo "| stage | checkpoint | greedy | sampled (t = 1) |"
  echo "|---|---|---|---|"
  row() {  # LABEL MODEL [eval flags]
    local label=$1 model=$2
    shift 2
    read -r gv ge < <(score "$model" 0 "$@")
    read -r sv se < <(score "$model" 1 "$@")
    echo "| $label | ${model#"$OUT"/} | $(pct "$gv" "$ge") | $(pct "$sv" "$se") |"
  }
  row "pre-trained, $(basename "$BASE") (bare prompt)" "$BASE" --no-bos
  row "+ SFT, 1 epoch of 1,000 conversations" "$SFT" --chat
  row "+ GRPO, $RL steps" "$GRPO" --chat
  row "SFT alone, best of 6 checkpoints to 10 epochs" "$best" --chat
  row "SFT alone's best + GRPO, $RL steps" "$GRPO2" --chat
} | tee "$OUT/results.md"
cp "$OUT/grpo/reward.svg" "$OUT/grpo-reward.svg"
cp "$OUT/grpo/kl.svg" "$OUT/grpo-kl.svg"
cp "$OUT/grpo/length.svg" "$OUT/grpo-length.svg"
echo "took $(elapsed); table: $OUT/results.md; GRPO curves: $OUT/grpo-{reward,kl,length}.svg"
