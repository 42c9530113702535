#!/usr/bin/env bash
# dsv3 serve under load (the server issue's benchmark): starts the server on a loopback port
# for the bench-v3-shaped random checkpoint (bench_decode writes it; BF16, 525M parameters)
# and the trained demo model (scripts/demo.sh trains it if missing), and runs bench_serve
# against each: aggregate tok/s, TTFT and inter-token latency at concurrency 1, 4, 16, 32
# with prompts all different and sharing a 1,024-token prefix (768 for the demo's context), the ratio to concurrency 1,
# and the cached against cold time to first token.
#   bench/bench_serve.sh [--requests 2] [--max-tokens 32] [--only bench|demo]
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=2 MAX_TOKENS=32 ONLY=""
while (($#)); do
  case "$1" in
    --requests) REQUESTS=$2; shift 2 ;;
    --max-tokens) MAX_TOKENS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    *) echo "usage: bench/bench_serve.sh [--requests N] [--max-tokens N] [--only bench|demo]" >&2; exit 1 ;;
  esac
done
scripts/setup.sh --target dsv3 bench_serve bench_decode >/dev/null
BENCH_DIR=${TMPDIR:-/tmp}/dsv3-bench-decode
build/bench/bench_decode --dir "$BENCH_DIR" --write-only >/dev/null
if [[ $ONLY != bench ]]; then
  DEMO=$(ls -d out/demo/run/checkpoint-* 2>/dev/null | sort | tail -1 || true)
  if [[ -z $DEMO ]]; then
    scripts/demo.sh >/dev/null
    DEMO=$(ls -d out/demo/run/checkpoint-* | sort | tail -1)
  fi
fi
LOG=$(mktemp)
SERVER=""
trap '[[ -n $SERVER ]] && kill $SERVER 2>/dev/null; rm -f "$LOG"' EXIT
run() {  # name folder vocab prefix-tokens
  build/dsv3 serve --model "$2" --port 0 --served-model-name "$1" --max-batch 32 --kv-cache-tokens 65536 2>"$LOG" &
  SERVER=$!
  for _ in $(seq 600); do grep -q ready "$LOG" && break; sleep 0.1; done
  local port
  port=$(grep -o '127.0.0.1:[0-9]*' "$LOG" | head -1 | cut -d: -f2)
  echo "== $1: $2"
  build/bench/bench_serve --port "$port" --model "$1" --vocab "$3" --requests "$REQUESTS" --max-tokens "$MAX_TOKENS" \
    --prefix-tokens "$4"
  kill $SERVER && wait $SERVER 2>/dev/null || true
  SERVER=""
}
[[ $ONLY != demo ]] && run bench-v3 "$BENCH_DIR/bf16" 32000 1024
# The demo model's context is 1,024 positions: a 768-token prefix leaves room for the rest.
[[ $ONLY != bench ]] && run demo "$DEMO" 2048 768
exit 0
