#!/usr/bin/env bash
# Installs what dsv3 needs on a fresh Debian 12 machine (only missing packages), then
# configures and builds it into build/. Safe to run again: it does only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  cmake ninja-build g++ ccache pkg-config
  libopenblas0-openmp libopenblas-openmp-dev   # sgemm for prefill (loaded at run time)
  nlohmann-json3-dev                           # config.json, safetensors headers
  libcli11-dev                                 # command-line flags
  libpcre2-dev zlib1g-dev                      # tokenizer regexes (PCRE2 JIT), .gz corpora
  libgtest-dev libgmock-dev libbenchmark-dev   # tests and benchmarks
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

BUILD_TYPE=${BUILD_TYPE:-Release}
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE="$BUILD_TYPE" >/dev/null
cmake --build build -j "$(nproc)" "$@"
