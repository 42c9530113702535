#!/usr/bin/env bash
# The dependency edges between src/ folders (docs/ARCHITECTURE.md, CMakeLists.txt): every
# #include "folder/..." of a source under src/X must name X or a folder X may use, and
# backend/cpu/ (the CPU implementation) is included from src/backend only. Linking catches
# a wrong call; this catches a wrong header, inline code included. Fails naming file and
# line. Run by CTest (include_edges).
set -uo pipefail
cd "$(dirname "$0")/.."
declare -A allowed=(
  [core]="core"
  [io]="io core"
  [tokenizer]="tokenizer core"
  [data]="data tokenizer core"
  [backend]="backend core"
  [model]="model backend io core"
  [train]="train dist tokenizer model backend io core"
  [infer]="infer model backend io core"
  [cost]="cost model backend io core"
  [serve]="serve infer tokenizer model backend io core"
  [dist]="dist core"
  [eval]="eval infer tokenizer model backend io core"
  [posttrain]="posttrain train eval infer dist tokenizer model backend io core"
  [cli]="cli serve posttrain eval dist cost infer train data tokenizer model backend io core"
)
status=0
for dir in src/*/; do
  folder=$(basename "$dir")
  if [[ -z "${allowed[$folder]+x}" ]]; then
    echo "src/$folder: a folder with no dependency edges listed in $0"
    status=1
    continue
  fi
  while IFS= read -r hit; do
    [[ -z "$hit" ]] && continue
    used=$(sed -E 's/^[^:]*:[0-9]+:[[:space:]]*#[[:space:]]*include[[:space:]]+"([a-z_]+)\/.*/\1/' <<<"$hit")
    if [[ " ${allowed[$folder]} " != *" $used "* ]]; then
      echo "$hit  <- src/$folder may not use src/$used"
      status=1
    elif [[ $folder != backend && $hit == *'"backend/cpu/'* ]]; then
      echo "$hit  <- backend/cpu/ is the backend's own"
      status=1
    fi
  done < <(grep -rnE '^[[:space:]]*#[[:space:]]*include[[:space:]]+"[a-z_]+/' --include='*.cpp' --include='*.h' "$dir")
done
if ((status == 0)); then echo "ok: every include follows the dependency edges"; fi
exit $status
