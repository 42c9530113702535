// OpenBLAS, loaded at run time so that its CPU core type can be set first.
// Debian's OpenBLAS (DYNAMIC_ARCH) reads OPENBLAS_CORETYPE once, when the library loads, and
// mis-detects some AVX-512 CPUs as "Prescott" (about 5x slower sgemm). Linking it normally
// would load it before main(); loading it here lets every program of the project (the CLI,
// the tests, the benchmarks) pick the right core without the user exporting anything.
// An OPENBLAS_CORETYPE naming a core below this CPU's vector ISA (say "Haswell", AVX2, on an
// AVX-512 CPU: half the sgemm speed, measured) is overridden and the override reported in
// backend_info(); DSV3_BLAS_CORETYPE forces any core.
#include <dlfcn.h>

#include <cctype>
#include <cstdlib>
#include <mutex>
#include <string>

#include "backend/cpu/kernels.h"
#include "core/error.h"

namespace dsv3::cpu {

namespace {

using CblasSgemm = void (*)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
using CblasDgemm = void (*)(int order, int trans_a, int trans_b, int m, int n, int k, double alpha,
                            const double* a, int lda, const double* b, int ldb, double beta, double* c, int ldc);
using CharFn = char* (*)();

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS enum values

struct Blas {
  CblasSgemm sgemm = nullptr;
  CblasDgemm dgemm = nullptr;
  std::string core, config, note;
};

// 3: AVX-512, 2: AVX2 + FMA, 1: older.
int cpu_isa_rank() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 3;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 2;
  return 1;
}

int core_isa_rank(std::string core) {
  for (char& ch : core) ch = char(std::tolower(static_cast<unsigned char>(ch)));
  for (const char* c : {"skylakex", "cooperlake", "sapphirerapids"})
    if (core == c) return 3;
  for (const char* c : {"haswell", "zen", "skylake", "broadwell", "excavator"})
    if (core == c) return 2;
  return 1;
}

// Sets OPENBLAS_CORETYPE before the library loads; returns a note on what was decided.
std::string choose_core_type() {
  if (const char* forced = std::getenv("DSV3_BLAS_CORETYPE")) {
    setenv("OPENBLAS_CORETYPE", forced, 1);
    return std::string("DSV3_BLAS_CORETYPE=") + forced;
  }
  const int rank = cpu_isa_rank();
  const char* best = rank == 3 ? "SkylakeX" : rank == 2 ? "Haswell" : nullptr;
  const char* set = std::getenv("OPENBLAS_CORETYPE");
  if (set && *set && core_isa_rank(set) >= rank) return std::string("OPENBLAS_CORETYPE=") + set;
  if (!best) return "detected by OpenBLAS";
  std::string note = std::string("chosen for this CPU");
  if (set && *set) note = std::string("OPENBLAS_CORETYPE=") + set + " overridden: below this CPU's ISA";
  setenv("OPENBLAS_CORETYPE", best, 1);
  return note;
}

const Blas& blas() {
  static Blas b;
  static std::once_flag once;
  std::call_once(once, [] {
    b.note = choose_core_type();
    void* h = dlopen("libopenblas.so.0", RTLD_NOW | RTLD_LOCAL);
    if (!h) h = dlopen("libopenblas.so", RTLD_NOW | RTLD_LOCAL);
    if (!h) fail("OpenBLAS not found (libopenblas.so.0): run scripts/setup.sh");
    b.sgemm = reinterpret_cast<CblasSgemm>(dlsym(h, "cblas_sgemm"));
    b.dgemm = reinterpret_cast<CblasDgemm>(dlsym(h, "cblas_dgemm"));
    if (!b.sgemm || !b.dgemm) fail("OpenBLAS: cblas_sgemm / cblas_dgemm not found");
    if (auto f = reinterpret_cast<CharFn>(dlsym(h, "openblas_get_corename"))) b.core = f();
    if (auto f = reinterpret_cast<CharFn>(dlsym(h, "openblas_get_config"))) b.config = f();
  });
  return b;
}

}  // namespace

void sgemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
           bool trans_b, float* c, int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  blas().sgemm(kRowMajor, kNoTrans, trans_b ? kTrans : kNoTrans, int(m), int(n), int(k), 1.0f, a, int(lda), b,
               int(ldb), accumulate ? 1.0f : 0.0f, c, int(ldc));
}

template <>
void gemm<float>(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  blas().sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, int(m), int(n), int(k), 1.0f, a,
               int(lda), b, int(ldb), beta, c, int(ldc));
}

template <>
void gemm<double>(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const double* a, int64_t lda,
                  const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  blas().dgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, int(m), int(n), int(k), 1.0, a,
               int(lda), b, int(ldb), beta, c, int(ldc));
}

std::string blas_info() {
  const Blas& b = blas();
  return "OpenBLAS core " + b.core + " (" + b.note + ")";
}

}  // namespace dsv3::cpu
