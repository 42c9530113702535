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
  libcpp-httplib-dev                           # dsv3 serve's HTTP server
  openmpi-bin libopenmpi-dev                   # training across processes (src/dist)
)
# Node.js runs the official `openai` client against dsv3 serve in the tests. The machine's
# own Node (with its npm) is kept; Debian's is installed only when there is none.
command -v node >/dev/null || packages+=(nodejs)
command -v npm >/dev/null || packages+=(npm)
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

# The official OpenAI client for Node, pinned (6.x runs on Node 18 and 20; 7.x needs 22),
# into build/npm where the server tests look for it.
OPENAI_NPM_VERSION=6.30.1
if [[ ! -f build/npm/node_modules/openai/package.json ]] ||
   ! grep -q "\"version\": \"$OPENAI_NPM_VERSION\"" build/npm/node_modules/openai/package.json; then
  echo "setup: installing the openai npm client $OPENAI_NPM_VERSION into build/npm"
  mkdir -p build/npm
  npm install --prefix build/npm --no-audit --no-fund --no-save --loglevel=error "openai@$OPENAI_NPM_VERSION" >/dev/null ||
    echo "setup: warning: npm could not install openai@$OPENAI_NPM_VERSION; the server's client test will fail" >&2
fi

BUILD_TYPE=${BUILD_TYPE:-Release}
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE="$BUILD_TYPE" >/dev/null
cmake --build build -j "$(nproc)" "$@"
