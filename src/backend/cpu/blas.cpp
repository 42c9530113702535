// OpenBLAS, loaded at run time so that its CPU core type can be set first.
// Debian's OpenBLAS (DYNAMIC_ARCH) reads OPENBLAS_CORETYPE once, when the library loads, and
// mis-detects some AVX-512 CPUs as "Prescott" (about 5x slower sgemm). Linking it normally
// would load it before main(); loading it here lets every program of the project (the CLI,
// the tests, the benchmarks) pick the right core without the user exporting anything.
// An OPENBLAS_CORETYPE the user set is respected.
#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <string>

#include "backend/cpu/kernels.h"
#include "core/error.h"

namespace dsv3::cpu {

namespace {

using CblasSgemm = void (*)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
using CharFn = char* (*)();

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS enum values

struct Blas {
  CblasSgemm sgemm = nullptr;
  std::string core, config;
};

const char* core_type_for_this_cpu() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return "SkylakeX";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
  return nullptr;  // let OpenBLAS decide
}

const Blas& blas() {
  static Blas b;
  static std::once_flag once;
  std::call_once(once, [] {
    if (!std::getenv("OPENBLAS_CORETYPE"))
      if (const char* core = core_type_for_this_cpu()) setenv("OPENBLAS_CORETYPE", core, 0);
    void* h = dlopen("libopenblas.so.0", RTLD_NOW | RTLD_LOCAL);
    if (!h) h = dlopen("libopenblas.so", RTLD_NOW | RTLD_LOCAL);
    if (!h) fail("OpenBLAS not found (libopenblas.so.0): run scripts/setup.sh");
    b.sgemm = reinterpret_cast<CblasSgemm>(dlsym(h, "cblas_sgemm"));
    if (!b.sgemm) fail("OpenBLAS: cblas_sgemm not found");
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

std::string blas_info() {
  const Blas& b = blas();
  return "OpenBLAS core " + b.core + " (" + b.config + ")";
}

}  // namespace dsv3::cpu
