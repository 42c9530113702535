#!/usr/bin/env bash
# The main job on the bundled default. Until training lands (issue 4), it runs a bundled
# tiny DeepSeek-V3 checkpoint (MLA, MoE with shared + routed experts, MTP layer; random
# weights from the golden set): greedy decoding with the latent KV cache, then sampling,
# then the logits of a sequence written to out/logits.safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --target dsv3
MODEL=tests/data/golden/tiny-v3-fp8
mkdir -p out
echo "== greedy decoding of a 32-token prompt ($MODEL, FP8 weights)"
build/dsv3 generate --model "$MODEL" --prompt-ids "$(seq -s ' ' 10 41)" --max-tokens 32 --temperature 0
echo "== sampling (temperature 0.8, top-p 0.95, seed 7)"
build/dsv3 generate --model "$MODEL" --prompt-ids "10 11 12" --max-tokens 32 --seed 7
echo "== logits of every position"
build/dsv3 logits --model "$MODEL" --ids "$(seq -s ' ' 1 64)" --out out/logits.safetensors
