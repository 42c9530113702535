#!/usr/bin/env bash
# The seam between model math and the machine (docs/ARCHITECTURE.md): threads and BLAS live
# in src/backend only. Fails, naming file and line, if any other source under src/ uses
# OpenMP (a pragma, <omp.h>, an omp_* call) or calls BLAS directly. Run by CTest.
set -uo pipefail
cd "$(dirname "$0")/.."
hits=$(grep -rnE '#[[:space:]]*pragma[[:space:]]+omp|<omp\.h>|\bomp_[a-z_]+[[:space:]]*\(|\bcblas_|\bsgemm_\b|\bdgemm_\b' \
         --include='*.cpp' --include='*.h' src | grep -v '^src/backend/')
if [[ -n "$hits" ]]; then
  echo "threads or BLAS outside src/backend (move the loop behind a backend op):"
  echo "$hits"
  exit 1
fi
echo "ok: no OpenMP or BLAS outside src/backend"
