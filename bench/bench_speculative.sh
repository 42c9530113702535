#!/usr/bin/env bash
# MTP speculative decoding on a trained model (the batched-inference issue, item 5): the demo
# checkpoint (scripts/demo.sh trains it if missing), exported to BF16 and FP8, decodes the
# openings of held-out verses (the corpus's last ones, which the demo holds out) greedily,
# plain and with --speculative mtp --draft 1..3, in the same run. Prints per format and draft
# length: drafts accepted, tokens per main-model step, decode tok/s and its ratio to plain.
#   bench/bench_speculative.sh [--prompts 40] [--tokens 64]
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPTS=40 TOKENS=64
while (($#)); do
  case "$1" in
    --prompts) PROMPTS=$2; shift 2 ;;
    --tokens) TOKENS=$2; shift 2 ;;
    *) echo "usage: bench/bench_speculative.sh [--prompts N] [--tokens N]" >&2; exit 1 ;;
  esac
done
scripts/setup.sh --target dsv3 >/dev/null
CK=$(ls -d out/demo/run/checkpoint-* 2>/dev/null | sort | tail -1 || true)
if [[ -z $CK ]]; then
  scripts/demo.sh >/dev/null
  CK=$(ls -d out/demo/run/checkpoint-* | sort | tail -1)
fi
OUT=out/bench-speculative
rm -rf "$OUT" && mkdir -p "$OUT"
build/dsv3 export --model "$CK" --dtype bf16 --out "$OUT/bf16" >/dev/null 2>&1
build/dsv3 export --model "$CK" --dtype fp8 --out "$OUT/fp8" >/dev/null 2>&1
# Held-out text: the first six words of the corpus's last verses (the demo's 2 % held out).
zcat data/kjv-verses.txt.gz | tail -n "$PROMPTS" | cut -d' ' -f2-7 > "$OUT/prompts.txt"
echo "checkpoint $CK; $PROMPTS held-out verse openings, up to $TOKENS tokens each, greedy"
for fmt in bf16 fp8; do
  for mode in plain 1 2 3; do : > "$OUT/$fmt-$mode.log"; : > "$OUT/$fmt-$mode.ids"; done
  # Each prompt in every mode in turn, so that the machine's drift affects them alike.
  while IFS= read -r prompt; do
    for mode in plain 1 2 3; do
      flags=()
      [[ $mode != plain ]] && flags=(--speculative mtp --draft "$mode")
      build/dsv3 generate --model "$OUT/$fmt" --prompt "$prompt" --max-tokens "$TOKENS" --temperature 0 \
        --output-ids "${flags[@]}" 2>>"$OUT/$fmt-$mode.log" >>"$OUT/$fmt-$mode.ids"
    done
  done < "$OUT/prompts.txt"
  python3 - "$OUT" "$fmt" <<'PY'
import re, sys
out, fmt = sys.argv[1], sys.argv[2]
def stats(mode):
    tokens = secs = acc = drafted = 0
    for line in open(f"{out}/{fmt}-{mode}.log"):
        m = re.search(r"decode: (\d+) tokens in ([0-9.]+) s", line)
        if m: tokens += int(m.group(1)); secs += float(m.group(2))
        m = re.search(r"accepted: (\d+) of (\d+)", line)
        if m: acc += int(m.group(1)); drafted += int(m.group(2))
    return tokens, secs, acc, drafted
plain_t, plain_s, _, _ = stats("plain")
plain = open(f"{out}/{fmt}-plain.ids").read()
print(f"{fmt}: plain {plain_t / plain_s:.1f} tok/s")
for mode in ("1", "2", "3"):
    t, s, a, d = stats(mode)
    same = open(f"{out}/{fmt}-{mode}.ids").read() == plain
    print(f"{fmt}: draft {mode}: {100 * a / max(d, 1):.1f} % of {d} drafts accepted, "
          f"{t / max(t - a, 1):.2f} tokens per main-model step, {t / s:.1f} tok/s = {t / s / (plain_t / plain_s):.2f}x plain; "
          f"greedy output {'identical' if same else 'DIFFERENT'}")
PY
done
